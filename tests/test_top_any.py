"""DynMoE's top-any gate: threshold routing, straight-through gradients, eval fallback, adaptive slots."""

import pytest
import torch
import torch.nn.functional as F

from mpolab_moe.experts.dense import DenseExperts
from mpolab_moe.gates.top_any import TopAnyGate
from mpolab_moe.layer import MoE

D = 16


def simplex_centres(k: int = 4, d: int = D) -> torch.Tensor:
    """``[k, d]`` unit vectors with pairwise cosine ``-1/(k-1)``: a token near one is on no other's side."""
    basis = torch.eye(d)[:k]
    return F.normalize(basis - basis.mean(0), dim=-1)


def cluster_tokens(centres: torch.Tensor, which: list[int], per_cluster: int = 32, noise: float = 0.02) -> torch.Tensor:
    x = centres[which].repeat_interleave(per_cluster, dim=0)
    return x + noise * torch.randn_like(x)


def make_layer(num_slots: int = 8, num_active: int = 1, **kw: object) -> tuple[MoE, TopAnyGate]:
    gate = TopAnyGate(D, num_slots, num_active=num_active, **kw)  # type: ignore[arg-type]
    return MoE(gate, DenseExperts(D, 8, num_slots)), gate


def test_routing_is_the_threshold_rule_and_combine_is_the_mean() -> None:
    gate = TopAnyGate(D, 6, num_active=4, adaptive=False).train()
    with torch.no_grad():
        gate.threshold_logits.copy_(torch.tensor([-0.5, 0.0, 0.3, 0.1, 0.0, 0.0]))
    x = torch.randn(50, D)
    r = gate(x)
    s = torch.sigmoid(F.normalize(x, dim=-1) @ F.normalize(gate.weight, dim=0))
    expected = (s > torch.sigmoid(gate.threshold_logits)) & gate.active  # inactive slots never fire
    chosen = torch.zeros(50, 6, dtype=torch.bool)
    for t in range(50):
        ids = r.expert_index[t][r.expert_index[t] >= 0]
        chosen[t, ids] = True
        if ids.numel():
            torch.testing.assert_close(
                r.combine_weight[t][r.expert_index[t] >= 0], torch.full((ids.numel(),), 1 / ids.numel())
            )
    assert torch.equal(chosen, expected)
    assert not chosen[:, 4:].any()
    assert r.expert_index.shape[1] == int(expected.sum(-1).max())  # compacted to the largest k_t


def test_straight_through_gradient_reaches_embeddings_and_thresholds() -> None:
    gate = TopAnyGate(D, 6, num_active=4, aux_loss_weight=0.0, adaptive=False).train()
    x = torch.randn(40, D)
    r = gate(x)
    k_t = r.experts_per_token.clamp(min=1).unsqueeze(-1).float()
    (r.combine_weight * k_t * (r.expert_index >= 0)).sum().backward()  # = sum of the step values g
    fired = torch.zeros(6)
    for e in r.expert_index[r.expert_index >= 0].tolist():
        fired[e] += 1
    # d/dG_e sum_t step(s - sigmoid(G_e)) through relu's gradient: -sigmoid'(0) * (tokens firing e)
    torch.testing.assert_close(gate.threshold_logits.grad, -0.25 * fired)
    assert gate.weight.grad[:, :4].abs().sum() > 0
    assert gate.weight.grad[:, 4:].abs().sum() == 0  # inactive slots learn nothing


def test_aux_losses_are_weighted_terms_with_gradient() -> None:
    layer, gate = make_layer(num_slots=6, num_active=3, adaptive=False)
    layer.train()(torch.randn(64, D))
    aux = layer.last_routing.aux_losses
    assert set(aux) == {"diversity", "simplicity", "balance", "efficiency"}
    # orthogonal init: diversity starts at 0, simplicity at 1 (unit columns) times the weight 0.01
    assert aux["diversity"].item() == pytest.approx(0.0, abs=1e-6)
    assert aux["simplicity"].item() == pytest.approx(0.01, rel=1e-5)
    with torch.no_grad():
        gate.weight[:, 1] = gate.weight[:, 0]  # two identical experts: diversity must rise
    layer(torch.randn(64, D))
    assert layer.last_routing.aux_losses["diversity"].item() > 0.01
    layer.aux_loss.backward()
    assert gate.weight.grad.abs().sum() > 0
    only = TopAnyGate(D, 4, aux_terms=("efficiency",), aux_loss_weight=0.5)
    assert set(only.train()(torch.randn(8, D)).aux_losses) == {"efficiency"}


def test_zero_experts_in_training_and_argmax_fallback_in_eval() -> None:
    layer, gate = make_layer(num_slots=5, num_active=3, adaptive=False)
    with torch.no_grad():
        gate.threshold_logits.fill_(5.0)  # threshold 0.993 > any score: no token picks an expert
    x = torch.randn(30, D)
    y = layer.train()(x)
    assert layer.last_stats.tokens_without_expert == 30
    assert torch.equal(y, torch.zeros_like(y))  # only the residual would pass
    layer.eval()(x)
    r = layer.last_routing
    assert r.experts_per_token.min() >= 1 and layer.last_stats.tokens_without_expert == 0
    assert torch.equal(r.expert_index[:, 0], gate.scores(x).argmax(-1))
    assert bool((r.expert_index[:, 0] < 3).all())  # the fallback only picks active experts


def test_adaptive_slots_follow_the_data() -> None:
    """Clusters that no expert covers get an expert; experts nobody uses are switched off (the paper's process)."""
    centres = simplex_centres()
    layer, gate = make_layer(num_slots=8, num_active=1, record_steps=2, idle_steps=1)
    with torch.no_grad():
        gate.weight[:, 0] = centres[0]
    layer.train()
    params = [id(p) for p in gate.parameters()]

    def phase(clusters: list[int]) -> None:
        with torch.no_grad():
            for _ in range(6):  # two record/update/idle cycles
                layer(cluster_tokens(centres, clusters))

    counts = []
    for clusters in ([0], [0, 1], [0, 1, 2], [1, 2, 3], [1]):
        phase(clusters)
        counts.append(gate.num_active)
    assert counts == [1, 2, 3, 3, 1]
    # the expert covering cluster 0 was switched off and its slot reused for cluster 3
    assert [(r.removed, r.added) for r in gate.history if r.removed][:2] == [([0], 0), ([0, 2], None)]
    assert [id(p) for p in gate.parameters()] == params  # same parameters: optimizer state stays valid
    with torch.no_grad():
        layer(cluster_tokens(centres, [1]))
    assert layer.last_stats.tokens_without_expert == 0


def test_new_slot_is_normalised_sum_of_unrouted_inputs_and_optimizer_keeps_working() -> None:
    layer, gate = make_layer(num_slots=4, num_active=1, adaptive=False)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    centres = simplex_centres()
    with torch.no_grad():
        gate.weight[:, 0] = centres[0]
    gate.start_recording()
    for _ in range(3):
        opt.zero_grad()
        x = cluster_tokens(centres, [0, 2])
        (layer.train()(x).square().mean() + layer.aux_loss).backward()
        opt.step()
    unrouted = gate.unrouted_sum.clone()
    assert gate.unrouted_tokens == 3 * 32
    assert opt.state[gate.weight]["exp_avg"][:, 1].abs().sum() == 0  # inactive slot: no gradient so far
    opt.state[gate.weight]["exp_avg"][:, 1] = 1.0  # as if the slot had lived before and been removed
    result = gate.adapt(optimizer=opt)
    assert result.added == 1 and result.removed == [] and gate.num_active == 2
    torch.testing.assert_close(gate.weight[:, 1], unrouted / unrouted.norm())
    assert float(gate.threshold_logits.detach()[1]) == 0.0
    assert opt.state[gate.weight]["exp_avg"][:, 1].abs().sum() == 0  # moments of the reused slot cleared
    opt.zero_grad()
    (layer(cluster_tokens(centres, [0, 2])).square().mean() + layer.aux_loss).backward()
    opt.step()
    assert gate.weight.grad[:, 1].abs().sum() > 0  # the new expert trains


def test_adapt_needs_records_and_bad_arguments_raise() -> None:
    gate = TopAnyGate(D, 4, adaptive=False)
    with pytest.raises(ValueError, match="routing records"):
        gate.adapt()
    gate.start_recording()
    with pytest.raises(ValueError, match="routing records"):
        gate.adapt()
    for kwargs in ({"num_active": 0}, {"num_active": 5}, {"record_steps": 0}, {"idle_steps": -1}, {"aux_terms": ["x"]}):
        with pytest.raises(ValueError):
            TopAnyGate(D, 4, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_model=16"):
        gate(torch.randn(3, D + 1))


def test_state_dict_keeps_the_mask_not_the_records() -> None:
    gate = TopAnyGate(D, 4, num_active=2)
    assert set(gate.state_dict()) == {"weight", "threshold_logits", "active"}
    other = TopAnyGate(D, 4, num_active=4)
    other.load_state_dict(gate.state_dict())
    assert other.num_active == 2 and torch.equal(other.active_experts, torch.tensor([0, 1]))
    assert other.half().weight.dtype == torch.float32
