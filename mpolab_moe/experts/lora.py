"""``LoRAExperts``: E low-rank adapters ``ΔW_e = (α/r) B_e A_e`` (MoLoRA; plain LoRA with E = 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mpolab.utils import check_choice, check_positive_float, check_positive_int

from .base import BankOutput, Capability, ExpertBank, grouped_matmul

__all__ = ["LoRAExperts"]

LoRAInit = Literal["gaussian", "kaiming"]


class LoRAExperts(ExpertBank):
    """``E`` LoRA experts; expert ``e`` maps ``x [d_in]`` to ``s · (x A_e) B_e`` (``[d_out]``).

    The bank computes only the low-rank *update* (``output_kind = BankOutput.UPDATE``): the frozen
    base layer's output is added by the caller (the PEFT adapter in :mod:`mpolab_moe.peft`, or your
    own code around a :class:`~mpolab_moe.MoE` layer: ``y = base(x) + moe(x)``). Capability: ``SOFT``.

    Weights are stacked along the expert dimension, input-major: ``lora_A [E, d_in, r]`` and
    ``lora_B [E, r, d_out]``. ``B`` starts at zero, so the update is zero at initialisation.
    The scale is ``s = α / r``, or ``α / √r`` with ``use_rslora`` (rank-stabilised LoRA).

    * :meth:`forward` (sparse routing, tokens grouped by expert): two grouped matmuls.
    * :meth:`forward_soft` (MoLoRA's soft merging, ``weight [T, E]``): one GEMM pair over all
      experts at once, ``((x A_cat) ⊙ w_rep) B_cat`` with ``A_cat [d_in, E·r]`` and
      ``B_cat [E·r, d_out]``, never a loop over experts.

    Args:
        in_features: ``d_in``.
        out_features: ``d_out``.
        num_experts: ``E`` (1 is plain LoRA).
        r: rank of each expert, ``>= 1``.
        alpha: scale numerator ``α`` (default ``r``, a scale of 1).
        use_rslora: scale by ``α / √r`` instead of ``α / r``.
        init: ``"gaussian"`` (``A ~ N(0, 0.02²)``, the MoLoRA paper) or ``"kaiming"``
            (``nn.Linear``'s default, uniform ``±1/√d_in``, as HF peft).
        dropout: dropout probability on the input of ``A`` (training only).

    Examples:
        >>> bank = LoRAExperts(512, 512, num_experts=10, r=4, alpha=16)
        >>> x, w = torch.randn(6, 512), torch.softmax(torch.randn(6, 10), -1)
        >>> bank.forward_soft(x, w).shape          # zero at init: B = 0
        torch.Size([6, 512])
    """

    capabilities = frozenset({Capability.SOFT})
    output_kind = BankOutput.UPDATE

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int = 1,
        r: int = 8,
        alpha: float | None = None,
        *,
        use_rslora: bool = False,
        init: LoRAInit = "gaussian",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            check_positive_int(value, name)
        check_positive_int(num_experts, "num_experts")
        alpha = check_positive_float(float(r) if alpha is None else alpha, "alpha")
        check_choice(init, "init", ("gaussian", "kaiming"))
        if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_experts, self.in_features, self.out_features, self.r = num_experts, in_features, out_features, r
        self.alpha, self.use_rslora, self.init = float(alpha), bool(use_rslora), init
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts, in_features, r, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(num_experts, r, out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A`` random (``init``), ``B = 0``: every expert's update starts at zero."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=0.02)
        else:  # kaiming_uniform(a=√5) on an [r, d_in] matrix, i.e. nn.Linear's default
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x [N, d_in]`` sorted by expert, ``counts[e]`` rows each -> update ``[N, d_out]``."""
        x = self.dropout(x)
        if self.num_experts == 1:
            return ((x @ self.lora_A[0]) * self.scaling) @ self.lora_B[0]
        h = grouped_matmul(x, self.lora_A, counts) * self.scaling
        return grouped_matmul(h, self.lora_B, counts)

    def forward_soft(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x [T, d_in]``, ``weight [T, E]`` -> ``Σ_e weight[:, e] · s (x A_e) B_e``, ``[T, d_out]``.

        All experts in one GEMM pair: ``x [T, d_in] @ A_cat [d_in, E·r]`` gives every expert's
        rank-``r`` code, each code block is scaled by its token's weight, and
        ``@ B_cat [E·r, d_out]`` sums the experts' outputs.
        """
        E, r = self.num_experts, self.r
        T = x.shape[0]
        a_cat = self.lora_A.transpose(0, 1).reshape(self.in_features, E * r)
        h = self.dropout(x) @ a_cat
        h = (h.view(T, E, r) * (weight.to(h.dtype) * self.scaling).unsqueeze(-1)).view(T, E * r)
        return h @ self.lora_B.reshape(E * r, self.out_features)

    def delta_weight(self) -> Tensor:
        """The single expert's update as a dense ``[d_out, d_in]`` matrix (``nn.Linear`` layout).

        Raises:
            ValueError: ``num_experts > 1`` (a mixture has no single update matrix).
        """
        if self.num_experts != 1:
            raise ValueError(
                f"delta_weight needs a single expert; this bank has {self.num_experts} and its update "
                "depends on each token's routing weights"
            )
        return (self.lora_A[0] @ self.lora_B[0]).T * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, init={self.init!r}"
        )
