"""``SingleExpertGate``: every token to the one expert with weight 1 (plain LoRA / IA3 inside a ``MoE``)."""

from __future__ import annotations

import torch
from torch import Tensor

from mpolab.utils import check_positive_int

from ..routing import Routing
from .base import Gate

__all__ = ["SingleExpertGate"]


class SingleExpertGate(Gate):
    """The gate of a one-expert bank: soft routing with weight 1 for every token.

    Lets a single adapter (plain LoRA, plain (IA)³) be an ordinary :class:`~mpolab_moe.MoE` layer:
    the bank's ``forward_soft`` runs once on all tokens, and the layer keeps its statistics.
    No parameters, no aux loss.

    Examples:
        >>> layer = MoE(SingleExpertGate(512), LoRAExperts(512, 512, num_experts=1, r=8))
        >>> layer(torch.randn(2, 7, 512)).shape
        torch.Size([2, 7, 512])
    """

    soft = True

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.num_experts = 1

    def forward(self, x: Tensor) -> Routing:
        """``x [T, d]`` -> soft :class:`Routing` with ``soft_weight = ones [T, 1]``."""
        return Routing.soft(torch.ones(x.shape[0], 1, device=x.device))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"
