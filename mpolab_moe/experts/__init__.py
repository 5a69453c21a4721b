"""Expert banks: compute E experts on tokens grouped by expert."""

from .base import ExpertBank, grouped_matmul
from .dense import DenseExperts

__all__ = ["DenseExperts", "ExpertBank", "grouped_matmul"]
