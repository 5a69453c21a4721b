"""The ``mpolab`` command line: compress, inspect, demo, errors and ``python -m mpolab``."""

import subprocess
import sys

import pytest
import torch

import mpolab
from mpolab import cli
from mpolab.demo import run_demo
from mpolab.nn import mpo_modules

from ._hf import tiny_bert


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny random BERT saved as a local Hugging Face folder (what ``mpolab compress PATH`` takes)."""
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    tiny_bert().save_pretrained(folder)
    return folder


def test_compress_prints_table_saves_and_reloads(bert_folder, tmp_path, capsys):
    out = tmp_path / "out"
    plot = tmp_path / "spectra.png"
    code = cli.main(
        [
            "compress",
            str(bert_folder),
            "--ratio",
            "0.5",
            "--out",
            str(out),
            "--plot",
            str(plot),
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in text and "saved to" in text
    assert plot.stat().st_size > 10_000  # a real PNG with two panels, not an empty file
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = mpolab.load(out)
    layers = mpo_modules(model)
    assert len(layers) == 13  # 6 linear layers per block, 2 blocks, and the pooler
    kept = sum(m.num_mpo_params() for m in layers.values())
    dense = sum(m.in_features * m.out_features for m in layers.values())
    assert kept <= 0.5 * dense + 1


def test_inspect_summarises_saved_model(bert_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compress", str(bert_folder), "--max-rank", "4", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "13 MPO layers" in text
    assert "32x64" in text and "64x32" in text  # true shapes from the JSON record, not padded ones
    assert "encoder.layer.1.output.dense" in text


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["compress", str(tmp_path / "nope"), "--ratio", "0.5"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "mpolab_config.json" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):  # argparse: a budget is required, exactly one
        cli.main(["compress", "demo", "--ratio", "0.5", "--rel-tol", "0.1"])


def test_python_dash_m_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "mpolab", "--help"], capture_output=True, text=True, check=True)
    for command in ("compress", "inspect", "demo"):
        assert command in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "mpolab", "compress", "--help"], capture_output=True, text=True, check=True
    )
    assert "--ratio" in result.stdout and "--plot" in result.stdout and "--out" in result.stdout


def test_demo_runs_on_the_real_minilm_and_heals(capsys):
    figures = run_demo(ratio=0.5, steps=6, num_train=32, num_eval=12, progress=False)
    text = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in text and "after healing" in text
    heal = figures["heal"]
    assert 0.0 < heal.fidelity_before < 1.0
    assert heal.fidelity_after > heal.fidelity_before  # six distillation steps already help
    assert figures["report"].ratio <= 0.5 + 1e-6


# ---------------------------------------------------------------------------- regressions


def test_all_linear_mixes_with_other_targets(bert_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compress", str(bert_folder), "--max-rank", "4", "--targets", "all-linear", "word_embeddings"]
    assert cli.main([*args, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    layers = mpo_modules(mpolab.load(out))
    assert len(layers) == 14 and "embeddings.word_embeddings" in layers  # 13 linear layers and the embedding


def test_missing_matplotlib_fails_before_any_work(bert_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    args = ["compress", str(bert_folder), "--ratio", "0.5", "--out", str(out), "--plot", str(tmp_path / "p.png")]
    assert cli.main([*args, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err
    assert "targets:" not in captured.out and not out.exists()  # nothing was compressed or written


def test_the_model_is_saved_before_the_plot_is_drawn(bert_folder, tmp_path, capsys, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise ValueError("plotting failed")

    monkeypatch.setattr(cli, "_plot", broken_plot)
    out = tmp_path / "out"
    args = ["compress", str(bert_folder), "--max-rank", "4", "--out", str(out), "--plot", str(tmp_path / "p.png")]
    assert cli.main([*args, "--no-progress"]) == 2
    assert "plotting failed" in capsys.readouterr().err
    assert len(mpo_modules(mpolab.load(out))) == 13


def test_inspect_help_shows_single_percent_signs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "90% / 99%" in text and "%%" not in text


def test_demo_data_free_flag_reaches_run_demo(monkeypatch):
    import mpolab.demo

    seen: dict = {}
    monkeypatch.setattr(mpolab.demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--data-free", "--steps", "3", "--no-progress"]) == 0
    assert seen["calibrated"] is False and seen["steps"] == 3 and seen["progress"] is False
    seen.clear()
    assert cli.main(["demo", "--steps", "3"]) == 0
    assert seen["calibrated"] is True
