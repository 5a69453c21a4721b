"""mpolab: matrices as MPOs (tensor-train matrices) for PyTorch."""

from .decompose import decompose
from .mpo import MPO

__all__ = ["MPO", "decompose"]
