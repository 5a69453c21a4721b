"""Shared parts of the MPOE fine-tuning examples: a small word-arithmetic text task and the training loops.

The task is generated here, so the examples run anywhere: sentences such as
``"what is three plus four"`` with the answer ``"seven"``. A word-level tokenizer covers the
tiny random models; a local checkpoint brings its own tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import mpolab
import mpolab.allocator
from mpolab_moe import GradientMask, aux_loss, moe_layers, moefy

NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen"
).split()
SPECIALS = ["<pad>", "</s>", "<unk>"]
WORDS = [*SPECIALS, "what", "is", "plus", "minus", *NUMBERS]


def arithmetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs: sums and differences of numbers up to nine, answers up to eighteen."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            pairs.append((f"what is {NUMBERS[a]} plus {NUMBERS[b]}", NUMBERS[a + b]))
        else:
            a, b = max(a, b), min(a, b)
            pairs.append((f"what is {NUMBERS[a]} minus {NUMBERS[b]}", NUMBERS[a - b]))
    return pairs


class WordTokenizer:
    """Whitespace tokenizer over the task's words (id 0 pads, id 1 ends a sequence)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(WORDS)}
        self.words = list(WORDS)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, eos: bool = True) -> list[int]:
        ids = [self.ids.get(w, 2) for w in text.split()]
        return ids + [self.eos_token_id] if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids if i > 2)


class HFTokenizer:
    """The same two calls on a Hugging Face tokenizer loaded from a local checkpoint."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.pad_token_id, self.eos_token_id = self.tok.pad_token_id, self.tok.eos_token_id

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str, eos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ids + [self.eos_token_id] if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad_token_id, self.eos_token_id)]).strip()


def make_parser(description: str, family: str) -> argparse.ArgumentParser:
    """The options both MPOE examples take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help=f"local {family} checkpoint folder (default: a tiny random {family})")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=None, help="truncate the MPO experts (default: exact)")
    parser.add_argument("--p-b", type=float, default=0.5, help="gradient-mask probability (MPOE)")
    parser.add_argument("--aux-weight", type=float, default=0.01, help="weight of the load-balancing loss")
    parser.add_argument("--trainer", action="store_true", help="train inside a Hugging Face Trainer")
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimiser step (MPOE weights built once per step)"
    )
    parser.add_argument(
        "--speed-steps", type=int, default=3, help="optimiser steps of the Switch-vs-MPOE tokens/s comparison (0: skip)"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="CPU: mpolab.allocator.keep_freed_memory() first (no page faults on every step's large buffers)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])


def routing_summary(model: nn.Module) -> str:
    """Mean load imbalance (max/mean tokens per expert; 1.0 is perfect) over the model's MoE layers."""
    stats = [layer.last_stats for layer in moe_layers(model).values() if layer.last_stats is not None]
    if not stats:
        return "no routing yet"
    imbalance = sum(s.load_imbalance for s in stats) / len(stats)
    busiest = max(int(s.tokens_per_expert.max()) for s in stats)
    return f"load imbalance {imbalance:.2f} (busiest expert {busiest} tokens)"


@dataclass
class TrainResult:
    first_loss: float
    last_loss: float
    seconds: float
    masked_steps: int
    steps: int
    tokens: int = 0
    flushed: int = 0  # weight gradients mpolab.materialize carried to the cores

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def check_grad_accum(grad_accum: int) -> int:
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive number of micro-batches, got {grad_accum!r}")
    return grad_accum


def train(
    model: nn.Module,
    batches: Callable[[int], dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    aux_weight: float,
    p_b: float | None,
    seed: int,
    grad_accum: int = 1,
    log_every: int = 50,
    materialize: bool = True,
) -> TrainResult:
    """A plain PyTorch loop: task loss + ``aux_weight * aux_loss(model)``, AdamW, MPOE's gradient mask.

    ``steps`` optimiser steps of ``grad_accum`` micro-batches each (``batches(k)`` gives micro-batch
    ``k = 1, 2, ...``); with ``grad_accum > 1`` the MPO weights are materialised once per step.
    ``p_b=None``: no gradient mask; ``materialize=False``: rebuild the weights in every micro-batch.
    """
    grad_accum = check_grad_accum(grad_accum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    mask = GradientMask(model, p_b=p_b, seed=seed).attach(optimizer) if p_b is not None else None
    weights = None
    if materialize and grad_accum > 1 and has_mpo(model):
        weights = mpolab.materialize(model).attach(optimizer)  # the one line: MPO weights built once per step
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        task_sum = 0.0
        for k in range(grad_accum):
            batch = batches((step - 1) * grad_accum + k + 1)
            tokens += int(batch["input_ids"].numel())
            task = model(**batch).loss
            ((task + aux_weight * aux_loss(model)) / grad_accum).backward()
            task_sum += task.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(task_sum / grad_accum)
        if log_every and (step % log_every == 0 or step in (1, steps)):
            window = losses[-log_every:]
            masked = f"masked steps {mask.num_masked}/{mask.num_steps}  " if mask is not None else ""
            print(f"step {step:4d}  task loss {sum(window) / len(window):.3f}  {masked}{routing_summary(model)}")
    seconds = time.perf_counter() - start
    first = sum(losses[:10]) / min(10, len(losses))
    last = sum(losses[-10:]) / min(10, len(losses))
    flushed = weights.num_flushed if weights is not None else 0
    if weights is not None:
        weights.detach()
    if mask is not None:
        mask.detach()
    num_masked, num_steps = (mask.num_masked, mask.num_steps) if mask is not None else (0, steps)
    return TrainResult(first, last, seconds, num_masked, num_steps, tokens, flushed)


def has_mpo(model: nn.Module) -> bool:
    """Whether ``model`` has layers :func:`mpolab.materialize` applies to."""
    return any(isinstance(m, mpolab.step_weight.Materializable) for m in model.modules())


def compare_speed(
    switch: nn.Module,
    mpoe: nn.Module,
    batches: Callable[[int], dict[str, torch.Tensor]],
    *,
    steps: int,
    grad_accum: int,
    aux_weight: float,
) -> dict[str, float]:
    """Training tokens/s of a Switch model and an MPOE model on the same micro-batches, side by side.

    One warm-up step each, then ``steps`` optimiser steps of ``grad_accum`` micro-batches (MPOE
    under :func:`mpolab.materialize` when ``grad_accum > 1``; no gradient mask, so both do the same
    work every step).
    """
    speeds = {}
    for name, model in (("Switch", switch), ("MPOE", mpoe)):
        options = {"lr": 1e-4, "aux_weight": aux_weight, "p_b": None, "seed": 0, "grad_accum": grad_accum}
        train(model, batches, steps=1, log_every=0, **options)
        speeds[name] = train(model, batches, steps=steps, log_every=0, **options).tokens_per_s
    print(
        f"training tokens/s ({grad_accum} micro-batch(es) per step): Switch {speeds['Switch']:.0f}, "
        f"MPOE {speeds['MPOE']:.0f} ({speeds['MPOE'] / speeds['Switch']:.2f}x Switch)"
    )
    return speeds


def train_with_hf_trainer(
    model: nn.Module,
    examples: list[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    aux_weight: float,
    p_b: float,
    seed: int,
    batch_size: int,
    output_dir: str,
    grad_accum: int = 1,
) -> TrainResult:
    """The same training inside a Hugging Face ``Trainer``: the aux loss is added in ``compute_loss``.

    The optimizer is built here and handed to the Trainer, so the gradient mask can attach to it.
    With ``grad_accum > 1`` (the Trainer's ``gradient_accumulation_steps``) the MPO weights are
    materialised once per step and flushed at the end of each step's last backward, before the
    Trainer clips the gradients.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator

    class MoETrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001, ANN003
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss = loss + aux_weight * aux_loss(model)  # reaches the loss the Trainer back-propagates
            return (loss, outputs) if return_outputs else loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    mask = GradientMask(model, p_b=p_b, seed=seed).attach(optimizer)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        disable_tqdm=True,
        gradient_accumulation_steps=check_grad_accum(grad_accum),
    )
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=default_data_collator,
        optimizers=(optimizer, None),
    )
    weights = None
    if grad_accum > 1:  # the Trainer clips before it steps: flush at the end of each step's last backward
        weights = mpolab.materialize(model, flush_after=lambda: trainer.accelerator.sync_gradients).attach(optimizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"Trainer: logged losses {[round(v, 3) for v in history]}; masked steps {mask.num_masked}/{mask.num_steps}")
    print(routing_summary(model))
    flushed = 0
    if weights is not None:
        flushed = weights.num_flushed
        weights.detach()
    tokens = steps * grad_accum * batch_size * int(examples[0]["input_ids"].numel())
    return TrainResult(history[0], history[-1], seconds, mask.num_masked, mask.num_steps, tokens, flushed)


Encode = Callable[[list[tuple[str, str]], object], dict[str, torch.Tensor]]
Evaluate = Callable[[nn.Module, list[tuple[str, str]], object], float]


def run_example(
    args: argparse.Namespace, model: nn.Module, tok: object, layers: list[int], encode: Encode, evaluate: Evaluate
) -> dict[str, float]:
    """Both examples' flow: MPOE-upcycle ``layers``, train (plain loop or Trainer), report before/after,
    then training tokens/s of a Switch copy (dense experts) and the MPOE model side by side."""
    if args.keep_freed_memory:
        applied = mpolab.allocator.keep_freed_memory()
        print("glibc keeps freed memory for reuse" if applied else "keep_freed_memory: not glibc, nothing changed")
    switch = copy.deepcopy(model) if args.speed_steps > 0 else None
    report = moefy(
        model, layers=layers, num_experts=args.num_experts, experts="mpo", gate="top1", max_rank=args.max_rank
    )
    print(report)
    train_pairs, test_pairs = arithmetic_pairs(4000, seed=args.seed), arithmetic_pairs(200, seed=args.seed + 1)
    accuracy_before = evaluate(model, test_pairs, tok)
    print(f"before training: held-out accuracy {accuracy_before:.2f}")
    options = {"steps": args.steps, "lr": args.lr, "aux_weight": args.aux_weight, "p_b": args.p_b, "seed": args.seed}
    options["grad_accum"] = args.grad_accum

    def batches(k: int) -> dict[str, torch.Tensor]:
        start = (k * args.batch_size) % (len(train_pairs) - args.batch_size)
        return encode(train_pairs[start : start + args.batch_size], tok)

    if args.trainer:
        batch = encode(train_pairs, tok)  # one padded width for all, so the default collator can stack
        examples = [{k: v[i] for k, v in batch.items()} for i in range(len(train_pairs))]
        with tempfile.TemporaryDirectory() as out:
            result = train_with_hf_trainer(model, examples, batch_size=args.batch_size, output_dir=out, **options)
    else:
        result = train(model, batches, **options)
    accuracy = evaluate(model, test_pairs, tok)
    print(
        f"task loss {result.first_loss:.3f} -> {result.last_loss:.3f} in {result.seconds:.0f} s "
        f"({result.masked_steps}/{result.steps} steps masked, {result.tokens_per_s:.0f} tokens/s, "
        f"{args.grad_accum} micro-batch(es) per step); held-out accuracy {accuracy:.2f}"
    )
    summary = {
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "accuracy_before": accuracy_before,
        "accuracy": accuracy,
        "flushed": float(result.flushed),
    }
    if switch is not None:
        moefy(switch, layers=layers, num_experts=args.num_experts, experts="dense", gate="top1")
        speeds = compare_speed(
            switch, model, batches, steps=args.speed_steps, grad_accum=args.grad_accum, aux_weight=args.aux_weight
        )
        summary.update({f"{name.lower()}_tokens_per_s": v for name, v in speeds.items()})
    return summary
