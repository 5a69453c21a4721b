"""The :class:`MPO` value type: a matrix stored as a chain of cores.

``W: [I, J]`` (``[out, in]``) with ``I = i1·…·in`` and ``J = j1·…·jn`` is stored as cores
``T_k: [r_{k-1}, i_k, j_k, r_k]`` with ``r_0 = r_n = 1``:

    W[(a1…an), (b1…bn)] = T_1[:, a1, b1, :] @ T_2[:, a2, b2, :] @ … @ T_n[:, an, bn, :]

The core at :attr:`MPO.central_index` (the middle one) is the *central tensor*; the others are
*auxiliary tensors*. :func:`mpolab.decompose` returns the mixed-canonical form around the central
tensor: auxiliary cores left of it are left-orthonormal, those right of it right-orthonormal, so
the central tensor carries the singular values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import contract
from .options import TruncationOptions
from .sweep import backend_for, left_orthonormalize, right_orthonormalize, scale_pow2, sweep, work_dtype
from .truncation import SVDBackend, bond_caps

__all__ = ["MPO"]


@dataclass(eq=False)
class MPO:
    """A matrix ``[out_features, in_features]`` in MPO (tensor-train matrix) form.

    Attributes:
        cores: ``[r_{k-1}, i_k, j_k, r_k]`` tensors; ``i`` indexes rows (outputs), ``j`` columns.
        out_features, in_features: the true matrix shape; the cores may describe a zero-padded
            ``[Π i_k, Π j_k]`` matrix, sliced back to this shape by :meth:`to_matrix` and :meth:`apply`.
        singular_values: per bond, every singular value the decomposition computed at that bond
            (descending, float64, CPU), including the discarded ones; ``None`` if unknown.
        truncation_error: relative Frobenius error ``‖W - Ŵ‖ / ‖W‖`` of the truncation that made
            this MPO (exact in exact arithmetic for TT-SVD); ``None`` if unknown.

    Examples:
        >>> W = torch.randn(3072, 768)
        >>> mpo = mpolab.decompose(W, max_rank=64)
        >>> mpo.ranks, mpo.central_index, mpo.to_matrix().shape
        ((12, 64, 64, 16), 2, torch.Size([3072, 768]))
    """

    cores: list[torch.Tensor]
    out_features: int
    in_features: int
    singular_values: list[torch.Tensor] | None = field(default=None, repr=False)
    truncation_error: float | None = None

    def __post_init__(self) -> None:
        self.cores = list(self.cores)
        if len(self.cores) < 1:
            raise ValueError("an MPO needs at least one core")
        for k, core in enumerate(self.cores):
            if not isinstance(core, torch.Tensor) or core.ndim != 4:
                shape = tuple(core.shape) if isinstance(core, torch.Tensor) else type(core).__name__
                raise ValueError(f"core {k} must be a 4-D tensor [r_left, i, j, r_right], got {shape}")
        if self.cores[0].shape[0] != 1 or self.cores[-1].shape[3] != 1:
            raise ValueError(
                f"boundary bonds must be 1, got first core {tuple(self.cores[0].shape)} "
                f"and last core {tuple(self.cores[-1].shape)}"
            )
        for k in range(len(self.cores) - 1):
            if self.cores[k].shape[3] != self.cores[k + 1].shape[0]:
                raise ValueError(
                    f"bond {k} does not match: core {k} is {tuple(self.cores[k].shape)} and "
                    f"core {k + 1} is {tuple(self.cores[k + 1].shape)}"
                )
        rows, cols = self.padded_shape
        if not (0 < self.out_features <= rows and 0 < self.in_features <= cols):
            raise ValueError(
                f"shape [{self.out_features}, {self.in_features}] does not fit the cores' "
                f"[{rows}, {cols}] (out_factors={self.out_factors}, in_factors={self.in_factors})"
            )

    # ------------------------------------------------------------------ structure
    @property
    def num_cores(self) -> int:
        return len(self.cores)

    @property
    def out_factors(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_factors(self) -> tuple[int, ...]:
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ``num_cores - 1`` inner bond dimensions ``(r_1, …, r_{n-1})``."""
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def padded_shape(self) -> tuple[int, int]:
        return math.prod(self.out_factors), math.prod(self.in_factors)

    @property
    def central_index(self) -> int:
        """Index of the central tensor: the middle core (2 of 5)."""
        return self.central_index_for(self.num_cores)

    @staticmethod
    def central_index_for(num_cores: int) -> int:
        return num_cores // 2

    @property
    def central_core(self) -> torch.Tensor:
        return self.cores[self.central_index]

    @property
    def auxiliary_cores(self) -> list[torch.Tensor]:
        return [c for k, c in enumerate(self.cores) if k != self.central_index]

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    @property
    def compression(self) -> float:
        """``num_params / (out_features · in_features)``: below 1 means fewer parameters than dense."""
        return self.num_params / (self.out_features * self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.cores[0].dtype

    @property
    def device(self) -> torch.device:
        return self.cores[0].device

    # ------------------------------------------------------------------ contraction
    def to_matrix(self) -> torch.Tensor:
        """The dense matrix ``[out_features, in_features]`` (same device and dtype as the cores)."""
        return contract.merge_cores(self.cores)[0, : self.out_features, : self.in_features, 0]

    def apply(self, x: torch.Tensor, *, path: contract.Path | str = "auto") -> torch.Tensor:
        """``x @ Wᵀ`` for ``x: [..., in_features]``, returning ``[..., out_features]``.

        Contracts ``x`` through the cores when that needs fewer FLOPs than rebuilding ``W``
        (see :func:`mpolab.contract.choose_path`); ``path`` forces ``"cores"`` or ``"dense"``.
        """
        if path not in ("auto", "cores", "dense"):
            raise ValueError(f"path must be 'auto', 'cores' or 'dense', got {path!r}")
        return contract.apply_mpo(x, self.cores, self.out_features, self.in_features, path=path)

    def norm(self) -> float:
        """Frobenius norm of the represented matrix, without forming it."""
        return float(torch.linalg.vector_norm(self.to(work_dtype(self.dtype)).canonicalize(0).cores[0].double()))

    # ------------------------------------------------------------------ gauge
    def canonicalize(self, center: int | None = None) -> MPO:
        """Mixed-canonical form around ``center`` (default: the central tensor).

        Cores left of ``center`` become left-orthonormal, cores right of it right-orthonormal,
        by QR sweeps whose R factors have a non-negative diagonal, so the form is unique for
        full-rank bonds: two MPOs of the same matrix and ranks canonicalise to the same cores.
        The represented matrix does not change.
        """
        center = self.central_index if center is None else center
        if not 0 <= center < self.num_cores:
            raise ValueError(f"center must be in [0, {self.num_cores - 1}], got {center}")
        cores = [c.to(work_dtype(c.dtype)) for c in self.cores]  # no half-precision QR on CPU
        for k in range(center):
            cores[k], carry = left_orthonormalize(cores[k])
            cores[k + 1] = torch.einsum("ab,bijc->aijc", carry, cores[k + 1])
        for k in range(self.num_cores - 1, center, -1):
            carry, cores[k] = right_orthonormalize(cores[k])
            cores[k - 1] = torch.einsum("aijb,bc->aijc", cores[k - 1], carry)
        return replace(self, cores=[c.to(self.dtype) for c in cores])

    def truncate(
        self,
        *,
        max_rank: int | Sequence[int] | None = None,
        rel_tol: float | None = None,
        max_params: int | None = None,
        ratio: float | None = None,
        svd: SVDBackend = "auto",
    ) -> MPO:
        """Re-truncate (TT rounding): right-canonicalise, then sweep left to right with truncated SVDs.

        The options mean what they mean in :func:`mpolab.decompose`, measured against this
        MPO (``rel_tol`` is relative to :meth:`norm`). Never raises a bond. Use it after training
        to squeeze ranks; the result is in mixed-canonical form around the central tensor and its
        :attr:`truncation_error` is relative to this MPO.

        Examples:
            >>> small = mpo.truncate(max_rank=32)
        """
        # svd is checked by backend_for: this MPO's ranks already cap a randomized SVD.
        opts = TruncationOptions(
            max_rank=max_rank, rel_tol=rel_tol, max_params=max_params, ratio=ratio, num_cores=self.num_cores
        )
        caps = bond_caps(
            [i * j for i, j in zip(self.out_factors, self.in_factors)],
            max_rank=opts.max_rank,
            max_params=opts.budget_for(self.out_features * self.in_features),
        )
        caps = [min(c, r) for c, r in zip(caps, self.ranks)]
        with torch.no_grad():
            compute_base = work_dtype(self.dtype)
            cores = self.to(compute_base).canonicalize(0).cores
            # Sweep at unit scale (powers of two are exact): no Gram under- or overflow.
            amax = float(cores[0].abs().max())
            exponent = math.frexp(amax)[1] if math.isfinite(amax) and amax > 0 else 0
            cores[0] = scale_pow2(cores[0], -exponent)
            norm_sq = float(cores[0].double().square().sum())
            backend, compute_dtype = backend_for(svd, compute_base, rel_tol, self.num_cores)
            budget = None if rel_tol is None else rel_tol**2 * norm_sq
            new_cores, spectra, discarded = sweep(
                first=cores[0],
                rest=cores[1:],
                caps=caps,
                budget_sq=budget,
                backend=backend,
                compute_dtype=compute_dtype,
                center=self.central_index,
            )
        error = math.sqrt(discarded / norm_sq) if norm_sq > 0 else 0.0
        center = self.central_index
        new_cores[center] = scale_pow2(new_cores[center], exponent)
        spectra = [math.ldexp(1.0, exponent) * s for s in spectra]
        return MPO([c.to(self.dtype) for c in new_cores], self.out_features, self.in_features, spectra, error)

    # ------------------------------------------------------------------ conversion
    def to(self, *args: Any, **kwargs: Any) -> MPO:
        """Move or cast every core, like :meth:`torch.Tensor.to`."""
        return replace(self, cores=[c.to(*args, **kwargs) for c in self.cores])

    def detach(self) -> MPO:
        return replace(self, cores=[c.detach() for c in self.cores])

    def to_tensorly(self) -> Any:
        """A :class:`tensorly.tt_matrix.TTMatrix` of the (padded) matrix, in tensorly's active backend.

        tensorly's core layout ``(rank_left, rows_k, cols_k, rank_right)`` is ours, so the cores
        carry over unchanged; with the numpy backend they are converted to arrays.
        """
        import tensorly as tl
        from tensorly.tt_matrix import TTMatrix

        if tl.get_backend() == "pytorch":
            factors = [c.detach() for c in self.cores]
        else:
            factors = [tl.tensor(c.detach().cpu().numpy()) for c in self.cores]
        return TTMatrix(factors)

    def to_tltorch(self) -> Any:
        """A :class:`tltorch.BlockTT` (tensorly-torch's tensorized TT matrix) of the (padded) matrix.

        ``BlockTT`` factors are ``(rank_left, rows_k, cols_k, rank_right)`` like ours and its
        ``tensorized_shape`` is ``(out_factors, in_factors)``; the cores are copied (the result owns
        its parameters). :meth:`from_tensorly` reads a ``BlockTT`` back.

        Examples:
            >>> block = mpo.to_tltorch()
            >>> torch.allclose(block.to_matrix(), mpo.to_matrix())
            True
        """
        import tltorch

        factors = [c.detach().clone() for c in self.cores]
        return tltorch.BlockTT(factors, tensorized_shape=(self.out_factors, self.in_factors), rank=[1, *self.ranks, 1])

    @classmethod
    def from_tensorly(cls, tt_matrix: Any, *, out_features: int | None = None, in_features: int | None = None) -> MPO:
        """Build an :class:`MPO` from a tensorly ``TTMatrix``, a tltorch ``BlockTT`` (or a list of factors).

        ``out_features``/``in_features`` default to the full products of the factors; pass the
        true sizes to slice off padding.
        """
        factors = tt_matrix.factors if hasattr(tt_matrix, "factors") else list(tt_matrix)
        cores = [torch.as_tensor(f) for f in factors]
        rows = math.prod(int(c.shape[1]) for c in cores)
        cols = math.prod(int(c.shape[2]) for c in cores)
        return cls(cores, out_features or rows, in_features or cols)

    def __repr__(self) -> str:
        err = "" if self.truncation_error is None else f", truncation_error={self.truncation_error:.4g}"
        return (
            f"MPO(shape={list(self.shape)}, out_factors={self.out_factors}, in_factors={self.in_factors}, "
            f"ranks={self.ranks}, num_params={self.num_params}{err})"
        )
