"""HF save_pretrained / from_pretrained for compressed, moefied and adapted models (mpolab.hub, mpolab_moe.hub).

Every folder either round-trips exactly through mpolab's loaders or is refused by transformers
with an error; none loads into random weights.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, BertModel, GPT2LMHeadModel

import mpolab
import mpolab_moe
from mpolab_moe import peft as mpeft
from mpolab_moe.convert import moefy as moefy_unrecorded
from tests._hf import inputs_for, main_output, tiny_bert, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


def _out(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model, model(**inputs_for(family)))


def _refused_by_transformers(folder: Path, model_class: type, loader: str) -> None:
    with pytest.raises(ValueError, match="model type `mpolab`"):
        AutoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="model type `mpolab`"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(AttributeError, match=f"load it with {loader}"):  # the class's own from_pretrained
        model_class.from_pretrained(folder)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_compressed_model_round_trips_and_transformers_refuses(tmp_path, family):
    torch.manual_seed(0)
    model = tiny_bert() if family == "bert" else tiny_gpt2()
    mpolab.compress(model, "all-linear", max_rank=4)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "mpolab_config.json"} <= files
    record = json.loads((tmp_path / "mpolab_config.json").read_text())
    assert record["modules"] and record["model_class"] == f"transformers.{type(model).__name__}"
    _refused_by_transformers(tmp_path, type(model), "mpolab.from_pretrained")

    loaded = mpolab.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert set(mpolab.nn.mpo_modules(loaded)) == set(record["modules"])
    torch.testing.assert_close(_out(loaded, family), _out(model, family), rtol=0, atol=0)


def test_sharded_save_writes_an_index_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    mpolab.compress(model, ["c_fc", "mlp.c_proj"], max_rank=4)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = set(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.startswith("model-0") for f in files) > 1
    loaded = mpolab.from_pretrained(tmp_path)
    torch.testing.assert_close(_out(loaded, "gpt2"), _out(model, "gpt2"), rtol=0, atol=0)


def test_plain_models_save_as_before_and_push_to_hub_in_save_is_refused(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "bert"
    assert not (tmp_path / "plain" / "mpolab_config.json").exists()
    mpolab.compress(model, ["query"], max_rank=2)
    with pytest.raises(ValueError, match=r"save_pretrained\(push_to_hub=True\) is refused"):
        model.save_pretrained(tmp_path / "c", push_to_hub=True)


def test_damaged_or_mismatched_folders_are_errors(tmp_path):
    model = tiny_bert()
    mpolab.compress(model, ["query"], max_rank=2)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "mpolab_config.json").read_text())
    record["modules"].pop(next(iter(record["modules"])))  # one MPO layer fewer than the tensors hold
    (tmp_path / "mpolab_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match the model it describes: missing"):
        mpolab.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="options \\['moefy'\\]"):
        mpolab.from_pretrained(tmp_path, moefy={})


@pytest.mark.parametrize("experts", ["dense", "mpo"])
def test_moefied_model_round_trips_and_transformers_refuses(tmp_path, experts):
    torch.manual_seed(0)
    model = tiny_gpt2()
    mpolab_moe.moefy(model, layers=[-1], num_experts=4, experts=experts)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "mpolab_config.json").read_text())
    assert record["moe"]["moefy"] == [{"layers": [-1], "num_experts": 4, "experts": experts}]
    _refused_by_transformers(tmp_path, GPT2LMHeadModel, "mpolab_moe.from_pretrained")
    extension = mpolab.hub._EXTENSIONS.pop("moe")  # as if mpolab_moe were not imported
    try:
        with pytest.raises(ValueError, match="records 'moe' layers .* mpolab_moe.from_pretrained"):
            mpolab.from_pretrained(tmp_path)
    finally:
        mpolab.hub.register_extension(extension)
    loaded = mpolab_moe.from_pretrained(tmp_path)
    assert set(mpolab_moe.moe_layers(loaded)) == set(mpolab_moe.moe_layers(model))
    torch.testing.assert_close(_out(loaded, "gpt2"), _out(model, "gpt2"), rtol=0, atol=0)


def test_unrecorded_moefy_needs_its_arguments(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    moefy_unrecorded(model, layers=[0], num_experts=2, experts="dense")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"pass mpolab_moe.from_pretrained\(folder, moefy="):
        mpolab_moe.from_pretrained(tmp_path)
    loaded = mpolab_moe.from_pretrained(tmp_path, moefy={"layers": [0], "num_experts": 2, "experts": "dense"})
    torch.testing.assert_close(_out(loaded, "gpt2"), _out(model, "gpt2"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="replaying moefy built MoE layers"):
        mpolab_moe.from_pretrained(tmp_path, moefy={"layers": [1], "num_experts": 2, "experts": "dense"})


def test_adapted_model_saves_the_adapter_only(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert()
    model = mpeft.get_peft_model(copy.deepcopy(base), mpeft.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.1)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="this model has mpolab adapters"):  # HF's own save, called explicitly
        BertModel.save_pretrained(model, tmp_path / "whole")
    loaded = mpolab_moe.from_pretrained(tmp_path, base=copy.deepcopy(base))
    torch.testing.assert_close(_out(loaded, "bert"), _out(model, "bert"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass base="):
        mpolab_moe.from_pretrained(tmp_path)
    merged = model.merge_and_unload()
    assert "save_pretrained" not in vars(merged)  # HF's save_pretrained again
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_out(again, "bert"), _out(loaded, "bert"), rtol=1e-5, atol=1e-5)


def test_the_hook_is_installed_when_mpolab_is_imported_before_transformers():
    code = (
        "import mpolab, sys; assert 'transformers.modeling_utils' not in sys.modules; "
        "from transformers import PreTrainedModel; assert PreTrainedModel.save_pretrained._mpolab_hook"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=120)
