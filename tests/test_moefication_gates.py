"""MoEfication routers: ground truth (oracle), similarity, MLP (trained), and the activation-mass metric."""

import pytest
import torch
import torch.nn.functional as F

from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.sliced import SlicedExperts
from mpolab_moe.gates.moefication import (
    GroundTruthGate,
    MLPGate,
    SimilarityGate,
    activation_mass_captured,
    expert_activation_mass,
    expert_centers,
    train_mlp_gate,
)
from mpolab_moe.layer import MoE
from mpolab_moe.routing import Routing
from mpolab_moe.split import balanced_kmeans, random_split

D, FF, E = 16, 128, 8


def structured(seed: int = 0, gated: bool = False) -> tuple[SlicedExperts, torch.Tensor, torch.Tensor]:
    """An FFN whose neurons form E directions, split by k-means, and tokens near those directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(E, D, generator=g), dim=1)
    label = torch.arange(FF) % E
    w1 = dirs[label] * 2 + 0.3 * torch.randn(FF, D, generator=g)
    w2 = torch.randn(D, FF, generator=g) / FF**0.5
    wg = w1 if gated else None
    keys = wg if gated else w1
    up = torch.randn(FF, D, generator=g) if gated else w1
    ffn = FFNWeights(
        up, w2, b1=torch.full((FF,), -0.5), b2=torch.randn(D), w_gate=wg, activation="silu" if gated else "relu"
    )
    bank = SlicedExperts.from_ffn(ffn, balanced_kmeans(keys, E))

    def tokens(n: int) -> torch.Tensor:
        mix = torch.rand(n, E, generator=g) ** 4  # a few directions dominate each token
        return mix @ dirs * 3 + 0.2 * torch.randn(n, D, generator=g)

    return bank, tokens(1500), tokens(400)


def dense_out(bank: SlicedExperts, x: torch.Tensor) -> torch.Tensor:
    dense = bank.to_dense_ffn()
    w1, b1, w2, b2, wg = dense.w1, dense.b1, dense.w2, dense.b2, dense.w_gate
    pre = x @ w1.T + (b1 if b1 is not None else 0)
    h = bank.act(x @ wg.T) * pre if wg is not None else bank.act(pre)
    return h @ w2.T + b2


def test_ground_truth_picks_largest_mass_and_is_an_upper_bound() -> None:
    bank, train, test = structured()
    k = 2
    gt = GroundTruthGate(bank, k)
    routing = gt(test)
    mass = expert_activation_mass(bank, test)
    assert torch.equal(routing.expert_index.sort(-1).values, mass.topk(k, -1).indices.sort(-1).values)
    assert torch.equal(routing.combine_weight, torch.ones(len(test), k))
    best = activation_mass_captured(bank, test, gt)
    sim = activation_mass_captured(bank, test, SimilarityGate(bank, k))
    rand = activation_mass_captured(bank, test, torch.randint(E, (len(test), k)))
    assert best >= sim and best > rand + 0.2
    assert sim > rand  # the similarity router uses the structure


@pytest.mark.parametrize("gated", [False, True])
def test_all_experts_selected_is_dense_and_captures_everything(gated: bool) -> None:
    bank, _, test = structured(gated=gated)
    for gate in (GroundTruthGate(bank, E), SimilarityGate(bank, E), MLPGate.from_bank(bank, E)):
        assert activation_mass_captured(bank, test, gate) == pytest.approx(1.0)
        torch.testing.assert_close(MoE(gate, bank)(test), dense_out(bank, test), rtol=1e-4, atol=1e-4)


def test_moe_output_is_dense_ffn_with_unselected_groups_zeroed() -> None:
    bank, _, test = structured()
    layer = MoE(GroundTruthGate(bank, 3), bank)
    out = layer(test)
    idx = layer.last_routing.expert_index
    keep = torch.zeros(len(test), E).scatter_(1, idx, 1.0)
    h = bank.hidden(test) * keep.unsqueeze(-1)  # [T, E, m]
    ref = torch.einsum("tem,emo->to", h, bank.w2) + bank.b2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_similarity_gate_is_nearest_normalised_center() -> None:
    bank, _, test = structured()
    centers = F.normalize(bank.keys(), dim=-1).mean(1)
    torch.testing.assert_close(expert_centers(bank), centers)
    dist = torch.cdist(F.normalize(test, dim=-1), centers)
    routing = SimilarityGate(bank, 3)(test)
    assert torch.equal(routing.expert_index, dist.topk(3, dim=-1, largest=False).indices)
    assert list(SimilarityGate(bank, 3).parameters()) == []


def test_gated_ground_truth_scores_the_intermediate_magnitude() -> None:
    bank, _, test = structured(gated=True)
    dense = bank.to_dense_ffn()
    h = F.silu(test @ dense.w_gate.T) * (test @ dense.w1.T + dense.b1)
    mass = h.abs()[:, bank.groups].sum(-1)
    torch.testing.assert_close(expert_activation_mass(bank, test), mass, rtol=1e-4, atol=1e-4)
    assert torch.equal(GroundTruthGate(bank, 2)(test).expert_index, mass.topk(2, -1).indices)


def test_mlp_gate_init() -> None:
    bank, _, test = structured(seed=2)
    gate = MLPGate.from_bank(bank, 2)
    torch.testing.assert_close(gate.fc1.weight, expert_centers(bank))
    assert torch.equal(gate.fc2.weight, torch.eye(E))
    assert gate.fc1.bias is None and gate.fc2.bias is None
    # at init the logits are tanh(centers . x/|x|): the similarity router's ranking (monotone in the dot product)
    sim = SimilarityGate(bank, 2)(test).expert_index
    assert (gate(test).expert_index == sim).float().mean() > 0.95
    routing = gate(test)
    assert routing.expert_index.shape == (len(test), 2) and torch.equal(
        routing.combine_weight, torch.ones(len(test), 2)
    )


def test_mlp_gate_training_learns_the_router() -> None:
    bank, train, test = structured(seed=2)
    k = 2
    gate = MLPGate(D, E, k)  # random first layer: it has to learn where the mass is
    before = activation_mass_captured(bank, test, gate)
    result = train_mlp_gate(gate, bank, train, epochs=12, batch_size=128)
    losses = result.losses
    assert len(losses) == 12 and len(result.val_mass) == 12 and losses[-1] < 0.9 * losses[0]
    assert result.val_mass[result.best_epoch] == max(result.val_mass)
    trained = activation_mass_captured(bank, test, gate)
    best = activation_mass_captured(bank, test, GroundTruthGate(bank, k))
    assert trained > before + 0.2 and trained > 0.85 * best


def test_activation_mass_captured_inputs() -> None:
    bank, _, test = structured()
    mass = expert_activation_mass(bank, test)
    idx = torch.tensor([[0, 1]]).expand(len(test), 2)
    expected = float(mass[:, :2].sum() / mass.sum())
    assert activation_mass_captured(bank, test, idx) == pytest.approx(expected, rel=1e-5)
    routing = Routing(idx, torch.ones(idx.shape), E)
    assert activation_mass_captured(bank, test, routing) == pytest.approx(expected, rel=1e-5)
    scores = torch.zeros(len(test), E)
    scores[:, :2] = 1
    assert activation_mass_captured(bank, test, scores, k=2) == pytest.approx(expected, rel=1e-5)
    empty = torch.tensor([[0, -1]]).expand(len(test), 2)  # -1 slots select nothing, duplicates count once
    assert activation_mass_captured(bank, test, empty) == pytest.approx(float(mass[:, 0].sum() / mass.sum()), rel=1e-5)
    with pytest.raises(ValueError, match="k is required"):
        activation_mass_captured(bank, test, scores)


def test_bad_inputs() -> None:
    bank, train, _ = structured()
    for make in (lambda k: GroundTruthGate(bank, k), lambda k: SimilarityGate(bank, k), lambda k: MLPGate(D, E, k)):
        for k in (0, E + 1):
            with pytest.raises(ValueError, match="k=9 exceeds|k must be"):
                make(k)
    gate = MLPGate.from_bank(bank, 2)
    with pytest.raises(ValueError, match=rf"\[N, {D}\]"):
        train_mlp_gate(gate, bank, torch.randn(10, D + 1))
    with pytest.raises(ValueError, match=rf"\[N, {D}\]"):
        gate(torch.randn(10, D - 1))
    with pytest.raises(ValueError, match=rf"\[N, {D}\]"):
        SimilarityGate(bank, 2)(torch.randn(10, 3))
    with pytest.raises(ValueError, match="val_fraction"):
        train_mlp_gate(gate, bank, train, val_fraction=1.0)
    with pytest.raises(ValueError, match="does not match"):
        train_mlp_gate(MLPGate(D, E // 2, 2), bank, train)
    with pytest.raises(TypeError, match="SlicedExperts"):
        GroundTruthGate(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="centers"):
        MLPGate(D, E, 2, centers=torch.randn(E, D + 1))


def test_ground_truth_gate_does_not_duplicate_the_bank() -> None:
    bank, _, test = structured()
    gate = GroundTruthGate(bank, 2)
    assert list(gate.parameters()) == []
    layer = MoE(gate, bank)
    assert all(not key.startswith("gate.") for key in layer.state_dict())
    other = SlicedExperts.from_ffn(bank.to_dense_ffn(), random_split(FF, E))
    MoE(gate, other)  # bind follows the layer's bank
    assert gate.bank is other
