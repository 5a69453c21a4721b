"""Expert parallelism (mpolab_moe.parallel) against the single-process model, with gloo in 2 and 4 processes.

Every rank builds the same layer (same seed); one copy stays whole (the single-process reference),
the other is made expert-parallel. The global batch is split over the ranks. The reference runs
each rank's micro-batch through the whole layer (so GShard's per-batch capacity drops the same
assignments), averages the task losses and adds the gate's balance loss of the global batch;
the expert-parallel layer computes its local loss, and the replicated gradients are averaged
over the ranks as DDP would. Outputs, losses, every gradient (the owner's slice for per-expert
tensors) and the parameters after a few Adam steps (with and without MPOE's gradient mask) must
match.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mpolab_moe import (
    DenseExperts,
    GradientMask,
    IA3Experts,
    LoRAExperts,
    MoE,
    MPOExperts,
    SimilarityGate,
    SlicedExperts,
    SoftMergeGate,
    TopKGate,
)
from mpolab_moe.experts import ExpertBank, FFNWeights
from mpolab_moe.parallel import (
    ByteCounter,
    CollectiveError,
    ExpertParallelBank,
    average_replicated_gradients,
    clip_grad_norm_,
    distributed_gradient_mask,
    even_placement,
    expert_parallel,
    expert_tensor_names,
    expert_tensors,
    full_state_dict,
    load_full_state_dict,
    shard_experts,
)
from mpolab_moe.parallel.memory import memory_per_rank, memory_table
from mpolab_moe.split import random_split

from ._dist import DistributedTestError, run_distributed
from ._memory import nan_filled_empty

D, F, T = 16, 32, 12  # width, expert hidden width, tokens per rank
ATOL, RTOL = 2e-5, 1e-4
CLIP = 0.01  # below the gradients' norm, so clipping acts (checked)


@dataclass(frozen=True)
class Case:
    bank: str  # dense, mpo, sliced, lora, ia3
    k: int = 1
    capacity_factor: float | None = None
    mask: bool = False
    num_experts: int = 4
    placement: tuple[int, ...] | None = None
    steps: int = 3
    skew: bool = False  # every token to the last expert: the other ranks' experts receive no row
    scale_on: str = "auto"  # where the bank divides the experts' gradient by the group size


def _build(case: Case) -> MoE:
    torch.manual_seed(1234)
    E = case.num_experts
    gate = TopKGate(D, E, k=case.k, z_loss_weight=1e-3)
    if case.bank == "dense":
        bank = DenseExperts(D, F, E, activation="gelu")
    elif case.bank == "mpo":
        bank = MPOExperts(D, F, E, num_cores=3, max_rank=4)
        with torch.no_grad():  # non-zero biases, so their gradients are checked too
            for b in (bank.b1, bank.b2):
                assert b is not None
                b.normal_(std=0.1)
    elif case.bank == "sliced":
        ffn = FFNWeights(torch.randn(F, D) / 4, torch.randn(D, F) / 6, b1=torch.randn(F) / 10, b2=torch.randn(D) / 10)
        bank = SlicedExperts.from_ffn(ffn, random_split(F, E))
    elif case.bank == "lora":
        bank = LoRAExperts(D, D, E, r=2)
        with torch.no_grad():
            bank.lora_B.normal_(std=0.1)
    elif case.bank == "ia3":
        bank = IA3Experts(D, E)
        with torch.no_grad():
            bank.vectors.normal_(1.0, 0.1)
        return MoE(SoftMergeGate(D, E), bank)
    else:
        raise AssertionError(case.bank)
    if case.skew:  # with positive inputs the last expert always wins
        with torch.no_grad():
            gate.weight.fill_(-0.1)
            gate.weight[E - 1].fill_(0.5)
    return MoE(gate, bank, capacity_factor=case.capacity_factor)


def _batch(step: int, world: int, positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.rand(world * T, D, generator=g) if positive else torch.randn(world * T, D, generator=g)
    return x, torch.randn(world * T, D, generator=g)


def _task(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).square().mean()


def _ep_name(name: str) -> str:
    return name.replace("experts.", "experts.local.", 1) if name.startswith("experts.") else name


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _compare_params(ref: MoE, ep: MoE, *, grads: bool, where: str) -> int:
    bank = ep.experts
    assert isinstance(bank, ExpertParallelBank)
    ep_params = dict(ep.named_parameters())
    compared = 0
    for name, p in ref.named_parameters():
        q = ep_params[_ep_name(name)]
        local = name.startswith("experts.") and name.removeprefix("experts.") in bank.expert_names
        want = p.grad if grads else p.detach()
        got = q.grad if grads else q.detach()
        if want is None:
            assert got is None or not bool(got.any()), f"{where}: {name} has a gradient only when expert-parallel"
            continue
        assert got is not None, f"{where}: {name} has no gradient when expert-parallel"
        _close(f"{where}: {'grad of ' if grads else ''}{name}", got, want[bank.lo : bank.hi] if local else want)
        compared += 1
    return compared


def _run_case(case: Case, rank: int, world: int) -> str | None:
    ref = _build(case)
    ep = expert_parallel(copy.deepcopy(ref), placement=case.placement)
    bank = ep.experts
    assert isinstance(bank, ExpertParallelBank)
    bank.scale_gradients_on = case.scale_on
    # FFN banks read the received rows where they arrived; the others take them regrouped
    assert bank.takes_order == (case.bank in ("dense", "mpo", "sliced")), (case, bank.takes_order)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_ep = torch.optim.Adam(ep.parameters(), lr=1e-2)
    if case.mask:
        GradientMask(ref, p_b=0.5, seed=7).attach(opt_ref)
        mask = distributed_gradient_mask(ep, p_b=0.5, seed=7).attach(opt_ep)
    rows = slice(rank * T, (rank + 1) * T)
    dropped, clipped = 0, False
    for step in range(case.steps):
        x, target = _batch(step, world, positive=case.skew)
        x_ref = x.clone().requires_grad_()
        x_ep = x[rows].clone().requires_grad_()  # the layer's input gradient goes back through the exchange
        # the single-process reference: every rank's micro-batch through the whole layer
        outs = [ref(x_ref[r * T : (r + 1) * T]) for r in range(world)]
        y_ref = torch.cat(outs)
        task_ref = torch.stack([_task(o, target[r * T : (r + 1) * T]) for r, o in enumerate(outs)]).mean()
        global_aux = ref.gate(x_ref).aux_loss  # the balance loss of the global batch, and the mean z-loss
        loss_ref = task_ref + (global_aux if global_aux is not None else 0)
        # expert-parallel: this rank's micro-batch
        y = ep(x_ep)
        loss = _task(y, target[rows]) + (ep.aux_loss if ep.aux_loss is not None else 0)
        where = f"{case} step {step}"
        _close(f"{where}: output", y, y_ref[rows])
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        _close(f"{where}: loss", mean_loss / world, loss_ref.detach())
        stats = ep.last_stats
        assert stats is not None and stats.num_tokens == world * T
        if case.skew:
            assert int(stats.tokens_per_expert[-1]) == world * T, stats
        dropped += stats.dropped
        opt_ref.zero_grad()
        opt_ep.zero_grad()
        loss_ref.backward()
        loss.backward()
        average_replicated_gradients(ep)
        # d(sum of the ranks' losses)/d(this rank's input) = world x d(mean loss)/d(input)
        assert x_ep.grad is not None and x_ref.grad is not None
        _close(f"{where}: input gradient", x_ep.grad / world, x_ref.grad[rows])
        if step == 0:
            assert _compare_params(ref, ep, grads=True, where=where) >= 2
        # clipping by the whole model's norm, the same factor on every rank
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        _close(f"{where}: gradient norm", clip_grad_norm_(ep, CLIP), norm_ref.float())
        clipped = clipped or float(norm_ref) > CLIP
        opt_ref.step()
        opt_ep.step()
    _compare_params(ref, ep, grads=False, where=f"{case} after {case.steps} Adam steps")
    full = full_state_dict(ep)  # every rank's experts, gathered into the single-process layout
    assert full.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        _close(f"{case}: full_state_dict {key}", full[key], value)
    assert clipped, f"{case}: the gradient norm never exceeded {CLIP}, clipping was not exercised"
    if case.capacity_factor is not None and case.capacity_factor <= 1:
        assert dropped > 0, f"{case}: the capacity dropped nothing, the case tests nothing"
    if case.mask:  # the seed masks some of the steps and not others
        assert mask.num_steps == case.steps and 0 < mask.num_masked < case.steps, mask
    return bank.gradient_scaling


CASES_2 = [
    Case("dense", k=1),
    Case("dense", k=2),
    Case("dense", k=1, capacity_factor=1.0),
    Case("dense", k=2, capacity_factor=0.75),
    Case("mpo", k=1),
    Case("mpo", k=2, mask=True),
    Case("mpo", k=1, capacity_factor=1.0, mask=True),
    Case("mpo", k=2, capacity_factor=1.25),
    Case("sliced", k=2),
    Case("lora", k=2),
    Case("ia3"),
    Case("dense", k=2, num_experts=3, placement=(2, 1)),
    Case("mpo", k=1, skew=True, mask=True),
    Case("dense", k=1, skew=True),
    Case("mpo", k=2, mask=True, scale_on="rows"),  # the shared central tensors' gradient times world
    Case("sliced", k=1, scale_on="rows"),  # and the shared output bias's
    Case("dense", k=2, scale_on="parameters"),
]

CASES_4 = [
    Case("dense", k=2, num_experts=8),
    Case("dense", k=1, capacity_factor=1.0, num_experts=4),
    Case("mpo", k=2, mask=True, num_experts=8),
    Case("mpo", k=1, capacity_factor=1.25, mask=True, num_experts=8),
    Case("dense", k=2, num_experts=6, placement=(2, 2, 1, 1)),
    Case("mpo", k=1, skew=True, num_experts=8),
]


def _equivalence_worker(rank: int, world: int, cases: list[Case]) -> None:
    scalings = {str(c): _run_case(c, rank, world) for c in cases}
    # both places the bank divides the experts' gradient by the group size were exercised
    assert set(scalings.values()) - {None} == {"rows", "parameters"}, scalings


def test_expert_parallel_matches_single_process_2_ranks() -> None:
    run_distributed(_equivalence_worker, 2, CASES_2, timeout=120)


def test_expert_parallel_matches_single_process_4_ranks() -> None:
    run_distributed(_equivalence_worker, 4, CASES_4, timeout=120)


def _empty_batch_worker(rank: int, world: int) -> None:
    # the last rank has no token this step (a dataset split unevenly): it still joins every exchange
    # (forward and backward), and the others' results are those of one process on their tokens
    for capacity_factor in (None, 1.0):
        ref = _build(Case("dense", k=2, capacity_factor=capacity_factor))
        ep = expert_parallel(copy.deepcopy(ref))
        mine = _batch(0, world)[0][rank * T : (rank + 1) * T]
        x = (mine if rank < world - 1 else mine[:0]).clone().requires_grad_()
        y = ep(x)
        y.square().sum().backward()
        assert y.shape == (x.shape[0], D) and x.grad is not None and x.grad.shape == x.shape
        if rank < world - 1:
            x_ref = mine.clone().requires_grad_()
            y_ref = ref(x_ref)
            y_ref.square().sum().backward()
            _close(f"capacity {capacity_factor}: output", y, y_ref)
            _close(f"capacity {capacity_factor}: input gradient", x.grad, x_ref.grad)
            assert ep.last_stats is not None and ep.last_stats.num_tokens == (world - 1) * T


def test_a_rank_with_an_empty_batch_joins_the_exchange() -> None:
    run_distributed(_empty_batch_worker, 2, timeout=60)


# ---------------------------------------------------------------------------------------- structure


def _structure_worker(rank: int, world: int) -> None:
    # MPOE: the central tensors are whole on every rank, the auxiliary tensors hold this rank's experts
    ref = _build(Case("mpo", num_experts=8))
    model = torch.nn.Sequential(copy.deepcopy(ref))
    layers = shard_experts(model)
    assert layers == {"0": (rank * 4, rank * 4 + 4)}
    bank = model[0].experts
    assert isinstance(bank, ExpertParallelBank) and isinstance(bank.local, MPOExperts)
    for full, local in zip(ref.experts.central_parameters(), bank.local.central_parameters(), strict=True):
        assert local.shape == full.shape
    for full, local in zip(ref.experts.auxiliary_parameters(), bank.local.auxiliary_parameters(), strict=True):
        assert local.shape == (4, *full.shape[1:])
        torch.testing.assert_close(local.detach(), full.detach()[rank * 4 : rank * 4 + 4])
    # the single-process layout back from every rank's experts, and into a fresh sharded model
    full = full_state_dict(model)
    want = {f"0.{k}": v for k, v in ref.state_dict().items()}
    assert full.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(full[key], value, msg=key)
    single = torch.nn.Sequential(_build(Case("mpo", num_experts=8)))
    single.load_state_dict(full)
    again = torch.nn.Sequential(copy.deepcopy(ref))
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    shard_experts(again)
    load_full_state_dict(again, full)
    for (name, p), (_, q) in zip(again.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    names = {name for name, _ in expert_tensors(model)}
    assert names and all(".local." in n for n in names)
    assert not any("central" in n for n in names)
    # the routing statistics are the group's
    x = torch.randn(T, D)
    counter = ByteCounter()
    bank.counter = counter
    with torch.no_grad():
        model(x)
    stats = model[0].last_stats
    assert stats is not None and int(stats.tokens_per_expert.sum()) == world * T
    # bytes: the group's routed rows (top-1: one per token) of D fp32 values, there and back
    sent = torch.tensor([counter.by_name["dispatch"] + counter.by_name["combine"]])
    dist.all_reduce(sent)
    assert int(sent) == world * T * D * 4 * 2
    assert counter.by_name["dispatch"] == T * D * 4  # this rank's own tokens, every one routed
    assert set(counter.by_name) == {"routing table", "dispatch", "combine"}
    assert counter.seconds > 0 and [name for name, _, _ in counter.splits] == ["routing table", "dispatch", "combine"]


def test_mpoe_structure_statistics_and_bytes() -> None:
    run_distributed(_structure_worker, 2, timeout=60)


# ---------------------------------------------------------------------------------------- the guide


@pytest.mark.parametrize(("marker", "max_rank"), [("exact", None), ("64", 64)])
def test_guide_memory_tables_are_what_the_code_computes(marker: str, max_rank: int | None) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text(encoding="utf-8")
    start = page.index(f"<!-- memory-table:{marker} -->\n") + len(f"<!-- memory-table:{marker} -->\n")
    shown = page[start : page.index("\n<!-- /memory-table -->", start)]
    assert shown == memory_table(d_model=768, d_ff=3072, experts=(8, 64, 256), world_size=8, max_rank=max_rank)


def test_memory_per_rank_counts_the_central_tensor_once() -> None:
    m = memory_per_rank(768, 3072, 64, 8, max_rank=64)
    assert m.switch_ep == 8 * 2 * 768 * 3072 + 64 * 768
    assert m.mpoe_ep - m.central == (m.mpoe_all - m.central - 64 * 768) // 8 + 64 * 768
    with pytest.raises(ValueError, match="not divisible"):
        memory_per_rank(768, 3072, 6, 4)


# ---------------------------------------------------------------------------------------- bad inputs


def test_not_initialised_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(_build(Case("dense")))


def test_a_bank_without_an_expert_tensor_rule_is_refused_naming_the_remedy() -> None:
    class Scale(DenseExperts):
        pass

    assert expert_tensor_names(Scale(4, 8, 2)) == {"w1", "w2", "b1", "b2"}  # a subclass inherits the rule

    class Odd(ExpertBank):
        def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
            return x

    with pytest.raises(TypeError, match="register_expert_tensors"):
        expert_tensor_names(Odd())


def test_even_placement_refuses_indivisible_and_proposes_a_placement() -> None:
    assert even_placement(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the 4 ranks.*placement=\[2, 2, 1, 1\]"):
        even_placement(6, 4)
    with pytest.raises(ValueError, match="at most 2 ranks"):
        even_placement(2, 4)


def _bad_inputs_worker(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        expert_parallel(_build(Case("dense", num_experts=3)))
    with pytest.raises(ValueError, match="placement must list 2 positive ints"):
        expert_parallel(_build(Case("dense", num_experts=4)), placement=[4, 0])
    # ranks that build different layers: found when sharding
    with pytest.raises(ValueError, match="disagree.*gate configuration"):
        expert_parallel(_build(Case("dense", k=1 + rank)))
    # ranks that drift apart later (one in eval mode): found on the next forward, on every rank
    moe = expert_parallel(_build(Case("dense")))
    moe.train(rank == 0)
    with pytest.raises(ValueError, match="disagree on train/eval mode"):
        moe(torch.randn(T, D))
    moe.train()
    moe(torch.randn(T, D))  # still in step after the refused forward
    # a gradient mask with a different seed on each rank
    with pytest.raises(ValueError, match="disagree on the gradient mask: seed"):
        distributed_gradient_mask(expert_parallel(_build(Case("mpo"))), seed=rank)
    # without a seed, rank 0 draws one and every rank's mask draws the same decisions
    mask = distributed_gradient_mask(expert_parallel(_build(Case("mpo"))), p_b=0.5)
    draws = torch.tensor([float(mask.draw()) for _ in range(16)])
    gathered = [torch.zeros(16) for _ in range(world)]
    dist.all_gather(gathered, draws)
    assert all(torch.equal(g, gathered[0]) for g in gathered) and 0 < int(draws.sum()) < 16
    # a gate that reads the bank's weights would need every expert on every rank
    sliced = _build(Case("sliced")).experts
    with pytest.raises(TypeError, match="SimilarityGate reads the expert bank's weights"):
        expert_parallel(MoE(SimilarityGate(sliced, k=2), sliced))
    # a mask created before sharding would count the whole bank's routing
    mpo = _build(Case("mpo"))
    GradientMask(mpo, p_b=0.5, seed=0)
    with pytest.raises(ValueError, match="create GradientMask and other hooks after"):
        expert_parallel(mpo)


def test_bad_inputs_are_clear_errors_on_every_rank() -> None:
    run_distributed(_bad_inputs_worker, 2, timeout=60)


def _dying_rank_worker(rank: int, world: int) -> None:
    moe = expert_parallel(_build(Case("dense")))
    y = moe(torch.randn(T, D, requires_grad=True))
    if rank == 1:
        os._exit(0)  # dies mid-step: after the forward, before the backward the others are in
    named = r"all_to_all_single \(combine.backward: .* failed on rank 0 of 2: .*timeout"
    with pytest.raises(CollectiveError, match=named):
        y.square().mean().backward()


def test_a_dying_rank_makes_the_others_fail_naming_the_collective() -> None:
    run_distributed(_dying_rank_worker, 2, timeout=60, collective_timeout_s=5)


def _raises_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("worker failure on purpose")


def test_harness_reports_the_failing_rank() -> None:
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1.*worker failure on purpose"):
        run_distributed(_raises_worker, 2, timeout=60)


def _hangs_worker(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(60)  # never reaches the barrier the other rank waits in
    dist.barrier()


def test_harness_kills_a_group_that_runs_past_its_timeout() -> None:
    start = time.perf_counter()
    with pytest.raises(DistributedTestError, match="ran past its 8 s timeout"):
        run_distributed(_hangs_worker, 2, timeout=8, collective_timeout_s=30)
    assert time.perf_counter() - start < 30


def test_take_and_place_rows_match_index_select_and_index_copy_with_zero_padding() -> None:
    """The exchange's row moves: values and gradients as torch's own ops, padding rows exactly 0."""
    from mpolab_moe.rows import place_rows, take_rows, unused_rows

    torch.manual_seed(0)
    index = torch.tensor([5, 0, 3, 6])  # 4 of 8 rows; rows 1, 2, 4, 7 are padding
    pad = unused_rows(index, 8)
    assert pad is not None and pad.tolist() == [1, 2, 4, 7]
    assert unused_rows(torch.randperm(8), 8) is None  # a permutation leaves nothing out
    with nan_filled_empty():  # an unwritten row would show as NaN
        x = torch.randn(4, 3, requires_grad=True)
        placed = place_rows(x, index, pad, 8)
        want = torch.zeros(8, 3).index_copy(0, index, x)
        torch.testing.assert_close(placed, want)
        y = torch.randn(8, 3, requires_grad=True)
        taken = take_rows(y, index, pad)
        torch.testing.assert_close(taken, y.index_select(0, index))
        g_placed, g_taken = torch.randn(8, 3), torch.randn(4, 3)
        (gx,) = torch.autograd.grad(placed, x, g_placed)
        (gy,) = torch.autograd.grad(taken, y, g_taken)
    torch.testing.assert_close(gx, g_placed.index_select(0, index))
    torch.testing.assert_close(gy, torch.zeros(8, 3).index_copy(0, index, g_taken))  # padding rows: 0
    # the gradient scaling folded into the moves (expert parallelism divides the experts' gradient there)
    (gx2,) = torch.autograd.grad(place_rows(x, index, pad, 8, grad_scale=0.5), x, g_placed)
    (gy2,) = torch.autograd.grad(take_rows(y, index, pad, grad_scale=2.0), y, g_taken)
    torch.testing.assert_close(gx2, gx * 0.5)
    torch.testing.assert_close(gy2, gy * 2.0)
    # no rows at all (a rank that received nothing): all padding, and an empty gradient back
    empty = torch.zeros(0, 3, requires_grad=True)
    nothing = torch.zeros(0, dtype=torch.int64)
    all_pad = place_rows(empty, nothing, unused_rows(nothing, 4), 4)
    assert torch.equal(all_pad, torch.zeros(4, 3))
    (g_empty,) = torch.autograd.grad(all_pad, empty, torch.randn(4, 3))
    assert g_empty.shape == (0, 3)
