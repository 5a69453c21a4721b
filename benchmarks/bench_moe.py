"""Benchmark the MoE layer: Switch (dense experts) and MPOE against one dense FFN and a naive loop.

Shapes: T5-base FFN (d 768, F 3072, ReLU), ``--tokens`` tokens (4096), E = 8 experts, top-1 routing
(Switch: every token runs one expert, so the per-token FLOPs equal the dense FFN's). Each row is a
training step: forward + backward of ``y.square().mean()`` (plus the aux loss for the MoE rows).

Rows:

* ``dense FFN``: ``Linear(768, 3072) -> ReLU -> Linear(3072, 768)``, the baseline;
* ``Switch, dense experts``: ``MoE(TopKGate(k=1), DenseExperts)``, sort-based dropless dispatch;
* ``naive per-expert loop``: the same experts as ``nn.ModuleList`` of FFNs, each run on
  ``x[index == e]`` and scattered back (what many reference implementations do);
* ``MPOE``: ``MoE(TopKGate(k=1), MPOExperts)`` upcycled from the dense FFN at exact ranks and at
  ``--max-rank`` (shared central tensor, per-expert auxiliary tensors);
* the same MoE rows in eval (forward only, no grad), where MPOE serves cached weights;
* transformers' own blocks at the same shapes, as baselines (issue 14), next to the mpolab layer
  that does the same work: ``SwitchTransformersSparseMLP`` (top-1, ReLU, no biases, capacity
  set to the token count so nothing is dropped) against ``MoE(TopKGate(k=1),
  DenseExperts(bias=False))``, and Mixtral's ``MixtralSparseMoeBlock`` (top-2 renormalised,
  SwiGLU experts, ``experts_implementation="grouped_mm"``) against ``MoE(TopKGate(k=2),
  DenseExperts(activation="silu", gated=True, bias=False))``. Their inputs are ``[1, T, d]``.

Targets (issue 4): top-1 dense MoE at least 0.7x the dense FFN's throughput; MPOE at least 0.8x
Switch-dense's throughput with at most a quarter of its parameters; both well ahead of the loop.
Timing: ``torch.set_num_threads``; compared calls are interleaved (see ``_common.time_interleaved``).

**Training at Switch speed** (issue 15, the second table; ``--accum-only`` runs only it): time per
``--tokens`` micro-batch (forward + backward) over one optimiser step of ``--grad-accum`` micro-batches,
the optimiser's own step excluded. MPOE and ``MPOLinear`` run under ``mpolab.materialize`` (each
weight built once per step, the accumulated gradient carried to the cores once, the flush included
in the time); "no accumulation" rows are the plain path (a rebuild per micro-batch). Targets: MPOE
vs Switch at least 0.9x with accumulation (exact ranks and ``--max-rank``), at least 0.6x (exact) and
0.85x (rank 64) without; ``MPOLinear`` at exact ranks at most 1.2x ``nn.Linear``'s time with
accumulation. The third table splits one MPOE micro-batch into parts (route, rebuild, expert GEMMs,
the rest: dispatch and combine) with their GFLOP/s, and compares the rebuild's rate with ``torch.mm``
of the same FLOPs (target: at least 60%).

``--keep-freed-memory`` runs after :func:`mpolab.allocator.keep_freed_memory` (glibc reuses freed
blocks instead of faulting fresh pages in for each new tensor; CPU only); the header says which.

Run: ``python benchmarks/bench_moe.py [--quick] [--threads N] [--device cuda] [--grad-accum 8]
[--accum-only] [--keep-freed-memory]`` from the repository root.
"""

from __future__ import annotations

import argparse
import sys
import time
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
    setup_threads,
    time_interleaved,
    write_json,
)

import mpolab  # noqa: E402
from mpolab import MPOLinear, TruncationOptions  # noqa: E402
from mpolab.allocator import keep_freed_memory  # noqa: E402
from mpolab_moe import DenseExperts, FFNWeights, MoE, TopKGate, aux_loss  # noqa: E402
from mpolab_moe.experts.base import grouped_ffn  # noqa: E402

D_MODEL, D_FF, NUM_EXPERTS = 768, 3072, 8


class NaiveLoopMoE(nn.Module):
    """Top-1 MoE the straightforward way: a Python loop over experts with boolean masks."""

    def __init__(self, gate: TopKGate, bank: DenseExperts) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList()
        for e in range(bank.num_experts):
            up, down = nn.Linear(bank.in_features, bank.d_ff), nn.Linear(bank.d_ff, bank.out_features)
            with torch.no_grad():
                up.weight.copy_(bank.w1[e].T)
                up.bias.copy_(bank.b1[e])
                down.weight.copy_(bank.w2[e].T)
                down.bias.copy_(bank.b2[e])
            self.experts.append(nn.Sequential(up, nn.ReLU(), down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.gate(x)
        index, weight = routing.expert_index[:, 0], routing.combine_weight[:, 0]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = index == e
            if mask.any():
                out[mask] = expert(x[mask]) * weight[mask, None].to(x.dtype)
        return out


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SequenceInput(nn.Module):
    """A transformers block that takes ``[batch, seq, d]``: run it on ``x [T, d]`` as one sequence."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)


def transformers_baselines(tokens: int) -> dict[str, nn.Module]:
    """transformers' Switch and Mixtral blocks and the mpolab layers that do the same work."""
    from transformers import MixtralConfig, SwitchTransformersConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    switch_cfg = SwitchTransformersConfig(
        d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, expert_capacity=tokens, router_jitter_noise=0.0
    )
    mixtral_cfg = MixtralConfig(
        hidden_size=D_MODEL,
        intermediate_size=D_FF,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        experts_implementation="grouped_mm",
    )
    return {
        "transformers Switch block": SequenceInput(SwitchTransformersSparseMLP(switch_cfg)),
        "mpolab Switch (no bias, as HF)": MoE(
            TopKGate(D_MODEL, NUM_EXPERTS, k=1), DenseExperts(D_MODEL, D_FF, NUM_EXPERTS, bias=False)
        ),
        "transformers Mixtral block": SequenceInput(MixtralSparseMoeBlock(mixtral_cfg)),
        "mpolab Mixtral-style top-2": MoE(
            TopKGate(D_MODEL, NUM_EXPERTS, k=2),
            DenseExperts(D_MODEL, D_FF, NUM_EXPERTS, activation="silu", gated=True, bias=False),
        ),
    }


def train_step(module: nn.Module, x: torch.Tensor, with_aux: bool):
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        loss = module(x).square().mean()
        if with_aux:
            loss = loss + 0.01 * aux_loss(module)
        loss.backward()

    return step


def eval_step(module: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def build(
    tokens: int, max_rank: int | None, device: torch.device, with_transformers: bool = True
) -> tuple[dict[str, nn.Module], dict]:
    torch.manual_seed(0)
    up, down = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)
    dense = nn.Sequential(up, nn.ReLU(), down)
    gate = TopKGate(D_MODEL, NUM_EXPERTS, k=1)
    bank = DenseExperts(D_MODEL, D_FF, NUM_EXPERTS, activation="relu")
    modules: dict[str, nn.Module] = {
        "dense FFN": dense,
        "Switch, dense experts": MoE(gate, bank),
        "naive per-expert loop": NaiveLoopMoE(gate, bank),
    }
    info: dict = {}
    try:
        from mpolab_moe.experts.mpo import MPOExperts
    except ImportError:
        info["mpoe"] = "mpolab_moe.experts.mpo not available"
    else:
        for label, rank in (("MPOE, exact ranks", None), (f"MPOE, max_rank {max_rank}", max_rank)):
            experts = MPOExperts.from_ffn(
                FFNWeights(
                    up.weight.detach(),
                    down.weight.detach(),
                    b1=up.bias.detach(),
                    b2=down.bias.detach(),
                    activation="relu",
                ),
                NUM_EXPERTS,
                options=TruncationOptions(max_rank=rank),
            )
            modules[label] = MoE(TopKGate(D_MODEL, NUM_EXPERTS, k=1, weighting="one"), experts)
    if with_transformers:
        try:
            modules.update(transformers_baselines(tokens))
        except ImportError as err:
            info["transformers"] = f"transformers baselines skipped: {err}"
    return {k: m.to(device) for k, m in modules.items()}, info


# ------------------------------------------------------------------ issue 15: training at Switch speed
def accumulated_step(module: nn.Module, xs: list[torch.Tensor], with_aux: bool, materialized: bool):
    """One optimiser step's worth of micro-batches (forward + backward each), the flush included; no optimiser step."""
    weights = mpolab.materialize(module) if materialized else None

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        for x in xs:
            loss = module(x).square().mean()
            if with_aux:
                loss = loss + 0.01 * aux_loss(module)
            loss.backward()
        if weights is not None:
            weights.flush()

    return step


def mpoe_layer(up: nn.Linear, down: nn.Linear, rank: int | None) -> MoE:
    from mpolab_moe.experts.mpo import MPOExperts

    ffn = FFNWeights(up.weight.detach(), down.weight.detach(), b1=up.bias.detach(), b2=down.bias.detach())
    bank = MPOExperts.from_ffn(ffn, NUM_EXPERTS, options=TruncationOptions(max_rank=rank))
    return MoE(TopKGate(D_MODEL, NUM_EXPERTS, k=1, weighting="one"), bank)


def accumulation_rows(tokens: int, accum: int, max_rank: int, device: torch.device, timed) -> tuple[list, list]:
    """Time per micro-batch of Switch, MPOE and MPOLinear with and without accumulated micro-batches."""
    torch.manual_seed(0)
    up, down = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)
    switch = MoE(TopKGate(D_MODEL, NUM_EXPERTS, k=1), DenseExperts.from_ffn(FFNWeights(up.weight, down.weight,
                 b1=up.bias, b2=down.bias), NUM_EXPERTS))  # fmt: skip
    linear = nn.Linear(D_MODEL, D_FF)
    rows: list[tuple[str, nn.Module, bool, int, bool]] = [("Switch, dense experts", switch, True, accum, False)]
    for label, rank in (("exact ranks", None), (f"max_rank {max_rank}", max_rank)):
        rows.append((f"MPOE, {label}, {accum} accumulated", mpoe_layer(up, down, rank), True, accum, True))
        rows.append((f"MPOE, {label}, no accumulation", mpoe_layer(up, down, rank), True, 1, False))
    rows.append((f"nn.Linear {D_MODEL}->{D_FF}", linear, False, accum, False))
    mpo_linear = MPOLinear.from_linear(linear, options=TruncationOptions(num_cores=5))
    rows.append((f"MPOLinear, exact ranks, {accum} accumulated", mpo_linear, False, accum, True))
    mpo_linear_plain = MPOLinear.from_linear(linear, options=TruncationOptions(num_cores=5))
    rows.append(("MPOLinear, exact ranks, no accumulation", mpo_linear_plain, False, 1, False))
    xs = [torch.randn(tokens, D_MODEL, device=device) for _ in range(accum)]
    fns = [
        accumulated_step(m.to(device), xs[:n], aux, mat) for _, m, aux, n, mat in rows
    ]  # fmt: skip
    times = timed(fns)
    per_batch = {label: t.median / n for (label, _, _, n, _), t in zip(rows, times)}
    switch_t, linear_t = per_batch["Switch, dense experts"], per_batch[f"nn.Linear {D_MODEL}->{D_FF}"]
    table, records = [], []
    gemm_flops = 3 * 2 * tokens * D_MODEL * D_FF * 2  # the expert GEMMs of one micro-batch, forward + backward
    for label, module, _, n, _ in rows:
        t = per_batch[label]
        ref = linear_t if "Linear" in label else switch_t
        ceiling = None
        if isinstance(module, MoE) and hasattr(module.experts, "matrices"):  # MPOE: the rebuild, once per n
            rebuild_flops = 3 * sum(m.rebuild_flops() for m in module.experts.matrices().values())
            ceiling = gemm_flops / (gemm_flops + rebuild_flops / n)
        cells = [label, f"{num_params(module):,}", n, fmt_seconds(t), f"{ref / t:.2f}x", f"{t / ref:.2f}x"]
        table.append([*cells, "-" if ceiling is None else f"{ceiling:.2f}x"])
        records.append({"row": label, "micro_batches": n, "s_per_micro_batch": t, "flop_ceiling": ceiling})
    return table, records


def mpoe_parts(layer: MoE, x: torch.Tensor, timed) -> tuple[list[tuple[str, float, int | None]], float, int]:
    """``(part, seconds, FLOPs)`` of one MPOE micro-batch (forward + backward each), ``torch.mm``'s rate, its size."""
    bank = layer.experts
    tokens = x.shape[0]
    counts = [tokens // NUM_EXPERTS] * NUM_EXPERTS
    counts[-1] += tokens - sum(counts)
    xs = x.detach().requires_grad_()
    weights = {n: m.rebuild_grouped().detach().requires_grad_() for n, m in bank.matrices().items()}

    def route() -> None:
        layer.gate(x).combine_weight.sum().backward()

    def rebuild() -> None:
        for m in bank.matrices().values():
            w = m.rebuild_grouped()
            w.backward(torch.ones_like(w))

    def gemms() -> None:
        grouped_ffn(xs, counts, weights["w1"], weights["w2"], bank.act, b1=bank.b1, b2=bank.b2).sum().backward()

    def whole() -> None:
        layer(x).square().mean().backward()

    rebuild_flops = 3 * sum(m.rebuild_flops() for m in bank.matrices().values())
    n = max(64, round((rebuild_flops / 3 / 2) ** (1 / 3)))  # one square mm with the rebuild's forward FLOPs
    a, b = torch.randn(n, n, device=x.device), torch.randn(n, n, device=x.device)
    t_route, t_rebuild, t_gemms, t_whole, t_mm = timed([route, rebuild, gemms, whole, lambda: a @ b])
    rest = max(t_whole.median - t_route.median - t_rebuild.median - t_gemms.median, 0.0)
    parts = [
        ("route (gate)", t_route.median, 3 * 2 * tokens * D_MODEL * NUM_EXPERTS),
        ("rebuild (all E weights)", t_rebuild.median, rebuild_flops),
        ("expert GEMMs", t_gemms.median, 3 * 2 * tokens * (D_MODEL * D_FF * 2)),
        ("dispatch + combine (rest)", rest, None),
        ("whole micro-batch", t_whole.median, None),
    ]
    return parts, 2 * n**3 / t_mm.median, n


def part_rows(tokens: int, max_rank: int, device: torch.device, timed) -> tuple[list, list]:
    """One MPOE micro-batch by parts, with GFLOP/s, and the rebuild's rate against ``torch.mm`` of the same FLOPs."""
    torch.manual_seed(0)
    up, down = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)
    x = torch.randn(tokens, D_MODEL, device=device)
    table, records = [], []
    for label, rank in (("exact ranks", None), (f"max_rank {max_rank}", max_rank)):
        parts, mm_rate, n = mpoe_parts(mpoe_layer(up, down, rank).to(device), x, timed)
        for part, t, flops in parts:
            rate = f"{flops / t / 1e9:.1f}" if flops and t > 0 else "-"
            table.append([f"MPOE, {label}", part, fmt_seconds(t), f"{flops / 1e9:.1f}" if flops else "-", rate])
            records.append({"ranks": label, "part": part, "s": t, "flops": flops})
        table.append([f"MPOE, {label}", f"torch.mm {n}x{n} (the rebuild's forward FLOPs)", "-", "-",
                      f"{mm_rate / 1e9:.1f}"])  # fmt: skip
        rebuild_rate = parts[1][2] / parts[1][1]  # type: ignore[operator]
        print(f"MPOE, {label}: rebuild at {rebuild_rate / mm_rate:.0%} of torch.mm's GFLOP/s (target >= 60%)")
        records.append({"ranks": label, "rebuild_vs_mm": rebuild_rate / mm_rate, "mm_flops_per_s": mm_rate})
    return table, records


def accumulation_section(args: argparse.Namespace, tokens: int, device: torch.device, timed) -> dict:
    accum = args.grad_accum
    print(f"\ntraining at Switch speed: fwd+bwd per {tokens}-token micro-batch, {accum} micro-batches per step")
    table, records = accumulation_rows(tokens, accum, args.max_rank, device, timed)
    headers = ["row", "params", "micro-batches", "per micro-batch", "speed vs ref", "time vs ref", "at equal GFLOP/s"]
    print(format_table(headers, table))
    print("(ref: Switch for the MoE rows, nn.Linear for the linear rows; the last column is the speed vs Switch")
    print(" that the FLOP counts allow if the rebuild ran at the expert GEMMs' rate)")
    by = {r["row"]: r["s_per_micro_batch"] for r in records}
    switch = by["Switch, dense experts"]
    for label, target in (
        (f"MPOE, exact ranks, {accum} accumulated", 0.9),
        (f"MPOE, max_rank {args.max_rank}, {accum} accumulated", 0.9),
        ("MPOE, exact ranks, no accumulation", 0.6),
        (f"MPOE, max_rank {args.max_rank}, no accumulation", 0.85),
    ):
        print(f"{label}: {switch / by[label]:.2f}x Switch's speed (target >= {target})")
    ratio = by[f"MPOLinear, exact ranks, {accum} accumulated"] / by[f"nn.Linear {D_MODEL}->{D_FF}"]
    print(f"MPOLinear, exact ranks, {accum} accumulated: {ratio:.2f}x nn.Linear's time (target <= 1.2)")
    parts, part_records = part_rows(tokens, args.max_rank, device, timed)
    print(format_table(["layer", "part (fwd+bwd)", "time", "GFLOP", "GFLOP/s"], parts))
    return {"grad_accum": accum, "rows": records, "parts": part_records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens (unless --tokens), fewer repeats")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (4096; quick: 1024)")
    parser.add_argument("--max-rank", type=int, default=64, help="bond cap of the truncated MPOE row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only-transformers", action="store_true", help="only the transformers baseline rows")
    parser.add_argument("--no-transformers", action="store_true", help="without transformers' blocks")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (8; quick: 2)")
    parser.add_argument("--accum-only", action="store_true", help="only the training-at-Switch-speed tables")
    parser.add_argument("--no-accum", action="store_true", help="without the training-at-Switch-speed tables")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="mpolab.allocator.keep_freed_memory() first (CPU, glibc)"
    )
    args = parser.parse_args()
    allocator = "default glibc malloc"
    if args.keep_freed_memory:
        allocator = "glibc keeping freed memory" if keep_freed_memory() else "keep_freed_memory: not glibc, no change"
    if args.grad_accum is None:
        args.grad_accum = 2 if args.quick else 8
    if args.grad_accum < 1:
        parser.error(f"--grad-accum must be a positive number of micro-batches, got {args.grad_accum}")
    threads = setup_threads(args.threads)
    device = torch.device(args.device)
    tokens = args.tokens or (1024 if args.quick else 4096)
    env = environment(threads)
    print(
        f"bench_moe: T5-base FFN shapes (d {D_MODEL}, F {D_FF}), E = {NUM_EXPERTS}, top-1, {tokens} tokens, {device}; "
        f"{allocator}"
    )
    print(describe_environment(env))
    monitor = CpuMonitor()
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fns):
        wrapped = [lambda f=f: (f(), sync()) for f in fns]
        return time_interleaved(wrapped, warmup=2, repeats=3 if args.quick else 7, budget_s=4.0 if args.quick else 20.0)

    accum = None if args.no_accum else accumulation_section(args, tokens, device, timed)
    if args.accum_only:
        print(busy_note(monitor.foreign_cores(), threads))
        print(end_of_run(time.perf_counter() - started))
        payload = {"environment": env, "allocator": allocator, "tokens": tokens, "accumulation": accum}
        print(f"results: {write_json('bench_moe', payload)}")
        return
    modules, info = build(tokens, args.max_rank, device, with_transformers=not args.no_transformers)
    if args.only_transformers:
        keep = {"dense FFN", "Switch, dense experts", *(n for n in modules if "transformers" in n or "as HF" in n)}
        keep |= {n for n in modules if n.startswith("mpolab Mixtral")}
        modules = {n: m for n, m in modules.items() if n in keep}
    x = torch.randn(tokens, D_MODEL, device=device)
    names = list(modules)
    train = timed([train_step(modules[n], x, with_aux=isinstance(modules[n], MoE)) for n in names])
    infer = timed([eval_step(modules[n].eval(), x) for n in names])
    for m in modules.values():
        m.train()
    base_train, base_eval = train[0].median, infer[0].median
    switch_train = train[1].median
    switch_params = num_params(modules["Switch, dense experts"])
    rows, records = [], []
    for n, t, e in zip(names, train, infer):
        params = num_params(modules[n])
        rows.append(
            [
                n,
                f"{params:,}",
                f"{params / switch_params:.3f}",
                fmt_seconds(t.median),
                f"{base_train / t.median:.2f}x",
                f"{switch_train / t.median:.2f}x",
                fmt_seconds(e.median),
                f"{base_eval / e.median:.2f}x",
            ]
        )
        records.append({"module": n, "params": params, "train_s": t.median, "eval_s": e.median})
    print(
        format_table(
            [
                "module",
                "params",
                "params / Switch",
                "train step",
                "throughput vs dense FFN",
                "vs Switch",
                "eval fwd",
                "eval vs dense FFN",
            ],
            rows,
        )
    )
    if info:
        print(info)
    by = {r["module"]: r for r in records}
    print(f"\nSwitch top-1 training throughput: {base_train / switch_train:.2f}x the dense FFN (target >= 0.7)")
    for n in names:
        if n.startswith("MPOE"):
            ratio = switch_train / by[n]["train_s"]
            share = by[n]["params"] / switch_params
            print(f"{n}: {ratio:.2f}x Switch's training throughput (target >= 0.8) with {share:.2f} of its parameters")
    if "naive per-expert loop" in by:
        loop = by["naive per-expert loop"]["train_s"]
        print(f"naive loop: Switch is {loop / switch_train:.2f}x faster in training")
    for ours, theirs in (
        ("mpolab Switch (no bias, as HF)", "transformers Switch block"),
        ("mpolab Mixtral-style top-2", "transformers Mixtral block"),
    ):
        if ours in by and theirs in by:
            print(
                f"{ours}: {by[ours]['train_s'] / by[theirs]['train_s']:.2f}x the time of {theirs} in training, "
                f"{by[ours]['eval_s'] / by[theirs]['eval_s']:.2f}x in eval (target <= 1.0)"
            )
    print(busy_note(monitor.foreign_cores(), threads))
    print(end_of_run(time.perf_counter() - started))
    payload = {"environment": env, "allocator": allocator, "tokens": tokens, "rows": records, "accumulation": accum}
    print(f"results: {write_json('bench_moe', payload)}")


if __name__ == "__main__":
    main()
