"""Compress a whole model: find target layers, allocate ranks under a budget, replace them in place.

The steps live in their own modules: :mod:`mpolab.targets` finds the layers, :mod:`mpolab.allocate`
spreads a global budget (``ratio=`` / ``max_params=``) over them by their bond spectra, and
:func:`mpolab.decompose` builds each MPO. This module runs them in order and reports what it did.
``rel_tol=`` and ``max_rank=`` apply per layer, and ``rank_pattern`` overrides any layer by name
(an overridden layer's parameters still count against a global budget). With ``calibration=``
data the decomposition is data-aware (:mod:`mpolab.calibrated`): each layer's error is measured
on its recorded inputs, the budget follows that output error, the layout (SVD-equivalent two
cores, whitening-friendly chains, the plain MPO) is searched per layer, and a layer whose MPO
would not be smaller than its dense weight stays dense. Everything is checked
and built before the first layer is replaced, so an error leaves the model as it was.

Example:
    >>> report = mpolab.compress(model, target_modules=["query", "key", "value", "dense"], ratio=0.5)
    >>> print(report)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .allocate import allocate_ranks, cores_for, layer_spectrum, uniform_rank_for_budget
from .calibrated import CalibratedPlan, LayoutChoice, plan_calibrated
from .decompose import decompose
from .mpo import MPO
from .nn import MPOEmbedding, MPOLinear, MPOModule, mpo_modules
from .options import TruncationOptions
from .tables import TableReport
from .targets import ALL_LINEAR, TargetModules, find_targets, layer_kind, matches, weight_matrix
from .truncation import SVDBackend
from .utils import set_submodule, with_threads_option

__all__ = [
    "CompressionReport",
    "LayerReport",
    "allocate_ranks",
    "compress",
    "find_targets",
    "mpo_modules",
    "uniform_rank_for_budget",
]

RankOverride = int | Sequence[int] | Mapping[str, Any]


@dataclass
class LayerReport:
    """One compressed layer."""

    name: str
    kind: str
    shape: tuple[int, int]
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    rel_error: float
    layout: str = ""
    output_error: float | None = None


@dataclass
class CompressionReport(TableReport):
    """What :func:`compress` did: one row per layer plus totals. ``print(report)`` shows a table."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters of the targeted layers' weights before compression."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def mean_rel_error(self) -> float:
        return sum(r.rel_error for r in self.layers) / max(len(self.layers), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }

    @property
    def calibrated(self) -> bool:
        """Whether the layers were chosen on calibration data (the table then shows layouts and output errors)."""
        return any(r.output_error is not None for r in self.layers)

    @property
    def dense_layers(self) -> list[str]:
        """Targets kept dense because no MPO of theirs was smaller (calibrated compression only)."""
        return [r.name for r in self.layers if r.layout == "dense"]

    def header(self) -> list[str]:
        base = ["layer", "kind", "shape", "ranks", "params", "kept", "rel. error"]
        return base[:3] + ["layout"] + base[3:] + ["output error"] if self.calibrated else base

    def rows(self) -> list[list[str]]:
        rows = []
        for r in self.layers:
            row = [
                r.name,
                r.kind,
                f"{r.shape[0]}x{r.shape[1]}",
                ",".join(map(str, r.ranks)) or "-",
                f"{r.params_before:,} -> {r.params_after:,}",
                f"{r.params_after / r.params_before:.1%}",
                f"{r.rel_error:.4f}",
            ]
            if self.calibrated:
                error = "-" if r.output_error is None else f"{r.output_error:.4f}"
                row = row[:3] + [r.layout] + row[3:] + [error]
            rows.append(row)
        return rows

    def summary(self) -> list[str]:
        return [
            f"targets: {self.params_before:,} -> {self.params_after:,} parameters ({self.ratio:.1%}), "
            f"mean relative error {self.mean_rel_error:.4f}; "
            f"model: {self.model_params_before:,} -> {self.model_params_after:,}"
        ] + (
            [f"kept dense (an MPO would not be smaller): {len(self.dense_layers)} of {len(self.layers)} targets"]
            if self.dense_layers
            else []
        )


@with_threads_option
def compress(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
    *,
    options: TruncationOptions | None = None,
    exclude_modules: TargetModules | None = None,
    rel_tol: float | None = None,
    max_rank: int | Sequence[int] | None = None,
    ratio: float | None = None,
    max_params: int | None = None,
    num_cores: int = 5,
    rank_pattern: Mapping[str, RankOverride] | None = None,
    svd: SVDBackend = "auto",
    cache_weight: bool = True,
    progress: bool = False,
    calibration: Iterable[Any] | None = None,
    layout: LayoutChoice = "auto",
    blockwise: bool = False,
    damp: float = 1e-2,
    refit_steps: int = 0,
    sensitivity: bool = True,
    threads: int | None = None,
) -> CompressionReport:
    """Replace the target layers of ``model`` by MPO layers, in place.

    All options are checked and every new layer is built before the first one is installed, so
    on any error the model is left exactly as it was.

    Args:
        model: any ``nn.Module`` (Hugging Face models included) that *contains* the targets;
            ``model`` itself cannot be replaced in place (for a bare layer use
            :meth:`MPOLinear.from_linear` / :meth:`MPOEmbedding.from_embedding`).
        target_modules, exclude_modules: see :func:`find_targets`.
        options: the truncation options below as one :class:`~mpolab.options.TruncationOptions`
            (instead of the keywords; giving both is a ``ValueError``). Its ``num_cores``
            defaults to 5; per-matrix factor lists are refused (use ``rank_pattern``).
        rel_tol: per-layer relative Frobenius error (see :func:`mpolab.decompose`).
        max_rank: per-layer bond cap (an int, or one int per bond); combines with every other option.
        ratio: global budget as a fraction of the targets' weight parameters, allocated by
            :func:`allocate_ranks`.
        max_params: the same budget as a parameter count (a positive int).
        num_cores: cores per MPO (smaller for small matrices is automatic: a layer too small for
            ``num_cores`` cores uses as many as its sizes allow).
        rank_pattern: per-layer overrides ``{pattern: max_rank | {decompose kwargs}}``, like
            peft's ``rank_pattern``; overridden layers keep their own rule and count against a
            global budget.
        progress: show a tqdm progress bar over layers.
        calibration: model inputs to calibrate on (the output of
            :func:`mpolab.calibration_data`, or any iterable of dicts for ``model(**batch)``,
            tensors or tuples). With it compression is data-aware: ``rel_tol`` means relative
            *output* error on these inputs, a budget is allocated by measured output error,
            and layers may stay dense (see :mod:`mpolab.calibrated`). ``rank_pattern`` layers
            keep their own (plain) rule.
        layout: calibrated only: ``"auto"`` (per-layer search, the SVD-equivalent two-core
            layout among the candidates), ``"svd"`` or ``"mpo"`` (the plain ``num_cores`` layout).
        blockwise: calibrated only: block by block, later blocks calibrated on the outputs of
            the already compressed ones (GPTQ style).
        damp: calibrated only: damping of each input Gram matrix, a fraction of its mean diagonal.
        refit_steps: calibrated only: Adam steps per layer refitting the cores to the outputs.
        sensitivity: calibrated budgets only (default on): weight each layer's output error by
            its measured effect on the loss (one backward pass over two calibration batches).
            Off, relative output errors count equally, which measured worse on both real
            models (benchmarks/bench_calibrated.py).
        threads: torch threads for the call (restored afterwards); ``None`` keeps the current
            count. On a busy machine 1 can be much faster (small ``eigh`` calls spin-wait).

    Returns:
        A :class:`CompressionReport` with per-layer shapes, factors, ranks, parameters and
        achieved errors. With no truncation option the layers are exact (and larger).

    Raises:
        TypeError: ``max_params`` / ``num_cores`` / a pattern of the wrong type.
        ValueError: conflicting or out-of-range options; a per-bond ``max_rank`` whose length is
            not a target's number of bonds; ``model`` itself is a target; a target whose weight
            is tied to another module (naming both); an embedding with ``max_norm`` or
            ``sparse=True``; and what :func:`find_targets` and :func:`mpolab.decompose` raise.

    Example:
        >>> report = compress(model, ["query", "key", "value"], rel_tol=0.2)
    """
    opts = _model_options(options, rel_tol, max_rank, ratio, max_params, num_cores, svd)
    targets = find_targets(model, target_modules, exclude_modules)
    _check_targets(model, targets)
    model_before = sum(p.numel() for p in model.parameters())
    weights = {name: weight_matrix(m) for name, m in targets.items()}
    plans: dict[str, TruncationOptions] = {}
    fixed: set[str] = set()  # layers with a rank_pattern override
    for name, w in weights.items():
        plans[name], overridden = _layer_options(name, w.shape, opts, rank_pattern)
        if overridden:
            fixed.add(name)

    mpos: dict[str, MPO | None] = {}
    calibrated = None
    if calibration is not None and not (opts.has_budget or opts.rel_tol is not None or opts.max_rank is not None):
        raise ValueError(
            "calibration data only matters when something is truncated: give ratio, max_params, rel_tol or max_rank"
        )
    if calibration is not None:
        fixed_mpos = {n: decompose(weights[n], options=plans[n]) for n in fixed}
        free = {n: targets[n] for n in plans if n not in fixed}
        budget = opts.budget_for(sum(w.numel() for w in weights.values())) if opts.has_budget else None
        calibrated = plan_calibrated(
            model,
            free,
            calibration,
            opts,
            budget=None if budget is None else budget - sum(m.num_params for m in fixed_mpos.values()),
            layout=layout,
            damp=damp,
            blockwise=blockwise,
            refit_steps=refit_steps,
            sensitivity=sensitivity,
            install=lambda n, mpo: _replacement(targets[n], mpo, cache_weight),
            progress=progress,
        )
        mpos = {**fixed_mpos, **calibrated.mpos}
    elif opts.has_budget:
        budget = opts.budget_for(sum(w.numel() for w in weights.values()))
        assert budget is not None
        fixed_mpos = {n: decompose(weights[n], options=plans[n]) for n in fixed}  # they count against the budget
        mpos.update(fixed_mpos)
        to_allocate = [n for n in plans if n not in fixed]
        spectra = {n: layer_spectrum(weights[n], plans[n]) for n in _progress(to_allocate, progress, "spectra")}
        allocated = allocate_ranks(spectra, budget - sum(m.num_params for m in fixed_mpos.values()))
        for n in to_allocate:
            plans[n] = plans[n].replace(max_rank=tuple(allocated[n]))

    # Build every replacement first, then install them all: an error leaves the model untouched.
    replacements: dict[str, MPOModule] = {}
    for name in _progress(list(targets), progress, "compress"):
        if name not in mpos:
            mpos[name] = decompose(weights[name], options=plans[name])
        mpo_or_dense = mpos[name]
        if mpo_or_dense is not None:  # None: calibrated compression keeps this layer dense
            replacements[name] = _replacement(targets[name], mpo_or_dense, cache_weight)
    report = CompressionReport(model_params_before=model_before)
    for name in targets:
        if name in replacements:
            set_submodule(model, name, replacements[name])
        report.layers.append(_layer_report(name, targets[name], weights[name], mpos[name], calibrated))
    report.model_params_after = sum(p.numel() for p in model.parameters())
    return report


def _layer_report(
    name: str, module: nn.Module, weight: Any, mpo: MPO | None, calibrated: CalibratedPlan | None
) -> LayerReport:
    """One report row; ``mpo=None`` is a layer kept dense by calibrated compression."""
    kind = layer_kind(module) or "?"
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    layout = "" if calibrated is None else calibrated.layouts.get(name, "plain")
    out_error = None if calibrated is None else calibrated.output_errors.get(name)
    if mpo is None:
        return LayerReport(name, kind, shape, (), (), (), weight.numel(), weight.numel(), 0.0, "dense", 0.0)
    return LayerReport(
        name=name,
        kind=kind,
        shape=mpo.shape,
        out_factors=mpo.out_factors,
        in_factors=mpo.in_factors,
        ranks=mpo.ranks,
        params_before=weight.numel(),
        params_after=mpo.num_params,
        rel_error=float(_weight_error(weight, mpo) if calibrated is not None else (mpo.truncation_error or 0.0)),
        layout=layout,
        output_error=out_error,
    )


def _weight_error(weight: Any, mpo: MPO) -> float:
    """``‖W - Ŵ‖ / ‖W‖`` (a calibrated MPO's ``truncation_error`` is an output error, not this)."""
    W = weight.detach().double()
    norm = float(W.norm())
    return float((mpo.to_matrix().double() - W).norm()) / norm if norm > 0 else 0.0


def _model_options(
    options: TruncationOptions | None,
    rel_tol: float | None,
    max_rank: int | Sequence[int] | None,
    ratio: float | None,
    max_params: int | None,
    num_cores: int,
    svd: str,
) -> TruncationOptions:
    """The model-wide options, validated once; ``num_cores`` defaults to 5."""
    opts = TruncationOptions.from_kwargs(
        options,
        rel_tol=rel_tol,
        max_rank=max_rank,
        ratio=ratio,
        max_params=max_params,
        num_cores=None if num_cores == 5 and not isinstance(num_cores, bool) else num_cores,
        svd=svd,
    )
    if opts.num_cores is None:
        opts = opts.replace(num_cores=5)
    if opts.rel_tol is not None and opts.has_budget:
        raise ValueError("give a per-layer rel_tol or a global budget (ratio/max_params), not both")
    if opts.out_factors is not None or opts.in_factors is not None:
        raise ValueError(
            "compress chooses factors per layer; out_factors/in_factors describe one matrix "
            "(give them for single layers through rank_pattern={name: {...}})"
        )
    return opts


def _layer_options(
    name: str, shape: Sequence[int], opts: TruncationOptions, rank_pattern: Mapping[str, RankOverride] | None
) -> tuple[TruncationOptions, bool]:
    """One layer's options, and whether a ``rank_pattern`` entry gave them."""
    assert opts.num_cores is not None
    cores = cores_for(shape, opts.num_cores)
    override = _override_for(name, rank_pattern)
    if override is not None:
        return TruncationOptions(**{"num_cores": cores, "svd": opts.svd, **override}), True
    if opts.max_rank is not None:
        _check_max_rank(name, opts.max_rank, cores)
    return opts.replace(num_cores=cores, ratio=None, max_params=None), False


def _check_targets(model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
    """Refuse targets ``compress`` cannot replace faithfully: the root, tied weights, special embeddings."""
    if "" in targets:
        raise ValueError(
            f"the model itself is a {type(model).__name__} target, and compress replaces layers inside a "
            "model, not the model object: wrap it (nn.Sequential(layer)) or convert it with "
            "MPOLinear.from_linear / MPOEmbedding.from_embedding"
        )
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    for name, module in targets.items():
        shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"{name!r}.weight is tied to {shared}: compressing {name!r} would untie them and leave a dense "
                "copy of the matrix in the other module(s), making the model larger; exclude it "
                f"(exclude_modules=[{name!r}]) or untie the weights first"
            )
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(
                f"embedding {name!r} has max_norm={module.max_norm} / sparse={module.sparse}, which MPOEmbedding "
                f"does not support; exclude it (exclude_modules=[{name!r}])"
            )


def _check_max_rank(name: str, cap: int | Sequence[int], cores: int) -> None:
    """A per-bond ``max_rank`` (already validated) has one entry per bond of the layer's ``cores``-core MPO."""
    if isinstance(cap, int):
        return
    if len(cap) != cores - 1:
        raise ValueError(
            f"max_rank={list(cap)} has {len(cap)} entries, but layer {name!r} gets an MPO of {cores} cores, "
            f"i.e. {cores - 1} bonds; give one int, or one int per bond (use rank_pattern for layers of "
            "different sizes)"
        )


def _override_for(name: str, rank_pattern: Mapping[str, RankOverride] | None) -> dict[str, Any] | None:
    if not rank_pattern:
        return None
    for pattern, value in rank_pattern.items():
        if matches(name, pattern):
            if isinstance(value, Mapping):
                return dict(value)
            return {"max_rank": value}
    return None


def _replacement(module: nn.Module, mpo: MPO, cache_weight: bool) -> MPOModule:
    """The MPO layer for ``module`` (``original_type`` records the dense class, saved by :func:`mpolab.save`)."""
    original = type(module).__name__
    if isinstance(module, nn.Embedding):
        return MPOEmbedding.from_mpo(
            mpo, padding_idx=module.padding_idx, cache_weight=cache_weight, original_type=original
        )
    bias = getattr(module, "bias", None)
    return MPOLinear.from_mpo(
        mpo, bias.detach() if bias is not None else None, cache_weight=cache_weight, original_type=original
    )


def _progress(items: list[str], enabled: bool, desc: str) -> Iterable[str]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer")
