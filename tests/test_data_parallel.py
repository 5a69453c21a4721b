"""Data parallel (DDP) and sharded (FSDP2) training of compressed and moefied models, with gloo.

Each spawned group runs several checks against a single-process reference built in the same
process from the same weights: outputs, losses and every gradient match to float tolerance, a few
Adam steps end in the same parameters, and evaluation forwards after the steps see the new weights
(a stale no-grad weight cache would not). Checkpoints written by 2 ranks load on 1 and on 4.

DDP runs with ``find_unused_parameters=False`` on purpose: expert banks stack their experts in
single parameters, so experts that receive no token still take part in the graph.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mpolab
import mpolab.distributed as mdist
import mpolab_moe
from tests._dist import run_distributed
from tests._hf import VOCAB, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

#: mpolab.compress; moefy with dense experts and top-1 (Switch); with MPO experts (MPOE) and top-2 (GShard)
KINDS = ("compressed", "dense", "mpo")
TOP_K = {"dense": 1, "mpo": 2}
WORLD = 2
GLOBAL_BATCH, LENGTH, STEPS = 4, 8, 3
AUX_WEIGHT = 0.01
TOL = {"rtol": 1e-4, "atol": 1e-5}


# ---------------------------------------------------------------------------------------- shared pieces
def build(kind: str) -> nn.Module:
    """A tiny LLaMA, compressed (``MPOLinear`` + ``MPOEmbedding``) or moefied; the same weights in every process."""
    torch.manual_seed(0)
    model = tiny_llama()
    if kind == "compressed":
        mpolab.compress(model, ["embed_tokens", "all-linear"], max_rank=4)
    elif kind in ("dense", "mpo"):
        k = TOP_K[kind]
        mpolab_moe.moefy(model, num_experts=8, experts=kind, gate=f"top{k}", k=k)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return model.train()


def batches(world: int) -> list[list[torch.Tensor]]:
    """``STEPS`` global batches, each split into ``world`` equal shards of token ids."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (STEPS, GLOBAL_BATCH, LENGTH), generator=g)
    return [list(step.chunk(world)) for step in ids]


def loss_of(model: nn.Module, ids: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """Language-model loss plus the MoE layers' aux losses (``module``: where the MoE layers are)."""
    loss = model(input_ids=ids, labels=ids).loss
    return loss + AUX_WEIGHT * mpolab_moe.aux_loss(module if module is not None else model)


def reference_step(reference: nn.Module, shards: list[torch.Tensor]) -> torch.Tensor:
    """What data parallelism computes, in one process: the mean over ranks of each rank's loss."""
    loss = torch.stack([loss_of(reference, ids) for ids in shards]).mean()
    loss.backward()
    return loss.detach()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor; other tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_same(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(full(got).detach(), want.detach(), **TOL, msg=lambda m: f"{name}: {m}")


def assert_same_params(model: nn.Module, reference: nn.Module, what: str, grads: bool = False) -> None:
    ref = dict(reference.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(ref), f"{what}: parameter names differ"
    for name, p in model.named_parameters():
        if grads:
            assert (p.grad is None) == (ref[name].grad is None), f"{what}: {name} has a gradient on one side only"
            if p.grad is not None:
                assert_same(f"{what} grad {name}", p.grad, ref[name].grad)
        else:
            assert_same(f"{what} {name}", p, ref[name])


def cached_weights(model: nn.Module) -> list[str]:
    """Names of the modules that hold a no-grad weight cache now (MPO layers, MPOE matrices)."""
    names = {id(m): n for n, m in model.named_modules()}
    held = []
    for owner in mdist.cache_owners(model):
        cache = getattr(owner, "_cache", None)
        if cache is not None and getattr(cache, "_entry", None) is not None:
            held.append(names[id(owner)])
    return held


def idle_expert_seen(model: nn.Module) -> bool:
    """Whether, on some rank, some MoE layer of ``model`` gave some expert no token in its latest forward."""
    layers = mpolab_moe.moe_layers(model).values()
    idle = torch.tensor(float(any(bool((m.last_stats.tokens_per_expert == 0).any()) for m in layers)))
    dist.all_reduce(idle)
    return bool(idle > 0)


# ---------------------------------------------------------------------------------------- DDP
def ddp_worker(rank: int, world: int, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    for kind in KINDS:
        model = build(kind)
        reference = copy.deepcopy(model)
        steps = batches(world)
        if rank == 1:  # a rank whose weights and no-grad caches differ until DDP broadcasts rank 0's
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            logits(model.eval(), steps[0][rank])
            model.train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        assert_same(
            f"{kind}: eval output after DDP's broadcast",
            logits(model.eval(), steps[0][rank]),
            logits(reference.eval(), steps[0][rank]),
        )
        model.train(), reference.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
        idle = False
        for step, shards in enumerate(steps):
            loss = loss_of(ddp, shards[rank], model)
            loss.backward()
            idle |= idle_expert_seen(model)
            ref_loss = reference_step(reference, shards)
            assert_same(f"{kind} step {step}: loss", mean_over_ranks(loss), ref_loss)
            assert_same_params(model, reference, f"{kind} step {step}", grads=True)
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        assert_same_params(model, reference, f"{kind} after {STEPS} steps")
        # eval after the steps: the no-grad caches built before training must not be served
        assert_same(
            f"{kind}: eval output after the steps",
            logits(model.eval(), steps[0][rank]),
            logits(reference.eval(), steps[0][rank]),
        )
        # one mpolab.save folder from the DDP wrapper (rank 0 writes), loaded back on every rank
        written = mdist.save_gathered(ddp, Path(folder) / kind)
        assert (written is not None) == (rank == 0)
        assert_same_params(mpolab.load(Path(folder) / kind, base=build(kind)), reference, f"{kind}: saved from DDP")
        if kind != "dense":  # MPO layers and MPOE matrices cache their weights; dense experts have none
            assert cached_weights(model), f"{kind}: no weight cache was used; the stale-cache check proves nothing"
        if kind != "compressed":
            assert idle, f"{kind}: no expert went without tokens; the unused-parameter case was not exercised"
        # the same global batch gives the single-process model's loss (no aux loss for the compressed model)
        if kind == "compressed":
            whole = torch.cat(steps[0])
            with torch.no_grad():
                assert_same(
                    "compressed: full-batch loss",
                    mean_over_ranks(loss_of(model, steps[0][rank])),
                    loss_of(reference, whole),
                )


def test_ddp_matches_single_process(tmp_path: Path) -> None:
    """DDP (find_unused_parameters=False) on compressed and moefied models equals one process."""
    run_distributed(ddp_worker, WORLD, str(tmp_path), timeout=110)


# ---------------------------------------------------------------------------------------- FSDP2
def shard(model: nn.Module) -> nn.Module:
    """FSDP2 with each decoder layer its own unit, the model the root (mpolab.distributed.fully_shard)."""
    return mdist.fully_shard(model, units=list(model.model.layers))


def fsdp_train_and_check(kind: str, rank: int, world: int) -> tuple[nn.Module, nn.Module]:
    """Shard ``build(kind)``, train it ``STEPS`` Adam steps beside a one-process reference, check every step."""
    model = build(kind)
    reference = copy.deepcopy(model)
    steps = batches(world)
    logits(model.eval(), steps[0][rank])  # no-grad caches built before sharding must not be served later
    shard(model)
    # the optimiser is built before any forward: after one, the root unit keeps its parameters
    # unsharded (FSDP2 never reshards the root after forward) and model.parameters() returns those
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert_same(
        f"fsdp {kind}: eval output", logits(model.eval(), steps[0][rank]), logits(reference.eval(), steps[0][rank])
    )
    model.train(), reference.train()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    idle = False
    for step, shards in enumerate(steps):
        loss = loss_of(model, shards[rank])
        loss.backward()
        idle |= idle_expert_seen(model)
        ref_loss = reference_step(reference, shards)
        assert_same(f"fsdp {kind} step {step}: loss", mean_over_ranks(loss), ref_loss)
        assert_same_params(model, reference, f"fsdp {kind} step {step}", grads=True)
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
        # an evaluation between steps, as a training loop's validation does: must see the new weights
        assert_same(
            f"fsdp {kind} step {step}: eval output",
            logits(model.eval(), steps[0][rank]),
            logits(reference.eval(), steps[0][rank]),
        )
        assert not cached_weights(model), f"fsdp {kind}: a dense weight outlived its unit's forward"
        model.train(), reference.train()
    assert_same_params(model, reference, f"fsdp {kind} after {STEPS} steps")
    if kind != "compressed":
        assert idle, f"fsdp {kind}: no expert went without tokens; the unused-parameter case was not exercised"
    return model, reference


def fsdp_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    for kind in KINDS:
        model, reference = fsdp_train_and_check(kind, rank, world)
        out = Path(folder) / kind
        dcp.save(get_model_state_dict(model), checkpoint_id=out / "dcp")
        written = mdist.save_gathered(model, out / "mpolab", base=build(kind) if rank == 0 else None)
        assert (written is not None) == (rank == 0)
        if rank == 0:
            torch.save(reference.state_dict(), out / "reference.pt")
    # a sharded model without an unsharded base to gather into, or with one of another architecture:
    # every rank raises, none is left waiting
    with pytest.raises(ValueError, match="needs base="):
        mdist.save_gathered(model, Path(folder) / "refused")
    with pytest.raises(ValueError, match="failed on rank 0: RuntimeError: Error.* loading state_dict"):
        mdist.save_gathered(model, Path(folder) / "refused", base=build("dense") if rank == 0 else None)


def reference_for(folder: Path, kind: str) -> nn.Module:
    model = build(kind)
    model.load_state_dict(torch.load(folder / kind / "reference.pt", weights_only=True))
    return model.eval()


def load_worker(rank: int, world: int, folder: str) -> None:
    """On ``world`` ranks: both checkpoints of the 2-rank run load into a model sharded ``world`` ways."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    ids = torch.cat(batches(1)[0])  # the whole batch on every rank (3 does not divide it)
    for kind in KINDS:
        reference = reference_for(Path(folder), kind)
        want = logits(reference, ids)
        model = shard(build(kind))
        state = get_model_state_dict(model)
        dcp.load(state, checkpoint_id=Path(folder) / kind / "dcp")
        set_model_state_dict(model, state)
        assert_same_params(model, reference, f"{kind}: dcp checkpoint on {world} ranks")
        assert_same(f"{kind}: output after dcp load on {world} ranks", logits(model.eval(), ids), want)
        loaded = shard(mpolab.load(Path(folder) / kind / "mpolab", base=build(kind)))
        assert_same_params(loaded, reference, f"{kind}: mpolab folder on {world} ranks")
        assert_same(f"{kind}: output after mpolab.load on {world} ranks", logits(loaded.eval(), ids), want)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank FSDP2 group: trains and checks every kind, then writes its checkpoints here."""
    folder = tmp_path_factory.mktemp("fsdp2")
    run_distributed(fsdp_worker, WORLD, str(folder), timeout=150)
    return folder


def test_fsdp2_matches_single_process(fsdp_run: Path) -> None:
    """FSDP2 (fully_shard per decoder layer + root) on compressed and moefied models equals one process."""
    for kind in KINDS:  # the worker checked losses, gradients, parameters and outputs; it wrote these after
        assert (fsdp_run / kind / "dcp" / ".metadata").is_file()
        assert (fsdp_run / kind / "mpolab" / "model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp's note that it loads in one process
def test_checkpoints_from_two_ranks_load_on_one(fsdp_run: Path) -> None:
    import torch.distributed.checkpoint as dcp

    ids = torch.cat(batches(1)[0])
    for kind in KINDS:
        reference = reference_for(fsdp_run, kind)
        want = logits(reference, ids)
        model = build(kind).eval()
        before = logits(model, ids)  # builds the no-grad caches the load must invalidate
        dcp.load(model.state_dict(), checkpoint_id=fsdp_run / kind / "dcp", no_dist=True)
        assert_same_params(model, reference, f"{kind}: dcp checkpoint on one process")
        assert_same(f"{kind}: output after dcp load", logits(model, ids), want)
        assert not torch.allclose(before, want), "training did not change the outputs; the test proves nothing"
        loaded = mpolab.load(fsdp_run / kind / "mpolab", base=build(kind)).eval()
        assert_same_params(loaded, reference, f"{kind}: mpolab folder on one process")
        assert_same(f"{kind}: output after mpolab.load", logits(loaded, ids), want)


def test_checkpoints_from_two_ranks_load_on_three(fsdp_run: Path) -> None:
    """Resharding 2 -> 3: no tensor dimension divides evenly, so FSDP2 pads the last rank's shards."""
    run_distributed(load_worker, 3, str(fsdp_run), timeout=150)


# ---------------------------------------------------------------------------------------- Accelerate / Trainer
def accelerate_env(rank: int, world: int) -> None:
    """The variables ``accelerate launch`` / torchrun set; Accelerate reuses the harness's gloo group."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",  # read, never bound: the process group already exists
    )


def same_on_every_rank(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is bit-identical on all ranks."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def accelerate_worker(rank: int, world: int, output_dir: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import Trainer, TrainingArguments

    accelerate_env(rank, world)
    # 1. Accelerator's default DDP on a moefied model (MPO experts), against one process
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU and accelerator.num_processes == world
    model = build("mpo")
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    wrapped, opt = accelerator.prepare(model, opt)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and not wrapped.find_unused_parameters
    for step, shards in enumerate(batches(world)):
        loss = loss_of(wrapped, shards[rank], model)
        accelerator.backward(loss)
        ref_loss = reference_step(reference, shards)
        assert_same(f"accelerate step {step}: loss", mean_over_ranks(loss), ref_loss)
        assert_same_params(model, reference, f"accelerate step {step}", grads=True)
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    assert_same_params(model, reference, f"accelerate after {STEPS} steps")

    # 2. the Hugging Face Trainer (DDP through Accelerate), aux loss added in compute_loss
    class MoETrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001, ANN003
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss = loss + AUX_WEIGHT * mpolab_moe.aux_loss(model)
            return (loss, outputs) if return_outputs else loss

    model = build("dense")
    before = [p.detach().clone() for p in model.parameters()]
    data = [{"input_ids": ids, "labels": ids} for ids in torch.cat([torch.cat(s) for s in batches(1)])]
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        ddp_find_unused_parameters=False,  # the Trainer's default is True; upcycled MoE needs no search
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel)
    assert result.global_step == STEPS and torch.isfinite(torch.tensor(result.training_loss))
    assert same_on_every_rank(model), "the replicas diverged under the Trainer"
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "the Trainer did not train"


def test_accelerate_and_trainer_default_ddp(tmp_path: Path) -> None:
    """A moefied model trains under Accelerate's default DDP and the HF Trainer (2 CPU processes)."""
    run_distributed(accelerate_worker, WORLD, str(tmp_path), timeout=110)


# ---------------------------------------------------------------------------------------- GradientMask
def routed_differs_across_ranks(mask: mpolab_moe.GradientMask) -> bool:
    """Whether some bank's local record of routed experts differs between the ranks (before the step's reduction)."""
    local = torch.cat([mask.routed_experts(b) for b in mask.banks]).to(torch.uint8)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return any(not torch.equal(g, gathered[0]) for g in gathered)


def mask_worker(rank: int, world: int) -> None:
    """MPOE with the gradient mask (every step masked) under DDP and FSDP2 equals one process."""
    from torch.nn.parallel import DistributedDataParallel

    for wrap in ("ddp", "fsdp2"):
        model = build("mpo")
        reference = copy.deepcopy(model)
        steps = batches(world)
        wrapped = DistributedDataParallel(model) if wrap == "ddp" else shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
        mask = mpolab_moe.GradientMask(model, p_b=1.0, seed=3, replica_group=dist.group.WORLD).attach(opt)
        ref_mask = mpolab_moe.GradientMask(reference, p_b=1.0, seed=3).attach(ref_opt)
        differed = False
        for step, shards in enumerate(steps):
            loss_of(wrapped, shards[rank], model).backward()
            reference_step(reference, shards)
            differed |= routed_differs_across_ranks(mask)
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
            assert_same_params(model, reference, f"{wrap} masked step {step}")
        assert mask.num_masked == ref_mask.num_masked == STEPS
        assert differed, f"{wrap}: every rank routed the same experts; the record's reduction was not exercised"


def mask_seed_worker(rank: int, world: int) -> None:
    """Replicas with different RNG states: seed=None with a replica group still masks the same steps."""
    model = build("mpo")  # the same model on every rank (build seeds)
    torch.manual_seed(100 + rank)  # then the global RNGs differ, as they may in a user's script

    def decisions(mask: mpolab_moe.GradientMask) -> list[list[bool]]:
        mine = torch.tensor([mask.draw() for _ in range(24)])
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        return [g.tolist() for g in gathered]

    shared = decisions(mpolab_moe.GradientMask(model, p_b=0.5, replica_group=dist.group.WORLD))
    assert all(d == shared[0] for d in shared), shared
    own = decisions(mpolab_moe.GradientMask(model, p_b=0.5))  # no group: each rank's own draw
    assert any(d != own[0] for d in own), "the ranks drew the same 24 decisions: the check tests nothing"


def test_gradient_mask_replicas_share_the_seed_when_none_is_given() -> None:
    run_distributed(mask_seed_worker, WORLD, timeout=60)


def test_gradient_mask_under_ddp_and_fsdp2() -> None:
    """Replicas OR-reduce the routed-expert record: masked steps restore the same experts everywhere."""
    run_distributed(mask_worker, WORLD, timeout=110)


# ---------------------------------------------------------------------------------------- one process
def hidden_write(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """What FSDP2's all-gather does to the unsharded parameters: new values, version counters untouched."""
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tuple(params)):
        for p, v in zip(params, values):
            p.copy_(v)


def mpo_layer() -> nn.Module:
    return mpolab.MPOLinear.from_linear(nn.Linear(24, 16))


def mpoe_layer() -> nn.Module:
    torch.manual_seed(0)
    return mpolab_moe.upcycle(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), 4, experts="mpo").eval()


@pytest.mark.parametrize("make", [mpo_layer, mpoe_layer], ids=["MPOLinear", "MPOExperts"])
def test_hidden_writes_are_seen_with_caches_cleared_around_forward(make) -> None:  # noqa: ANN001
    layer = make()
    x = torch.randn(5, 24 if isinstance(layer, mpolab.MPOLinear) else 16)
    # the tensors the caches are built from: MPOLinear's cores, SharedCentralMPO's central and auxiliary cores
    params = [p for m in mdist.cache_owners(layer) for p in (m.cores if hasattr(m, "cores") else m.parameters())]
    assert params, "no cache-owning module found"

    def run() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    before = run()  # builds the no-grad cache
    hidden_write(params, [p.detach() * 1.5 for p in params])
    stale = run()
    mdist.clear_caches_around_forward(layer)
    fresh = run()
    assert not torch.allclose(fresh, before), "the write changed nothing; the test proves nothing"
    # the premise: a version-preserving write defeats the version-keyed cache (why FSDP2 needs the hooks)
    torch.testing.assert_close(stale, before)
    hidden_write(params, [p.detach() * 0.5 for p in params])
    again = run()
    with torch.no_grad():
        want = copy.deepcopy(layer)(x)  # a copy carries no cache
    torch.testing.assert_close(again, want)
    assert not torch.allclose(again, fresh)
    assert all(
        getattr(m, "_cache", None) is None or getattr(m._cache, "_entry", None) is None
        for m in mdist.cache_owners(layer)
    ), "a dense weight outlived the forward"


def test_mpo_layers_store_contiguous_cores() -> None:
    """decompose returns permuted views; the layers copy them, so DDP buckets and fully_shard take them as they are."""
    mpo = mpolab.decompose(torch.randn(16, 24), num_cores=3)
    assert any(not c.is_contiguous() for c in mpo.cores), "decompose returned contiguous cores; nothing to test"
    assert all(p.is_contiguous() for p in mpolab.MPOLinear.from_mpo(mpo).parameters())
    assert all(p.is_contiguous() for p in mpoe_layer().parameters())
    assert mdist.make_contiguous(mpo_layer()) == 0


def test_make_contiguous_keeps_values_and_parameter_objects() -> None:
    layer = mpo_layer()
    layer.extra = nn.Parameter(torch.randn(24, 16).t())  # a transposed view: not contiguous
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = layer(x)
    params = list(layer.parameters())
    copies = [p.detach().clone() for p in params]
    permuted = sum(not p.is_contiguous() for p in params)
    assert permuted == 1, "the test model should hold exactly one non-contiguous parameter"
    assert mdist.make_contiguous(layer) == permuted
    assert all(p.is_contiguous() for p in layer.parameters())
    assert all(a is b for a, b in zip(layer.parameters(), params))
    assert all(torch.equal(p, c) for p, c in zip(layer.parameters(), copies))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    assert mdist.make_contiguous(layer) == 0


def test_bad_calls_are_refused(tmp_path: Path) -> None:
    layer = mpo_layer()
    with pytest.raises(RuntimeError, match="init_process_group"):
        mdist.fully_shard(layer)
    with pytest.raises(ValueError, match="not a submodule"):
        mdist.clear_caches_around_forward(layer, units=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="nn.Module"):
        mdist.make_contiguous("model")  # type: ignore[arg-type]
    # without a process group save_gathered is mpolab.save
    assert mdist.save_gathered(layer, tmp_path / "one") == tmp_path / "one"
    loaded = mpolab.load(tmp_path / "one", base=mpo_layer())
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), layer.parameters()))


# ---------------------------------------------------------------------------------------- DynMoE's adapt
def top_any_worker(rank: int, world: int) -> None:
    """Replicas (record_group) and expert-parallel ranks (batch_sum) adapt from the records of all ranks.

    Rank 0's tokens reach only expert 0; rank 1's tokens reach no active expert. Over the whole
    batch: expert 1 got nothing (removed) and a new expert is made from rank 1's tokens. Alone,
    each rank would decide differently (rank 0: nothing to add; rank 1: expert 0 unused too).
    """
    from mpolab_moe.gates.top_any import TopAnyGate
    from mpolab_moe.parallel.api import GroupReducer

    def adapted(sync: str) -> tuple[list[list[bool]], list[torch.Tensor], object]:
        torch.manual_seed(0)
        gate = TopAnyGate(8, num_experts=4, num_active=2, adaptive=False)
        if sync == "record_group":
            gate.record_group = dist.group.WORLD
        elif sync == "batch_sum":
            gate.batch_sum = GroupReducer()
        # W has orthonormal columns: W[:, e] scores sigmoid(1) with expert e and sigmoid(0) = the threshold elsewhere
        direction = gate.weight[:, 0] if rank == 0 else gate.weight[:, 3]
        x = direction.detach().expand(16, 8) * torch.linspace(1, 2, 16)[:, None]
        gate.start_recording()
        gate(x)
        result = gate.adapt()
        active = gate.active.clone()
        masks = [torch.empty_like(active) for _ in range(world)]
        weights = [torch.empty_like(gate.weight) for _ in range(world)]
        dist.all_gather(masks, active)
        dist.all_gather(weights, gate.weight.detach().contiguous())
        return [m.tolist() for m in masks], weights, result

    for sync in ("record_group", "batch_sum"):
        masks, weights, result = adapted(sync)
        assert masks == [[True, True, False, False]] * world, (sync, masks)
        assert result.removed == [1] and result.added == 1 and result.recorded_tokens == 16 * world, (sync, result)
        torch.testing.assert_close(weights[1], weights[0])  # the new expert's embedding, the same everywhere
    masks, weights, _ = adapted("none")  # rank 1 alone re-makes slot 0 from its tokens; rank 0 keeps it
    assert masks[0] != masks[1] or not torch.equal(weights[0], weights[1]), "rank-local updates agree: tests nothing"


def test_top_any_adapt_sums_the_routing_records_of_every_rank() -> None:
    run_distributed(top_any_worker, WORLD, timeout=60)
