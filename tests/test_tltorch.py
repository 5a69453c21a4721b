"""MPO <-> tltorch BlockTT and tensorly TTMatrix; tensorly-style rank lists are refused naming the form."""

import pytest
import torch

import mpolab

tltorch = pytest.importorskip("tltorch")  # tensorly-torch: in the test extra


def test_mpo_to_and_from_blocktt():
    torch.manual_seed(0)
    mpo = mpolab.decompose(torch.randn(64, 48), num_cores=3, max_rank=8)
    block = mpo.to_tltorch()
    assert isinstance(block, tltorch.BlockTT)
    assert block.tensorized_shape == (mpo.out_factors, mpo.in_factors) and list(block.rank) == [1, *mpo.ranks, 1]
    torch.testing.assert_close(block.to_matrix(), mpo.to_matrix(), rtol=0, atol=0)
    back = mpolab.MPO.from_tensorly(block)
    assert back.ranks == mpo.ranks and back.shape == mpo.shape
    torch.testing.assert_close(back.to_matrix(), mpo.to_matrix(), rtol=0, atol=0)


def test_a_random_blocktt_becomes_an_mpo_and_an_mpo_layer():
    torch.manual_seed(0)
    block = tltorch.BlockTT.new(((4, 4, 4), (4, 4, 3)), rank=[1, 3, 3, 1])
    block.normal_()
    mpo = mpolab.MPO.from_tensorly(block)
    torch.testing.assert_close(mpo.to_matrix(), block.to_matrix().detach(), rtol=1e-6, atol=1e-6)
    layer = mpolab.MPOLinear.from_mpo(mpo.detach())
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), x @ block.to_matrix().detach().T, rtol=1e-5, atol=1e-5)


def test_tensorly_rank_lists_are_refused_with_the_form_named():
    with pytest.raises(ValueError, match=r"looks like tensorly's rank list \[1, r1, \.\.\., r_\(n-1\), 1\]"):
        mpolab.decompose(torch.randn(64, 64), max_rank=[1, 16, 16, 16, 16, 1])
    with pytest.raises(ValueError, match=r"mpolab takes only the inner bonds \(\[16, 16\]\)"):
        mpolab.TruncationOptions(max_rank=[1, 16, 16, 1])
