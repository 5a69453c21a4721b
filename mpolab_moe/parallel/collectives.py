"""The collectives expert parallelism uses, with autograd and errors that name the collective.

Every collective here goes through :func:`named_collective`: a failure (a peer that died, a
process group timeout) is re-raised as :class:`CollectiveError` naming the collective, the rank
and the group size, with the original message kept. How long a rank waits for the others is the
process group's ``timeout`` (``dist.init_process_group(..., timeout=datetime.timedelta(...))``;
torch's default is 30 minutes for gloo, 10 for NCCL): that bounds a hang when one rank dies or skips
a MoE forward.

* :class:`GroupSum`: a differentiable sum over the group (backward: ``world`` times the incoming
  gradient, no collective), used by the gates for batch statistics that are global.
* :func:`all_to_all`: ``all_to_all_single`` with autograd (backward: the reverse exchange), an
  optional :class:`ByteCounter`, and the named errors in both directions.

``torch.distributed.nn.functional.all_to_all_single`` exists and works with gloo, but its
backward calls the collective inside torch, where a failure cannot be named and the bytes cannot
be counted; the autograd function here is the same exchange with those two additions.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ByteCounter",
    "CollectiveError",
    "GroupRef",
    "GroupSum",
    "default_expert_group",
    "all_gather_rows",
    "all_to_all",
    "group_rank",
    "group_size",
    "named_collective",
    "require_initialized",
]


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names it, the rank and the original error."""


def require_initialized(where: str) -> None:
    """Raise a ``RuntimeError`` saying how to start ``torch.distributed`` when it is not running."""
    if not dist.is_available():
        raise RuntimeError(f"{where} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{where} needs an initialised process group: call torch.distributed.init_process_group() first "
            "(launch with `torchrun --nproc-per-node N script.py`, which sets RANK/WORLD_SIZE/MASTER_ADDR)"
        )


class GroupRef:
    """A process group held by name and looked up on use, so that it never outlives ``destroy_process_group``.

    A layer that kept the group object itself would keep a destroyed gloo group alive until the
    interpreter exits, whose destructor then aborts the process ("terminate called without an
    active exception"). ``None`` stands for the default group. Copies share the reference.

    Examples:
        >>> ref = GroupRef(dist.new_group([0, 1]))  # doctest: +SKIP
        >>> dist.all_reduce(t, group=ref.get())      # doctest: +SKIP
    """

    def __init__(self, group: Any = None) -> None:
        self.name: str | None = None if group is None else str(group.group_name)

    def get(self) -> Any:
        """The process group (``None`` for the default group).

        Raises:
            RuntimeError: the group was destroyed.
        """
        if self.name is None:
            return None
        return dist.distributed_c10d._resolve_process_group(self.name)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupRef:
        return self

    def __repr__(self) -> str:
        return f"GroupRef({self.name or 'default'})"


_EXPERT_GROUP: dict[str, str] = {}


def default_expert_group() -> Any:
    """A process group over every rank, made once, for the expert exchange (``group=None`` means it).

    The all-to-alls run inside autograd's backward, while DDP launches its gradient all-reduces
    from hooks as buckets fill; on one shared group the two could be queued in a different order
    on different ranks. A group of their own keeps them apart. It takes the default group's
    timeout (``init_process_group(timeout=...)``); ``dist.new_group`` alone would take the
    backend's default (30 minutes for gloo). Every rank must make it at the same point: the first
    :func:`~mpolab_moe.parallel.expert_parallel` call with ``group=None`` does.
    """
    world = dist.distributed_c10d._get_default_group()
    cached = _EXPERT_GROUP.get("name")
    if cached is not None and _EXPERT_GROUP.get("world") == str(world.group_name):
        try:  # held by name only (see GroupRef): a destroyed group is made again
            group = dist.distributed_c10d._resolve_process_group(cached)  # type: ignore[arg-type]
            if dist.get_world_size(group) == dist.get_world_size():
                return group
        except RuntimeError:
            pass
    timeout = None
    try:  # the default group's timeout (private API; falls back to the backend default)
        backend = world._get_backend(torch.device("cpu" if dist.get_backend() != "nccl" else "cuda"))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError):
        timeout = None
    group = dist.new_group(list(range(dist.get_world_size())), timeout=timeout)
    _EXPERT_GROUP.update(name=str(group.group_name), world=str(world.group_name))
    return group


def group_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (``None``: the default group)."""
    return dist.get_world_size(group)


def group_rank(group: Any = None) -> int:
    """This process's rank within ``group`` (``None``: the default group)."""
    return dist.get_rank(group)


@contextlib.contextmanager
def named_collective(what: str, group: Any = None) -> Iterator[None]:
    """Re-raise a failure inside the block as :class:`CollectiveError` naming ``what``.

    Examples:
        >>> with named_collective("all_gather of routing counts (MoE layer 3)"):  # doctest: +SKIP
        ...     dist.all_gather_into_tensor(out, counts)
    """
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:  # DistBackendError, gloo/NCCL timeouts and resets are RuntimeErrors
        try:
            where = f"rank {group_rank(group)} of {group_size(group)}"
        except Exception:  # noqa: BLE001 - the group itself may be gone
            where = "this rank"
        raise CollectiveError(
            f"expert parallelism: {what} failed on {where}: {exc}. Every rank of the expert group must run "
            "the same MoE forwards and backwards in the same order; a rank that died or skipped one leaves the "
            "others waiting until the process group's timeout (init_process_group(timeout=...))"
        ) from exc


def all_gather_rows(row: Tensor, group: Any, what: str) -> Tensor:
    """Every rank's 1-D ``row [n]`` (same ``n`` on all ranks) -> ``[world, n]`` on ``row``'s device.

    Examples:
        >>> table = all_gather_rows(torch.tensor([1, 2]), None, "counts")  # doctest: +SKIP
    """
    world = group_size(group)
    flat = row.new_empty(world * row.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with named_collective(f"all_gather of {what}", group):
        gather(flat, row.contiguous(), group=group)
    return flat.view(world, row.numel())


@dataclass
class ByteCounter:
    """Bytes and time of the exchanges: what this rank sent, what left it, how long the collectives took.

    Attributes:
        sent: bytes this rank handed to ``all_to_all_single`` (every destination, itself included).
        remote: the part of ``sent`` addressed to other ranks.
        calls: number of exchanges counted.
        seconds: wall time inside the collectives (waiting for the other ranks included).
        by_name: ``sent`` per exchange name (``"dispatch"``, ``"combine"``, ``"dispatch.backward"``, ...).
        splits: ``(name, send, recv)`` rows per rank of every exchange, in order (to replay them).

    Examples:
        >>> counter = ByteCounter()
        >>> counter.add("dispatch", [3, 1], row_bytes=8, me=0, seconds=0.5)
        >>> counter.sent, counter.remote
        (32, 8)
    """

    sent: int = 0
    remote: int = 0
    calls: int = 0
    seconds: float = 0.0
    by_name: dict[str, int] = field(default_factory=dict)
    splits: list[tuple[str, list[int], list[int]]] = field(default_factory=list)

    def add(
        self,
        name: str,
        rows: Sequence[int],
        row_bytes: int,
        me: int,
        seconds: float = 0.0,
        recv: Sequence[int] | None = None,
    ) -> None:
        """Count one exchange sending ``rows[r]`` rows of ``row_bytes`` bytes to rank ``r``."""
        total = sum(rows) * row_bytes
        self.sent += total
        self.remote += total - rows[me] * row_bytes
        self.calls += 1
        self.seconds += seconds
        self.by_name[name] = self.by_name.get(name, 0) + total
        self.splits.append((name, list(rows), list(recv) if recv is not None else []))

    def reset(self) -> None:
        self.sent = self.remote = self.calls = 0
        self.seconds = 0.0
        self.by_name.clear()
        self.splits.clear()


class GroupSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with autograd; the backward multiplies the incoming gradient by the group size.

    Every rank puts the same loss on the (identical) result, so the gradient of the sum of the
    ranks' losses with respect to one rank's input is ``world`` times its own incoming gradient;
    averaged by DDP that is exactly the gradient of the loss on the global batch (see
    ``docs/distributed.md``, "Gradient convention"). The backward runs no collective on purpose:
    autograd may reach independent branches in a different order on different ranks, and a
    collective there could pair with another rank's all-to-all and hang. It assumes every rank
    weights the result the same (the aux-loss coefficient is the same on every rank).
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any, what: str) -> Tensor:
        ctx.world = group_size(group)
        out = tensor.clone(memory_format=torch.contiguous_format)
        with named_collective(f"all_reduce of {what}", group):
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        return grad * ctx.world, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        send: list[int],
        recv: list[int],
        group: Any,
        name: str,
        counter: ByteCounter | None,
    ) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.name, ctx.counter = send, recv, group, name, counter
        return _exchange(x, send, recv, group, name, counter)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        out = _exchange(grad, ctx.recv, ctx.send, ctx.group, f"{ctx.name}.backward", ctx.counter)
        return out, None, None, None, None, None


def _exchange(
    x: Tensor, send: list[int], recv: list[int], group: Any, name: str, counter: ByteCounter | None
) -> Tensor:
    x = x.contiguous()
    out = x.new_empty(sum(recv), *x.shape[1:])
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    start = time.perf_counter()
    with named_collective(f"all_to_all_single ({name}: {sum(send)} rows out, {sum(recv)} in)", group):
        dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    if counter is not None:
        counter.add(name, send, row_bytes, group_rank(group), time.perf_counter() - start, recv)
    return out


def all_to_all(
    x: Tensor,
    send: Sequence[int],
    recv: Sequence[int],
    *,
    group: Any = None,
    name: str = "exchange",
    counter: ByteCounter | None = None,
) -> Tensor:
    """Send ``send[r]`` rows of ``x [N, ...]`` to rank ``r``, receive ``recv[r]`` rows from it.

    Args:
        x: ``[sum(send), ...]`` rows grouped by destination rank.
        send, recv: rows per rank (length: the group size); ``recv`` must match what the others send.
        group: the process group (``None``: default).
        name: what the exchange is, for errors and the byte counter.
        counter: a :class:`ByteCounter` to add the bytes to (forward and backward).

    Returns:
        ``[sum(recv), ...]`` rows grouped by source rank. Differentiable: the backward sends the
        gradient rows back the way they came.

    Examples:
        >>> y = all_to_all(x, send=[3, 1], recv=[3, 2])  # doctest: +SKIP
    """
    send_, recv_ = [int(s) for s in send], [int(r) for r in recv]
    if sum(send_) != x.shape[0]:
        raise ValueError(f"send sizes sum to {sum(send_)} but x has {x.shape[0]} rows")
    if torch.is_grad_enabled() and x.requires_grad:
        out: Tensor = _AllToAll.apply(x, send_, recv_, group, name, counter)
        return out
    return _exchange(x, send_, recv_, group, name, counter)
