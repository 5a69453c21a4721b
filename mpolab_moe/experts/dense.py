"""``DenseExperts``: E independent feed-forward networks (the Switch / GShard baseline)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mpolab.utils import check_positive_int

from ..activations import Activation
from .base import FFNBank, FFNWeights

__all__ = ["DenseExperts"]


class DenseExperts(FFNBank):
    """``E`` independent FFNs ``y = act(x W1_e + b1_e) W2_e + b2_e`` (gated: ``act(x Wg_e) * (x W1_e)``).

    Weights are stacked along the expert dimension and stored input-major so that a group of
    tokens multiplies them directly: ``w1 [E, d, F]``, ``w2 [E, F, d_out]`` (and ``w_gate [E, d, F]``
    when ``gated``, LLaMA's SwiGLU and T5 v1.1's gated GELU). Experts run as grouped matmuls
    (:func:`~mpolab_moe.experts.base.grouped_ffn`), never as a loop of ``F.linear`` over masks.

    Args:
        d_model: token width ``d``.
        d_ff: hidden width ``F`` of each expert.
        num_experts: ``E``.
        activation: a name from :data:`mpolab_moe.activations.ACTIVATIONS` or a callable.
        gated: ``True`` for GLU-style FFNs (``act`` applies to the gate projection).
        bias: biases ``b1 [E, F]`` and ``b2 [E, d_out]`` (T5 and LLaMA have none).
        d_out: output width (default ``d_model``).

    Examples:
        >>> bank = DenseExperts(768, 3072, num_experts=8, activation="gelu")
        >>> MoE(TopKGate(768, 8, k=1), bank)                              # a Switch layer
    """

    w1: nn.Parameter
    w2: nn.Parameter
    w_gate: nn.Parameter | None
    b1: nn.Parameter | None
    b2: nn.Parameter | None

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        activation: Activation = "relu",
        gated: bool = False,
        bias: bool = True,
        d_out: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_sizes(d_model, d_ff, num_experts, d_out, activation)
        E = num_experts
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_ff, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(E, d_ff, self.out_features, device=device, dtype=dtype))
        self.w_gate = nn.Parameter(torch.empty(E, d_model, d_ff, device=device, dtype=dtype)) if gated else None
        self.b1 = nn.Parameter(torch.empty(E, d_ff, device=device, dtype=dtype)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, self.out_features, device=device, dtype=dtype)) if bias else None
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
    def from_ffn(cls, ffn: FFNWeights, num_experts: int) -> DenseExperts:
        """``num_experts`` copies of one FFN (upcycling).

        Examples:
            >>> bank = DenseExperts.from_ffn(FFNWeights(up.weight, down.weight, b1=up.bias, b2=down.bias), 8)
        """
        if not isinstance(ffn, FFNWeights):
            raise TypeError(f"ffn must be an FFNWeights (or an FFN from find_ffns), got {type(ffn).__name__}")
        E, F_, d, d_out = check_positive_int(num_experts, "num_experts"), ffn.d_ff, ffn.d_model, ffn.d_out
        bank = cls(
            d,
            F_,
            E,
            activation=ffn.activation,
            gated=ffn.gated,
            bias=ffn.has_bias,
            d_out=d_out,
            device=ffn.w1.device,
            dtype=ffn.w1.dtype,
        )
        with torch.no_grad():
            for name, w in ffn.matrices().items():
                getattr(bank, name).copy_(w.T.expand(E, *w.T.shape))
            if bank.b1 is not None and bank.b2 is not None:
                bank.b1.copy_(ffn.b1 if ffn.b1 is not None else torch.zeros(F_))
                bank.b2.copy_(ffn.b2 if ffn.b2 is not None else torch.zeros(d_out))
        bank.reconstruction_error = {name: 0.0 for name in ffn.matrices()}
        return bank
