"""The ``mpolab`` command: ``compress``, ``inspect`` and ``demo``.

``mpolab compress PATH_OR_DEMO --ratio 0.5 --out out/`` loads a Hugging Face model from a local
folder (or the embedded all-MiniLM-L6-v2 for ``demo``), compresses its layers with a progress bar,
prints the per-layer table, and saves the result. ``mpolab inspect out/`` summarises a saved
model. ``mpolab demo`` runs the README's main job. ``python -m mpolab`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .tables import text_table

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpolab",
        description="Compress PyTorch / Hugging Face models into MPO (tensor-train matrix) layers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compress",
        help="compress a model's linear layers and save it",
        description="Load a model, replace its target layers by MPO layers under a budget or tolerance, "
        "print the per-layer table and save the result (safetensors + JSON).",
    )
    c.add_argument("model", help="a local Hugging Face model folder, or 'demo' for the embedded all-MiniLM-L6-v2")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="keep this fraction of the targets' parameters (global allocation)")
    budget.add_argument("--max-params", type=int, help="keep at most this many parameters in the targets (global)")
    budget.add_argument("--rel-tol", type=float, help="per-layer relative Frobenius error, in (0, 1)")
    c.add_argument("--max-rank", type=int, help="bond cap for every layer (combines with the options above)")
    c.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        help="module names, name suffixes or regexes to compress (default: all-linear, i.e. every "
        "nn.Linear / Conv1D except an lm_head)",
    )
    c.add_argument("--exclude", nargs="+", help="module names, suffixes or regexes to leave alone")
    c.add_argument("--num-cores", type=int, default=5, help="cores per MPO (default 5, as the MPOP authors)")
    c.add_argument(
        "--calibration",
        type=Path,
        help="a UTF-8 text file (one text per line) to calibrate on: data-aware compression (see docs/compress.md)",
    )
    c.add_argument("--calibration-tokens", type=int, default=16_384, help="calibration tokens to use (16384)")
    c.add_argument(
        "--no-sensitivity", action="store_true", help="calibrated budget without the measured sensitivity weighting"
    )
    c.add_argument("--out", type=Path, help="folder to save the compressed model to")
    c.add_argument("--plot", type=Path, help="write bond spectra and the error-vs-parameters curve to this PNG")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is often fastest on a busy machine)")

    i = sub.add_parser(
        "inspect",
        help="summarise a saved compressed model",
        description="Print each MPO layer's shape, factors, ranks, parameters and bond-spectrum summary "
        "(how many singular values hold 90% / 99% of the energy at its widest bond).",
    )
    i.add_argument("path", type=Path, help="a folder written by 'mpolab compress --out' or mpolab.save")

    d = sub.add_parser(
        "demo",
        help="the main job: compress all-MiniLM-L6-v2 to half and heal it",
        description="Compress the real all-MiniLM-L6-v2 to half of its linear parameters with calibrated "
        "compression (input statistics and measured sensitivity from its training sentences), heal it by "
        "distillation on real sentences, and print the fidelity before and after.",
    )
    d.add_argument("--ratio", type=float, default=0.5, help="fraction of the linear parameters to keep (0.5)")
    d.add_argument("--steps", type=int, default=800, help="distillation steps (800)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--threads", type=int, help="torch threads (default: torch's); printed with the time")
    d.add_argument(
        "--data-free", action="store_true", help="the data-free path (spectra-based allocation, no calibration)"
    )
    return parser


def _load_model(name: str) -> tuple[Any, Any]:
    if name == "demo":
        from .demo import load_minilm

        return load_minilm()
    from .io import check_hf_model_folder

    path = check_hf_model_folder(name)  # config.json and safetensors weights, before any work
    from transformers import AutoModel, AutoTokenizer

    try:  # never run a folder's code, never prompt for it, never unpickle
        model = AutoModel.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True
        ).eval()
    except Exception as e:  # transformers raises many types for a bad folder: one line for the user
        raise ValueError(f"cannot load a model from {name!r}: {type(e).__name__}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _read_calibration(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (read before the model loads, so a bad path fails fast)."""
    if not path.is_file():
        raise ValueError(f"--calibration {str(path)!r} is not a file; give a UTF-8 text file, one text per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calibration {str(path)!r} holds no text")
    return lines


def _compress(args: argparse.Namespace) -> int:
    from .compress import compress

    _check_options(args)
    if args.plot is not None:
        _require_matplotlib()  # before any work: a missing plotting library must not cost a compression
        _check_plot_path(args.plot)
    if args.out is not None:
        _check_writable(args.out)
    calibration_texts = _read_calibration(args.calibration) if args.calibration is not None else None
    model, tokenizer = _load_model(args.model)
    calibration = None
    if calibration_texts is not None:
        from .calibrate import calibration_data

        if tokenizer is None:
            raise ValueError(f"--calibration needs a tokenizer, and none could be loaded from {args.model!r}")
        config = getattr(model, "config", None)
        packed = bool(getattr(config, "is_decoder", False)) or any(
            str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])
        )
        calibration = calibration_data(
            tokenizer,
            calibration_texts,
            num_tokens=args.calibration_tokens,
            seq_len=256 if packed else 128,
            packed=packed,
        )
    report = compress(
        model,
        args.targets,
        threads=args.threads,
        exclude_modules=args.exclude,
        ratio=args.ratio,
        max_params=args.max_params,
        rel_tol=args.rel_tol,
        max_rank=args.max_rank,
        num_cores=args.num_cores,
        progress=not args.no_progress,
        calibration=calibration,
        sensitivity=not args.no_sensitivity,
    )
    print(report)
    if args.out is not None:  # save first: the model is the result, the plot only a picture of it
        from .io import save

        save(model, args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")
    if args.plot is not None:
        _plot(model, report, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """The truncation options and ``--threads``, validated before the model is loaded."""
    from .options import TruncationOptions
    from .utils import check_positive_int

    TruncationOptions(
        ratio=args.ratio,
        max_params=args.max_params,
        rel_tol=args.rel_tol,
        max_rank=args.max_rank,
        num_cores=args.num_cores,
    )
    check_positive_int(args.threads, "--threads", allow_none=True)


def _check_plot_path(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--plot {path}: the folder {parent} does not exist")
    if path.is_dir():
        raise ValueError(f"--plot {path} is a folder; give a .png file name")


def _check_writable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    import os

    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {path}: {parent} is not writable")


def _inspect(args: argparse.Namespace) -> int:
    from .io import WEIGHTS_NAME, read_checked

    saved, tensors = read_checked(args.path)  # the same checks as mpolab.load
    if not saved.layers:
        raise ValueError(f"{saved.folder} holds no MPO layers")
    header = ["layer", "shape", "factors (out x in)", "ranks", "params", "% dense", "90% / 99% energy at widest bond"]
    rows = []
    total = dense_total = 0
    for name, layer in sorted(saved.layers.items()):
        mpo = layer.mpo_from(tensors, saved.folder / WEIGHTS_NAME).to(torch.float32)
        shape = layer.shape
        exact = mpo.truncate(max_rank=max(mpo.ranks))  # lossless rounding: the current spectra
        widest = max(range(len(mpo.ranks)), key=lambda k: mpo.ranks[k])
        s = exact.singular_values[widest] if exact.singular_values else torch.ones(1)
        energy = (s.square().cumsum(0) / s.square().sum().clamp_min(1e-30)).tolist()
        k90 = next((k + 1 for k, e in enumerate(energy) if e >= 0.9), len(energy))
        k99 = next((k + 1 for k, e in enumerate(energy) if e >= 0.99), len(energy))
        total += mpo.num_params
        dense_total += shape[0] * shape[1]
        rows.append(
            [
                name or "(model)",
                f"{shape[0]}x{shape[1]}",
                f"{'x'.join(map(str, mpo.out_factors))} x {'x'.join(map(str, mpo.in_factors))}",
                ",".join(map(str, mpo.ranks)),
                f"{mpo.num_params:,}",
                f"{100 * mpo.num_params / (shape[0] * shape[1]):.1f}",
                f"{k90} / {k99} of {mpo.ranks[widest]}",
            ]
        )
    print("\n".join(text_table(header, rows)))
    print(
        f"{len(rows)} MPO layers, {total:,} MPO parameters for {dense_total:,} dense "
        f"({100 * total / max(dense_total, 1):.1f}%)"
    )
    return 0


def _require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg back end, or an ImportError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'mpolab-torch[plot]'") from e
    return plt


def _plot(model: torch.nn.Module, report: Any, path: Path) -> None:
    """Bond spectra and per-layer error vs parameters kept, as a PNG at ``path``."""
    plt = _require_matplotlib()
    from .nn import mpo_modules

    layers = mpo_modules(model)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, layer in layers.items():
        spectrum = layer.mpo.truncate(max_rank=max(layer.ranks)).singular_values
        assert spectrum is not None
        widest = max(range(len(spectrum)), key=lambda k: spectrum[k].numel())
        s = spectrum[widest]
        ax1.semilogy((s / s[0].clamp_min(1e-30)).numpy(), lw=0.8, alpha=0.7, label=name if len(layers) <= 8 else None)
    ax1.set(title="bond spectra at each layer's widest bond", xlabel="index", ylabel="σ / σ₁")
    if len(layers) <= 8:
        ax1.legend(fontsize=6)
    kept = [r.params_after / r.params_before for r in report.layers]
    errors = [r.rel_error for r in report.layers]
    ax2.scatter(kept, errors, s=12)
    ax2.set(
        title="per-layer error vs parameters kept",
        xlabel="parameters kept (fraction of dense)",
        ylabel="relative Frobenius error",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .utils import check_positive_int

    check_positive_int(args.threads, "--threads", allow_none=True)
    run_demo(
        ratio=args.ratio,
        steps=args.steps,
        progress=not args.no_progress,
        calibrated=not args.data_free,
        threads=args.threads,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpolab`` console script."""
    args = _parser().parse_args(argv)
    handlers = {"compress": _compress, "inspect": _inspect, "demo": _demo}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError, ImportError) as e:  # OSError: missing files, permissions
        message = " ".join(str(e).split())  # one line, whatever the library's message looked like
        print(f"mpolab {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
