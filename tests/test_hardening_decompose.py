"""The decompose cases of issue 13, one test each (all failed before the fix)."""

from __future__ import annotations

import pytest
import torch

from mpolab import MPO, decompose


def measured(W: torch.Tensor, mpo: MPO) -> float:
    W64 = W.double()
    return float((mpo.to(torch.float64).to_matrix() - W64).norm() / W64.norm())


@pytest.fixture
def W() -> torch.Tensor:
    return torch.randn(64, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_tiny_matrix_reports_its_true_error(W):
    small = (1e-25 * W).float()
    mpo = decompose(small, max_rank=4)
    assert mpo.truncation_error == pytest.approx(measured(small, mpo), abs=1e-4)
    assert mpo.truncation_error == pytest.approx(decompose(W.float(), max_rank=4).truncation_error, abs=1e-4)


def test_tiny_matrix_truncates_with_rel_tol(W):
    reference = decompose(W.float(), rel_tol=0.5)
    mpo = decompose((1e-25 * W).float(), rel_tol=0.5)
    assert mpo.ranks == reference.ranks
    assert mpo.ranks != decompose(W.float()).ranks  # it truncates
    assert mpo.truncation_error == pytest.approx(reference.truncation_error, abs=1e-4)


def test_subnormal_entries_do_not_report_zero_error(W):
    tiny = (1e-44 * W / W.abs().max() * 8).float()
    mpo = decompose(tiny, rel_tol=0.5)
    assert mpo.truncation_error == pytest.approx(measured(tiny, mpo), abs=1e-3)
    assert mpo.truncation_error > 0.1


def test_huge_matrix_decomposes(W):
    for c in (1e20, 1e30):
        big = (c * W).float()
        mpo = decompose(big, max_rank=4)
        assert mpo.truncation_error == pytest.approx(measured(big, mpo), abs=1e-4)
        assert mpo.singular_values is not None and mpo.singular_values[0][0] > c


def test_central_tensor_overflowing_half_precision_is_a_clear_error():
    W = torch.full((8, 8), 60000.0, dtype=torch.float16)  # finite, but σ₁ = 480000 > 65504
    with pytest.raises(ValueError, match="overflows torch.float16"):
        decompose(W, num_cores=2)


def test_nan_and_inf_are_refused():
    W = torch.randn(16, 16)
    W[3, 4] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        decompose(W)
    W[3, 4] = float("inf")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        decompose(W)


def test_ratio_inf_is_a_clear_error():
    with pytest.raises(ValueError, match="ratio must be a finite number"):
        decompose(torch.randn(16, 16), ratio=float("inf"))


def test_one_by_one_matrix_says_it_cannot_be_an_mpo():
    with pytest.raises(ValueError, match=r"\[1, 1\] matrix cannot be an MPO.*keep this layer dense"):
        decompose(torch.randn(1, 1), num_cores=2)


def test_truncate_is_scale_invariant(W):
    mpo = decompose(W.float())
    for c in (1.0, 1e-30, 1e30):
        scaled = mpo.to(torch.float32)
        scaled.cores[scaled.central_index] = scaled.central_core * c
        t = scaled.truncate(rel_tol=0.5)
        assert t.ranks == mpo.truncate(rel_tol=0.5).ranks
        assert t.truncation_error == pytest.approx(mpo.truncate(rel_tol=0.5).truncation_error, abs=1e-4)
