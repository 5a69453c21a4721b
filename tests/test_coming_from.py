"""docs/coming-from.md: every python block runs, in order, in one namespace (in a temporary folder)."""

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parent.parent / "docs" / "coming-from.md"

pytest.importorskip("peft")
pytest.importorskip("tltorch")


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def test_the_page_has_the_names_table_and_the_differences():
    text = PAGE.read_text(encoding="utf-8")
    for needle in ("| you write", "Capacity per batch", "Jitter on the router input only", "fp32 routers"):
        assert needle in text, needle
    assert len(_blocks()) >= 5


def test_every_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": "coming_from"}
    try:
        for i, block in enumerate(_blocks()):
            exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "peft refuses" in out and "transformers refuses" in out and "tensorly's rank list" in out
