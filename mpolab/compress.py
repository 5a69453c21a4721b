"""Compress a whole model: find target layers, allocate ranks under a budget, replace them in place.

Targets are ``nn.Linear``, ``nn.Embedding`` and Hugging Face GPT-2's ``Conv1D`` (weight stored
``[in, out]``). A global budget (``ratio=`` / ``max_params=``) is spread over the targets by their
bond spectra: starting from exact ranks, the rank unit removed next is always the one that adds
the least squared relative error per parameter saved, so layers whose spectra decay fast give up
more than layers that need their ranks. ``rel_tol=`` and ``max_rank=`` apply per layer, and
``rank_pattern`` overrides any layer by name.

Example:
    >>> report = mpolab.compress(model, target_modules=["query", "key", "value", "dense"], ratio=0.5)
    >>> print(report)
"""

from __future__ import annotations

import difflib
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .decompose import decompose
from .mpo import MPO
from .nn import MPOEmbedding, MPOLinear, MPOModule
from .truncation import SVDBackend, bond_caps, full_bond_dims, num_params_for_ranks, squared_norm

__all__ = [
    "CompressionReport",
    "LayerReport",
    "allocate_ranks",
    "compress",
    "find_targets",
    "is_conv1d",
]

TargetModules = str | Sequence[str]
RankOverride = int | Sequence[int] | Mapping[str, Any]


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _matches(name: str, pattern: str) -> bool:
    """Exact name, dotted suffix (``"query"`` matches ``"encoder.layer.0.attention.self.query"``) or regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    exclude_modules: TargetModules | None = None,
) -> dict[str, nn.Module]:
    """The modules ``compress`` would replace, by qualified name.

    Args:
        target_modules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except an ``lm_head``
            output layer, as peft does), a regex matched against full names, or a list of exact
            names / name suffixes / regexes.
        exclude_modules: the same forms; matching modules are skipped.

    Raises:
        ValueError: nothing matched (with the closest module names), or a match is a module
            type that cannot be compressed.
    """
    named = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules == "all-linear":
        found = {n: m for n, m in named.items() if _kind(m) in ("linear", "conv1d") and not n.endswith("lm_head")}
    else:
        patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not patterns:
            raise ValueError("target_modules is empty; give names, suffixes, a regex or 'all-linear'")
        found = {n: m for n, m in named.items() if n and any(_matches(n, p) for p in patterns)}
        # A pattern naming a container ("attention") selects nothing by itself: keep leaves only.
        found = {n: m for n, m in found.items() if _kind(m) is not None or not any(True for _ in m.children())}
        bad = {n: type(m).__name__ for n, m in found.items() if _kind(m) is None}
        if bad:
            raise ValueError(
                f"target_modules matched modules that cannot be compressed: {bad}; "
                "supported are nn.Linear, nn.Embedding and transformers' Conv1D"
            )
    if exclude_modules is not None:
        excludes = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        found = {n: m for n, m in found.items() if not any(_matches(n, p) for p in excludes)}
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if _kind(m) is not None})
        patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        near = list(
            dict.fromkeys(
                c for p in patterns for c in difflib.get_close_matches(str(p).rsplit(".", 1)[-1], leaves, n=3)
            )
        )
        raise ValueError(
            f"target_modules={target_modules!r} matched no compressible module"
            + (f"; near misses: {near}" if near else "")
            + f"; compressible module names end in: {leaves[:20]}"
        )
    return found


def _weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's matrix as ``[out, in]`` (``[num_embeddings, dim]`` for embeddings)."""
    w = module.weight.detach()
    return w.T if is_conv1d(module) else w


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


@dataclass
class CompressionReport:
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

    def __str__(self) -> str:
        header = ["layer", "kind", "shape", "ranks", "params", "kept", "rel. error"]
        rows = [
            [
                r.name,
                r.kind,
                f"{r.shape[0]}x{r.shape[1]}",
                ",".join(map(str, r.ranks)),
                f"{r.params_before:,} -> {r.params_after:,}",
                f"{r.params_after / r.params_before:.1%}",
                f"{r.rel_error:.4f}",
            ]
            for r in self.layers
        ]
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"targets: {self.params_before:,} -> {self.params_after:,} parameters ({self.ratio:.1%}), "
            f"mean relative error {self.mean_rel_error:.4f}; "
            f"model: {self.model_params_before:,} -> {self.model_params_after:,}"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- global allocation


@dataclass
class _Spectrum:
    core_sizes: list[int]
    singular_values: list[torch.Tensor]  # per bond, descending
    norm_sq: float
    caps: list[int]


def allocate_ranks(spectra: Mapping[str, _Spectrum], budget: int) -> dict[str, list[int]]:
    """Bond ranks for every layer so that the total parameter count fits ``budget``.

    Greedy on the exact bond spectra: repeatedly drop the rank unit ``(layer, bond)`` whose
    singular value adds the least squared relative error ``σ²/‖W‖²`` per parameter saved.
    """
    ranks = {name: list(s.caps) for name, s in spectra.items()}
    total = sum(num_params_for_ranks(s.core_sizes, ranks[n]) for n, s in spectra.items())
    floor = sum(num_params_for_ranks(s.core_sizes, [1] * len(s.caps)) for s in spectra.values())
    if budget < floor:
        raise ValueError(
            f"budget of {budget:,} parameters is below {floor:,}, the size of rank-1 MPOs of all "
            f"{len(spectra)} targets; raise ratio/max_params or target fewer layers"
        )

    def entry(name: str, k: int) -> tuple[float, int, str, int, int] | None:
        s, r = spectra[name], ranks[name]
        if r[k] <= 1:
            return None
        bonds = [1, *r, 1]
        saved = s.core_sizes[k] * bonds[k] + s.core_sizes[k + 1] * bonds[k + 2]
        sv = s.singular_values[k]
        lost = float(sv[r[k] - 1]) ** 2 if r[k] - 1 < sv.numel() else 0.0
        return (lost / max(s.norm_sq, 1e-30) / saved, saved, name, k, r[k])

    heap = [e for n in spectra for k in range(len(ranks[n])) if (e := entry(n, k)) is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        _, saved, name, k, rank_then = heapq.heappop(heap)
        if ranks[name][k] != rank_then:
            continue  # stale
        fresh = entry(name, k)
        if fresh is None:
            continue
        if fresh[1] != saved:  # a neighbour bond changed: re-queue with the current price
            heapq.heappush(heap, fresh)
            continue
        ranks[name][k] -= 1
        total -= saved
        for kk in (k - 1, k, k + 1):
            if 0 <= kk < len(ranks[name]) and (e := entry(name, kk)) is not None:
                heapq.heappush(heap, e)
    return ranks


# ---------------------------------------------------------------------------- compress


def compress(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    *,
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
) -> CompressionReport:
    """Replace the target layers of ``model`` by MPO layers, in place.

    Args:
        model: any ``nn.Module`` (Hugging Face models included).
        target_modules, exclude_modules: see :func:`find_targets`.
        rel_tol: per-layer relative Frobenius error (see :func:`mpolab.decompose`).
        max_rank: per-layer bond cap; combines with every other option.
        ratio: global budget as a fraction of the targets' weight parameters, allocated by
            :func:`allocate_ranks`.
        max_params: the same budget as a parameter count.
        num_cores: cores per MPO (smaller for small matrices is automatic: a layer too small for
            ``num_cores`` cores uses as many as its sizes allow).
        rank_pattern: per-layer overrides ``{pattern: max_rank | {decompose kwargs}}``, like
            peft's ``rank_pattern``; overridden layers keep their own rule and count against a
            global budget.
        progress: show a tqdm progress bar over layers.

    Returns:
        A :class:`CompressionReport` with per-layer shapes, factors, ranks, parameters and
        achieved errors. With no truncation option the layers are exact (and larger).

    Example:
        >>> report = compress(model, ["query", "key", "value"], rel_tol=0.2)
    """
    if rel_tol is not None and (ratio is not None or max_params is not None):
        raise ValueError("give a per-layer rel_tol or a global budget (ratio/max_params), not both")
    if ratio is not None and max_params is not None:
        raise ValueError(f"give ratio or max_params, not both (got ratio={ratio}, max_params={max_params})")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
        raise ValueError(f"ratio must be a positive fraction of the targets' parameters, got {ratio!r}")
    targets = find_targets(model, target_modules, exclude_modules)
    model_before = sum(p.numel() for p in model.parameters())
    weights = {name: _weight_of(m) for name, m in targets.items()}
    plans: dict[str, dict[str, Any]] = {}
    for name, w in weights.items():
        kwargs: dict[str, Any] = {"num_cores": _cores_for(w.shape, num_cores), "svd": svd}
        if rel_tol is not None:
            kwargs["rel_tol"] = rel_tol
        if max_rank is not None:
            kwargs["max_rank"] = max_rank
        override = _override_for(name, rank_pattern)
        if override is not None:
            kwargs = {"num_cores": kwargs["num_cores"], "svd": svd, **override}
        plans[name] = kwargs

    if ratio is not None or max_params is not None:
        dense_total = sum(w.numel() for w in weights.values())
        budget = max_params if max_params is not None else int(ratio * dense_total)  # type: ignore[operator]
        fixed = {n for n in plans if _override_for(n, rank_pattern) is not None}
        free = [n for n in plans if n not in fixed]
        fixed_params = {n: decompose(weights[n], **plans[n]).num_params for n in fixed}
        spectra = {n: _spectrum(weights[n], plans[n]) for n in _progress(free, progress, "spectra")}
        allocated = allocate_ranks(spectra, budget - sum(fixed_params.values()))
        for n in free:
            plans[n] = {"num_cores": plans[n]["num_cores"], "svd": svd, "max_rank": allocated[n]}

    report = CompressionReport(model_params_before=model_before)
    for name in _progress(list(targets), progress, "compress"):
        module = targets[name]
        mpo = decompose(weights[name], **plans[name])
        replacement = _replacement(module, mpo, cache_weight)
        _set_submodule(model, name, replacement)
        report.layers.append(
            LayerReport(
                name=name,
                kind=_kind(module) or "?",
                shape=mpo.shape,
                out_factors=mpo.out_factors,
                in_factors=mpo.in_factors,
                ranks=mpo.ranks,
                params_before=weights[name].numel(),
                params_after=mpo.num_params,
                rel_error=float(mpo.truncation_error or 0.0),
            )
        )
    report.model_params_after = sum(p.numel() for p in model.parameters())
    return report


def _spectrum(weight: torch.Tensor, plan: Mapping[str, Any]) -> _Spectrum:
    """Exact bond spectra of one layer (one exact TT-SVD), and its caps."""
    exact = decompose(weight, num_cores=plan["num_cores"], svd=plan.get("svd", "auto"))
    sizes = [i * j for i, j in zip(exact.out_factors, exact.in_factors)]
    # Never start above the dense layer's size: an MPO larger than its matrix saves nothing.
    caps = [min(a, b) for a, b in zip(exact.ranks, bond_caps(sizes, max_params=max(weight.numel(), 1)))]
    cap = plan.get("max_rank")
    if cap is not None:
        per_bond = [cap] * len(caps) if isinstance(cap, int) else list(cap)
        caps = [min(c, r) for c, r in zip(caps, per_bond)]
    assert exact.singular_values is not None
    norm_sq = squared_norm(weight)
    return _Spectrum(sizes, exact.singular_values, norm_sq, caps)


def _cores_for(shape: Sequence[int], num_cores: int) -> int:
    """``num_cores``, or fewer for matrices too small to split that far (a classifier head)."""
    from .shapes import prime_factors

    available = len(prime_factors(int(shape[0]))) + len(prime_factors(int(shape[1])))
    return max(2, min(num_cores, available))


def _override_for(name: str, rank_pattern: Mapping[str, RankOverride] | None) -> dict[str, Any] | None:
    if not rank_pattern:
        return None
    for pattern, value in rank_pattern.items():
        if _matches(name, pattern):
            if isinstance(value, Mapping):
                return dict(value)
            return {"max_rank": value}
    return None


def _replacement(module: nn.Module, mpo: MPO, cache_weight: bool) -> MPOModule:
    layer: MPOModule
    if isinstance(module, nn.Embedding):
        layer = MPOEmbedding.from_mpo(mpo, padding_idx=module.padding_idx, cache_weight=cache_weight)
    else:
        bias = getattr(module, "bias", None)
        layer = MPOLinear.from_mpo(mpo, bias.detach() if bias is not None else None, cache_weight=cache_weight)
    layer.original_type = type(module).__name__  # recorded by mpolab.save
    return layer


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _progress(items: list[str], enabled: bool, desc: str) -> Iterable[str]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer")


def mpo_modules(model: nn.Module) -> dict[str, MPOModule]:
    """Every MPO layer in ``model``, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MPOModule)}


def uniform_rank_for_budget(model_weights: Mapping[str, torch.Tensor], budget: int, num_cores: int = 5) -> int:
    """The largest single bond cap whose MPOs of all ``model_weights`` fit ``budget`` (a baseline)."""
    from .shapes import plan_factors

    sizes = []
    for w in model_weights.values():
        plan = plan_factors(int(w.shape[0]), int(w.shape[1]), _cores_for(w.shape, num_cores))
        sizes.append([i * j for i, j in zip(plan.out_factors, plan.in_factors)])

    def params(cap: int) -> int:
        return sum(num_params_for_ranks(s, [min(cap, f) for f in full_bond_dims(s)]) for s in sizes)

    lo, hi = 1, max(max(full_bond_dims(s)) for s in sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if params(mid) <= budget else (lo, mid - 1)
    return lo
