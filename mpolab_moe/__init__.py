"""mpolab_moe: mixtures of experts on one layer with two plug points, a gate and an expert bank.

Example:
    >>> from mpolab_moe import MoE, TopKGate, DenseExperts
    >>> layer = MoE(TopKGate(768, num_experts=8, k=1), DenseExperts(768, 3072, num_experts=8))   # Switch
    >>> y = layer(torch.randn(2, 16, 768))
"""

from .experts import DenseExperts, ExpertBank, grouped_matmul
from .gates import Gate, TopKGate
from .layer import MoE, aux_loss, moe_layers
from .routing import Routing, RoutingStats

__all__ = [
    "DenseExperts",
    "ExpertBank",
    "Gate",
    "MoE",
    "Routing",
    "RoutingStats",
    "TopKGate",
    "aux_loss",
    "grouped_matmul",
    "moe_layers",
]
