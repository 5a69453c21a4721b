"""TopKGate: routing, renormalisation, value-one weighting, noise, aux losses, validation."""

import math

import pytest
import torch

from mpolab_moe import TopKGate
from mpolab_moe.gates import load_balancing_loss, router_z_loss


def test_top_k_picks_largest_probabilities_and_renormalises():
    torch.manual_seed(0)
    gate = TopKGate(16, 6, k=2)
    x = torch.randn(20, 16)
    r = gate(x)
    probs = torch.softmax(x @ gate.weight.T, -1)
    top = probs.topk(2, -1)
    assert torch.equal(r.expert_index, top.indices)
    torch.testing.assert_close(r.combine_weight, top.values / top.values.sum(-1, keepdim=True))
    assert gate.normalize and not TopKGate(16, 6, k=1).normalize


def test_value_one_weighting_keeps_router_gradient():
    torch.manual_seed(0)
    gate = TopKGate(8, 4, k=1, weighting="one")
    r = gate(torch.randn(10, 8))
    assert torch.equal(r.combine_weight, torch.ones(10, 1))
    r.combine_weight.sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert load_balancing_loss(uniform, torch.arange(8) % E).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(E)


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_noise_only_in_training_and_reproducible():
    gate = TopKGate(8, 4, k=1, noise="gaussian", noise_eps=1.0)
    x = torch.randn(50, 8)
    gate.eval()
    assert torch.equal(gate.logits(x), gate.logits(x))
    gate.train()
    torch.manual_seed(1)
    a = gate.logits(x)
    torch.manual_seed(1)
    b = gate.logits(x)
    assert torch.equal(a, b) and not torch.equal(a, gate.logits(x))
    jitter = TopKGate(8, 4, noise="jitter", noise_eps=0.1).train()
    assert not torch.equal(jitter.logits(x), jitter.logits(x))


def test_validation():
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        TopKGate(8, 4, k=5)
    with pytest.raises(ValueError, match="k must be a positive int"):
        TopKGate(8, 4, k=0)
    with pytest.raises(ValueError, match="noise"):
        TopKGate(8, 4, noise="uniform")
    with pytest.raises(ValueError, match="weighting"):
        TopKGate(8, 4, weighting="softmax")
    with pytest.raises(ValueError, match="d_model=8"):
        TopKGate(8, 4)(torch.randn(2, 5))
