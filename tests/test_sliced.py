"""SlicedExperts: a dense FFN split into neuron groups, exact when every group is selected."""

import pytest
import torch
import torch.nn.functional as F

from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.sliced import SlicedExperts
from mpolab_moe.ffn import find_ffns
from mpolab_moe.gates.base import Gate
from mpolab_moe.layer import MoE
from mpolab_moe.routing import Routing
from mpolab_moe.split import random_split

from ._hf import FAMILIES, inputs_for, main_output

D, FF, E = 12, 48, 6


class AllExperts(Gate):
    """Every token to every expert with weight 1."""

    def __init__(self, d: int, e: int) -> None:
        super().__init__()
        self.d_model, self.num_experts = d, e

    def forward(self, x: torch.Tensor) -> Routing:
        idx = torch.arange(self.num_experts).expand(x.shape[0], -1)
        return Routing(idx, torch.ones(idx.shape), self.num_experts)

    def bind(self, experts: torch.nn.Module) -> None:
        pass


class Fixed(AllExperts):
    def __init__(self, d: int, e: int, index: torch.Tensor) -> None:
        super().__init__(d, e)
        self.index = index

    def forward(self, x: torch.Tensor) -> Routing:
        return Routing(self.index, torch.ones(self.index.shape), self.num_experts)


def ffn(gated: bool = False, bias: bool = True) -> dict:
    w = {"w1": torch.randn(FF, D), "w2": torch.randn(D, FF)}
    if bias:
        w |= {"b1": torch.randn(FF), "b2": torch.randn(D)}
    if gated:
        w["w_gate"] = torch.randn(FF, D)
    return w


def dense(x: torch.Tensor, w: dict, act=F.gelu) -> torch.Tensor:
    pre = x @ w["w1"].T + (w["b1"] if "b1" in w else 0)
    h = act(x @ w["w_gate"].T) * pre if "w_gate" in w else act(pre)
    return h @ w["w2"].T + (w["b2"] if "b2" in w else 0)


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False), (True, True), (False, False)])
def test_all_experts_give_back_the_dense_ffn(gated: bool, bias: bool) -> None:
    w = ffn(gated, bias)
    groups = random_split(FF, E, seed=3)
    extra = {name: w[name] for name in ("b1", "b2", "w_gate") if name in w}
    bank = SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], activation="gelu", **extra), groups)
    x = torch.randn(2, 5, D)
    layer = MoE(AllExperts(D, E), bank)
    torch.testing.assert_close(layer(x), dense(x, w), rtol=1e-5, atol=1e-4)


def test_from_ffn_stores_groups_and_round_trips() -> None:
    w = ffn(gated=True)
    groups = random_split(FF, E, seed=1)
    bank = SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], b1=w["b1"], b2=w["b2"], w_gate=w["w_gate"]), groups)
    assert bank.num_experts == E and bank.expert_size == FF // E and bank.in_features == D
    assert bank.w1.shape == (E, D, FF // E) and bank.w2.shape == (E, FF // E, D) and bank.b1.shape == (E, FF // E)
    assert torch.equal(bank.groups, groups)
    # expert 2's first neuron is groups[2, 0]: its W1 row, b1 entry and W2 column
    n = int(groups[2, 0])
    assert torch.equal(bank.w1[2, :, 0], w["w1"][n]) and torch.equal(bank.w2[2, 0], w["w2"][:, n])
    assert bank.b1[2, 0] == w["b1"][n]
    assert torch.equal(bank.keys()[2, 0], w["w_gate"][n])  # gated: keys are the gate rows
    dense = bank.to_dense_ffn()
    w1, b1, w2, b2, wg = dense.w1, dense.b1, dense.w2, dense.b2, dense.w_gate
    assert torch.equal(w1, w["w1"]) and torch.equal(b1, w["b1"]) and torch.equal(w2, w["w2"])
    assert torch.equal(b2, w["b2"]) and torch.equal(wg, w["w_gate"])
    assert torch.equal(bank.output_bias, w["b2"])


def test_keys_are_w1_rows_for_plain_ffns() -> None:
    w = ffn()
    bank = SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], b1=w["b1"]), random_split(FF, E))
    assert bank.keys().shape == (E, FF // E, D)
    assert torch.equal(bank.keys()[0], w["w1"][bank.groups[0]])


def test_selected_subset_equals_dense_ffn_with_other_neurons_zeroed() -> None:
    w = ffn()
    groups = random_split(FF, E, seed=2)
    bank = SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], b1=w["b1"], b2=w["b2"], activation="relu"), groups)
    x = torch.randn(7, D)
    index = torch.stack([torch.randperm(E)[:2] for _ in range(7)])
    out = MoE(Fixed(D, E, index), bank)(x)
    h = F.relu(x @ w["w1"].T + w["b1"])
    mask = torch.zeros(7, FF)
    for t in range(7):
        mask[t, groups[index[t]].reshape(-1)] = 1
    torch.testing.assert_close(out, (h * mask) @ w["w2"].T + w["b2"], rtol=1e-5, atol=1e-4)


def test_split_bias_mode_adds_b2_over_k_per_expert() -> None:
    w = ffn()
    groups = random_split(FF, E)
    k = 3
    bank = SlicedExperts.from_ffn(
        FFNWeights(w["w1"], w["w2"], b1=w["b1"], b2=w["b2"]), groups, bias_mode="split", bias_k=k
    )
    assert bank.output_bias is None
    x = torch.randn(4, D)
    index = torch.tensor([[0, 1, 2]] * 4)
    out = MoE(Fixed(D, E, index), bank)(x)
    shared = SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], b1=w["b1"], b2=w["b2"]), groups)
    torch.testing.assert_close(out, MoE(Fixed(D, E, index), shared)(x), rtol=1e-5, atol=1e-5)
    # one expert only: b2 / k instead of b2
    one = torch.tensor([[4]] * 4)
    diff = MoE(Fixed(D, E, one), shared)(x) - MoE(Fixed(D, E, one), bank)(x)
    torch.testing.assert_close(diff, (w["b2"] * (1 - 1 / k)).expand(4, D), rtol=1e-5, atol=1e-5)


def test_activity_and_hidden_shapes() -> None:
    w = ffn(gated=True)
    bank = SlicedExperts.from_ffn(
        FFNWeights(w["w1"], w["w2"], w_gate=w["w_gate"], activation="silu"), random_split(FF, E)
    )
    x = torch.randn(3, D)
    h = bank.hidden(x)
    assert h.shape == (3, E, FF // E)
    full = F.silu(x @ w["w_gate"].T) * (x @ w["w1"].T)
    torch.testing.assert_close(h.reshape(3, -1), full[:, bank.groups.reshape(-1)], rtol=1e-5, atol=1e-5)
    assert torch.equal(bank.activity(x), h.abs())


def test_gradients_reach_expert_weights() -> None:
    w = ffn()
    bank = SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], b1=w["b1"], b2=w["b2"]), random_split(FF, E))
    MoE(AllExperts(D, E), bank)(torch.randn(3, D)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (bank.w1, bank.w2, bank.b1, bank.b2))


@pytest.mark.parametrize(
    "groups,err,match",
    [
        (torch.arange(FF).view(E, -1).float(), TypeError, "integer"),
        (torch.arange(FF - 6).view(E, -1), ValueError, "F = 48"),
        (torch.zeros(E, FF // E, dtype=torch.long), ValueError, "permutation"),
        (torch.arange(1, FF + 1).view(E, -1), ValueError, "permutation"),
    ],
)
def test_bad_groups(groups: torch.Tensor, err: type, match: str) -> None:
    w = ffn()
    with pytest.raises(err, match=match):
        SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"]), groups)


def test_bad_shapes_and_options() -> None:
    w = ffn()
    g = random_split(FF, E)
    with pytest.raises(ValueError, match="does not take w1.s .* hidden units"):
        SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"][:, :-1]), g)
    with pytest.raises(ValueError, match="w_gate"):
        SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"], w_gate=torch.randn(FF, D + 1)), g)
    with pytest.raises(ValueError, match="bias_mode"):
        SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"]), g, bias_mode="half")
    with pytest.raises(ValueError, match="bias_k"):
        SlicedExperts.from_ffn(FFNWeights(w["w1"], w["w2"]), g, bias_k=E + 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_models_unchanged_with_every_expert_selected(family: str) -> None:
    # T5 (ReLU), GPT-2 (gelu_new), BERT (GELU), LLaMA (SwiGLU, keys = gate rows)
    model = FAMILIES[family]()
    inputs = inputs_for(family)
    with torch.no_grad():
        before = main_output(model, model(**inputs))
        for f in find_ffns(model):
            groups = random_split(f.d_ff, 4, seed=0)
            bank = SlicedExperts.from_ffn(
                FFNWeights(f.w1, f.w2, b1=f.b1, b2=f.b2, w_gate=f.w_gate, activation=f.activation), groups
            )
            assert torch.equal(bank.keys()[0], (f.w_gate if f.w_gate is not None else f.w1)[groups[0]])
            f.install(model, MoE(AllExperts(f.d_model, 4), bank))
        after = main_output(model, model(**inputs))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
