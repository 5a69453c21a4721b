"""Benchmark ``mpolab.MPOLinear`` against ``nn.Linear`` of the same shape, and the contraction cost model.

Layers ``in -> out``: 768->3072, 3072->768 and 4096->4096, decomposed from a seeded ``nn.Linear``
with ``MPOLinear.from_linear(linear, max_rank=r)`` for r in 4, 8, 16, 64, 256 and exact (no
truncation); inputs ``x: [B, in]`` with B = 32, 1024 and 8192 tokens, float32, on the CPU.

What is measured:

(a) **eval forward**: ``layer.eval()`` under ``torch.no_grad()`` with the rebuilt weight already
    cached (``apply_mpo`` then picks its path with ``weight_cached=True``: the core path or one
    GEMM with the cached weight), time over ``nn.Linear``'s forward. Target: within 1.1x at any
    rank, faster where the core path needs far fewer FLOPs.
(b) **core path vs dense path**, weight not cached, under ``no_grad``:
    ``mpolab.contract.apply_mpo(x, cores, out, in, path="cores")`` against ``path="dense"``
    (rebuild ``W`` + one GEMM), next to ``mpolab.contract.path_costs`` (FLOPs of both paths,
    largest intermediate of the core path, the path it picks). The same core-path timings
    against ``nn.Linear``'s GEMM check the cached-weight decision used in (a). For each row the
    *break-even penalty* is the ``CORE_PATH_PENALTY`` at which the model would be exactly
    undecided (core path faster iff its FLOP advantage exceeds it); the summary derives the
    penalty that would have picked best overall.
(c) **training step**: forward + backward of ``y.square().mean()`` with gradients on the cores
    and bias (on weight and bias for ``nn.Linear``); grads are reset to ``None`` between steps.
    ``x`` needs no gradient (a first layer) unless ``--input-grad`` is given. Target: within 1.5x
    of ``nn.Linear`` at 1024 and 8192 tokens.

Timing: ``torch.set_num_threads(2)``; per measurement a warm-up call and the median of up to
``REPEATS`` timed blocks within about a second (calls above ``HEAVY_FLOPS`` skip the warm-up and
get one or two samples; opt_einsum's expressions are built before timing, so no timed call pays
for a path search). Compared calls are timed interleaved (MPO / ``nn.Linear``, core / dense
path), so that load from other processes hits both alike; heavy MPO calls are timed alone and
compared with ``nn.Linear`` timed before and after their group (the faster median). Forced
path timings in (b) are skipped, unless ``--all-paths``, where they cost seconds and teach
nothing new: a core path whose intermediate exceeds both the model's cap and
``SKIP_INTERMEDIATE`` (never picked), and heavy rows where both paths have the same FLOPs
(opt_einsum's core path then rebuilds ``W`` itself; the light rows show how that compares).
Results go to ``benchmarks/results/bench_linear.json``.

Run: ``python benchmarks/bench_linear.py [--quick] [--threads N] [--input-grad] [--all-paths]``
from the repository root.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmark the working tree, installed or not

from _common import (  # noqa: E402
    CpuMonitor,
    Timing,
    busy_note,
    describe_environment,
    end_of_run,
    environment,
    fmt_seconds,
    format_table,
    load_average,
    progress,
    setup_threads,
    time_interleaved,
    write_json,
)

import mpolab  # noqa: E402
from mpolab import contract  # noqa: E402

EVAL_TARGET = 1.1
TRAIN_TARGET = 1.5
TRAIN_TARGET_BATCHES = (1024, 8192)
#: Calls above this many FLOPs (~0.1 s here) skip the warm-up: their fixed costs are negligible.
HEAVY_FLOPS = 1.5e10
#: Seconds of timed calls per measurement (at least one call), and the most timed blocks.
BUDGET_S = 0.4
REPEATS = 9
#: Forced core-path calls with a larger intermediate (elements; 256 MiB) are skipped when the
#: model refuses them anyway (``--all-paths`` measures them: seconds each, always slower).
SKIP_INTERMEDIATE = 2**26


@dataclass(frozen=True)
class Config:
    shapes: tuple[tuple[int, int], ...]  # (in_features, out_features)
    ranks: tuple[int | None, ...]  # None: exact
    batches: tuple[int, ...]


FULL = Config(((768, 3072), (3072, 768), (4096, 4096)), (4, 8, 16, 64, 256, None), (32, 1024, 8192))
QUICK = Config(((768, 3072),), (4, 16, None), (32, 1024))


@dataclass(frozen=True)
class Baseline:
    """``nn.Linear`` timings for one (shape, batch): eval forward and training step, seconds."""

    eval_s: float
    train_s: float
    runs: tuple[dict[str, Any], ...]  # the raw before/after measurements


@dataclass
class Row:
    in_features: int
    out_features: int
    max_rank: int | None
    ranks: tuple[int, ...]
    params: int
    batch: int
    linear_eval_s: float
    linear_train_s: float
    # (a) eval forward, cached weight: the model compares the core path with one GEMM
    eval_mpo: Timing
    eval_path: str
    gemm_flops: int
    # (b) weight not cached: core path vs rebuild + GEMM
    cores_flops: int
    dense_flops: int
    cores_intermediate: int
    dense_intermediate: int
    cores_fit: bool  # within CORE_PATH_MAX_INTERMEDIATE
    model_path: str
    forced_cores: Timing | None  # None: not timed (see the module docstring)
    forced_dense: Timing | None
    # (c) training step
    train_mpo: Timing
    other_load: float | None  # cores kept busy by other processes while this row was timed

    @property
    def where(self) -> str:
        rank = "exact" if self.max_rank is None else str(self.max_rank)
        return f"{self.in_features}->{self.out_features} r={rank} B={self.batch}"

    @property
    def eval_ratio(self) -> float:
        return self.eval_mpo.median / self.linear_eval_s

    @property
    def train_ratio(self) -> float:
        return self.train_mpo.median / self.linear_train_s


@dataclass(frozen=True)
class Decision:
    """One core-path-or-not decision of the cost model, with both paths' measured times."""

    where: str
    batch: int
    cores_flops: int
    other_flops: int
    fits: bool
    t_cores: float
    t_other: float
    cached: bool = True

    @property
    def flop_ratio(self) -> float:
        """Other-path FLOPs over core-path FLOPs (> 1: the core path needs fewer)."""
        return self.other_flops / self.cores_flops

    @property
    def time_ratio(self) -> float:
        """Other-path time over core-path time (> 1: the core path is faster)."""
        return self.t_other / self.t_cores

    @property
    def break_even_penalty(self) -> float:
        """The penalty at which FLOPs predict a tie: the core path's FLOP-rate deficit."""
        return self.flop_ratio / self.time_ratio

    @property
    def cores_faster(self) -> bool:
        return self.t_cores < self.t_other

    def picks_cores(self, penalty: float, *, memory_cap: bool = True) -> bool:
        return (self.fits or not memory_cap) and self.cores_flops * penalty < self.other_flops

    def regret(self, penalty: float, *, memory_cap: bool = True) -> float:
        """Relative slowdown of the pick over the faster path."""
        picked = self.t_cores if self.picks_cores(penalty, memory_cap=memory_cap) else self.t_other
        return picked / min(self.t_cores, self.t_other) - 1


# ---------------------------------------------------------------------------------- set-up
def make_layers(
    in_features: int, out_features: int, ranks: Sequence[int | None], seed: int
) -> tuple[nn.Linear, dict[int | None, mpolab.MPOLinear]]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    return linear, {r: mpolab.MPOLinear.from_linear(linear, max_rank=r) for r in ranks}


def prebuild_expressions(cores: Sequence[torch.Tensor], batch: int) -> None:
    """Build (and cache) the opt_einsum expressions a call with ``batch`` rows will use."""
    shapes = contract.core_shapes(cores)
    contract._merge_expression(shapes)
    contract._apply_expression(shapes, contract.batch_class(batch))


def timed(*fns: Callable[[], Any], flops: float) -> Any:
    """Time one function (-> Timing) or several interleaved (-> list of Timing)."""
    heavy = flops > HEAVY_FLOPS
    timings = time_interleaved(fns, warmup=0 if heavy else 1, repeats=REPEATS, budget_s=BUDGET_S * len(fns))
    return timings[0] if len(fns) == 1 else timings


def timed_against(baseline: Callable[[], Any], fn: Callable[[], Any], flops: float) -> tuple[Timing | None, Timing]:
    """``fn`` interleaved with ``baseline`` when light; alone (baseline ``None``) when heavy."""
    if flops > HEAVY_FLOPS:
        return None, timed(fn, flops=flops)
    base, own = timed(baseline, fn, flops=flops)
    return base, own


def train_step(module: nn.Module, x: torch.Tensor, input_grad: bool) -> Callable[[], None]:
    """One forward + backward; with ``input_grad`` the input needs a gradient too (a hidden layer)."""
    x = x.detach().requires_grad_(input_grad)
    tensors = [p for p in module.parameters() if p.requires_grad] + ([x] if input_grad else [])

    def step() -> None:
        for t in tensors:
            t.grad = None
        module(x).square().mean().backward()

    return step


# ---------------------------------------------------------------------------------- measurements
def time_linear(linear: nn.Linear, x: torch.Tensor, input_grad: bool) -> dict[str, Any]:
    monitor = CpuMonitor()
    gemm = 2.0 * x.shape[0] * linear.in_features * linear.out_features
    linear.eval()
    with torch.no_grad():
        eval_t = timed(lambda: linear(x), flops=gemm)
    linear.train()
    train_t = timed(train_step(linear, x, input_grad), flops=3 * gemm)
    return {"eval": eval_t.as_dict(), "train": train_t.as_dict(), "other_load": monitor.foreign_cores()}


def combine_baselines(runs: Sequence[dict[str, Any]]) -> Baseline:
    """The faster median of each measurement: the run less disturbed by other processes."""
    return Baseline(
        eval_s=min(r["eval"]["median"] for r in runs),
        train_s=min(r["train"]["median"] for r in runs),
        runs=tuple(runs),
    )


def bench_mpo(
    layer: mpolab.MPOLinear,
    linear: nn.Linear,
    x: torch.Tensor,
    max_rank: int | None,
    input_grad: bool,
    all_paths: bool,
) -> Row:
    """Measure one MPO layer. Light calls are timed interleaved with ``nn.Linear`` (robust ratios);
    heavy ones alone, against the group's ``nn.Linear`` baseline (filled in by :func:`run_group`)."""
    monitor = CpuMonitor()
    batch = x.shape[0]
    cores = [c.detach() for c in layer.cores]
    shapes = contract.core_shapes(cores)
    prebuild_expressions(cores, batch)
    cached = contract.path_costs(shapes, batch, weight_cached=True)
    uncached = contract.path_costs(shapes, batch, weight_cached=False)
    out_f, in_f = layer.out_features, layer.in_features
    gemm = 2.0 * batch * in_f * out_f
    activations = contract.batch_class(batch) * max(math.prod(layer.out_factors), math.prod(layer.in_factors))
    # the library's cap: CORE_PATH_MAX_INTERMEDIATE x activations, unless W itself is larger
    cap = max(contract.CORE_PATH_MAX_INTERMEDIATE * activations, uncached.dense.largest_intermediate)
    fits = uncached.cores.largest_intermediate <= cap
    heavy = max(uncached.cores.flops, uncached.dense.flops)
    skip_cores = not all_paths and not fits and uncached.cores.largest_intermediate > SKIP_INTERMEDIATE
    skip_both = not all_paths and heavy > HEAVY_FLOPS and uncached.dense.flops <= 1.001 * uncached.cores.flops

    def forced(path: str) -> Callable[[], torch.Tensor]:
        return lambda: contract.apply_mpo(x, cores, out_f, in_f, path=path)  # type: ignore[arg-type]

    layer.eval()
    linear.eval()
    with torch.no_grad():
        layer.dense_weight()  # fill the cache
        linear_eval, eval_mpo = timed_against(lambda: linear(x), lambda: layer(x), gemm)
        forced_cores: Timing | None = None
        forced_dense: Timing | None = None
        if skip_cores and not skip_both:
            forced_dense = timed(forced("dense"), flops=uncached.dense.flops)
        elif not skip_both:
            forced_cores, forced_dense = timed(forced("cores"), forced("dense"), flops=heavy)
    layer.train()
    linear.train()
    layer.clear_cache()
    linear_train, train_mpo = timed_against(
        train_step(linear, x, input_grad), train_step(layer, x, input_grad), 3 * gemm
    )
    return Row(
        in_features=in_f,
        out_features=out_f,
        max_rank=max_rank,
        ranks=layer.ranks,
        params=layer.num_mpo_params(),
        batch=batch,
        linear_eval_s=math.nan if linear_eval is None else linear_eval.median,
        linear_train_s=math.nan if linear_train is None else linear_train.median,
        eval_mpo=eval_mpo,
        eval_path=cached.chosen,
        gemm_flops=cached.dense.flops,
        cores_flops=uncached.cores.flops,
        dense_flops=uncached.dense.flops,
        cores_intermediate=uncached.cores.largest_intermediate,
        dense_intermediate=uncached.dense.largest_intermediate,
        cores_fit=fits,
        model_path=uncached.chosen,
        forced_cores=forced_cores,
        forced_dense=forced_dense,
        train_mpo=train_mpo,
        other_load=monitor.foreign_cores(),
    )


def check_outputs(layer: mpolab.MPOLinear, x: torch.Tensor) -> float:
    """Relative difference between the two forced paths (a sanity check, expected ~1e-6)."""
    cores = [c.detach() for c in layer.cores]
    with torch.no_grad():
        a = contract.apply_mpo(x, cores, layer.out_features, layer.in_features, path="cores")
        b = contract.apply_mpo(x, cores, layer.out_features, layer.in_features, path="dense")
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def run_group(
    linear: nn.Linear,
    layers: dict[int | None, mpolab.MPOLinear],
    x: torch.Tensor,
    args: argparse.Namespace,
    started: float,
) -> tuple[list[Row], Baseline | None]:
    """Every rank at one (shape, batch). Where calls are heavy, ``nn.Linear`` is timed before and
    after the ranks (the faster median is the baseline); light calls were paired row by row."""
    heavy = 3 * 2.0 * x.shape[0] * linear.in_features * linear.out_features > HEAVY_FLOPS
    runs = [time_linear(linear, x, args.input_grad)] if heavy else []
    rows = []
    for rank, layer in layers.items():
        rows.append(bench_mpo(layer, linear, x, rank, args.input_grad, args.all_paths))
        progress(f"done: {rows[-1].where} ({time.perf_counter() - started:.0f} s)")
    if not heavy:
        return rows, None
    baseline = combine_baselines([*runs, time_linear(linear, x, args.input_grad)])
    for row in rows:  # heavy calls were timed alone: compare them with the group's baseline
        if math.isnan(row.linear_eval_s):
            row.linear_eval_s = baseline.eval_s
        if math.isnan(row.linear_train_s):
            row.linear_train_s = baseline.train_s
    return rows, baseline


# ---------------------------------------------------------------------------------- analysis
def decisions(rows: Sequence[Row], *, cached: bool) -> list[Decision]:
    """The model's decisions with a cached weight (core path vs ``nn.Linear``'s GEMM) or without
    (core path vs rebuild + GEMM); rows whose core path was skipped are left out."""
    return [
        Decision(
            where=r.where,
            batch=r.batch,
            cores_flops=r.cores_flops,
            other_flops=r.gemm_flops if cached else r.dense_flops,
            fits=r.cores_fit,
            t_cores=r.forced_cores.median,
            t_other=r.linear_eval_s if cached else r.forced_dense.median,
            cached=cached,
        )
        for r in rows
        if r.forced_cores is not None and r.forced_dense is not None
    ]


def best_penalty(ds: Sequence[Decision]) -> tuple[float, float, float]:
    """``(lo, hi, regret)``: penalties in ``[lo, hi)`` minimise the summed regret (``hi`` may be inf)."""
    cuts = sorted({d.flop_ratio for d in ds if d.flop_ratio > 1.0})
    candidates = [1.0, *cuts]
    scored = [(sum(d.regret(p) for d in ds), p) for p in candidates]
    best = min(s for s, _ in scored)
    winners = [p for s, p in scored if s <= best + 1e-9]
    above = [c for c in cuts if c > max(winners)]
    return min(winners), (above[0] if above else math.inf), best


def penalty_for(d: Decision) -> float:
    return contract.core_path_penalty(d.batch, weight_cached=d.cached)


def decision_summary(ds: Sequence[Decision], title: str) -> list[str]:
    wrong = [d for d in ds if d.picks_cores(penalty_for(d)) != d.cores_faster]
    right = len(ds) - len(wrong)
    lines = [f"{title}: the model (penalty by batch) picked the faster path in {right}/{len(ds)} rows"]
    for d in wrong:
        picked = "cores" if d.picks_cores(penalty_for(d)) else "dense"
        lines.append(
            f"    wrong: {d.where}: picked {picked}; FLOP ratio {d.flop_ratio:.2f}, core path "
            f"{d.time_ratio:.2f}x as fast (break-even penalty {d.break_even_penalty:.2f})"
        )
    for batch in sorted({d.batch for d in ds}):
        at = sorted(d.break_even_penalty for d in ds if d.batch == batch)
        wins = [d for d in ds if d.batch == batch and d.cores_faster]
        lines.append(
            f"    B={batch}: break-even penalty median {statistics.median(at):.2f} (range {at[0]:.2f}-{at[-1]:.2f}); "
            f"core path faster in {len(wins)}/{len(at)} rows"
            + (f", from FLOP ratio {min(d.flop_ratio for d in wins):.2f}" if wins else "")
        )
    lo, hi, regret = best_penalty(ds)
    now = sum(d.regret(penalty_for(d)) for d in ds)
    no_cap = sum(d.regret(lo, memory_cap=False) for d in ds)
    lines.append(
        f"    best single CORE_PATH_PENALTY: [{lo:.2f}, {hi:.2f}) -> summed relative slowdown {regret:.2f} "
        f"(now {now:.2f}; same penalty without the intermediate cap {no_cap:.2f})"
    )
    return lines


def summary(rows: Sequence[Row]) -> list[str]:
    lines: list[str] = []
    worst = max(rows, key=lambda r: r.eval_ratio)
    over = [r for r in rows if r.eval_ratio > EVAL_TARGET]
    lines.append(
        f"(a) eval forward: {len(rows) - len(over)}/{len(rows)} rows within {EVAL_TARGET}x of nn.Linear; "
        f"worst {worst.eval_ratio:.2f}x ({worst.where}, path {worst.eval_path})"
    )
    for r in over:
        lines.append(f"    over target: {r.where}: {r.eval_ratio:.2f}x via {r.eval_path}")
    on_cores = [r for r in rows if r.eval_path == "cores"]
    if on_cores:
        lines.append(
            f"    rows on the core path in eval: {sum(r.eval_ratio < 1 for r in on_cores)}/{len(on_cores)} faster "
            f"than nn.Linear ({', '.join(f'B={r.batch} r={r.max_rank}: {r.eval_ratio:.2f}x' for r in on_cores)})"
        )
    lines += decision_summary(decisions(rows, cached=True), "(a') cached weight: core path vs nn.Linear GEMM")
    lines += decision_summary(decisions(rows, cached=False), "(b) no cached weight: core path vs rebuild + GEMM")
    same = [r for r in rows if r.forced_dense is None]
    if same:
        lines.append("    not timed (heavy, same FLOPs on both paths): " + ", ".join(r.where for r in same))
    skipped = [r for r in rows if r.forced_cores is None and r.forced_dense is not None]
    if skipped:
        lines.append(
            f"    core path not timed (intermediate > {SKIP_INTERMEDIATE * 4 / 2**20:.0f} MiB, refused by the cap): "
            + ", ".join(f"{r.where} ({_mb(r.cores_intermediate)} MB)" for r in skipped)
        )
    gated = [r for r in rows if r.batch in TRAIN_TARGET_BATCHES]
    if gated:
        over = [r for r in gated if r.train_ratio > TRAIN_TARGET]
        worst = max(gated, key=lambda r: r.train_ratio)
        lines.append(
            f"(c) training step at {'/'.join(map(str, TRAIN_TARGET_BATCHES))} tokens: {len(gated) - len(over)}/"
            f"{len(gated)} rows within {TRAIN_TARGET}x of nn.Linear; worst {worst.train_ratio:.2f}x ({worst.where})"
        )
        for r in over:
            lines.append(f"    over target: {r.where}: {r.train_ratio:.2f}x via {r.model_path}")
    small = [r for r in rows if r.batch not in TRAIN_TARGET_BATCHES]
    if small:
        lines.append(
            f"    (no target) other batches: training ratio {min(r.train_ratio for r in small):.2f}x-"
            f"{max(r.train_ratio for r in small):.2f}x"
        )
    return lines


# ---------------------------------------------------------------------------------- report
def _mb(elements: int) -> str:
    return f"{elements * 4 / 2**20:.1f}"


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:.3g}"


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table_a_c(rows: Sequence[Row]) -> str:
    headers = (
        "layer", "rank", "ranks", "params", "%dense", "B", "linear fwd", "mpo fwd", "(a) ratio", "path",
        "linear train", "mpo train", "(c) ratio", "path", "interm MB", "bg load",
    )  # fmt: skip
    body = []
    for r in rows:
        interm = r.cores_intermediate if r.model_path == "cores" else r.dense_intermediate
        body.append((
            f"{r.in_features}->{r.out_features}", "exact" if r.max_rank is None else r.max_rank,
            ",".join(map(str, r.ranks)), r.params, f"{100 * r.params / (r.in_features * r.out_features):.1f}",
            r.batch, fmt_seconds(r.linear_eval_s), fmt_seconds(r.eval_mpo.median), f"{r.eval_ratio:.2f}x",
            r.eval_path, fmt_seconds(r.linear_train_s), fmt_seconds(r.train_mpo.median), f"{r.train_ratio:.2f}x",
            r.model_path, _mb(interm), _load(r.other_load),
        ))  # fmt: skip
    return format_table(headers, body)


def table_b(rows: Sequence[Row]) -> str:
    headers = (
        "layer", "rank", "B", "GFLOP cores", "GFLOP dense", "FLOP ratio", "cores interm MB", "model",
        "t cores", "t dense", "time ratio", "faster", "model right", "break-even", "vs GEMM",
    )  # fmt: skip
    body = []
    for r in rows:
        flop_ratio = r.dense_flops / r.cores_flops
        head = (
            f"{r.in_features}->{r.out_features}", "exact" if r.max_rank is None else r.max_rank, r.batch,
            _gflop(r.cores_flops), _gflop(r.dense_flops), f"{flop_ratio:.2f}", _mb(r.cores_intermediate), r.model_path,
        )  # fmt: skip
        cores_t = None if r.forced_cores is None else r.forced_cores.median
        dense_t = None if r.forced_dense is None else r.forced_dense.median
        if cores_t is None or dense_t is None:
            reason = "same FLOPs" if dense_t is None else "too big"
            tail: tuple[object, ...] = ("skipped", "-" if dense_t is None else fmt_seconds(dense_t), reason,
                                        "-", "-", "-", "-")  # fmt: skip
        else:
            faster = "cores" if cores_t < dense_t else "dense"
            tail = (
                fmt_seconds(cores_t), fmt_seconds(dense_t), f"{dense_t / cores_t:.2f}", faster,
                r.model_path == faster, f"{flop_ratio * cores_t / dense_t:.2f}", f"{r.linear_eval_s / cores_t:.2f}",
            )  # fmt: skip
        body.append(head + tail)
    return format_table(headers, body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one layer shape, three ranks, two batches")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--input-grad", action="store_true", help="the training step also computes the input's gradient"
    )
    parser.add_argument("--all-paths", action="store_true", help="also time core paths the cap refuses")
    args = parser.parse_args(argv)

    threads = setup_threads(args.threads)
    env = environment(threads)
    config = QUICK if args.quick else FULL
    grads = "parameters and input" if args.input_grad else "parameters only (input needs no grad)"
    print(f"bench_linear: MPOLinear vs nn.Linear (float32, CPU); training step with grads on {grads}")
    print(describe_environment(env))
    print("times: median of repeats after a warm-up; ratios = MPO time / nn.Linear time (lower is better);")
    print("bg load: CPU cores other processes kept busy while the row was timed (> ~0.2: timings inflated)\n")

    started = time.perf_counter()
    monitor = CpuMonitor()
    rows: list[Row] = []
    baselines: list[dict[str, Any]] = []
    max_path_diff = 0.0
    for index, (in_f, out_f) in enumerate(config.shapes):
        linear, layers = make_layers(in_f, out_f, config.ranks, args.seed + index)
        for batch in config.batches:
            torch.manual_seed(args.seed + 1000 + batch)
            x = torch.randn(batch, in_f)
            group, baseline = run_group(linear, layers, x, args, started)
            rows += group
            if baseline is not None:
                baselines.append({"in_features": in_f, "out_features": out_f, "batch": batch, **asdict(baseline)})
            if batch == config.batches[0]:
                max_path_diff = max(max_path_diff, *(check_outputs(layer, x) for layer in layers.values()))
    total = time.perf_counter() - started
    other_load = monitor.foreign_cores()

    print("(a) eval forward (no_grad, cached weight) and (c) training step (forward + backward), vs nn.Linear")
    print(table_a_c(rows))
    print(
        "\n(b) forced core path vs forced dense path (no_grad, weight not cached) against path_costs "
        f"(penalty {contract.CORE_PATH_PENALTY:g} * (B/32)^{contract.CORE_PATH_PENALTY_GROWTH:g} with a cached weight, "
        f"min of that and {contract.UNCACHED_CORE_PATH_PENALTY:g} * "
        f"(B/32)^{contract.UNCACHED_CORE_PATH_PENALTY_GROWTH:g} without; "
        f"CORE_PATH_MAX_INTERMEDIATE={contract.CORE_PATH_MAX_INTERMEDIATE:g})"
    )
    print(
        "    FLOP ratio = dense/cores FLOPs; time ratio = dense/cores time (> 1: core path faster);\n"
        "    break-even = FLOP ratio / time ratio (the penalty that would make this row a tie);\n"
        "    vs GEMM = nn.Linear forward time / core path time (the cached-weight decision of (a))"
    )
    print(table_b(rows))
    print()
    for line in summary(rows):
        print(line)
    print(f"max relative difference between the two paths' outputs: {max_path_diff:.1e}")
    print(end_of_run(total))
    print(busy_note(other_load, threads))

    env["load_average_end"] = load_average()
    env["other_processes_cores"] = other_load
    payload = {
        "benchmark": "bench_linear",
        "quick": args.quick,
        "seed": args.seed,
        "input_grad": args.input_grad,
        "environment": env,
        "wall_s": total,
        "core_path_penalty": contract.CORE_PATH_PENALTY,
        "core_path_max_intermediate": contract.CORE_PATH_MAX_INTERMEDIATE,
        "suggested_penalty": {
            name: _penalty_dict(best_penalty(decisions(rows, cached=flag)))
            for name, flag in (("cached_weight", True), ("uncached_weight", False))
        },
        "max_path_output_difference": max_path_diff,
        "linear_baselines": baselines,
        "rows": [_row_dict(r) for r in rows],
    }
    print(f"results: {write_json('bench_linear', payload).relative_to(REPO)}")


def _penalty_dict(best: tuple[float, float, float]) -> dict[str, float | None]:
    lo, hi, regret = best
    return {"lo": lo, "hi": None if math.isinf(hi) else hi, "summed_regret": regret}


def _row_dict(row: Row) -> dict[str, Any]:
    data = asdict(row)
    data.update(eval_ratio=row.eval_ratio, train_ratio=row.train_ratio)
    return data


if __name__ == "__main__":
    main()
