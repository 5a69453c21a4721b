"""``SoftMergeGate``: the MoV / MoLoRA router that gives every expert a weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpolab.utils import check_positive_int

from ..routing import Routing
from .base import Gate, check_finite_logits, check_k

__all__ = ["SoftMergeGate"]


class SoftMergeGate(Gate):
    """Linear router ``d -> E`` (fp32, no bias), softmax over all experts: soft merging.

    The MoV/MoLoRA router (Zadouri et al., 2023): it reads the very tensor the experts modify
    and returns :meth:`Routing.soft <mpolab_moe.Routing.soft>` weights ``[T, E]``, so a bank with
    ``forward_soft`` can merge its experts' parameters before touching the tokens. With
    ``top_k`` only the ``k`` largest probabilities are kept and the rest set to zero, *without*
    renormalising (so the kept weights sum to less than one). No auxiliary loss.

    Args:
        d_model: width ``d`` of the tensor the router reads.
        num_experts: ``E``.
        top_k: ``None`` (all experts) or ``1 <= top_k <= E``.

    Examples:
        >>> gate = SoftMergeGate(512, num_experts=10)
        >>> routing = gate(torch.randn(6, 512))
        >>> routing.soft_weight.shape, bool(torch.allclose(routing.soft_weight.sum(-1), torch.ones(6)))
        (torch.Size([6, 10]), True)
    """

    soft = True
    fp32_tensors = ("weight",)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        if top_k is not None:
            check_k(top_k, num_experts, "top_k")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``N(0, 0.02²)``, as the MoV/MoLoRA authors."""
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> fp32 logits ``[T, E]``."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"gate expects tokens of width d_model={self.d_model}, got {x.shape[-1]}")
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: Tensor) -> Routing:
        """``x [T, d]`` -> soft :class:`~mpolab_moe.Routing` with ``soft_weight [T, E]`` (fp32)."""
        logits = self.logits(x)
        check_finite_logits(logits, type(self).__name__)
        probs = logits.softmax(dim=-1)
        weight = probs
        if self.top_k is not None and self.top_k < self.num_experts:
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            weight = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        return Routing.soft(weight, probs=probs.detach())

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"
