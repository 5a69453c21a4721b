"""The published recipes as ``moefy`` methods: ``"moefication"``, ``"emoe"`` and ``"dynmoe"``.

Importing this module registers the three with :func:`mpolab_moe.registry.register_method`
(``import mpolab_moe`` imports it). Each builder turns one
:class:`~mpolab_moe.ffn.FFN` into an :class:`~mpolab_moe.MoE` with its paper's defaults; every
default can be overridden through ``moefy``'s keyword arguments. ``docs/methods.md`` puts the three
side by side.

* **MoEfication** (Zhang et al. 2022): every FFN; balanced k-means on the normalised key rows into
  experts of 32 neurons (``E = F / 32``); a router picks ``k = 20/96`` of them (T5-base: 20 of 96).
* **EMoE** (Qiu et al. 2023): the last two blocks; the same split into 16 experts; the frozen avg-k
  gate, k = 4, one-score weights, capacity factor 1.5 (in training; inference is dropless),
  balance loss 0.01. Gated (LLaMA) FFNs: 64 experts, k = 16, scored on the gate projection.
* **DynMoE** (Guo et al. 2024): top-any gate over 16 slots, 8 active at the start, on upcycled
  copies of the FFN (as DynMoE's MoE-LLaVA and vision models are built), adaptive expert count.

Examples:
    >>> report = moefy(bert, method="emoe")                      # layers 10 and 11 of BERT-base
    >>> handle = AvgKGate.attach(optimizer, bert)                # EMoE's gate follows the keys
    >>> moefy(t5, method="moefication", router="similarity")     # every FFN, 96 experts for T5-base
    >>> moefy(gpt2, method="dynmoe", layers=[-1], num_active=4)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mpolab.utils import check_fraction, check_positive_int

from .experts.dense import DenseExperts
from .experts.sliced import SlicedExperts
from .ffn import FFN
from .gates.avg_k import AvgKGate
from .gates.base import Gate, check_k
from .gates.moefication import GroundTruthGate, MLPGate, SimilarityGate, train_mlp_gate
from .gates.top_any import TopAnyGate
from .layer import MoE
from .registry import register_method
from .split import balanced_kmeans, coactivation_split, contiguous_split, random_split

__all__ = [
    "DYNMOE_DEFAULTS",
    "EMOE_DEFAULTS",
    "MOEFICATION_DEFAULTS",
    "build_dynmoe",
    "build_emoe",
    "build_moefication",
    "dynmoe_layers",
    "emoe_layers",
    "split_ffn",
]

#: MoEfication: experts of 32 neurons, ``k = k_ratio * E`` (T5-base: 20 of 96), balanced k-means.
MOEFICATION_DEFAULTS: dict[str, Any] = {
    "expert_size": 32,
    "k_ratio": 20 / 96,
    "split": "kmeans",
    "router": "similarity",
}
#: EMoE's GLUE recipe (BERT); gated FFNs (LLaMA) use ``num_experts_gated`` / ``k_gated``.
EMOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 16,
    "k": 4,
    "num_experts_gated": 64,
    "k_gated": 16,
    "one_score": True,
    "gate_noise": 1.0,
    "capacity_factor": 1.5,
    "balance_loss_weight": 0.01,
    "split": "kmeans",
}
#: DynMoE: 16 pre-allocated slots, half active at the start, aux weight 0.01, record/idle 300/300.
DYNMOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 16,
    "num_active": 8,
    "experts": "dense",
    "aux_loss_weight": 0.01,
    "record_steps": 300,
    "idle_steps": 300,
}

SPLITS = ("kmeans", "random", "contiguous", "coactivation")


# ------------------------------------------------------------------------------------ helpers


def _hidden_for(ffn: FFN, hidden_states: Tensor | Mapping[str, Tensor] | None) -> Tensor | None:
    """The recorded inputs of this FFN: a tensor ``[N, d]``, or a mapping from FFN names to tensors."""
    if hidden_states is None:
        return None
    if isinstance(hidden_states, Mapping):
        h = hidden_states.get(ffn.name)
        if h is None:
            raise ValueError(
                f"hidden_states has no entry for FFN {ffn.name!r}; keys given: {sorted(hidden_states)[:6]}"
            )
    else:
        h = hidden_states
    if not isinstance(h, Tensor):
        raise TypeError(f"hidden_states for {ffn.name!r} must be a Tensor [N, d], got {type(h).__name__}")
    h = h.reshape(-1, h.shape[-1])
    if h.shape[-1] != ffn.d_model:
        raise ValueError(
            f"hidden_states for {ffn.name!r} have width {h.shape[-1]}; the FFN takes d_model={ffn.d_model}"
        )
    return h


def split_ffn(
    ffn: FFN,
    num_experts: int,
    split: str | Tensor = "kmeans",
    *,
    hidden_states: Tensor | None = None,
    seed: int = 0,
    bias_mode: str = "shared",
    bias_k: int | None = None,
) -> SlicedExperts:
    """Cut ``ffn`` into a :class:`~mpolab_moe.experts.sliced.SlicedExperts` bank of ``num_experts`` groups.

    Args:
        ffn: the FFN (from :func:`~mpolab_moe.ffn.find_ffns`).
        num_experts: ``E``, must divide ``F``.
        split: ``"kmeans"`` (balanced k-means on the normalised key rows: ``W1``, or the gate
            projection of a gated FFN), ``"random"``, ``"contiguous"``, ``"coactivation"`` (needs
            ``hidden_states`` and ``pymetis``), or a ready ``groups [E, F/E]`` tensor.
        hidden_states: ``[N, d]`` recorded FFN inputs (for ``"coactivation"``).
        seed, bias_mode, bias_k: see :mod:`mpolab_moe.split` and ``SlicedExperts``.

    Examples:
        >>> bank = split_ffn(find_ffns(bert)[0], 16)
    """
    keys = ffn.w_gate if ffn.w_gate is not None else ffn.w1
    if isinstance(split, Tensor):
        groups = split
    elif split == "kmeans":
        groups = balanced_kmeans(keys, num_experts, seed=seed)
    elif split == "random":
        groups = random_split(ffn.d_ff, num_experts, seed=seed)
    elif split == "contiguous":
        groups = contiguous_split(ffn.d_ff, num_experts)
    elif split == "coactivation":
        if hidden_states is None:
            raise ValueError("split='coactivation' needs hidden_states=[N, d] (the FFN's inputs on real text)")
        groups = coactivation_split(
            ffn.w1, ffn.b1, hidden_states, num_experts, activation=ffn.activation, w_gate=ffn.w_gate, seed=seed
        )
    else:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS} or a groups tensor [E, F/E]")
    return SlicedExperts.from_ffn(ffn, groups.to(ffn.w1.device), bias_mode=bias_mode, bias_k=bias_k)


def _finish(moe: MoE, ffn: FFN) -> MoE:
    """On the FFN's device and dtype (the gates keep their fp32 routers), in its train/eval mode."""
    moe.to(device=ffn.w1.device, dtype=ffn.w1.dtype)
    moe.train(ffn.module.training)
    return moe


def _per_stack(num_layers: int, family: str, pick) -> list[int]:  # noqa: ANN001 - (n) -> list[int]
    """Apply ``pick(n)`` to each stack: T5's list holds the encoder's FFNs, then the decoder's."""
    if family == "t5" and num_layers % 2 == 0 and num_layers >= 2:
        half = num_layers // 2
        return [*pick(half), *(half + i for i in pick(half))]
    return list(pick(num_layers))


def emoe_layers(num_layers: int, family: str) -> list[int]:
    """EMoE's layer choice: the last two blocks (layers 10 and 11 of BERT-base; each T5 stack's last two)."""
    return _per_stack(num_layers, family, lambda n: range(max(0, n - 2), n))


def dynmoe_layers(num_layers: int, family: str) -> list[int]:
    """DynMoE's layer choice: BERT as EMoE (its GLUE runs build on EMoE's code: the last two
    blocks); other families every other block from the first (MoE-LLaVA's sparse layout)."""
    if family == "bert":
        return emoe_layers(num_layers, family)
    return _per_stack(num_layers, family, lambda n: range(0, n, 2))


# ------------------------------------------------------------------------------- MoEfication


def _moefication_router(
    name: str, bank: SlicedExperts, k: int, hidden: Tensor | None, router_options: Mapping[str, Any]
) -> Gate:
    if name == "mlp" and hidden is None:
        warnings.warn(
            "router='mlp' is trained on the FFN's recorded inputs; no hidden_states were given, so the "
            "similarity router is used instead (pass hidden_states=[N, d] or {ffn_name: [N, d]})",
            stacklevel=4,
        )
        name = "similarity"
    if name in ("similarity", "ground_truth") and router_options:
        raise ValueError(f"router={name!r} takes no router_options, got {sorted(router_options)}")
    if name == "similarity":
        return SimilarityGate(bank, k=k)
    if name == "ground_truth":
        return GroundTruthGate(bank, k=k)
    if name == "mlp":
        assert hidden is not None
        gate = MLPGate.from_bank(bank, k=k)
        train_mlp_gate(gate, bank, hidden.to(bank.w1.device), **router_options)
        return gate
    raise ValueError(f"unknown router {name!r}; valid: 'similarity', 'mlp', 'ground_truth'")


def build_moefication(
    ffn: FFN,
    num_experts: int | None = None,
    *,
    expert_size: int = MOEFICATION_DEFAULTS["expert_size"],
    k: int | None = None,
    k_ratio: float = MOEFICATION_DEFAULTS["k_ratio"],
    split: str | Tensor = MOEFICATION_DEFAULTS["split"],
    router: str = MOEFICATION_DEFAULTS["router"],
    gate: str | None = None,
    hidden_states: Tensor | Mapping[str, Tensor] | None = None,
    router_options: Mapping[str, Any] | None = None,
    experts: str = "sliced",
    bias_mode: str = "shared",
    capacity_factor: float | None = None,
    seed: int = 0,
) -> MoE:
    """MoEfication: split the FFN into experts of ``expert_size`` neurons and route with a router.

    Args:
        ffn: the FFN to convert.
        num_experts: ``E``; default ``F / expert_size`` (T5-base: 3072 / 32 = 96).
        expert_size: neurons per expert when ``num_experts`` is not given (paper: 32).
        k: experts per token; default ``max(1, round(k_ratio * E))`` (paper: 20 of 96 for T5-base).
        split: see :func:`split_ffn` (paper: ``"kmeans"``, parameter clustering; ``"coactivation"``
            is the paper's other split).
        router: ``"similarity"`` (distance to each expert's mean normalised key), ``"mlp"`` (trained
            on ``hidden_states``; without them the similarity router is used, with a warning) or
            ``"ground_truth"`` (computes every neuron: an oracle for measuring, not for speed).
        gate: alias of ``router`` (``moefy``'s ``gate=`` argument).
        hidden_states: ``[N, d]`` recorded inputs of the FFN, or ``{ffn.name: [N, d]}`` when converting
            several FFNs.
        router_options: for ``router="mlp"``, passed to
            :func:`~mpolab_moe.gates.moefication.train_mlp_gate` (``epochs``, ``batch_size``, ``lr``, ``seed``).
        experts: only ``"sliced"`` (MoEfication's experts are the FFN's own neurons).
        bias_mode: where ``b2`` goes (``SlicedExperts``); capacity_factor: ``None`` (dropless).

    Examples:
        >>> moefy(t5, method="moefication")                           # 96 experts, k = 20 on T5-base
    """
    if experts != "sliced":
        raise ValueError(f"MoEfication's experts are slices of the FFN: experts must be 'sliced', got {experts!r}")
    router = gate if gate is not None else router
    if num_experts is None:
        E = max(1, ffn.d_ff // check_positive_int(expert_size, "expert_size"))
    else:
        E = check_positive_int(num_experts, "num_experts")
    if k is None:
        if k_ratio != 1:
            check_fraction(k_ratio, "k_ratio")
        k = max(1, min(E, round(k_ratio * E)))
    k = check_k(k, E)
    hidden = _hidden_for(ffn, hidden_states)
    bank = split_ffn(ffn, E, split, hidden_states=hidden, seed=seed, bias_mode=bias_mode, bias_k=k)
    gate_module = _moefication_router(router, bank, k, hidden, router_options or {})
    return _finish(MoE(gate_module, bank, capacity_factor=capacity_factor), ffn)


# -------------------------------------------------------------------------------------- EMoE


def build_emoe(
    ffn: FFN,
    num_experts: int | None = None,
    *,
    k: int | None = None,
    one_score: bool = EMOE_DEFAULTS["one_score"],
    gate_noise: float = EMOE_DEFAULTS["gate_noise"],
    capacity_factor: float | None = EMOE_DEFAULTS["capacity_factor"],
    balance_loss_weight: float = EMOE_DEFAULTS["balance_loss_weight"],
    split: str | Tensor = EMOE_DEFAULTS["split"],
    score: str = "keys",
    bias_mode: str = "shared",
    hidden_states: Tensor | Mapping[str, Tensor] | None = None,
    experts: str = "sliced",
    gate: str | None = None,
    seed: int = 0,
) -> MoE:
    """EMoE: MoEfication's split with the frozen avg-k gate.

    Args:
        ffn: the FFN to convert.
        num_experts: ``E`` (16; gated FFNs such as LLaMA's: 64).
        k: experts per token (4; gated FFNs: 16).
        one_score: every selected expert weighs 1, so ``k = E`` gives back the dense FFN.
        gate_noise: training noise ``gate_noise * N(0, 1) / E`` on the logits.
        capacity_factor: 1.5 as EMoE, applied in training only (``None``: dropless); inference
            stays dropless so a sequence's output does not depend on its batch (see
            :class:`~mpolab_moe.MoE`'s ``capacity_in_eval``).
        balance_loss_weight: 0.01.
        split: see :func:`split_ffn`.
        score: :class:`~mpolab_moe.gates.avg_k.AvgKGate`'s ``score`` (``"keys"``: for a gated FFN the
            mean of ``gate_proj(x)`` over the expert's block, EMoE's LLaMA score).
        bias_mode: ``"shared"`` (default; ``b2`` added once per token, exact whatever the number of
            experts a token reaches) or ``"split"`` (EMoE's ``b2 / k`` per expert; a token whose
            assignment is dropped by the capacity then loses part of ``b2``).
        experts, gate: only ``"sliced"`` and ``"avg_k"`` (``moefy``'s arguments, checked).

    Remember to keep the router on the keys while training: ``AvgKGate.attach(optimizer, model)``.

    Examples:
        >>> moefy(bert, method="emoe")
    """
    if experts != "sliced":
        raise ValueError(f"EMoE's experts are slices of the FFN: experts must be 'sliced', got {experts!r}")
    if gate not in (None, "avg_k"):
        raise ValueError(f"EMoE uses the avg-k gate: gate must be 'avg_k' (or not given), got {gate!r}")
    gated = ffn.w_gate is not None
    E = check_positive_int(
        EMOE_DEFAULTS["num_experts_gated" if gated else "num_experts"] if num_experts is None else num_experts,
        "num_experts",
    )
    if k is None:
        k = min(E, EMOE_DEFAULTS["k_gated" if gated else "k"])
    hidden = _hidden_for(ffn, hidden_states)
    bank = split_ffn(ffn, E, split, hidden_states=hidden, seed=seed, bias_mode=bias_mode, bias_k=k)
    router = AvgKGate(
        ffn.d_model,
        E,
        k,
        one_score=one_score,
        gate_noise=gate_noise,
        score=score,  # type: ignore[arg-type]
        balance_loss_weight=balance_loss_weight,
    )
    return _finish(MoE(router, bank, capacity_factor=capacity_factor), ffn)


# ------------------------------------------------------------------------------------ DynMoE


def build_dynmoe(
    ffn: FFN,
    num_experts: int | None = None,
    *,
    num_active: int | None = None,
    experts: str = DYNMOE_DEFAULTS["experts"],
    aux_loss_weight: float = DYNMOE_DEFAULTS["aux_loss_weight"],
    aux_terms: tuple[str, ...] | None = None,
    adaptive: bool = True,
    record_steps: int = DYNMOE_DEFAULTS["record_steps"],
    idle_steps: int = DYNMOE_DEFAULTS["idle_steps"],
    split: str | Tensor = "kmeans",
    hidden_states: Tensor | Mapping[str, Tensor] | None = None,
    gate: str | None = None,
    seed: int = 0,
) -> MoE:
    """DynMoE: the top-any gate over ``num_experts`` pre-allocated slots, adaptive expert count.

    Args:
        ffn: the FFN to convert.
        num_experts: ``M`` slots (16); the bank holds one expert per slot.
        num_active: slots active at the start (default ``M / 2``, DynMoE's ``num_experts = n_e // 2``
            with ``max_expert_num = n_e``).
        experts: ``"dense"`` (default; every slot a copy of the FFN, as DynMoE upcycles: the layer
            equals the FFN in eval at step 0, since the combine is the mean over activated experts)
            or ``"sliced"`` (``M`` neuron groups of the FFN via ``split``; the mean combine then
            scales the selected groups by ``1 / k_t``, so the layer starts away from the FFN).
        aux_loss_weight, aux_terms, adaptive, record_steps, idle_steps: see
            :class:`~mpolab_moe.gates.top_any.TopAnyGate` (0.01, all four terms, on, 300/300).
        split, hidden_states: for ``experts="sliced"`` (see :func:`split_ffn`).
        gate: only ``"top_any"`` (``moefy``'s argument, checked).

    Examples:
        >>> moefy(gpt2, method="dynmoe")                    # every other block, 16 slots, 8 active
    """
    if gate not in (None, "top_any"):
        raise ValueError(f"DynMoE uses the top-any gate: gate must be 'top_any' (or not given), got {gate!r}")
    M = check_positive_int(DYNMOE_DEFAULTS["num_experts"] if num_experts is None else num_experts, "num_experts")
    active = max(1, M // 2) if num_active is None else num_active
    bank: DenseExperts | SlicedExperts
    if experts == "dense":
        bank = DenseExperts.from_ffn(ffn, M)
    elif experts == "sliced":
        bank = split_ffn(ffn, M, split, hidden_states=_hidden_for(ffn, hidden_states), seed=seed)
    else:
        raise ValueError(f"experts must be 'dense' (upcycled copies) or 'sliced' (neuron groups), got {experts!r}")
    options: dict[str, Any] = {} if aux_terms is None else {"aux_terms": aux_terms}
    router = TopAnyGate(
        ffn.d_model,
        M,
        num_active=active,
        aux_loss_weight=aux_loss_weight,
        adaptive=adaptive,
        record_steps=record_steps,
        idle_steps=idle_steps,
        **options,
    )
    return _finish(MoE(router, bank), ffn)


register_method("moefication", build_moefication)
register_method("emoe", build_emoe, emoe_layers)
register_method("dynmoe", build_dynmoe, dynmoe_layers)
