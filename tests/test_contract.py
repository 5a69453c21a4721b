import pytest
import torch

from mpolab import decompose
from mpolab.contract import apply_mpo, choose_path, core_shapes, merge_cores, path_costs


def small_mpo(rank: int = 3, dtype=torch.float64):
    return decompose(torch.randn(24, 60, dtype=dtype), num_cores=3, max_rank=rank)


@pytest.mark.parametrize("path", ["cores", "dense", "auto"])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_apply_matches_dense_matmul(path, lead):
    mpo = small_mpo()
    x = torch.randn(*lead, 60, dtype=torch.float64)
    y = apply_mpo(x, mpo.cores, 24, 60, path=path)
    assert y.shape == (*lead, 24)
    torch.testing.assert_close(y, x @ mpo.to_matrix().T)


def test_apply_with_bias_and_given_weight():
    mpo = small_mpo()
    x, b = torch.randn(4, 60, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    expected = x @ mpo.to_matrix().T + b
    torch.testing.assert_close(apply_mpo(x, mpo.cores, 24, 60, bias=b, path="cores"), expected)
    torch.testing.assert_close(apply_mpo(x, mpo.cores, 24, 60, bias=b, weight=mpo.to_matrix()), expected)


@pytest.mark.parametrize("path", ["cores", "dense"])
def test_gradients_flow_to_every_core(path):
    mpo = small_mpo()
    cores = [c.clone().requires_grad_(True) for c in mpo.cores]
    x = torch.randn(3, 60, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *cs: apply_mpo(x, list(cs), 24, 60, path=path), (x, *cores))
    apply_mpo(x, cores, 24, 60, path=path).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)


def test_gradcheck_through_padding():
    mpo = decompose(torch.randn(29, 31, dtype=torch.float64), num_cores=2, pad=None)
    cores = [c.clone().requires_grad_(True) for c in mpo.cores]
    x = torch.randn(2, 31, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *cs: apply_mpo(x, list(cs), 29, 31, path="cores"), tuple(cores))


def test_wrong_input_width_is_a_clear_error():
    mpo = small_mpo()
    with pytest.raises(ValueError, match="last dimension 60"):
        apply_mpo(torch.randn(4, 59, dtype=torch.float64), mpo.cores, 24, 60)
    with pytest.raises(ValueError, match="path"):
        mpo.apply(torch.randn(4, 60, dtype=torch.float64), path="fast")


def test_merge_cores_blocks():
    mpo = small_mpo()
    left = merge_cores(mpo.cores[:2])
    assert left.shape == (
        1,
        mpo.out_factors[0] * mpo.out_factors[1],
        mpo.in_factors[0] * mpo.in_factors[1],
        mpo.ranks[1],
    )
    torch.testing.assert_close(merge_cores(mpo.cores)[0, :, :, 0], mpo.to_matrix())


def test_cost_model_prefers_rebuild_at_high_rank_and_cores_at_very_low_rank():
    big = decompose(torch.randn(4096, 4096), max_rank=256)
    assert choose_path(core_shapes(big.cores), 4096) == "dense"
    tiny = decompose(torch.randn(4096, 4096), max_rank=2)
    costs = path_costs(core_shapes(tiny.cores), 4096)
    assert costs.cores.flops * 10 < costs.dense.flops
    assert costs.chosen == "cores"


def test_cached_weight_makes_dense_cheaper():
    mpo = decompose(torch.randn(3072, 768), max_rank=8)
    shapes = core_shapes(mpo.cores)
    assert path_costs(shapes, 64, weight_cached=True).dense.flops < path_costs(shapes, 64).dense.flops


def test_contract_expressions_are_cached():
    from mpolab import contract

    mpo = small_mpo()
    contract._apply_expression.cache_clear()
    for batch in (5, 6, 7, 8):  # one batch class
        apply_mpo(torch.randn(batch, 60, dtype=torch.float64), mpo.cores, 24, 60, path="cores")
    info = contract._apply_expression.cache_info()
    assert info.misses == 1 and info.hits == 3


def test_uncached_penalty_favours_the_core_path_at_small_batches_only():
    from mpolab import contract

    assert contract.core_path_penalty(32, weight_cached=False) == pytest.approx(0.75)
    assert contract.core_path_penalty(32) == pytest.approx(3.0)
    for batch in (1024, 8192):
        assert contract.core_path_penalty(batch, weight_cached=False) == contract.core_path_penalty(batch)
    mpo = decompose(torch.randn(3072, 768), max_rank=8)
    shapes = contract.core_shapes(mpo.cores)
    # training (no cached weight) at 32 rows: the rebuild is not worth it; eval with the cache: one GEMM
    assert contract.path_costs(shapes, 32, weight_cached=False).chosen == "cores"
    assert contract.path_costs(shapes, 32, weight_cached=True).chosen == "dense"
