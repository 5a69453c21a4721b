"""The gate x bank matrix: every pair either works (forward, backward, statistics) or is refused at
construction with the reason, and the refused pairs are exactly those whose bank lacks a capability
the gate needs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mpolab_moe import (
    AvgKGate,
    Capability,
    DenseExperts,
    ExpertBank,
    FFNWeights,
    Gate,
    GroundTruthGate,
    IA3Experts,
    LoRAExperts,
    MLPGate,
    MoE,
    MPOExperts,
    SimilarityGate,
    SingleExpertGate,
    SlicedExperts,
    SoftMergeGate,
    TopAnyGate,
    TopKGate,
    random_split,
)
from mpolab_moe.experts.base import KeyedBank, NeuronGroupBank, SoftBank

D, F = 8, 16


def sliced(E: int) -> SlicedExperts:
    g = torch.Generator().manual_seed(E)
    ffn = FFNWeights(torch.randn(F, D, generator=g), torch.randn(D, F, generator=g), b1=torch.randn(F, generator=g))
    return SlicedExperts.from_ffn(ffn, random_split(F, E))


BANKS: dict[str, Callable[[int], ExpertBank]] = {
    "dense": lambda E: DenseExperts(D, F, E),
    "mpo": lambda E: MPOExperts(D, F, E, num_cores=2, max_rank=4),
    "sliced": sliced,
    "lora": lambda E: LoRAExperts(D, D, E, r=2),
    "ia3": lambda E: IA3Experts(D, E),
}

#: (gate factory, experts) -- every gate class, and avg-k with and without keys of its own.
GATES: dict[str, tuple[Callable[[int], Gate], int]] = {
    "top_k": (lambda E: TopKGate(D, E, k=2), 4),
    "avg_k": (lambda E: AvgKGate(D, E, k=2), 4),
    "avg_k_with_keys": (lambda E: AvgKGate(D, E, k=2, keys=sliced(E).keys().detach()), 4),
    "avg_k_activation": (lambda E: AvgKGate(D, E, k=2, score="activation"), 4),
    "top_any": (lambda E: TopAnyGate(D, E, num_active=3), 4),
    "soft_merge": (lambda E: SoftMergeGate(D, E), 4),
    "soft_merge_top_k": (lambda E: SoftMergeGate(D, E, top_k=2), 4),
    "ground_truth": (lambda E: GroundTruthGate(sliced(E), k=2), 4),
    "similarity": (lambda E: SimilarityGate(sliced(E), k=2), 4),
    "mlp": (lambda E: MLPGate.from_bank(sliced(E), k=2), 4),
    "single": (lambda E: SingleExpertGate(D), 1),
}

#: Which protocol a bank must satisfy for each capability.
PROTOCOLS = {Capability.KEYS: KeyedBank, Capability.NEURON_GROUPS: NeuronGroupBank, Capability.SOFT: SoftBank}

#: The pairs that cannot work: the gate needs neuron keys / neuron groups only SlicedExperts has.
REFUSED = {
    (gate, bank) for gate in ("avg_k", "avg_k_activation", "ground_truth") for bank in ("dense", "mpo", "lora", "ia3")
}


def test_every_gate_and_bank_class_is_in_the_matrix():
    import mpolab_moe

    gate_classes = {type(make(E)) for make, E in GATES.values()}
    bank_classes = {type(make(4)) for make in BANKS.values()}
    exported = {getattr(mpolab_moe, n) for n in mpolab_moe.__all__}
    assert {c for c in exported if isinstance(c, type) and issubclass(c, Gate) and c is not Gate} - {
        mpolab_moe.BankBoundGate
    } == gate_classes
    assert {
        c for c in exported if isinstance(c, type) and issubclass(c, ExpertBank) and c is not ExpertBank
    } == bank_classes


@pytest.mark.parametrize("bank_name", list(BANKS))
@pytest.mark.parametrize("gate_name", list(GATES))
def test_pair_works_or_is_refused_at_construction(gate_name, bank_name):
    torch.manual_seed(0)
    make_gate, E = GATES[gate_name]
    gate, bank = make_gate(E), BANKS[bank_name](E)
    missing = gate.requires() - bank.capabilities
    # a declared capability is a real one: the bank satisfies the matching protocol, and the
    # banks that lack it really have no such methods
    for capability, protocol in PROTOCOLS.items():
        assert isinstance(bank, protocol) == (capability in bank.capabilities), (bank_name, capability)
    if (gate_name, bank_name) in REFUSED:
        assert missing
        with pytest.raises(TypeError, match=rf"{type(gate).__name__} cannot route {type(bank).__name__}: "
                           rf"the gate needs .*{'|'.join(c.name for c in missing)}"):  # fmt: skip
            MoE(gate, bank)
        return
    assert not missing
    layer = MoE(gate, bank).train()
    x = torch.randn(2, 5, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, bank.out_features) and torch.isfinite(y).all()
    ((y * torch.randn_like(y)).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.parameters()), "no gradient reached the bank"
    stats = layer.last_stats
    assert stats is not None and stats.num_tokens == 10 and stats.tokens_per_expert.shape == (E,)
    assert int(stats.tokens_per_expert.sum()) > 0


@pytest.mark.parametrize("gate_name", ["soft_merge", "soft_merge_top_k", "single"])
def test_soft_gates_refuse_a_capacity(gate_name):
    make_gate, E = GATES[gate_name]
    with pytest.raises(ValueError, match="soft routing gives every token to every expert"):
        MoE(make_gate(E), BANKS["lora"](E), capacity_factor=1.5)


def test_soft_routing_merges_in_soft_banks_and_runs_every_expert_elsewhere():
    torch.manual_seed(0)
    x = torch.randn(6, D)
    lora = MoE(SoftMergeGate(D, 4), BANKS["lora"](4))
    lora(x)
    assert lora.last_stats.tokens_per_expert.tolist() == [6, 6, 6, 6]  # one merged product, all weights
    dense = MoE(SoftMergeGate(D, 4), BANKS["dense"](4))
    dense(x)
    assert dense.last_stats.tokens_per_expert.tolist() == [6, 6, 6, 6]  # every expert on every token
