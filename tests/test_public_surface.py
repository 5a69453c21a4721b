"""The small public members the scenario tests do not reach: reprs, report dicts, option keywords,
statistics arithmetic, structure properties, recording switches."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch
from torch import nn

import mpolab
from mpolab import InputStats, TruncationOptions
from mpolab.text import news_documents
from mpolab_moe import MoE, MPOExperts, SharedCentralMPO, TopAnyGate, moefy
from tests._hf import tiny_bert
from tests.test_contract_matrix import BANKS, GATES


@pytest.mark.parametrize("name", sorted(GATES))
def test_every_gate_repr_names_its_size(name):
    make, E = GATES[name]
    gate = make(E)
    text = repr(gate)
    assert type(gate).__name__ in text and str(gate.d_model) in text
    assert E == 1 or str(E) in text


@pytest.mark.parametrize("name", sorted(BANKS))
def test_every_bank_repr_names_its_size(name):
    bank = BANKS[name](4)
    text = repr(bank)
    assert type(bank).__name__ in text and re.search(r"\b4\b", text), text


def test_mpo_embedding_repr_names_its_table():
    emb = mpolab.MPOEmbedding.from_embedding(nn.Embedding(64, 16, padding_idx=0), max_rank=4)
    text = repr(emb)
    assert "64" in text and "16" in text and "padding_idx=0" in text


def test_compression_and_moefy_reports_are_json_with_consistent_totals():
    model = tiny_bert()
    report = mpolab.compress(model, "all-linear", max_rank=4)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_before"] == sum(r["params_before"] for r in data["layers"]) == report.params_before
    assert data["params_after"] == sum(r["params_after"] for r in data["layers"]) < data["params_before"]
    moe_report = moefy(tiny_bert(), layers=[0], num_experts=2, experts="dense")
    moe_data = json.loads(json.dumps(moe_report.to_dict()))
    assert moe_data["params_after"] > moe_data["params_before"]  # two dense experts instead of one FFN
    assert [r["name"] for r in moe_data["layers"]] == [r.name for r in moe_report.layers]


def test_input_stats_covariance_and_merge():
    x1, x2 = torch.randn(10, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    a, b = InputStats(x1.T @ x1, 10), InputStats(x2.T @ x2, 6)
    both = a.merge(b)
    x = torch.cat([x1, x2])
    torch.testing.assert_close(both.gram, x.T @ x)
    assert both.tokens == 16 and both.in_features == 3
    torch.testing.assert_close(both.covariance(), x.T @ x / 16)
    with pytest.raises(ValueError, match="shapes"):
        a.merge(InputStats(torch.zeros(4, 4, dtype=torch.float64), 1))


def test_truncation_options_to_kwargs_round_trips_through_decompose():
    opts = TruncationOptions(max_rank=[4, 8, 4], svd="gram")
    kwargs = opts.to_kwargs()
    assert kwargs == {"max_rank": (4, 8, 4), "svd": "gram"}
    W = torch.randn(48, 40)
    a, b = mpolab.decompose(W, options=opts), mpolab.decompose(W, **kwargs)
    assert a.ranks == b.ranks and math.isclose(a.truncation_error, b.truncation_error)


def test_mpo_experts_freeze_and_unfreeze_central_and_shared_central_structure():
    bank = MPOExperts(8, 16, 3, num_cores=3, max_rank=4)
    bank.freeze_central()
    assert not any(p.requires_grad for p in bank.central_parameters())
    bank.unfreeze_central()
    assert all(p.requires_grad for p in bank.central_parameters())
    shared = next(m for m in bank.modules() if isinstance(m, SharedCentralMPO))
    assert shared.num_cores == 3
    # one central core for all experts plus E copies of every auxiliary core
    assert shared.num_params() == sum(p.numel() for p in shared.parameters())


def test_top_any_recording_switches():
    gate = TopAnyGate(8, 4, num_active=3)
    layer = MoE(gate, BANKS["dense"](4))
    gate.start_recording()
    layer.eval()(torch.randn(5, 8))
    counted = int(gate.routed_counts.sum())
    assert counted >= 5  # every token reaches at least one expert in eval
    gate.stop_recording()
    layer(torch.randn(5, 8))
    assert int(gate.routed_counts.sum()) == counted  # no longer recording, records kept


def test_news_documents_loads_or_says_how_to_install():
    if importlib.util.find_spec("gensim") is None:  # the corpus ships as data inside gensim's wheel
        with pytest.raises(ImportError, match="pip install --no-deps gensim"):
            news_documents("test")
        return
    docs = news_documents("test")
    assert len(docs) == 50 and all(isinstance(d, str) and d for d in docs)


def test_adapter_layers_show_their_base_and_bias():
    from mpolab_moe import peft as mpeft
    from mpolab_moe.peft import IA3Layer, LoRALayer

    model = mpeft.get_model(tiny_bert(), mpeft.IA3Config())
    ia3 = [m for m in model.modules() if isinstance(m, IA3Layer)]
    assert ia3
    for layer in ia3:
        assert layer.bias is layer.base_layer.bias  # the base layer's own bias, not a copy
        assert "IA3Layer" in repr(layer) and "feedforward" in layer.extra_repr()
    lora = mpeft.get_model(tiny_bert(), mpeft.LoRAConfig(r=2))
    layer = next(m for m in lora.modules() if isinstance(m, LoRALayer))
    assert layer.bias is layer.base_layer.bias
