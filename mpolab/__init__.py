"""mpolab: weight matrices as MPOs (tensor-train matrices) for PyTorch.

Decompose a matrix with real truncation control, contract it fast, and turn ``nn.Linear`` /
``nn.Embedding`` layers into compressed, trainable MPO layers.

Example:
    >>> import torch, mpolab
    >>> mpo = mpolab.decompose(torch.randn(3072, 768), rel_tol=0.3)
    >>> layer = mpolab.MPOLinear.from_linear(torch.nn.Linear(768, 3072), max_rank=64)
"""

from . import contract, shapes, truncation
from .compress import CompressionReport, compress, find_targets
from .decompose import decompose
from .heal import HealReport, fidelity, heal
from .io import load, save
from .mpo import MPO
from .nn import HasCentralTensor, MPOEmbedding, MPOLinear, MPOModule
from .options import TruncationOptions
from .shapes import factorize, plan_factors
from .training import DimensionSqueezer, param_groups, set_trainable, squeeze

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "DimensionSqueezer",
    "HasCentralTensor",
    "HealReport",
    "MPO",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "TruncationOptions",
    "compress",
    "contract",
    "decompose",
    "factorize",
    "fidelity",
    "find_targets",
    "heal",
    "load",
    "param_groups",
    "plan_factors",
    "save",
    "set_trainable",
    "shapes",
    "squeeze",
    "truncation",
]
