"""The three recipes through ``moefy``: every family converts and trains; paper defaults; exactness at k = E."""

import copy

import pytest
import torch
from torch import nn

from mpolab_moe.convert import moefy
from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.dense import DenseExperts
from mpolab_moe.experts.mpo import MPOExperts
from mpolab_moe.experts.sliced import SlicedExperts
from mpolab_moe.ffn import FFN, find_ffns
from mpolab_moe.gates.avg_k import AvgKGate
from mpolab_moe.gates.moefication import MLPGate, SimilarityGate
from mpolab_moe.gates.top_any import TopAnyGate
from mpolab_moe.layer import MoE, aux_loss, moe_layers
from mpolab_moe.recipes import build_dynmoe, build_emoe, build_moefication, dynmoe_layers, emoe_layers, split_ffn
from mpolab_moe.registry import registered_methods

from ._hf import FAMILIES, inputs_for, main_output

METHODS = ("moefication", "emoe", "dynmoe")
GATES = {"moefication": SimilarityGate, "emoe": AvgKGate, "dynmoe": TopAnyGate}


def test_methods_are_registered() -> None:
    assert set(METHODS) <= set(registered_methods())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_each_method_converts_and_trains_each_family(family: str, method: str) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    n_ffns = len(find_ffns(model))
    report = moefy(model, method=method)
    layers = moe_layers(model)
    assert len(layers) == len(report.layers) >= 1
    expected = {"moefication": list(range(n_ffns)), "emoe": emoe_layers(n_ffns, family)}.get(
        method, dynmoe_layers(n_ffns, family)
    )
    assert len(layers) == len(expected)
    assert all(isinstance(m.gate, GATES[method]) for m in layers.values())
    model.train()
    out = main_output(model, model(**inputs_for(family)))
    loss = out.float().square().mean() + aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    for layer in layers.values():
        grads = [p.grad for p in layer.experts.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the experts train
        assert layer.last_stats is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_emoe_with_all_experts_and_one_score_is_the_original_model(family: str) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    inputs = inputs_for(family)
    with torch.no_grad():
        before = main_output(model, model(**inputs))
    converted = copy.deepcopy(model)
    moefy(converted, method="emoe", num_experts=16, k=16)  # split and avg-k gate, capacity 1.5, k = E
    converted.eval()
    with torch.no_grad():
        after = main_output(converted, converted(**inputs))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    layer = next(iter(moe_layers(converted).values()))
    assert layer.capacity_factor == 1.5 and layer.last_stats.dropped == 0


def test_dynmoe_on_upcycled_copies_equals_the_ffn_in_eval() -> None:
    torch.manual_seed(0)
    model = FAMILIES["gpt2"]()
    inputs = inputs_for("gpt2")
    with torch.no_grad():
        before = main_output(model, model(**inputs))
    report = moefy(model, method="dynmoe")
    layer = next(iter(moe_layers(model).values()))
    assert isinstance(layer.experts, DenseExperts) and layer.num_experts == 16
    assert layer.gate.num_active == 8 and (layer.gate.record_steps, layer.gate.idle_steps) == (300, 300)
    with torch.no_grad():
        after = main_output(model, model(**inputs))  # mean over copies of the FFN; eval falls back to top-1
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert report.layers[0].num_experts == 16


def test_paper_defaults_and_layer_choices() -> None:
    assert emoe_layers(12, "bert") == [10, 11]
    assert emoe_layers(24, "t5") == [10, 11, 22, 23]  # each stack's last two blocks
    assert dynmoe_layers(12, "bert") == [10, 11]
    assert dynmoe_layers(6, "llama") == [0, 2, 4]
    torch.manual_seed(0)
    ffn = FFN.from_module(nn.Sequential(nn.Linear(16, 3072), nn.ReLU(), nn.Linear(3072, 16)))
    moe = build_moefication(ffn, split="random")  # T5-base width: 96 experts of 32 neurons, k = 20
    assert (moe.num_experts, moe.gate.k, moe.experts.expert_size) == (96, 20, 32)
    emoe = build_emoe(ffn, split="random")
    assert (emoe.num_experts, emoe.gate.k, emoe.capacity_factor) == (16, 4, 1.5)
    assert emoe.gate.one_score and emoe.gate.gate_noise == 1.0 and emoe.gate.balance_loss_weight == 0.01
    llama = find_ffns(FAMILIES["llama"]())[0]
    gated = build_emoe(llama, split="random")  # LLaMA variant: 64 experts, k = 16, scored on gate_proj
    assert (gated.num_experts, gated.gate.k) == (64, 16)
    torch.testing.assert_close(gated.gate.router, gated.experts.w_gate.detach().transpose(1, 2).mean(1))
    sliced = build_dynmoe(ffn, experts="sliced", split="random")  # DynMoE over neuron groups instead of copies
    assert isinstance(sliced.experts, SlicedExperts) and sliced.num_experts == 16 and sliced.gate.num_active == 8
    assert sliced(torch.randn(5, 16)).shape == (5, 16)


def test_mlp_router_needs_hidden_states_or_falls_back_to_similarity() -> None:
    torch.manual_seed(0)
    model = FAMILIES["bert"]()
    with pytest.warns(UserWarning, match="similarity router is used instead"):
        moefy(copy.deepcopy(model), method="moefication", layers=[0], router="mlp")
    name = find_ffns(model)[0].name
    hidden = {name: torch.randn(64, 32)}
    moefy(model, method="moefication", layers=[0], router="mlp", hidden_states=hidden, router_options={"epochs": 2})
    layer = next(iter(moe_layers(model).values()))
    assert isinstance(layer.gate, MLPGate) and isinstance(layer.experts, SlicedExperts)
    model(**inputs_for("bert"))


def test_bad_options_raise() -> None:
    model = FAMILIES["bert"]()
    with pytest.raises(ValueError, match="experts must be 'sliced'"):
        moefy(model, method="emoe", experts="dense")
    with pytest.raises(ValueError, match="top-any"):
        moefy(model, method="dynmoe", gate="top1")
    with pytest.raises(ValueError, match="unknown split"):
        moefy(model, method="moefication", split="metis")
    with pytest.raises(ValueError, match="d_model=32"):
        moefy(model, method="moefication", layers=[0], router="mlp", hidden_states=torch.randn(8, 31))
    with pytest.raises(ValueError, match="no entry"):
        moefy(model, method="moefication", layers=[0], router="mlp", hidden_states={"other": torch.randn(8, 32)})
    with pytest.raises(ValueError, match="k=5 exceeds"):
        moefy(model, method="moefication", num_experts=4, k=5)
    assert not moe_layers(model)  # every error left the model untouched


def test_parts_mix_split_with_top_any_and_mpo_experts_with_avg_k() -> None:
    torch.manual_seed(0)
    ffn = find_ffns(FAMILIES["bert"]())[0]
    x = torch.randn(2, 5, 32)
    bank = split_ffn(ffn, 8)  # MoEfication's balanced k-means split ...
    layer = MoE(TopAnyGate(32, 8, num_active=4), bank).train()  # ... routed by DynMoE's top-any gate
    (layer(x).square().mean() + layer.aux_loss).backward()
    assert layer.gate.weight.grad is not None and bank.w1.grad is not None
    # MPOE's experts routed by avg-k: the router rows come from the split's mean key rows
    mpo = MPOExperts.from_ffn(FFNWeights(ffn.w1, ffn.w2, b1=ffn.b1, b2=ffn.b2, activation=ffn.activation), 8)
    gate = AvgKGate(32, 8, k=2, one_score=False, normalize=True, keys=bank.keys().detach())
    layer = MoE(gate, mpo).eval()
    torch.testing.assert_close(gate.router, bank.keys().detach().mean(1))  # kept: MPOExperts has no keys()
    dense = ffn.module.output.dense(ffn.module.intermediate(x))  # every MPO expert is still the FFN
    torch.testing.assert_close(layer(x), dense, atol=1e-4, rtol=1e-4)
