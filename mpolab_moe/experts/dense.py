"""``DenseExperts``: E independent feed-forward networks (the Switch / GShard baseline)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..activations import get_activation
from .base import ExpertBank, check_ffn_weights, grouped_matmul

__all__ = ["DenseExperts"]


class DenseExperts(ExpertBank):
    """``E`` independent FFNs ``y = act(x W1_e + b1_e) W2_e + b2_e`` (gated: ``act(x Wg_e) * (x W1_e)``).

    Weights are stacked along the expert dimension and stored input-major so that a group of
    tokens multiplies them directly: ``w1 [E, d, F]``, ``w2 [E, F, d_out]`` (and ``w_gate [E, d, F]``
    when ``gated``, LLaMA's SwiGLU and T5 v1.1's gated GELU). Experts run as grouped matmuls
    (:func:`~mpolab_moe.experts.base.grouped_matmul`), never as a loop of ``F.linear`` over masks.

    Args:
        d_model: token width ``d``.
        d_ff: hidden width ``F`` of each expert.
        num_experts: ``E``.
        activation: a name from :data:`mpolab_moe.activations.ACTIVATIONS` or a callable.
        gated: ``True`` for GLU-style FFNs (``act`` applies to the gate projection).
        bias: biases ``b1 [E, F]`` and ``b2 [E, d_out]`` (T5 and LLaMA have none).
        d_out: output width (default ``d_model``).

    Example:
        >>> bank = DenseExperts(768, 3072, num_experts=8, activation="gelu")
        >>> MoE(TopKGate(768, 8, k=1), bank)                              # a Switch layer
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        gated: bool = False,
        bias: bool = True,
        d_out: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_experts, self.in_features, self.d_ff = num_experts, d_model, d_ff
        self.out_features = d_model if d_out is None else d_out
        self.activation_name = activation if isinstance(activation, str) else getattr(activation, "__name__", "custom")
        self.act = get_activation(activation)
        self.gated = gated
        kw = {"device": device, "dtype": dtype}
        E = num_experts
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_ff, **kw))
        self.w2 = nn.Parameter(torch.empty(E, d_ff, self.out_features, **kw))
        self.w_gate = nn.Parameter(torch.empty(E, d_model, d_ff, **kw)) if gated else None
        self.b1 = nn.Parameter(torch.empty(E, d_ff, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation, per expert."""
        for w in (self.w1, self.w2, self.w_gate):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)
        for b, fan_in in ((self.b1, self.in_features), (self.b2, self.d_ff)):
            if b is not None:
                nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    @classmethod
    def from_ffn(
        cls,
        w1: Tensor,
        w2: Tensor,
        num_experts: int,
        *,
        b1: Tensor | None = None,
        b2: Tensor | None = None,
        w_gate: Tensor | None = None,
        activation: str | Callable[[Tensor], Tensor] = "relu",
    ) -> DenseExperts:
        """``num_experts`` copies of one FFN given in ``nn.Linear`` layout (upcycling).

        Args:
            w1: ``[F, d]`` up projection; ``w2``: ``[d_out, F]`` down projection;
            w_gate: ``[F, d]`` gate projection of a gated FFN; biases ``b1 [F]``, ``b2 [d_out]``.
        """
        F_, d, _ = check_ffn_weights(w1, w2, w_gate, b1, b2)
        bank = cls(
            d,
            F_,
            num_experts,
            activation=activation,
            gated=w_gate is not None,
            bias=b1 is not None or b2 is not None,
            d_out=w2.shape[0],
            device=w1.device,
            dtype=w1.dtype,
        )
        with torch.no_grad():
            bank.w1.copy_(w1.T.expand(num_experts, d, F_))
            bank.w2.copy_(w2.T.expand(num_experts, F_, w2.shape[0]))
            if w_gate is not None:
                bank.w_gate.copy_(w_gate.T.expand(num_experts, d, F_))  # type: ignore[union-attr]
            if bank.b1 is not None:
                bank.b1.copy_(b1 if b1 is not None else torch.zeros(F_))
            if bank.b2 is not None:
                bank.b2.copy_(b2 if b2 is not None else torch.zeros(w2.shape[0]))
        return bank

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x [N, d]`` sorted by expert, ``counts[e]`` rows each -> ``[N, d_out]``."""
        h = grouped_matmul(x, self.w1, counts, self.b1)
        if self.w_gate is not None:
            h = self.act(grouped_matmul(x, self.w_gate, counts)) * h
        else:
            h = self.act(h)
        return grouped_matmul(h, self.w2, counts, self.b2)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.in_features}, d_ff={self.d_ff}, "
            f"d_out={self.out_features}, activation={self.activation_name!r}, gated={self.gated}, "
            f"bias={self.b1 is not None}"
        )
