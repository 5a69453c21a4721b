"""``mpolab.allocator.keep_freed_memory``: freed large blocks are reused, no page fault per fresh tensor."""

import subprocess
import sys
import textwrap

import pytest

from mpolab.allocator import _glibc, keep_freed_memory

# Allocates and writes a 32 MB tensor 10 times and prints the minor page faults it took. The
# setting is process-wide and permanent, so each measurement runs in a fresh interpreter.
PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from mpolab.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    for _ in range(2):  # the first ones fault in any case
        torch.empty(8 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(8 * 2**20).fill_(1.0)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only (this machine and CI run Linux with glibc)")
def test_freed_large_blocks_are_reused_instead_of_faulting_in_again() -> None:
    _, default = _faults("default")
    applied, kept = _faults("keep")
    assert applied == "True"
    pages = 10 * 32 * 2**20 // 4096  # what faulting in every fresh tensor costs
    assert default > pages // 2, default  # glibc maps each 32 MB block fresh by default
    assert kept < pages // 5, kept  # at most one of the ten blocks


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(TypeError, match="must be an int"):
        keep_freed_memory(2.0**30)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[1 MiB, 2\*\*31 - 1\]"):
        keep_freed_memory(2**31)
    with pytest.raises(ValueError, match="got 4096"):
        keep_freed_memory(4096)
