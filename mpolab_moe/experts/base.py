"""The expert-bank interface and the grouped matrix product every bank uses.

An expert bank computes ``E`` experts on tokens that the :class:`~mpolab_moe.MoE` layer has
already sorted by expert: ``x [N, d_in]`` holds ``counts[0]`` rows for expert 0, then
``counts[1]`` rows for expert 1, and so on. The bank returns ``[N, d_out]`` in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ExpertBank", "check_ffn_weights", "expand_per_row", "grouped_matmul", "use_padded_bmm"]

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


def check_ffn_weights(
    w1: Tensor, w2: Tensor, w_gate: Tensor | None = None, b1: Tensor | None = None, b2: Tensor | None = None
) -> tuple[int, int, int]:
    """Validate one FFN in ``nn.Linear`` layout; returns ``(F, d, d_out)``.

    ``w1 [F, d]`` up projection, ``w2 [d_out, F]`` down projection, ``w_gate [F, d]``, ``b1 [F]``, ``b2 [d_out]``.
    """
    if not isinstance(w1, Tensor) or not isinstance(w2, Tensor) or w1.dim() != 2 or w2.dim() != 2:
        shapes = [tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__ for w in (w1, w2)]
        raise ValueError(f"w1 must be [F, d] and w2 [d_out, F] matrices, got {shapes[0]} and {shapes[1]}")
    F_, d = w1.shape
    if w2.shape[1] != F_:
        raise ValueError(f"w2 {tuple(w2.shape)} does not take w1's {F_} hidden units (expected [d_out, {F_}])")
    if w_gate is not None and w_gate.shape != w1.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} must have w1's shape {tuple(w1.shape)}")
    if b1 is not None and b1.shape != (F_,):
        raise ValueError(f"b1 must be [{F_}], got {tuple(b1.shape)}")
    if b2 is not None and b2.shape != (w2.shape[0],):
        raise ValueError(f"b2 must be [{w2.shape[0]}], got {tuple(b2.shape)}")
    return F_, d, w2.shape[0]


def expand_per_row(values: Tensor, counts: Sequence[int]) -> Tensor:
    """``values [E, ...]`` repeated ``counts[e]`` times: one row per sorted token, ``[N, ...]``."""
    repeats = torch.as_tensor(counts, device=values.device)
    return values.repeat_interleave(repeats, dim=0, output_size=int(sum(counts)))


def use_padded_bmm(x: Tensor, counts: Sequence[int]) -> bool:
    """Whether :func:`grouped_matmul` pads the groups into one ``bmm`` rather than one GEMM per group.

    Only on accelerators, where one kernel beats ``E`` launches, and only when the groups are
    nearly balanced (padding adds at most :data:`PAD_OVERHEAD` of the rows). On CPU one ``mm`` /
    ``addmm`` per group is faster: no padding copy, no masked rows, bias fused (measured in
    ``benchmarks/bench_moe.py``: padded ``bmm`` made Switch 1.5x slower than a per-expert loop).
    """
    E, N = len(counts), x.shape[0]
    return x.device.type != "cpu" and E > 1 and max(counts) * E <= (1 + PAD_OVERHEAD) * N


def grouped_matmul(x: Tensor, weight: Tensor, counts: Sequence[int], bias: Tensor | None = None) -> Tensor:
    """``out[rows of e] = x[rows of e] @ weight[e] (+ bias[e])`` for contiguous groups.

    Args:
        x: ``[N, a]`` rows sorted by group.
        weight: ``[E, a, b]``.
        counts: ``E`` group sizes summing to ``N``.
        bias: optional ``[E, b]``, added to each group's rows (fused into the GEMM).

    Returns:
        ``[N, b]``.

    One GEMM per non-empty group on views of ``x`` (no copies of the weights, no masks), or one
    padded ``bmm`` on accelerators when the groups are nearly balanced (:func:`use_padded_bmm`).
    """
    E = weight.shape[0]
    if len(counts) != E:
        raise ValueError(f"counts has {len(counts)} groups, weight has {E}")
    if bias is not None and bias.shape != (E, weight.shape[-1]):
        raise ValueError(f"bias must be [E={E}, {weight.shape[-1]}], got {tuple(bias.shape)}")
    N = x.shape[0]
    if N == 0:
        return x.new_zeros(0, weight.shape[-1])
    if use_padded_bmm(x, counts):
        return _padded_bmm(x, weight, counts, max(counts), bias)
    chunks = torch.split(x, list(counts))
    # unbind, not weight[e]: its backward stacks the E gradients once instead of materialising a
    # zero-filled [E, a, b] gradient per expert (which made training 2x slower than a loop over
    # separate nn.Linear experts in benchmarks/bench_moe.py)
    weights = weight.unbind(0)
    if bias is None:
        parts = [chunk @ weights[e] for e, chunk in enumerate(chunks) if chunk.shape[0]]
    else:
        biases = bias.unbind(0)
        parts = [torch.addmm(biases[e], chunk, weights[e]) for e, chunk in enumerate(chunks) if chunk.shape[0]]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _padded_bmm(x: Tensor, weight: Tensor, counts: Sequence[int], largest: int, bias: Tensor | None) -> Tensor:
    E = weight.shape[0]
    if all(c == largest for c in counts):
        padded = x.view(E, largest, -1)
        out = torch.bmm(padded, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), padded, weight)
        return out.reshape(x.shape[0], -1)
    group = torch.repeat_interleave(torch.arange(E, device=x.device), torch.as_tensor(counts, device=x.device))
    starts = torch.as_tensor([0, *counts[:-1]], device=x.device).cumsum(0)
    position = torch.arange(x.shape[0], device=x.device) - starts[group]
    padded = x.new_zeros(E, largest, x.shape[1])
    padded[group, position] = x
    out = torch.bmm(padded, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), padded, weight)
    return out[group, position]
