import pytest
import torch

from mpolab.truncation import (
    bond_caps,
    choose_backend,
    choose_rank,
    full_bond_dims,
    low_rank_split,
    num_params_for_ranks,
    squared_norm,
)

SIZES = [12, 16, 32, 24, 16]  # 3072x768 in 5 cores


def test_full_bond_dims_and_params_of_the_reference_shape():
    assert full_bond_dims(SIZES) == [12, 192, 384, 16]
    assert num_params_for_ranks(SIZES, full_bond_dims(SIZES)) == 2_544_016  # > 3072*768


def test_bond_caps_clip_to_full_dims_and_accept_per_bond_lists():
    assert bond_caps(SIZES, max_rank=64) == [12, 64, 64, 16]
    assert bond_caps(SIZES, max_rank=[5, 6, 7, 8]) == [5, 6, 7, 8]


@pytest.mark.parametrize("budget", [2_000, 50_000, 200_000, 1_000_000])
def test_budget_gives_a_maximal_mpo_that_fits(budget):
    caps = bond_caps(SIZES, max_params=budget)
    assert num_params_for_ranks(SIZES, caps) <= budget
    full = full_bond_dims(SIZES)
    for k in range(len(caps)):  # no single bond can grow without breaking the budget
        if caps[k] < full[k]:
            grown = caps[:k] + [caps[k] + 1] + caps[k + 1 :]
            assert num_params_for_ranks(SIZES, grown) > budget


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(max_rank=0), ValueError),
        (dict(max_rank=[4, 4]), ValueError),
        (dict(max_params=10), ValueError),
        (dict(max_rank=2.5), TypeError),
        (dict(max_params=1e5), TypeError),
    ],
)
def test_bad_caps(kwargs, err):
    with pytest.raises(err):
        bond_caps(SIZES, **kwargs)


def test_choose_rank_meets_the_budget_within_the_cap():
    sq = torch.tensor([16.0, 4.0, 1.0, 0.25], dtype=torch.float64)
    assert choose_rank(sq, cap=4, tail_budget_sq=1.25) == 2  # tail after 2 = 1.25
    assert choose_rank(sq, cap=4, tail_budget_sq=1.24) == 3
    assert choose_rank(sq, cap=1, tail_budget_sq=0.0) == 1
    assert choose_rank(sq, cap=4, tail_budget_sq=None) == 4
    assert choose_rank(torch.zeros(4, dtype=torch.float64), cap=4, tail_budget_sq=0.0) == 1


@pytest.mark.parametrize("shape", [(20, 300), (300, 20), (64, 64)])
@pytest.mark.parametrize("backend", ["gram", "svd", "randomized"])
def test_low_rank_split_is_an_orthonormal_projection(shape, backend):
    C = torch.randn(*shape, dtype=torch.float64)
    split = low_rank_split(C, cap=8, backend=backend)
    left, right = split.left, split.right
    assert left.shape == (shape[0], 8) and right.shape == (8, shape[1])
    torch.testing.assert_close(left.T @ left, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    err = float((C - left @ right).square().sum())
    assert split.discarded_sq == pytest.approx(err, rel=1e-8)
    if backend != "randomized":  # the optimal rank-8 error (Eckart–Young)
        S = torch.linalg.svdvals(C)
        assert err == pytest.approx(float(S[8:].square().sum()), rel=1e-8)
        torch.testing.assert_close(split.singular_values, S.cpu(), atol=1e-8, rtol=1e-8)


def test_split_of_zero_matrix_has_no_nan():
    for shape in [(8, 40), (40, 8)]:
        split = low_rank_split(torch.zeros(*shape), cap=3, tail_budget_sq=0.0)
        assert torch.isfinite(split.left).all() and torch.isfinite(split.right).all()
        assert split.discarded_sq == 0.0


def test_choose_backend_precision_rules():
    assert choose_backend(torch.float32, None) == ("gram", torch.float32)
    assert choose_backend(torch.float32, 0.1) == ("gram", torch.float32)
    assert choose_backend(torch.float32, 0.005) == ("gram", torch.float64)
    assert choose_backend(torch.float32, 1e-7) == ("svd", torch.float64)


def test_squared_norm_is_float64_accurate_on_large_float32_tensors():
    A = torch.randn(4096, 4097)
    assert squared_norm(A) == pytest.approx(float(A.double().square().sum()), rel=1e-7)
