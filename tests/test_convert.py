import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from mpolab_moe.convert import moefy
from mpolab_moe.experts.dense import DenseExperts
from mpolab_moe.ffn import FFN, MoEWithDropout, find_ffns
from mpolab_moe.layer import MoE, aux_loss, moe_layers
from mpolab_moe.registry import register_method, registered_methods, unregister_method
from mpolab_moe.upcycle import EXACT_TOL, upcycle

from ._hf import FAMILIES, inputs_for, main_output


def tiny_gated_t5() -> nn.Module:
    config = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


EXPERTS_FOR_GENERATE = "dense"
MODELS = {**FAMILIES, "t5-gated": tiny_gated_t5}


def family_of(name: str) -> str:
    return name.split("-")[0]


def loss_of(model: nn.Module, name: str) -> torch.Tensor:
    out = model(**inputs_for(family_of(name)))
    return main_output(model, out).square().mean()


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("experts", ["mpo", "dense"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_upcycled_model_equals_original_and_trains(name, experts):
    model = MODELS[name]()
    inputs = inputs_for(family_of(name))
    num_ffns = len(find_ffns(model))
    with torch.no_grad():
        before = main_output(model, model(**inputs))
    report = moefy(model, num_experts=4, experts=experts, gate="top1")

    layers = moe_layers(model)
    assert len(report.layers) == len(layers) == num_ffns
    assert {r.experts for r in report.layers} == {experts}
    assert report.max_error < 1e-5
    assert all(not m.training for m in layers.values())  # the model was in eval mode
    with torch.no_grad():
        after = main_output(model, model(**inputs))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # the forward really went through every MoE layer
    assert all(m.last_stats is not None and m.last_stats.num_tokens > 0 for m in layers.values())

    model.train()
    loss = loss_of(model, name) + 0.01 * aux_loss(model)
    loss.backward()
    for moe in layers.values():
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
        grads = [p.grad for p in moe.experts.parameters()]
        assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
        if experts == "dense":  # an expert's weights get gradient exactly when it received tokens
            routed = moe.last_stats.tokens_per_expert > 0
            assert torch.equal(moe.experts.w1.grad.flatten(1).abs().sum(1) > 0, routed)


def test_gated_t5_is_read_as_gated_with_its_config_activation():
    ffn = find_ffns(tiny_gated_t5())[0]
    assert ffn.family == "t5" and ffn.activation == "gelu_new"
    assert ffn.w_gate is not None and ffn.w_gate.shape == ffn.w1.shape == (64, 32)
    assert ffn.w1.data_ptr() == ffn.module.wi_1.weight.data_ptr()  # up projection, not the gate


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_after_moefy_gives_the_same_tokens(family):
    model = FAMILIES[family]()
    ids = inputs_for(family)["input_ids"][:1]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    before = model.generate(input_ids=ids, **kwargs)
    moefy(model, num_experts=4, experts=EXPERTS_FOR_GENERATE)
    after = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(after, before)


def test_families_are_read_in_linear_layout():
    gpt2 = FAMILIES["gpt2"]()
    ffn = find_ffns(gpt2)[1]
    mlp = gpt2.transformer.h[1].mlp
    assert ffn.name == "transformer.h.1.mlp" and ffn.family == "gpt2" and ffn.activation == "gelu_new"
    assert torch.equal(ffn.w1, mlp.c_fc.weight.T) and torch.equal(ffn.w2, mlp.c_proj.weight.T)
    assert ffn.w1.shape == (128, 32) and ffn.b1.shape == (128,) and ffn.b2.shape == (32,)
    bert = find_ffns(FAMILIES["bert"]())[0]
    assert (bert.name, bert.family, bert.activation, bert.w2.shape) == ("encoder.layer.0", "bert", "gelu", (32, 64))
    llama = find_ffns(FAMILIES["llama"]())[0]
    assert llama.activation == "silu" and llama.w_gate is not None and llama.b1 is None
    assert llama.w1.data_ptr() == llama.module.up_proj.weight.data_ptr()


def test_install_keeps_the_surrounding_modules():
    gpt2, bert, t5 = FAMILIES["gpt2"](), FAMILIES["bert"](), FAMILIES["t5"]()
    moefy(gpt2, layers=[0], experts="dense", num_experts=2)
    moefy(bert, layers=[1], experts="dense", num_experts=2)
    moefy(t5, layers=[0], experts="dense", num_experts=2)
    assert isinstance(gpt2.transformer.h[0].mlp, MoEWithDropout) and isinstance(gpt2.transformer.h[0].mlp.moe, MoE)
    assert gpt2.transformer.h[0].mlp.dropout.p == gpt2.config.resid_pdrop
    assert not isinstance(gpt2.transformer.h[1].mlp, MoEWithDropout)
    layer = bert.encoder.layer[1]
    assert isinstance(layer.intermediate, nn.Identity) and isinstance(layer.output.dense, MoE)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm)
    ff = t5.encoder.block[0].layer[1]
    assert isinstance(ff.DenseReluDense, MoE) and hasattr(ff, "layer_norm")


# ----------------------------------------------------------------------------- truncation, aux loss


def test_truncation_reports_errors_and_changes_outputs():
    model = FAMILIES["gpt2"]()
    inputs = inputs_for("gpt2")
    with torch.no_grad():
        before = main_output(model, model(**inputs))
    report = moefy(model, num_experts=4, experts="mpo", rel_tol=0.3)
    errors = [e for r in report.layers for e in r.reconstruction_error.values()]
    assert len(errors) == 4 and all(0 < e <= 0.3 + 1e-4 for e in errors)
    assert report.params_after < report.params_before * 4  # cheaper than 4 dense copies
    assert "rel. error" in str(report) and "transformer.h.1.mlp" in str(report)
    with torch.no_grad():
        after = main_output(model, model(**inputs))
    assert (after - before).abs().max() > 1e-3
    assert report.max_error > EXACT_TOL
    _, up = upcycle(find_ffns(FAMILIES["gpt2"]())[0], 4, experts="mpo", rel_tol=0.3, return_report=True)
    assert not up.exact_at_init


def test_aux_loss_is_a_positive_scalar_with_grad_after_a_train_forward():
    model = FAMILIES["llama"]()
    moefy(model, num_experts=4, experts="dense", z_loss_weight=1e-3)
    model.train()
    model(**inputs_for("llama"))
    loss = aux_loss(model)
    assert loss.shape == () and loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in moe_layers(model).values())


# ----------------------------------------------------------------------------- upcycle on its own


def test_upcycle_bare_modules_and_weightings():
    t5 = FAMILIES["t5"]()
    ffn_module = t5.encoder.block[0].layer[1].DenseReluDense
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = ffn_module(x)
        top1, r1 = upcycle(ffn_module, 4, experts="dense", return_report=True)
        top2, r2 = upcycle(ffn_module, 4, experts="dense", gate="top2", return_report=True)  # "prob", renormalised
        top1_prob, r1p = upcycle(ffn_module, 4, experts="dense", weighting="prob", return_report=True)
        with pytest.warns(UserWarning, match="2x the FFN"):
            top2_one, r2o = upcycle(ffn_module, 4, experts="dense", gate="top2", weighting="one", return_report=True)
        torch.testing.assert_close(top1(x), expected)
        torch.testing.assert_close(top2(x), expected)
        torch.testing.assert_close(top2_one(x), 2 * expected)
        assert not torch.allclose(top1_prob(x), expected)
    assert isinstance(upcycle(ffn_module, 4, experts="dense"), MoE)  # the layer alone by default
    assert not hasattr(top1, "upcycle_report")
    assert r1.exact_at_init and r2.exact_at_init
    assert not r1p.exact_at_init and not r2o.exact_at_init
    assert not upcycle(ffn_module, 4, experts="dense", capacity_factor=1.0, return_report=True)[1].exact_at_init
    assert upcycle(ffn_module, 4, experts="dense", capacity_factor=4.0, return_report=True)[1].exact_at_init
    assert (r1.params_before, r1.params_after) == (4096, 4 * 4096 + 4 * 32)
    assert r1.reconstruction_error == {"w1": 0.0, "w2": 0.0}


def test_upcycle_llama_mlp_and_sequential_keep_dtype_and_mode():
    mlp = FAMILIES["llama"]().model.layers[0].mlp.double().train()
    moe = upcycle(mlp, 4, experts="dense")
    assert moe.training and moe.experts.w1.dtype == torch.float64 and moe.gate.weight.dtype == torch.float32
    x = torch.randn(6, 32, dtype=torch.float64)
    torch.testing.assert_close(moe(x), mlp(x))
    seq = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    ffn = FFN.from_module(seq)
    assert ffn.family == "sequential" and ffn.activation == "gelu"
    moe = upcycle(seq, 3, experts="dense", gate="topk", k=3)
    x = torch.randn(5, 8)
    torch.testing.assert_close(moe(x), seq(x))
    with pytest.raises(ValueError, match="given on its own"):
        ffn.install(seq, moe)


def test_moefy_by_name_selects_blocks_and_sequentials():
    t5 = FAMILIES["t5"]()
    names = [f.name for f in find_ffns(t5)]
    assert names[:2] == ["encoder.block.0.layer.1.DenseReluDense", "encoder.block.1.layer.1.DenseReluDense"]
    assert names[2].startswith("decoder.block.0")  # decoder blocks follow the encoder's
    assert [f.name for f in find_ffns(t5, layers=[-1, 0, 0])] == [names[0], names[3]]
    assert [f.name for f in find_ffns(t5, layers="decoder")] == names[2:]
    assert [f.name for f in find_ffns(t5, layers=["encoder.block.1.layer.1"])] == [names[1]]
    bert = FAMILIES["bert"]()
    assert [f.name for f in find_ffns(bert, layers="encoder.layer.1.output")] == ["encoder.layer.1"]

    model = nn.ModuleDict({"ffn": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))})
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model["ffn"](x)
    report = moefy(model, layers=["ffn"], num_experts=2, experts="dense")
    assert isinstance(model["ffn"], MoE) and report.layers[0].family == "sequential"
    with torch.no_grad():
        torch.testing.assert_close(model["ffn"](x), before)


def test_registered_methods_get_their_default_layers_and_only_given_options(request):
    request.addfinalizer(lambda: unregister_method("last-only"))
    seen = []

    def builder(ffn, **kwargs):
        seen.append((ffn.name, kwargs))
        return upcycle(ffn, kwargs.get("num_experts", 2), experts="dense")

    register_method("last-only", builder, lambda num_layers, family: [num_layers - 1])
    model = FAMILIES["llama"]()
    report = moefy(model, method="last-only", alpha=3)
    assert seen == [("model.layers.1.mlp", {"alpha": 3})]
    assert [r.method for r in report.layers] == ["last-only"] and report.layers[0].num_experts == 2
    moefy(model, layers=[0], method="last-only", num_experts=3)
    assert seen[-1] == ("model.layers.0.mlp", {"num_experts": 3})
    assert "last-only" in registered_methods() and "upcycle" in registered_methods()


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    model = FAMILIES["gpt2"]()
    with pytest.raises(ValueError, match=r"layer index 2 out of range.*0\.\.1"):
        find_ffns(model, layers=[0, 2])
    with pytest.raises(ValueError, match="out of range"):
        moefy(model, layers=[-3])
    with pytest.raises(ValueError, match="no module named 'transformer.h.9'"):
        find_ffns(model, layers="transformer.h.9")
    with pytest.raises(TypeError, match=r"cannot upcycle a Linear.*T5DenseActDense.*LlamaMLP"):
        upcycle(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="LayerNorm"):
        find_ffns(model, layers=["transformer.ln_f"])
    with pytest.raises(ValueError, match=r"found no supported FFN in Sequential.*supported"):
        find_ffns(nn.Sequential(nn.Linear(2, 2)))
    ffn = find_ffns(model)[0]
    with pytest.raises(ValueError, match=r"k=5 out of range.*num_experts=4"):
        upcycle(ffn, 4, gate="topk", k=5)
    with pytest.raises(ValueError, match="needs k"):
        upcycle(ffn, 4, gate="topk")
    with pytest.raises(ValueError, match="gate='top1' routes to 1 experts but k=2"):
        upcycle(ffn, 4, gate="top1", k=2)
    with pytest.raises(ValueError, match="experts must be one of 'mpo', 'dense'; got 'lora'"):
        upcycle(ffn, 4, experts="lora")
    with pytest.raises(ValueError, match="unknown gate 'top3'"):
        upcycle(ffn, 4, gate="top3")
    with pytest.raises(ValueError, match="truncate MPO experts"):
        upcycle(ffn, 4, experts="dense", max_rank=2)
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*'upcycle'"):
        moefy(model, method="nope")
    with pytest.raises(ValueError, match="needs k"):  # fails while building: nothing installed
        moefy(model, gate="topk", experts="dense")
    assert not moe_layers(model)

    moefy(model, experts="dense", num_experts=2)
    with pytest.raises(ValueError, match="already has 2 MoE layers"):
        moefy(model)
    with pytest.raises(ValueError, match="already converted"):
        ffn.install(model, upcycle(ffn, 2, experts="dense"))


def test_dense_bank_is_a_plain_copy():
    ffn = find_ffns(FAMILIES["bert"]())[0]
    bank = upcycle(ffn, 3, experts="dense").experts
    assert isinstance(bank, DenseExperts) and bank.activation_name == "gelu"
    assert torch.equal(bank.w1[2], ffn.w1.T) and torch.equal(bank.b2[1], ffn.b2)
