"""Run a test body in N gloo processes: the spawn harness the distributed tests share.

``run_distributed(worker, world_size, *args)`` starts ``world_size`` processes with
``torch.multiprocessing`` (spawn), initialises a gloo process group in each over a file store in a
fresh temporary directory (no TCP port to race for), calls ``worker(rank, world_size, *args)`` and
tears the group down. A worker that raises makes the call raise :class:`DistributedTestError`
carrying the rank and the worker's own traceback; a run past ``timeout`` kills every process and
raises too, so a deadlocked collective fails the test instead of hanging it.

The worker must be picklable (a module-level function) and its arguments too. Each process runs
torch on one thread (the tests are tiny, and threads only fight on a shared machine).

Examples:
    >>> def worker(rank: int, world_size: int) -> None:  # doctest: +SKIP
    ...     t = torch.ones(1) * rank
    ...     dist.all_reduce(t)
    ...     assert t.item() == sum(range(world_size))
    >>> run_distributed(worker, 2)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import gc
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedTestError", "run_distributed"]

#: How long one collective may wait for the other ranks before gloo raises (seconds). Short, so
#: that a rank that died makes the others fail fast with gloo's message naming the collective.
COLLECTIVE_TIMEOUT_S = 15.0


class DistributedTestError(AssertionError):
    """A worker raised, or the group ran past its timeout; the message holds the rank's traceback."""


def _entry(
    rank: int,
    world_size: int,
    init_file: str,
    worker: Callable[..., Any],
    args: tuple[Any, ...],
    errors: Any,
    collective_timeout_s: float,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        try:
            dist.barrier()  # every rank has finished connecting before any worker can fail or return
            worker(rank, world_size, *args)
            try:  # keep the group up until the others are done with it; a peer that exited on purpose
                dist.barrier()  # (a test of a dying rank) makes this fail, which is not this rank's error
            except RuntimeError:
                pass
        finally:
            # Free what the worker left in reference cycles (a GradientMask and its banks' hooks
            # hold the group) while the interpreter is whole: a gloo process group still alive when
            # the interpreter finalises can abort the process at exit (about 1 run in 7 here).
            gc.collect()
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        errors.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_distributed(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` gloo processes and wait for all.

    Args:
        worker: A picklable (module-level) function; it runs after ``init_process_group`` and
            before ``destroy_process_group`` in each process.
        world_size: Number of processes, at least 1.
        *args: Picklable arguments passed after ``rank`` and ``world_size``.
        timeout: Wall-clock limit for the whole group in seconds; past it every process is killed.
        collective_timeout_s: The process group's timeout (how long one collective waits).

    Raises:
        ValueError: If ``world_size`` is not a positive integer.
        DistributedTestError: If a worker raised (the message holds every failing rank's
            traceback) or the group ran past ``timeout``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="mpolab-dist-") as tmp:
        init_file = os.path.join(tmp, "init")
        context = mp.start_processes(
            _entry,
            args=(world_size, init_file, worker, args, errors, collective_timeout_s),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        failed = False
        timed_out = False
        try:
            while True:
                left = (deadline - datetime.datetime.now()).total_seconds()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    if context.join(timeout=min(left, 0.5)):
                        break
                except mp.ProcessRaisedException:
                    failed = True
                    break
                except mp.ProcessExitedException:
                    failed = True
                    break
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
    reports: list[tuple[int, str]] = []
    while True:
        try:
            if errors.empty():
                break
            reports.append(errors.get())
        except (queue.Empty, EOFError, OSError):
            break
    if reports:
        # Arrival order: the rank that failed first (the cause) comes first.
        body = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in reports)
        raise DistributedTestError(f"{len(reports)} of {world_size} ranks failed:\n{body}")
    if timed_out:
        raise DistributedTestError(f"the {world_size}-process group ran past its {timeout:.0f} s timeout (killed)")
    if failed:
        codes = [process.exitcode for process in context.processes]
        raise DistributedTestError(f"a worker exited without a report; exit codes {codes}")
