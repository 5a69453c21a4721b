"""mpolab_moe: mixtures of experts on one layer with two plug points, a gate and an expert bank.

Examples:
    >>> from mpolab_moe import MoE, TopKGate, DenseExperts, MPOExperts, moefy, aux_loss, GradientMask
    >>> layer = MoE(TopKGate(768, num_experts=8, k=1), DenseExperts(768, 3072, num_experts=8))   # Switch
    >>> MoE(AvgKGate(768, 8, k=2), DenseExperts(768, 3072, 8))     # TypeError: AvgKGate needs KEYS ...
    >>> y = layer(torch.randn(2, 16, 768))
    >>> report = moefy(hf_model, layers=[10, 11], num_experts=8, experts="mpo")                  # MPOE upcycling
    >>> mask = GradientMask(hf_model, p_b=0.5).attach(optimizer)
"""

from . import (
    peft,  # noqa: F401  (mpolab_moe.peft: the PEFT-style front door)
    recipes,  # noqa: F401  (registers "moefication", "emoe" and "dynmoe" with moefy)
)
from .convert import MoefyReport
from .experts import (
    BankOutput,
    Capability,
    DenseExperts,
    ExpertBank,
    FFNWeights,
    IA3Experts,
    LoRAExperts,
    MPOExperts,
    SharedCentralMPO,
    SlicedExperts,
    grouped_matmul,
    mpoe_param_ratio,
)
from .ffn import FFN, find_ffns
from .gates import (
    AdaptResult,
    AvgKGate,
    BankBoundGate,
    Gate,
    GroundTruthGate,
    MLPGate,
    SimilarityGate,
    SingleExpertGate,
    SoftMergeGate,
    TopAnyGate,
    TopKGate,
    activation_mass_captured,
    refresh_avg_k_gates,
    train_mlp_gate,
)
from .grad_mask import GradientMask
from .hub import from_pretrained, moefy  # moefy that records its arguments (for save_pretrained)
from .layer import MoE, aux_loss, check_pair, moe_layers
from .parallel import expert_parallel, shard_experts
from .registry import register_method, registered_methods
from .routing import Routing, RoutingStats
from .split import balanced_kmeans, coactivation_split, contiguous_split, random_split
from .upcycle import UpcycleReport, upcycle

__all__ = [
    "AdaptResult",
    "AvgKGate",
    "BankBoundGate",
    "BankOutput",
    "Capability",
    "DenseExperts",
    "ExpertBank",
    "FFN",
    "FFNWeights",
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
    "SingleExpertGate",
    "SlicedExperts",
    "SoftMergeGate",
    "TopAnyGate",
    "TopKGate",
    "UpcycleReport",
    "activation_mass_captured",
    "aux_loss",
    "balanced_kmeans",
    "check_pair",
    "coactivation_split",
    "contiguous_split",
    "find_ffns",
    "from_pretrained",
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
    "expert_parallel",
    "shard_experts",
]
