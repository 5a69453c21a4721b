"""Tiny random Hugging Face models of the four families the library targets."""

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging

logging.set_verbosity_error()

VOCAB = 128


def tiny_t5() -> nn.Module:
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "t5": tiny_t5,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "llama": tiny_llama,
}


def inputs_for(name: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def main_output(model: nn.Module, out) -> torch.Tensor:  # noqa: ANN001
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def output_for(model: nn.Module, family: str) -> torch.Tensor:
    """The main output tensor of ``model`` (a ``family`` model) on :func:`inputs_for`, without gradients."""
    with torch.no_grad():
        return main_output(model, model(**inputs_for(family)))
