"""The MPOE fine-tuning examples run end to end (a few steps), plain and inside a Hugging Face Trainer."""

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _mpoe_common  # noqa: E402
import finetune_gpt2_mpoe  # noqa: E402
import finetune_t5_mpoe  # noqa: E402

from mpolab_moe import GradientMask, moe_layers, moefy  # noqa: E402


@pytest.mark.parametrize("example", [finetune_t5_mpoe, finetune_gpt2_mpoe], ids=["t5", "gpt2"])
def test_example_trains_and_the_loss_goes_down(example, capsys):
    result = example.main(["--steps", "25", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert "upcycle  mpo" in out and "masked steps" in out and "load imbalance" in out and "held-out accuracy" in out
    assert result["last_loss"] < 0.8 * result["first_loss"]
    # seeded: the upcycled model answers at least 8 more of the 200 held-out questions than before
    assert result["accuracy"] >= result["accuracy_before"] + 0.04


def test_example_runs_inside_hf_trainer(capsys):
    result = finetune_gpt2_mpoe.main(["--steps", "6", "--batch-size", "8", "--trainer"])
    assert "Trainer: logged losses" in capsys.readouterr().out
    assert result["last_loss"] < result["first_loss"]


def test_aux_loss_reaches_the_loss_the_trainer_optimises(tmp_path):
    tok = _mpoe_common.WordTokenizer()
    batch = finetune_gpt2_mpoe.encode(_mpoe_common.arithmetic_pairs(64, seed=0), tok)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(64)]

    def router_after(aux_weight):
        torch.manual_seed(0)
        model = finetune_gpt2_mpoe.build_model(None, len(tok))
        moefy(model, layers=[1], num_experts=4, experts="mpo")
        _mpoe_common.train_with_hf_trainer(
            model, examples, steps=3, lr=1e-2, aux_weight=aux_weight, p_b=0.0, seed=0, batch_size=8,
            output_dir=str(tmp_path / str(aux_weight)),
        )  # fmt: skip
        (layer,) = moe_layers(model).values()
        return layer.gate.weight.detach().clone()

    assert not torch.allclose(router_after(0.0), router_after(10.0))


def test_gradient_mask_is_attached_in_the_plain_loop():
    tok = _mpoe_common.WordTokenizer()
    model = finetune_t5_mpoe.build_model(None, len(tok))
    moefy(model, layers=[3], num_experts=4, experts="mpo")
    pairs = _mpoe_common.arithmetic_pairs(64, seed=0)
    result = _mpoe_common.train(
        model, lambda s: finetune_t5_mpoe.encode(pairs[:8], tok), steps=4, lr=1e-3, aux_weight=0.01, p_b=1.0, seed=0
    )
    assert result.masked_steps == result.steps == 4
    with pytest.raises(ValueError, match="no MPOExperts"):
        GradientMask(finetune_t5_mpoe.build_model(None, len(tok)))


@pytest.mark.parametrize("example", [finetune_t5_mpoe, finetune_gpt2_mpoe], ids=["t5", "gpt2"])
def test_example_accumulates_micro_batches_and_compares_tokens_per_second(example, capsys):
    result = example.main(["--steps", "4", "--batch-size", "8", "--grad-accum", "2", "--speed-steps", "1"])
    out = capsys.readouterr().out
    assert "2 micro-batch(es) per step" in out and "training tokens/s" in out and "Switch" in out
    assert result["switch_tokens_per_s"] > 0 and result["mpoe_tokens_per_s"] > 0
    # two MPOE layers with w1 and w2 each: four weights flushed once per optimiser step (not per micro-batch)
    assert result["flushed"] == 4 * 4


def test_example_accumulates_inside_hf_trainer(capsys):
    result = finetune_gpt2_mpoe.main(
        ["--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--trainer", "--speed-steps", "0"]
    )
    assert "Trainer: logged losses" in capsys.readouterr().out
    assert result["flushed"] == 4 * 3 and "switch_tokens_per_s" not in result


def test_plain_loop_accumulation_under_materialize_equals_rebuilding_every_micro_batch():
    tok = _mpoe_common.WordTokenizer()
    pairs = _mpoe_common.arithmetic_pairs(32, seed=0)
    batches = [finetune_gpt2_mpoe.encode(pairs[k * 8 : (k + 1) * 8], tok) for k in range(4)]

    def params_after(materialize):
        torch.manual_seed(0)
        model = finetune_gpt2_mpoe.build_model(None, len(tok)).double()  # float64: Adam amplifies float32 noise
        moefy(model, layers=[1], num_experts=4, experts="mpo")
        result = _mpoe_common.train(
            model, lambda k: batches[(k - 1) % 4], steps=3, lr=1e-2, aux_weight=0.01, p_b=0.5, seed=0,
            grad_accum=2, log_every=0, materialize=materialize,
        )  # fmt: skip
        assert result.flushed == (2 * 3 if materialize else 0)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain, ours = params_after(False), params_after(True)
    for name in plain:
        torch.testing.assert_close(plain[name], ours[name], msg=name)
    with pytest.raises(ValueError, match="grad_accum"):
        _mpoe_common.check_grad_accum(0)
