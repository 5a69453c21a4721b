"""Streamed input statistics: exact Gram matrices, padding masks, shared inputs, block-by-block, bad inputs."""

import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mpolab.calibrate import InputStats, blockwise_input_stats, calibration_data, collect_input_stats


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def batches(n: int = 3, rows: int = 2, length: int = 16, vocab: int = 120) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, vocab, (rows, length), generator=g),
            "attention_mask": torch.ones(rows, length, dtype=torch.long),
        }
        for _ in range(n)
    ]


def recorded_inputs(model, modules, data):
    """Reference: every input stored (what the collector must avoid doing)."""
    seen = {n: [] for n in modules}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for n, m in modules.items()
    ]
    with torch.no_grad():
        for b in data:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_gram_equals_x_transpose_x_for_every_target():
    model = tiny_llama()
    layer = model.model.layers[1]
    targets = {
        "up": layer.mlp.up_proj,
        "gate": layer.mlp.gate_proj,
        "down": layer.mlp.down_proj,
        "q": layer.self_attn.q_proj,
    }
    data = batches()
    stats = collect_input_stats(model, targets, data, gram_dtype=torch.float64)
    X = recorded_inputs(model, targets, data)
    for name, s in stats.items():
        assert s.tokens == 3 * 2 * 16
        assert s.gram.dtype == torch.float64 and s.gram.shape == (X[name].shape[1],) * 2
        torch.testing.assert_close(s.gram, X[name].T @ X[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["up"].gram, stats["gate"].gram)  # one shared input, one Gram
    fast = collect_input_stats(model, ["model.layers.1.mlp.down_proj"], data)  # names work; float32 products
    torch.testing.assert_close(fast["model.layers.1.mlp.down_proj"].gram, stats["down"].gram, rtol=1e-4, atol=1e-4)


def test_padding_is_left_out():
    model = tiny_llama()
    target = {"down": model.model.layers[0].mlp.down_proj}
    full = batches(1, rows=1, length=10)
    padded = {
        "input_ids": torch.cat([full[0]["input_ids"], torch.zeros(1, 6, dtype=torch.long)], 1),
        "attention_mask": torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], 1),
    }
    a = collect_input_stats(model, target, full, gram_dtype=torch.float64, min_tokens_factor=0)["down"]
    b = collect_input_stats(model, target, [padded], gram_dtype=torch.float64, min_tokens_factor=0)["down"]
    assert a.tokens == b.tokens == 10
    torch.testing.assert_close(
        a.gram, b.gram, rtol=1e-5, atol=1e-6
    )  # causal: padding at the end changes nothing before it


def test_gpt2_conv1d_layers():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=1, n_head=4)).eval()
    targets = {"c_fc": model.transformer.h[0].mlp.c_fc, "c_proj": model.transformer.h[0].mlp.c_proj}
    stats = collect_input_stats(model, targets, batches(2), min_tokens_factor=0)
    assert stats["c_fc"].gram.shape == (32, 32) and stats["c_proj"].gram.shape == (128, 128)


def test_blockwise_without_changes_equals_all_at_once():
    model = tiny_llama()
    data = batches()
    blocks = list(model.model.layers)
    per_block = [{f"{b}.{k}": getattr(blocks[b].mlp, k) for k in ("up_proj", "down_proj")} for b in range(2)]
    seen: dict[str, InputStats] = {}
    blockwise_input_stats(model, blocks, per_block, data, lambda b, stats: seen.update(stats), gram_dtype=torch.float64)
    together = collect_input_stats(
        model, {k: v for d in per_block for k, v in d.items()}, data, gram_dtype=torch.float64
    )
    assert set(seen) == set(together)
    for name in together:
        assert seen[name].tokens == together[name].tokens
        torch.testing.assert_close(seen[name].gram, together[name].gram, rtol=1e-5, atol=1e-5)


def test_blockwise_later_blocks_see_earlier_changes():
    model = tiny_llama()
    blocks = list(model.model.layers)
    per_block = [{"down0": blocks[0].mlp.down_proj}, {"up1": blocks[1].mlp.up_proj}]
    before = collect_input_stats(model, {"up1": blocks[1].mlp.up_proj}, batches(), gram_dtype=torch.float64)["up1"].gram
    seen = {}

    def zero_block0(b, stats):
        seen.update(stats)
        if b == 0:
            with torch.no_grad():
                blocks[0].mlp.down_proj.weight.zero_()

    blockwise_input_stats(model, blocks, per_block, batches(), zero_block0, gram_dtype=torch.float64)
    assert not torch.allclose(seen["up1"].gram, before)


def test_bad_inputs():
    model = tiny_llama()
    target = {"down": model.model.layers[0].mlp.down_proj}
    with pytest.raises(ValueError, match="empty"):
        collect_input_stats(model, target, [])
    with pytest.raises(ValueError, match="no submodule"):
        collect_input_stats(model, ["model.nope"], batches(1))
    bad = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1'.*NaN"):
        collect_input_stats(bad, {"1": bad[1]}, [torch.full((3, 4), float("nan"))])
    with pytest.warns(UserWarning, match="fewer calibration tokens"):
        stats = collect_input_stats(model, target, batches(1, rows=1, length=8))
    assert stats["down"].tokens == 8
    unused = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="never ran"):
        collect_input_stats(unused, {"x": nn.Linear(4, 4)}, [torch.randn(2, 4)])
    with pytest.raises(TypeError, match="dict of tensors"):
        collect_input_stats(model, target, ["some text"])


class WordTokenizer:
    """Whitespace tokenizer with the Hugging Face call signature (enough for calibration_data)."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None, return_tensors=None):
        ids = [2 + len(w) for w in text.split()]
        if truncation and max_length:
            ids = ids[:max_length]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}


def test_calibration_data_packs_windows_and_pads_sentences():
    texts = ["one two three four five"] * 20
    packed = calibration_data(WordTokenizer(), texts, num_tokens=48, seq_len=16, batch_size=2)
    assert [b["input_ids"].shape for b in packed] == [(2, 16), (1, 16)]
    assert int(packed[0]["input_ids"][0, 5]) == 1  # EOS between texts
    rows = calibration_data(WordTokenizer(), ["a b c", "a b c d e f"], num_tokens=9, seq_len=8, packed=False)
    assert rows[0]["input_ids"].shape == (2, 6) and rows[0]["attention_mask"].sum() == 9
    with pytest.raises(ValueError, match="one window"):
        calibration_data(WordTokenizer(), ["a b"], num_tokens=64, seq_len=16)
    with pytest.raises(ValueError, match="non-empty"):
        calibration_data(WordTokenizer(), [], num_tokens=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="only"):
            calibration_data(WordTokenizer(), texts, num_tokens=10_000, seq_len=16)


# ----------------------------------------------------------------------------- compress(calibration=...)


def ffn_output_error(model, reference, data):
    with torch.no_grad():
        return sum(float((model(**b).logits - reference(**b).logits).square().sum()) for b in data)


def test_calibrated_compress_beats_plain_at_the_same_budget():
    import copy

    import mpolab

    teacher = tiny_llama()
    data = batches(4, rows=4, length=32)
    plain, calibrated = copy.deepcopy(teacher), copy.deepcopy(teacher)
    targets = ["gate_proj", "up_proj", "down_proj"]
    plain_report = mpolab.compress(plain, targets, ratio=0.5)
    report = mpolab.compress(calibrated, targets, ratio=0.5, calibration=data)
    assert report.calibrated and report.params_after <= int(0.5 * report.params_before)
    assert all(r.output_error is not None and r.layout for r in report.layers)
    assert "output error" in str(report) and "layout" in str(report)
    assert ffn_output_error(calibrated, teacher, data) < ffn_output_error(plain, teacher, data)
    assert plain_report.params_after <= int(0.5 * report.params_before)
    # every MPO layer is a plain MPOLinear
    assert all(
        isinstance(calibrated.get_submodule(r.name), mpolab.MPOLinear) for r in report.layers if r.layout != "dense"
    )


def test_calibrated_compress_keeps_dense_when_an_mpo_is_not_smaller_and_blockwise_runs():
    import copy

    import mpolab

    teacher = tiny_llama()
    data = batches(2, rows=4, length=32)
    model = copy.deepcopy(teacher)
    report = mpolab.compress(model, ["down_proj"], rel_tol=1e-4, calibration=data)
    assert len(report.dense_layers) == 2 and report.params_after == report.params_before
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert "kept dense" in str(report)
    blockwise = copy.deepcopy(teacher)
    report = mpolab.compress(
        blockwise, ["gate_proj", "up_proj", "down_proj"], ratio=0.6, calibration=data, blockwise=True
    )
    assert report.params_after <= int(0.6 * report.params_before)
    with torch.no_grad():
        assert torch.isfinite(blockwise(**data[0]).logits).all()


def test_calibrated_compress_bad_inputs_leave_the_model_untouched():
    import copy

    import mpolab

    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="empty"):
        mpolab.compress(model, ["down_proj"], ratio=0.5, calibration=[])
    with pytest.raises(ValueError, match="layout must be"):
        mpolab.compress(model, ["down_proj"], ratio=0.5, calibration=batches(1), layout="tucker")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


def test_output_sensitivity_measures_without_training():
    from mpolab.calibrate import output_sensitivity

    model = tiny_llama()
    targets = {n: m for n, m in model.named_modules() if n.endswith(("up_proj", "down_proj"))}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = output_sensitivity(model, targets, batches(2))
    assert set(scores) == set(targets) and all(v > 0 for v in scores.values())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="empty"):
        output_sensitivity(model, targets, [])


def test_sensitivity_weighted_budget():
    import copy

    import mpolab

    model = copy.deepcopy(tiny_llama())
    report = mpolab.compress(
        model, ["gate_proj", "up_proj", "down_proj"], ratio=0.5, calibration=batches(2), sensitivity=True
    )
    assert report.params_after <= int(0.5 * report.params_before)


def test_cli_compress_with_a_calibration_file(tmp_path, capsys):
    from mpolab import cli
    from mpolab.text import train_eval_sentences

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(train_eval_sentences(60, 4)[0]), encoding="utf-8")
    code = cli.main(
        [
            "compress",
            "demo",
            "--targets",
            "intermediate.dense",
            "--ratio",
            "0.6",
            "--calibration",
            str(text),
            "--calibration-tokens",
            "1024",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "output error" in out and "layout" in out
    assert cli.main(["compress", "demo", "--ratio", "0.5", "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "not a file" in capsys.readouterr().err
