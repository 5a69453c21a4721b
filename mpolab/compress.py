"""Compress a whole model: find target layers, allocate ranks under a budget, replace them in place.

Targets are ``nn.Linear``, ``nn.Embedding`` and Hugging Face GPT-2's ``Conv1D`` (weight stored
``[in, out]``). A global budget (``ratio=`` / ``max_params=``) is spread over the targets by their
bond spectra (:func:`allocate_ranks`): starting from exact ranks, the bond lowered next is always
the one that adds the least estimated error per parameter saved, keeping every layer's ranks
feasible for its cores, so layers whose spectra decay fast give up more than layers that need
their ranks, and the parameters counted are the ones spent. ``rel_tol=`` and ``max_rank=`` apply
per layer, and ``rank_pattern`` overrides any layer by name. Everything is checked and built
before the first layer is replaced, so an error leaves the model as it was.

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
from .tables import TableReport
from .truncation import SVDBackend, bond_caps, feasible_ranks, full_bond_dims, num_params_for_ranks, squared_norm

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


ALL_LINEAR = "all-linear"


def _matches(name: str, pattern: str) -> bool:
    """Exact name, dotted suffix (``"query"`` matches ``"encoder.layer.0.attention.self.query"``) or regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _patterns(value: TargetModules, what: str, names: Iterable[str]) -> list[str]:
    """``value`` as a list of pattern strings, each a valid regex or the name/suffix of a module.

    Raises:
        TypeError: ``value`` is not a string or an iterable (list, tuple, set) of strings.
        ValueError: a pattern is neither a valid regular expression nor a module name or suffix.
    """
    if isinstance(value, str):
        patterns = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        patterns = list(value)  # a list, tuple or set of patterns
    else:
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    names = list(names)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} must hold strings (names, suffixes, regexes, 'all-linear'), got {p!r}")
        if p == ALL_LINEAR:
            continue
        try:
            re.compile(p)
        except re.error as e:
            if not any(n == p or n.endswith("." + p) for n in names):
                raise ValueError(
                    f"{what} entry {p!r} is not a valid regular expression ({e}) and names no module; "
                    "give exact names, dotted suffixes, valid regexes or 'all-linear'"
                ) from None
    return patterns


def _is_all_linear(name: str, module: nn.Module) -> bool:
    return _kind(module) in ("linear", "conv1d") and not name.endswith("lm_head")


def find_targets(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
    exclude_modules: TargetModules | None = None,
) -> dict[str, nn.Module]:
    """The modules ``compress`` would replace, by qualified name, in module order.

    Args:
        target_modules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except an ``lm_head``
            output layer, as peft does), an exact name, a dotted name suffix, a regex matched
            against full names, or a list of these (their union; ``"all-linear"`` may be one of
            them).
        exclude_modules: the same forms; matching modules are skipped.

    A pattern may match modules that cannot be compressed (a broad regex such as
    ``r".*attention.*"`` also matches dropouts and norms): those are left out as long as the
    pattern matches at least one compressible layer. Containers (``"attention"``) select nothing
    by themselves.

    Raises:
        TypeError: a pattern is not a string.
        ValueError: an empty list; a pattern that is neither a valid regex nor a module name; a
            pattern whose matches are all of unsupported types (naming them); or nothing left
            to compress (with the closest module names).
    """
    named = dict(model.named_modules())
    patterns = _patterns(target_modules, "target_modules", named)
    if not patterns:
        raise ValueError("target_modules is empty; give names, suffixes, a regex or 'all-linear'")
    excludes = [] if exclude_modules is None else _patterns(exclude_modules, "exclude_modules", named)
    found: dict[str, nn.Module] = {}
    for p in patterns:
        if p == ALL_LINEAR:
            hits = {n: m for n, m in named.items() if _is_all_linear(n, m)}
        else:
            hits = {n: m for n, m in named.items() if n and _matches(n, p)}
            # A pattern naming a container ("attention") selects nothing by itself: keep leaves only.
            hits = {n: m for n, m in hits.items() if _kind(m) is not None or not any(True for _ in m.children())}
        supported = {n: m for n, m in hits.items() if _kind(m) is not None}
        if hits and not supported:
            bad = {n: type(m).__name__ for n, m in list(hits.items())[:8]}
            raise ValueError(
                f"target_modules entry {p!r} matched only modules that cannot be compressed: {bad}; "
                "supported are nn.Linear, nn.Embedding and transformers' Conv1D" + _near_misses([p], named)
            )
        found.update(supported)
    found = {n: m for n, m in found.items() if not any(_matches(n, p) for p in excludes)}
    if not found:
        raise ValueError(
            f"target_modules={target_modules!r} matched no compressible module" + _near_misses(patterns, named)
        )
    order = {n: i for i, n in enumerate(named)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _near_misses(patterns: Sequence[str], named: Mapping[str, nn.Module]) -> str:
    """``"; near misses: [...]; compressible module names end in: [...]"`` for an error message."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if _kind(m) is not None})
    near = list(
        dict.fromkeys(c for p in patterns for c in difflib.get_close_matches(str(p).rsplit(".", 1)[-1], leaves, n=3))
    )
    return (f"; near misses: {near}" if near else "") + f"; compressible module names end in: {leaves[:20]}"


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

    def header(self) -> list[str]:
        return ["layer", "kind", "shape", "ranks", "params", "kept", "rel. error"]

    def rows(self) -> list[list[str]]:
        return [
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

    def summary(self) -> list[str]:
        return [
            f"targets: {self.params_before:,} -> {self.params_after:,} parameters ({self.ratio:.1%}), "
            f"mean relative error {self.mean_rel_error:.4f}; "
            f"model: {self.model_params_before:,} -> {self.model_params_after:,}"
        ]


# ---------------------------------------------------------------------------- global allocation


@dataclass
class _Spectrum:
    core_sizes: list[int]
    singular_values: list[torch.Tensor]  # per bond, descending
    norm_sq: float
    caps: list[int]


def allocate_ranks(spectra: Mapping[str, _Spectrum], budget: int) -> dict[str, list[int]]:
    """Feasible bond ranks for every layer so that the total parameter count fits ``budget``.

    The squared relative error of a layer is estimated from the discarded tails of its exact bond
    spectra, ``t_k = Σ_{i>=r_k} σ_{k,i}² / ‖W‖²``, as ``1 - Π_k (1 - t_k)``: between the largest
    tail (a lower bound) and their sum (the TT-SVD upper bound), and close to the truth both for
    small errors and for heavily truncated, flat spectra. The sum over layers is minimised
    greedily. Ranks are always *feasible* (:func:`~mpolab.truncation.feasible_ranks`): lowering one
    bond may force its neighbours down too, and both the error and the parameters of such a move
    are those of the ranks an MPO can really hold, so the counted parameters are the ones spent.

    1. **Descent**: from the (feasible) caps, while the total exceeds ``budget``, lower the bond
       whose move adds the least error per parameter saved.
    2. **Fill**: then, while anything still fits, raise the bond whose move removes the most
       error per parameter added, so no budget that a single rank unit could use is left unspent.
    3. The result is compared with the best *uniform* cap (filled the same way) and the one with
       the smaller estimated error is returned, so the allocation is never worse than a uniform
       cap by the estimate it optimises.

    Args:
        spectra: per layer, the core sizes ``i_k·j_k``, the exact singular values of every bond
            (descending), ``‖W‖²`` and the per-bond rank caps.
        budget: total parameters allowed over all layers.

    Returns:
        ``{name: ranks}`` with ``Σ num_params_for_ranks(...) <= budget``.

    Raises:
        TypeError: ``budget`` is not an int.
        ValueError: ``budget`` is below the size of rank-1 MPOs of all layers, or a spectrum's
            caps do not have one entry per bond.
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int number of parameters, got {type(budget).__name__}")
    layers = {name: _Layer(s, name) for name, s in spectra.items()}
    floor = sum(layer.params([1] * layer.bonds) for layer in layers.values())
    if budget < floor:
        raise ValueError(
            f"budget of {budget:,} parameters is below {floor:,}, the size of rank-1 MPOs of all "
            f"{len(spectra)} targets; raise ratio/max_params or target fewer layers"
        )
    greedy = _fill(_descend(layers, budget), layers, budget)
    candidates = [greedy]
    uniform = _uniform_ranks(layers, budget)
    if uniform is not None:
        candidates.append(_fill(uniform, layers, budget))
    return min(candidates, key=lambda ranks: sum(layers[n].error(r) for n, r in ranks.items()))


class _Layer:
    """One layer's spectra prepared for :func:`allocate_ranks`: tails, caps and parameter counts."""

    def __init__(self, spectrum: _Spectrum, name: str) -> None:
        sizes, caps = list(spectrum.core_sizes), list(spectrum.caps)
        if len(caps) != len(sizes) - 1 or len(spectrum.singular_values) != len(caps):
            raise ValueError(
                f"layer {name!r}: {len(sizes)} cores need {len(sizes) - 1} bond caps and spectra, "
                f"got {len(caps)} caps and {len(spectrum.singular_values)} spectra"
            )
        self.sizes = sizes
        self.bonds = len(caps)
        self.caps = feasible_ranks(sizes, [max(1, int(c)) for c in caps])
        norm_sq = max(float(spectrum.norm_sq), 1e-30)
        # tails[k][r]: relative energy discarded at bond k when keeping r values
        self.tails: list[list[float]] = []
        for sv in spectrum.singular_values:
            sq = [float(x) ** 2 / norm_sq for x in sv.double().tolist()]
            tail, acc = [0.0] * (len(sq) + 1), 0.0
            for i in range(len(sq) - 1, -1, -1):
                acc += sq[i]
                tail[i] = acc
            self.tails.append(tail)

    def params(self, ranks: Sequence[int]) -> int:
        return num_params_for_ranks(self.sizes, ranks)

    def error(self, ranks: Sequence[int]) -> float:
        """Estimated squared relative error ``1 - Π_k (1 - tail_k)`` of the discarded spectral tails."""
        kept = 1.0
        for t, r in zip(self.tails, ranks):
            kept *= 1.0 - min(t[r] if r < len(t) else 0.0, 1.0)
        return 1.0 - kept

    def lowered(self, ranks: list[int], k: int) -> list[int]:
        """``ranks`` with bond ``k`` one lower and the neighbours it forces down."""
        return feasible_ranks(self.sizes, ranks[:k] + [ranks[k] - 1] + ranks[k + 1 :])

    def can_raise(self, ranks: Sequence[int], k: int) -> bool:
        """Whether bond ``k`` can hold one more rank without passing its cap or its neighbours' limit."""
        r = ranks[k] + 1
        left = ranks[k - 1] if k else 1
        right = ranks[k + 1] if k + 1 < self.bonds else 1
        return r <= self.caps[k] and r <= left * self.sizes[k] and r <= right * self.sizes[k + 1]


def _descend(layers: Mapping[str, _Layer], budget: int) -> dict[str, list[int]]:
    """Lower single bonds (with the neighbours they force) at the least error per parameter until ``budget`` fits."""
    ranks = {n: list(layer.caps) for n, layer in layers.items()}
    total = sum(layers[n].params(r) for n, r in ranks.items())
    version = dict.fromkeys(layers, 0)
    heap: list[tuple[float, str, int, int]] = []

    def push(name: str) -> None:
        layer, r = layers[name], ranks[name]
        base_params, base_error = layer.params(r), layer.error(r)
        for k in range(layer.bonds):
            if r[k] > 1:
                new = layer.lowered(r, k)
                saved = base_params - layer.params(new)
                heapq.heappush(heap, ((layer.error(new) - base_error) / max(saved, 1), name, k, version[name]))

    for name in layers:
        push(name)
    while total > budget and heap:
        _, name, k, seen = heapq.heappop(heap)
        if seen != version[name]:
            continue  # the layer changed since this entry was priced
        layer = layers[name]
        new = layer.lowered(ranks[name], k)
        total -= layer.params(ranks[name]) - layer.params(new)
        ranks[name] = new
        version[name] += 1
        push(name)
    return ranks


def _fill(ranks: Mapping[str, list[int]], layers: Mapping[str, _Layer], budget: int) -> dict[str, list[int]]:
    """Raise single feasible bonds, most error removed per parameter first, while ``budget`` allows."""
    ranks = {n: list(r) for n, r in ranks.items()}
    total = sum(layers[n].params(r) for n, r in ranks.items())
    version = dict.fromkeys(layers, 0)
    heap: list[tuple[float, int, str, int, int]] = []

    def push(name: str) -> None:
        layer, r = layers[name], ranks[name]
        base_params, base_error = layer.params(r), layer.error(r)
        for k in range(layer.bonds):
            if layer.can_raise(r, k):
                new = r[:k] + [r[k] + 1] + r[k + 1 :]
                cost = layer.params(new) - base_params
                gain = base_error - layer.error(new)
                if gain > 0:  # a rank unit that removes no error would only cost parameters
                    heapq.heappush(heap, (-gain / cost, cost, name, k, version[name]))

    for name in layers:
        push(name)
    while heap:
        _, cost, name, k, seen = heapq.heappop(heap)
        if seen != version[name] or total + cost > budget:
            continue  # stale, or does not fit (the room left only shrinks)
        ranks[name][k] += 1
        total += cost
        version[name] += 1
        push(name)
    return ranks


def _uniform_ranks(layers: Mapping[str, _Layer], budget: int) -> dict[str, list[int]] | None:
    """The largest single cap for all bonds of all layers that fits ``budget`` (``None`` if even 1 does not)."""

    def ranks_for(cap: int) -> dict[str, list[int]]:
        return {n: feasible_ranks(layer.sizes, [min(c, cap) for c in layer.caps]) for n, layer in layers.items()}

    def fits(cap: int) -> bool:
        return sum(layers[n].params(r) for n, r in ranks_for(cap).items()) <= budget

    if not fits(1):
        return None
    lo, hi = 1, max((max(layer.caps, default=1) for layer in layers.values()), default=1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return ranks_for(lo)


# ---------------------------------------------------------------------------- compress


def compress(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
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

    All options are checked and every new layer is built before the first one is installed, so
    on any error the model is left exactly as it was.

    Args:
        model: any ``nn.Module`` (Hugging Face models included) that *contains* the targets;
            ``model`` itself cannot be replaced in place (for a bare layer use
            :meth:`MPOLinear.from_linear` / :meth:`MPOEmbedding.from_embedding`).
        target_modules, exclude_modules: see :func:`find_targets`.
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
    _check_options(rel_tol, ratio, max_params, num_cores)
    targets = find_targets(model, target_modules, exclude_modules)
    _check_targets(model, targets)
    model_before = sum(p.numel() for p in model.parameters())
    weights = {name: _weight_of(m) for name, m in targets.items()}
    plans: dict[str, dict[str, Any]] = {}
    fixed: set[str] = set()  # layers with a rank_pattern override
    for name, w in weights.items():
        kwargs: dict[str, Any] = {"num_cores": _cores_for(w.shape, num_cores), "svd": svd}
        if rel_tol is not None:
            kwargs["rel_tol"] = rel_tol
        if max_rank is not None:
            kwargs["max_rank"] = max_rank
        override = _override_for(name, rank_pattern)
        if override is not None:  # checked by decompose, before anything is installed
            kwargs = {"num_cores": kwargs["num_cores"], "svd": svd, **override}
            fixed.add(name)
        elif max_rank is not None:
            _check_max_rank(name, max_rank, kwargs["num_cores"])
        plans[name] = kwargs

    mpos: dict[str, MPO] = {}
    if ratio is not None or max_params is not None:
        dense_total = sum(w.numel() for w in weights.values())
        budget = max_params if max_params is not None else int(ratio * dense_total)  # type: ignore[operator]
        free = [n for n in plans if n not in fixed]
        mpos = {n: decompose(weights[n], **plans[n]) for n in fixed}
        spectra = {n: _spectrum(weights[n], plans[n]) for n in _progress(free, progress, "spectra")}
        allocated = allocate_ranks(spectra, budget - sum(m.num_params for m in mpos.values()))
        for n in free:
            plans[n] = {"num_cores": plans[n]["num_cores"], "svd": svd, "max_rank": allocated[n]}

    # Build every replacement first, then install them all: an error leaves the model untouched.
    replacements: dict[str, MPOModule] = {}
    for name in _progress(list(targets), progress, "compress"):
        if name not in mpos:
            mpos[name] = decompose(weights[name], **plans[name])
        replacements[name] = _replacement(targets[name], mpos[name], cache_weight)
    report = CompressionReport(model_params_before=model_before)
    for name, replacement in replacements.items():
        _set_submodule(model, name, replacement)
        mpo, module = mpos[name], targets[name]
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


def _check_options(rel_tol: object, ratio: object, max_params: object, num_cores: object) -> None:
    """Validate :func:`compress`'s scalar options before any work."""
    if rel_tol is not None and (ratio is not None or max_params is not None):
        raise ValueError("give a per-layer rel_tol or a global budget (ratio/max_params), not both")
    if ratio is not None and max_params is not None:
        raise ValueError(f"give ratio or max_params, not both (got ratio={ratio}, max_params={max_params})")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0):
        raise ValueError(f"ratio must be a positive fraction of the targets' parameters, got {ratio!r}")
    if max_params is not None:
        if isinstance(max_params, bool) or not isinstance(max_params, int):
            raise TypeError(f"max_params must be a positive int (a parameter count), got {max_params!r}")
        if max_params < 1:
            raise ValueError(f"max_params must be a positive int (a parameter count), got {max_params}")
    if isinstance(num_cores, bool) or not isinstance(num_cores, int):
        raise TypeError(f"num_cores must be an int >= 2, got {num_cores!r}")
    if num_cores < 2:
        raise ValueError(f"num_cores must be >= 2 (an MPO has at least two cores), got {num_cores}")


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
    """``max_rank`` is an int >= 1 or one such int per bond of the layer's ``cores``-core MPO."""
    if isinstance(cap, int) and not isinstance(cap, bool):
        if cap < 1:
            raise ValueError(f"max_rank must be >= 1 (int or one int per bond), got {cap}")
        return
    if isinstance(cap, (str, bytes, bool)) or not isinstance(cap, Sequence):
        raise TypeError(f"max_rank must be an int or a list of ints, got {type(cap).__name__}")
    if len(cap) != cores - 1:
        raise ValueError(
            f"max_rank={list(cap)} has {len(cap)} entries, but layer {name!r} gets an MPO of {cores} cores, "
            f"i.e. {cores - 1} bonds; give one int, or one int per bond (use rank_pattern for layers of "
            "different sizes)"
        )
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in cap):
        raise ValueError(f"max_rank entries must be ints >= 1, got {list(cap)} for layer {name!r}")


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
