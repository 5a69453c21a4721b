"""Fine-tune a GPT-2 whose last MLPs became MPOE mixtures of experts, on word arithmetic.

Build a GPT-2 (a tiny random config by default, or any local checkpoint with ``--model PATH``),
turn the MLPs (``Conv1D`` weights) of its last two blocks into MPOE layers (8 experts sharing each
matrix's central tensor, top-1 routing, upcycled from the MLP), and train the answer tokens with
the load-balancing loss added and MPOE's gradient mask on the optimizer. Prints the loss, the
routing balance, training tokens/s of Switch and MPOE side by side and the held-out
accuracy of greedy answers.

    python examples/finetune_gpt2_mpoe.py
    python examples/finetune_gpt2_mpoe.py --trainer          # inside a Hugging Face Trainer
    python examples/finetune_gpt2_mpoe.py --grad-accum 8 # 8 micro-batches per step, MPO weights built once per step
    python examples/finetune_gpt2_mpoe.py --model ./gpt2     # a local checkpoint (no download)
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mpoe_common import (  # noqa: E402
    HFTokenizer,
    WordTokenizer,
    make_parser,
    pad,
    run_example,
)

from mpolab_moe import find_ffns  # noqa: E402


def build_model(path: str | None, vocab_size: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if path:
        return GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def encode(pairs: list[tuple[str, str]], tok) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Question then answer in one sequence; only the answer (and its end token) is trained."""
    prompts = [tok.encode(q, eos=False) for q, _ in pairs]
    answers = [tok.encode(a) for _, a in pairs]
    ids = pad([p + a for p, a in zip(prompts, answers)], tok.pad_token_id)
    labels = pad([[-100] * len(p) + a for p, a in zip(prompts, answers)], -100)
    mask = pad([[1] * (len(p) + len(a)) for p, a in zip(prompts, answers)], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def accuracy(model: torch.nn.Module, pairs: list[tuple[str, str]], tok) -> float:  # noqa: ANN001
    """Greedy answers, prompts grouped by length (no padding needed)."""
    model.eval()
    groups: dict[int, list[tuple[list[int], str]]] = defaultdict(list)
    for q, a in pairs:
        prompt = tok.encode(q, eos=False)
        groups[len(prompt)].append((prompt, a))
    correct = 0
    for items in groups.values():
        ids = torch.tensor([p for p, _ in items])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        correct += sum(tok.decode(o[ids.shape[1] :].tolist()) == a for o, (_, a) in zip(out, items))
    model.train()
    return correct / len(pairs)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = make_parser(__doc__.split("\n\n")[0], "GPT-2").parse_args(argv)

    torch.manual_seed(args.seed)
    tok = HFTokenizer(args.model) if args.model else WordTokenizer()
    model = build_model(args.model, len(tok))
    n = len(find_ffns(model))
    return run_example(args, model, tok, [n - 2, n - 1], encode, accuracy)  # the last two MLPs


if __name__ == "__main__":
    main()
