"""The command-line cases of issue 13: user errors are one line and a non-zero exit, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mpolab
from mpolab.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    folder = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the model is loaded or compressed."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the user error was reported")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)


def test_garbage_config_json(hf_folder, capsys, no_work):
    (hf_folder / "config.json").write_text("{ not json")
    assert_one_line_error(*run(capsys, "compress", str(hf_folder), "--ratio", "0.5"), "config.json is not valid JSON")


def test_folder_without_weights(hf_folder, capsys, no_work):
    (hf_folder / "model.safetensors").unlink()
    assert_one_line_error(*run(capsys, "compress", str(hf_folder), "--ratio", "0.5"), "holds no weights")


def test_pickled_weights_are_refused(hf_folder, capsys, no_work):
    (hf_folder / "model.safetensors").rename(hf_folder / "pytorch_model.bin")
    assert_one_line_error(*run(capsys, "compress", str(hf_folder), "--ratio", "0.5"), "only pickled weights")


def test_plot_into_a_missing_folder(hf_folder, tmp_path, capsys, no_work):
    pytest.importorskip("matplotlib")
    code, err = run(capsys, "compress", str(hf_folder), "--ratio", "0.5", "--plot", str(tmp_path / "nope" / "a.png"))
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--ratio", "inf"], "ratio must be a finite number"), (["--ratio", "0.5", "--threads", "0"], "--threads")],
)
def test_bad_options_before_loading(hf_folder, capsys, no_work, flags, message):
    assert_one_line_error(*run(capsys, "compress", str(hf_folder), *flags), message)


def test_remote_code_is_never_run_nor_prompted(hf_folder, capsys):
    config = json.loads((hf_folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    config["model_type"] = "evil-model"
    (hf_folder / "config.json").write_text(json.dumps(config))
    (hf_folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    code, err = run(capsys, "compress", str(hf_folder), "--ratio", "0.5")
    assert_one_line_error(code, err, "cannot load a model from")


def test_inspect_refuses_what_load_refuses(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    mpolab.compress(model, "all-linear", max_rank=3)
    mpolab.save(model, tmp_path)
    record = json.loads((tmp_path / "mpolab_config.json").read_text())
    record["modules"]["0"]["bias"] = False  # the file still holds 0.bias
    (tmp_path / "mpolab_config.json").write_text(json.dumps(record))
    assert_one_line_error(*run(capsys, "inspect", str(tmp_path)), "without bias")
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    raw[-2] ^= 1
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    assert_one_line_error(*run(capsys, "inspect", str(tmp_path)), "is not the file that was saved")


def test_compress_threads_option_restores_the_count(hf_folder, tmp_path, capsys):
    before = torch.get_num_threads()
    code = main(["compress", str(hf_folder), "--ratio", "0.5", "--threads", "1", "--no-progress"])
    assert code == 0 and torch.get_num_threads() == before
