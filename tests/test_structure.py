"""Package structure: no import cycles between modules, no private names imported across modules.

Imports are read with ``ast`` (module level and inside functions alike), so a lazy import does
not hide a cycle. Scoped to ``mpolab`` for now; add ``"mpolab_moe"`` to ``PACKAGES`` to check it too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["mpolab", "mpolab_moe"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """``[(imported module, [imported names])]`` for every import statement of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(s, []) for s in submodules]
            found.append((target, [n for n in names if f"{target}.{n}" not in known]))
    return found


def _graph(packages: list[str]) -> tuple[dict[str, set[str]], list[str]]:
    """Import edges between modules (a package's ``__init__`` excluded as a target) and private imports."""
    modules = {name: path for pkg in packages for name, path in _modules(pkg).items()}
    known = set(modules)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for target, names in _imports(module, path, known):
            if target not in known or target == module:
                continue
            if target not in packages:  # importing from a package's __init__ is the public API
                edges[module].add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    private.append(f"{module} imports {target}.{n}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], dict.fromkeys(edges, 0), []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state[n] == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif state[n] == 0:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if state[m] == 0:
            visit(m)
    return cycles


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    edges, _ = _graph([package])
    assert _cycles(edges) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_imported_across_modules(package):
    _, private = _graph([package])
    assert private == []


def test_mpolab_never_imports_mpolab_moe():
    modules = _modules("mpolab")
    imported = {t for m, p in modules.items() for t, _ in _imports(m, p, set(modules))}
    assert not any(t == "mpolab_moe" or t.startswith("mpolab_moe.") for t in imported)


def test_no_dynamic_imports():
    """No ``importlib.import_module`` / ``__import__`` to hide a dependency (``importlib.resources`` is fine)."""
    for path in _modules("mpolab").values():
        text = path.read_text(encoding="utf-8")
        assert "import_module" not in text and "__import__(" not in text, path


def test_the_checker_sees_cycles_and_private_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from .a import _hidden\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    edges, private = _graph(["pkg"])
    assert _cycles(edges) and private == ["pkg.b imports pkg.a._hidden"]
