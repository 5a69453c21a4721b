"""Train a moefied GPT-2 with its experts spread over processes (expert parallelism) and DDP for the rest.

Each process builds the same tiny GPT-2 (same seed), turns the MLPs of its last two blocks into
MoE layers (8 MPO experts by default, upcycled from the MLP), keeps only its share of the experts
(``shard_experts``), hands the rest of the model to ``DistributedDataParallel`` (expert tensors
excluded) and trains on its own batches of the word-arithmetic task of the MPOE examples, with
the load-balancing loss (over the global batch) and MPOE's gradient mask (the same draw on every
rank). Rank 0 prints the mean loss over the ranks and the routing balance of the global batch.

    torchrun --nproc-per-node 2 examples/train_moe_distributed.py             # CPU, gloo
    torchrun --nproc-per-node 8 examples/train_moe_distributed.py --experts 64  # GPUs, NCCL, unchanged
    torchrun --nproc-per-node 2 examples/train_moe_distributed.py --steps 5    # a quick check

The backend is NCCL when CUDA is available and gloo otherwise (``--backend`` overrides). A rank
that dies makes the others fail after ``--timeout`` seconds with an error naming the collective.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mpoe_common import WordTokenizer, arithmetic_pairs, routing_summary  # noqa: E402
from finetune_gpt2_mpoe import build_model, encode  # noqa: E402

from mpolab_moe import aux_loss, moefy, shard_experts  # noqa: E402
from mpolab_moe.parallel import (  # noqa: E402
    clip_grad_norm_,
    default_expert_group,
    distributed_gradient_mask,
    ignore_expert_tensors_in_ddp,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (divisible by the ranks)")
    parser.add_argument("--kind", choices=("mpo", "dense"), default="mpo", help="MPO experts (MPOE) or dense (Switch)")
    parser.add_argument("--k", type=int, default=1, help="experts per token")
    parser.add_argument("--capacity-factor", type=float, default=None, help="GShard capacity (default: dropless)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-weight", type=float, default=0.01)
    parser.add_argument("--p-b", type=float, default=0.5, help="gradient-mask probability (MPO experts)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping over the whole model (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a collective waits for the others")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """Start the process group unless the caller did; returns the device and whether we started it."""
    started = False
    if not dist.is_initialized():
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
        started = True
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return device, started


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    device, started = setup(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the same model on every rank
    tok = WordTokenizer()
    model = build_model(None, len(tok))
    report = moefy(
        model,
        layers=[0, 1],
        num_experts=args.experts,
        experts=args.kind,
        gate=f"top{args.k}",
        capacity_factor=args.capacity_factor,
    )
    say(report)
    # the experts' exchange on a group of its own (with the default group's timeout), apart from DDP's all-reduces
    expert_group = default_expert_group()
    owned = shard_experts(model, expert_group)
    say(f"{world} ranks; rank 0 owns experts {sorted(set(owned.values()))[0]} of {args.experts} in each MoE layer")
    model.to(device)
    ignore_expert_tensors_in_ddp(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mask = (
        distributed_gradient_mask(model, p_b=args.p_b, seed=args.seed, group=expert_group)
        if args.kind == "mpo"
        else None
    )
    if mask is not None:
        mask.attach(optimizer)
    pairs = arithmetic_pairs(4000, seed=args.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        first = ((step * world + rank) * args.batch_size) % (len(pairs) - args.batch_size)  # each rank its own rows
        batch = {k: v.to(device) for k, v in encode(pairs[first : first + args.batch_size], tok).items()}
        task = ddp(**batch).loss
        loss = task + args.aux_weight * aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the replicated gradients; the expert tensors' come through the all-to-all
        if args.clip:
            clip_grad_norm_(model, args.clip)  # the whole model's norm: every rank scales by the same factor
        optimizer.step()
        mean = task.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if step % args.log_every == 0 or step in (1, args.steps):
            masked = f"  masked steps {mask.num_masked}/{mask.num_steps}" if mask is not None else ""
            say(f"step {step:4d}  task loss {losses[-1]:.3f}{masked}  {routing_summary(model)} (global batch)")
    window = max(1, min(10, len(losses) // 2))
    result = {
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
        "seconds": time.perf_counter() - start,
    }
    say(f"task loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} in {result['seconds']:.0f} s")
    if started:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
