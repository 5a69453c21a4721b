"""The MoE layer: dispatch, combine, capacity, soft routing, statistics and aux loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpolab_moe import Capability, DenseExperts, ExpertBank, Gate, MoE, Routing, TopKGate, aux_loss, moe_layers
from mpolab_moe.experts.base import FFNWeights


def reference(bank: DenseExperts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Token by token, slot by slot: the definition the batched layer must reproduce."""
    out = torch.zeros(x.shape[0], bank.out_features, dtype=x.dtype)
    for t in range(x.shape[0]):
        for s in range(routing.expert_index.shape[1]):
            e = int(routing.expert_index[t, s])
            if e < 0:
                continue
            h = bank.act(x[t] @ bank.w1[e] + bank.b1[e])
            out[t] += routing.combine_weight[t, s] * (h @ bank.w2[e] + bank.b2[e])
    return out


class FixedGate(Gate):
    """Routes by a fixed table; for testing the layer alone."""

    def __init__(self, index, weight, num_experts, d_model):
        super().__init__()
        self.index, self.weight = index, weight
        self.num_experts, self.d_model = num_experts, d_model

    def forward(self, x):
        return Routing(self.index, self.weight, self.num_experts)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_token_by_token_reference(k):
    torch.manual_seed(k)
    bank = DenseExperts(12, 20, 5, activation="gelu")
    layer = MoE(TopKGate(12, 5, k=k), bank)
    x = torch.randn(4, 7, 12)
    y = layer(x)
    assert y.shape == x.shape
    expected = reference(bank, x.reshape(-1, 12), layer.last_routing)
    torch.testing.assert_close(y.reshape(-1, 12), expected, atol=1e-5, rtol=1e-5)
    assert int(layer.last_stats.tokens_per_expert.sum()) == 28 * k


def test_empty_slots_give_zero_output_and_are_counted():
    torch.manual_seed(0)
    bank = DenseExperts(6, 8, 3)
    index = torch.tensor([[0, -1], [-1, -1], [2, 1]])
    gate = FixedGate(index, torch.ones(3, 2), 3, 6)
    layer = MoE(gate, bank)
    x = torch.randn(3, 6)
    y = layer(x)
    assert torch.equal(y[1], torch.zeros(6))
    torch.testing.assert_close(y, reference(bank, x, layer.last_routing))
    assert layer.last_stats.tokens_without_expert == 1
    assert layer.last_stats.tokens_per_expert.tolist() == [1, 1, 1]


def test_capacity_drops_later_choices_first_and_counts():
    torch.manual_seed(0)
    bank = DenseExperts(4, 8, 2)
    # 4 tokens, all first choice expert 0, second choice expert 1; capacity = ceil(2 * 0.5 * 4 / 2) = 2
    index = torch.tensor([[0, 1]] * 4)
    layer = MoE(FixedGate(index, torch.full((4, 2), 0.5), 2, 4), bank, capacity_factor=0.5)
    x = torch.randn(4, 4)
    y = layer(x)
    assert layer.last_stats.dropped == 4
    assert layer.last_stats.tokens_per_expert.tolist() == [2, 2]
    kept = Routing(torch.tensor([[0, 1], [0, 1], [-1, -1], [-1, -1]]), torch.full((4, 2), 0.5), 2)
    torch.testing.assert_close(y, reference(bank, x, kept))  # tokens 2, 3 dropped entirely: output 0
    assert layer.last_stats.tokens_without_expert == 2


def test_first_choices_have_priority_over_second_choices():
    bank = DenseExperts(4, 8, 2)
    # token 0's SECOND choice and token 1's FIRST choice compete for expert 1 with capacity 1
    index = torch.tensor([[0, 1], [1, 0]])
    layer = MoE(FixedGate(index, torch.ones(2, 2), 2, 4), bank, capacity_factor=0.5)
    x = torch.randn(2, 4)
    y = layer(x)
    kept = Routing(torch.tensor([[0, -1], [1, -1]]), torch.ones(2, 2), 2)
    torch.testing.assert_close(y, reference(bank, x, kept))


def test_gradients_reach_router_and_experts_and_aux_loss_collects():
    torch.manual_seed(0)
    model = nn.Sequential(
        MoE(TopKGate(8, 4, k=2, z_loss_weight=1e-3), DenseExperts(8, 16, 4)),
        nn.ReLU(),
        MoE(TopKGate(8, 4, k=1), DenseExperts(8, 16, 4)),
    )
    x = torch.randn(32, 8, requires_grad=True)
    loss = model(x).square().mean()
    total = aux_loss(model)
    assert set(moe_layers(model)) == {"0", "2"}
    expected = sum(m.aux_loss for m in moe_layers(model).values())
    torch.testing.assert_close(total, expected)
    assert total.item() > 0 and total.requires_grad
    (loss + 0.01 * total).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(model[0].last_stats.aux_losses) == {"balance", "z"}


def test_aux_loss_is_zero_without_moe():
    assert aux_loss(nn.Linear(2, 2)).item() == 0.0


class MeanSoftBank(ExpertBank):
    """Linear experts that merge their weights under soft routing (like MoLoRA/MoV do)."""

    capabilities = frozenset({Capability.SOFT})

    def __init__(self, d, E):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = E, d, d
        self.w = nn.Parameter(torch.randn(E, d, d))
        self.soft_calls = 0

    def forward(self, x, counts):
        from mpolab_moe import grouped_matmul

        return grouped_matmul(x, self.w, counts)

    def forward_soft(self, x, weight):
        self.soft_calls += 1
        return torch.einsum("td,te,edo->to", x, weight, self.w)


class SoftGate(Gate):
    soft = True

    def __init__(self, d, E):
        super().__init__()
        self.num_experts, self.d_model = E, d
        self.proj = nn.Linear(d, E, bias=False)

    def forward(self, x):
        return Routing.soft(self.proj(x).softmax(-1))


def test_soft_routing_uses_forward_soft_and_equals_sparse_over_all_experts():
    torch.manual_seed(0)
    bank, gate = MeanSoftBank(6, 3), SoftGate(6, 3)
    x = torch.randn(5, 6)
    soft_layer = MoE(gate, bank)
    soft = soft_layer(x)
    assert bank.soft_calls == 1
    assert soft_layer.last_stats.tokens_per_expert.tolist() == [5, 5, 5]

    class NoSoft(MeanSoftBank):  # the same experts without the capability: every expert on every token
        capabilities = frozenset()

    plain = NoSoft(6, 3)
    plain.load_state_dict(bank.state_dict())
    sparse = MoE(gate, plain)(x)
    assert plain.soft_calls == 0
    torch.testing.assert_close(soft, sparse, atol=1e-5, rtol=1e-5)


def test_capacity_with_a_soft_gate_is_refused_at_construction():
    with pytest.raises(ValueError, match="capacity_factor=2.0 with the soft gate SoftGate"):
        MoE(SoftGate(6, 3), MeanSoftBank(6, 3), capacity_factor=2.0)


def test_a_bank_declaring_a_capability_must_implement_it():
    with pytest.raises(TypeError, match="declares SOFT but has no forward_soft"):

        class Liar(ExpertBank):
            capabilities = frozenset({Capability.SOFT})

            def forward(self, x, counts):
                return x


def test_only_real_gates_and_banks_are_accepted():
    with pytest.raises(TypeError, match="gate must be a Gate"):
        MoE(nn.Linear(8, 4), DenseExperts(8, 16, 4))


def test_output_bias_is_added_once_per_token():
    class Biased(MeanSoftBank):
        @property
        def output_bias(self):
            return torch.full((6,), 10.0)

    bank = Biased(6, 3)
    index = torch.tensor([[0, 1, 2], [-1, -1, -1]])
    y = MoE(FixedGate(index, torch.zeros(2, 3), 3, 6), bank)(torch.randn(2, 6))
    torch.testing.assert_close(y, torch.full((2, 6), 10.0))


def test_empty_input_and_half_precision():
    layer = MoE(TopKGate(8, 4, k=2), DenseExperts(8, 16, 4))
    assert layer(torch.randn(0, 8)).shape == (0, 8)
    layer = layer.to(torch.bfloat16)
    assert layer.gate.weight.dtype == torch.float32  # router stays fp32
    y = layer(torch.randn(3, 5, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_bad_construction_and_inputs():
    with pytest.raises(ValueError, match="routes to 4 experts but the bank has 3"):
        MoE(TopKGate(8, 4), DenseExperts(8, 16, 3))
    with pytest.raises(ValueError, match="d_model=8 but the experts take 6"):
        MoE(TopKGate(8, 4), DenseExperts(6, 16, 4))
    for cf in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="capacity_factor"):
            MoE(TopKGate(8, 4), DenseExperts(8, 16, 4), capacity_factor=cf)
    with pytest.raises(TypeError, match="ExpertBank"):
        MoE(TopKGate(8, 4), nn.Linear(8, 8))
    layer = MoE(TopKGate(8, 4), DenseExperts(8, 16, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(2, 7))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite for 1 of 3 tokens"):
        layer(x)


def test_dense_experts_from_ffn_equals_the_ffn():
    torch.manual_seed(0)
    up, down = nn.Linear(8, 24), nn.Linear(24, 8)
    bank = DenseExperts.from_ffn(FFNWeights(up.weight, down.weight, b1=up.bias, b2=down.bias, activation="gelu"), 3)
    layer = MoE(TopKGate(8, 3, k=1, weighting="one"), bank)
    x = torch.randn(10, 8)
    torch.testing.assert_close(layer(x), down(F.gelu(up(x))), atol=1e-6, rtol=1e-5)
    gate_proj = nn.Linear(8, 24, bias=False)
    gated = DenseExperts.from_ffn(FFNWeights(up.weight, down.weight, w_gate=gate_proj.weight, activation="silu"), 2)
    y = MoE(TopKGate(8, 2, k=2, weighting="one", normalize=False), gated)(x)
    torch.testing.assert_close(
        y, 2 * F.linear(F.silu(gate_proj(x)) * F.linear(x, up.weight), down.weight), atol=1e-5, rtol=1e-5
    )


def test_no_token_routed_still_gives_every_parameter_a_zero_gradient():
    """DDP (find_unused_parameters=False) needs a gradient for every parameter, even when nothing was routed."""
    from mpolab_moe import TopAnyGate

    gate = TopAnyGate(6, 3)
    with torch.no_grad():
        gate.threshold_logits.fill_(5.0)  # threshold 0.993 > any score: no token picks an expert
    layer = MoE(gate, DenseExperts(6, 8, 3)).train()
    x = torch.randn(4, 6)
    y = layer(x)
    assert layer.last_stats.tokens_without_expert == 4 and torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert {"gate.threshold_logits", "experts.w1"} <= set(grads)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    with torch.no_grad():  # no graph to keep: plain zeros
        assert not layer(x).requires_grad
