"""``ExpertParallelBank``: this rank's experts, and the all-to-all that brings them their tokens.

:class:`~mpolab_moe.MoE` sorts its routed rows by global expert and hands them to the bank with
``counts [E]``. The rows of the experts another rank owns are contiguous, so one exchange sends
each rank its rows:

1. ``all_gather`` of a small int64 vector per rank: its ``counts [E]``, its routing statistics,
   its capacity and the layer's configuration fingerprint (a mismatch raises ``ValueError`` on
   every rank at once, naming the field). Every rank then knows how many rows each source sends
   each of its experts, and the global ``tokens_per_expert``.
2. ``all_to_all_single`` of the rows (*dispatch*). Dropless: variable split sizes, exactly the
   routed rows. With a capacity (GShard): fixed split sizes, ``capacity`` rows per expert padded
   with zeros, so the exchanged shapes do not depend on the routing.
3. The local bank runs on the received rows regrouped by local expert (its own ``counts``).
4. ``all_to_all_single`` back (*combine*), in the dispatch's order.

The backward is the reverse exchange of both. An expert's owner receives the gradient of every
rank's loss; the gradient convention (see :func:`mpolab_moe.parallel.expert_parallel`) wants the
per-expert tensors' gradient divided by the group size and the replicated ones (MPOE's central
tensors) not. The factor is applied inside the graph, on whichever side touches fewer numbers
this forward: on the per-expert tensors' gradients, or on the gradient rows entering the local
bank (``/ world``, ``* world`` on the rows leaving it and on the replicated tensors' gradients).
On the rows' side the factor rides on the regrouping of the received rows (no pass of its own),
so most banks take it: dense experts hold far more numbers than the rows they see (a hook
dividing every expert weight's gradient was most of the exchange's cost), and LoRA / IA3 banks
have no trainable replicated tensor to correct.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call

from ..experts.base import BankOutput, ExpertBank
from .collectives import ByteCounter, GroupRef, all_gather_rows, all_to_all, group_rank, group_size

__all__ = ["ExpertParallelBank", "collective_device", "place_rows", "scale_gradient", "take_rows", "unused_rows"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _placed(x: Tensor, index: Tensor, pad: Tensor | None, size: int) -> Tensor:
    """``[size, ...]``: row ``index[i]`` = ``x[i]``, the ``pad`` rows zero.

    A gather through the inverse index, not a scatter: on the CPU ``index_select`` moves rows
    about 3x faster than ``index_copy_`` (2 MB of rows: 70 us against 220 us on one core).
    """
    if x.shape[0] == 0:
        return x.new_zeros(size, *x.shape[1:])
    source = index.new_zeros(size)  # the pad rows read row 0, then are zeroed
    source[index] = torch.arange(index.numel(), device=index.device)
    out = x.index_select(0, source)
    if pad is not None and pad.numel():
        out.index_fill_(0, pad, 0)
    return out


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: Tensor, index: Tensor, pad: Tensor | None, grad_scale: float) -> Tensor:
        ctx.save_for_backward(index, pad)
        ctx.size, ctx.grad_scale = y.shape[0], grad_scale
        return y.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        index, pad = ctx.saved_tensors
        out = _placed(grad, index, pad, ctx.size)
        return (out if ctx.grad_scale == 1.0 else out.mul_(ctx.grad_scale)), None, None, None


class _PlaceRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, pad: Tensor | None, size: int, grad_scale: float) -> Tensor:
        ctx.save_for_backward(index)
        ctx.grad_scale = grad_scale
        return _placed(x, index, pad, size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (index,) = ctx.saved_tensors
        out = grad.index_select(0, index)
        return (out if ctx.grad_scale == 1.0 else out.mul_(ctx.grad_scale)), None, None, None, None


def unused_rows(index: Tensor, size: int) -> Tensor | None:
    """The rows of ``[0, size)`` that ``index`` (distinct row ids) leaves out, or ``None`` when it covers all."""
    if index.numel() == size:
        return None
    free = torch.ones(size, dtype=torch.bool, device=index.device)
    free[index] = False
    return free.nonzero().squeeze(1)


def take_rows(y: Tensor, index: Tensor, pad: Tensor | None = None, *, grad_scale: float = 1.0) -> Tensor:
    """``y[index]`` for distinct row ids ``index``; the backward writes the gradient rows back in place.

    Args:
        y: ``[m, ...]``.
        index: ``[n]`` distinct row ids of ``y`` (a permutation when ``n == m``).
        pad: the rows of ``y`` that ``index`` leaves out (:func:`unused_rows`); their gradient is 0.
        grad_scale: the gradient is multiplied by it on its way back (in the same pass).

    ``index_select``'s own backward zero-fills an ``[m, ...]`` buffer and scatter-adds into it (its
    index could repeat); with distinct ids one scatter and a zero-fill of the ``pad`` rows do.
    """
    if torch.is_grad_enabled() and y.requires_grad:
        out: Tensor = _TakeRows.apply(y, index, pad, float(grad_scale))
        return out
    return y.index_select(0, index)


def place_rows(x: Tensor, index: Tensor, pad: Tensor | None, size: int, *, grad_scale: float = 1.0) -> Tensor:
    """``[size, ...]`` with row ``index[i]`` = ``x[i]`` and the ``pad`` rows zero; the backward is a gather.

    Args:
        x: ``[n, ...]``.
        index: ``[n]`` distinct row ids in ``[0, size)``.
        pad: every other row id (:func:`unused_rows`), or ``None`` when ``index`` covers them all.
        size: rows of the result.
        grad_scale: the gradient is multiplied by it on its way back (in the same pass).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        out: Tensor = _PlaceRows.apply(x, index, pad, size, float(grad_scale))
        return out
    return _placed(x, index, pad, size)


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged in the forward; its gradient multiplied by ``factor`` in the backward.

    Examples:
        >>> w = torch.ones(2, requires_grad=True)
        >>> scale_gradient(w, 0.25).sum().backward()
        >>> w.grad
        tensor([0.2500, 0.2500])
    """
    out: Tensor = _ScaleGradient.apply(x, float(factor))
    return out


def collective_device(group: Any = None) -> torch.device:
    """Where the group's collectives want their tensors: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ExpertParallelBank(ExpertBank):
    """The experts ``placement``-owned by this rank of ``group``, standing in for a bank of ``num_experts``.

    Build it with :func:`mpolab_moe.parallel.expert_parallel`, not directly.

    Args:
        local: the bank of this rank's experts (``placement[rank]`` of them).
        num_experts: ``E``, the experts of the whole group.
        placement: experts per rank, summing to ``E``; rank ``r`` owns a contiguous range.
        group: the expert-parallel process group (``None``: the default group).
        expert_names: names of ``local``'s per-expert tensors (the others are replicated).

    Attributes:
        local: this rank's bank.
        lo, hi: the global ids of this rank's experts, ``[lo, hi)``.
        counter: a :class:`ByteCounter` the exchange adds its bytes to, or ``None``.
        last_local_counts: rows each local expert received in the last forward.

    Examples:
        >>> moe = expert_parallel(MoE(TopKGate(64, 8), DenseExperts(64, 256, 8)))  # doctest: +SKIP
        >>> moe.experts.local.num_experts, moe.experts.lo        # rank 1 of 2  # doctest: +SKIP
        (4, 4)
    """

    def __init__(
        self,
        local: ExpertBank,
        *,
        num_experts: int,
        placement: Sequence[int],
        group: Any = None,
        expert_names: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self._group = GroupRef(group)  # by name: the layer must not keep a destroyed group alive
        self.world, self.rank = group_size(group), group_rank(group)
        self.placement = tuple(int(n) for n in placement)
        if len(self.placement) != self.world or sum(self.placement) != num_experts:
            raise ValueError(f"placement {list(self.placement)} must give {self.world} ranks {num_experts} experts")
        self.starts = [sum(self.placement[:r]) for r in range(self.world + 1)]
        self.lo, self.hi = self.starts[self.rank], self.starts[self.rank + 1]
        if local.num_experts != self.hi - self.lo:
            raise ValueError(
                f"the local bank has {local.num_experts} experts; rank {self.rank} owns {self.hi - self.lo}"
            )
        self.local = local
        self.num_experts, self.in_features, self.out_features = num_experts, local.in_features, local.out_features
        self.expert_names = frozenset(expert_names)
        self.counter: ByteCounter | None = None
        #: rows each local expert received in the last forward
        self.last_local_counts: list[int] = [0] * local.num_experts
        #: where to divide the experts' gradient by the group size (module doc): ``"auto"`` (the
        #: side touching fewer numbers, per forward), ``"rows"`` or ``"parameters"``; the same result
        self.scale_gradients_on = "auto"
        #: where the last training forward divided it: ``"rows"``, ``"parameters"`` (or ``None``)
        self.gradient_scaling: str | None = None

    @property
    def group(self) -> Any:
        """The expert-parallel process group (``None``: the default group)."""
        return self._group.get()

    @property
    def output_kind(self) -> BankOutput:  # type: ignore[override]
        """The local bank's :class:`BankOutput`."""
        return self.local.output_kind

    @property
    def output_bias(self) -> Tensor | None:
        """The local bank's output bias (replicated on every rank)."""
        return self.local.output_bias

    def fingerprint(self) -> list[tuple[str, int]]:
        """What every rank must agree on about this bank (name, value)."""
        kind = f"{type(self.local).__qualname__}:{self.local.extra_repr()}"
        # the local bank's repr names its own expert count, which may differ with uneven placement
        kind = kind.replace(f"num_experts={self.local.num_experts}", "")
        return [
            ("num_experts", self.num_experts),
            ("in_features", self.in_features),
            ("out_features", self.out_features),
            ("placement", zlib.crc32(repr(self.placement).encode())),
            ("bank", zlib.crc32(kind.encode())),
        ]

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x [N, d]`` sorted by global expert, ``counts [E]`` -> ``[N, d_out]`` (dropless exchange)."""
        y, _ = self.exchange_forward(x, list(counts), capacity=None, stats=[], config=[])
        return y

    # ------------------------------------------------------------------ the exchange
    def _gather_table(self, row: list[int], device: torch.device) -> Tensor:
        """``all_gather`` of one int64 row per rank -> ``[world, len(row)]`` on the CPU."""
        mine = torch.tensor(row, dtype=torch.int64, device=device)
        start = time.perf_counter()
        table = all_gather_rows(mine, self.group, "routing counts and configuration").cpu()
        if self.counter is not None:
            per_rank = [len(row)] * self.world
            self.counter.add("routing table", per_rank, 8, self.rank, time.perf_counter() - start, per_rank)
        return table

    def _check_agreement(self, table: Tensor, names: list[str], first: int) -> None:
        block = table[:, first : first + len(names)]
        differs = (block != block[0]).any(0)
        if not bool(differs.any()):  # one test per forward; the loop below only names the culprit
            return
        for c, name in enumerate(names):
            column = table[:, first + c]
            if bool(differs[c]):
                values = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(column.tolist()))
                raise ValueError(
                    f"expert-parallel MoE: the ranks disagree on {name} ({values}); every rank of the expert group "
                    "must build the same layer (gate, k, capacity_factor, experts, placement) and be in the same "
                    "train/eval mode"
                )

    def exchange_forward(
        self,
        x: Tensor,
        counts: list[int],
        *,
        capacity: int | None,
        stats: Sequence[int],
        config: Sequence[tuple[str, int]],
    ) -> tuple[Tensor, Tensor]:
        """Run this layer's routed rows on their owners and bring the results back.

        Args:
            x: ``[N, d]`` rows sorted by global expert (``counts[e]`` rows for expert ``e``).
            counts: ``E`` rows per expert.
            capacity: ``None`` (dropless, variable split sizes) or the per-expert capacity of
                this rank's batch (fixed split sizes: the largest capacity of the group).
            stats: this rank's ints to sum over the group (the layer's dropped / unrouted / tokens).
            config: ``(name, value)`` pairs of the layer's configuration that every rank must share.

        Returns:
            ``y [N, d_out]`` in ``x``'s order, and ``[E + len(stats)]`` int64: the group's tokens
            per expert and ``stats`` summed.
        """
        E, W = self.num_experts, self.world
        if len(counts) != E:
            raise ValueError(f"counts has {len(counts)} entries, the expert-parallel bank routes {E} experts")
        checks = [*config, *self.fingerprint()]
        checks.append(("exchange mode (dropless or capacity)", int(capacity is not None)))
        checks.append(("number of statistics", len(stats)))
        row = [*counts, *stats, -1 if capacity is None else int(capacity), *(v for _, v in checks)]
        table = self._gather_table(row, x.device if x.device.type != "cpu" else collective_device(self.group))
        self._check_agreement(table, [n for n, _ in checks], E + len(stats) + 1)
        totals = table[:, : E + len(stats)].sum(0)
        lo, hi, El = self.lo, self.hi, self.hi - self.lo
        recv_counts = table[:, lo:hi]  # [W, El]: rows each source sends each of my experts
        starts = self.starts
        dev = x.device
        if capacity is None:
            per_rank = [sum(counts[starts[r] : starts[r + 1]]) for r in range(W)]
            send, recv = per_rank, recv_counts.sum(1).tolist()
            seg_start = (recv_counts.flatten().cumsum(0) - recv_counts.flatten()).view(W, El)
            out_x, slot, slot_pad = x, None, None
        else:
            C = int(table[:, E + len(stats)].max())
            counts_t = torch.tensor(counts, dtype=torch.int64)
            group_start = counts_t.cumsum(0) - counts_t
            expert_of_row = torch.repeat_interleave(torch.arange(E), counts_t)
            slot = (expert_of_row * C + torch.arange(x.shape[0]) - group_start[expert_of_row]).to(dev)
            slot_pad = unused_rows(slot, E * C)
            out_x = place_rows(x, slot, slot_pad, E * C)  # padded to C rows per expert
            send = [self.placement[r] * C for r in range(W)]
            recv = [El * C] * W
            seg_start = (torch.arange(W * El) * C).view(W, El)
        # the received rows are grouped (source, local expert); the local bank wants (local expert, source)
        lengths = recv_counts.t().flatten()
        begins = seg_start.t().flatten()
        offsets = lengths.cumsum(0) - lengths
        gather = (torch.repeat_interleave(begins - offsets, lengths) + torch.arange(int(lengths.sum()))).to(dev)
        local_counts = recv_counts.sum(0).tolist()
        self.last_local_counts = local_counts
        # one local expert and no padding: the received rows are already in the local bank's order
        identity = El == 1 and slot is None
        group = self.group
        received = all_to_all(out_x, send, recv, group=group, name="dispatch", counter=self.counter)
        # The experts' gradient is divided by the group size on the rows' side or the parameters' (module
        # doc). Rows' side: the gradient entering the local bank / W, leaving it * W, folded into the moves.
        side = self._gradient_side(0 if not identity else sum(local_counts))  # moved rows: scaled for free
        row_scale = float(W) if side == "rows" else 1.0
        # dropless: ``gather`` is a permutation of the received rows; capacity: the real rows, not the padding
        gather_pad = None if identity else unused_rows(gather, received.shape[0])
        if identity:
            rows = received if row_scale == 1.0 else scale_gradient(received, row_scale)
        else:
            rows = take_rows(received, gather, gather_pad, grad_scale=row_scale)
        if rows.shape[0]:
            y_local = self._local_forward(rows, local_counts, side)
        else:
            # Nothing to compute, but the graph must look as if: the received rows (so the dispatch's
            # backward exchange runs here as on every other rank) and every parameter (DDP expects
            # their gradients; Adam steps them with zeros as it does in one process) stay in it.
            y_local = rows.new_zeros(0, self.out_features)
            if torch.is_grad_enabled():
                tied = [rows.sum()] + [p.sum().to(rows.dtype) for p in self.local.parameters() if p.requires_grad]
                y_local = y_local + 0 * torch.stack(tied).sum()
        if identity:
            back = y_local if row_scale == 1.0 else scale_gradient(y_local, 1.0 / row_scale)
        else:
            back = place_rows(y_local, gather, gather_pad, received.shape[0], grad_scale=1.0 / row_scale)
        returned = all_to_all(back, recv, send, group=group, name="combine", counter=self.counter)
        y = returned if slot is None else take_rows(returned, slot, slot_pad)
        return y, totals

    def _gradient_side(self, num_rows: int) -> str | None:
        """Where this forward divides the experts' gradient by the group size: ``"rows"``, ``"parameters"``,
        or ``None`` (one rank, or no gradient). ``num_rows``: rows the rows' side would scale in a
        pass of its own (0 when the scaling rides on the rows' regrouping)."""
        if self.world == 1 or not torch.is_grad_enabled():
            return None
        on = self.scale_gradients_on
        if on not in ("auto", "rows", "parameters"):
            raise ValueError(f"scale_gradients_on must be 'auto', 'rows' or 'parameters', got {on!r}")
        if on == "auto":
            expert_numbers = shared_numbers = 0
            for name, p in self.local.named_parameters():
                if p.requires_grad:
                    if name in self.expert_names:
                        expert_numbers += p.numel()
                    else:
                        shared_numbers += p.numel()
            rows_side = num_rows * (self.in_features + self.out_features) + shared_numbers
            on = "rows" if rows_side < expert_numbers else "parameters"
        self.gradient_scaling = on
        return on

    def _local_forward(self, rows: Tensor, counts: list[int], side: str | None) -> Tensor:
        """The local bank on ``rows [n, d]``; the parameters' side of the gradient scaling (module doc).

        ``side="rows"``: the rows' gradient is already divided by the group size ``W`` on its way in,
        so the replicated tensors' gradient is multiplied back by ``W``; ``"parameters"``: the
        per-expert tensors' gradient is divided by ``W``; ``None``: nothing to do.
        """
        if side is None:
            return self.local(rows, counts)
        W = self.world
        swap = {
            name: scale_gradient(p, W if side == "rows" else 1.0 / W)
            for name, p in self.local.named_parameters()
            if p.requires_grad and (name in self.expert_names) == (side == "parameters")
        }
        return functional_call(self.local, swap, (rows, counts)) if swap else self.local(rows, counts)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, experts=[{self.lo}, {self.hi}) on rank {self.rank} of {self.world}, "
            f"placement={list(self.placement)}"
        )
