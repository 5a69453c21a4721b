"""The mpolab (files, targets, threads) cases of issue 13, one test each (all failed before the fix)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mpolab
from mpolab import MPOEmbedding
from mpolab.io import CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME, read_checked, safe_hf_config
from mpolab.targets import find_targets
from mpolab.utils import threads


def embedding_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(24, 12, padding_idx=3), nn.Linear(12, 8))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = embedding_model()
    embedding = model[0]
    assert isinstance(embedding, nn.Embedding)
    model[0] = MPOEmbedding.from_embedding(embedding, num_cores=3, max_rank=4)
    mpolab.save(model, tmp_path)
    return tmp_path


def edit_record(folder: Path, **changes: object) -> None:
    record = json.loads((folder / CONFIG_NAME).read_text())
    record["modules"]["0"].update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(record))


# ----------------------------------------------------------------------------- corrupted tensor bytes


def test_corrupted_tensor_bytes_are_refused_naming_the_file(saved):
    raw = bytearray((saved / WEIGHTS_NAME).read_bytes())
    raw[-5] ^= 0xFF  # a float in the last tensor: still a readable safetensors file
    (saved / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} is not the file that was saved"):
        mpolab.load(saved, base=embedding_model())
    mpolab.load(saved, base=embedding_model(), verify=False)  # the opt-out for huge files


def test_the_hash_is_recorded(saved):
    record = json.loads((saved / CONFIG_NAME).read_text())
    assert len(record["weights_sha256"]) == 64
    record["weights_sha256"] = "not a hash"
    (saved / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="weights_sha256 must be 64 lowercase hex digits"):
        mpolab.load(saved, base=embedding_model())


def test_folders_saved_without_a_hash_still_load(saved):
    record = json.loads((saved / CONFIG_NAME).read_text())
    del record["weights_sha256"]
    (saved / CONFIG_NAME).write_text(json.dumps(record))
    mpolab.load(saved, base=embedding_model())


# ----------------------------------------------------------------------------- padding_idx


@pytest.mark.parametrize("padding_idx", [24, 1000, -25])
def test_padding_idx_outside_the_vocabulary_is_refused(saved, padding_idx):
    edit_record(saved, padding_idx=padding_idx)
    with pytest.raises(ValueError, match=f"padding_idx={padding_idx} is outside the vocabulary of 24"):
        mpolab.load(saved, base=embedding_model())


def test_negative_padding_idx_counts_from_the_end(saved):
    edit_record(saved, padding_idx=-21)
    assert mpolab.load(saved, base=embedding_model())[0].padding_idx == 3


def test_mpo_embedding_checks_padding_idx():
    with pytest.raises(ValueError, match="outside the vocabulary of 24"):
        MPOEmbedding(24, 12, padding_idx=24)


# ----------------------------------------------------------------------------- header before allocation


def test_edited_ranks_fail_before_any_allocation(saved, monkeypatch):
    edit_record(saved, ranks=[100_000, 100_000])  # would be 10^10-entry cores
    calls: list[tuple[object, ...]] = []
    real = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(ValueError, match=r"'0.cores.0' has shape .*records \(1, \d+, \d+, 100000\)"):
        mpolab.load(saved, base=embedding_model())
    assert not calls


def test_read_checked_refuses_what_load_refuses(saved):
    edit_record(saved, dtype="float16")
    for reader in (read_checked, lambda p: mpolab.load(p, base=embedding_model())):
        with pytest.raises(ValueError, match="float32 cores, but mpolab_config.json records torch.float16"):
            reader(saved)


# ----------------------------------------------------------------------------- code-loading config fields


def test_hub_kernel_attention_and_auto_map_are_ignored(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    mpolab.compress(model, "all-linear", max_rank=2)
    mpolab.save(model, tmp_path)
    hf = json.loads((tmp_path / HF_CONFIG_NAME).read_text())
    hf |= {"attn_implementation": "kernels-community/flash-attn", "auto_map": {"AutoModel": "x.Y"}}
    (tmp_path / HF_CONFIG_NAME).write_text(json.dumps(hf))
    with pytest.warns(UserWarning, match="ignoring attn_implementation='kernels-community/flash-attn'"):
        loaded = mpolab.load(tmp_path)
    assert loaded.config._attn_implementation in ("eager", "sdpa")
    x = torch.randint(0, 32, (1, 4))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_safe_hf_config_cleans_nested_configs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = safe_hf_config(
            {"auto_map": {}, "attn_implementation": "sdpa", "text_config": {"_attn_implementation": "hub/kernel"}}
        )
    assert clean == {"attn_implementation": "sdpa", "text_config": {}}


# ----------------------------------------------------------------------------- targets that cannot be MPOs


def test_zero_width_and_one_by_one_layers_are_skipped_by_name():
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 16), nn.Linear(1, 1))
    with pytest.warns(UserWarning, match=r"'0': its matrix \[8, 0\] is empty.*'2': its matrix \[1, 1\]"):
        assert list(find_targets(model)) == ["1"]
    with pytest.raises(ValueError, match=r"cannot compress '2': its matrix \[1, 1\]"):
        find_targets(model, ["2"])
    with pytest.raises(ValueError, match="none of the 1 matched layer"):
        find_targets(nn.Sequential(nn.Linear(1, 1)))


def test_compress_names_a_zero_width_layer():
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 16))
    with pytest.warns(UserWarning, match="'0': its matrix"):
        report = mpolab.compress(model, "all-linear", max_rank=2)
    assert [r.name for r in report.layers] == ["1"]


# ----------------------------------------------------------------------------- threads


def test_threads_sets_and_restores():
    before = torch.get_num_threads()
    with threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads(None) as n:
        assert n == before
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with threads(0):
            pass
