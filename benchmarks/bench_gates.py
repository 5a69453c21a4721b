"""Benchmark the gates: routing cost against the top-k gate, and MoE forwards against the dense FFN.

Shapes: BERT-base / T5-base FFN (d 768, F 3072, ReLU), ``--tokens`` tokens (4096), E = 16 experts.

Part 1, routing cost (the gate alone, ``x [T, d] -> Routing``), baseline ``TopKGate`` k = 1:

* ``TopKGate`` k = 1 (Switch) and k = 2 (GShard), with their balance loss;
* ``AvgKGate`` k = 4 (EMoE), ``score="keys"`` (one ``[T, d] x [d, E]`` product, like top-k) and
  ``score="activation"`` (the full ``[T, F]`` projection, so about a dense FFN's first matmul);
* ``TopAnyGate`` over 16 slots (DynMoE), with its four aux losses;
* MoEfication's ``SimilarityGate`` / ``MLPGate`` when ``mpolab_moe.gates.moefication`` exists.

Columns: eval forward (no grad) and a training step (forward, then backward of the combine
weights plus aux losses into the gate's parameters and ``x``; MoEfication's routers return weights
with no gradient, so their training step is a forward).

Part 2, full layer at the same shapes, baseline the dense FFN ``Linear -> ReLU -> Linear``:

* sliced experts (one FFN cut into 16 groups of 192 neurons, random split) with ``AvgKGate`` k = 4
  and with ``TopKGate`` k = 4: each token runs a quarter of the neurons;
* sliced experts with ``TopAnyGate`` (each token runs the slots above its thresholds, about half
  at initialisation) and with MoEfication's ``SimilarityGate`` k = 4;
* dense experts (16 copies of the FFN) with ``TopKGate`` k = 1 (Switch): the dense FFN's FLOPs.

Timing: ``torch.set_num_threads``; compared calls are interleaved (``_common.time_interleaved``).

Run: ``python benchmarks/bench_gates.py [--quick] [--threads N] [--tokens T] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmark the working tree, installed or not

from _common import (  # noqa: E402
    CpuMonitor,
    busy_note,
    describe_environment,
    end_of_run,
    environment,
    fmt_seconds,
    format_table,
    progress,
    setup_threads,
    time_interleaved,
    write_json,
)

from mpolab_moe.experts.base import FFNWeights  # noqa: E402
from mpolab_moe.experts.dense import DenseExperts  # noqa: E402
from mpolab_moe.experts.sliced import SlicedExperts  # noqa: E402
from mpolab_moe.gates.avg_k import AvgKGate  # noqa: E402
from mpolab_moe.gates.base import BankBoundGate  # noqa: E402
from mpolab_moe.gates.top_any import TopAnyGate  # noqa: E402
from mpolab_moe.gates.top_k import TopKGate  # noqa: E402
from mpolab_moe.layer import MoE  # noqa: E402

D_MODEL, D_FF, NUM_EXPERTS, K = 768, 3072, 16, 4


def build_ffn(device: torch.device) -> tuple[nn.Sequential, SlicedExperts]:
    torch.manual_seed(0)
    up, down = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)
    groups = torch.randperm(D_FF).view(NUM_EXPERTS, D_FF // NUM_EXPERTS)
    bank = SlicedExperts.from_ffn(
        FFNWeights(
            up.weight.detach(), down.weight.detach(), b1=up.bias.detach(), b2=down.bias.detach(), activation="relu"
        ),
        groups,
    )
    return nn.Sequential(up, nn.ReLU(), down).to(device), bank.to(device)


def moefication_gates(bank: SlicedExperts) -> dict[str, nn.Module]:
    """MoEfication's routers (the MLP router untrained: training changes its weights, not its cost)."""
    try:
        from mpolab_moe.gates.moefication import GroundTruthGate, MLPGate, SimilarityGate
    except ImportError as err:
        progress(f"no MoEfication routers: {err}")
        return {}
    return {
        f"SimilarityGate k={K}": SimilarityGate(bank, k=K),
        f"MLPGate k={K}": MLPGate.from_bank(bank, k=K),
        f"GroundTruthGate k={K} (oracle)": GroundTruthGate(bank, k=K),
    }


def build_gates(bank: SlicedExperts, device: torch.device) -> dict[str, nn.Module]:
    gates: dict[str, nn.Module] = {
        "TopKGate k=1": TopKGate(D_MODEL, NUM_EXPERTS, k=1),
        "TopKGate k=2": TopKGate(D_MODEL, NUM_EXPERTS, k=2),
        f"AvgKGate k={K} (keys)": AvgKGate(D_MODEL, NUM_EXPERTS, k=K),
        f"AvgKGate k={K} (activation)": AvgKGate(D_MODEL, NUM_EXPERTS, k=K, score="activation"),
        "TopAnyGate (16 slots)": TopAnyGate(D_MODEL, NUM_EXPERTS, adaptive=False),
        **moefication_gates(bank),
    }
    for gate in gates.values():
        if isinstance(gate, BankBoundGate):  # as MoE(gate, bank) would
            gate.bind(bank)
    return {name: g.to(device) for name, g in gates.items()}


def similarity_layer(bank: SlicedExperts) -> dict[str, nn.Module]:
    try:
        from mpolab_moe.gates.moefication import SimilarityGate
    except ImportError:
        return {}
    return {f"sliced + SimilarityGate k={K}": MoE(SimilarityGate(bank, k=K), bank)}


def build_layers(dense: nn.Sequential, bank: SlicedExperts, device: torch.device) -> dict[str, nn.Module]:
    def sliced() -> SlicedExperts:
        return SlicedExperts(bank.w1.detach(), bank.w2.detach(), bank.groups, b1=bank.b1.detach(), b2=bank.b2.detach())

    up, down = dense[0], dense[2]
    copies = DenseExperts.from_ffn(
        FFNWeights(up.weight.detach(), down.weight.detach(), b1=up.bias.detach(), b2=down.bias.detach()), NUM_EXPERTS
    )
    layers: dict[str, nn.Module] = {
        "dense FFN": dense,
        f"sliced + AvgKGate k={K}": MoE(AvgKGate(D_MODEL, NUM_EXPERTS, k=K), sliced()),
        f"sliced + TopKGate k={K}": MoE(TopKGate(D_MODEL, NUM_EXPERTS, k=K), sliced()),
        "sliced + TopAnyGate": MoE(TopAnyGate(D_MODEL, NUM_EXPERTS, adaptive=False), sliced()),
        **similarity_layer(sliced()),
        "dense experts + TopKGate k=1": MoE(TopKGate(D_MODEL, NUM_EXPERTS, k=1), copies),
    }
    return {name: m.to(device) for name, m in layers.items()}


def gate_train_step(gate: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for p in gate.parameters():
            p.grad = None
        r = gate(x)
        loss = r.combine_weight.sum() if r.combine_weight is not None else r.soft_weight.sum()
        if r.aux_loss is not None:
            loss = loss + r.aux_loss
        if loss.requires_grad:  # MoEfication's routers give weight-1 routings with no gradient
            loss.backward()

    return step


def layer_train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        loss = module(x).square().mean()
        aux = getattr(module, "aux_loss", None)
        if aux is not None:
            loss = loss + aux
        loss.backward()

    return step


def eval_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def experts_per_token(module: nn.Module, x: torch.Tensor) -> float | None:
    with torch.no_grad():
        out = module(x)
    routing = getattr(module, "last_routing", None)
    if routing is None:
        routing = out if hasattr(out, "experts_per_token") else None
    return None if routing is None else float(routing.experts_per_token.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens, fewer repeats")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    device = torch.device(args.device)
    tokens = 1024 if args.quick else args.tokens
    env = environment(threads)
    print(f"bench_gates: d {D_MODEL}, F {D_FF}, E = {NUM_EXPERTS}, k = {K}, {tokens} tokens, {device}")
    print(describe_environment(env))
    monitor = CpuMonitor()
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats, budget = (3, 3.0) if args.quick else (7, 15.0)

    def timed(fns: list[Callable[[], None]]):  # noqa: ANN202
        wrapped = [lambda f=f: (f(), sync()) for f in fns]
        return time_interleaved(wrapped, warmup=2, repeats=repeats, budget_s=budget)

    dense, bank = build_ffn(device)
    x = torch.randn(tokens, D_MODEL, device=device)
    xg = x.clone().requires_grad_(True)

    progress("part 1: gates")
    gates = build_gates(bank, device)
    names = list(gates)
    gate_eval = timed([eval_step(g.eval(), x) for g in gates.values()])
    gate_train = timed([gate_train_step(g.train(), xg) for g in gates.values()])
    base_eval, base_train = gate_eval[0].median, gate_train[0].median
    gate_rows, gate_records = [], []
    for n, e, t in zip(names, gate_eval, gate_train):
        k_mean = experts_per_token(gates[n].eval(), x)
        gate_rows.append(
            [
                n,
                "-" if k_mean is None else f"{k_mean:.2f}",
                fmt_seconds(e.median),
                f"{e.median / base_eval:.2f}x",
                fmt_seconds(t.median),
                f"{t.median / base_train:.2f}x",
            ]
        )
        gate_records.append({"gate": n, "experts_per_token": k_mean, "eval_s": e.median, "train_s": t.median})
    print("\nrouting cost (time relative to TopKGate k=1; lower is cheaper)")
    print(format_table(["gate", "experts/token", "eval fwd", "vs top-1", "train fwd+bwd", "vs top-1"], gate_rows))

    progress("part 2: MoE layers")
    layers = build_layers(dense, bank, device)
    lnames = list(layers)
    layer_eval = timed([eval_step(m.eval(), x) for m in layers.values()])
    layer_train = timed([layer_train_step(m.train(), x) for m in layers.values()])
    base_eval, base_train = layer_eval[0].median, layer_train[0].median
    layer_rows, layer_records = [], []
    for n, e, t in zip(lnames, layer_eval, layer_train):
        k_mean = experts_per_token(layers[n].eval(), x) if n != "dense FFN" else None
        params = sum(p.numel() for p in layers[n].parameters())
        layer_rows.append(
            [
                n,
                f"{params:,}",
                "-" if k_mean is None else f"{k_mean:.2f}",
                fmt_seconds(e.median),
                f"{base_eval / e.median:.2f}x",
                fmt_seconds(t.median),
                f"{base_train / t.median:.2f}x",
            ]
        )
        layer_records.append(
            {"layer": n, "params": params, "experts_per_token": k_mean, "eval_s": e.median, "train_s": t.median}
        )
    print("\nfull layer (throughput relative to the dense FFN; higher is faster)")
    print(
        format_table(
            ["layer", "params", "experts/token", "eval fwd", "vs dense", "train step", "vs dense"],
            layer_rows,
        )
    )
    print(busy_note(monitor.foreign_cores(), threads))
    print(end_of_run(time.perf_counter() - started))
    payload = {
        "environment": env,
        "device": str(device),
        "shapes": {"d": D_MODEL, "F": D_FF, "E": NUM_EXPERTS, "k": K, "tokens": tokens},
        "gates": gate_records,
        "layers": layer_records,
    }
    print(f"results: {write_json('bench_gates', payload)}")


if __name__ == "__main__":
    main()
