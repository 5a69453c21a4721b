"""MoEfication of the real all-MiniLM-L6-v2: split every FFN into experts, route, measure.

Each of the six BERT FFNs (GELU, 384 -> 1536 -> 384) is split into 16 experts of 96 neurons with
four methods (random, balanced k-means built-in, k-means-constrained, co-activation graph + METIS
from hidden states recorded on real sentences); each split is routed with three MoEfication routers
at k = 4 (ground truth = oracle, similarity to expert centers, MLP trained on the recorded hidden
states). The FFNs are replaced by ``MoE(gate, SlicedExperts)`` layers (BERT: ``intermediate`` ->
identity, ``output.dense`` -> MoE, so dropout, residual and LayerNorm stay) and the table reports,
on held-out sentences: the mean cosine between the MoE model's and the dense model's sentence
embeddings (mean-pooled, as sentence-transformers does), the share of the FFN activation mass the
chosen experts hold (averaged over the six layers, on the dense model's FFN inputs), and the time
spent splitting and preparing the routers. No fine-tuning: this is the conversion alone.

Needs the ``moefication`` extra for the k-means-constrained and METIS rows (``pip install
mpolab-torch[moefication]``); without it those rows are skipped with a note.

Run: ``python examples/moefy_minilm.py [--experts 16 --k 4 --train 300 --eval 60]``
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mpolab.demo import load_minilm
from mpolab.heal import sentence_embeddings
from mpolab.text import train_eval_sentences
from mpolab_moe.experts.sliced import SlicedExperts
from mpolab_moe.ffn import FFN, find_ffns
from mpolab_moe.gates.moefication import (
    GroundTruthGate,
    MLPGate,
    SimilarityGate,
    activation_mass_captured,
    train_mlp_gate,
)
from mpolab_moe.layer import MoE
from mpolab_moe.routing import Routing
from mpolab_moe.split import balanced_kmeans, coactivation_split, random_split

Split = Callable[[FFN, Tensor, int], Tensor]


@torch.no_grad()
def record_ffn_inputs(model: nn.Module, tokenizer, texts: list[str], ffns: list[FFN]) -> list[Tensor]:
    """The inputs each FFN sees on ``texts``, padding dropped: one ``[N, d]`` per FFN."""
    seen: list[list[Tensor]] = [[] for _ in ffns]
    mask_now: list[Tensor] = []

    def hook(i: int):
        def fn(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen[i].append(args[0][mask_now[0]].float())

        return fn

    handles = [f.module.intermediate.register_forward_pre_hook(hook(i)) for i, f in enumerate(ffns)]
    try:
        for start in range(0, len(texts), 32):
            batch = tokenizer(
                texts[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            mask_now[:] = [batch["attention_mask"].bool()]
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


class NoExpert(nn.Module):
    """A gate that selects no expert (every slot -1): the FFN contributes only its output bias."""

    def __init__(self, bank: SlicedExperts) -> None:
        super().__init__()
        self.d_model, self.num_experts = bank.in_features, bank.num_experts

    def bind(self, experts: nn.Module) -> None:
        pass

    def forward(self, x: Tensor) -> Routing:
        return Routing(torch.full((x.shape[0], 1), -1), torch.zeros(x.shape[0], 1), self.num_experts)


def split_methods(experts: int, coact_tokens: int) -> dict[str, Split]:
    methods: dict[str, Split] = {
        "random": lambda f, h, E: random_split(f.d_ff, E, seed=0),
        "kmeans-builtin": lambda f, h, E: balanced_kmeans(f.w1, E, method="builtin"),
    }
    if importlib.util.find_spec("k_means_constrained"):
        # n_init=1 keeps the example under 3 minutes (the library default, 10, takes ~6x longer here)
        methods["kmeans-constrained"] = lambda f, h, E: balanced_kmeans(f.w1, E, method="constrained", n_init=1)
    else:
        print("k-means-constrained not installed: pip install mpolab-torch[moefication]; skipping that split")
    if importlib.util.find_spec("pymetis"):
        methods["coact-metis"] = lambda f, h, E: coactivation_split(
            f.w1, f.b1, h[:coact_tokens], E, activation=f.activation
        )
    else:
        print("pymetis not installed: pip install mpolab-torch[moefication]; skipping the co-activation split")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--train", type=int, default=300, help="sentences for recording hidden states")
    parser.add_argument("--eval", type=int, default=60, help="held-out sentences")
    parser.add_argument("--coact-tokens", type=int, default=3000, help="recorded tokens for the co-activation graph")
    parser.add_argument("--epochs", type=int, default=30, help="MLP router epochs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: the router training runs thousands of tiny ops, and on a busy "
        "machine two threads spin-waiting on each other made it 10-50x slower",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    dense, tokenizer = load_minilm()
    for p in dense.parameters():
        p.requires_grad_(False)
    ffns = find_ffns(dense)
    train_texts, eval_texts = train_eval_sentences(args.train, args.eval, seed=0)
    train_h = record_ffn_inputs(dense, tokenizer, train_texts, ffns)
    eval_h = record_ffn_inputs(dense, tokenizer, eval_texts, ffns)
    reference = sentence_embeddings(dense, tokenizer, eval_texts)  # L2-normalised, so dot = cosine
    E, k = args.experts, args.k
    print(
        f"all-MiniLM-L6-v2: {len(ffns)} FFNs {ffns[0].d_model} -> {ffns[0].d_ff} ({ffns[0].activation}), "
        f"E={E} experts of {ffns[0].d_ff // E} neurons, k={k}; recorded {train_h[0].shape[0]} train tokens "
        f"({len(train_texts)} sentences), {eval_h[0].shape[0]} held-out tokens ({len(eval_texts)} sentences)"
    )

    rows = []
    for split_name, split in split_methods(E, args.coact_tokens).items():
        t0 = time.perf_counter()
        banks = [SlicedExperts.from_ffn(f, split(f, h, E)) for f, h in zip(ffns, train_h)]
        split_s = time.perf_counter() - t0
        routers: dict[str, tuple[list[nn.Module], float]] = {}
        t0 = time.perf_counter()
        routers["ground-truth"] = ([GroundTruthGate(b, k) for b in banks], time.perf_counter() - t0)
        t0 = time.perf_counter()
        routers["similarity"] = ([SimilarityGate(b, k) for b in banks], time.perf_counter() - t0)
        t0 = time.perf_counter()
        mlps = []
        for b, h in zip(banks, train_h):
            gate = MLPGate.from_bank(b, k)
            train_mlp_gate(gate, b, h, epochs=args.epochs)
            mlps.append(gate)
        routers["mlp"] = (mlps, time.perf_counter() - t0)
        for router_name, (gates, router_s) in routers.items():
            model = copy.deepcopy(dense)
            for f, gate, bank in zip(find_ffns(model), gates, banks):
                f.install(model, MoE(gate, bank))
            cosine = float((sentence_embeddings(model, tokenizer, eval_texts) * reference).sum(-1).mean())
            mass = sum(activation_mass_captured(b, h, g) for b, h, g in zip(banks, eval_h, gates)) / len(banks)
            rows.append((split_name, router_name, cosine, mass, split_s, router_s))
            print(f"  {split_name:19s} {router_name:13s} cosine {cosine:.4f}  mass {mass:.3f}", flush=True)

    # references: all experts selected gives the dense model back; no expert at all keeps only b2
    banks = [SlicedExperts.from_ffn(f, random_split(f.d_ff, E))
             for f in ffns]  # fmt: skip
    references = {}
    for name, make_gate in (("all", lambda b: GroundTruthGate(b, E)), ("none", NoExpert)):
        model = copy.deepcopy(dense)
        for f, bank in zip(find_ffns(model), banks):
            f.install(model, MoE(make_gate(bank), bank))
        references[name] = float((sentence_embeddings(model, tokenizer, eval_texts) * reference).sum(-1).mean())

    print()
    print(f"| split | router | cosine vs dense (k={k}/{E}) | activation mass | split s | router s |")
    print("|---|---|---|---|---|---|")
    for split_name, router_name, cosine, mass, split_s, router_s in rows:
        print(f"| {split_name} | {router_name} | {cosine:.4f} | {mass:.3f} | {split_s:.1f} | {router_s:.1f} |")
    print(f"\nall {E} experts selected (any split): cosine {references['all']:.6f}")
    print(f"no expert (every FFN reduced to its output bias): cosine {references['none']:.4f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
