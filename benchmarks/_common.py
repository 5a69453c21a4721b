"""Shared helpers for the benchmarks: thread setup, timing, table printing and JSON results.

Timing protocol (:func:`time_call`): optional warm-up calls, then up to ``repeats`` timed samples,
stopping early once ``budget_s`` seconds have been spent (always at least one sample); the
reported time is the median of the samples. Calls far below a millisecond are timed in blocks of
``inner`` calls (calibrated from the warm-up) so that timer resolution and Python overhead do not
dominate.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
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
    inner = 1
    for k in range(warmup):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if k == warmup - 1 and elapsed < MIN_BLOCK_S:
            inner = max(1, min(1000, int(MIN_BLOCK_S / max(elapsed, 1e-7))))
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max(1, repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed / inner)
        spent += elapsed
        if spent >= budget_s:
            break
    return Timing(statistics.median(samples), min(samples), len(samples), inner)


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages, or ``None`` where the OS does not report them."""
    try:
        return os.getloadavg()
    except OSError:
        return None


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
