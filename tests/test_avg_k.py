"""EMoE's avg-k gate: router = mean key rows, one-score exactness, refresh after optimizer steps."""

import pytest
import torch
import torch.nn.functional as F

from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.dense import DenseExperts
from mpolab_moe.experts.sliced import SlicedExperts
from mpolab_moe.gates.avg_k import AvgKGate, refresh_avg_k_gates
from mpolab_moe.layer import MoE

D, FF, E = 16, 64, 8


def random_ffn(gated: bool = False, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(FF, D, generator=g) / D**0.5,
        "w2": torch.randn(D, FF, generator=g) / FF**0.5,
        "b1": None if gated else torch.randn(FF, generator=g) * 0.1,
        "b2": None if gated else torch.randn(D, generator=g) * 0.1,
        "w_gate": torch.randn(FF, D, generator=g) / D**0.5 if gated else None,
    }


def dense(ffn: dict[str, torch.Tensor | None], x: torch.Tensor, act=F.relu) -> torch.Tensor:  # noqa: ANN001
    up = F.linear(x, ffn["w1"], ffn["b1"])
    h = act(F.linear(x, ffn["w_gate"])) * up if ffn["w_gate"] is not None else act(up)
    return F.linear(h, ffn["w2"], ffn["b2"])


def sliced(ffn: dict[str, torch.Tensor | None], activation: str = "relu", **kw: object) -> SlicedExperts:
    groups = torch.randperm(FF, generator=torch.Generator().manual_seed(3)).view(E, FF // E)
    return SlicedExperts.from_ffn(
        FFNWeights(ffn["w1"], ffn["w2"], b1=ffn["b1"], b2=ffn["b2"], w_gate=ffn["w_gate"], activation=activation, **kw),
        groups,
    )


@pytest.mark.parametrize("gated", [False, True])
def test_all_experts_with_one_score_is_the_dense_ffn(gated: bool) -> None:
    ffn = random_ffn(gated)
    layer = MoE(AvgKGate(D, E, k=E), sliced(ffn, "silu" if gated else "relu")).train()  # noise on: irrelevant at k=E
    x = torch.randn(3, 10, D)
    torch.testing.assert_close(layer(x), dense(ffn, x, F.silu if gated else F.relu), atol=1e-5, rtol=1e-5)
    assert bool((layer.last_routing.combine_weight == 1).all())


def test_router_is_mean_of_key_rows_and_topk_follows_logits() -> None:
    ffn = random_ffn()
    bank = sliced(ffn)
    gate = AvgKGate(D, E, k=3, one_score=False, normalize=False).eval()
    MoE(gate, bank)
    expected_rows = torch.stack([ffn["w1"][bank.groups[e]].mean(0) for e in range(E)])
    torch.testing.assert_close(gate.router, expected_rows)
    assert [n for n, _ in gate.named_parameters()] == []  # frozen: nothing to train
    x = torch.randn(20, D)
    r = gate(x)
    probs = (x @ expected_rows.T).softmax(-1)
    torch.testing.assert_close(r.combine_weight, probs.topk(3, -1).values)  # softmax probs, not renormalised
    assert torch.equal(r.expert_index, probs.topk(3, -1).indices)
    r1 = AvgKGate(D, E, k=3, keys=bank.keys()).eval()(x)
    assert torch.equal(r1.expert_index, r.expert_index) and bool((r1.combine_weight == 1).all())


def test_one_score_zeroes_unselected_neuron_groups() -> None:
    ffn = random_ffn()
    bank = sliced(ffn)
    layer = MoE(AvgKGate(D, E, k=2), bank).eval()
    x = torch.randn(12, D)
    y = layer(x)
    mask = torch.zeros(12, FF)
    for t, experts in enumerate(layer.last_routing.expert_index.tolist()):
        mask[t, bank.groups[experts].flatten()] = 1.0
    h = F.relu(F.linear(x, ffn["w1"], ffn["b1"])) * mask
    torch.testing.assert_close(y, F.linear(h, ffn["w2"], ffn["b2"]), atol=1e-5, rtol=1e-5)


def test_training_noise_is_gate_noise_over_e() -> None:
    gate = AvgKGate(D, E, k=1, keys=torch.zeros(E, 4, D), gate_noise=2.0, balance_loss_weight=0.0)
    x = torch.randn(20000, D)
    torch.manual_seed(0)
    logits = torch.log(gate.train()(x).probs)  # zero router: the logits are the noise (up to a constant)
    noise = logits - logits.mean(-1, keepdim=True)
    assert noise.std().item() == pytest.approx(2.0 / E * ((E - 1) / E) ** 0.5, rel=0.03)
    assert torch.equal(gate.eval()(x).probs, torch.full((20000, E), 1 / E))  # no noise in eval


def test_attach_refreshes_the_router_after_each_optimizer_step() -> None:
    ffn = random_ffn()
    model = torch.nn.Sequential(MoE(AvgKGate(D, E, k=2, gate_noise=0.0), sliced(ffn)))
    gate, bank = model[0].gate, model[0].experts
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = AvgKGate.attach(opt, model)
    before = gate.router.clone()
    model(torch.randn(32, D)).square().sum().backward()
    opt.step()
    assert not torch.allclose(gate.router, before)
    torch.testing.assert_close(gate.router, bank.keys().detach().mean(1))
    handle.remove()
    with torch.no_grad():
        bank.w1.add_(1.0)
    opt.step()
    assert not torch.allclose(gate.router, bank.keys().detach().mean(1))  # detached: stale until refreshed
    assert refresh_avg_k_gates(model) == 1
    torch.testing.assert_close(gate.router, bank.keys().detach().mean(1))


def test_activation_score_is_mean_activated_value() -> None:
    ffn = random_ffn()
    bank = sliced(ffn, "gelu")
    gate = AvgKGate(D, E, k=2, score="activation").eval()
    MoE(gate, bank)
    x = torch.randn(9, D)
    expected = bank.hidden(x).mean(-1)  # plain FFN: act(x W1 + b1) per neuron, averaged per expert
    torch.testing.assert_close(gate.logits(x), expected)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="k=9 exceeds"):
        AvgKGate(D, E, k=9)
    with pytest.raises(ValueError, match="score"):
        AvgKGate(D, E, k=2, score="gate")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AvgKGate cannot route DenseExperts: the gate needs KEYS"):
        MoE(AvgKGate(D, E, k=2), DenseExperts(D, 8, E))
    with pytest.raises(ValueError, match="no keys"):
        AvgKGate(D, E, k=2)(torch.randn(3, D))
    with pytest.raises(ValueError, match="keys must be"):
        AvgKGate(D, E, k=2, keys=torch.zeros(E + 1, 4, D))
    gate = AvgKGate(D, E, k=2, keys=torch.zeros(E, 4, D))
    with pytest.raises(ValueError, match="d_model=16"):
        gate(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="no AvgKGate"):
        AvgKGate.attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), torch.nn.Linear(2, 2))
