"""Data-aware MPO decomposition: minimise the output error on recorded inputs, keep a plain MPO.

For a layer ``y = W x`` with calibration inputs ``X: [T, in]`` and Gram matrix ``G = XᵀX``, the
error that matters is the output error

    ‖(W - Ŵ) Xᵀ‖_F² = tr((W - Ŵ) G (W - Ŵ)ᵀ) = ‖(W - Ŵ) S‖_F²,   S Sᵀ = G,

not ``‖W - Ŵ‖_F``. The routes here all decompose a *whitened* matrix ``A = W·S`` in a chosen
:class:`Layout` and fold ``S⁻¹`` back into the cores, so the result is an ordinary
:class:`~mpolab.mpo.MPO` (same cores, same ``MPOLinear``, same save format):

* **exact whitening** (:meth:`Layout.exact_whitening`): one core holds the whole input index
  (its in-factor is ``in_features``, every other core's is 1). ``Â·S⁻¹`` only touches that core's
  input index, so ``S⁻¹`` folds in exactly and the TT-SVD truncation of ``A`` is a truncation
  in the output-error norm. The two-core layout ``out_factors=(out, 1), in_factors=(1, in)`` is
  truncated SVD, so this route with that layout *is* SVD-LLM (Wang et al. 2024).
* **Kronecker whitening**: input factors ``j_1 … j_n`` spread over the cores; ``G`` is
  approximated by ``⊗_k Σ_k`` (each ``Σ_k`` the partial trace of ``G`` over the other input
  modes), each core absorbs its own ``S_k⁻¹``. Exact only when ``G`` is a Kronecker product.
* **refit** (:func:`refit`): a few hundred Adam steps on the cores against
  ``tr((W - Ŵ) G (W - Ŵ)ᵀ)``, starting from any of the above.

:func:`search_layouts` tries several layouts at one parameter budget, the SVD-equivalent one
always among them, and keeps the one with the smallest calibrated output error, so the chosen
MPO is never worse than calibrated SVD at the same budget. :func:`whitened_svd_curve` gives
the error curve :func:`mpolab.allocate.allocate_by_output_error` spreads a global budget with.

Example:
    >>> stats = mpolab.calibrate.collect_input_stats(model, {"fc": fc}, calib)["fc"]
    >>> mpo = decompose_weighted(fc.weight, stats.gram, layout=Layout.svd(*fc.weight.shape), ratio=0.5)
    >>> output_error(fc.weight, mpo, stats.gram)      # relative ‖(W - Ŵ) Xᵀ‖ / ‖W Xᵀ‖
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .allocate import SVDCurve
from .decompose import decompose
from .mpo import MPO
from .shapes import plan_factors

__all__ = [
    "LayerChoice",
    "Layout",
    "decompose_weighted",
    "kronecker_factors",
    "layout_candidates",
    "output_error",
    "refit",
    "search_layouts",
    "whitened_svd_curve",
    "whitening_factor",
]

#: Default damping: ``damp · mean(diag(G))`` is added to the diagonal of ``G`` before the
#: Cholesky factorisation (inputs that never fire make ``G`` singular).
DEFAULT_DAMP = 1e-2


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """How ``W: [out, in]`` is spread over cores: one (out, in) factor pair per core.

    ``prod(out_factors) == out`` and ``prod(in_factors) == in`` (no padding).
    """

    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.out_factors) != len(self.in_factors) or len(self.out_factors) < 2:
            raise ValueError(
                f"a layout needs >= 2 cores and one out and one in factor per core, got "
                f"out_factors={self.out_factors}, in_factors={self.in_factors}"
            )
        if any(int(i) * int(j) < 2 for i, j in zip(self.out_factors, self.in_factors)):
            raise ValueError(f"every core needs >= 2 entries, got out={self.out_factors}, in={self.in_factors}")

    @property
    def num_cores(self) -> int:
        return len(self.out_factors)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.out_factors), math.prod(self.in_factors)

    @property
    def input_core(self) -> int | None:
        """The core holding the whole input index (every other in-factor is 1), else ``None``."""
        big = [k for k, j in enumerate(self.in_factors) if j > 1]
        return big[0] if len(big) == 1 else None

    @property
    def exact_whitening(self) -> bool:
        """Whether ``S⁻¹`` folds into the cores exactly (one core holds the whole input index)."""
        return self.input_core is not None

    @property
    def is_svd(self) -> bool:
        """Two cores, outputs in the first, inputs in the second: truncated SVD."""
        return self.num_cores == 2 and self.in_factors[0] == 1 and self.out_factors[1] == 1

    @property
    def name(self) -> str:
        if self.is_svd:
            return "svd"
        kind = "exact" if self.exact_whitening else "kron"
        return f"{kind}{self.num_cores}:o{'x'.join(map(str, self.out_factors))}/i{'x'.join(map(str, self.in_factors))}"

    @classmethod
    def svd(cls, out_features: int, in_features: int) -> Layout:
        """The SVD-equivalent layout ``out_factors=(out, 1)``, ``in_factors=(1, in)``."""
        return cls((out_features, 1), (1, in_features))

    def check(self, shape: Sequence[int]) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(
                f"layout {self.name} describes a {list(self.shape)} matrix, but W is {list(shape)} "
                "(factors must multiply to the true sizes; no padding)"
            )


def layout_candidates(out_features: int, in_features: int, *, num_cores: int = 5) -> list[Layout]:
    """Layouts worth trying for ``W: [out, in]``, the SVD-equivalent one first.

    * ``svd``: ``(out, 1) / (1, in)``;
    * exact whitening, outputs split in two around the input core: ``(a, 1, b) / (1, in, 1)``
      (the input core in the middle, a Tucker-2 chain) and ``(a, b, 1) / (1, 1, in)``;
    * Kronecker whitening in ``num_cores`` cores with the automatic factors of
      :func:`mpolab.plan_factors` (the plain MPO layout).
    """
    out: list[Layout] = [Layout.svd(out_features, in_features)]
    a = _near_sqrt_factor(out_features)
    if a is not None:
        b = out_features // a
        out.append(Layout((a, 1, b), (1, in_features, 1)))
        out.append(Layout((a, b, 1), (1, 1, in_features)))
    try:
        plan = plan_factors(out_features, in_features, num_cores, pad=False)
        if not plan.is_padded and plan.num_cores >= 2:
            out.append(Layout(plan.out_factors, plan.in_factors))
    except ValueError:
        pass
    return list(dict.fromkeys(out))


def _near_sqrt_factor(n: int) -> int | None:
    """The divisor of ``n`` closest to ``sqrt(n)`` from below (``None`` when ``n`` is prime)."""
    for a in range(int(math.isqrt(n)), 1, -1):
        if n % a == 0:
            return a
    return None


# ----------------------------------------------------------------------------- whitening


def _damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [in, in] matrix, got shape {tuple(gram.shape)}")
    G = gram.detach().double()
    if not bool(torch.isfinite(G).all()):
        raise ValueError("gram holds NaN/Inf entries")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    G = 0.5 * (G + G.mT)
    scale = float(torch.diagonal(G).mean())
    if scale <= 0:
        raise ValueError("gram is zero: the layer saw only zero inputs, there is nothing to weight by")
    return G + damp * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def whitening_factor(gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Lower-triangular ``S: [in, in]`` (float64) with ``S Sᵀ = G + damp·mean(diag G)·I``.

    If the Cholesky factorisation still fails (``damp=0`` on a singular ``G``), the damping is
    raised tenfold (starting at 1e-6) until it succeeds.
    """
    G = _damped(gram, damp)
    scale = float(torch.diagonal(G).mean())
    extra = 0.0
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(G + extra * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
        if int(info) == 0:
            return L
        extra = 1e-6 if extra == 0 else extra * 10
    raise ValueError("gram is not positive semi-definite (Cholesky failed even with damping)")


def kronecker_factors(gram: torch.Tensor, in_factors: Sequence[int], damp: float = DEFAULT_DAMP) -> list[torch.Tensor]:
    """``Σ_k: [j_k, j_k]`` with ``G ≈ ⊗_k Σ_k`` (up to scale): the partial traces of ``G`` per input mode.

    ``G`` is viewed as a ``[j_1 … j_n, j_1 … j_n]`` tensor (``in = j_1·…·j_n``, the first factor
    varying slowest, as ``W``'s columns do in an MPO); ``Σ_k`` sums the diagonal over every
    other mode. Factors of size 1 give ``[[1]]``. Each ``Σ_k`` is damped like
    :func:`whitening_factor`.
    """
    factors = [int(j) for j in in_factors]
    if math.prod(factors) != gram.shape[0]:
        raise ValueError(f"in_factors {factors} multiply to {math.prod(factors)}, not the Gram's size {gram.shape[0]}")
    n = len(factors)
    T = gram.detach().double().reshape(*factors, *factors)
    out = []
    for k in range(n):
        if factors[k] == 1:
            out.append(torch.ones(1, 1, dtype=torch.float64, device=gram.device))
            continue
        letters = "abcdefghijklmnopqrstuvwxyz"
        rows = [letters[m] for m in range(n)]
        cols = [letters[m] if m != k else letters[n + k] for m in range(n)]
        sigma = torch.einsum(f"{''.join(rows)}{''.join(cols)}->{letters[k]}{letters[n + k]}", T)
        out.append(_damped(sigma, damp))
    return out


# ----------------------------------------------------------------------------- decomposition


def decompose_weighted(
    W: torch.Tensor,
    gram: torch.Tensor,
    *,
    layout: Layout | None = None,
    max_rank: int | Sequence[int] | None = None,
    max_params: int | None = None,
    ratio: float | None = None,
    rel_tol: float | None = None,
    damp: float = DEFAULT_DAMP,
    refit_steps: int = 0,
    _exact: _Whitening | None = None,
) -> MPO:
    """MPO of ``W: [out, in]`` truncated in the output-error norm of inputs with Gram ``gram: [in, in]``.

    Whitens ``A = W·S`` (``S`` the Cholesky factor of the damped ``gram`` when ``layout`` holds
    the whole input index in one core, else the Kronecker factors of :func:`kronecker_factors`),
    runs the TT-SVD sweep of :func:`mpolab.decompose` on ``A`` with the given truncation
    options, and folds ``S⁻¹`` back into the cores. With no truncation option the result
    reconstructs ``W`` exactly (up to rounding).

    Args:
        W: the weight ``[out, in]`` (``nn.Linear`` layout; pass ``Conv1D.weight.T``).
        gram: ``XᵀX`` of the layer's inputs (any positive multiple), ``[in, in]``.
        layout: cores and factors; default the SVD-equivalent layout (this is then SVD-LLM).
        max_rank, max_params, ratio: as in :func:`mpolab.decompose` (``ratio`` of ``out·in``).
        rel_tol: relative *output* error allowed, ``‖(W - Ŵ) S‖ / ‖W S‖`` on the damped Gram.
        damp: Tikhonov damping of ``gram``, as a fraction of its mean diagonal.
        refit_steps: Adam steps of :func:`refit` after the sweep (0: none).

    Returns:
        An :class:`MPO` in ``W``'s dtype; ``truncation_error`` is the relative output error on
        the damped Gram.
    """
    _check_pair(W, gram)
    out_features, in_features = W.shape
    layout = layout or Layout.svd(out_features, in_features)
    layout.check(W.shape)
    with torch.no_grad():
        A, inverses = _whiten(W.detach().double(), gram, layout, damp, _exact)
        whitened = decompose(
            A,
            out_factors=layout.out_factors,
            in_factors=layout.in_factors,
            max_rank=max_rank,
            max_params=max_params,
            ratio=ratio,
            rel_tol=rel_tol,
            svd="auto",
        )
        cores = [
            core if inv is None else torch.einsum("aijb,jk->aikb", core, inv)
            for core, inv in zip(whitened.cores, inverses)
        ]
    mpo = MPO([c.to(W.dtype) for c in cores], out_features, in_features, whitened.singular_values)
    mpo.truncation_error = whitened.truncation_error
    if refit_steps:
        mpo = refit(mpo, W, gram, steps=refit_steps, damp=damp)
    return mpo


@dataclass
class _Whitening:
    """``S`` (lower Cholesky factor of the damped Gram), its inverse and ``W·S``, computed once per layer."""

    S: torch.Tensor
    inverse: torch.Tensor
    WS: torch.Tensor

    @classmethod
    def of(cls, W: torch.Tensor, gram: torch.Tensor, damp: float) -> _Whitening:
        S = whitening_factor(gram.to(W.device), damp)
        eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        return cls(S, torch.linalg.solve_triangular(S, eye, upper=False), W.detach().double() @ S)


def _whiten(
    W: torch.Tensor, gram: torch.Tensor, layout: Layout, damp: float, exact: _Whitening | None = None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``A = W·S`` and, per core, the inverse factor to fold into its input index (``None``: none)."""
    core = layout.input_core
    if core is not None:
        w = exact or _Whitening.of(W, gram, damp)
        return w.WS, [w.inverse if k == core else None for k in range(layout.num_cores)]
    sigmas = kronecker_factors(gram.to(W.device), layout.in_factors, damp)
    factors = [whitening_factor(s, 0.0) for s in sigmas]
    A = W.reshape(W.shape[0], *layout.in_factors)
    for k, S_k in enumerate(factors):
        if S_k.shape[0] > 1:
            A = torch.movedim(torch.tensordot(A, S_k, dims=([k + 1], [0])), -1, k + 1)
    inverses: list[torch.Tensor | None] = []
    for S_k in factors:
        if S_k.shape[0] == 1:
            inverses.append(None)
        else:
            eye = torch.eye(S_k.shape[0], dtype=S_k.dtype, device=S_k.device)
            inverses.append(torch.linalg.solve_triangular(S_k, eye, upper=False))
    return A.reshape(W.shape), inverses


def output_error(W: torch.Tensor, approx: MPO | torch.Tensor, gram: torch.Tensor, *, relative: bool = True) -> float:
    """Output error ``‖(W - Ŵ) Xᵀ‖_F`` (``relative``: divided by ``‖W Xᵀ‖_F``), from ``G = XᵀX``.

    ``approx`` is an :class:`MPO` or a dense ``[out, in]`` matrix. Computed in float64 as
    ``sqrt(tr(Δ G Δᵀ))`` on the undamped ``gram``.
    """
    _check_pair(W, gram)
    with torch.no_grad():
        Wd = W.detach().double()
        approx_m = approx.to_matrix() if isinstance(approx, MPO) else approx
        if tuple(approx_m.shape) != tuple(W.shape):
            raise ValueError(f"approximation has shape {tuple(approx_m.shape)}, W has {tuple(W.shape)}")
        G = gram.detach().double().to(Wd.device)
        D = Wd - approx_m.detach().double().to(Wd.device)
        err = float(((D @ G) * D).sum().clamp_min(0))
        if not relative:
            return math.sqrt(err)
        ref = float(((Wd @ G) * Wd).sum())
        return math.sqrt(err / ref) if ref > 0 else 0.0


def refit(
    mpo: MPO,
    W: torch.Tensor,
    gram: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    damp: float = DEFAULT_DAMP,
) -> MPO:
    """Adam steps on the cores of ``mpo`` against ``‖(W - Ŵ) S‖_F² / ‖W S‖_F²`` (damped Gram).

    Keeps the ranks and layout; returns the best iterate (never worse than the start). The
    learning rate is relative: each core's step is ``lr`` times its RMS entry size.
    """
    _check_pair(W, gram)
    S = whitening_factor(gram, damp).to(device=W.device, dtype=torch.float32)
    target = (W.detach().float() @ S).detach()
    ref = float(target.square().sum())
    cores = [torch.nn.Parameter(c.detach().float().clone()) for c in mpo.cores]
    groups = [{"params": [c], "lr": lr * float(c.detach().square().mean().sqrt().clamp_min(1e-12))} for c in cores]
    optimizer = torch.optim.Adam(groups)

    def loss_of(cs: Sequence[torch.Tensor]) -> torch.Tensor:
        approx = MPO(list(cs), mpo.out_features, mpo.in_features).to_matrix()
        return (approx @ S - target).square().sum() / ref

    with torch.enable_grad():
        best = float(loss_of(cores).detach())
        best_cores = [c.detach().clone() for c in cores]
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(cores)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if value < best:
                best, best_cores = value, [c.detach().clone() for c in cores]
        final = float(loss_of(cores).detach())
        if final < best:
            best, best_cores = final, [c.detach().clone() for c in cores]
    out = MPO([c.to(mpo.dtype) for c in best_cores], mpo.out_features, mpo.in_features, mpo.singular_values)
    out.truncation_error = math.sqrt(max(best, 0.0))
    return out


def _check_pair(W: torch.Tensor, gram: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a floating-point [out, in] matrix, got {getattr(W, 'shape', type(W).__name__)}")
    if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"gram must be [in, in] = [{W.shape[1]}, {W.shape[1]}] for W of shape {list(W.shape)}, "
            f"got {getattr(gram, 'shape', type(gram).__name__)}"
        )


# ----------------------------------------------------------------------------- layout search


@dataclass
class LayerChoice:
    """The winner of :func:`search_layouts` for one layer.

    ``mpo`` is ``None`` when the layer stays dense (``layout == "dense"``); ``errors`` holds the
    relative output error of every candidate tried, by layout name.
    """

    mpo: MPO | None
    layout: str
    params: int
    error: float
    errors: dict[str, float] = field(default_factory=dict)


def search_layouts(
    W: torch.Tensor,
    gram: torch.Tensor,
    max_params: int,
    *,
    candidates: Sequence[Layout] | None = None,
    damp: float = DEFAULT_DAMP,
    refit_steps: int = 0,
    allow_dense: bool = True,
) -> LayerChoice:
    """The layout with the smallest calibrated output error within ``max_params`` parameters.

    Every candidate (default :func:`layout_candidates`, the SVD-equivalent layout always added)
    is decomposed with :func:`decompose_weighted` at the budget and ranked by its relative output
    error on the damped Gram (the criterion the whitened sweep minimises; ``errors``), the
    winner's ``error`` is then measured with :func:`output_error` on the undamped ``gram``. A layer
    whose budget reaches its dense size stays dense (error 0) when ``allow_dense``. Candidates
    whose rank-1 MPO does not fit are skipped; if none fits, ``ValueError``.
    """
    _check_pair(W, gram)
    out_features, in_features = W.shape
    if allow_dense and max_params >= out_features * in_features:
        return LayerChoice(None, "dense", out_features * in_features, 0.0, {"dense": 0.0})
    layouts = list(candidates) if candidates is not None else layout_candidates(out_features, in_features)
    svd = Layout.svd(out_features, in_features)
    if svd not in layouts:
        layouts.insert(0, svd)
    exact = _Whitening.of(W, gram, damp)
    reference = float(exact.WS.square().sum())
    best: LayerChoice | None = None
    errors: dict[str, float] = {}
    for layout in layouts:
        try:
            mpo = decompose_weighted(
                W, gram, layout=layout, max_params=max_params, damp=damp, refit_steps=refit_steps, _exact=exact
            )
        except ValueError:
            continue  # the budget is below this layout's rank-1 size
        if layout.exact_whitening and not refit_steps and mpo.truncation_error is not None:
            err = mpo.truncation_error  # the sweep's error is the (damped) output error: no product needed
        else:
            residual = (W.detach().double() - mpo.to_matrix().double()) @ exact.S
            err = math.sqrt(float(residual.square().sum()) / reference) if reference > 0 else 0.0
        errors[layout.name] = err
        if best is None or err < best.error:
            best = LayerChoice(mpo, layout.name, mpo.num_params, err)
    if best is None:
        raise ValueError(
            f"max_params={max_params} is below every candidate layout's smallest MPO for W {list(W.shape)}"
        )
    best.errors = errors
    assert best.mpo is not None
    best.error = output_error(W, best.mpo, gram)  # reported on the undamped statistics
    return best


# ----------------------------------------------------------------------------- global budget


def whitened_svd_curve(W: torch.Tensor, gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> SVDCurve:
    """The :class:`SVDCurve` of ``W`` from the singular values of ``W·S`` (one SVD)."""
    _check_pair(W, gram)
    with torch.no_grad():
        A = W.detach().double() @ whitening_factor(gram.to(W.device), damp)
        small = A.mT @ A if A.shape[0] >= A.shape[1] else A @ A.mT
        sq = torch.linalg.eigvalsh(small).flip(0).clamp_min(0).cpu()  # σ², descending (float64 Gram route)
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=sq.dtype)])
    return SVDCurve(int(W.shape[0]), int(W.shape[1]), tail, float(sq.sum()))
