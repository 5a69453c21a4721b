"""mpolab_moe: mixtures of experts on one layer with two plug points, a gate and an expert bank.

Example:
    >>> from mpolab_moe import MoE, TopKGate, DenseExperts, MPOExperts, moefy, aux_loss, GradientMask
    >>> layer = MoE(TopKGate(768, num_experts=8, k=1), DenseExperts(768, 3072, num_experts=8))   # Switch
    >>> y = layer(torch.randn(2, 16, 768))
    >>> report = moefy(hf_model, layers=[10, 11], num_experts=8, experts="mpo")                  # MPOE upcycling
    >>> mask = GradientMask(hf_model, p_b=0.5).attach(optimizer)
"""

from . import peft  # noqa: F401  (mpolab_moe.peft: the PEFT-style front door)
from .convert import FFN, MoefyReport, find_ffns, moefy, register_method, registered_methods, upcycle
from .experts import (
    DenseExperts,
    ExpertBank,
    IA3Experts,
    LoRAExperts,
    MPOExperts,
    SharedCentralMPO,
    SlicedExperts,
    grouped_matmul,
    mpoe_param_ratio,
)
from .gates import (
    AdaptResult,
    AvgKGate,
    Gate,
    GroundTruthGate,
    MLPGate,
    SimilarityGate,
    SoftMergeGate,
    TopAnyGate,
    TopKGate,
    activation_mass_captured,
    refresh_avg_k_gates,
    train_mlp_gate,
)
from .grad_mask import GradientMask
from .layer import MoE, aux_loss, moe_layers
from .routing import Routing, RoutingStats
from .split import balanced_kmeans, coactivation_split, contiguous_split, random_split

__all__ = [
    "AdaptResult",
    "AvgKGate",
    "DenseExperts",
    "ExpertBank",
    "FFN",
    "Gate",
    "GradientMask",
    "GroundTruthGate",
    "IA3Experts",
    "LoRAExperts",
    "MLPGate",
    "MPOExperts",
    "MoE",
    "MoefyReport",
    "Routing",
    "RoutingStats",
    "SharedCentralMPO",
    "SimilarityGate",
    "SlicedExperts",
    "SoftMergeGate",
    "TopAnyGate",
    "TopKGate",
    "activation_mass_captured",
    "aux_loss",
    "balanced_kmeans",
    "coactivation_split",
    "contiguous_split",
    "find_ffns",
    "grouped_matmul",
    "moe_layers",
    "moefy",
    "mpoe_param_ratio",
    "random_split",
    "refresh_avg_k_gates",
    "register_method",
    "registered_methods",
    "train_mlp_gate",
    "upcycle",
]
