"""Gates: ``x [T, d] -> Routing``; each declares what it needs from the expert bank (:mod:`.base`)."""

from .avg_k import AvgKGate, refresh_avg_k_gates
from .base import BankBoundGate, Gate, load_balancing_loss, router_z_loss
from .moefication import GroundTruthGate, MLPGate, SimilarityGate, activation_mass_captured, train_mlp_gate
from .single import SingleExpertGate
from .soft_merge import SoftMergeGate
from .top_any import AdaptResult, TopAnyGate
from .top_k import TopKGate

__all__ = [
    "AdaptResult",
    "AvgKGate",
    "BankBoundGate",
    "Gate",
    "GroundTruthGate",
    "MLPGate",
    "SimilarityGate",
    "SingleExpertGate",
    "SoftMergeGate",
    "TopAnyGate",
    "TopKGate",
    "activation_mass_captured",
    "load_balancing_loss",
    "refresh_avg_k_gates",
    "router_z_loss",
    "train_mlp_gate",
]
