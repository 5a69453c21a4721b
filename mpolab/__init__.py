"""mpolab: weight matrices as MPOs (tensor-train matrices) for PyTorch.

Decompose a matrix with real truncation control, contract it fast, and turn ``nn.Linear`` /
``nn.Embedding`` layers into compressed, trainable MPO layers.

Example:
    >>> import torch, mpolab
    >>> mpo = mpolab.decompose(torch.randn(3072, 768), rel_tol=0.3)
    >>> layer = mpolab.MPOLinear.from_linear(torch.nn.Linear(768, 3072), max_rank=64)
"""

from . import contract, shapes, truncation
from .calibrate import InputStats, calibration_data, collect_input_stats
from .compress import CompressionReport, compress, find_targets
from .decompose import decompose
from .heal import HealReport, fidelity, heal, perplexity
from .hub import from_pretrained  # also hooks transformers' save_pretrained (mpolab.hub)
from .io import load, save
from .mpo import MPO
from .nn import HasCentralTensor, MPOEmbedding, MPOLinear, MPOModule
from .options import TruncationOptions
from .shapes import factorize, plan_factors
from .step_weight import Materializer, materialize
from .training import DimensionSqueezer, param_groups, set_trainable, squeeze
from .weighted import Layout, decompose_weighted, output_error

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "DimensionSqueezer",
    "HasCentralTensor",
    "HealReport",
    "InputStats",
    "Layout",
    "MPO",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "Materializer",
    "TruncationOptions",
    "calibration_data",
    "collect_input_stats",
    "compress",
    "contract",
    "decompose",
    "decompose_weighted",
    "factorize",
    "fidelity",
    "find_targets",
    "from_pretrained",
    "heal",
    "load",
    "materialize",
    "output_error",
    "param_groups",
    "perplexity",
    "plan_factors",
    "save",
    "set_trainable",
    "shapes",
    "squeeze",
    "truncation",
]
