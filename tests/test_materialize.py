"""mpolab.materialize: weights built once per optimiser step, exact gradient accumulation, never stale."""

import copy

import pytest
import torch
from torch import nn

import mpolab
from mpolab import MPOEmbedding, MPOLinear, materialize
from mpolab.step_weight import StepWeight, flush_pending
from mpolab_moe import GradientMask, MoE, MPOExperts, TopKGate
from mpolab_moe.experts.base import FFNWeights

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        MPOLinear(24, 32, max_rank=4, num_cores=3), nn.ReLU(), MPOLinear(32, 8, max_rank=4, num_cores=3)
    )


def moe_model(seed=0, d=8, d_ff=32):
    torch.manual_seed(seed)
    ffn = FFNWeights(torch.randn(d_ff, d), torch.randn(d, d_ff), b1=torch.randn(d_ff), b2=torch.randn(d))
    bank = MPOExperts.from_ffn(ffn, 4)
    return nn.Sequential(nn.Linear(d, d), MoE(TopKGate(d, 4, k=1), bank))


def micro_batches(m, rows, width, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g) for _ in range(m)]


def run(model, make_opt, batches, steps, *, materialized, mask_p=None, mask_first=True, clip=None, flush_after=None):
    """``steps`` optimiser steps of ``len(batches)`` accumulated micro-batches; returns the parameters."""
    opt = make_opt(model.parameters())
    weights = None

    def attach_mask():
        return GradientMask(model, p_b=mask_p, seed=3).attach(opt) if mask_p is not None else None

    mask = attach_mask() if mask_first else None
    if materialized:
        weights = materialize(model, flush_after=flush_after).attach(opt)
    if not mask_first:
        mask = attach_mask()
    for step in range(steps):
        for x in batches:
            (model(x + step).square().mean() / len(batches)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    if mask is not None:
        assert mask.num_steps == steps
    return {n: p.detach().clone() for n, p in model.named_parameters()}, weights


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_mpo_linear_accumulation_equals_the_plain_path(optimizer):
    batches = micro_batches(4, 64, 24)
    plain, _ = run(linear_model(), OPTIMIZERS[optimizer], batches, 3, materialized=False)
    model = linear_model()
    ours, weights = run(model, OPTIMIZERS[optimizer], batches, 3, materialized=True)
    assert_same(plain, ours)
    assert weights.num_flushed == 2 * 3  # two layers, once per step (not once per micro-batch)
    assert plain["0.cores.0"].ne(linear_model().state_dict()["0.cores.0"]).any()  # the steps did move the cores


def test_the_weight_is_built_once_per_step_and_is_a_leaf():
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    materialize(model).attach(opt)
    layer = model[0]
    calls = []
    rebuild = layer._rebuild
    layer._rebuild = lambda: calls.append(1) or rebuild()
    for x in micro_batches(3, 64, 24):
        model(x).sum().backward()
        assert layer.step_weight.built and layer.step_weight.pending
    assert len(calls) == 1
    assert all(c.grad is None for c in layer.cores)  # deferred until the step
    opt.step()
    assert not layer.step_weight.built
    model(micro_batches(1, 64, 24)[0]).sum().backward()
    assert len(calls) == 2  # the step changed the cores: rebuilt


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mask_p", [None, 0.5])
def test_mpoe_accumulation_equals_the_plain_path_with_and_without_the_mask(optimizer, mask_p):
    batches = micro_batches(3, 40, 8)
    plain, _ = run(moe_model(), OPTIMIZERS[optimizer], batches, 4, materialized=False, mask_p=mask_p)
    ours, weights = run(moe_model(), OPTIMIZERS[optimizer], batches, 4, materialized=True, mask_p=mask_p)
    assert_same(plain, ours)
    assert weights.num_flushed == 2 * 4  # w1 and w2, once per step


def test_mpoe_with_the_grouped_rebuild_accumulates_exactly():
    assert moe_model(d=48, d_ff=96)[1].experts.hidden_groups is not None  # the digit-reversed layout is in use
    batches = micro_batches(3, 40, 48)
    plain, _ = run(moe_model(d=48, d_ff=96), OPTIMIZERS["adamw"], batches, 3, materialized=False, mask_p=0.5)
    ours, weights = run(moe_model(d=48, d_ff=96), OPTIMIZERS["adamw"], batches, 3, materialized=True, mask_p=0.5)
    assert_same(plain, ours)
    assert weights.num_flushed == 2 * 3


@pytest.mark.parametrize("mask_first", [True, False])
def test_mask_sees_the_core_gradients_whichever_hook_was_attached_first(mask_first):
    batches = micro_batches(2, 40, 8)
    plain, _ = run(moe_model(), OPTIMIZERS["adam"], batches, 4, materialized=False, mask_p=0.5)
    ours, _ = run(moe_model(), OPTIMIZERS["adam"], batches, 4, materialized=True, mask_p=0.5, mask_first=mask_first)
    assert_same(plain, ours)


def test_mask_flushes_pending_gradients_before_it_decides():
    model = moe_model()
    bank = model[1].experts
    weights = materialize(model)
    mask = GradientMask(model, p_b=0.0, seed=0)
    model(torch.randn(16, 8)).sum().backward()
    assert weights.pending and bank.w1.central.grad is None
    mask.apply()
    assert not weights.pending and bank.w1.central.grad is not None
    mask.restore()


def test_clipping_needs_flush_after_and_then_matches_the_plain_path():
    batches = micro_batches(4, 64, 24)
    plain, _ = run(linear_model(), OPTIMIZERS["adamw"], batches, 2, materialized=False, clip=0.05)
    ours, w = run(linear_model(), OPTIMIZERS["adamw"], batches, 2, materialized=True, clip=0.05, flush_after=4)
    assert_same(plain, ours)
    assert w.num_flushed == 2 * 2
    late, _ = run(linear_model(), OPTIMIZERS["adamw"], batches, 2, materialized=True, clip=0.05)
    assert any(not torch.allclose(plain[n], late[n], atol=1e-5) for n in plain)  # clipped before the flush


def test_no_grad_micro_batches_mixed_in_change_nothing():
    batches = micro_batches(3, 64, 24)
    plain, _ = run(linear_model(), OPTIMIZERS["adam"], batches, 2, materialized=False)
    model = linear_model()
    opt = OPTIMIZERS["adam"](model.parameters())
    materialize(model).attach(opt)
    for step in range(2):
        for x in batches:
            with torch.no_grad():
                before = model(x + step)
            (model(x + step).square().mean() / len(batches)).backward()
            with torch.no_grad():
                torch.testing.assert_close(model(x + step), before)  # evaluation between micro-batches
        opt.step()
        opt.zero_grad()
    assert_same(plain, {n: p.detach() for n, p in model.named_parameters()})


def fresh_output(layer, x):
    """What a layer with the same parameters, never materialised, computes."""
    clone = copy.deepcopy(layer)
    assert clone.step_weight is None or not clone.step_weight.built  # copies do not carry the weight
    with torch.no_grad():
        return clone(x)


def test_editing_cores_between_steps_rebuilds():
    layer = MPOLinear(24, 32, max_rank=4, num_cores=3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    materialize(layer).attach(opt)
    x = torch.randn(64, 24)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        layer.cores[1].mul_(2.0)
    torch.testing.assert_close(layer(x), fresh_output(layer, x))


def test_load_state_dict_and_dtype_change_rebuild():
    layer = MPOLinear(24, 32, max_rank=4, num_cores=3)
    other = MPOLinear(24, 32, max_rank=4, num_cores=3)
    materialize(layer)
    x = torch.randn(64, 24)
    layer(x)  # built, nothing pending yet
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))
    layer.double()
    y = layer(x.double())
    assert y.dtype == torch.float64 and layer.step_weight.params[0].dtype == torch.float64
    torch.testing.assert_close(y, fresh_output(layer, x.double()))


def test_editing_cores_between_micro_batches_is_refused():
    layer = MPOLinear(24, 32, max_rank=4, num_cores=3)
    weights = materialize(layer)
    x = torch.randn(64, 24)
    layer(x).sum().backward()
    with torch.no_grad():
        layer.cores[0].add_(1.0)
    with pytest.raises(RuntimeError, match="changed .* while gradients of earlier micro-batches were still pending"):
        layer(x)
    with pytest.raises(RuntimeError, match="flush"):
        weights.flush()
    weights.discard()
    torch.testing.assert_close(layer(x), fresh_output(layer, x))


def test_mpoe_bank_rebuilds_after_a_state_dict_load():
    model = moe_model()
    materialize(model)
    bank = model[1].experts
    x = torch.randn(40, 8)
    model(x)
    other = moe_model(seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bank.w1.expert_weights(), other[1].experts.w1.rebuild())
    torch.testing.assert_close(model(x), other(x))


def test_two_optimisers_over_one_layer_are_refused():
    model = moe_model()
    weights = materialize(model)
    weights.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="two optimisers"):
        weights.attach(torch.optim.Adam(model[1].parameters()))
    fresh = moe_model()
    with pytest.raises(ValueError, match="holds 1 of the 5 trainable parameters of a materialised SharedCentralMPO"):
        materialize(fresh).attach(torch.optim.SGD([fresh[1].experts.w1.central], lr=0.1))


def test_split_optimiser_and_second_materializer_are_refused():
    layer = MPOLinear(24, 32, max_rank=4, num_cores=3)
    with pytest.raises(ValueError, match="holds 1 of the 3 trainable parameters of a materialised MPOLinear"):
        materialize(layer).attach(torch.optim.SGD([layer.cores[0]], lr=0.1))
    with pytest.raises(ValueError, match="already materialised"):
        materialize(layer)


def test_detach_returns_to_rebuilding_every_forward():
    layer = MPOLinear(24, 32, max_rank=4, num_cores=3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    weights = materialize(layer).attach(opt)
    layer(torch.randn(64, 24)).sum().backward()
    weights.detach()  # flushes what is pending
    assert layer.step_weight is None and all(c.grad is not None for c in layer.cores)
    materialize(layer)  # a new materializer may take over


def test_mpo_embedding_accumulation_equals_the_plain_path():
    def model():
        torch.manual_seed(0)
        return MPOEmbedding(64, 16, max_rank=4, num_cores=3)

    ids = [torch.randint(0, 64, (8, 5), generator=torch.Generator().manual_seed(k)) for k in range(3)]

    def train(emb, materialized):
        opt = torch.optim.Adam(emb.parameters(), lr=1e-2)
        if materialized:
            materialize(emb).attach(opt)
        for _ in range(2):
            for i in ids:
                emb(i).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return {n: p.detach() for n, p in emb.named_parameters()}

    assert_same(train(model(), False), train(model(), True))


def test_bad_inputs():
    with pytest.raises(ValueError, match="no materialisable layer in Linear"):
        materialize(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        materialize("model")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="flush_after"):
            materialize(MPOLinear(8, 8, max_rank=2), flush_after=bad)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        materialize(MPOLinear(8, 8, max_rank=2)).attach("sgd")


def test_data_parallel_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="2 processes"):
        materialize(MPOLinear(8, 8, max_rank=2))


def test_step_weight_alone_and_flush_pending():
    core = torch.randn(3, 3, requires_grad=True)
    slot = StepWeight()
    w = slot.get([core], lambda: core * 2)
    assert slot.get([core], lambda: pytest.fail("rebuilt")) is w
    (w * torch.arange(3.0)).sum().backward()
    assert slot.pending and core.grad is None
    assert slot.flush() and not slot.built
    torch.testing.assert_close(core.grad, 2 * torch.arange(3.0).expand(3, 3))
    assert flush_pending(nn.Linear(2, 2)) == 0


def test_hf_trainer_gradient_accumulation_equals_the_plain_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mpolab_moe import moefy
    from tests._hf import tiny_gpt2

    def trained(materialized):
        torch.manual_seed(0)
        model = tiny_gpt2().train()
        moefy(model, layers=[1], num_experts=4, experts="mpo")
        ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
        examples = [{"input_ids": r, "labels": r} for r in ids]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(materialized)), max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=4, max_grad_norm=0.5, save_strategy="no", report_to=[], use_cpu=True,
            seed=0, disable_tqdm=True, dataloader_drop_last=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=examples, optimizers=(opt, None))
        if materialized:
            weights = mpolab.materialize(model, flush_after=lambda: trainer.accelerator.sync_gradients).attach(opt)
        trainer.train()
        if materialized:
            assert weights.num_flushed == 2 * 2  # the bank's w1 and w2, once per optimiser step
        return {n: p.detach() for n, p in model.named_parameters()}

    assert_same(trained(False), trained(True))
