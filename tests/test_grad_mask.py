"""GradientMask: masked steps leave central tensors and unrouted experts bit-identical, under any optimizer."""

import pytest
import torch
from torch import nn

from mpolab_moe import MoE, TopKGate
from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.mpo import MPOExperts
from mpolab_moe.grad_mask import GradientMask


class FixedGate(TopKGate):
    """Top-1 gate that always routes to the given experts (to control which experts see tokens)."""

    def __init__(self, d, E, experts):
        super().__init__(d, E, k=1, weighting="one")
        self.experts = experts

    def forward(self, x):
        routing = super().forward(x)
        index = torch.tensor(self.experts)[torch.arange(x.shape[0]) % len(self.experts)]
        routing.expert_index = index[:, None]
        return routing


def make_model(experts=(0, 2)):
    bank = MPOExperts.from_ffn(
        FFNWeights(torch.randn(32, 8), torch.randn(8, 32), b1=torch.randn(32), b2=torch.randn(8)), 4
    )
    return nn.Sequential(MoE(FixedGate(8, 4, list(experts)), bank)), bank


def train_step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(2, 6, 8)).square().mean().backward()
    optimizer.step()


def snapshot(bank):
    return {
        "central": [c.detach().clone() for c in bank.central_parameters()],
        "experts": [p.detach().clone() for p in bank.expert_parameters()],
    }


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
    ],
    ids=["adam", "adamw", "adam-for-loop", "sgd-momentum"],
)
def test_masked_step_freezes_central_and_unrouted_experts_bit_identically(make_optimizer):
    model, bank = make_model(experts=(0, 2))
    optimizer = make_optimizer(model.parameters())
    mask = GradientMask(model, p_b=0.0, seed=0).attach(optimizer)
    for _ in range(2):  # build optimizer state (momentum) for every tensor, all experts routed once
        model[0].gate.experts = [0, 1, 2, 3]
        train_step(model, optimizer)
    model[0].gate.experts = [0, 2]
    mask.p_b = 1.0
    before = snapshot(bank)
    state_before = {k: v.clone() for k, v in optimizer.state[bank.w1.central].items() if torch.is_tensor(v)}
    train_step(model, optimizer)
    assert mask.last_masked
    after = snapshot(bank)
    for b, a in zip(before["central"], after["central"]):
        assert torch.equal(a, b), "a masked step must not move the shared central tensor"
    for k, v in optimizer.state[bank.w1.central].items():
        if torch.is_tensor(v):
            assert torch.equal(v, state_before[k]), f"optimizer state {k} of the central tensor changed"
    for b, a in zip(before["experts"], after["experts"]):
        assert torch.equal(a[[1, 3]], b[[1, 3]]), "unrouted experts must be bit-identical"
        assert not torch.equal(a[[0, 2]], b[[0, 2]]), "routed experts must update"
    # An unmasked step moves the central tensor.
    mask.p_b = 0.0
    train_step(model, optimizer)
    assert not mask.last_masked
    assert not torch.equal(bank.w1.central, after["central"][0])


def test_p_b_one_never_updates_central_p_b_zero_always_does():
    model, bank = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = GradientMask(model, p_b=1.0, seed=3).attach(optimizer)
    start = bank.w2.central.detach().clone()
    for _ in range(5):
        train_step(model, optimizer)
    assert torch.equal(bank.w2.central, start) and mask.num_masked == mask.num_steps == 5
    mask.detach()
    mask = GradientMask(model, p_b=0.0, seed=3).attach(optimizer)
    for _ in range(3):
        before = bank.w2.central.detach().clone()
        train_step(model, optimizer)
        assert not torch.equal(bank.w2.central, before)
    assert mask.num_masked == 0


def test_same_seed_same_mask_sequence_and_rate():
    def sequence(seed):
        model, _ = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        mask = GradientMask(model, p_b=0.5, seed=seed).attach(optimizer)
        out = []
        for _ in range(40):
            train_step(model, optimizer)
            out.append(mask.last_masked)
        return out

    a, b, c = sequence(7), sequence(7), sequence(8)
    assert a == b and a != c
    assert 8 <= sum(a) <= 32


def test_manual_apply_restore_and_gradient_accumulation():
    model, bank = make_model(experts=(1,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = GradientMask([bank], p_b=1.0, seed=0)
    optimizer.zero_grad()
    model(torch.randn(1, 4, 8)).sum().backward()
    model[0].gate.experts = [3]
    model(torch.randn(1, 4, 8)).sum().backward()  # accumulated: experts 1 and 3 routed
    assert mask.routed_experts(bank).tolist() == [False, True, False, True]
    before = snapshot(bank)
    assert mask.apply(optimizer)
    optimizer.step()
    mask.restore()
    after = snapshot(bank)
    for b, a in zip(before["experts"], after["experts"]):
        assert torch.equal(a[[0, 2]], b[[0, 2]]) and not torch.equal(a[[1, 3]], b[[1, 3]])
    assert mask.routed_experts(bank).sum() == 0


def test_bad_inputs():
    model, bank = make_model()
    for bad in (-0.1, 1.5, "0.5", None, True):
        with pytest.raises(ValueError, match="p_b must be a probability"):
            GradientMask(model, p_b=bad)
    with pytest.raises(ValueError, match="no MPOExperts bank found in Linear"):
        GradientMask(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expected MPOExperts"):
        GradientMask([nn.Linear(3, 3)])
    assert "p_b=0.5" in repr(GradientMask(model))


def test_replica_group_needs_an_initialised_process_group():
    model, _ = make_model()
    with pytest.raises(ValueError, match="replica_group was given but torch.distributed is not initialised"):
        GradientMask(model, replica_group=object())


def test_the_mask_lives_and_dies_with_its_model_and_optimizer_without_a_reference_cycle():
    """Hooks hold the mask, the mask holds banks and optimizer weakly: freed by reference counting.

    (A cycle would keep the mask, and a process group it holds, until some later garbage
    collection, possibly at interpreter exit, where a live gloo group can abort the process.)
    """
    import gc
    import weakref

    model, bank = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = weakref.ref(GradientMask(model, p_b=1.0, seed=0).attach(optimizer))
    train_step(model, optimizer)  # the hooks keep an unnamed mask working
    assert mask() is not None and mask().num_masked == 1 and mask().banks == [bank]
    gc.disable()
    try:
        del model, bank, optimizer
        assert mask() is None, "the mask outlived its model and optimizer: a reference cycle holds it"
    finally:
        gc.enable()

    model, bank = make_model()
    kept = GradientMask(model, p_b=1.0, seed=0)
    del model, bank
    with pytest.raises(RuntimeError, match="banks were freed"):
        _ = kept.banks
