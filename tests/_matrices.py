"""Test matrices with known structure."""

import torch


def decaying_matrix(rows: int, cols: int, decay: float = 0.05, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A matrix whose MPO bond spectra decay (a random MPO plus a little noise), unlike a Gaussian matrix."""
    import mpolab

    base = mpolab.decompose(torch.randn(rows, cols, dtype=dtype), max_rank=6).to_matrix()
    base = base / base.norm()
    noise = torch.randn(rows, cols, dtype=dtype)
    return base + decay * noise / noise.norm()
