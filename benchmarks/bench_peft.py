"""Benchmark the PEFT adapters: MoV and MoLoRA (E = 10) against plain IA3 and LoRA on the same model.

Model: a randomly initialised BERT with all-MiniLM-L6-v2's shapes (hidden 384, 6 layers, 12 heads,
FFN 1536; vocabulary cut to 1,000 since the frozen embedding table plays no part; dropout off),
a batch of ``--batch`` sequences of ``--length`` tokens (8 x 64). Each row is one training step: forward, mean-square
loss on the last hidden state, backward, AdamW step on the trainable parameters.

Rows (default placements of :mod:`mpolab_moe.peft` for BERT):

* ``IA3``: key and value outputs and the FFN activation scaled by one vector each;
* ``MoV E=10``: the same places, 10 vectors merged per token by a soft-merge router that reads
  the scaled tensor (``x ⊙ (p(x) @ L)``: one product per token whatever E is);
* ``LoRA r=4``: query, key, value, attention output and both FFN matrices;
* ``MoLoRA E=10 r=4``: the same places, 10 rank-4 experts per layer computed as one GEMM pair
  over the stacked experts, weighted by a soft-merge router on the layer input;
* ``frozen base``: the model with nothing trainable but the input embeddings' output (the cost
  floor of forward + backward through the frozen network);
* ``MoV`` / ``MoLoRA, per-expert loop``: the same mixtures computed the straightforward way, one
  expert at a time in a Python loop (what the batched forms above avoid).

Targets (issue 6): MoV within 1.3x of IA3's step time, MoLoRA within 2x of LoRA's.
Timing: compared steps are interleaved (see ``_common.time_interleaved``).

Run: ``python benchmarks/bench_peft.py [--quick] [--threads N] [--device cuda]`` from the repository root.
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
    setup_threads,
    time_interleaved,
    write_json,
)
from transformers import BertConfig, BertModel  # noqa: E402
from transformers.utils import logging  # noqa: E402

from mpolab_moe import peft as mpeft  # noqa: E402
from mpolab_moe.experts.ia3 import IA3Experts  # noqa: E402
from mpolab_moe.experts.lora import LoRAExperts  # noqa: E402

logging.set_verbosity_error()

TARGETS = {"MoV E=10": ("IA3", 1.3), "MoLoRA E=10 r=4": ("LoRA r=4", 2.0)}
REFERENCES = {
    **{name: ref for name, (ref, _) in TARGETS.items()},
    "MoV E=10, per-expert loop": "IA3",
    "MoLoRA E=10, per-expert loop": "LoRA r=4",
}


class LoopLoRAExperts(LoRAExperts):
    """MoLoRA the straightforward way: each expert's update computed and weighted in a Python loop."""

    def forward_soft(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = 0
        for e in range(self.num_experts):
            out = out + weight[:, e : e + 1] * (self.scaling * (x @ self.lora_A[e]) @ self.lora_B[e])
        return out


class LoopIA3Experts(IA3Experts):
    """MoV without merging: every expert scales the tensor, then the results are weighted and summed."""

    def forward_soft(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = 0
        for e in range(self.num_experts):
            out = out + weight[:, e : e + 1] * (x * self.vectors[e])
        return out


def minilm_shaped() -> BertModel:
    config = BertConfig(
        vocab_size=1000,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,  # dropout's random draws cost as much as the adapters: keep them out
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False)


def configs() -> dict[str, mpeft.AdapterConfig | None]:
    return {
        "frozen base": None,
        "IA3": mpeft.IA3Config(),
        "MoV E=10": mpeft.MoVConfig(num_experts=10),
        "LoRA r=4": mpeft.LoRAConfig(r=4, alpha=16),
        "MoLoRA E=10 r=4": mpeft.MoLoRAConfig(r=4, alpha=16, num_experts=10),
        "MoV E=10, per-expert loop": mpeft.MoVConfig(num_experts=10),
        "MoLoRA E=10, per-expert loop": mpeft.MoLoRAConfig(r=4, alpha=16, num_experts=10),
    }


def build(name: str, config: mpeft.AdapterConfig | None, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = minilm_shaped()
    if config is None:
        model.requires_grad_(False)
        model.embeddings.LayerNorm.requires_grad_(True)  # something to train, so backward runs through it all
    else:
        model = mpeft.get_model(model, config)
    if name.endswith("per-expert loop"):
        for layer in mpeft.adapter_layers(model).values():
            bank = layer.experts
            bank.__class__ = LoopLoRAExperts if isinstance(bank, LoRAExperts) else LoopIA3Experts
    return model.to(device).train()


def train_step(model: nn.Module, ids: torch.Tensor, sync: Callable[[], None]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids).last_hidden_state.square().mean()
        loss.backward()
        optimizer.step()
        sync()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    device = torch.device(args.device)
    env = environment(threads)
    print(
        f"bench_peft: MiniLM-shaped BERT (384 x 6 layers, FFN 1536), batch {args.batch} x {args.length} tokens, "
        f"train step (fwd + bwd + AdamW), {device}"
    )
    print(describe_environment(env))
    monitor = CpuMonitor()
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.randint(0, 1000, (args.batch, args.length), generator=torch.Generator().manual_seed(0)).to(device)
    models = {name: build(name, cfg, device) for name, cfg in configs().items()}
    names = list(models)
    steps = [train_step(models[n], ids, sync) for n in names]
    timings = time_interleaved(steps, warmup=2, repeats=3 if args.quick else 9, budget_s=6.0 if args.quick else 40.0)
    by = dict(zip(names, timings))
    base = by["frozen base"].median
    rows, records = [], []
    for name, t in by.items():
        counts = mpeft.trainable_parameters(models[name])
        ref = REFERENCES.get(name)
        ratio = t.median / by[ref].median if ref else None
        rows.append(
            [
                name,
                f"{counts['trainable']:,}",
                fmt_seconds(t.median),
                fmt_seconds(t.min),
                f"{t.median / base:.2f}x",
                "" if ratio is None else f"{ratio:.2f}x {ref}",
            ]
        )
        records.append(
            {
                "method": name,
                "trainable": counts["trainable"],
                "total": counts["total"],
                "step_s": t.median,
                "step_min_s": t.min,
                "samples": t.samples,
                "vs_frozen_base": t.median / base,
                "vs_single": ratio,
            }
        )
    print(format_table(["method", "trainable", "step (median)", "step (min)", "vs frozen base", "vs single"], rows))
    verdicts = {}
    for name, (ref, limit) in TARGETS.items():
        ratio = by[name].median / by[ref].median
        verdicts[name] = {"vs": ref, "ratio": ratio, "target": limit, "met": ratio <= limit}
        print(
            f"{name}: {ratio:.2f}x the step time of {ref} (target <= {limit}x): {'met' if ratio <= limit else 'MISSED'}"
        )
    print(busy_note(monitor.foreign_cores(), threads))
    print(end_of_run(time.perf_counter() - started))
    payload = {
        "environment": env,
        "device": str(device),
        "batch": args.batch,
        "length": args.length,
        "rows": records,
        "targets": verdicts,
    }
    print(f"results: {write_json('bench_peft' if device.type == 'cpu' else f'bench_peft_{device.type}', payload)}")


if __name__ == "__main__":
    main()
