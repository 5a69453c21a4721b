"""Benchmark ``mpolab.decompose`` against tensorly's ``tensor_train_matrix`` (pytorch backend).

What is measured, in one process, on the same seeded float32 matrices ``W: [out, in]``:

* wall time of ``mpolab.decompose(W, max_rank=... | rel_tol=...)`` (5 cores, factors chosen by
  mpolab) and of ``tensorly.decomposition.tensor_train_matrix`` on ``W`` reshaped to
  ``out_factors + in_factors`` with ``rank=[1, *mpo.ranks, 1]``: tensorly gets exactly the ranks
  mpolab chose, so for ``rel_tol`` rows mpolab picks the ranks and both are timed at those ranks;
* the relative error ``‖W - Ŵ‖_F / ‖W‖_F`` of both results, computed from ``MPO.to_matrix()``
  and tensorly's ``tt_matrix_to_tensor`` with float64 norms, and whether ours is no worse than
  tensorly's (``ours <= tensorly · (1 + 1e-4)``).

Matrices: Gaussian ``768x3072``, ``3072x768`` and ``4096x4096`` (rank caps 16/64/256/exact and
``rel_tol`` 0.3/0.6; Gaussian matrices barely compress, so ``rel_tol`` keeps large ranks), and
*structured* matrices (a random rank-8 MPO plus 10 % Gaussian noise: bond spectra with a knee,
like trained weights) where ``rel_tol`` 0.1/0.3/0.6 picks genuinely small ranks.

Timing: ``torch.set_num_threads(2)`` for both libraries; one process-wide warm-up of both, then
per row a warm-up call of each and the median of up to 5 repeats, the two methods' calls
alternating so that load from other processes hits both alike (4096x4096: no per-row warm-up
and 2 repeats, as one tensorly call takes seconds). Results go to
``benchmarks/results/bench_decompose.json``.

Run: ``python benchmarks/bench_decompose.py [--quick] [--threads N]`` from the repository root.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmark the working tree, installed or not

import tensorly as tl  # noqa: E402
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
from tensorly.decomposition import tensor_train_matrix  # noqa: E402
from tensorly.tt_matrix import tt_matrix_to_tensor  # noqa: E402

import mpolab  # noqa: E402

NUM_CORES = 5
#: ours counts as "no worse" when its error is at most tensorly's times this.
ERROR_SLACK = 1 + 1e-4
#: Timed samples per method and row, and the seconds after which a row stops repeating.
REPEATS = 5
BUDGET_S = 4.0
#: One tensorly call on a matrix this large takes seconds: no per-row warm-up, fewer repeats.
LARGE_NUMEL = 4096 * 4096
LARGE_REPEATS = 2


@dataclass(frozen=True)
class Policy:
    """A truncation policy: a rank cap (``None``: exact) or a relative tolerance."""

    max_rank: int | None = None
    rel_tol: float | None = None

    @property
    def label(self) -> str:
        if self.rel_tol is not None:
            return f"rel_tol={self.rel_tol:g}"
        return "exact" if self.max_rank is None else f"max_rank={self.max_rank}"

    def kwargs(self) -> dict[str, Any]:
        return {"max_rank": self.max_rank, "rel_tol": self.rel_tol}


@dataclass(frozen=True)
class MatrixSpec:
    kind: str  # "gauss" or "mpo8+noise"
    out_features: int
    in_features: int
    policies: tuple[Policy, ...]

    @property
    def label(self) -> str:
        return f"{self.kind} {self.out_features}x{self.in_features}"


@dataclass
class Row:
    matrix: str
    policy: str
    ranks: tuple[int, ...]
    params: int
    compression: float
    ours_s: Timing
    tensorly_s: Timing
    speedup: float
    ours_error: float
    tensorly_error: float
    ours_reported_error: float | None
    ours_no_worse: bool
    other_load: float | None  # cores kept busy by other processes while this row was timed


CAPS = (Policy(max_rank=16), Policy(max_rank=64), Policy(max_rank=256), Policy())
GAUSS_TOLS = (Policy(rel_tol=0.3), Policy(rel_tol=0.6))
STRUCT_TOLS = (Policy(rel_tol=0.1), Policy(rel_tol=0.3), Policy(rel_tol=0.6))


def matrix_specs(quick: bool) -> list[MatrixSpec]:
    if quick:
        return [
            MatrixSpec("gauss", 768, 3072, (Policy(max_rank=16), Policy(max_rank=256), Policy(), Policy(rel_tol=0.3))),
            MatrixSpec("mpo8+noise", 3072, 768, (Policy(rel_tol=0.3),)),
        ]
    return [
        MatrixSpec("gauss", 768, 3072, CAPS + GAUSS_TOLS),
        MatrixSpec("gauss", 3072, 768, CAPS + GAUSS_TOLS),
        MatrixSpec("gauss", 4096, 4096, CAPS + GAUSS_TOLS),
        MatrixSpec("mpo8+noise", 3072, 768, STRUCT_TOLS),
        MatrixSpec("mpo8+noise", 4096, 4096, STRUCT_TOLS),
    ]


# ---------------------------------------------------------------------------------- matrices
def make_matrix(spec: MatrixSpec, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    if spec.kind == "gauss":
        return torch.randn(spec.out_features, spec.in_features)
    if spec.kind == "mpo8+noise":
        return structured_matrix(spec.out_features, spec.in_features, rank=8, noise=0.1)
    raise ValueError(f"unknown matrix kind {spec.kind!r}")


def structured_matrix(out_features: int, in_features: int, *, rank: int, noise: float) -> torch.Tensor:
    """A random MPO of bond ``rank`` (unit Frobenius norm) plus Gaussian noise of norm ``noise``.

    Its bond spectra have ``rank`` large values and a flat noise floor, so a tolerance above the
    noise level finds small ranks (a Gaussian matrix has no such knee).
    """
    plan = mpolab.plan_factors(out_features, in_features, NUM_CORES)
    bonds = [1] + [rank] * (NUM_CORES - 1) + [1]
    cores = [
        torch.randn(bonds[k], i, j, bonds[k + 1], dtype=torch.float64)
        for k, (i, j) in enumerate(zip(plan.out_factors, plan.in_factors))
    ]
    signal = mpolab.MPO(cores, out_features, in_features).to_matrix()
    signal = signal / torch.linalg.matrix_norm(signal)
    gauss = torch.randn(out_features, in_features, dtype=torch.float64)
    return (signal + noise * gauss / torch.linalg.matrix_norm(gauss)).float()


def relative_error(W: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖W - approx‖_F / ‖W‖_F`` in float64."""
    W64 = W.double()
    return float(torch.linalg.matrix_norm(W64 - approx.reshape(W.shape).double()) / torch.linalg.matrix_norm(W64))


# ---------------------------------------------------------------------------------- the two methods
def run_ours(W: torch.Tensor, policy: Policy) -> mpolab.MPO:
    return mpolab.decompose(W, NUM_CORES, **policy.kwargs())


def run_tensorly(W: torch.Tensor, mpo: mpolab.MPO) -> Any:
    tensor = W.reshape(*mpo.out_factors, *mpo.in_factors)
    return tensor_train_matrix(tensor, rank=[1, *mpo.ranks, 1])


def warm_up() -> None:
    """Initialise both libraries' kernels and the thread pool once, on a small matrix."""
    W = torch.randn(768, 3072)
    for policy in (Policy(max_rank=16), Policy(rel_tol=0.3)):
        run_tensorly(W, run_ours(W, policy))


def bench_row(W: torch.Tensor, spec: MatrixSpec, policy: Policy) -> Row:
    """Time both methods interleaved (ours, tensorly, ours, …) and compare their errors."""
    monitor = CpuMonitor()
    mpo = run_ours(W, policy)  # also the warm-up of ours
    large = W.numel() >= LARGE_NUMEL
    result: list[Any] = [None]  # tensorly's last result, to measure its error without another call

    def tensorly_call() -> None:
        result[0] = run_tensorly(W, mpo)

    ours, theirs = time_interleaved(
        [lambda: run_ours(W, policy), tensorly_call],
        warmup=0 if large else 1,
        repeats=LARGE_REPEATS if large else REPEATS,
        budget_s=BUDGET_S,
    )
    other_load = monitor.foreign_cores()
    ours_error = relative_error(W, mpo.to_matrix())
    tensorly_error = relative_error(W, tt_matrix_to_tensor(result[0]))
    return Row(
        matrix=spec.label,
        policy=policy.label,
        ranks=mpo.ranks,
        params=mpo.num_params,
        compression=mpo.compression,
        ours_s=ours,
        tensorly_s=theirs,
        speedup=theirs.median / ours.median,
        ours_error=ours_error,
        tensorly_error=tensorly_error,
        ours_reported_error=mpo.truncation_error,
        ours_no_worse=ours_error <= tensorly_error * ERROR_SLACK,
        other_load=other_load,
    )


# ---------------------------------------------------------------------------------- report
HEADERS = (
    "matrix",
    "policy",
    "ranks",
    "params",
    "% dense",
    "mpolab",
    "tensorly",
    "speedup",
    "err mpolab",
    "err tensorly",
    "ours<=tl",
    "bg load",
)


def table_row(row: Row) -> Sequence[object]:
    return (
        row.matrix,
        row.policy,
        ",".join(map(str, row.ranks)),
        row.params,
        f"{100 * row.compression:.1f}",
        fmt_seconds(row.ours_s.median),
        fmt_seconds(row.tensorly_s.median),
        f"{row.speedup:.1f}x",
        f"{row.ours_error:.6f}",
        f"{row.tensorly_error:.6f}",
        row.ours_no_worse,
        "n/a" if row.other_load is None else f"{row.other_load:.2f}",
    )


def summary(rows: Sequence[Row]) -> list[str]:
    slowest = min(rows, key=lambda r: r.speedup)
    worse = [r for r in rows if not r.ours_no_worse]
    lines = [
        f"min speedup {slowest.speedup:.1f}x ({slowest.matrix}, {slowest.policy}); "
        f"median speedup {sorted(r.speedup for r in rows)[len(rows) // 2]:.1f}x over {len(rows)} rows",
        f"error: ours <= tensorly*(1+1e-4) in {len(rows) - len(worse)}/{len(rows)} rows",
    ]
    for r in worse:
        lines.append(
            f"  worse: {r.matrix} {r.policy}: ours {r.ours_error:.3g} vs tensorly {r.tensorly_error:.3g}"
            + ("  (both at float32 round-off)" if max(r.ours_error, r.tensorly_error) < 1e-5 else "")
        )
    reported = [r for r in rows if r.ours_reported_error is not None]
    drift = max(abs(r.ours_reported_error - r.ours_error) for r in reported)  # type: ignore[operator]
    lines.append(f"max |MPO.truncation_error - measured error| = {drift:.2e}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (about 15 s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both libraries (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    threads = setup_threads(args.threads)
    tl.set_backend("pytorch")
    env = environment(threads)
    print(f"bench_decompose: mpolab.decompose vs tensorly {tl.__version__} tensor_train_matrix (pytorch backend)")
    print(describe_environment(env))
    print("times: median of repeats after a warm-up; speedup = tensorly / mpolab; errors ||W-W^||/||W|| in float64;")
    print("bg load: CPU cores other processes kept busy while the row was timed (> ~0.2: timings inflated)\n")

    started = time.perf_counter()
    monitor = CpuMonitor()
    warm_up()
    rows: list[Row] = []
    for index, spec in enumerate(matrix_specs(args.quick)):
        W = make_matrix(spec, args.seed + index)
        for policy in spec.policies:
            rows.append(bench_row(W, spec, policy))
            progress(f"done: {spec.label} {policy.label} ({time.perf_counter() - started:.0f} s)")
    total = time.perf_counter() - started
    other_load = monitor.foreign_cores()

    print(format_table(HEADERS, [table_row(r) for r in rows]))
    print()
    for line in summary(rows):
        print(line)
    print(end_of_run(total))
    print(busy_note(other_load, threads))

    env["load_average_end"] = load_average()
    env["other_processes_cores"] = other_load
    payload = {
        "benchmark": "bench_decompose",
        "quick": args.quick,
        "seed": args.seed,
        "tensorly": tl.__version__,
        "environment": env,
        "wall_s": total,
        "rows": [_row_dict(r) for r in rows],
        "min_speedup": min(r.speedup for r in rows),
    }
    print(f"results: {write_json('bench_decompose', payload).relative_to(REPO)}")


def _row_dict(row: Row) -> dict[str, Any]:
    data = asdict(row)
    data["ours_s"] = row.ours_s.as_dict()
    data["tensorly_s"] = row.tensorly_s.as_dict()
    return data


if __name__ == "__main__":
    main()
