"""Fine-tune a T5 whose last FFNs became MPOE mixtures of experts, on word arithmetic.

What a user's script looks like: build a T5 (a tiny random config by default, or any local
checkpoint with ``--model PATH``), turn the FFNs of the last encoder and the last decoder block into
MPOE layers (8 experts sharing each matrix's central tensor, top-1 routing, upcycled from the FFN),
then train with the load-balancing loss added to the task loss and MPOE's gradient mask on the
optimizer. Prints the loss, the routing balance, training tokens/s of Switch and MPOE side by
side and the held-out exact-match accuracy.

    python examples/finetune_t5_mpoe.py                    # tiny random T5, ~300 steps
    python examples/finetune_t5_mpoe.py --trainer          # the same inside a Hugging Face Trainer
    python examples/finetune_t5_mpoe.py --grad-accum 8 # 8 micro-batches per step, MPO weights built once per step
    python examples/finetune_t5_mpoe.py --model ./t5-small # a local checkpoint (no download)
"""

from __future__ import annotations

import sys
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
    from transformers import T5Config, T5ForConditionalGeneration

    if path:
        return T5ForConditionalGeneration.from_pretrained(path, local_files_only=True)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config)


def encode(pairs: list[tuple[str, str]], tok) -> dict[str, torch.Tensor]:  # noqa: ANN001
    inputs = pad([tok.encode(q) for q, _ in pairs], tok.pad_token_id)
    labels = pad([tok.encode(a) for _, a in pairs], -100)
    return {"input_ids": inputs, "attention_mask": (inputs != tok.pad_token_id).long(), "labels": labels}


@torch.no_grad()
def exact_match(model: torch.nn.Module, pairs: list[tuple[str, str]], tok) -> float:  # noqa: ANN001
    model.eval()
    batch = encode(pairs, tok)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4)
    model.train()
    return sum(tok.decode(o.tolist()) == a for o, (_, a) in zip(out, pairs)) / len(pairs)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = make_parser(__doc__.split("\n\n")[0], "T5").parse_args(argv)

    torch.manual_seed(args.seed)
    tok = HFTokenizer(args.model) if args.model else WordTokenizer()
    model = build_model(args.model, len(tok))
    n = len(find_ffns(model))
    layers = [n // 2 - 1, n - 1]  # the last encoder FFN and the last decoder FFN
    return run_example(args, model, tok, layers, encode, exact_match)


if __name__ == "__main__":
    main()
