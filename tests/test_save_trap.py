"""A folder written by mpolab.save never loads into random weights through transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import mpolab


def _tiny_bert() -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_compressed_model_saved_by_mpolab_is_refused_by_transformers_and_loads_exactly(tmp_path) -> None:
    model = _tiny_bert()
    mpolab.compress(model, "all-linear", max_rank=4, progress=False)
    mpolab.save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mpolab" and config["mpolab_model_type"] == "bert"
    with pytest.raises((ValueError, AttributeError, TypeError), match="mpolab"):
        transformers.AutoModel.from_pretrained(tmp_path)
    with pytest.raises((ValueError, AttributeError, TypeError), match="mpolab"):
        transformers.BertModel.from_pretrained(tmp_path)
    loaded = mpolab.load(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)
    # the same folder through the transformers-style loader
    again = mpolab.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)


def test_plain_model_saved_by_mpolab_stays_a_plain_transformers_folder(tmp_path) -> None:
    model = _tiny_bert()
    mpolab.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_marking_round_trips() -> None:
    config = {"model_type": "llama", "dtype": "float32", "hidden_size": 8}
    marked = mpolab.io.mark_hf_config(config)
    assert marked["model_type"] == "mpolab" and "mpolab" in marked["dtype"]
    assert mpolab.io.mark_hf_config(marked) == marked
    assert mpolab.io.unmark_hf_config(marked) == config
