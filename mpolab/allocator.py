"""CPU training without a page fault on every fresh large tensor: ``keep_freed_memory()``.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands blocks above its mmap
threshold (128 KiB, adapting up to 32 MiB) straight from the kernel and returns them on ``free``,
so every training step that allocates the same large tensors again (rebuilt MPO weights
``[E, out, in]``, their gradients, activations, the optimiser's temporaries) takes one page fault
per 4 KiB page and the kernel zero-fills each page: allocating and writing a 75 MB tensor takes
~32 ms that way against ~3 ms from reused memory (measured on this project's 2-core CI machine).
CUDA's caching allocator never has this cost; on CPU, jemalloc or tcmalloc (``LD_PRELOAD``), or
glibc's own settings, remove it. :func:`keep_freed_memory` applies glibc's settings from Python,
for the current process only: freed blocks stay in the process for the next allocation of that
size (the resident memory stays at its peak, as with CUDA's caching allocator).

Examples:
    >>> import mpolab.allocator
    >>> mpolab.allocator.keep_freed_memory()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory(max_block_bytes: int = _INT_MAX) -> bool:
    """Make glibc keep freed memory for reuse instead of giving it back to the kernel.

    Sets ``M_MMAP_THRESHOLD`` (blocks up to ``max_block_bytes`` come from the heap, not from a
    fresh ``mmap``) and ``M_TRIM_THRESHOLD`` (the heap is not trimmed until ``max_block_bytes``
    are free at its top) with ``mallopt``; the same as starting Python with the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``. Call it once, before
    training; it affects this process only and cannot be undone.

    Args:
        max_block_bytes: the largest block kept for reuse (default and maximum ``2**31 - 1``,
            what ``mallopt``'s ``int`` holds); larger tensors are still mapped fresh.

    Returns:
        ``True`` when applied; ``False`` when the C library is not glibc (macOS, Windows, musl):
        nothing changed (use jemalloc or tcmalloc there).

    Raises:
        TypeError: ``max_block_bytes`` is not an int.
        ValueError: ``max_block_bytes`` is not in ``[1 MiB, 2**31 - 1]``.

    Examples:
        >>> keep_freed_memory()  # doctest: +SKIP
        True
    """
    if isinstance(max_block_bytes, bool) or not isinstance(max_block_bytes, int):
        raise TypeError(f"max_block_bytes must be an int, got {type(max_block_bytes).__name__}")
    if not 2**20 <= max_block_bytes <= _INT_MAX:
        raise ValueError(f"max_block_bytes must be in [1 MiB, 2**31 - 1] bytes, got {max_block_bytes}")
    libc = _glibc()
    if libc is None:
        return False
    value = ctypes.c_int(max_block_bytes)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, value))
