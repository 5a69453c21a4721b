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
* **what the all-to-all path adds vs the raw transfer** (target, issue 16: no more than the raw
  transfer plus 10%). Three variants of one rank's step run in turns, forward and backward:

  - *local*: the rank's own work with no exchange: its gate on its tokens, and a one-process
    ``MoE`` over its local experts given exactly the rows each received in the expert-parallel
    step (its own sort and scatter included, and the gradient of combine weights, as a real
    gate's);
  - *EP*: the expert-parallel layer;
  - *raw in place*: the local work with the layer's collectives (the gate's statistics
    all-reduce, the routing-table all-gather, the four all-to-alls) replayed raw with the same
    sizes at the points where the layer runs them, each into a new tensor as a functional
    collective does.

  *EP adds* = EP - local; *raw adds* = raw in place - local: the transfers together with the
  waits they impose (a collective waits for the slowest rank, so on a loaded machine it costs
  far more inside a step than back to back: *raw alone*). Ratio = EP adds / raw adds.
  Also shown: the time inside the layer's collectives (EP step minus the rank's time outside them).

Timing: each rank is pinned to its own core (when there are enough); the variants alternate, in an
order rotated every iteration (none always runs after the same one, whose freed memory, caches and
page faults it would inherit), every rank starting each one together; per iteration a variant's
time is the slowest rank's, and each figure is the median over ``--repeats`` iterations of that
variant (differences: the median of the per-iteration differences, so a slow stretch of the
machine hits both sides). ``--keep-freed-memory`` runs the ranks after
:func:`mpolab.allocator.keep_freed_memory` (glibc reuses freed blocks instead of faulting fresh
pages in for every new buffer). ``--layers`` picks some of the layers. Run from the repository root:
``python benchmarks/bench_distributed.py [--quick] [--tokens N] [--repeats N] [--keep-freed-memory]
[--layers NAME,...]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpolab.allocator import keep_freed_memory
from mpolab_moe import DenseExperts, Gate, MoE, MPOExperts, Routing, TopKGate
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


class FixedRouting(Gate):
    """Sends row ``i`` of its input to a fixed expert: ``counts[e]`` consecutive rows to expert ``e``.

    Its combine weights (all 1) need a gradient, as a real gate's do: the layer's backward then
    computes their gradient (a ``[rows, d]`` product), as it does in the expert-parallel step.
    """

    def __init__(self, d: int, counts: list[int]) -> None:
        super().__init__()
        self.d_model, self.num_experts = d, len(counts)
        self.register_buffer("index", torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[:, None])
        self.weight = torch.nn.Parameter(torch.ones(self.index.shape))

    def forward(self, x: torch.Tensor) -> Routing:
        return Routing(self.index, self.weight.to(x.dtype), self.num_experts)


def step(moe: MoE, x: torch.Tensor) -> None:
    y = moe(x)
    loss = y.square().mean() + (moe.aux_loss if moe.aux_loss is not None else 0)
    loss.backward()
    moe.zero_grad(set_to_none=True)
    x.grad = None


def slowest_each(seconds: list[float]) -> list[float]:
    """Element-wise maximum over the ranks (every rank passes as many values)."""
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def summed(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


class RawExchanges:
    """The layer's collectives raw (no autograd, no bookkeeping), with the sizes one counted step used.

    Each call receives into a new tensor, as a functional collective does (the layer needs one).

    ``"gate statistics"`` is the gate's ``all_reduce`` of its ``stats`` balance-loss sums; the other
    names are the :class:`ByteCounter`'s: ``"routing table"`` (``all_gather``), ``"dispatch"``,
    ``"combine"``, ``"combine.backward"``, ``"dispatch.backward"`` (``all_to_all_single``).
    """

    def __init__(self, splits: list[tuple[str, list[int], list[int]]], d: int, stats: int, group: object) -> None:
        self.group = group
        self.calls: dict[str, tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = {}
        self.calls["gate statistics"] = (torch.zeros(stats), torch.zeros(stats), [], [])
        for name, send, recv in splits:
            if name == "routing table":
                row = torch.zeros(send[0], dtype=torch.int64)
                self.calls[name] = (row, row.new_empty(len(send) * send[0]), send, recv)
            else:
                self.calls[name] = (torch.randn(sum(send), d), torch.empty(sum(recv), d), send, recv)
        self.order = ["gate statistics", *(name for name, _, _ in splits)]

    def __call__(self, name: str) -> None:
        x, out, send, recv = self.calls[name]
        out = torch.empty_like(out)  # a functional collective returns a new tensor (what the layer needs)
        if name == "gate statistics":
            dist.all_reduce(x, group=self.group)
        elif name == "routing table":
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # as the layer's
            gather(out, x, group=self.group)
        else:
            dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=self.group)

    def all(self) -> float:
        """Every collective of the step back to back; returns the seconds."""
        start = time.perf_counter()
        for name in self.order:
            self(name)
        return time.perf_counter() - start


def worker(rank: int, world: int, init: str, args: argparse.Namespace, results: object) -> None:
    torch.set_num_threads(1)
    if args.keep_freed_memory:
        keep_freed_memory()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= world:
        os.sched_setaffinity(0, {cores[rank]})
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    d, f, E, T = args.d_model, args.d_ff, args.experts, args.tokens
    rows = []
    for layer in (layer for layer in LAYERS if args.layers is None or layer.name in args.layers):
        g = torch.Generator().manual_seed(1)
        # the layer's input needs a gradient (a layer inside a model): the backward sends it back
        x_all = torch.randn(world * T, d, generator=g).requires_grad_()
        x = x_all.detach()[rank * T : (rank + 1) * T].requires_grad_()
        # the single process: rank 0 alone, the others wait at the barrier
        single = 0.0
        if rank == 0:
            whole = build(layer, d, f, E)
            step(whole, x_all)
            single = statistics.median(
                [_time_once(lambda: step(whole, x_all)) for _ in range(args.repeats)]  # noqa: B023
            )
        dist.barrier()
        moe = expert_parallel(build(layer, d, f, E))
        bank = moe.experts
        assert isinstance(bank, ExpertParallelBank)
        counter = ByteCounter()
        bank.counter = counter
        step(moe, x)  # warm-up; the rows each local expert receives are the same every step
        raw = RawExchanges(list(counter.splits), d, 2 * E + 1, bank.group)  # the balance loss's sums
        # this rank's own work, no exchange: the gate on its tokens, and a one-process MoE over its local
        # experts given exactly the rows they receive (its own sort and scatter included)
        gate = copy.deepcopy(moe.gate)
        gate.batch_sum = None
        received = list(bank.last_local_counts)
        plain = MoE(FixedRouting(d, received), copy.deepcopy(bank.local))
        x_rows = torch.randn(sum(received), d, requires_grad=True)

        def own_work(exchange: RawExchanges | None = None) -> None:
            """The local work; with ``exchange``, the raw collectives where the layer runs its own."""
            at = exchange or (lambda name: None)
            aux = gate(x).aux_loss  # noqa: B023
            at("gate statistics")
            at("routing table")
            at("dispatch")
            y = plain(x_rows)  # noqa: B023
            at("combine")
            at("combine.backward")
            y.square().mean().backward()
            at("dispatch.backward")
            if aux is not None:
                aux.backward()
            plain.zero_grad(set_to_none=True)  # noqa: B023
            gate.zero_grad(set_to_none=True)  # noqa: B023
            x.grad = x_rows.grad = None  # noqa: B023

        own_work()
        own_work(raw)
        times: dict[str, list[float]] = {"ep": [], "outside": [], "local": [], "ideal": [], "raw": []}

        def ep_step() -> float:
            counter.reset()  # noqa: B023
            seconds = _time_synced(lambda: step(moe, x))  # noqa: B023
            times["outside"].append(seconds - counter.seconds)  # noqa: B023 - this rank outside the collectives
            assert bank.last_local_counts == received  # noqa: B023
            return seconds

        variants = {
            "ep": ep_step,
            "local": lambda: _time_synced(own_work),  # noqa: B023
            "ideal": lambda: _time_synced(lambda: own_work(raw)),  # noqa: B023
        }
        names = list(variants)
        for i in range(args.repeats):  # alternating: a disturbance of the machine hits every variant
            # rotated each iteration: no variant always follows the same one (whose freed memory,
            # caches and page faults it would inherit)
            for name in names[i % 3 :] + names[: i % 3]:
                times[name].append(variants[name]())
            times["raw"].append(_time_synced(raw.all))
        # per iteration, the slowest rank's time of each variant; the step costs are medians of the
        # iterations' differences (paired: a slow stretch of the machine hits both sides of a difference)
        per_step = {name: slowest_each(values) for name, values in times.items()}
        ep_adds = statistics.median(e - o for e, o in zip(per_step["ep"], per_step["local"]))
        raw_adds = statistics.median(i - o for i, o in zip(per_step["ideal"], per_step["local"]))
        in_collectives = statistics.median(e - o for e, o in zip(per_step["ep"], per_step["outside"]))
        data = sum(v for n, v in counter.by_name.items() if n != "routing table")
        forward = sum(v for n, v in counter.by_name.items() if n in ("dispatch", "combine"))
        routed = int(moe.last_stats.tokens_per_expert.sum()) if moe.last_stats is not None else 0
        analytic = routed * d * 2 * 4  # the group's routed rows, there and back, fp32
        rows.append(
            {
                "layer": layer.name,
                "single_ms": single * 1e3,
                "forward_bytes": summed(forward),
                "step_bytes": summed(data),
                "analytic": analytic,
                "ep_ms": statistics.median(per_step["ep"]) * 1e3,
                "local_ms": statistics.median(per_step["local"]) * 1e3,
                "ep_adds_ms": ep_adds * 1e3,
                "raw_adds_ms": raw_adds * 1e3,
                "raw_alone_ms": statistics.median(per_step["raw"]) * 1e3,
                "in_collectives_ms": in_collectives * 1e3,
                # per iteration, seconds (slowest rank): pooled over runs by ``--pool``
                "iterations": {name: per_step[name] for name in ("ep", "local", "ideal")},
            }
        )
    if rank == 0:
        results.put(rows)  # type: ignore[attr-defined]
    dist.barrier()
    dist.destroy_process_group()


def ratio_interval(iterations: dict[str, list[float]], draws: int = 2000) -> tuple[float, float, float, float]:
    """EP adds and raw adds from per-iteration times, and a 90% bootstrap interval of their ratio.

    ``iterations``: ``"ep"``, ``"local"``, ``"ideal"`` seconds per iteration (paired). Returns
    ``median(ep - local)``, ``median(ideal - local)`` (seconds; medians as :func:`statistics.median`)
    and the 5th and 95th percentiles of their ratio over resamples of the iterations (pairs kept).
    """
    ep, local, ideal = (torch.tensor(iterations[k], dtype=torch.float64) for k in ("ep", "local", "ideal"))
    ep_adds, raw_adds = ep - local, ideal - local
    pick = torch.randint(len(ep), (draws, len(ep)), generator=torch.Generator().manual_seed(0))
    draws_ratio = torch.quantile(ep_adds[pick], 0.5, dim=1) / torch.quantile(raw_adds[pick], 0.5, dim=1)
    low, high = torch.quantile(draws_ratio, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    return float(torch.quantile(ep_adds, 0.5)), float(torch.quantile(raw_adds, 0.5)), low, high


def _time_synced(fn) -> float:  # noqa: ANN001
    """Seconds of ``fn()`` on this rank, every rank starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_once(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_pooled(paths: list[str]) -> None:
    """The ratio pooled over the iterations of several ``--json`` runs, with its 90% bootstrap interval."""
    pooled: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, int] = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                into = pooled.setdefault(r["layer"], {"ep": [], "local": [], "ideal": []})
                for name, values in r["iterations"].items():
                    into[name].extend(values)
                runs[r["layer"]] = runs.get(r["layer"], 0) + 1
    head = f"{'layer':<22}{'runs':>5}{'iterations':>11}{'EP adds ms':>11}{'raw adds ms':>12}{'ratio':>7}  90% interval"
    print(head)
    print("-" * len(head))
    for layer, its in pooled.items():
        ep_adds, raw_adds, low, high = ratio_interval(its)
        print(
            f"{layer:<22}{runs[layer]:>5}{len(its['ep']):>11}{ep_adds * 1e3:>11.2f}{raw_adds * 1e3:>12.2f}"
            f"{ep_adds / raw_adds:>7.2f}  {low:.2f}-{high:.2f}"
        )
    print(
        "EP adds, raw adds: medians over all the runs' iterations of EP - local and raw in place - local; "
        "ratio: their quotient (target <= 1.10); interval: 5th-95th percentile of the ratio over bootstrap "
        "resamples of the iterations."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 1024; quick 256)")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--d-ff", type=int, default=None)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument(
        "--layers", type=lambda text: text.split(","), default=None,
        help=f"comma-separated layer names (default all: {', '.join(layer.name for layer in LAYERS)})",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="iterations per layer (default 15; quick 3)")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc keeps freed memory in the ranks (no page faults)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures and every iteration's times here")
    parser.add_argument(
        "--pool", nargs="+", metavar="PATH", help="run nothing: pool the iterations of earlier --json files"
    )
    args = parser.parse_args()
    if args.pool:
        print_pooled(args.pool)
        return
    unknown = set(args.layers or ()) - {layer.name for layer in LAYERS}
    if unknown:
        parser.error(f"unknown layers {sorted(unknown)}; choose from {[layer.name for layer in LAYERS]}")
    args.tokens = args.tokens or (256 if args.quick else 1024)
    args.d_model = args.d_model or (128 if args.quick else 512)
    args.d_ff = args.d_ff or (4 * args.d_model)
    args.repeats = args.repeats or (3 if args.quick else 15)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "pool"}, "rows": rows}, f)
    print(
        f"gloo, {args.world} ranks x 1 thread; E={args.experts}, d={args.d_model}, F={args.d_ff}, "
        f"{args.tokens} tokens per rank (global batch {args.world * args.tokens}); medians of {args.repeats} "
        f"iterations; {'glibc keeping freed memory' if args.keep_freed_memory else 'default glibc malloc'}"
    )
    head = (
        f"{'layer':<22}{'1 proc ms':>10}{'EP ms':>9}{'speed-up':>9}{'fwd MB':>9}{'analytic':>9}{'fwd+bwd MB':>11}"
        f"{'local ms':>9}{'EP adds':>8}{'raw adds':>9}{'ratio':>7}{'90% interval':>13}{'raw alone':>10}{'in coll.':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ep_adds, raw_adds = r["ep_adds_ms"], r["raw_adds_ms"]
        *_, low, high = ratio_interval(r["iterations"])
        interval = f"{low:.2f}-{high:.2f}"
        print(
            f"{r['layer']:<22}{r['single_ms']:>10.1f}{r['ep_ms']:>9.1f}{r['single_ms'] / r['ep_ms']:>8.2f}x"
            f"{r['forward_bytes'] / 1e6:>9.2f}{r['analytic'] / 1e6:>9.2f}{r['step_bytes'] / 1e6:>11.2f}"
            f"{r['local_ms']:>9.1f}{ep_adds:>8.1f}{raw_adds:>9.1f}{ep_adds / raw_adds:>7.2f}{interval:>13}"
            f"{r['raw_alone_ms']:>10.2f}{r['in_collectives_ms']:>9.2f}"
        )
    print(
        "fwd MB: dispatch + combine sent, all ranks; analytic: routed rows x d x 2 x 4 bytes; local: the rank's own "
        "work alone (gate, sort, its experts on the rows they receive, scatter; fwd+bwd); EP adds: EP - local; raw "
        "adds: the local work with the layer's collectives replayed raw where the layer runs them, minus local "
        "(the transfers and the waits they impose); ratio: EP adds / raw adds (target <= 1.10), with a 90% "
        "bootstrap interval over the iterations; raw alone: the collectives back to back; in coll.: EP step - its "
        "time outside the collectives. Medians (see --help). Pool several runs' --json files with --pool."
    )


if __name__ == "__main__":
    main()
