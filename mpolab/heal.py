"""Healing: a short knowledge-distillation run that brings a compressed model back to its original.

Compression without training hurts (on all-MiniLM-L6-v2, a uniform bond cap keeping 59% of the
linear parameters left sentence embeddings at cosine 0.44 to the original). :func:`heal` trains
the compressed *student* to match the original *teacher* on unlabeled text: every hidden state
(mean squared error, normalised by the teacher's mean square) and the mean-pooled output
embedding (1 − cosine). :func:`fidelity` measures the result the way sentence-transformers uses
such a model: mean cosine between mean-pooled embeddings.

Works with Hugging Face models that return ``hidden_states`` when asked
(``output_hidden_states=True``): encoders (BERT, MiniLM), decoders (GPT-2, LLaMA) and the
encoder of encoder-decoders (T5).

Example:
    >>> teacher = copy.deepcopy(model); mpolab.compress(model, ratio=0.5)
    >>> report = mpolab.heal(model, teacher, tokenizer, texts, steps=100)
    >>> report.fidelity_before, report.fidelity_after
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .training import Trainable, param_groups, set_trainable

__all__ = ["DEFAULT_MAX_LENGTH", "HealReport", "fidelity", "heal", "perplexity", "sentence_embeddings", "token_windows"]

#: Tokens per text (longer texts are truncated) in :func:`heal`, :func:`fidelity` and
#: :func:`sentence_embeddings`, so that a fidelity measured on its own matches heal's report.
DEFAULT_MAX_LENGTH = 64


@dataclass
class HealReport:
    """Fidelity (mean cosine of sentence embeddings to the teacher's) before and after healing."""

    fidelity_before: float
    fidelity_after: float
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        first = sum(self.losses[:5]) / max(len(self.losses[:5]), 1)
        last = sum(self.losses[-5:]) / max(len(self.losses[-5:]), 1)
        return (
            f"fidelity {self.fidelity_before:.4f} -> {self.fidelity_after:.4f} after {self.steps} steps "
            f"({self.seconds:.0f} s); distillation loss {first:.4f} -> {last:.4f}"
        )


def _backbone(model: nn.Module) -> nn.Module:
    """The part that maps token ids to hidden states (the encoder of an encoder-decoder)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def _hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out = _backbone(model)(**batch, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if states is None:
        raise TypeError(f"{type(model).__name__} returned no hidden_states; heal needs a Hugging Face model")
    return tuple(states)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden: [B, L, d]``, ``mask: [B, L]`` -> ``[B, d]``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v.to(device) for k, v in batch.items() if k in keep}


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode (no dropout) and restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states: ``[len(texts), d]`` (sentence-transformers style).

    The model runs in whatever mode it is in; :func:`fidelity` switches to eval mode first.
    """
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = _tokenize(tokenizer, texts[start : start + batch_size], max_length, device)
        last = _hidden_states(model, batch)[-1]
        chunks.append(F.normalize(_mean_pool(last, batch["attention_mask"]).float(), dim=-1))
    return torch.cat(chunks)


def fidelity(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> float:
    """Mean cosine similarity between the student's and the teacher's sentence embeddings.

    Both models run in eval mode (no dropout), and every module's train/eval mode is restored
    afterwards. ``max_length`` defaults to :data:`DEFAULT_MAX_LENGTH`, as in :func:`heal`.

    Raises:
        ValueError: ``texts`` is empty.
    """
    if not texts:
        raise ValueError("fidelity needs at least one text")
    with _eval_mode(student, teacher):
        a = sentence_embeddings(student, tokenizer, texts, batch_size=batch_size, max_length=max_length)
        b = sentence_embeddings(teacher, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return float((a * b).sum(-1).mean())


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    """``[N, seq_len]`` token ids: ``texts`` joined (EOS between texts when the tokenizer has one), cut into windows.

    Raises:
        ValueError: ``seq_len < 2``, or the texts hold fewer than ``seq_len`` tokens.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    limit = None if max_windows is None else max_windows * seq_len
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if limit is not None and len(stream) >= limit:
            break
    windows = len(stream) // seq_len if max_windows is None else min(len(stream) // seq_len, max_windows)
    if windows == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(stream[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 256,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity of a causal LM on ``texts``: ``exp`` of the mean next-token loss.

    The texts are joined and cut into non-overlapping windows of ``seq_len`` tokens
    (:func:`token_windows`); every window is scored on its own (``seq_len - 1`` predictions each),
    in eval mode (each module's mode is restored afterwards).

    Raises:
        ValueError: no texts, or fewer tokens than one window.
        TypeError: the model returns no ``logits`` (not a language model).
    """
    if not texts:
        raise ValueError("perplexity needs at least one text")
    ids = token_windows(tokenizer, texts, seq_len, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _eval_mode(model):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            logits = _logits(model, batch)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(
            f"{type(model).__name__} returned no logits: perplexity and logit distillation need a language model "
            "(e.g. AutoModelForCausalLM), not a bare encoder; use fidelity for encoders"
        )
    return logits


def heal(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    mpo_lr: float | None = None,
    trainable: Trainable = "auxiliary",
    max_length: int = DEFAULT_MAX_LENGTH,
    eval_texts: Sequence[str] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> HealReport:
    """Distil ``teacher`` into the compressed ``student`` on unlabeled ``texts``.

    Args:
        student: a model compressed by :func:`mpolab.compress` (trained in place).
        teacher: the original model (never modified).
        tokenizer: a Hugging Face tokenizer for both.
        texts: unlabeled training sentences.
        steps, batch_size, lr, mpo_lr: the AdamW loop (``mpo_lr`` defaults to ``lr``).
        trainable: ``"auxiliary"`` (MPOP: central tensors frozen) or ``"all"`` / ``"central"``.
        max_length: tokens per text, for training and for the fidelity measurements.
        eval_texts: held-out sentences for :func:`fidelity` before and after (default: ``texts``).
        progress: show a tqdm bar with the running loss.

    Returns:
        A :class:`HealReport`.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not texts:
        raise ValueError("heal needs unlabeled training texts")
    eval_texts = list(eval_texts) if eval_texts is not None else list(texts)
    with _eval_mode(student, teacher):  # no dropout: match the teacher's deterministic outputs
        before = fidelity(student, teacher, tokenizer, eval_texts, max_length=max_length)
        set_trainable(student, trainable)
        optimizer = torch.optim.AdamW(param_groups(student, lr=lr, mpo_lr=mpo_lr))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        device = next(student.parameters()).device
        rng = random.Random(seed)
        order: list[int] = []
        losses: list[float] = []
        bar = _bar(steps, progress)
        start = time.perf_counter()
        for _ in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(texts)), len(texts))
            batch_texts = [texts[i] for i in order[:batch_size]]
            del order[:batch_size]
            batch = _tokenize(tokenizer, batch_texts, max_length, device)
            with torch.no_grad():
                target = _hidden_states(teacher, batch)
            states = _hidden_states(student, batch)
            loss = _distillation_loss(states, target, batch["attention_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        after = fidelity(student, teacher, tokenizer, eval_texts, max_length=max_length)
        return HealReport(before, after, losses, steps, seconds)


def _distillation_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Normalised hidden-state MSE over all layers + (1 - cosine) of the pooled embeddings."""
    m = mask.unsqueeze(-1).to(student[-1].dtype)
    hidden = sum(((s - t).square() * m).sum() / ((t.square() * m).sum() + 1e-8) for s, t in zip(student, teacher))
    pooled_s = _mean_pool(student[-1], mask)
    pooled_t = _mean_pool(teacher[-1], mask)
    cosine = F.cosine_similarity(pooled_s, pooled_t, dim=-1).mean()
    return hidden / len(student) + (1 - cosine)


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="heal", unit="step")
