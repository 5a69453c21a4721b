"""``upcycle``: an MoE layer whose every expert starts as a copy of one FFN (MPOE, Switch-style).

Examples:
    >>> moe = upcycle(t5.encoder.block[0].layer[1].DenseReluDense, num_experts=8, experts="mpo")
    >>> moe, report = upcycle(ffn, 8, experts="mpo", return_report=True)
    >>> report.exact_at_init, report.reconstruction_error
    (True, {'w1': 3.1e-07, 'w2': 2.9e-07})
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import nn

from mpolab import TruncationOptions
from mpolab.utils import check_choice, check_positive_int

from .activations import Activation
from .experts.base import FFNBank
from .experts.dense import DenseExperts
from .experts.mpo import MPOExperts
from .ffn import FFN
from .gates.top_k import TopKGate
from .layer import MoE
from .registry import register_method

__all__ = ["EXACT_TOL", "UpcycleReport", "expert_kind", "upcycle"]

ExpertKind = Literal["mpo", "dense"]
GateKind = Literal["top1", "top2", "topk"]
Weighting = Literal["one", "prob"]


@dataclass
class UpcycleReport:
    """What :func:`upcycle` built (``upcycle(..., return_report=True)`` returns it with the layer).

    Attributes:
        experts: ``"mpo"`` or ``"dense"``.
        num_experts: ``E``.
        k: experts per token.
        weighting: the gate's ``"one"`` or ``"prob"``.
        params_before: the FFN's parameters.
        params_after: the MoE layer's parameters (router included; a shared MPO central tensor counted once).
        reconstruction_error: relative Frobenius error per matrix (``"w1"``, ``"w2"``, ``"w_gate"``);
            zeros for dense copies.
        exact_at_init: the layer's output equals the FFN's at step 0 up to float round-off (exact
            experts, combine weights summing to 1, no capacity drops).
    """

    experts: str
    num_experts: int
    k: int
    weighting: str
    params_before: int
    params_after: int
    reconstruction_error: dict[str, float]
    exact_at_init: bool


#: Reconstruction error below which an expert counts as an exact copy (fp32 round-off of a TT-SVD).
EXACT_TOL = 1e-5


def upcycle(
    ffn: FFN | nn.Module,
    num_experts: int = 8,
    *,
    experts: ExpertKind = "mpo",
    gate: GateKind = "top1",
    k: int | None = None,
    weighting: Weighting | None = None,
    noise: Literal["jitter", "gaussian"] | None = None,
    capacity_factor: float | None = None,
    rel_tol: float | None = None,
    max_rank: int | None = None,
    num_cores: int = 5,
    balance_loss_weight: float = 1.0,
    z_loss_weight: float = 0.0,
    activation: Activation | None = None,
    return_report: bool = False,
) -> MoE | tuple[MoE, UpcycleReport]:
    """An MoE layer whose every expert starts as a copy of ``ffn`` (upcycling; MPOE with ``"mpo"``).

    Args:
        ffn: an :class:`FFN` from :func:`find_ffns`, or a bare FFN module (see :data:`SUPPORTED_FFNS`).
        num_experts: ``E``.
        experts: ``"mpo"`` (:class:`~mpolab_moe.experts.mpo.MPOExperts`: one shared central tensor,
            per-expert auxiliary tensors) or ``"dense"`` (:class:`~mpolab_moe.DenseExperts`, E copies).
        gate: ``"top1"`` (Switch), ``"top2"`` (GShard) or ``"topk"`` (give ``k``).
        k: experts per token; must agree with ``gate`` for top1/top2, ``1 <= k <= E``.
        weighting: ``"one"`` (combine weight ``p / p.detach()``: value 1, gradient to the router) or
            ``"prob"`` (renormalised probabilities for ``k > 1``, the raw probability for ``k = 1``).
            Default: ``"one"`` for ``k = 1``, ``"prob"`` for ``k > 1`` -- both exact at step 0.
        noise: router noise in training, ``None``, ``"jitter"`` or ``"gaussian"``.
        capacity_factor: ``None`` (dropless) or the GShard capacity factor.
        rel_tol, max_rank, num_cores: MPO truncation (``"mpo"`` only); both ``None`` keeps exact ranks.
        balance_loss_weight, z_loss_weight: coefficients of the gate's aux losses.
        activation: override the activation read from the model config / module.
        return_report: also return an :class:`UpcycleReport`.

    Returns:
        :class:`~mpolab_moe.MoE` on the FFN's device and dtype (router in fp32), in the FFN's
        train/eval mode; ``(moe, report)`` with ``return_report=True``.

    When the output equals the FFN's at step 0 (every expert a copy, so only the combine weights
    matter; a token's output is ``sum_i w_i * FFN(x)``):

    ============================  =================================  ==============================
    gate, weighting               sum of the combine weights          equal to the FFN?
    ============================  =================================  ==============================
    top1, ``"one"`` (default)     ``p / p.detach()`` = 1              yes; router gradient ``FFN(x)/p``
    topk k > 1, ``"prob"`` (def.) renormalised ``sum p_i / sum p`` = 1  yes; router gradient 0 at step 0
    top1, ``"prob"``              ``p`` < 1                            no: ``p * FFN(x)`` (Switch)
    topk k > 1, ``"one"``         ``k``                                no: ``k * FFN(x)`` (warns)
    ============================  =================================  ==============================

    It also needs exact experts (``"dense"``, or ``"mpo"`` at exact ranks: equal to float
    round-off) and no dropped tokens (``capacity_factor`` ``None`` or ``>= E / k``). T5's inner
    dropout (between the activation and ``wo``) has no counterpart in the expert banks; in eval
    mode that changes nothing.

    Raises:
        TypeError: an unrecognised module.
        ValueError: unknown ``experts``/``gate``/``weighting``, ``k`` out of range or contradicting
            ``gate``, truncation options with dense experts.

    Examples:
        >>> moe, report = upcycle(t5.encoder.block[0].layer[1].DenseReluDense, 8, experts="mpo", return_report=True)
        >>> report.reconstruction_error
        {'w1': 3.1e-07, 'w2': 2.9e-07}
    """
    if not isinstance(ffn, FFN):
        if not isinstance(ffn, nn.Module):
            raise TypeError(f"upcycle takes an FFN or an nn.Module, got {type(ffn).__name__}")
        ffn = FFN.from_module(ffn)
    check_positive_int(num_experts, "num_experts")
    check_choice(experts, "experts", ("mpo", "dense"))
    k = _resolve_k(gate, k, num_experts)
    if weighting is None:
        weighting = "one" if k == 1 else "prob"
    check_choice(weighting, "weighting", ("one", "prob"))
    if experts == "dense" and (rel_tol is not None or max_rank is not None):
        raise ValueError(f"rel_tol={rel_tol!r} / max_rank={max_rank!r} truncate MPO experts; use experts='mpo'")
    if weighting == "one" and k > 1:
        warnings.warn(
            f"weighting='one' with k={k}: every token sums {k} copies of the FFN, so the upcycled layer "
            f"outputs {k}x the FFN at step 0; weighting='prob' (renormalised over the k) keeps it equal",
            stacklevel=2,
        )
    if activation is not None:
        ffn = replace(ffn, activation=activation)
    bank: FFNBank
    if experts == "dense":
        bank = DenseExperts.from_ffn(ffn, num_experts)
    else:
        options = TruncationOptions(num_cores=num_cores, rel_tol=rel_tol, max_rank=max_rank)
        bank = MPOExperts.from_ffn(ffn, num_experts, options=options)
    router = TopKGate(
        ffn.d_model,
        num_experts,
        k,
        noise=noise,
        weighting=weighting,
        balance_loss_weight=balance_loss_weight,
        z_loss_weight=z_loss_weight,
        device=ffn.w1.device,
    )
    moe = MoE(router, bank, capacity_factor=capacity_factor)
    moe.to(device=ffn.w1.device, dtype=ffn.w1.dtype)  # the router keeps fp32 (Gate.fp32_tensors)
    moe.train(ffn.module.training)
    if not return_report:
        return moe
    errors = dict(bank.reconstruction_error)
    sums_to_one = (k == 1 and weighting == "one") or (k > 1 and weighting == "prob")
    no_drops = capacity_factor is None or capacity_factor >= num_experts / k
    report = UpcycleReport(
        experts=experts,
        num_experts=num_experts,
        k=k,
        weighting=weighting,
        params_before=ffn.num_params,
        params_after=sum(p.numel() for p in moe.parameters()),
        reconstruction_error=errors,
        exact_at_init=sums_to_one and no_drops and all(e <= EXACT_TOL for e in errors.values()),
    )
    return moe, report


def expert_kind(bank: nn.Module) -> str:
    """``"mpo"`` / ``"dense"`` for the upcycled banks, else the bank's class name (for reports)."""
    kinds: dict[type[nn.Module], str] = {MPOExperts: "mpo", DenseExperts: "dense"}
    return kinds.get(type(bank), type(bank).__name__)


def _resolve_k(gate: str, k: int | None, num_experts: int) -> int:
    fixed = {"top1": 1, "top2": 2}
    if gate not in (*fixed, "topk"):
        raise ValueError(f"unknown gate {gate!r}; valid: 'top1', 'top2', 'topk' (with k=...)")
    if gate in fixed:
        if k is not None and k != fixed[gate]:
            raise ValueError(f"gate={gate!r} routes to {fixed[gate]} experts but k={k}; use gate='topk' with k={k}")
        k = fixed[gate]
    elif k is None:
        raise ValueError("gate='topk' needs k (experts per token)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k={k!r} out of range; valid: 1 <= k <= num_experts={num_experts}")
    return k


def _upcycle_builder(
    ffn: FFN, num_experts: int = 8, experts: ExpertKind = "mpo", gate: GateKind = "top1", **kwargs: Any
) -> MoE:
    layer = upcycle(ffn, num_experts, experts=experts, gate=gate, **kwargs)
    if isinstance(layer, tuple):  # return_report=True among moefy's options
        raise ValueError("moefy installs layers, not reports: drop return_report (call upcycle() for a report)")
    return layer


register_method("upcycle", _upcycle_builder)
