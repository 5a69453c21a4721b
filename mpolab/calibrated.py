"""Calibrated compression plans: which layout, how many parameters, or dense, for every target layer.

:func:`mpolab.compress` calls :func:`plan_calibrated` when it is given calibration data. The
steps, each in its own module:

1. input statistics of every target (:mod:`mpolab.calibrate`: streamed ``XᵀX``), all at once,
   or block by block so that later blocks see the errors of the already compressed ones;
2. with a global budget (``ratio`` / ``max_params``): every layer's calibrated error curve
   (:func:`mpolab.weighted.whitened_svd_curve`) and one allocation across layers by relative
   output error, dense weights among the options (:func:`mpolab.allocate.allocate_by_output_error`);
   with ``rel_tol``: the smallest MPO whose relative output error meets it, per layer;
3. per layer, the layout with the smallest calibrated output error at its parameter count
   (:func:`mpolab.weighted.search_layouts`, the SVD-equivalent two-core layout always among the
   candidates). A layer whose best MPO would hold as many parameters as its dense weight stays
   dense, and the report says so.

Nothing is installed here: the caller gets MPOs (or ``None`` for "keep dense") and installs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .allocate import allocate_by_output_error
from .calibrate import InputStats, blockwise_input_stats, collect_input_stats, output_sensitivity
from .mpo import MPO
from .options import TruncationOptions
from .shapes import plan_factors
from .targets import weight_matrix
from .weighted import (
    DEFAULT_DAMP,
    LayerChoice,
    Layout,
    decompose_weighted,
    layout_candidates,
    output_error,
    search_layouts,
    whitened_svd_curve,
)

__all__ = ["CalibratedPlan", "LayoutChoice", "find_blocks", "plan_calibrated"]

LayoutChoice = Literal["auto", "svd", "mpo"]


@dataclass
class CalibratedPlan:
    """The outcome for every target: an MPO or ``None`` (kept dense), its layout and output error.

    Attributes:
        mpos: ``{name: MPO | None}``.
        layouts: ``{name: layout name}`` (``"dense"`` when kept dense).
        output_errors: ``{name: relative output error on the calibration inputs}``.
        tokens: calibration tokens each layer saw.
        candidates: ``{name: {layout name: relative (damped) output error}}`` of the search.
        sensitivity: ``{name: mean squared loss gradient per output}`` when measured.
    """

    mpos: dict[str, MPO | None] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    output_errors: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, choice: LayerChoice, tokens: int) -> None:
        self.mpos[name] = choice.mpo
        self.layouts[name] = choice.layout
        self.output_errors[name] = choice.error
        self.tokens[name] = tokens
        self.candidates[name] = choice.errors


def find_blocks(model: nn.Module, targets: Mapping[str, nn.Module]) -> tuple[str, list[nn.Module]]:
    """The ``nn.ModuleList`` holding the most targets (a transformer's stack of blocks) and its blocks.

    Raises:
        ValueError: no ``ModuleList`` contains any target (blockwise calibration needs a block stack).
    """
    best_name, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{name}." if name else ""
            count = sum(t.startswith(prefix) for t in targets)
            if count > best_count:
                best_name, best_count = name, count
    if best_name is None:
        raise ValueError(
            "blockwise calibration needs the targets inside a stack of blocks (an nn.ModuleList such as "
            "model.layers or encoder.layer); none holds any target: use blockwise=False"
        )
    return best_name, list(model.get_submodule(best_name).children())


def _block_of(name: str, stack: str) -> int | None:
    prefix = f"{stack}." if stack else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _candidates(W: torch.Tensor, layout: LayoutChoice, num_cores: int) -> list[Layout]:
    out, inn = int(W.shape[0]), int(W.shape[1])
    if layout == "svd":
        return [Layout.svd(out, inn)]
    if layout == "mpo":
        plan = plan_factors(out, inn, num_cores, pad=False)
        return [Layout(plan.out_factors, plan.in_factors)]
    return layout_candidates(out, inn, num_cores=num_cores)


def _choose(
    W: torch.Tensor,
    stats: InputStats,
    *,
    params: int | None,
    options: TruncationOptions,
    layout: LayoutChoice,
    damp: float,
    refit_steps: int,
) -> LayerChoice:
    """One layer: the best candidate at ``params`` (a budget), or the smallest meeting ``rel_tol``/``max_rank``."""
    num_cores = options.num_cores or 5
    candidates = _candidates(W, layout, num_cores)
    if params is not None:
        return search_layouts(W, stats.gram, params, candidates=candidates, damp=damp, refit_steps=refit_steps)
    # Per-layer limits. With rel_tol: the candidate meeting it with the fewest parameters (the
    # smallest error if caps keep every candidate above it); max_rank alone: the smallest error.
    # Dense when the winner is not smaller than the dense weight.
    tried: list[LayerChoice] = []
    errors: dict[str, float] = {}
    for lay in candidates:
        try:
            mpo = decompose_weighted(
                W,
                stats.gram,
                layout=lay,
                rel_tol=options.rel_tol,
                max_rank=_per_layout_rank(options.max_rank, lay),
                damp=damp,
                refit_steps=refit_steps,
            )
        except ValueError:
            continue
        errors[lay.name] = float(mpo.truncation_error or 0.0)
        tried.append(LayerChoice(mpo, lay.name, mpo.num_params, errors[lay.name]))
    meeting = [c for c in tried if options.rel_tol is not None and c.error <= options.rel_tol * (1 + 1e-9)]
    if meeting:
        best: LayerChoice | None = min(meeting, key=lambda c: (c.params, c.error))
    else:
        best = min(tried, key=lambda c: (c.error, c.params), default=None)
    if best is None or best.params >= W.numel():
        return LayerChoice(None, "dense", W.numel(), 0.0, errors)
    assert best.mpo is not None
    best.error = output_error(W, best.mpo, stats.gram)
    best.errors = errors
    return best


def _per_layout_rank(max_rank: int | Sequence[int] | None, layout: Layout) -> int | Sequence[int] | None:
    """A per-bond ``max_rank`` only fits layouts with as many bonds; an int caps every layout."""
    if max_rank is None or isinstance(max_rank, int):
        return max_rank
    return max_rank if len(max_rank) == layout.num_cores - 1 else max(max_rank)


def plan_calibrated(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    calibration: Iterable[Any],
    options: TruncationOptions,
    *,
    budget: int | None = None,
    layout: LayoutChoice = "auto",
    damp: float = DEFAULT_DAMP,
    blockwise: bool = False,
    refit_steps: int = 0,
    allow_dense: bool = True,
    sensitivity: bool = False,
    install: Callable[[str, MPO], nn.Module] | None = None,
    progress: bool = False,
) -> CalibratedPlan:
    """Decide every target's MPO (or dense) from its recorded inputs.

    Args:
        model: the model (run on ``calibration``; unchanged on return).
        targets: ``{name: nn.Linear | Conv1D}`` to plan for.
        calibration: model inputs (dicts for ``model(**batch)``, tensors, tuples); read twice
            when ``blockwise`` and a budget are combined, so a one-shot iterator is stored first.
        options: per-layer ``rel_tol`` (relative *output* error) / ``max_rank`` / ``num_cores``.
        budget: total parameters for all targets (``None``: per-layer limits only).
        layout: ``"auto"`` (search: SVD-equivalent, exact-whitening chains, Kronecker-whitened
            ``num_cores``-core MPO), ``"svd"`` (two cores only), ``"mpo"`` (the plain
            ``num_cores`` layout, Kronecker-whitened).
        damp: Gram damping as a fraction of its mean diagonal.
        blockwise: take each block's statistics on the outputs of the already planned (and
            temporarily installed) blocks; the budget is still allocated from all-at-once
            statistics. Needs ``install`` (how to build the temporary layer).
        refit_steps: Adam refit steps per layer after the sweep (0: none).
        allow_dense: let a layer stay dense when that is cheaper than its MPO.
        sensitivity: weight each layer's output error in the budget allocation by its measured
            effect on the model's loss (:func:`mpolab.calibrate.output_sensitivity`: one
            backward pass over two calibration batches: the next-token loss of a language
            model, a random projection of an encoder's last hidden state). Without it,
            relative output errors count equally.

    Raises:
        ValueError: what :mod:`mpolab.calibrate` raises (empty data, NaN activations naming the
            layer, a layer that never ran) and an impossible budget.
    """
    if layout not in ("auto", "svd", "mpo"):
        raise ValueError(f"layout must be 'auto', 'svd' or 'mpo', got {layout!r}")
    if (blockwise or sensitivity) and budget is not None and not isinstance(calibration, Sequence):
        calibration = list(calibration)
    weights = {name: weight_matrix(m) for name, m in targets.items()}
    plan = CalibratedPlan()
    allocation: dict[str, int] | None = None
    stats: dict[str, InputStats] | None = None
    if budget is not None or not blockwise:
        stats = collect_input_stats(model, targets, calibration, progress=progress)
    if budget is not None:
        assert stats is not None
        curves = {n: whitened_svd_curve(weights[n], stats[n].gram, damp) for n in targets}
        layer_weights = None
        if sensitivity:
            if not isinstance(calibration, Sequence):
                calibration = list(calibration)
            scores = output_sensitivity(model, targets, calibration)
            layer_weights = {n: scores[n] * curves[n].energy for n in targets}  # loss ≈ s · ‖ΔY‖²
            plan.sensitivity = scores
        allocation = allocate_by_output_error(curves, budget, weights=layer_weights, allow_dense=allow_dense)

    def decide(names: Iterable[str], layer_stats: Mapping[str, InputStats]) -> None:
        for n in names:
            W = weights[n]
            params = None if allocation is None else allocation[n]
            if params is not None and params >= W.numel():
                plan.record(n, LayerChoice(None, "dense", W.numel(), 0.0, {"dense": 0.0}), layer_stats[n].tokens)
                continue
            choice = _choose(
                W, layer_stats[n], params=params, options=options, layout=layout, damp=damp, refit_steps=refit_steps
            )
            if not allow_dense and choice.mpo is None:
                raise ValueError(f"layer {n!r}: no MPO meets the limits with fewer parameters than the dense weight")
            plan.record(n, choice, layer_stats[n].tokens)

    if not blockwise:
        assert stats is not None
        decide(_maybe_progress(list(targets), progress), stats)
        return plan
    if install is None:
        raise ValueError("blockwise planning needs install=(name, mpo) -> layer to run the planned blocks")
    stack, blocks = find_blocks(model, targets)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    outside = [n for n in targets if _block_of(n, stack) is None]
    for n, m in targets.items():
        b = _block_of(n, stack)
        if b is not None:
            per_block[b][n] = m
    if outside:
        raise ValueError(
            f"blockwise: target(s) {outside[:3]} are outside the block stack {stack!r}; use blockwise=False"
        )
    from .utils import set_submodule

    installed: dict[str, nn.Module] = {}

    def on_block(b: int, block_stats: dict[str, InputStats]) -> None:
        decide(list(per_block[b]), block_stats)
        for n in per_block[b]:
            mpo = plan.mpos[n]
            if mpo is not None:
                installed[n] = targets[n]
                set_submodule(model, n, install(n, mpo))

    try:
        blockwise_input_stats(model, blocks, per_block, calibration, on_block, progress=progress)
    finally:
        for n, original in installed.items():
            set_submodule(model, n, original)
    return plan


def _maybe_progress(items: list[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="calibrated layouts", unit="layer")
