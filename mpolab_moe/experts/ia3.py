"""``IA3Experts``: E (IA)³ scaling vectors (MoV; plain (IA)³ with E = 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mpolab.utils import check_positive_int

from .base import BankOutput, Capability, ExpertBank, expand_per_row

__all__ = ["IA3Experts"]


class IA3Experts(ExpertBank):
    """``E`` (IA)³ experts; expert ``e`` rescales a tensor elementwise: ``x ⊙ l_e``.

    Unlike :class:`~mpolab_moe.experts.lora.LoRAExperts`, the bank returns the *modified* tensor,
    not an update (``output_kind = BankOutput.SCALED``): ``in_features == out_features == d``.
    Capability: ``SOFT``. The vectors ``vectors [E, d]`` start
    at one, so with weights summing to one (softmax) the output equals the input at step 0.

    * :meth:`forward` (sparse routing, tokens grouped by expert): ``x ⊙ l_{e(row)}``.
    * :meth:`forward_soft` (MoV's soft merging): the vectors are merged per token first,
      ``x ⊙ (weight @ L)``, one ``[T, E] @ [E, d]`` product and one elementwise product per
      token, whatever ``E`` is.

    Args:
        features: ``d``, the width of the tensor being scaled.
        num_experts: ``E`` (1 is plain (IA)³).

    Examples:
        >>> bank = IA3Experts(512, num_experts=10)
        >>> x, w = torch.randn(6, 512), torch.softmax(torch.randn(6, 10), -1)
        >>> torch.allclose(bank.forward_soft(x, w), x)    # ones at init
        True
    """

    capabilities = frozenset({Capability.SOFT})
    output_kind = BankOutput.SCALED

    def __init__(
        self,
        features: int,
        num_experts: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(features, "features")
        check_positive_int(num_experts, "num_experts")
        self.num_experts, self.in_features, self.out_features = num_experts, features, features
        self.vectors = nn.Parameter(torch.empty(num_experts, features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All vectors to one (the identity scaling)."""
        nn.init.ones_(self.vectors)

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x [N, d]`` sorted by expert, ``counts[e]`` rows each -> ``x ⊙ l_e`` row by row, ``[N, d]``."""
        if self.num_experts == 1:
            return x * self.vectors[0].to(x.dtype)
        return x * expand_per_row(self.vectors.to(x.dtype), counts)

    def forward_soft(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x [T, d]``, ``weight [T, E]`` -> ``x ⊙ (weight @ L)``, ``[T, d]``."""
        return x * (weight.to(self.vectors.dtype) @ self.vectors).to(x.dtype)

    def extra_repr(self) -> str:
        return f"features={self.in_features}, num_experts={self.num_experts}"
