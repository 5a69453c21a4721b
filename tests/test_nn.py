import copy

import pytest
import torch
from torch import nn

import mpolab
from mpolab import MPOEmbedding, MPOLinear

from ._matrices import decaying_matrix


@pytest.fixture
def linear() -> nn.Linear:
    return nn.Linear(96, 120).double()


def test_from_linear_exact_matches_and_keeps_bias(linear):
    layer = MPOLinear.from_linear(linear, num_cores=3)
    x = torch.randn(4, 7, 96, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer.bias, linear.bias)
    assert layer.bias is not linear.bias  # a copy, not shared
    assert all(c.dtype == torch.float64 for c in layer.cores)


def test_to_linear_round_trip(linear):
    layer = MPOLinear.from_linear(linear, num_cores=3, max_rank=4)
    dense = layer.to_linear()
    x = torch.randn(5, 96, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x))
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float64


def test_issue_example_meets_rel_tol_with_the_measured_error():
    torch.manual_seed(0)
    linear = nn.Linear(768, 3072).double()
    with torch.no_grad():
        linear.weight.copy_(decaying_matrix(3072, 768, decay=0.3))
    W = linear.weight.detach().clone()
    layer = MPOLinear.from_linear(linear, rel_tol=0.1)
    mpo = mpolab.decompose(W, rel_tol=0.1)  # what from_linear did, with its reported error
    measured = float(torch.linalg.norm(W - layer.weight.detach()) / torch.linalg.norm(W))
    assert 0.01 < measured <= 0.1  # it truncated, within the tolerance
    assert mpo.truncation_error == pytest.approx(measured, rel=1e-6)
    assert layer.ranks == mpo.ranks and layer.num_mpo_params() < W.numel()
    layer.freeze_central()
    dense = layer.to_linear()
    x = torch.randn(2, 768, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x))
    with torch.no_grad():
        y_err = float(torch.linalg.norm(layer(x) - linear(x)) / torch.linalg.norm(linear(x)))
    assert y_err < 0.2  # outputs follow the weight error (bias exact)


def test_freeze_central_trains_only_auxiliary_tensors(linear):
    layer = MPOLinear.from_linear(linear, max_rank=4)
    layer.freeze_central()
    central = list(layer.central_parameters())
    aux = list(layer.auxiliary_parameters())
    assert len(central) == 1 and len(aux) == layer.num_cores - 1
    assert central[0] is layer.cores[layer.central_index]
    before = central[0].detach().clone()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(8, 96, dtype=torch.float64)).square().mean().backward()
    opt.step()
    assert torch.equal(central[0], before)
    assert all(p.grad is not None for p in aux)
    layer.unfreeze_central()
    assert central[0].requires_grad


def test_param_groups_for_mpo_lr(linear):
    model = nn.Sequential(MPOLinear.from_linear(linear, max_rank=4), nn.LayerNorm(120))
    layer = model[0]
    groups = mpolab.param_groups(model, lr=1e-2, mpo_lr=1e-4, weight_decay=0.1, mpo_weight_decay=0.0)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 0.1), (1e-4, 0.0)]
    assert {id(p) for p in groups[1]["params"]} == {id(c) for c in layer.cores}
    assert {id(p) for p in groups[0]["params"]} == {id(layer.bias), *(id(p) for p in model[1].parameters())}
    layer.freeze_central()  # frozen parameters leave the groups
    groups = mpolab.param_groups(model, lr=1e-2, mpo_lr=1e-4)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in layer.auxiliary_parameters()}
    opt = torch.optim.AdamW(groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_eval_cache_is_used_and_invalidated_by_optimizer_steps(linear, monkeypatch):
    layer = MPOLinear.from_linear(linear, max_rank=8)
    x = torch.randn(4, 96, dtype=torch.float64)
    calls = []
    real = layer._rebuild
    monkeypatch.setattr(layer, "_rebuild", lambda: calls.append(1) or real())
    layer.eval()
    with torch.no_grad():
        a = layer(x)
        b = layer(x)
    assert len(calls) == 1 and torch.equal(a, b)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        c = layer(x)
    torch.testing.assert_close(c, layer.to_linear()(x))
    assert not torch.allclose(a, c)


def test_cache_can_be_disabled(linear):
    layer = MPOLinear.from_linear(linear, max_rank=8, cache_weight=False)
    with torch.no_grad():
        layer(torch.randn(2, 96, dtype=torch.float64))
    assert layer._cache is None


def test_gradients_reach_every_core_in_training(linear):
    layer = MPOLinear.from_linear(linear, max_rank=8)
    layer(torch.randn(16, 96, dtype=torch.float64)).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    assert layer.bias.grad is not None


def test_state_dict_round_trip(linear):
    layer = MPOLinear.from_linear(linear, max_rank=[3, 5])
    assert set(layer.state_dict()) == {"bias", "cores.0", "cores.1", "cores.2"}
    fresh = MPOLinear(96, 120, max_rank=[3, 5], num_cores=3, dtype=torch.float64)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 96, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x))


def test_extra_repr_shows_shapes_and_ranks():
    layer = MPOLinear(768, 3072, max_rank=32)
    text = repr(layer)
    assert "in_features=768" in text and "ranks=(12, 32, 32, 16)" in text and "of dense" in text


def test_random_init_has_linear_like_scale():
    layer = MPOLinear(768, 3072, max_rank=32)
    std = float(layer.weight.detach().std())
    assert 0.5 / (3 * 768) ** 0.5 < std < 2 / (3 * 768) ** 0.5


def test_deepcopy_and_no_bias():
    layer = MPOLinear(64, 64, max_rank=4, bias=False)
    with torch.no_grad():
        layer(torch.randn(2, 64))
    clone = copy.deepcopy(layer)
    assert clone.bias is None
    torch.testing.assert_close(clone(torch.ones(1, 64)), layer(torch.ones(1, 64)))


def test_bad_inputs(linear):
    layer = MPOLinear.from_linear(linear, max_rank=4)
    with pytest.raises(ValueError, match="last dimension 96"):
        layer(torch.randn(2, 95, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Linear"):
        MPOLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="rel_tol"):
        MPOLinear.from_linear(linear, rel_tol=2.0)


# ---------------------------------------------------------------------------- embeddings


@pytest.fixture
def embedding() -> nn.Embedding:
    return nn.Embedding(1009, 48, padding_idx=0).double()


def test_embedding_exact_lookup_matches(embedding):
    emb = MPOEmbedding.from_embedding(embedding, num_cores=3)
    ids = torch.randint(0, 1009, (3, 11))
    torch.testing.assert_close(emb(ids), embedding(ids))  # training path (cores need grad)
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), embedding(ids))  # cached path
    assert emb.padding_idx == 0 and emb.to_embedding().padding_idx == 0


def test_embedding_training_lookup_never_rebuilds_the_table(embedding, monkeypatch):
    emb = MPOEmbedding.from_embedding(embedding, max_rank=6)
    monkeypatch.setattr(emb, "_rebuild", lambda: pytest.fail("rebuilt the whole table"))
    ids = torch.tensor([[5, 7, 5, 1008]])
    out = emb(ids)
    out.sum().backward()
    assert out.shape == (1, 4, 48)
    assert all(c.grad is not None for c in emb.cores)
    torch.testing.assert_close(out[0, 0], out[0, 2])


def test_embedding_large_vocabulary_is_padded():
    emb = MPOEmbedding(30522, 64, max_rank=8)
    assert emb.mpo.padded_shape[0] > 30522
    ids = torch.tensor([0, 30521])
    rows = emb(ids)
    torch.testing.assert_close(rows, emb.weight.detach()[ids])


def test_embedding_bad_inputs(embedding):
    emb = MPOEmbedding.from_embedding(embedding, max_rank=4)
    with pytest.raises(TypeError, match="token ids"):
        emb(torch.tensor([1.0]))
    with pytest.raises(IndexError, match="1009"):
        emb(torch.tensor([1009]))
    with pytest.raises(TypeError, match="nn.Embedding"):
        MPOEmbedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="max_norm"):
        MPOEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))
