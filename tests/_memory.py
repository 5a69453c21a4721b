"""A test helper: make uninitialised memory visible."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def nan_filled_empty() -> Iterator[None]:
    """``torch.empty`` returns NaN-filled memory inside the block (deterministic mode's option), so a
    buffer slice that code forgets to write shows up as NaN."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
