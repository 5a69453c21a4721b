import math

import pytest
import tensorly as tl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorly.decomposition import tensor_train_matrix
from tensorly.tt_matrix import tt_matrix_to_tensor

import mpolab
from mpolab import MPO, decompose

from ._matrices import decaying_matrix


def rel_err(W: torch.Tensor, mpo: MPO) -> float:
    return float((W.double() - mpo.to_matrix().double()).norm() / W.double().norm())


@pytest.fixture
def torch_backend():
    previous = tl.get_backend()
    tl.set_backend("pytorch")
    yield
    tl.set_backend(previous)


def tensorly_mpo(W: torch.Tensor, mpo: MPO) -> MPO:
    """tensorly's TT-SVD of W with the factors and ranks of ``mpo``."""
    tt = tensor_train_matrix(W.reshape(*mpo.out_factors, *mpo.in_factors), rank=[1, *mpo.ranks, 1])
    return MPO.from_tensorly(tt)


def assert_same_up_to_gauge(a: MPO, b: MPO, atol: float) -> None:
    """Two MPOs are one MPO in two gauges: same matrix, and at every bond the left blocks of
    their left-canonical forms span the same subspace (differ by an orthogonal bond matrix)."""
    assert a.ranks == b.ranks
    torch.testing.assert_close(a.to_matrix(), b.to_matrix(), atol=atol, rtol=0)
    left_a, left_b = a.canonicalize(a.num_cores - 1).cores, b.canonicalize(b.num_cores - 1).cores
    for k in range(1, a.num_cores):
        La = mpolab.contract.merge_cores(left_a[:k]).reshape(-1, a.ranks[k - 1])
        Lb = mpolab.contract.merge_cores(left_b[:k]).reshape(-1, b.ranks[k - 1])
        overlap = torch.linalg.svdvals(La.T @ Lb)  # all 1 iff same subspace
        torch.testing.assert_close(overlap, torch.ones_like(overlap), atol=atol, rtol=0)


def test_exact_rank_reconstructs_to_round_off():
    W = torch.randn(3072, 768, dtype=torch.float64)
    mpo = decompose(W)
    assert mpo.ranks == (12, 192, 384, 16)
    assert mpo.num_params == 2_544_016
    assert rel_err(W, mpo) < 1e-12
    assert mpo.truncation_error == 0.0
    W32 = W.float()
    assert rel_err(W32, decompose(W32)) < 1e-5


def test_issue_example_with_explicit_factors():
    W = torch.randn(3072, 768)
    mpo = decompose(W, in_factors=[3, 4, 4, 4, 4], out_factors=[4, 4, 8, 6, 4], max_rank=64)
    assert mpo.in_factors == (3, 4, 4, 4, 4) and mpo.out_factors == (4, 4, 8, 6, 4)
    assert mpo.ranks == (12, 64, 64, 16)
    assert mpo.central_index == 2
    assert mpo.to_matrix().shape == (3072, 768) and mpo.to_matrix().dtype == W.dtype


@pytest.mark.parametrize("ranks", [(4, 8, 8, 4), (12, 64, 64, 16), (12, 32, 100, 16)])
def test_same_ranks_no_worse_than_tensorly_and_cores_agree_up_to_gauge(torch_backend, ranks):
    W = decaying_matrix(3072, 768, decay=0.3)
    ours = decompose(W, max_rank=list(ranks))
    theirs = tensorly_mpo(W, ours)
    assert ours.ranks == theirs.ranks == ranks
    assert rel_err(W, ours) <= rel_err(W, theirs) * (1 + 1e-6) + 1e-12
    assert_same_up_to_gauge(ours, theirs, atol=1e-8)


def test_exact_decomposition_matches_tensorly_up_to_gauge(torch_backend):
    W = torch.randn(96, 120, dtype=torch.float64)
    ours = decompose(W, num_cores=3)
    theirs = tensorly_mpo(W, ours)
    torch.testing.assert_close(tt_matrix_to_tensor(ours.to_tensorly()).reshape(96, 120), W, atol=1e-10, rtol=0)
    assert_same_up_to_gauge(ours, theirs, atol=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.sampled_from([24, 60, 96, 128, 210]),
    cols=st.sampled_from([16, 36, 64, 90, 97]),
    num_cores=st.integers(2, 5),
    rel_tol=st.floats(0.001, 0.95),
    decay=st.sampled_from([0.01, 0.1, 1.0]),
    use_cap=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rel_tol_is_never_exceeded(rows, cols, num_cores, rel_tol, decay, use_cap, seed):
    torch.manual_seed(seed)
    W = decaying_matrix(rows, cols, decay=decay)
    kwargs = dict(max_rank=3) if use_cap else {}
    try:
        mpo = decompose(W, num_cores, rel_tol=rel_tol, **kwargs)
    except ValueError as e:  # too many cores for a small matrix is a legitimate refusal
        assert "too many" in str(e)
        return
    achieved = rel_err(W, mpo)
    assert mpo.truncation_error == pytest.approx(achieved, rel=1e-6, abs=1e-9)
    if not use_cap:
        assert achieved <= rel_tol * (1 + 1e-9)
    assert all(r <= 3 for r in mpo.ranks) or not use_cap


@pytest.mark.parametrize("rel_tol", [0.05, 0.2, 0.5])
def test_rel_tol_in_float32_is_met(rel_tol):
    W = decaying_matrix(768, 3072, decay=0.2, dtype=torch.float32)
    mpo = decompose(W, rel_tol=rel_tol)
    assert rel_err(W, mpo) <= rel_tol * (1 + 1e-5)
    assert mpo.truncation_error == pytest.approx(rel_err(W, mpo), rel=1e-3)


def test_rel_tol_with_cap_never_exceeds_the_cap_and_reports_error():
    W = decaying_matrix(768, 3072, decay=0.5)
    free = decompose(W, rel_tol=0.05)
    capped = decompose(W, rel_tol=0.05, max_rank=8)
    assert max(capped.ranks) <= 8 < max(free.ranks)
    assert capped.truncation_error == pytest.approx(rel_err(W, capped), rel=1e-6)
    assert capped.truncation_error > 0.05  # the cap won; the report says so


@pytest.mark.parametrize("budget", [5_000, 50_000, 400_000])
def test_max_params_and_ratio(budget):
    W = torch.randn(3072, 768)
    mpo = decompose(W, max_params=budget)
    assert mpo.num_params <= budget
    assert decompose(W, ratio=budget / W.numel()).ranks == mpo.ranks


def test_per_bond_singular_values_are_kept():
    W = decaying_matrix(256, 256)
    mpo = decompose(W, max_rank=4)
    assert len(mpo.singular_values) == mpo.num_cores - 1
    n = mpo.num_cores
    order = [axis for k in range(n) for axis in (k, n + k)]
    unfolding = (
        W.reshape(*mpo.out_factors, *mpo.in_factors).permute(order).reshape(mpo.out_factors[0] * mpo.in_factors[0], -1)
    )
    torch.testing.assert_close(mpo.singular_values[0], torch.linalg.svdvals(unfolding), atol=1e-10, rtol=1e-8)
    for s in mpo.singular_values:  # full spectra, descending, beyond the kept rank
        assert torch.all(s[:-1] >= s[1:]) and s.numel() >= 4


def test_truncation_happens_during_the_sweep(monkeypatch):
    """No step ever factorises more than the capped remainder: rows stay r_{k-1}·i_k·j_k with small r."""
    import sys

    module = sys.modules["mpolab.sweep"]
    seen = []
    real = module.low_rank_split

    def spy(C, cap, budget, backend):
        seen.append(tuple(C.shape))
        return real(C, cap, budget, backend)

    monkeypatch.setattr(module, "low_rank_split", spy)
    decompose(torch.randn(3072, 768), max_rank=8)
    assert seen == [(12, 196608), (8 * 16, 12288), (8 * 32, 384), (8 * 24, 16)]


def test_zero_matrix_gives_zero_mpo_not_nan():
    for kwargs in [{}, dict(rel_tol=0.1), dict(max_rank=4), dict(svd="svd", rel_tol=0.1)]:
        mpo = decompose(torch.zeros(64, 48), **kwargs)
        M = mpo.to_matrix()
        assert torch.isfinite(M).all() and float(M.abs().max()) == 0.0
        assert mpo.truncation_error == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_decomposed_in_float32_and_returned_in_their_dtype(dtype):
    W = decaying_matrix(256, 192, dtype=torch.float32).to(dtype)
    mpo = decompose(W, rel_tol=0.1)
    assert mpo.dtype == dtype and mpo.to_matrix().dtype == dtype
    assert rel_err(W.float(), mpo) <= 0.1 + 0.01  # plus half-precision storage of the cores


@pytest.mark.parametrize("n", [30522, 1009])
def test_prime_heavy_sizes_are_padded_and_unpadded_exactly(n):
    W = torch.randn(n, 48, dtype=torch.float64)
    mpo = decompose(W, num_cores=3)
    assert mpo.padded_shape[0] > n
    assert mpo.to_matrix().shape == (n, 48)
    assert rel_err(W, mpo) < 1e-10
    x = torch.randn(5, 48, dtype=torch.float64)
    torch.testing.assert_close(mpo.apply(x, path="cores"), x @ W.T)
    Wt = W.T.contiguous()
    torch.testing.assert_close(
        decompose(Wt, num_cores=3).apply(torch.randn(2, n, dtype=torch.float64)).shape, torch.Size([2, 48])
    )


@pytest.mark.parametrize("backend", ["gram", "svd", "randomized"])
def test_backends_agree(backend):
    W = decaying_matrix(512, 256, decay=0.05)
    reference = rel_err(W, decompose(W, max_rank=6, svd="svd"))
    assert rel_err(W, decompose(W, max_rank=6, svd=backend)) <= reference * 1.05


def test_randomized_needs_a_cap():
    with pytest.raises(ValueError, match="rank cap"):
        decompose(torch.randn(64, 64), svd="randomized", rel_tol=0.1)


def test_runs_on_the_tensors_device_and_dtype():
    W = torch.randn(128, 96, dtype=torch.float64)
    mpo = decompose(W, max_rank=4)
    assert all(c.dtype == torch.float64 and c.device == W.device for c in mpo.cores)


@pytest.mark.parametrize(
    "W, kwargs, err, match",
    [
        (torch.randn(4, 4, 4), {}, ValueError, "2-D"),
        (torch.randn(0, 8), {}, ValueError, "empty"),
        (torch.ones(8, 8, dtype=torch.int64), {}, TypeError, "floating point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]).repeat(8, 8), dict(num_cores=2), ValueError, "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]).repeat(8, 8), dict(num_cores=2), ValueError, "NaN/Inf"),
        (torch.randn(64, 64), dict(num_cores=1), ValueError, "num_cores"),
        (torch.randn(64, 64), dict(num_cores=13), ValueError, "too many"),
        (torch.randn(64, 64), dict(rel_tol=0.0), ValueError, "rel_tol"),
        (torch.randn(64, 64), dict(rel_tol=1.5), ValueError, "rel_tol"),
        (torch.randn(64, 64), dict(max_rank=0), ValueError, "max_rank"),
        (torch.randn(64, 64), dict(max_params=3), ValueError, "max_params"),
        (torch.randn(64, 64), dict(max_params=100, ratio=0.5), ValueError, "not both"),
        (torch.randn(64, 64), dict(ratio=-1.0), ValueError, "ratio"),
        (torch.randn(64, 64), dict(svd="qr"), ValueError, "svd"),
        (torch.randn(64, 64), dict(out_factors=[2, 2, 2], in_factors=[4, 4, 4, 4]), ValueError, "entries"),
        (torch.randn(64, 64), dict(out_factors=[2, 2, 2], in_factors=[4, 4, 5]), ValueError, "multiply"),
        ([[1.0]], {}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_clear_errors(W, kwargs, err, match):
    with pytest.raises(err, match=match):
        decompose(W, **kwargs)


def test_num_params_and_compression():
    W = torch.randn(3072, 768)
    mpo = decompose(W, max_rank=16)
    assert mpo.num_params == sum(c.numel() for c in mpo.cores) == sum(math.prod(c.shape) for c in mpo.cores)
    assert mpo.compression == pytest.approx(mpo.num_params / W.numel())
    assert mpolab.decompose is decompose
