"""Global rank allocation: choose every layer's bond ranks under one parameter budget.

The allocator (:func:`allocate_ranks`) works on one :class:`ErrorModel` per layer: the feasible
bond ranks of its cores, their parameter counts, and an estimated error for any ranks. The
data-free model is :class:`SpectralErrorModel`, built from a layer's exact bond spectra
(:func:`layer_spectrum`); a model from measured output errors or sensitivities (calibration
data) is another subclass of :class:`ErrorModel` and goes through the same allocator.
:func:`uniform_rank_for_budget` is the uniform-cap baseline.

With calibration data, :func:`allocate_by_output_error` spreads the budget by measured output
error instead: each layer is an :class:`SVDCurve` (its whitened-SVD error at every rank, from
:func:`mpolab.weighted.whitened_svd_curve`) plus the option of staying dense.

Example:
    >>> spectra = {name: layer_spectrum(w, TruncationOptions(num_cores=5)) for name, w in weights.items()}
    >>> ranks = allocate_ranks(spectra, budget=1_000_000)
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .decompose import decompose
from .options import TruncationOptions
from .shapes import plan_factors, prime_factors
from .truncation import bond_caps, feasible_ranks, full_bond_dims, num_params_for_ranks, squared_norm

__all__ = [
    "ErrorModel",
    "SVDCurve",
    "SpectralErrorModel",
    "Spectrum",
    "allocate_by_output_error",
    "allocate_ranks",
    "cores_for",
    "layer_spectrum",
    "uniform_rank_for_budget",
]


@dataclass
class Spectrum:
    """One layer's exact bond spectra: what the data-free allocation needs.

    Attributes:
        core_sizes: ``i_k·j_k`` per core.
        singular_values: per bond, every singular value (descending).
        norm_sq: ``‖W‖²``.
        caps: largest rank per bond.
    """

    core_sizes: list[int]
    singular_values: list[torch.Tensor]
    norm_sq: float
    caps: list[int]


class ErrorModel(ABC):
    """One layer's search space for :func:`allocate_ranks`: feasible bond ranks, their parameters and error.

    Subclasses give :meth:`error`, the estimated squared relative error of the layer at given
    bond ranks. :class:`SpectralErrorModel` estimates it from exact bond spectra without data; a
    model built from measured output errors (calibration data, sensitivities) plugs in the same way.

    Args:
        core_sizes: ``i_k·j_k`` per core (``n`` entries).
        caps: largest rank per bond (``n - 1`` entries); made feasible for the cores.
        name: the layer's name, for error messages.
    """

    def __init__(self, core_sizes: Sequence[int], caps: Sequence[int], name: str = "?") -> None:
        sizes, caps = list(core_sizes), list(caps)
        if len(caps) != len(sizes) - 1:
            raise ValueError(
                f"layer {name!r}: {len(sizes)} cores need {len(sizes) - 1} bond caps, got {len(caps)}: {caps}"
            )
        self.name = name
        self.sizes = sizes
        self.bonds = len(caps)
        self.caps = feasible_ranks(sizes, [max(1, int(c)) for c in caps])

    @abstractmethod
    def error(self, ranks: Sequence[int]) -> float:
        """Estimated squared relative error of the layer with these bond ranks."""

    def params(self, ranks: Sequence[int]) -> int:
        return num_params_for_ranks(self.sizes, ranks)

    def lowered(self, ranks: list[int], k: int) -> list[int]:
        """``ranks`` with bond ``k`` one lower and the neighbours it forces down."""
        return feasible_ranks(self.sizes, ranks[:k] + [ranks[k] - 1] + ranks[k + 1 :])

    def can_raise(self, ranks: Sequence[int], k: int) -> bool:
        """Whether bond ``k`` can hold one more rank without passing its cap or its neighbours' limit."""
        r = ranks[k] + 1
        left = ranks[k - 1] if k else 1
        right = ranks[k + 1] if k + 1 < self.bonds else 1
        return r <= self.caps[k] and r <= left * self.sizes[k] and r <= right * self.sizes[k + 1]


class SpectralErrorModel(ErrorModel):
    """The data-free :class:`ErrorModel`: error estimated from a layer's exact bond spectra.

    With ``t_k = Σ_{i>=r_k} σ_{k,i}² / ‖W‖²`` the discarded tail at bond ``k``, the squared
    relative error is estimated as ``1 - Π_k (1 - t_k)``: between the largest tail (a lower
    bound) and their sum (the TT-SVD upper bound), and close to the truth both for small errors
    and for heavily truncated, flat spectra.
    """

    def __init__(self, spectrum: Spectrum, name: str = "?") -> None:
        super().__init__(spectrum.core_sizes, spectrum.caps, name)
        if len(spectrum.singular_values) != self.bonds:
            raise ValueError(
                f"layer {name!r}: {len(self.sizes)} cores need {self.bonds} bond caps and spectra, "
                f"got {self.bonds} caps and {len(spectrum.singular_values)} spectra"
            )
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

    def error(self, ranks: Sequence[int]) -> float:
        """Estimated squared relative error ``1 - Π_k (1 - tail_k)`` of the discarded spectral tails."""
        kept = 1.0
        for t, r in zip(self.tails, ranks):
            kept *= 1.0 - min(t[r] if r < len(t) else 0.0, 1.0)
        return 1.0 - kept


def allocate_ranks(layers: Mapping[str, Spectrum | ErrorModel], budget: int) -> dict[str, list[int]]:
    """Feasible bond ranks for every layer so that the total parameter count fits ``budget``.

    Each layer is an :class:`ErrorModel` (a :class:`Spectrum` is turned into a
    :class:`SpectralErrorModel`): its estimated error for any bond ranks. The sum of the
    estimates over layers is minimised greedily. Ranks are always *feasible*
    (:func:`~mpolab.truncation.feasible_ranks`): lowering one bond may force its neighbours down
    too, and both the error and the parameters of such a move are those of the ranks an MPO can
    really hold, so the counted parameters are the ones spent.

    1. **Descent**: from the (feasible) caps, while the total exceeds ``budget``, lower the bond
       whose move adds the least error per parameter saved.
    2. **Fill**: then, while anything still fits, raise the bond whose move removes the most
       error per parameter added, so no budget that a single rank unit could use is left unspent.
    3. The result is compared with the best *uniform* cap (filled the same way) and the one with
       the smaller estimated error is returned, so the allocation is never worse than a uniform
       cap by the estimate it optimises.

    Args:
        layers: per layer, an :class:`ErrorModel`, or a :class:`Spectrum` (core sizes ``i_k·j_k``,
            exact singular values of every bond, ``‖W‖²`` and per-bond caps).
        budget: total parameters allowed over all layers.

    Returns:
        ``{name: ranks}`` with ``Σ num_params_for_ranks(...) <= budget``.

    Raises:
        TypeError: ``budget`` is not an int.
        ValueError: ``budget`` is below the size of rank-1 MPOs of all layers, or a layer's
            caps do not have one entry per bond.
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int number of parameters, got {type(budget).__name__}")
    models = {name: m if isinstance(m, ErrorModel) else SpectralErrorModel(m, name) for name, m in layers.items()}
    floor = sum(m.params([1] * m.bonds) for m in models.values())
    if budget < floor:
        raise ValueError(
            f"budget of {budget:,} parameters is below {floor:,}, the size of rank-1 MPOs of all "
            f"{len(models)} targets; raise ratio/max_params or target fewer layers"
        )
    greedy = _fill(_descend(models, budget), models, budget)
    candidates = [greedy]
    uniform = _uniform_ranks(models, budget)
    if uniform is not None:
        candidates.append(_fill(uniform, models, budget))
    return min(candidates, key=lambda ranks: sum(models[n].error(r) for n, r in ranks.items()))


def _descend(layers: Mapping[str, ErrorModel], budget: int) -> dict[str, list[int]]:
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


def _fill(ranks: Mapping[str, list[int]], layers: Mapping[str, ErrorModel], budget: int) -> dict[str, list[int]]:
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


def _uniform_ranks(layers: Mapping[str, ErrorModel], budget: int) -> dict[str, list[int]] | None:
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


def layer_spectrum(weight: torch.Tensor, options: TruncationOptions) -> Spectrum:
    """Exact bond spectra of ``weight: [out, in]`` (one exact TT-SVD in ``options``' layout) and its caps.

    Caps are the exact ranks, never above the dense layer's size, and at most ``options.max_rank``.
    """
    exact = decompose(weight, options=options.replace(max_rank=None, rel_tol=None, max_params=None, ratio=None))
    sizes = [i * j for i, j in zip(exact.out_factors, exact.in_factors)]
    # Never start above the dense layer's size: an MPO larger than its matrix saves nothing.
    caps = [min(a, b) for a, b in zip(exact.ranks, bond_caps(sizes, max_params=max(weight.numel(), 1)))]
    cap = options.max_rank
    if cap is not None:
        per_bond = [cap] * len(caps) if isinstance(cap, int) else list(cap)
        caps = [min(c, r) for c, r in zip(caps, per_bond)]
    assert exact.singular_values is not None
    norm_sq = squared_norm(weight)
    return Spectrum(sizes, exact.singular_values, norm_sq, caps)


def cores_for(shape: Sequence[int], num_cores: int) -> int:
    """``num_cores``, or fewer for matrices too small to split that far (a classifier head)."""
    available = len(prime_factors(int(shape[0]))) + len(prime_factors(int(shape[1])))
    return max(2, min(num_cores, available))


def uniform_rank_for_budget(model_weights: Mapping[str, torch.Tensor], budget: int, num_cores: int = 5) -> int:
    """The largest single bond cap whose MPOs of all ``model_weights`` fit ``budget`` (a baseline)."""
    sizes = []
    for w in model_weights.values():
        plan = plan_factors(int(w.shape[0]), int(w.shape[1]), cores_for(w.shape, num_cores))
        sizes.append([i * j for i, j in zip(plan.out_factors, plan.in_factors)])

    def params(cap: int) -> int:
        return sum(num_params_for_ranks(s, [min(cap, f) for f in full_bond_dims(s)]) for s in sizes)

    lo, hi = 1, max(max(full_bond_dims(s)) for s in sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if params(mid) <= budget else (lo, mid - 1)
    return lo


# ----------------------------------------------------------------------------- calibrated (output-error) allocation


@dataclass
class SVDCurve:
    """Calibrated error of a layer as a function of its whitened-SVD rank.

    ``tail[r]`` is the output energy ``‖(W - Ŵ_r) S‖²`` left at rank ``r`` (``r = 0 … max_rank``),
    ``energy`` is ``‖W S‖²``; a rank-``r`` SVD costs ``r · (out + in)`` parameters and the
    dense layer ``out · in``.
    """

    out_features: int
    in_features: int
    tail: torch.Tensor
    energy: float

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    @property
    def max_rank(self) -> int:
        """The largest rank that is still smaller than the dense layer."""
        return min(int(self.tail.numel()) - 1, (self.dense_params - 1) // (self.out_features + self.in_features))


def allocate_by_output_error(
    curves: Mapping[str, SVDCurve],
    budget: int,
    *,
    weights: Mapping[str, float] | None = None,
    allow_dense: bool = True,
) -> dict[str, int]:
    """Parameters per layer minimising ``Σ_l w_l · tail_l / energy_l`` within ``budget``.

    Each layer's options are the whitened-SVD ranks ``1 … max_rank`` and (``allow_dense``) its
    dense weight at error 0. A Lagrange multiplier ``λ`` is bisected: each layer picks the option
    minimising ``w·err + λ·params``, and the smallest ``λ`` whose choices fit is kept; the
    leftover is then spent greedily on the best error drop per parameter. ``w_l`` defaults to
    1 (relative output errors count equally).

    Returns:
        ``{name: params}``: a layer's parameter count is ``out·in`` when it stays dense.

    Raises:
        ValueError: the budget is below rank 1 everywhere.
    """
    weights = dict(weights or {})
    names = list(curves)
    minimum = sum(curves[n].params(1) for n in names)
    if budget < minimum:
        raise ValueError(f"budget {budget} is below the {minimum} parameters of rank 1 in every layer")
    params: dict[str, torch.Tensor] = {}
    errors: dict[str, torch.Tensor] = {}
    for n in names:
        c = curves[n]
        ranks = torch.arange(1, c.max_rank + 1)
        p = ranks * (c.out_features + c.in_features)
        e = c.tail[1 : c.max_rank + 1] * (weights.get(n, 1.0) / max(c.energy, 1e-300))
        if allow_dense:
            p = torch.cat([p, torch.tensor([c.dense_params])])
            e = torch.cat([e, torch.zeros(1, dtype=e.dtype)])
        params[n], errors[n] = p.double(), e.double()

    def pick(lam: float) -> dict[str, int]:
        return {n: int(torch.argmin(errors[n] + lam * params[n])) for n in names}

    def cost(choice: Mapping[str, int]) -> int:
        return int(sum(int(params[n][i]) for n, i in choice.items()))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cost(pick(mid)) <= budget else (mid, hi)
    choice = pick(hi)
    spent = cost(choice)
    while True:  # spend what is left, one step at a time, best error drop per parameter first
        best_gain, best_name = 0.0, None
        for n, i in choice.items():
            if i + 1 < params[n].numel():
                extra = int(params[n][i + 1] - params[n][i])
                if extra <= budget - spent:
                    gain = float(errors[n][i] - errors[n][i + 1]) / max(extra, 1)
                    if gain > best_gain:
                        best_gain, best_name = gain, n
        if best_name is None:
            break
        i = choice[best_name]
        spent += int(params[best_name][i + 1] - params[best_name][i])
        choice[best_name] = i + 1
    return {n: int(params[n][i]) for n, i in choice.items()}
