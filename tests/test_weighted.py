"""Data-aware (whitened) MPO decomposition: exactness, optimality against plain truncation, fold-in."""

import math

import pytest
import torch

import mpolab
from mpolab.allocate import allocate_by_output_error
from mpolab.weighted import (
    Layout,
    decompose_weighted,
    kronecker_factors,
    layout_candidates,
    output_error,
    refit,
    search_layouts,
    whitened_svd_curve,
    whitening_factor,
)

OUT, IN = 48, 24


def anisotropic_inputs(tokens: int = 2000, dim: int = IN, seed: int = 0) -> torch.Tensor:
    """Inputs with a spectrum spanning 3 decades in a random basis, plus a few dead channels' worth of rank loss."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64)).Q
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return (torch.randn(tokens, dim, generator=g, dtype=torch.float64) * scales) @ basis.T


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN, dtype=torch.float64)
    X = anisotropic_inputs()
    return W, X, X.T @ X


def direct_error(W, approx, X):
    return float(((W - approx) @ X.T).norm() / (W @ X.T).norm())


def test_output_error_matches_the_recorded_outputs(problem):
    W, X, G = problem
    approx = W + 0.1 * torch.randn_like(W)
    assert output_error(W, approx, G) == pytest.approx(direct_error(W, approx, X), rel=1e-9)
    assert output_error(W, W, G) == 0.0


@pytest.mark.parametrize("layout", layout_candidates(OUT, IN), ids=lambda layout: layout.name)
def test_calibrated_error_is_no_larger_than_plain_at_the_same_ranks(problem, layout):
    W, X, G = problem
    plain = mpolab.decompose(W, out_factors=layout.out_factors, in_factors=layout.in_factors, max_rank=4)
    calibrated = decompose_weighted(W, G, layout=layout, max_rank=list(plain.ranks), damp=1e-8)
    assert calibrated.ranks == plain.ranks
    if layout.exact_whitening:
        assert direct_error(W, calibrated.to_matrix(), X) <= direct_error(W, plain.to_matrix(), X) + 1e-9
    # every layout: the output error is finite and the MPO is plain (MPOLinear takes it as is)
    layer = mpolab.MPOLinear.from_mpo(calibrated.to(torch.float32))
    assert layer(torch.randn(3, IN)).shape == (3, OUT)


@pytest.mark.parametrize("layout", layout_candidates(OUT, IN), ids=lambda layout: layout.name)
def test_exact_ranks_reconstruct_w(problem, layout):
    W, _, G = problem
    mpo = decompose_weighted(W, G, layout=layout)
    torch.testing.assert_close(mpo.to_matrix(), W, rtol=1e-8, atol=1e-8)


def test_svd_layout_is_svd_llm(problem):
    W, _, G = problem
    damp = 1e-3
    Gd = G + damp * G.diagonal().mean() * torch.eye(IN, dtype=G.dtype)
    S = torch.linalg.cholesky(Gd)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    r = 5
    reference = (U[:, :r] * s[:r]) @ Vh[:r] @ torch.linalg.inv(S)
    mpo = decompose_weighted(W, G, layout=Layout.svd(OUT, IN), max_rank=r, damp=damp)
    assert mpo.out_factors == (OUT, 1) and mpo.in_factors == (1, IN) and mpo.ranks == (r,)
    torch.testing.assert_close(mpo.to_matrix(), reference, rtol=1e-7, atol=1e-9)
    assert mpo.truncation_error == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-6)


def test_fold_in_gives_the_whitened_reconstruction(problem):
    W, _, G = problem
    layout = Layout((6, 1, 8), (1, IN, 1))  # the input core in the middle
    S = whitening_factor(G, 1e-2)
    whitened = mpolab.decompose(W @ S, out_factors=layout.out_factors, in_factors=layout.in_factors, max_rank=[4, 5])
    intended = whitened.to_matrix() @ torch.linalg.inv(S)
    mpo = decompose_weighted(W, G, layout=layout, max_rank=[4, 5], damp=1e-2)
    assert isinstance(mpo, mpolab.MPO) and mpo.ranks == (4, 5)
    assert [tuple(c.shape) for c in mpo.cores] == [tuple(c.shape) for c in whitened.cores]
    torch.testing.assert_close(mpo.to_matrix(), intended, rtol=1e-8, atol=1e-10)


def test_kronecker_whitening_is_exact_for_kronecker_statistics():
    torch.manual_seed(1)
    a, b = anisotropic_inputs(500, 4, seed=2), anisotropic_inputs(500, 6, seed=3)
    G = torch.kron(a.T @ a, b.T @ b)
    W = torch.randn(OUT, IN, dtype=torch.float64)
    layout = Layout((6, 8), (4, 6))
    sigmas = kronecker_factors(G, layout.in_factors, damp=0.0)
    torch.testing.assert_close(
        torch.kron(sigmas[0], sigmas[1]) / float(torch.kron(sigmas[0], sigmas[1])[0, 0]), G / float(G[0, 0])
    )
    mpo = decompose_weighted(W, G, layout=layout, max_rank=6, damp=0.0)
    # the whitened truncation error is the output error when G is exactly a Kronecker product
    assert mpo.truncation_error == pytest.approx(output_error(W, mpo, G), rel=1e-6)
    plain = mpolab.decompose(W, out_factors=layout.out_factors, in_factors=layout.in_factors, max_rank=6)
    assert output_error(W, mpo, G) <= output_error(W, plain, G)


def test_search_is_never_worse_than_calibrated_svd_and_keeps_dense_when_cheaper(problem):
    W, _, G = problem
    budget = int(0.5 * W.numel())
    choice = search_layouts(W, G, budget)
    svd = decompose_weighted(W, G, layout=Layout.svd(OUT, IN), max_params=budget)
    assert choice.params <= budget
    assert choice.error <= output_error(W, svd, G) + 1e-12
    assert "svd" in choice.errors and choice.layout == min(choice.errors, key=choice.errors.get)
    assert choice.errors[choice.layout] <= choice.errors["svd"]  # ranked on the damped (whitened) norm
    dense = search_layouts(W, G, W.numel())
    assert dense.mpo is None and dense.layout == "dense" and dense.error == 0.0


def test_refit_never_worse(problem):
    W, _, G = problem
    layout = Layout((6, 8), (4, 6))
    start = decompose_weighted(W, G, layout=layout, max_rank=5)
    better = refit(start, W, G, steps=30, lr=1e-2)
    assert better.ranks == start.ranks
    assert output_error(W, better, G) <= output_error(W, start, G) + 1e-6


def test_allocation_spends_the_budget_where_the_error_is():
    torch.manual_seed(0)
    X = anisotropic_inputs()
    G = X.T @ X
    easy = torch.randn(OUT, 3, dtype=torch.float64) @ torch.randn(3, IN, dtype=torch.float64)  # rank 3
    hard = torch.randn(OUT, IN, dtype=torch.float64)
    curves = {"easy": whitened_svd_curve(easy, G), "hard": whitened_svd_curve(hard, G)}
    budget = 12 * (OUT + IN)
    alloc = allocate_by_output_error(curves, budget)
    assert sum(alloc.values()) <= budget
    assert alloc["easy"] == 3 * (OUT + IN)  # the exact rank and nothing more
    assert alloc["hard"] > alloc["easy"]
    with pytest.raises(ValueError, match="below"):
        allocate_by_output_error(curves, 10)


def test_whitening_survives_rank_deficient_inputs():
    X = anisotropic_inputs(10)  # 10 tokens for 24 inputs: G has rank 10
    G = X.T @ X
    S = whitening_factor(G, 1e-2)
    assert torch.isfinite(S).all()
    W = torch.randn(OUT, IN, dtype=torch.float64)
    mpo = decompose_weighted(W, G, max_rank=8)
    assert math.isfinite(output_error(W, mpo, G))
    S0 = whitening_factor(G, 0.0)  # no damping asked: raised until Cholesky succeeds
    assert torch.isfinite(S0).all()


def test_bad_inputs():
    W = torch.randn(OUT, IN)
    with pytest.raises(ValueError, match=r"gram must be \[in, in\]"):
        decompose_weighted(W, torch.eye(OUT), max_rank=2)
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((IN, IN), float("nan")))
    with pytest.raises(ValueError, match="zero"):
        whitening_factor(torch.zeros(IN, IN))
    with pytest.raises(ValueError, match="layout"):
        decompose_weighted(W, torch.eye(IN), layout=Layout.svd(IN, OUT))
    with pytest.raises(ValueError, match="2 entries"):
        Layout((OUT, 1), (1, 1))
