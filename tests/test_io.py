"""mpolab.save / mpolab.load: round trips, atomic writes, clear errors, no decomposition, no pickle."""

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2LMHeadModel

import mpolab
from mpolab.io import CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME
from mpolab.nn import mpo_modules

from ._hf import FAMILIES, inputs_for, main_output


def _output(name: str, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model, model(**inputs_for(name)))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (compressed model, its output, saved folder)} for tiny BERT and GPT-2."""
    out = {}
    for name in ("bert", "gpt2"):
        torch.manual_seed(0)
        model = FAMILIES[name]()
        mpolab.compress(model, target_modules="all-linear", max_rank=4)
        folder = mpolab.save(model, tmp_path_factory.mktemp(name) / "saved")
        out[name] = (model, _output(name, model), folder)
    return out


@pytest.fixture
def bert_copy(saved, tmp_path):
    """A private copy of the saved BERT folder, free to corrupt."""
    return Path(shutil.copytree(saved["bert"][2], tmp_path / "bert"))


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_round_trip_into_fresh_base(saved, name):
    model, expected, folder = saved[name]
    base = FAMILIES[name]()
    loaded = mpolab.load(folder, base)
    assert loaded is base
    assert torch.equal(_output(name, loaded), expected)
    got, want = mpo_modules(loaded), mpo_modules(model)
    assert list(got) == list(want) and len(got) > 0
    for n, layer in got.items():
        assert isinstance(layer, mpolab.MPOLinear)
        assert (layer.ranks, layer.in_factors, layer.out_factors) == (
            want[n].ranks,
            want[n].in_factors,
            want[n].out_factors,
        )
    assert not loaded.training  # the base's (eval) mode is kept


def test_saved_files_describe_the_model(saved):
    model, _, folder = saved["gpt2"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME])
    record = json.loads((folder / CONFIG_NAME).read_text())
    assert record["format_version"] == 1 and record["mpolab_version"] == mpolab.__version__
    assert record["model_class"] == "transformers.GPT2LMHeadModel"
    layer = record["modules"]["transformer.h.0.attn.c_attn"]
    mpo = model.transformer.h[0].attn.c_attn
    assert layer["kind"] == "linear" and layer["bias"] is True and layer["dtype"] == "float32"
    assert (layer["in_features"], layer["out_features"]) == (32, 96)
    assert layer["ranks"] == list(mpo.ranks) and layer["in_factors"] == list(mpo.in_factors)
    assert json.loads((folder / HF_CONFIG_NAME).read_text())["n_embd"] == 32
    # tied lm_head / wte stored once; the cores are what `mpolab inspect` reads
    keys = safetensors.torch.load_file(folder / WEIGHTS_NAME).keys()
    assert ("lm_head.weight" in keys) != ("transformer.wte.weight" in keys)
    assert "transformer.h.0.attn.c_attn.cores.0" in keys


def test_tied_weights_stay_tied(saved):
    model, _, folder = saved["gpt2"]
    loaded = mpolab.load(folder, FAMILIES["gpt2"]())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_load_without_base_rebuilds_the_hf_model(saved):
    _, expected, folder = saved["gpt2"]
    loaded = mpolab.load(folder)
    assert type(loaded) is GPT2LMHeadModel and not loaded.training
    assert len(mpo_modules(loaded)) == 8
    torch.testing.assert_close(_output("gpt2", loaded), expected, rtol=0, atol=1e-6)


def test_load_into_an_already_compressed_base(saved):
    _, expected, folder = saved["bert"]
    base = FAMILIES["bert"]()
    mpolab.compress(base, target_modules="all-linear", max_rank=2)
    loaded = mpolab.load(folder, base)
    assert all(max(m.ranks) == 4 for m in mpo_modules(loaded).values())
    assert torch.equal(_output("bert", loaded), expected)


def test_saved_dtype_is_kept(tmp_path):
    model = nn.Sequential(mpolab.MPOLinear(12, 8, max_rank=3, num_cores=2), nn.Linear(8, 3)).double()
    mpolab.save(model, tmp_path)
    loaded = mpolab.load(tmp_path, nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 3)))
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    x = torch.randn(5, 12, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


def test_plain_sequential_round_trip(tmp_path):
    model = nn.Sequential(
        mpolab.MPOEmbedding(24, 16, max_rank=3, num_cores=2, padding_idx=0),
        mpolab.MPOLinear(16, 24, max_rank=3, num_cores=3, bias=False),
        nn.ReLU(),
        nn.Linear(24, 4),
    ).train()
    mpolab.save(model, tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert "model_class" not in record and not (tmp_path / HF_CONFIG_NAME).exists()
    assert record["modules"]["0"]["kind"] == "embedding" and record["modules"]["0"]["padding_idx"] == 0
    assert record["modules"]["1"]["bias"] is False
    base = nn.Sequential(nn.Embedding(24, 16, padding_idx=0), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    loaded = mpolab.load(tmp_path, base)
    assert isinstance(loaded[0], mpolab.MPOEmbedding) and loaded[0].padding_idx == 0
    assert isinstance(loaded[1], mpolab.MPOLinear) and loaded[1].bias is None
    assert loaded[1].ranks == model[1].ranks and loaded.training  # the base's (train) mode is kept
    ids = torch.tensor([[0, 5, 23], [1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match="base"):
        mpolab.load(tmp_path)


def test_bare_mpo_layer_and_model_without_mpo_layers(tmp_path):
    layer = mpolab.MPOLinear(16, 24, max_rank=3, num_cores=2)
    mpolab.save(layer, tmp_path / "layer")
    loaded = mpolab.load(tmp_path / "layer", nn.Linear(16, 24))
    x = torch.randn(3, 16)
    assert isinstance(loaded, mpolab.MPOLinear) and torch.equal(loaded(x), layer(x))

    dense = nn.Linear(4, 2)
    mpolab.save(dense, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / CONFIG_NAME).read_text())["modules"] == {}
    restored = mpolab.load(tmp_path / "dense", nn.Linear(4, 2))
    assert torch.equal(restored.weight, dense.weight)


def test_strict_false_skips_and_warns(tmp_path):
    mpolab.save(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), tmp_path)
    base = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"not in the model: '1\.bias', '1\.weight'"):
        mpolab.load(tmp_path, base)
    with pytest.warns(UserWarning, match="not in the model"):
        mpolab.load(tmp_path, base, strict=False)


# ---------------------------------------------------------------------------- safety


def test_load_does_not_decompose(saved, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("load must not decompose")

    monkeypatch.setattr(sys.modules["mpolab.decompose"], "decompose", boom)
    monkeypatch.setattr(sys.modules["mpolab.compress"], "decompose", boom)
    monkeypatch.setattr(sys.modules["mpolab.nn"], "decompose", boom)
    monkeypatch.setattr(torch.linalg, "svd", boom)
    _, expected, folder = saved["bert"]
    assert torch.equal(_output("bert", mpolab.load(folder, FAMILIES["bert"]())), expected)


def test_load_never_unpickles(saved, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    for target, attr in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, attr, boom)
    _, expected, folder = saved["gpt2"]
    torch.testing.assert_close(_output("gpt2", mpolab.load(folder)), expected, rtol=0, atol=1e-6)
    assert torch.equal(_output("gpt2", mpolab.load(folder, FAMILIES["gpt2"]())), expected)


def test_only_transformers_classes_are_built(bert_copy):
    record = json.loads((bert_copy / CONFIG_NAME).read_text())
    record["model_class"] = "os.system"
    (bert_copy / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="refused"):
        mpolab.load(bert_copy)
    record["model_class"] = "transformers.BertConfig"  # in transformers, but not a model
    (bert_copy / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not a transformers model class"):
        mpolab.load(bert_copy)


# ---------------------------------------------------------------------------- atomic save


def _partial_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00partial")
    raise OSError("disk full")


def _raise(*args, **kwargs):
    raise RuntimeError("interrupted")


@pytest.mark.parametrize(
    "target, attr, replacement",
    [
        (safetensors.torch, "save_file", _partial_save_file),  # while writing the tensors
        (json, "dumps", _raise),  # while writing mpolab_config.json
        (BertConfig, "to_json_string", _raise),  # while writing config.json, the last file
    ],
)
def test_failed_save_leaves_previous_files(saved, tmp_path, monkeypatch, target, attr, replacement):
    folder = mpolab.save(saved["gpt2"][0], tmp_path / "out")
    before = _snapshot(folder)
    monkeypatch.setattr(target, attr, replacement)
    with pytest.raises((OSError, RuntimeError)):
        mpolab.save(saved["bert"][0], folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before  # same names (no temp files left) and same bytes
    assert type(mpolab.load(folder)) is GPT2LMHeadModel


def test_save_overwrites_and_refuses_a_file(saved, tmp_path):
    folder = mpolab.save(saved["gpt2"][0], tmp_path / "a" / "b")  # parents created
    mpolab.save(saved["bert"][0], folder)
    assert type(mpolab.load(folder)) is BertModel
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME])
    file = tmp_path / "file.bin"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match="file.bin"):
        mpolab.save(nn.Linear(2, 2), file)
    assert file.read_bytes() == b"x"


# ---------------------------------------------------------------------------- errors


def test_missing_paths(bert_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"nope.*{WEIGHTS_NAME}.*{CONFIG_NAME}"):
        mpolab.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        mpolab.load(tmp_path / "file")
    (bert_copy / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        mpolab.load(bert_copy)
    (bert_copy / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        mpolab.load(bert_copy)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_safetensors(bert_copy, how):
    file = bert_copy / WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\xff" * 8 + data[8:])
    base = FAMILIES["bert"]()
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} is not the file that was saved"):
        mpolab.load(bert_copy, base)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}.*not a readable safetensors"):
        mpolab.load(bert_copy, base, verify=False)
    assert not mpo_modules(base)  # the base is untouched


def test_corrupt_or_unknown_config(bert_copy):
    file = bert_copy / CONFIG_NAME
    good = file.read_text()
    file.write_text(good[:-20])
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is not valid JSON"):
        mpolab.load(bert_copy)
    record = json.loads(good)
    record["format_version"] = 99
    file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="format_version 99"):
        mpolab.load(bert_copy)
    record["format_version"] = 1
    record["modules"]["encoder.layer.0.attention.self.query"]["ranks"] = [4]
    file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.query.*inconsistent"):
        mpolab.load(bert_copy)


def test_mismatched_base_is_named_and_left_untouched(saved):
    folder = saved["bert"][2]
    wider = BertModel(BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\..*out_features=32, in_features=32.*Linear.*48"):
        mpolab.load(folder, wider)
    assert not mpo_modules(wider)

    other = FAMILIES["gpt2"]()
    with pytest.raises(ValueError, match=r"no module 'encoder\.layer\.0\."):
        mpolab.load(folder, other)
    assert not mpo_modules(other)


def test_tensor_shape_mismatch_is_named_and_undone(saved):
    # Same linear layers, other vocabulary: the layers fit, the embedding tensor does not.
    base = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ValueError, match=r"'embeddings\.word_embeddings\.weight': file \(128, 32\), model \(64, 32\)"):
        mpolab.load(saved["bert"][2], base)
    assert not mpo_modules(base)


# ---------------------------------------------------------------------------- regressions


def test_saving_a_plain_model_over_a_hf_save_removes_its_config_json(saved, tmp_path):
    folder = mpolab.save(saved["bert"][0], tmp_path / "out")
    assert (folder / HF_CONFIG_NAME).is_file()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    mpolab.compress(model, "all-linear", max_rank=2)
    mpolab.save(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(3, 16)
    torch.testing.assert_close(mpolab.load(folder, base=base)(x), model(x))


def test_a_config_json_not_written_by_save_is_left_alone(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / HF_CONFIG_NAME).write_text('{"mine": true}')
    mpolab.save(nn.Sequential(nn.Linear(4, 4)), folder)
    assert (folder / HF_CONFIG_NAME).read_text() == '{"mine": true}'


def test_save_moves_the_structure_file_last(saved, tmp_path, monkeypatch):
    import os

    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    mpolab.save(saved["bert"][0], tmp_path / "out")
    assert moved == [WEIGHTS_NAME, HF_CONFIG_NAME, CONFIG_NAME]


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    model = nn.Sequential(nn.Linear(16, 16))
    mpolab.compress(model, "all-linear", max_rank=2)
    old = os.umask(0o022)
    try:
        mpolab.save(model, tmp_path)
    finally:
        os.umask(old)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_read_record_is_what_load_checks(tmp_path):
    from mpolab.io import read_record, read_tensors

    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    mpolab.compress(model, "all-linear", max_rank=3)
    mpolab.save(model, tmp_path)
    saved = read_record(tmp_path)
    assert {n: r.ranks for n, r in saved.layers.items()} == {n: m.ranks for n, m in mpo_modules(model).items()}
    assert all(r.original == "Linear" for r in saved.layers.values())
    mpo = saved.layers["0"].mpo_from(read_tensors(tmp_path))
    torch.testing.assert_close(mpo.to_matrix(), model[0].weight.detach())
    restored = mpolab.load(tmp_path, base=nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16)))
    assert restored[0].original_type == "Linear"
    (tmp_path / CONFIG_NAME).write_text('{"format_version": 1, "modules": {"0": {"kind": "conv"}}}')
    for reader in (read_record, mpolab.load):
        with pytest.raises(ValueError, match="unknown kind 'conv'"):
            reader(tmp_path)
