"""``ExpertParallelBank``: this rank's experts, and the all-to-all that brings them their tokens.

:class:`~mpolab_moe.MoE` hands the bank its tokens, the token of each routed row with the rows
sorted by global expert, their combine weights and ``counts [E]``. The rows of the experts
another rank owns are contiguous, so one exchange sends each rank its rows:

1. ``all_gather`` of a small int64 vector per rank: its ``counts [E]``, its routing statistics,
   its capacity and the layer's configuration fingerprint (a mismatch raises ``ValueError`` on
   every rank at once, naming the field). Every rank then knows how many rows each source sends
   each of its experts, and the global ``tokens_per_expert``.
2. ``all_to_all_single`` of the rows (*dispatch*). Dropless: variable split sizes, exactly the
   routed rows. With a capacity (GShard): fixed split sizes, ``capacity`` rows per expert padded
   with zeros, so the exchanged shapes do not depend on the routing; the padded buffer is
   gathered straight from the tokens (no sorted copy padded afterwards).
3. The local bank runs on the received rows, which arrive grouped (source rank, local expert).
   An FFN bank (dense, sliced, MPO: :attr:`ExpertParallelBank.takes_order`) reads each local
   expert's rows where they arrived (one slice per source) and writes its output rows back
   there (:func:`~mpolab_moe.experts.base.grouped_ffn`'s ``order``): no regrouped copy either
   way. Other banks (LoRA, IA3) take the rows regrouped by local expert and give them back.
4. ``all_to_all_single`` back (*combine*), in the dispatch's order; the bank weights the returned
   rows and adds them to their tokens (with a capacity, reading the padded buffer where it
   arrived: the padding rows weigh 0).

The backward is the reverse exchange of both. An expert's owner receives the gradient of every
rank's loss; the gradient convention (see :func:`mpolab_moe.parallel.expert_parallel`) wants the
per-expert tensors' gradient divided by the group size and the replicated ones (MPOE's central
tensors) not. The factor is applied inside the graph, on whichever side touches fewer numbers
this forward: on the per-expert tensors' gradients, or on the gradient rows entering the local
bank (``/ world``, ``* world`` on the rows leaving it and on the replicated tensors' gradients).
On the rows' side the factor rides on a pass that happens anyway: inside the FFN banks' weight
GEMMs (``weight_grad_scale``, the GEMM's ``alpha``), or on the regrouping of the received rows
for the other banks; so most banks take it: dense experts hold far more numbers than the rows
they see (a hook dividing every expert weight's gradient was most of the exchange's cost), and
LoRA / IA3 banks have no trainable replicated tensor to correct.
"""

from __future__ import annotations

import inspect
import time
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call

from ..experts.base import BankOutput, ExpertBank, FFNBank
from ..rows import combine_rows, place_rows, scale_gradient, take_rows, unused_rows
from .collectives import ByteCounter, GroupRef, all_gather_rows, all_to_all, group_rank, group_size

__all__ = ["ExpertParallelBank", "collective_device"]


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
        #: the local bank reads its rows in any order (an FFN bank whose ``forward`` takes ``order``
        #: and ``weight_grad_scale``): the received rows are not regrouped (module doc)
        self.takes_order = isinstance(local, FFNBank) and {"order", "weight_grad_scale"} <= set(
            inspect.signature(type(local).forward).parameters
        )

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
        y, _ = self.exchange_forward(x, None, None, list(counts), capacity=None, stats=[], config=[])
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
        tokens: Tensor,
        token: Tensor | None,
        weight: Tensor | None,
        counts: list[int],
        *,
        capacity: int | None,
        stats: Sequence[int],
        config: Sequence[tuple[str, int]],
    ) -> tuple[Tensor, Tensor]:
        """Run this layer's routed rows on their owners, bring the results back and combine them.

        Args:
            tokens: ``[T, d]`` the layer's tokens.
            token: ``[N]`` the token of each routed row, the rows sorted by global expert
                (``counts[e]`` rows for expert ``e``); ``None``: ``tokens`` are those rows.
            weight: ``[N]`` each row's combine weight; ``None``: no combine (see Returns).
            counts: ``E`` rows per expert.
            capacity: ``None`` (dropless, variable split sizes) or the per-expert capacity of
                this rank's batch (fixed split sizes: the largest capacity of the group).
            stats: this rank's ints to sum over the group (the layer's dropped / unrouted / tokens).
            config: ``(name, value)`` pairs of the layer's configuration that every rank must share.

        Returns:
            ``[T, d_out]``, each token's rows' outputs weighted and summed (``weight=None``:
            ``[N, d_out]``, the rows' outputs in their sorted order), and ``[E + len(stats)]``
            int64: the group's rows per expert and ``stats`` summed.

        With a capacity the padded send buffer is gathered straight from ``tokens`` and the
        combine reads the returned buffer where it arrived (padding rows weigh 0): no sorted
        copy of the rows is padded on the way out nor unpadded on the way back.
        """
        E, W = self.num_experts, self.world
        if len(counts) != E:
            raise ValueError(f"counts has {len(counts)} entries, the expert-parallel bank routes {E} experts")
        if weight is not None and token is None:
            raise ValueError(
                "exchange_forward: a combine weight needs token, the token of each row (token=None: no combine)"
            )
        checks = [*config, *self.fingerprint()]
        checks.append(("exchange mode (dropless or capacity)", int(capacity is not None)))
        checks.append(("number of statistics", len(stats)))
        row = [*counts, *stats, -1 if capacity is None else int(capacity), *(v for _, v in checks)]
        device = tokens.device if tokens.device.type != "cpu" else collective_device(self.group)
        table = self._gather_table(row, device)
        self._check_agreement(table, [n for n, _ in checks], E + len(stats) + 1)
        totals = table[:, : E + len(stats)].sum(0)
        lo, hi, El = self.lo, self.hi, self.hi - self.lo
        recv_counts = table[:, lo:hi]  # [W, El]: rows each source sends each of my experts
        starts = self.starts
        dev = tokens.device
        if capacity is None:
            per_rank = [sum(counts[starts[r] : starts[r + 1]]) for r in range(W)]
            send, recv = per_rank, recv_counts.sum(1).tolist()
            seg_start = (recv_counts.flatten().cumsum(0) - recv_counts.flatten()).view(W, El)
            out_x = tokens if token is None else tokens.index_select(0, token)
            slot, slot_pad, slot_token = None, None, None
        else:
            C = int(table[:, E + len(stats)].max())
            counts_t = torch.tensor(counts, dtype=torch.int64)
            group_start = counts_t.cumsum(0) - counts_t
            expert_of_row = torch.repeat_interleave(torch.arange(E), counts_t)
            num_rows = int(counts_t.sum())
            slot = (expert_of_row * C + torch.arange(num_rows) - group_start[expert_of_row]).to(dev)
            slot_pad = unused_rows(slot, E * C)
            slot_token = None
            if token is None:
                out_x = place_rows(tokens, slot, slot_pad, E * C)  # padded to C rows per expert
            elif tokens.shape[0]:  # one gather from the tokens, the padding rows zeroed (row 0 read for them)
                slot_token = token.new_zeros(E * C).index_copy_(0, slot, token)
                out_x = tokens.index_select(0, slot_token)
                if slot_pad is not None:  # in place: index_select's backward does not read its result
                    out_x.index_fill_(0, slot_pad, 0.0)
            else:  # no token to read row 0 from; still in the graph, for the backward exchange
                out_x = place_rows(tokens.index_select(0, token), slot, slot_pad, E * C)
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
        if self.takes_order:
            back = self._ordered_forward(received, local_counts, None if identity else gather)
        else:
            back = self._regrouped_forward(received, local_counts, None if identity else gather)
        returned = all_to_all(back, recv, send, group=group, name="combine", counter=self.counter)
        if slot is None:  # dropless: the returned rows are in the sorted order
            y, y_token, y_weight = returned, token, weight
        elif slot_token is not None and weight is not None:  # where it arrived: padding rows are 0 and weigh 0
            y, y_token, y_weight = returned, slot_token, weight.new_zeros(E * C).index_copy(0, slot, weight)
        else:
            y, y_token, y_weight = take_rows(returned, slot, slot_pad), token, weight
        if y_token is None or y_weight is None:
            return y, totals
        return combine_rows(y, y_token, y_weight, tokens.shape[0]), totals

    def _ordered_forward(self, received: Tensor, counts: list[int], order: Tensor | None) -> Tensor:
        """The local FFN bank on the rows where they arrived: ``received [M, d]`` -> ``[M, d_out]``.

        Each local expert gathers its rows by ``order`` (``None``: already in order) and writes its
        output rows back to the same places (padding rows 0): no regrouped copy of the rows either
        way. The rows' side of the gradient scaling is the bank's ``weight_grad_scale`` (inside
        its GEMMs, no pass of its own).
        """
        if not sum(counts):
            return self._idle_output(received, received.shape[0])
        side = self._gradient_side(0)
        return self._local_forward(received, counts, side, order=order)

    def _regrouped_forward(self, received: Tensor, counts: list[int], gather: Tensor | None) -> Tensor:
        """Any local bank: the received rows regrouped by local expert (``gather``; ``None``: already
        grouped), the bank on them, its output put back in the received order (padding rows 0)."""
        identity = gather is None
        num_received = received.shape[0]
        side = self._gradient_side(0 if not identity else sum(counts))  # moved rows: scaled for free
        row_scale = float(self.world) if side == "rows" else 1.0
        # dropless: ``gather`` is a permutation of the received rows; capacity: the real rows, not the padding
        gather_pad = None if gather is None else unused_rows(gather, num_received)
        if gather is None:
            rows = received if row_scale == 1.0 else scale_gradient(received, row_scale)
        else:
            rows = take_rows(received, gather, gather_pad, grad_scale=row_scale)
        y_local = self._local_forward(rows, counts, side) if rows.shape[0] else self._idle_output(rows, 0)
        if gather is None:
            return y_local if row_scale == 1.0 else scale_gradient(y_local, 1.0 / row_scale)
        return place_rows(y_local, gather, gather_pad, num_received, grad_scale=1.0 / row_scale)

    def _idle_output(self, rows: Tensor, num_rows: int) -> Tensor:
        """``[num_rows, d_out]`` zeros for a rank whose experts received no row.

        Nothing to compute, but the graph must look as if: the received rows (so the dispatch's
        backward exchange runs here as on every other rank) and every parameter (DDP expects their
        gradients; Adam steps them with zeros as it does in one process) stay in it.
        """
        out = rows.new_zeros(num_rows, self.out_features)
        if torch.is_grad_enabled():
            tied = [rows.sum()] + [p.sum().to(rows.dtype) for p in self.local.parameters() if p.requires_grad]
            out = out + 0 * torch.stack(tied).sum()
        return out

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

    def _local_forward(self, rows: Tensor, counts: list[int], side: str | None, order: Tensor | None = None) -> Tensor:
        """The local bank on ``rows``; the parameters' side of the gradient scaling (module doc).

        ``side="rows"``: the rows' gradient is divided by the group size ``W`` on its way in (by the
        row moves, or, for a bank that takes an ``order``, inside its GEMMs), so the replicated
        tensors' gradient is multiplied back by ``W``; ``"parameters"``: the per-expert tensors'
        gradient is divided by ``W``; ``None``: nothing to do. ``order``: passed to a bank that
        takes one (:attr:`takes_order`).
        """
        kwargs: dict[str, Any] = {"order": order} if self.takes_order else {}
        if side is None:
            return self.local(rows, counts, **kwargs)
        W = self.world
        if side == "rows" and self.takes_order:
            kwargs["weight_grad_scale"] = 1.0 / W
        swap = {
            name: scale_gradient(p, W if side == "rows" else 1.0 / W)
            for name, p in self.local.named_parameters()
            if p.requires_grad and (name in self.expert_names) == (side == "parameters")
        }
        if swap:
            return functional_call(self.local, swap, (rows, counts), kwargs)
        return self.local(rows, counts, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, experts=[{self.lo}, {self.hi}) on rank {self.rank} of {self.world}, "
            f"placement={list(self.placement)}"
        )
