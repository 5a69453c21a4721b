"""The API reference pages list every public module, and the nav lists every page."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _public_modules(package: str) -> set[str]:
    module = importlib.import_module(package)
    names = {package}
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.add(info.name)
    return names


@pytest.mark.parametrize("package", ["mpolab", "mpolab_moe"])
def test_reference_page_lists_every_public_module(package: str) -> None:
    page = (ROOT / "docs" / "reference" / f"{package}.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: ([\w.]+)$", page, flags=re.MULTILINE))
    expected = _public_modules(package)
    assert listed == expected, f"missing {sorted(expected - listed)}, stale {sorted(listed - expected)}"


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    missing = sorted(p for p in pages if p not in nav)
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing}"
