"""mpolab_moe: mixtures of experts on one layer with two plug points, a gate and an expert bank.

Example:
    >>> from mpolab_moe import MoE, TopKGate, DenseExperts, MPOExperts, moefy, aux_loss, GradientMask
    >>> layer = MoE(TopKGate(768, num_experts=8, k=1), DenseExperts(768, 3072, num_experts=8))   # Switch
    >>> y = layer(torch.randn(2, 16, 768))
    >>> report = moefy(hf_model, layers=[10, 11], num_experts=8, experts="mpo")                  # MPOE upcycling
    >>> mask = GradientMask(hf_model, p_b=0.5).attach(optimizer)
"""

from .convert import FFN, MoefyReport, find_ffns, moefy, register_method, registered_methods, upcycle
from .experts import DenseExperts, ExpertBank, MPOExperts, SharedCentralMPO, grouped_matmul, mpoe_param_ratio
from .gates import Gate, TopKGate
from .grad_mask import GradientMask
from .layer import MoE, aux_loss, moe_layers
from .routing import Routing, RoutingStats

__all__ = [
    "FFN",
    "DenseExperts",
    "ExpertBank",
    "Gate",
    "GradientMask",
    "MPOExperts",
    "MoE",
    "MoefyReport",
    "Routing",
    "RoutingStats",
    "SharedCentralMPO",
    "TopKGate",
    "aux_loss",
    "find_ffns",
    "grouped_matmul",
    "moe_layers",
    "moefy",
    "mpoe_param_ratio",
    "register_method",
    "registered_methods",
    "upcycle",
]
