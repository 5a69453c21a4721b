"""Expert banks: compute E experts on tokens grouped by expert."""

from .base import ExpertBank, grouped_matmul
from .dense import DenseExperts
from .ia3 import IA3Experts
from .lora import LoRAExperts
from .mpo import MPOExperts, SharedCentralMPO, mpoe_param_ratio
from .sliced import SlicedExperts

__all__ = [
    "DenseExperts",
    "ExpertBank",
    "IA3Experts",
    "LoRAExperts",
    "MPOExperts",
    "SharedCentralMPO",
    "SlicedExperts",
    "grouped_matmul",
    "mpoe_param_ratio",
]
