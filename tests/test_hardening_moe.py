"""The mpolab_moe cases of issue 13, one test each (all failed before the fix)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from mpolab_moe import DenseExperts, MoE, TopKGate, aux_loss, moefy
from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.mpo import MPOExperts
from mpolab_moe.ffn import ffn_slots, find_ffns
from mpolab_moe.grad_mask import GradientMask
from mpolab_moe.recipes import build_emoe


class GatedMLP(nn.Module):
    """A LLaMA look-alike FFN (gate_proj, up_proj, down_proj), recognised by find_ffns."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, d, bias=False), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def ffn_stack(n: int = 3, d: int = 8, hidden: int = 32) -> nn.Sequential:
    """A model of ``n`` recognised FFNs."""
    torch.manual_seed(0)
    return nn.Sequential(*[GatedMLP(d, hidden) for _ in range(n)])


# ----------------------------------------------------------------------------- capacity in eval


def test_capacity_does_not_apply_in_eval_by_default():
    torch.manual_seed(0)
    layer = MoE(TopKGate(8, 4, k=2), DenseExperts(8, 16, 4), capacity_factor=0.5).eval()
    a, b = torch.randn(3, 8), torch.randn(20, 8)
    alone = layer(a)
    assert layer.last_stats.dropped == 0
    together = layer(torch.cat([a, b]))[:3]  # the same tokens, other tokens in the batch
    torch.testing.assert_close(alone, together)


def test_capacity_in_eval_is_an_explicit_opt_in():
    torch.manual_seed(0)
    layer = MoE(TopKGate(8, 4, k=2), DenseExperts(8, 16, 4), capacity_factor=0.5, capacity_in_eval=True).eval()
    layer(torch.randn(40, 8))
    assert layer.last_stats.dropped > 0
    assert "training and eval" in repr(layer)
    with pytest.raises(TypeError, match="capacity_in_eval must be True or False"):
        MoE(TopKGate(8, 4), DenseExperts(8, 16, 4), capacity_factor=1.0, capacity_in_eval="yes")


def test_capacity_still_applies_in_training():
    layer = MoE(TopKGate(8, 4, k=2), DenseExperts(8, 16, 4), capacity_factor=0.5).train()
    layer(torch.randn(40, 8))
    assert layer.last_stats.dropped > 0


def test_emoe_inference_does_not_depend_on_batch_composition():
    model = ffn_stack(1, d=16, hidden=64)
    moe = build_emoe(find_ffns(model)[0], num_experts=8, k=2).eval()
    x = torch.randn(1, 1, 16).expand(2, 8, 16) + 0.01 * torch.randn(2, 8, 16)  # all tokens want the same experts
    torch.testing.assert_close(moe(x[:1]), moe(x)[:1])
    assert moe.last_stats.dropped == 0


# ----------------------------------------------------------------------------- deepcopy after a forward


def test_deepcopy_after_training_forward():
    layer = MoE(TopKGate(8, 4, k=2), DenseExperts(8, 16, 4)).train()
    y = layer(torch.randn(5, 8))
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    twin = copy.deepcopy(layer)
    assert twin.aux_loss is None and twin.last_routing is None
    assert layer.aux_loss is not None  # the original keeps its graph for backward
    (y.sum() + aux_loss(nn.Sequential(layer))).backward()
    pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(twin(torch.ones(2, 8)), layer(torch.ones(2, 8)))


def test_deepcopy_of_a_moefied_model_after_training_forward():
    model = ffn_stack(2)
    moefy(model, layers=[0], num_experts=4, experts="dense")
    model.train()
    model(torch.randn(3, 8))
    teacher = copy.deepcopy(model)
    assert isinstance(teacher[0], MoE)


# ----------------------------------------------------------------------------- moefy layer numbers


def test_moefy_same_index_twice_is_refused_not_shifted():
    model = ffn_stack(3)
    first = moefy(model, layers=[0], num_experts=2, experts="dense")
    assert [r.name for r in first.layers] == ["0"]
    with pytest.raises(ValueError, match=r"layer 0 \('0'\) is already a mixture of experts"):
        moefy(model, layers=[0], num_experts=2, experts="dense")
    second = moefy(model, layers=[1, -1], num_experts=2, experts="dense")
    assert [r.name for r in second.layers] == ["1", "2"]
    assert ffn_slots(model) == ["0", "1", "2"]


def test_moefy_negative_index_keeps_meaning():
    model = ffn_stack(3)
    moefy(model, layers=[-1], num_experts=2, experts="dense")
    report = moefy(model, layers=[-2], num_experts=2, experts="dense")
    assert [r.name for r in report.layers] == ["1"]
    with pytest.raises(ValueError, match="out of range: Sequential has 3 FFNs"):
        moefy(model, layers=[3], num_experts=2, experts="dense")


# ----------------------------------------------------------------------------- GradientMask.attach


def mpoe_model() -> tuple[nn.Module, MPOExperts]:
    weights = FFNWeights(torch.randn(32, 8), torch.randn(8, 32), b1=torch.randn(32), b2=torch.randn(8))
    bank = MPOExperts.from_ffn(weights, 4)
    return nn.Sequential(MoE(TopKGate(8, 4, k=1), bank)), bank


def test_attach_refuses_an_optimizer_without_the_central_tensors():
    model, bank = mpoe_model()
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    mask = GradientMask(model, p_b=1.0, seed=0)
    with pytest.raises(ValueError, match="does not hold 2 of the 2 trainable central tensors"):
        mask.attach(other)
    only_experts = torch.optim.SGD(list(bank.expert_parameters()), lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        mask.attach(only_experts)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        mask.attach("adam")


def test_attach_accepts_frozen_central_tensors_outside_the_optimizer():
    model, bank = mpoe_model()
    for p in bank.central_parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    GradientMask(model, p_b=0.5, seed=0).attach(torch.optim.SGD(trainable, lr=0.1))
