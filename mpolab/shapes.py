"""Choosing how a matrix is folded into an MPO.

An MPO with ``n`` cores splits a matrix ``W: [I, J]`` (``[out, in]``, as ``nn.Linear`` stores it)
into factors ``I = i1·…·in`` and ``J = j1·…·jn``. This module picks those factors:

* :func:`factorize` splits one size into ``n`` balanced factors with the largest in the middle,
  the layout the MPOP authors used (``3072 -> 4·4·8·6·4``, ``768 -> 3·4·4·4·4``), so the central
  core holds most of the parameters.
* :func:`padded_size` finds the smallest size ``>= n`` that factorises well, for sizes with a large
  prime factor (``30522 = 2·3·5087``, ``50257``, ``1009``); the matrix is zero-padded to it and
  sliced back exactly on the way out.
* :func:`plan_factors` does both for a whole matrix and validates explicit factor lists.

Examples:
    >>> factorize(3072, 5)
    (4, 4, 8, 6, 4)
    >>> plan_factors(3072, 768, 5)
    FactorPlan(out_factors=(4, 4, 8, 6, 4), in_factors=(3, 4, 4, 4, 4), out_features=3072, in_features=768)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .utils import check_positive_int

__all__ = ["FactorPlan", "factorize", "padded_size", "plan_factors", "prime_factors"]

#: A factorisation counts as balanced when its largest factor is at most this many times the
#: ideal ``n ** (1 / k)``. 3072 into 5 gives 8 / 4.98 = 1.61; 30522 = 2·3·5087 gives 5087 / 7.9.
MAX_IMBALANCE = 2.0
#: Padding never grows a dimension by more than this fraction.
MAX_PAD_FRACTION = 0.25


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` with multiplicity, ascending. ``prime_factors(3072) == [2]*10 + [3]``."""
    check_positive_int(n, "n")
    out: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize(n: int, num_factors: int) -> tuple[int, ...]:
    """Split ``n`` into ``num_factors`` factors, balanced, with the largest in the middle.

    Primes are dealt largest-first onto the currently smallest factor (greedy multiway
    partition of ``log n``), then the factors are laid out from the middle outwards, larger
    ones nearer the centre. Sizes with fewer prime factors than ``num_factors`` get factors of 1
    at the ends. The product is always exactly ``n``; use :func:`padded_size` first if ``n`` has
    a large prime factor.

    Examples:
        >>> factorize(768, 5), factorize(4096, 5), factorize(7, 2)
        ((3, 4, 4, 4, 4), (4, 4, 8, 8, 4), (1, 7))
    """
    check_positive_int(n, "n")
    check_positive_int(num_factors, "num_factors")
    bins = [1] * num_factors
    for p in sorted(prime_factors(n), reverse=True):
        smallest = min(range(num_factors), key=lambda b: bins[b])
        bins[smallest] *= p
    return _centre_out(sorted(bins, reverse=True))


def _centre_out(descending: list[int]) -> tuple[int, ...]:
    """Lay out descending values from the middle: centre, right, left, right, left, …"""
    k = len(descending)
    slots: list[int | None] = [None] * k
    centre = k // 2
    order = [centre]
    for step in range(1, k):
        offset = (step + 1) // 2
        order.append(centre + offset if step % 2 else centre - offset)
    for value, slot in zip(descending, (s for s in order if 0 <= s < k)):
        slots[slot] = value
    # For even k the walk runs off the right end once; fill what is left, largest first.
    rest = iter(descending[len([s for s in order if 0 <= s < k]) :])
    return tuple(v if v is not None else next(rest) for v in slots)


def imbalance(n: int, num_factors: int) -> float:
    """Largest factor of :func:`factorize` divided by the ideal ``n ** (1/num_factors)``."""
    return max(factorize(n, num_factors)) / n ** (1.0 / num_factors)


def padded_size(n: int, num_factors: int) -> int:
    """Smallest size ``m >= n`` that splits into ``num_factors`` balanced factors.

    Returns ``n`` itself when it already factorises within :data:`MAX_IMBALANCE`. Searches up
    to ``n · (1 + MAX_PAD_FRACTION)`` and returns the best-balanced size found there otherwise.

    Examples:
        >>> padded_size(3072, 5), padded_size(30522, 5), padded_size(1009, 5)
        (3072, 30576, 1024)
    """
    check_positive_int(n, "n")
    check_positive_int(num_factors, "num_factors")
    if n < 2**num_factors or imbalance(n, num_factors) <= MAX_IMBALANCE:
        return n
    best, best_score = n, imbalance(n, num_factors)
    for m in range(n + 1, int(n * (1 + MAX_PAD_FRACTION)) + 1):
        score = imbalance(m, num_factors)
        if score <= MAX_IMBALANCE:
            return m
        if score < best_score:
            best, best_score = m, score
    return best


@dataclass(frozen=True)
class FactorPlan:
    """How a matrix ``[out_features, in_features]`` is folded into ``len(out_factors)`` cores.

    ``prod(out_factors) >= out_features`` and ``prod(in_factors) >= in_features``; where they are
    larger the matrix is zero-padded to ``padded_shape`` and sliced back on the way out.
    """

    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]
    out_features: int
    in_features: int

    @property
    def num_cores(self) -> int:
        return len(self.out_factors)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return math.prod(self.out_factors), math.prod(self.in_factors)

    @property
    def is_padded(self) -> bool:
        return self.padded_shape != (self.out_features, self.in_features)


def plan_factors(
    out_features: int,
    in_features: int,
    num_cores: int | None = None,
    *,
    out_factors: Sequence[int] | None = None,
    in_factors: Sequence[int] | None = None,
    pad: bool | None = None,
) -> FactorPlan:
    """Choose (or check) the factors of a ``[out_features, in_features]`` matrix.

    Args:
        out_features, in_features: the matrix shape ``[I, J]``.
        num_cores: number of cores ``n >= 2``; defaults to the length of a given factor list,
            else 5 (the MPOP authors' choice).
        out_factors, in_factors: explicit factor lists; the other side is chosen automatically.
        pad: ``None`` (default) pads automatically chosen factors when a size factorises badly
            and requires explicit factors to multiply to the size exactly; ``True`` also accepts
            explicit factors whose product exceeds the size (zero padding, as the MPOP authors
            did for T5's 32128-word vocabulary with ``8^5``); ``False`` never pads.

    Raises:
        ValueError: factor lists of different lengths, a product that does not match (with a
            hint when the matrix looks transposed), or more cores than the sizes allow.

    Examples:
        >>> plan_factors(30522, 384, 5).padded_shape
        (30576, 384)
    """
    check_positive_int(out_features, "out_features")
    check_positive_int(in_features, "in_features")
    given = [f for f in (out_factors, in_factors) if f is not None]
    if num_cores is None:
        num_cores = len(given[0]) if given else 5
    if isinstance(num_cores, bool) or not isinstance(num_cores, int):
        raise TypeError(f"num_cores must be an int, got {type(num_cores).__name__}")
    if num_cores < 2:
        raise ValueError(f"num_cores must be >= 2 (an MPO of one core is the matrix itself), got {num_cores}")
    for name, f in (("out_factors", out_factors), ("in_factors", in_factors)):
        if f is not None:
            _check_factor_list(f, name)
            if len(f) != num_cores:
                raise ValueError(
                    f"{name} has {len(f)} entries but num_cores={num_cores}; "
                    "out_factors and in_factors need one entry per core"
                )
    if out_factors is not None and in_factors is not None:
        _check_not_transposed(out_features, in_features, out_factors, in_factors)

    outs = _side(out_features, num_cores, out_factors, pad, "out", in_features, in_factors)
    ins = _side(in_features, num_cores, in_factors, pad, "in", out_features, out_factors)
    if in_factors is None and _single_entry_cores(outs, ins) and not _single_entry_cores(outs, ins[::-1]):
        ins = ins[::-1]  # sizes with few prime factors: put the 1s where the other side has factors
    if _single_entry_cores(outs, ins):
        if in_factors is None:
            ins = _spread_over_single_entry_cores(outs, ins)
        elif out_factors is None:
            outs = _spread_over_single_entry_cores(ins, outs)
    bad = _single_entry_cores(outs, ins)
    if bad and _max_cores(out_features, in_features) < 2:
        raise ValueError(
            f"a [{out_features}, {in_features}] matrix cannot be an MPO: its sizes have fewer than two "
            "prime factors in total, so every split has a core of a single entry; keep this layer dense"
        )
    if bad:
        raise ValueError(
            f"num_cores={num_cores} is too many for a [{out_features}, {in_features}] matrix: "
            f"core(s) {bad} would have a single entry (out_factors={outs}, in_factors={ins}); "
            f"use num_cores <= {_max_cores(out_features, in_features)} or give the factors explicitly"
        )
    return FactorPlan(tuple(outs), tuple(ins), out_features, in_features)


def _spread_over_single_entry_cores(fixed: Sequence[int], free: Sequence[int]) -> tuple[int, ...]:
    """Reorder ``free`` so no core is ``1 x 1``: move its real factors from cores that ``fixed`` fills anyway."""
    out = list(free)
    for k in range(len(out)):
        if fixed[k] * out[k] >= 2:
            continue
        donor = next((j for j in range(len(out)) if out[j] > 1 and fixed[j] > 1), None)
        if donor is None:
            break
        out[k], out[donor] = out[donor], out[k]
    return tuple(out)


def _single_entry_cores(outs: Sequence[int], ins: Sequence[int]) -> list[int]:
    return [k for k, (i, j) in enumerate(zip(outs, ins)) if i * j < 2]


def _side(
    size: int,
    num_cores: int,
    factors: Sequence[int] | None,
    pad: bool | None,
    side: str,
    other_size: int,
    other_factors: Sequence[int] | None,
) -> tuple[int, ...]:
    if factors is None:
        target = size if pad is False else padded_size(size, num_cores)
        return factorize(target, num_cores)
    product = math.prod(factors)
    if product == size or (pad and product > size):
        return tuple(int(f) for f in factors)
    hint = ""
    if other_factors is None and product == other_size:
        hint = (
            f" (it equals the {'in' if side == 'out' else 'out'} size: is the matrix transposed? W must be [out, in])"
        )
    elif product > size:
        hint = "; pass pad=True to zero-pad to that size"
    raise ValueError(
        f"{side}_factors={list(factors)} multiply to {product}, but the matrix has {size} {side} features{hint}"
    )


def _check_not_transposed(
    out_features: int, in_features: int, out_factors: Sequence[int], in_factors: Sequence[int]
) -> None:
    po, pi = math.prod(out_factors), math.prod(in_factors)
    if (po, pi) == (in_features, out_features) and po != pi:
        raise ValueError(
            f"out_factors multiply to {po} and in_factors to {pi}, but W has shape "
            f"[{out_features}, {in_features}]: the matrix looks transposed. W must be [out, in] "
            "as nn.Linear.weight stores it (for a [in, out] weight such as GPT-2's Conv1D, pass W.T)"
        )


def _max_cores(out_features: int, in_features: int) -> int:
    return max(1, len(prime_factors(out_features)) + len(prime_factors(in_features)))


def _check_factor_list(factors: Sequence[int], name: str) -> None:
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(factors).__name__}")
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"{name} must contain positive ints, got {list(factors)}")
