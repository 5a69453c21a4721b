"""Benchmark expert parallelism with gloo on 2 ranks: step time, bytes moved, and the all-to-all's cost.

For each layer (dense experts top-1 and top-2, top-2 with a GShard capacity, MPO experts top-1),
``E`` experts of ``d -> F -> d``, ``--tokens`` tokens per rank:

* **single process**: the whole layer on the global batch (``world x tokens``) in one process,
  one thread, forward + backward of ``y.square().mean() + aux``;
* **expert-parallel**: each of the ``world`` processes (one thread each) runs its own tokens
  through the expert-parallel layer, forward + backward; the step time is the slowest rank's;
* **bytes**: what the dispatch and combine exchanges sent per step (forward and backward, summed
  over the ranks, counted in the exchange by :class:`mpolab_moe.parallel.ByteCounter`) against
  the analytic volume ``routed rows x d x 2 directions x element size`` (forward; x2 with the
  backward). With a capacity the exchange is fixed-size (padded to the capacity), so it moves more;
* **what the all-to-all path adds vs the raw transfer**: the expert-parallel step minus the
  slowest rank's own work alone (its gate on its tokens, and a plain ``MoE`` over its local
  experts taking as many rows as they received, sort and scatter included, forward and
  backward, no exchange), against the layer's collectives (the
  routing-table all-gather and the all-to-alls) replayed raw with the same split sizes. Target
  (issue 16): added <= raw x 1.10. Also shown: the time inside the collectives on the critical
  path (slowest step minus the slowest rank's time outside them).

The machine is shared: every time is the best of ``--repeats`` (the least disturbed run), and the
figures still move with the load. Run from the repository root:
``python benchmarks/bench_distributed.py [--quick] [--tokens N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpolab_moe import DenseExperts, MoE, MPOExperts, TopKGate
from mpolab_moe.parallel import ByteCounter, ExpertParallelBank, expert_parallel


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    k: int
    capacity_factor: float | None = None


LAYERS = (
    Layer("Switch top-1", "dense", 1),
    Layer("top-2", "dense", 2),
    Layer("top-2, capacity 1.25", "dense", 2, 1.25),
    Layer("MPOE top-1", "mpo", 1),
)


def build(layer: Layer, d: int, f: int, experts: int) -> MoE:
    torch.manual_seed(0)
    bank = DenseExperts(d, f, experts) if layer.kind == "dense" else MPOExperts(d, f, experts, max_rank=64)
    return MoE(TopKGate(d, experts, k=layer.k), bank, capacity_factor=layer.capacity_factor)


def step(moe: MoE, x: torch.Tensor) -> None:
    y = moe(x)
    loss = y.square().mean() + (moe.aux_loss if moe.aux_loss is not None else 0)
    loss.backward()
    moe.zero_grad(set_to_none=True)


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def summed(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def replay(splits: list[tuple[str, list[int], list[int]]], d: int, group: object) -> float:
    """The step's exchanges again, raw ``all_to_all_single`` / ``all_gather`` with the same sizes."""
    buffers = []
    for name, send, recv in splits:
        if name == "routing table":
            buffers.append((name, torch.zeros(send[0], dtype=torch.int64), None, send, recv))
        else:
            buffers.append((name, torch.randn(sum(send), d), torch.empty(sum(recv), d), send, recv))
    start = time.perf_counter()
    for _name, x, out, send, recv in buffers:
        if out is None:
            flat = x.new_empty(len(send) * x.numel())
            dist.all_gather_into_tensor(flat, x, group=group)
        else:
            dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return time.perf_counter() - start


def worker(rank: int, world: int, init: str, args: argparse.Namespace, results: object) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    d, f, E, T = args.d_model, args.d_ff, args.experts, args.tokens
    rows = []
    for layer in LAYERS:
        g = torch.Generator().manual_seed(1)
        x_all = torch.randn(world * T, d, generator=g)
        x = x_all[rank * T : (rank + 1) * T]
        # the single process: rank 0 alone, the others wait at the barrier
        single = 0.0
        if rank == 0:
            whole = build(layer, d, f, E)
            step(whole, x_all)
            single = min(
                [_time_once(lambda: step(whole, x_all)) for _ in range(args.repeats)]  # noqa: B023
            )
        dist.barrier()
        moe = expert_parallel(build(layer, d, f, E))
        bank = moe.experts
        assert isinstance(bank, ExpertParallelBank)
        ep = slowest(timed(lambda: step(moe, x), args.repeats))  # noqa: B023
        counter = ByteCounter()
        bank.counter = counter
        steps, computes = [], []
        for _ in range(args.repeats):
            counter.reset()
            dist.barrier()
            start = time.perf_counter()
            step(moe, x)
            steps.append(time.perf_counter() - start)
            computes.append(steps[-1] - counter.seconds)  # this rank's step outside the collectives
        # what the exchange adds to the step: the slowest rank's step minus the slowest rank's own work
        path_s = slowest(min(steps)) - slowest(min(computes))
        # this rank's work without any exchange: the gate on its tokens, and a plain MoE layer over its
        # local experts taking as many rows as they received (its own sort and scatter included)
        rows_got = sum(bank.last_local_counts)
        gate = copy.deepcopy(moe.gate)
        gate.batch_sum = None
        local_experts = bank.local.num_experts
        plain = MoE(TopKGate(d, local_experts, k=min(layer.k, local_experts)), copy.deepcopy(bank.local))
        x_rows = torch.randn(max(1, rows_got // min(layer.k, local_experts)), d)

        def local_step() -> None:
            aux = gate(x).aux_loss  # noqa: B023
            y = plain(x_rows)  # noqa: B023
            (y.square().mean() + (aux if aux is not None else 0)).backward()
            plain.zero_grad(set_to_none=True)  # noqa: B023
            gate.zero_grad(set_to_none=True)  # noqa: B023

        local_s = slowest(timed(local_step, args.repeats))
        data = sum(v for n, v in counter.by_name.items() if n != "routing table")
        forward = sum(v for n, v in counter.by_name.items() if n in ("dispatch", "combine"))
        routed = int(moe.last_stats.tokens_per_expert.sum()) if moe.last_stats is not None else 0
        analytic = routed * d * 2 * 4  # the group's routed rows, there and back, fp32
        raws = []
        for _ in range(args.repeats):
            dist.barrier()
            raws.append(replay(counter.splits, d, bank.group))
        raw_s = slowest(min(raws))
        rows.append(
            {
                "layer": layer.name,
                "single_ms": single * 1e3,
                "ep_ms": ep * 1e3,
                "forward_bytes": summed(forward),
                "step_bytes": summed(data),
                "analytic": analytic,
                "path_ms": path_s * 1e3,
                "local_ms": local_s * 1e3,
                "raw_ms": raw_s * 1e3,
            }
        )
    if rank == 0:
        results.put(rows)  # type: ignore[attr-defined]
    dist.barrier()
    dist.destroy_process_group()


def _time_once(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 1024; quick 256)")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--d-ff", type=int, default=None)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    args.tokens = args.tokens or (256 if args.quick else 1024)
    args.d_model = args.d_model or (128 if args.quick else 512)
    args.d_ff = args.d_ff or (4 * args.d_model)
    args.repeats = args.repeats or (3 if args.quick else 7)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(worker, args=(args.world, os.path.join(tmp, "init"), args, results),
                                     nprocs=args.world, join=False, start_method="spawn")  # fmt: skip
        rows = results.get()  # before joining: gloo may abort a process at exit, after its work is done
        try:
            while not context.join():
                pass
        except mp.ProcessExitedException as exc:
            print(f"(a rank ended abnormally after reporting: {exc})")
    print(
        f"gloo, {args.world} ranks x 1 thread; E={args.experts}, d={args.d_model}, F={args.d_ff}, "
        f"{args.tokens} tokens per rank (global batch {args.world * args.tokens}); best of {args.repeats}"
    )
    head = (
        f"{'layer':<22}{'1 proc ms':>10}{'EP ms':>9}{'speed-up':>9}{'fwd MB':>9}{'analytic':>9}"
        f"{'fwd+bwd MB':>11}{'local ms':>9}{'added ms':>9}{'in coll. ms':>12}{'raw ms':>8}{'ratio':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['layer']:<22}{r['single_ms']:>10.1f}{r['ep_ms']:>9.1f}{r['single_ms'] / r['ep_ms']:>8.2f}x"
            f"{r['forward_bytes'] / 1e6:>9.2f}{r['analytic'] / 1e6:>9.2f}{r['step_bytes'] / 1e6:>11.2f}"
            f"{r['local_ms']:>9.1f}{r['ep_ms'] - r['local_ms']:>9.1f}{r['path_ms']:>12.2f}{r['raw_ms']:>8.2f}"
            f"{(r['ep_ms'] - r['local_ms']) / r['raw_ms']:>7.2f}"
        )
    print(
        "fwd MB: dispatch + combine sent, all ranks; analytic: routed rows x d x 2 x 4 bytes; local: the slowest "
        "rank's gate and experts alone; added: EP - local; in coll.: slowest step - slowest time outside the "
        "collectives; raw: the same collectives replayed; ratio: added / raw (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
