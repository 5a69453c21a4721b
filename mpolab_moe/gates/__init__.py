"""Gates: ``x [T, d] -> Routing``. Every gate works with every expert bank."""

from .base import Gate, load_balancing_loss, router_z_loss
from .top_k import TopKGate

__all__ = ["Gate", "TopKGate", "load_balancing_loss", "router_z_loss"]
