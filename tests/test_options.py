"""TruncationOptions: validated once, normalised, and the same as keywords everywhere."""

import math

import pytest
import torch
from torch import nn

import mpolab
from mpolab import MPOLinear, TruncationOptions


def test_lists_become_tuples_and_defaults_hold():
    opts = TruncationOptions(max_rank=[4, 8, 8, 4], out_factors=[2, 3, 4, 2, 2], in_factors=[2, 2, 3, 2, 2])
    assert opts.max_rank == (4, 8, 8, 4) and opts.out_factors == (2, 3, 4, 2, 2)
    assert opts.svd == "auto" and opts.pad is None and hash(opts)
    assert TruncationOptions(max_rank=[4, 4]).num_cores_resolved == 3
    assert TruncationOptions().num_cores_resolved is None
    assert TruncationOptions(ratio=0.25).budget_for(1000) == 250
    assert TruncationOptions(max_params=77).budget_for(1000) == 77
    assert TruncationOptions().budget_for(1000) is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_rank=0), ValueError, "max_rank must be >= 1"),
        (dict(max_rank=2.5), TypeError, "max_rank"),
        (dict(max_rank=[1, 8, 8, 1]), ValueError, r"tensorly's rank list \[1, r1, \.\.\., r_\(n-1\), 1\]"),
        (dict(max_rank=[1, 8, 1], num_cores=2), ValueError, "tensorly"),
        (dict(rel_tol=1.5), ValueError, r"rel_tol must be in \(0, 1\)"),
        (dict(rel_tol="0.1"), TypeError, "rel_tol"),
        (dict(max_params=0), ValueError, "max_params must be a positive int"),
        (dict(max_params=1e5), TypeError, "max_params"),
        (dict(ratio=math.inf), ValueError, "ratio must be a finite number > 0"),
        (dict(ratio=math.nan), ValueError, "ratio"),
        (dict(ratio=-0.5), ValueError, "ratio"),
        (dict(ratio=0.5, max_params=100), ValueError, "not both"),
        (dict(num_cores=1), ValueError, "num_cores must be >= 2"),
        (dict(num_cores=2.0), TypeError, "num_cores"),
        (dict(out_factors=[2, 0]), ValueError, "out_factors"),
        (dict(in_factors="22"), TypeError, "in_factors"),
        (dict(svd="qr"), ValueError, "svd must be one of 'auto', 'gram', 'svd', 'randomized'"),
        (dict(svd="randomized"), ValueError, "rank cap"),
        (dict(pad=1), TypeError, "pad"),
    ],
)
def test_bad_values_are_refused_once_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        TruncationOptions(**kwargs)


def test_rank_list_with_one_cap_per_bond_of_a_given_core_count_is_accepted():
    assert TruncationOptions(max_rank=[1, 8, 8, 1], num_cores=5).max_rank == (1, 8, 8, 1)


def test_frozen_and_replace_revalidates():
    opts = TruncationOptions(max_rank=4)
    with pytest.raises(AttributeError):
        opts.max_rank = 8  # type: ignore[misc]
    assert opts.replace(max_rank=8).max_rank == 8
    with pytest.raises(ValueError):
        opts.replace(max_rank=0)


def test_decompose_and_from_linear_take_options_or_keywords_not_both():
    W = torch.randn(64, 48, dtype=torch.float64)
    opts = TruncationOptions(max_rank=3, num_cores=3)
    a, b = mpolab.decompose(W, options=opts), mpolab.decompose(W, num_cores=3, max_rank=3)
    torch.testing.assert_close(a.to_matrix(), b.to_matrix())
    with pytest.raises(ValueError, match="not both"):
        mpolab.decompose(W, options=opts, rel_tol=0.1)
    with pytest.raises(ValueError, match="not both"):
        mpolab.decompose(W, 3, options=opts)
    linear = nn.Linear(48, 64).double()
    layer = MPOLinear.from_linear(linear, options=opts)
    assert layer.ranks == MPOLinear.from_linear(linear, num_cores=3, max_rank=3).ranks
    with pytest.raises(TypeError, match="unknown truncation options"):
        MPOLinear.from_linear(linear, max_rnak=3)
