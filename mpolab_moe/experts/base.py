"""The expert-bank interface and the grouped matrix product every bank uses.

An expert bank computes ``E`` experts on tokens that the :class:`~mpolab_moe.MoE` layer has
already sorted by expert: ``x [N, d_in]`` holds ``counts[0]`` rows for expert 0, then
``counts[1]`` rows for expert 1, and so on. The bank returns ``[N, d_out]`` in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ExpertBank", "grouped_matmul", "expand_per_row"]

#: Padded ``bmm`` is used when padding every group to the largest adds at most this fraction of rows.
PAD_OVERHEAD = 0.25


class ExpertBank(nn.Module):
    """Base class of expert banks.

    Subclasses set ``num_experts``, ``in_features`` and ``out_features`` and implement
    :meth:`forward`. A bank that can merge its experts' parameters before touching the tokens
    (MoV, MoLoRA) also implements :meth:`forward_soft`; the layer calls it for soft routing.
    """

    num_experts: int
    in_features: int
    out_features: int

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:  # pragma: no cover - interface
        """``x [N, d_in]`` sorted by expert, ``counts[e]`` rows each -> ``[N, d_out]``."""
        raise NotImplementedError

    def forward_soft(self, x: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - interface
        """``x [T, d_in]``, ``weight [T, E]`` -> ``[T, d_out]``: the weighted sum over all experts."""
        raise NotImplementedError

    @property
    def supports_soft(self) -> bool:
        return type(self).forward_soft is not ExpertBank.forward_soft

    @property
    def output_bias(self) -> Tensor | None:
        """A bias added once per token after combining (e.g. a dense FFN's b2 shared by sliced experts)."""
        return None


def expand_per_row(values: Tensor, counts: Sequence[int]) -> Tensor:
    """``values [E, ...]`` repeated ``counts[e]`` times: one row per sorted token, ``[N, ...]``."""
    repeats = torch.as_tensor(counts, device=values.device)
    return values.repeat_interleave(repeats, dim=0, output_size=int(sum(counts)))


def grouped_matmul(x: Tensor, weight: Tensor, counts: Sequence[int]) -> Tensor:
    """``out[rows of e] = x[rows of e] @ weight[e]`` for contiguous groups.

    Args:
        x: ``[N, a]`` rows sorted by group.
        weight: ``[E, a, b]``.
        counts: ``E`` group sizes summing to ``N``.

    Returns:
        ``[N, b]``.

    One padded ``bmm`` when the groups are nearly balanced (padding adds at most
    :data:`PAD_OVERHEAD` of the rows), else one GEMM per non-empty group on views of ``x`` (no
    copies of the weights, no masks; see ``benchmarks/bench_moe.py``).
    """
    E = weight.shape[0]
    if len(counts) != E:
        raise ValueError(f"counts has {len(counts)} groups, weight has {E}")
    N = x.shape[0]
    if N == 0:
        return x.new_zeros(0, weight.shape[-1])
    largest = max(counts)
    if E > 1 and largest * E <= (1 + PAD_OVERHEAD) * N:
        return _padded_bmm(x, weight, counts, largest)
    parts = [chunk @ weight[e] for e, chunk in enumerate(torch.split(x, list(counts))) if chunk.shape[0]]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _padded_bmm(x: Tensor, weight: Tensor, counts: Sequence[int], largest: int) -> Tensor:
    E = weight.shape[0]
    if all(c == largest for c in counts):
        return torch.bmm(x.view(E, largest, -1), weight).reshape(x.shape[0], -1)
    group = torch.repeat_interleave(torch.arange(E, device=x.device), torch.as_tensor(counts, device=x.device))
    starts = torch.as_tensor([0, *counts[:-1]], device=x.device).cumsum(0)
    position = torch.arange(x.shape[0], device=x.device) - starts[group]
    padded = x.new_zeros(E, largest, x.shape[1])
    padded[group, position] = x
    return torch.bmm(padded, weight)[group, position]
