"""Expert banks: compute E experts on tokens grouped by expert (the contract is in :mod:`.base`)."""

from .base import (
    BankOutput,
    Capability,
    ExpertBank,
    FFNBank,
    FFNWeights,
    KeyedBank,
    NeuronGroupBank,
    SoftBank,
    grouped_ffn,
    grouped_matmul,
)
from .dense import DenseExperts
from .ia3 import IA3Experts
from .lora import LoRAExperts
from .mpo import MPOExperts, mpoe_param_ratio
from .shared_central import SharedCentralMPO
from .sliced import SlicedExperts

__all__ = [
    "BankOutput",
    "Capability",
    "DenseExperts",
    "ExpertBank",
    "FFNBank",
    "FFNWeights",
    "IA3Experts",
    "KeyedBank",
    "LoRAExperts",
    "MPOExperts",
    "NeuronGroupBank",
    "SharedCentralMPO",
    "SlicedExperts",
    "SoftBank",
    "grouped_ffn",
    "grouped_matmul",
    "mpoe_param_ratio",
]
