"""TT-SVD: decompose a matrix into an :class:`~mpolab.mpo.MPO` with real truncation control.

The matrix ``W: [I, J]`` is reshaped to ``(i1, j1, i2, j2, …)`` and split by a left-to-right
sweep. Each step factorises the current unfolding with :func:`~mpolab.truncation.low_rank_split`
and **truncates before moving on**, so the full-rank decomposition is never computed.

Error guarantee (Oseledets' TT-SVD bound, MPOP appendix): with per-step Frobenius errors ``ε_k``,
``‖W - Ŵ‖_F <= sqrt(Σ_k ε_k²)`` (with orthonormal left factors it is an equality). ``rel_tol=ε``
gives the ``n - 1`` bonds the total budget ``Σ ε_k² <= ε²‖W‖²_F``: the first bond may use
``ε²‖W‖²/(n-1)`` (Oseledets' even split), and every later bond an equal share of whatever the
earlier bonds left unused (the outer bonds of an MPO are tiny and rarely truncate, so an even
split wastes most of the tolerance). Hence ``‖W - Ŵ‖_F <= ε‖W‖_F``; the error actually achieved
is reported as :attr:`MPO.truncation_error`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .mpo import MPO
from .options import TruncationOptions
from .shapes import plan_factors
from .sweep import backend_for, scale_pow2, sweep, work_dtype
from .truncation import SVDBackend, bond_caps, squared_norm

__all__ = ["decompose"]


def decompose(
    W: torch.Tensor,
    num_cores: int | None = None,
    *,
    options: TruncationOptions | None = None,
    out_factors: Sequence[int] | None = None,
    in_factors: Sequence[int] | None = None,
    max_rank: int | Sequence[int] | None = None,
    rel_tol: float | None = None,
    max_params: int | None = None,
    ratio: float | None = None,
    svd: SVDBackend = "auto",
    pad: bool | None = None,
) -> MPO:
    """Decompose ``W: [out, in]`` into an MPO of ``num_cores`` cores.

    Without a truncation option the decomposition is exact (full bond dimensions, which hold
    *more* parameters than ``W``). Options combine: every given limit is respected. They are
    given either as keywords or as one :class:`~mpolab.options.TruncationOptions` (``options=``),
    not both.

    Args:
        options: all the options below as one validated value.
        W: a floating-point matrix ``[out_features, in_features]`` (``nn.Linear.weight`` layout),
            on any device. float16/bfloat16 are decomposed in float32 and returned in their dtype.
        num_cores: number of cores (default 5, or the length of given factor lists).
        out_factors, in_factors: explicit factorisations of the two sizes (see
            :func:`mpolab.shapes.plan_factors`); chosen automatically otherwise, with zero padding
            for sizes that factorise badly.
        max_rank: bond cap, one int for all bonds or one per bond (``num_cores - 1`` entries).
        rel_tol: relative Frobenius error allowed for the whole matrix, in (0, 1). With
            ``max_rank`` or a budget, the tolerance is met where the caps allow, never by
            exceeding them; the achieved error is in ``truncation_error``.
        max_params: parameter budget: the largest MPO (largest bond caps) that fits.
        ratio: the same budget as a fraction of ``out_features · in_features``.
        svd: ``"auto"`` (Gram + ``eigh`` in float32 or float64, SVD for tolerances below
            ~1e-5 per bond), ``"gram"``, ``"svd"``, or ``"randomized"`` (needs ``max_rank``/budget).
        pad: see :func:`mpolab.shapes.plan_factors`.

    Returns:
        An :class:`MPO` in mixed-canonical form around its central tensor, with per-bond
        ``singular_values`` and the achieved ``truncation_error``.

    Raises:
        TypeError: ``W`` is not a floating-point tensor.
        ValueError: ``W`` is not 2-D, is empty, or holds NaN/Inf; an option is out of range.

    Examples:
        >>> W = torch.randn(3072, 768)
        >>> mpo = decompose(W, rel_tol=0.05)
        >>> mpo.truncation_error <= 0.05
        True
    """
    opts = TruncationOptions.from_kwargs(
        options,
        num_cores=num_cores,
        out_factors=out_factors,
        in_factors=in_factors,
        max_rank=max_rank,
        rel_tol=rel_tol,
        max_params=max_params,
        ratio=ratio,
        svd=svd,
        pad=pad,
    )
    _check_matrix(W)
    out_features, in_features = W.shape
    plan = plan_factors(
        out_features,
        in_features,
        opts.num_cores_resolved,
        out_factors=opts.out_factors,
        in_factors=opts.in_factors,
        pad=opts.pad,
    )
    sizes = [i * j for i, j in zip(plan.out_factors, plan.in_factors)]
    caps = bond_caps(sizes, max_rank=opts.max_rank, max_params=opts.budget_for(out_features * in_features))
    rel_tol = opts.rel_tol

    compute_base = work_dtype(W.dtype)
    backend, compute_dtype = backend_for(opts.svd, compute_base, rel_tol, plan.num_cores)
    with torch.no_grad():
        # Work on 2^-e·W with max|entry| in [0.5, 1): powers of two scale exactly, so the ranks
        # and the relative error do not depend on W's magnitude (no Gram under- or overflow).
        exponent = _scale_exponent(W)
        A = scale_pow2(W.detach().to(compute_dtype), -exponent)
        norm_sq = squared_norm(A)
        rows, cols = plan.padded_shape
        if plan.is_padded:
            A = F.pad(A, (0, cols - in_features, 0, rows - out_features))
        n = plan.num_cores
        # [I, J] -> [i1..in, j1..jn] -> [i1, j1, i2, j2, ...]
        order = [axis for k in range(n) for axis in (k, n + k)]
        T = A.reshape(*plan.out_factors, *plan.in_factors).permute(order)
        budget = None if rel_tol is None else rel_tol**2 * norm_sq
        first = T.reshape(1, plan.out_factors[0], plan.in_factors[0], -1)
        cores, spectra, discarded = sweep(
            first=first,
            rest=[(i, j) for i, j in zip(plan.out_factors[1:], plan.in_factors[1:])],
            caps=caps,
            budget_sq=budget,
            backend=backend,
            compute_dtype=compute_dtype,
            center=MPO.central_index_for(n),
        )
        del A, T, first
        center = MPO.central_index_for(n)
        out_cores = [c.to(W.dtype) for c in cores]
        out_cores[center] = _scale_back(cores[center], exponent, W.dtype)
        spectra = [math.ldexp(1.0, exponent) * s for s in spectra]
        mpo = MPO(out_cores, out_features, in_features, spectra)
        if plan.is_padded or _lost_precision(cores[center], exponent, W.dtype):
            # The sweep's error counts the padded zeros, or the cores were rounded into W.dtype's
            # subnormal range: measure the true error instead (at unit scale).
            discarded = _measured_error_sq(mpo, W, exponent, compute_dtype)
    mpo.truncation_error = math.sqrt(discarded / norm_sq) if norm_sq > 0 else 0.0
    return mpo


def _scale_exponent(W: torch.Tensor) -> int:
    """``e`` with ``max|W| · 2^-e`` in [0.5, 1) (0 for a zero matrix); refuses NaN/Inf."""
    amax = float(W.detach().abs().max())
    if not math.isfinite(amax):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"W holds {bad} NaN/Inf entries; an MPO of a non-finite matrix is meaningless")
    return math.frexp(amax)[1] if amax > 0 else 0


def _scale_back(core: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    """The central core at W's scale, in W's dtype; ``ValueError`` if that overflows the dtype."""
    out = scale_pow2(core, exponent).to(dtype)
    if not bool(torch.isfinite(out).all()):
        largest = math.ldexp(float(core.abs().max()), exponent)
        raise ValueError(
            f"the MPO's central tensor (it carries W's norm, entries up to {largest:.3g}) "
            f"overflows {dtype} (largest finite {torch.finfo(dtype).max:.3g}); decompose W.float() or scale W down"
        )
    return out


def _lost_precision(core: torch.Tensor, exponent: int, dtype: torch.dtype) -> bool:
    """Whether some nonzero entry of the central core lands below ``dtype``'s smallest normal number."""
    nonzero = core.abs()[core != 0]
    if nonzero.numel() == 0:
        return False
    return math.ldexp(float(nonzero.min()), exponent) < torch.finfo(dtype).tiny


def _measured_error_sq(mpo: MPO, W: torch.Tensor, exponent: int, dtype: torch.dtype) -> float:
    """``‖Ŵ - W‖²`` measured at the unit scale ``2^-exponent`` in ``dtype``."""
    cores = [c.to(dtype) for c in mpo.cores]
    center = mpo.central_index
    cores[center] = scale_pow2(cores[center], -exponent)
    rebuilt = MPO(cores, mpo.out_features, mpo.in_features).to_matrix()
    return squared_norm(rebuilt - scale_pow2(W.detach().to(dtype), -exponent))


def _check_matrix(W: object) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix [out, in], got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)})")
    if not W.is_floating_point():
        raise TypeError(f"W must be floating point (float16/bfloat16/float32/float64), got {W.dtype}")
