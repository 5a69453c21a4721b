import pytest
import torch
from torch import nn

import mpolab
from mpolab import MPOEmbedding, MPOLinear
from mpolab.compress import allocate_ranks, find_targets

from ._hf import FAMILIES, inputs_for, main_output


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_compression_keeps_outputs_and_trains(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().double()
    inputs = inputs_for(family)
    with torch.no_grad():
        before = main_output(model, model(**inputs))
    report = mpolab.compress(model, "all-linear")
    assert report.layers and all(isinstance(model.get_submodule(r.name), MPOLinear) for r in report.layers)
    assert all(r.rel_error < 1e-10 for r in report.layers)
    with torch.no_grad():
        after = main_output(model, model(**inputs))
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)
    model.train()
    out = model(**inputs)
    loss = main_output(model, out).square().mean()
    if getattr(out, "pooler_output", None) is not None:
        loss = loss + out.pooler_output.square().mean()
    loss.backward()
    assert all(c.grad is not None for r in report.layers for c in model.get_submodule(r.name).cores)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_works_after_compression(family):
    model = FAMILIES[family]()
    mpolab.compress(model, "all-linear", max_rank=8)
    ids = inputs_for(family)["input_ids"][:1]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] >= 3


def test_gpt2_conv1d_is_compressed_with_its_transposed_weight():
    model = FAMILIES["gpt2"]().double()
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32, dtype=torch.float64)
    expected = conv(x)
    report = mpolab.compress(model, ["c_fc"])
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, MPOLinear) and (layer.out_features, layer.in_features) == (128, 32)
    torch.testing.assert_close(layer(x), expected)
    assert {r.kind for r in report.layers} == {"conv1d"}


def test_embeddings_are_compressed_when_named():
    model = FAMILIES["bert"]().double()
    ids = inputs_for("bert")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    mpolab.compress(model, ["word_embeddings"])
    assert isinstance(model.embeddings.word_embeddings, MPOEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before)


def test_dtype_and_bias_are_kept():
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64, bias=False)).to(torch.bfloat16)
    mpolab.compress(model, "all-linear", max_rank=4)
    assert model[0].bias is not None and model[0].bias.dtype == torch.bfloat16 and model[2].bias is None
    assert all(c.dtype == torch.bfloat16 for c in model[0].cores)
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_target_forms():
    model = FAMILIES["bert"]()
    assert set(find_targets(model, ["query"])) == {f"encoder.layer.{i}.attention.self.query" for i in range(2)}
    assert set(find_targets(model, r"encoder\.layer\.0\..*dense")) == {
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
    }
    all_linear = find_targets(model, "all-linear", exclude_modules=["pooler.dense"])
    assert "pooler.dense" not in all_linear and len(all_linear) == 12
    assert "lm_head" not in find_targets(FAMILIES["gpt2"](), "all-linear")


def test_target_that_matches_nothing_lists_near_misses():
    with pytest.raises(ValueError, match=r"near misses: \['query'\]"):
        find_targets(FAMILIES["bert"](), ["querry"])


def test_target_of_an_unsupported_type_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="LayerNorm"):
        find_targets(model, ["1"])


def test_rel_tol_per_layer_and_rank_pattern():
    model = FAMILIES["bert"]()
    report = mpolab.compress(model, "all-linear", rel_tol=0.3, rank_pattern={"intermediate.dense": 2})
    for r in report.layers:
        if r.name.endswith("intermediate.dense"):
            assert max(r.ranks) <= 2
        else:
            assert r.rel_error <= 0.3 + 1e-6
    assert "targets:" in str(report) and "intermediate" in str(report)


def test_global_budget_is_met():
    model = FAMILIES["llama"]()
    report = mpolab.compress(model, "all-linear", ratio=0.4)
    assert report.params_after <= 0.4 * report.params_before
    assert report.params_after >= 0.3 * report.params_before


def test_budget_below_rank_one_everywhere_is_refused():
    with pytest.raises(ValueError, match="rank-1"):
        mpolab.compress(FAMILIES["bert"](), "all-linear", max_params=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rel_tol=0.1, ratio=0.5), "not both"),
        (dict(ratio=0.5, max_params=100), "not both"),
        (dict(ratio=-0.5), "ratio"),
    ],
)
def test_conflicting_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mpolab.compress(FAMILIES["bert"](), "all-linear", **kwargs)


def test_allocation_spends_the_budget_where_spectra_decay():
    from mpolab.compress import _Spectrum

    fast = torch.tensor([10.0, 8.0, 0.01, 0.01], dtype=torch.float64)  # two values matter
    flat = torch.ones(4, dtype=torch.float64)
    spectra = {
        "fast": _Spectrum([4, 4], [fast], float(fast.square().sum()), [4]),
        "flat": _Spectrum([4, 4], [flat], float(flat.square().sum()), [4]),
    }
    ranks = allocate_ranks(spectra, budget=8 * 5)  # 8 parameters per rank unit: room for 5 of 8 units
    assert ranks == {"fast": [2], "flat": [3]}
