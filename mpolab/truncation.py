"""Truncation control: bond caps, error budgets and the low-rank split behind every TT-SVD step.

One step of a TT-SVD sweep factorises an unfolding ``C: [m, n]`` as ``C ≈ U @ R`` with ``U: [m, r]``
having orthonormal columns, so the discarded energy ``‖C‖² - ‖R‖²`` is exactly the squared
Frobenius error of the step. :func:`low_rank_split` does that with one of three back ends:

``"gram"``
    eigen-decomposition of the smaller Gram matrix (``C Cᵀ`` or ``Cᵀ C``). One GEMM and one small
    ``eigh``: an order of magnitude faster than a full SVD on the short-fat unfoldings of an MPO
    sweep. It squares the condition number, so :func:`choose_backend` computes it in float64
    when the tolerance asks for precision that float32 Gram matrices cannot give.
``"svd"``
    ``torch.linalg.svd``: exact to working precision, the fallback for very tight tolerances.
``"randomized"``
    ``torch.svd_lowrank`` with a known rank cap: for huge unfoldings with small caps. Never chosen
    automatically, because its subspace is only approximately optimal.

Rank choice (:func:`choose_rank`): the smallest ``r`` whose discarded tail fits the step's error
budget, never above the step's cap, never below 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "SVDBackend",
    "Split",
    "SVD_BACKENDS",
    "bond_caps",
    "check_max_rank",
    "check_rel_tol",
    "choose_backend",
    "choose_rank",
    "feasible_ranks",
    "full_bond_dims",
    "low_rank_split",
    "num_params_for_ranks",
    "squared_norm",
]

SVDBackend = Literal["auto", "gram", "svd", "randomized"]
SVD_BACKENDS: tuple[str, ...] = ("auto", "gram", "svd", "randomized")


def squared_norm(A: torch.Tensor) -> float:
    """``‖A‖²`` accurate to float64 without a float64 copy of ``A``.

    A single float32 reduction over millions of entries drifts by ~1e-3; summing float32 norms
    of 4096-entry chunks in float64 stays at ~1e-7.
    """
    flat = A.reshape(-1)
    whole = flat.numel() - flat.numel() % 4096
    chunks = torch.linalg.vector_norm(flat[:whole].view(-1, 4096), dim=1).double().square().sum()
    tail = torch.linalg.vector_norm(flat[whole:].double()).square()
    return float(chunks + tail)


def full_bond_dims(core_sizes: Sequence[int]) -> list[int]:
    """Exact bond dimensions ``r_k = min(Π_{m<=k} s_m, Π_{m>k} s_m)`` for cores of ``s_k = i_k·j_k`` entries.

    Examples:
        >>> full_bond_dims([12, 16, 32, 24, 16])   # 3072x768 in 5 cores
        [12, 192, 384, 16]
    """
    total = math.prod(core_sizes)
    dims, left = [], 1
    for s in core_sizes[:-1]:
        left *= s
        dims.append(min(left, total // left))
    return dims


def feasible_ranks(core_sizes: Sequence[int], ranks: Sequence[int]) -> list[int]:
    """The largest bond ranks ``<= ranks`` that an MPO with cores of ``core_sizes`` entries can hold.

    Bond ``k`` sits between cores ``k`` and ``k + 1`` (``s_k = i_k·j_k`` entries each), so its rank
    is at most ``r_{k-1}·s_k`` and at most ``r_{k+1}·s_{k+1}`` (``r_{-1} = r_n = 1``). A TT-SVD
    sweep silently clips a larger rank on the left side and stores a redundant one on the right,
    so parameters counted for infeasible ranks are never used.

    Examples:
        >>> feasible_ranks([16, 16, 16, 16, 64], [8, 1, 108, 8])
        [8, 1, 16, 8]
    """
    if len(ranks) != len(core_sizes) - 1:
        raise ValueError(f"{len(core_sizes)} cores have {len(core_sizes) - 1} bonds, got {len(ranks)} ranks: {ranks}")
    r = [int(x) for x in ranks]
    for k in range(len(r)):  # left to right: r_k <= r_{k-1} s_k
        r[k] = min(r[k], (r[k - 1] if k else 1) * core_sizes[k])
    for k in range(len(r) - 1, -1, -1):  # right to left: r_k <= r_{k+1} s_{k+1}
        r[k] = min(r[k], (r[k + 1] if k + 1 < len(r) else 1) * core_sizes[k + 1])
    return r


def num_params_for_ranks(core_sizes: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of an MPO whose cores hold ``core_sizes`` entries and whose bonds are ``ranks``."""
    bonds = [1, *ranks, 1]
    return sum(bonds[k] * s * bonds[k + 1] for k, s in enumerate(core_sizes))


def bond_caps(
    core_sizes: Sequence[int],
    *,
    max_rank: int | Sequence[int] | None = None,
    max_params: int | None = None,
) -> list[int]:
    """Per-bond rank caps from ``max_rank`` and a parameter budget, clipped to the exact bond dims.

    ``max_params`` picks the largest uniform cap whose MPO fits, then raises single bonds (central
    bonds first) while the budget still allows, so the result is a maximal MPO within the budget:
    no bond can grow by one without breaking it.

    Raises:
        ValueError: a cap below 1, a per-bond list of the wrong length, or a budget too small
            for rank 1 everywhere.
    """
    full = full_bond_dims(core_sizes)
    caps = list(full)
    max_rank = check_max_rank(max_rank)
    if max_rank is not None:
        per_bond = [max_rank] * len(full) if isinstance(max_rank, int) else list(max_rank)
        if len(per_bond) != len(full):
            raise ValueError(
                f"max_rank has {len(per_bond)} entries but the MPO has {len(full)} bonds "
                f"(one fewer than its {len(core_sizes)} cores)"
            )
        caps = [min(c, r) for c, r in zip(caps, per_bond)]
    if max_params is not None:
        if isinstance(max_params, bool) or not isinstance(max_params, int):
            raise TypeError(f"max_params must be an int, got {type(max_params).__name__}")
        smallest = num_params_for_ranks(core_sizes, [1] * len(full))
        if max_params < smallest:
            raise ValueError(
                f"max_params={max_params} is below the {smallest} parameters of a rank-1 MPO "
                f"with cores of {list(core_sizes)} entries; raise the budget or use fewer cores"
            )
        caps = _fill_budget(core_sizes, caps, max_params)
    return caps


def _fill_budget(core_sizes: Sequence[int], caps: list[int], budget: int) -> list[int]:
    def fits(ranks: Sequence[int]) -> bool:
        return num_params_for_ranks(core_sizes, ranks) <= budget

    lo, hi = 1, max(caps)
    while lo < hi:  # largest uniform cap that fits
        mid = (lo + hi + 1) // 2
        if fits([min(c, mid) for c in caps]):
            lo = mid
        else:
            hi = mid - 1
    ranks = [min(c, lo) for c in caps]
    grown = True
    while grown:  # then grow single bonds, central ones first, while the budget allows
        grown = False
        for k in sorted(range(len(ranks)), key=lambda b: abs(b - (len(ranks) - 1) / 2)):
            if ranks[k] < caps[k] and fits(ranks[:k] + [ranks[k] + 1] + ranks[k + 1 :]):
                ranks[k] += 1
                grown = True
    return ranks


def check_max_rank(max_rank: object) -> int | tuple[int, ...] | None:
    """``max_rank`` as ``None``, an int >= 1, or a tuple of ints >= 1 (one per bond).

    Raises:
        TypeError: neither an int nor a sequence of ints (a float, a string, a bool).
        ValueError: an entry below 1 or not an int.
    """
    if max_rank is None:
        return None
    if isinstance(max_rank, (bool, str, bytes)) or not isinstance(max_rank, (int, Sequence)):
        raise TypeError(f"max_rank must be an int or a sequence of ints, got {max_rank!r} ({type(max_rank).__name__})")
    per_bond = [max_rank] if isinstance(max_rank, int) else list(max_rank)
    if not per_bond or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in per_bond):
        raise ValueError(f"max_rank must be >= 1 (int or one int per bond), got {max_rank!r}")
    return max_rank if isinstance(max_rank, int) else tuple(per_bond)


def check_rel_tol(rel_tol: object) -> None:
    """``rel_tol`` must be a float in (0, 1) or ``None``."""
    if rel_tol is None:
        return
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)):
        raise TypeError(f"rel_tol must be a float, got {type(rel_tol).__name__}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1) (relative Frobenius error), got {rel_tol}")


def choose_rank(sq_values: torch.Tensor, cap: int, tail_budget_sq: float | None, total_sq: float | None = None) -> int:
    """Smallest rank whose discarded energy fits ``tail_budget_sq``, at most ``cap``, at least 1.

    Args:
        sq_values: squared singular values, descending (float64 preferred).
        cap: largest allowed rank.
        tail_budget_sq: allowed discarded energy ``Σ_{i>=r} σ_i²``; ``None`` keeps ``cap``.
        total_sq: ``‖C‖²`` when ``sq_values`` holds only the leading values (randomized SVD).
    """
    cap = max(1, min(cap, sq_values.numel()))
    if tail_budget_sq is None:
        return cap
    kept = torch.cumsum(sq_values.double(), 0)
    total = float(kept[-1]) if total_sq is None else total_sq
    tails = (total - kept).clamp_min(0)  # tails[r-1] = energy discarded when keeping r values
    ok = torch.nonzero(tails <= tail_budget_sq)
    r = int(ok[0]) + 1 if ok.numel() else sq_values.numel()
    return max(1, min(r, cap))


@dataclass
class Split:
    """Result of one truncated step: ``C ≈ left @ right``.

    Attributes:
        left: ``[m, r]`` with orthonormal columns (see :meth:`left_times` for the lazy form).
        right: ``[r, n]``.
        singular_values: every singular value the back end computed, descending (float64, CPU).
        discarded_sq: squared Frobenius error of this step, ``‖C - left @ right‖²``.
    """

    right: torch.Tensor
    singular_values: torch.Tensor
    discarded_sq: float
    _left: torch.Tensor | None = None
    _source: torch.Tensor | None = None  # left = _source @ _coeffs, kept apart until needed
    _coeffs: torch.Tensor | None = None

    @property
    def left(self) -> torch.Tensor:
        return self.left_times(None)

    @property
    def rank(self) -> int:
        return int(self.right.shape[0])

    def left_times(self, carry: torch.Tensor | None) -> torch.Tensor:
        """``left @ carry`` (``carry: [r, r']``), multiplying the small factors first when ``left`` is lazy."""
        if self._left is not None:
            return self._left if carry is None else self._left @ carry
        assert self._source is not None and self._coeffs is not None
        coeffs = self._coeffs if carry is None else self._coeffs @ carry
        return self._source @ coeffs


def choose_backend(dtype: torch.dtype, per_bond_rel_tol: float | None) -> tuple[str, torch.dtype]:
    """Back end and compute dtype for ``svd="auto"``.

    Eigenvalues of a Gram matrix carry an absolute error of about ``eps·σ₁²``, so the Gram route
    resolves a per-bond relative tolerance ``τ`` only while ``τ² ≫ eps``: float32 Gram for
    ``τ >= 0.02``, float64 Gram down to ``τ >= 1e-5``, a real SVD below.
    """
    if per_bond_rel_tol is None:
        return "gram", dtype
    if per_bond_rel_tol < 1e-5:
        return "svd", torch.float64
    if per_bond_rel_tol < 0.02 or dtype == torch.float64:
        return "gram", torch.float64
    return "gram", dtype


def low_rank_split(
    C: torch.Tensor,
    cap: int,
    tail_budget_sq: float | None = None,
    backend: str = "gram",
) -> Split:
    """Factorise ``C: [m, n]`` as ``left [m, r] @ right [r, n]`` with orthonormal ``left``.

    Computation happens in ``C``'s dtype and device; callers upcast when they need precision.
    ``r`` is :func:`choose_rank` of the spectrum with ``cap`` and ``tail_budget_sq``. The
    discarded energy is ``‖C‖² - Σ kept σ²`` for the Gram route (its leading eigenvalues are the
    accurate ones), the tail ``Σ discarded σ²`` for a real SVD, and exactly 0 when nothing is
    discarded.
    """
    if backend == "randomized":
        return _randomized_split(C, cap, tail_budget_sq)
    m, n = C.shape
    total_sq = squared_norm(C)
    if backend == "svd":
        U, S, Vh = torch.linalg.svd(C, full_matrices=False)
        sq = S.double() ** 2
        r = choose_rank(sq, cap, tail_budget_sq, total_sq)
        return Split(S[:r, None] * Vh[:r], S.double().cpu(), float(sq[r:].sum()), _left=U[:, :r])
    if backend != "gram":
        raise ValueError(f"svd backend must be one of {SVD_BACKENDS}, got {backend!r}")
    if m <= n:
        eigvals, U = torch.linalg.eigh(C @ C.mT)
        sq = eigvals.flip(0).clamp_min(0).double()
        r = choose_rank(sq, cap, tail_budget_sq, total_sq)
        left = U.flip(1)[:, :r]
        return Split(left.mT @ C, sq.sqrt().cpu(), _discarded(sq, r, total_sq), _left=left)
    eigvals, V = torch.linalg.eigh(C.mT @ C)
    sq = eigvals.flip(0).clamp_min(0).double()
    r = choose_rank(sq, cap, tail_budget_sq, total_sq)
    Vr = V.flip(1)[:, :r]
    spectrum, discarded = sq.sqrt().cpu(), _discarded(sq, r, total_sq)
    if _division_is_safe(sq[:r], C.dtype):
        # left = C Vr / σ, right = σ Vrᵀ: left @ right = C Vr Vrᵀ exactly. The [m, n] x [n, r]
        # product is left to the caller (Split.left_times), who may fold a carry into it first.
        sigma = sq[:r].sqrt().to(C.dtype)
        return Split(sigma[:, None] * Vr.mT, spectrum, discarded, _source=C, _coeffs=Vr / sigma)
    left = torch.linalg.qr(C @ Vr).Q
    return Split(left.mT @ C, spectrum, discarded, _left=left)


def _discarded(sq: torch.Tensor, r: int, total_sq: float) -> float:
    if r >= sq.numel():
        return 0.0
    return max(total_sq - float(sq[:r].sum()), 0.0)


def _division_is_safe(sq: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``C V_r / σ`` keeps orthonormal columns: it loses them like ``eps·κ²``."""
    smallest, largest = float(sq[-1]), float(sq[0])
    return smallest > 0 and torch.finfo(dtype).eps * largest / smallest <= 1e-4


def _randomized_split(C: torch.Tensor, cap: int, tail_budget_sq: float | None) -> Split:
    m, n = C.shape
    q = min(cap + 10, m, n)
    U, S, _ = torch.svd_lowrank(C, q=q, niter=2)
    total_sq = squared_norm(C)
    sq = S.double() ** 2
    r = choose_rank(sq, cap, tail_budget_sq, total_sq=total_sq)
    left = U[:, :r]
    right = left.mT @ C
    discarded = max(total_sq - squared_norm(right), 0.0)
    return Split(right, S.double().cpu(), discarded, _left=left)
