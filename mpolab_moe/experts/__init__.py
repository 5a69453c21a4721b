"""Expert banks: compute E experts on tokens grouped by expert."""

from .base import ExpertBank, grouped_matmul
from .dense import DenseExperts
from .mpo import MPOExperts, SharedCentralMPO, mpoe_param_ratio

__all__ = ["DenseExperts", "ExpertBank", "MPOExperts", "SharedCentralMPO", "grouped_matmul", "mpoe_param_ratio"]
