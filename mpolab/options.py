"""One validated value for every truncation option: :class:`TruncationOptions`.

:func:`mpolab.decompose`, :meth:`mpolab.MPOLinear.from_linear`,
:meth:`mpolab.MPOEmbedding.from_embedding`, :func:`mpolab.compress` and the command line all
describe "how to cut a matrix into an MPO" with the same keywords. They build one
:class:`TruncationOptions` (checked once, in ``__post_init__``) and pass it down explicitly.

Examples:
    >>> opts = TruncationOptions(max_rank=[8, 16, 16, 8], svd="gram")
    >>> opts.max_rank, opts.num_cores_resolved
    ((8, 16, 16, 8), 5)
    >>> opts.budget_for(3072 * 768) is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .truncation import SVD_BACKENDS, check_max_rank, check_rel_tol
from .utils import check_choice, check_positive_int

__all__ = ["TruncationOptions"]


@dataclass(frozen=True)
class TruncationOptions:
    """How to decompose a matrix: layout (cores, factors, padding), truncation limits and SVD back end.

    Every given limit is respected; limits combine (``max_rank`` with ``rel_tol``, a budget with
    ``max_rank``...). Lists are stored as tuples, so the value is hashable.

    Attributes:
        max_rank: bond cap, one int for all bonds or one per bond (``num_cores - 1`` entries).
        rel_tol: relative Frobenius error allowed for the whole matrix, in ``(0, 1)``.
        max_params: parameter budget of the MPO (an int >= 1).
        ratio: the same budget as a fraction (> 0, finite) of the dense parameter count.
        num_cores: number of cores (>= 2); ``None``: from the factor lists or a per-bond
            ``max_rank``, else 5.
        out_factors, in_factors: explicit factorisations of the two sizes.
        svd: ``"auto"``, ``"gram"``, ``"svd"`` or ``"randomized"`` (the last needs a rank cap).
        pad: see :func:`mpolab.shapes.plan_factors`.

    Raises:
        TypeError: a value of the wrong type (naming it and what is valid).
        ValueError: a value out of range; ``max_params`` together with ``ratio``; ``svd="randomized"``
            without a rank cap; a per-bond ``max_rank`` in tensorly's ``[1, r1, ..., 1]`` form.
    """

    max_rank: int | Sequence[int] | None = None
    rel_tol: float | None = None
    max_params: int | None = None
    ratio: float | None = None
    num_cores: int | None = None
    out_factors: Sequence[int] | None = None
    in_factors: Sequence[int] | None = None
    svd: str = "auto"
    pad: bool | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "max_rank", check_max_rank(self.max_rank))
        check_rel_tol(self.rel_tol)
        check_positive_int(self.max_params, "max_params", allow_none=True)
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio must be a float > 0 (fraction of the dense parameters), got {self.ratio!r}")
            if not (math.isfinite(self.ratio) and self.ratio > 0):
                raise ValueError(
                    f"ratio must be a finite number > 0 (fraction of the dense parameter count), got {self.ratio}"
                )
        if self.max_params is not None and self.ratio is not None:
            raise ValueError(
                f"give max_params or ratio, not both (got max_params={self.max_params}, ratio={self.ratio})"
            )
        if self.num_cores is not None:
            if isinstance(self.num_cores, bool) or not isinstance(self.num_cores, int):
                raise TypeError(f"num_cores must be an int >= 2, got {self.num_cores!r}")
            if self.num_cores < 2:
                raise ValueError(f"num_cores must be >= 2 (one core is the matrix itself), got {self.num_cores}")
        for name in ("out_factors", "in_factors"):
            set_(self, name, _as_factor_tuple(getattr(self, name), name))
        self._refuse_tensorly_ranks()
        check_choice(self.svd, "svd", SVD_BACKENDS)
        if self.svd == "randomized" and not self.has_rank_cap:
            raise ValueError("svd='randomized' needs a rank cap: pass max_rank, max_params or ratio")
        if self.pad is not None and not isinstance(self.pad, bool):
            raise TypeError(f"pad must be True, False or None, got {self.pad!r}")

    def _refuse_tensorly_ranks(self) -> None:
        """Refuse a per-bond ``max_rank`` in tensorly's ``[1, r1, ..., r_(n-1), 1]`` form (boundary bonds included).

        It is refused when the core count is not fixed otherwise (it would silently mean
        ``len + 1`` cores with rank-1 outer bonds) or when it has two entries more than the bonds
        of the given core count; with a core count that makes it exactly one cap per bond it is a
        valid (if unusual) list of caps.
        """
        r = self.max_rank
        if not (isinstance(r, tuple) and len(r) >= 3 and r[0] == r[-1] == 1 and any(x != 1 for x in r[1:-1])):
            return
        given = self.num_cores
        if given is None:
            factors = self.out_factors or self.in_factors
            given = len(factors) if factors is not None else None
        if given is None or len(r) == given + 1:
            raise ValueError(
                f"max_rank={list(r)} looks like tensorly's rank list [1, r1, ..., r_(n-1), 1], which includes "
                f"the two boundary bonds; mpolab takes only the inner bonds ({list(r[1:-1])}) or one int"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def has_rank_cap(self) -> bool:
        """Whether ``max_rank`` or a budget (``max_params`` / ``ratio``) limits the bonds."""
        return self.max_rank is not None or self.max_params is not None or self.ratio is not None

    @property
    def has_budget(self) -> bool:
        """Whether a parameter budget (``max_params`` or ``ratio``) is given."""
        return self.max_params is not None or self.ratio is not None

    @property
    def num_cores_resolved(self) -> int | None:
        """``num_cores``, or the core count a per-bond ``max_rank`` implies when nothing else fixes it.

        ``None`` leaves the choice to :func:`mpolab.shapes.plan_factors` (factor lists, else 5).
        """
        if self.num_cores is None and self.out_factors is None and self.in_factors is None:
            if isinstance(self.max_rank, tuple):
                return len(self.max_rank) + 1
        return self.num_cores

    def budget_for(self, dense_params: int) -> int | None:
        """The parameter budget for a matrix of ``dense_params`` entries (``None`` without one).

        Examples:
            >>> TruncationOptions(ratio=0.25).budget_for(1000)
            250
        """
        if self.ratio is None:
            return self.max_params
        return max(1, int(self.ratio * dense_params))

    def replace(self, **changes: Any) -> TruncationOptions:
        """A copy with ``changes`` applied (and validated again)."""
        return replace(self, **changes)

    def to_kwargs(self) -> dict[str, Any]:
        """The options that differ from the defaults, as keywords of :func:`mpolab.decompose`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    @classmethod
    def from_kwargs(cls, options: TruncationOptions | None = None, **kwargs: Any) -> TruncationOptions:
        """``options`` or options built from ``kwargs``; both given is a ``ValueError``.

        ``kwargs`` whose value is ``None`` count as not given (the defaults of :func:`mpolab.decompose`).
        """
        given = {k: v for k, v in kwargs.items() if v is not None and not (k == "svd" and v == "auto")}
        if options is None:
            unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(f"unknown truncation options {unknown}; valid are {[f.name for f in fields(cls)]}")
            return cls(**given)
        if not isinstance(options, TruncationOptions):
            raise TypeError(f"options must be a TruncationOptions, got {type(options).__name__}")
        if given:
            raise ValueError(f"give options= or keywords, not both (got options and {sorted(given)})")
        return options


def _as_factor_tuple(factors: object, name: str) -> tuple[int, ...] | None:
    if factors is None:
        return None
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a list of positive ints, got {factors!r}")
    if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"{name} must contain positive ints, got {list(factors)}")
    return tuple(factors)
