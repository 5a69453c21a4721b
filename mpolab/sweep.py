"""The sweeps behind TT-SVD and TT rounding, shared by :mod:`mpolab.decompose` and :mod:`mpolab.mpo`.

Cores are ``[r_{k-1}, i_k, j_k, r_k]``. :func:`sweep` runs one left-to-right pass of truncated
low-rank splits (:func:`mpolab.truncation.low_rank_split`) and leaves the result in mixed-canonical
form around a chosen core; :func:`left_orthonormalize` / :func:`right_orthonormalize` are the QR
steps of a gauge change, with :func:`sign_fix` making them unique. :func:`work_dtype` and
:func:`backend_for` pick the precision and SVD back end for an ``svd=`` option.

Internal to mpolab: public names so that ``decompose`` and ``mpo`` share them without importing
each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .truncation import SVD_BACKENDS, choose_backend, low_rank_split

__all__ = [
    "backend_for",
    "left_orthonormalize",
    "right_orthonormalize",
    "scale_pow2",
    "sign_fix",
    "sweep",
    "work_dtype",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision cores (decompositions and QR run in float32 at least)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def backend_for(svd: str, dtype: torch.dtype, rel_tol: float | None, num_cores: int) -> tuple[str, torch.dtype]:
    """Back end and compute dtype for an ``svd=`` argument."""
    per_bond = None if rel_tol is None else rel_tol / math.sqrt(max(num_cores - 1, 1))
    if svd == "auto":
        return choose_backend(dtype, per_bond)
    if svd in ("gram", "svd", "randomized"):
        return svd, dtype
    raise ValueError(f"svd must be one of {', '.join(map(repr, SVD_BACKENDS))}, got {svd!r}")


def scale_pow2(A: torch.Tensor, k: int) -> torch.Tensor:
    """``A · 2^k``, exact while no entry leaves the normal range (in two steps: ``2^k`` alone may overflow)."""
    if k == 0:
        return A
    half = k // 2
    return A * math.ldexp(1.0, half) * math.ldexp(1.0, k - half)


def sign_fix(Q: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip signs of ``Q: [m, r]``'s columns and ``R: [r, n]``'s rows so ``diag(R) >= 0``; ``Q @ R`` is unchanged."""
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs, R * signs[:, None]


def left_orthonormalize(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``core = Q ×₃ R`` with Q left-orthonormal; returns ``(Q [r, i, j, r'], R [r', r_right])``."""
    r0, i, j, r1 = core.shape
    Q, R = sign_fix(*torch.linalg.qr(core.reshape(r0 * i * j, r1)))
    return Q.reshape(r0, i, j, -1), R


def right_orthonormalize(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``core = L ×₀ Q`` with Q right-orthonormal; returns ``(L [r_left, r'], Q [r', i, j, r])``."""
    r0, i, j, r1 = core.shape
    Q, R = sign_fix(*torch.linalg.qr(core.reshape(r0, i * j * r1).mT))
    return R.mT, Q.mT.reshape(-1, i, j, r1)


def sweep(
    *,
    first: torch.Tensor,
    rest: Sequence[torch.Tensor] | Sequence[tuple[int, int]],
    caps: Sequence[int],
    budget_sq: float | None,
    backend: str,
    compute_dtype: torch.dtype,
    center: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Left-to-right truncated sweep shared by :func:`mpolab.decompose` (TT-SVD) and :meth:`MPO.truncate` (TT rounding).

    Args:
        first: ``[1, i_1, j_1, rest…]``: the first core together with everything to its right
            when ``rest`` gives only factor pairs (TT-SVD of a dense tensor); or the first core
            of a right-canonical MPO when ``rest`` holds the other cores (TT rounding).
        rest: the remaining cores ``[r, i, j, r']``, or the remaining ``(i, j)`` factor pairs.
        caps: one rank cap per bond.
        budget_sq: discarded energy allowed in total, or ``None``. Each bond may use an equal
            share of what the bonds before it left unused, so the total is never exceeded.
        center: the result is mixed-canonical around this core.

    Returns:
        ``(cores, singular values per bond, total discarded energy)``.
    """
    dense = bool(rest) and not isinstance(rest[0], torch.Tensor)
    splits = []
    shapes = []  # (r_left, i, j) per core
    discarded = 0.0
    r_left, i, j = 1, int(first.shape[1]), int(first.shape[2])
    carry = first.to(compute_dtype)  # [r_left, i, j, rest...]
    for k, cap in enumerate(caps):
        step_budget = None if budget_sq is None else max(budget_sq - discarded, 0.0) / (len(caps) - k)
        split = low_rank_split(carry.reshape(r_left * i * j, -1), cap, step_budget, backend)
        splits.append(split)
        shapes.append((r_left, i, j))
        discarded += split.discarded_sq
        r_left = split.rank
        if dense:
            i, j = rest[k]
            carry = split.right.reshape(r_left, i, j, -1)
        else:
            nxt = rest[k].to(compute_dtype)  # type: ignore[union-attr]
            i, j = int(nxt.shape[1]), int(nxt.shape[2])
            a, _, _, b = nxt.shape
            carry = (split.right @ nxt.reshape(a, -1)).reshape(r_left, i, j, b)
    cores: list[torch.Tensor] = [torch.empty(0)] * len(splits) + [carry.reshape(r_left, i, j, 1)]
    # The sweep leaves the norm in the last core; move it to `center`, folding each carry into
    # the (possibly lazy) left factor before that factor is ever formed.
    for k in range(len(cores) - 1, center, -1):
        carry_k, cores[k] = right_orthonormalize(cores[k])
        cores[k - 1] = splits[k - 1].left_times(carry_k).reshape(*shapes[k - 1], -1)
    for k in range(min(center, len(splits))):
        cores[k] = splits[k].left.reshape(*shapes[k], -1)
    return cores, [s.singular_values for s in splits], discarded
