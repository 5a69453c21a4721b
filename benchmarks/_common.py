"""Shared helpers for the benchmarks: thread setup, timing, table printing and JSON results.

Timing protocol (:func:`time_call`): optional warm-up calls, then up to ``repeats`` timed samples,
stopping early once ``budget_s`` seconds have been spent (always at least one sample); the
reported time is the median of the samples. Calls shorter than ``MIN_BLOCK_S`` are timed in
blocks of ``inner`` calls (calibrated from the warm-up) so that timer resolution does not
dominate. :func:`time_interleaved` times several functions with alternating blocks, for ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: A timed block of calls should last at least this long (seconds).
MIN_BLOCK_S = 0.02


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and minimum over ``samples`` timed blocks of ``inner`` calls."""

    median: float
    min: float
    samples: int
    inner: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def setup_threads(num_threads: int) -> int:
    """Pin PyTorch's intra-op thread pool to ``num_threads`` and return the effective count."""
    torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 2.0,
) -> Timing:
    """Median wall time of ``fn()`` in seconds (see the module docstring for the protocol)."""
    return time_interleaved([fn], warmup=warmup, repeats=repeats, budget_s=budget_s)[0]


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 2.0,
) -> list[Timing]:
    """:func:`time_call` for several functions whose timed blocks alternate (a, b, a, b, …).

    Load from other processes comes and goes; alternating makes it hit every function alike,
    which is what a ratio of two timings needs.
    """
    inner = [_calibrate(fn, warmup) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(samples[0]) < max(1, repeats) and (spent < budget_s or not samples[0]):
        for fn, n, out in zip(fns, inner, samples):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = time.perf_counter() - start
            out.append(elapsed / n)
            spent += elapsed
    return [Timing(statistics.median(s), min(s), len(s), n) for s, n in zip(samples, inner)]


def _calibrate(fn: Callable[[], Any], warmup: int) -> int:
    """Run the warm-up calls; return how many calls a timed block needs to last ``MIN_BLOCK_S``."""
    inner = 1
    for k in range(warmup):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if k == warmup - 1 and elapsed < MIN_BLOCK_S:
            inner = max(1, min(1000, int(MIN_BLOCK_S / max(elapsed, 1e-7))))
    return inner


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages, or ``None`` where the OS does not report them."""
    try:
        return os.getloadavg()
    except OSError:
        return None


class CpuMonitor:
    """CPU time used by *other* processes while the benchmark runs (Linux ``/proc/stat``).

    The benchmarks share the machine; on 2 cores a concurrent job inflates every timing, so the
    report states how many cores other processes kept busy on average.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(v) for v in fields[:8]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        own = sum(os.times()[:4])
        return busy, own, time.perf_counter()

    def foreign_cores(self) -> float | None:
        """Average number of cores busy with other processes since construction."""
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        return max(0.0, (busy - own) / wall)


def environment(num_threads: int) -> dict[str, Any]:
    """What the numbers depend on: library versions, CPU, thread count and machine load."""
    import opt_einsum

    return {
        "torch": torch.__version__,
        "opt_einsum": opt_einsum.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": num_threads,
        "load_average_start": load_average(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_environment(env: dict[str, Any]) -> str:
    load = env.get("load_average_start")
    load_text = "n/a" if load is None else "/".join(f"{v:.2f}" for v in load)
    return (
        f"torch {env['torch']} | opt_einsum {env['opt_einsum']} | {env['processor']} "
        f"({env['cpu_count']} CPUs) | torch threads: {env['torch_threads']} | load avg 1/5/15 min: {load_text}"
    )


def busy_note(other_cores: float | None, threads: int) -> str:
    """One line on how busy the machine was with other work during the run."""
    if other_cores is None:
        return "load from other processes: unknown (no /proc/stat)"
    verdict = "quiet machine" if other_cores < 0.2 else "BUSY MACHINE: timings inflated and noisy"
    return (
        f"other processes kept {other_cores:.2f} of {os.cpu_count()} CPUs busy on average "
        f"({threads} threads here): {verdict}"
    )


def end_of_run(total_s: float) -> str:
    """``wall time …; load avg at end: …``."""
    load = load_average()
    text = "n/a" if load is None else "/".join(f"{v:.2f}" for v in load)
    return f"wall time {total_s:.0f} s; load avg at end: {text}"


def progress(message: str) -> None:
    """A progress line on stderr (stdout keeps only the report)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_seconds(seconds: float) -> str:
    """``12.3 ms`` / ``1.23 s`` style."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>.json`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: object) -> object:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
