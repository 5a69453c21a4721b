"""Small shared pieces both packages use: argument checks, module surgery, atomic file writes.

Everything here is public and documented so that ``mpolab`` and ``mpolab_moe`` never reach
into each other's private names. Nothing here knows about MPOs or experts.

Examples:
    >>> from mpolab.utils import check_positive_int, set_submodule, atomic_files
    >>> check_positive_int(8, "num_experts")
    8
    >>> with atomic_files("out/") as files:
    ...     files.write_text("config.json", "{}")
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from torch import nn

__all__ = [
    "AtomicFiles",
    "atomic_files",
    "check_choice",
    "check_fraction",
    "check_non_negative_float",
    "check_positive_float",
    "check_positive_int",
    "is_conv1d",
    "set_submodule",
    "threads",
    "with_threads_option",
]


# ----------------------------------------------------------------------------- argument checks


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> int:
    """``value`` as an ``int >= 1``; ``TypeError`` for a non-int (bools included), ``ValueError`` below 1.

    Examples:
        >>> check_positive_int(0, "k")
        Traceback (most recent call last):
        ValueError: k must be a positive int (>= 1), got 0
    """
    if value is None and allow_none:
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int):
        what = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value}")
    return value


def _real(value: object, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite ({what}), got {value}")
    return float(value)


def check_positive_float(value: object, name: str) -> float:
    """``value`` as a finite float ``> 0``."""
    v = _real(value, name, "a finite number > 0")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return v


def check_non_negative_float(value: object, name: str) -> float:
    """``value`` as a finite float ``>= 0``."""
    v = _real(value, name, "a finite number >= 0")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def check_fraction(value: object, name: str, *, closed: bool = False) -> float:
    """``value`` as a float in ``(0, 1)`` (or ``[0, 1]`` with ``closed=True``)."""
    interval = "[0, 1]" if closed else "(0, 1)"
    v = _real(value, name, f"a number in {interval}")
    inside = 0 <= v <= 1 if closed else 0 < v < 1
    if not inside:
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return v


def check_choice(value: object, name: str, choices: tuple[object, ...]) -> object:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


# ----------------------------------------------------------------------------- threads


@contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous count afterwards.

    ``None`` keeps the current count. On a busy machine fewer threads can be much faster: spinning
    threads that wait for a busy core made ``heal`` 1.8x slower with 2 threads than with 1. Yields
    the count in effect (for reports: timings mean little without it).

    Raises:
        TypeError, ValueError: ``n`` is not ``None`` or an int >= 1.

    Examples:
        >>> with threads(1) as n:
        ...     report = mpolab.compress(model, "all-linear", ratio=0.5)
    """
    if n is None:
        yield torch.get_num_threads()
        return
    check_positive_int(n, "threads")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


P = ParamSpec("P")
R = TypeVar("R")


def with_threads_option(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` under :func:`threads` of its keyword argument ``threads`` (``None``: unchanged).

    For functions that declare ``threads: int | None = None`` as a keyword-only parameter and
    document it; the body itself need not use it.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        n = kwargs.get("threads")
        with threads(n if n is None else check_positive_int(n, "threads")):
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- module surgery


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``"encoder.layer.0.output.dense"``) with ``module``.

    Raises:
        AttributeError: a parent on the path does not exist (from ``get_submodule``).
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ----------------------------------------------------------------------------- atomic files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class AtomicFiles:
    """Files written to temporaries in one folder, moved into place only when all are complete.

    Use through :func:`atomic_files`. Temporaries live in the target folder (same file system,
    so ``os.replace`` is atomic), are named ``.NAME.*.tmp`` (no ``*.safetensors`` glob sees them),
    get the permissions a plain ``open`` would (``0666 & ~umask``) and are fsynced before the move.
    Files are moved in the order they were written, so write the file that marks a folder as
    complete (a JSON record) last.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def path(self, name: str) -> Path:
        """A fresh temporary path that becomes ``folder / name`` on success; write it yourself."""
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=f".{name}.", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
        os.chmod(tmp, 0o666 & ~_umask())
        self._pending.append((tmp, self.folder / name))
        return tmp

    def write_text(self, name: str, text: str) -> None:
        """Write ``text`` (UTF-8) as ``name``."""
        with open(self.path(name), "w", encoding="utf-8") as f:
            f.write(text)

    def write_with(self, name: str, writer: Callable[[str], object]) -> None:
        """Write ``name`` by calling ``writer(temporary_path)`` (e.g. ``safetensors.torch.save_file``)."""
        writer(str(self.path(name)))

    def _commit(self) -> None:
        mode = 0o666 & ~_umask()
        for tmp, _ in self._pending:
            os.chmod(tmp, mode)  # again: a writer may have replaced the file (safetensors writes 0600)
            _fsync(tmp)
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def _abort(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def atomic_files(folder: str | os.PathLike[str]) -> Iterator[AtomicFiles]:
    """Write several files into ``folder`` so that an error leaves the previous files untouched.

    The folder is created if missing (``ValueError`` if ``folder`` exists and is not a folder).
    On a clean exit every file is fsynced and moved into place in write order; on any exception
    the temporaries are removed and the exception propagates.

    Examples:
        >>> with atomic_files("out/") as files:
        ...     files.write_with("model.safetensors", lambda p: safetensors.torch.save_file(tensors, p))
        ...     files.write_text("config.json", json.dumps(record))
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write to {path}: it exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    files = AtomicFiles(path)
    try:
        yield files
    except BaseException:
        files._abort()
        raise
    files._commit()
