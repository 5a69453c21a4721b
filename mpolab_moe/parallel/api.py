"""``expert_parallel`` / ``shard_experts``: spread a MoE layer's experts over a process group.

**What lives where.** Each rank of the expert group keeps the whole layer except the experts it
does not own: the gate, the shared tensors of the bank (MPOE's central tensors, a sliced bank's
output bias) and the rest of the model are replicated; each expert's own tensors live on its
owner only (``E / world`` experts per rank, or an explicit ``placement``).

**Gradient convention (DDP's).** Each rank computes a loss on its own tokens and the replicated
parameters' gradients are *averaged* over the ranks (DDP does it; without DDP call
:func:`average_replicated_gradients`). An expert's owner receives the gradient of every rank's
loss, summed, through the reverse all-to-all; the bank divides it by the group size, so an
expert's gradient is that of the mean of the ranks' losses too, the same quantity DDP's average
gives the replicated parameters. The shared central tensors of MPOE collect on each rank the
gradient of the rows its own experts computed; DDP's average of those partial sums is again the
gradient of the mean loss. Gate statistics that the method defines over the batch (the balance
loss) are summed over the group with a differentiable all-reduce whose backward multiplies by the
group size (every rank backpropagates the same aux loss), so the aux loss is the global batch's
and its gradient is right under DDP's average. Per-token
means (router z-loss) stay local: DDP's average of equal-sized local means is the global mean.
Expert tensors must be kept out of DDP: :func:`ignore_expert_tensors_in_ddp`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..gates.base import BankBoundGate
from ..grad_mask import GradientMask, broadcast_seed
from ..layer import MoE, moe_layers
from .bank import ExpertParallelBank, collective_device
from .collectives import (
    GroupRef,
    GroupSum,
    all_gather_rows,
    default_expert_group,
    group_rank,
    group_size,
    named_collective,
    require_initialized,
)
from .sharding import expert_tensor_names, local_bank

__all__ = [
    "GroupReducer",
    "average_replicated_gradients",
    "clip_grad_norm_",
    "distributed_gradient_mask",
    "even_placement",
    "expert_parallel",
    "expert_tensors",
    "ignore_expert_tensors_in_ddp",
    "replicated_parameters",
    "shard_experts",
]


class GroupReducer:
    """``t -> sum of t over group`` with autograd (:class:`GroupSum`); what :attr:`Gate.batch_sum` holds.

    Copies (``copy.deepcopy`` of the model, for an EMA or a teacher) share it: a process group
    cannot be copied.

    Examples:
        >>> gate.batch_sum = GroupReducer()  # doctest: +SKIP
    """

    def __init__(self, group: Any = None, what: str = "gate batch statistics") -> None:
        self.group, self.what = GroupRef(group), what  # by name: never keeps a destroyed group alive

    def __call__(self, tensor: Tensor) -> Tensor:
        out: Tensor = GroupSum.apply(tensor, self.group.get(), self.what)
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupReducer:
        return self

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (GroupReducer, ())  # unpickled: the default group

    def __repr__(self) -> str:
        return f"GroupReducer({self.what!r})"


def even_placement(num_experts: int, world_size: int) -> list[int]:
    """``num_experts / world_size`` experts per rank.

    Raises:
        ValueError: ``num_experts`` not divisible by ``world_size`` (the message proposes an uneven placement).

    Examples:
        >>> even_placement(8, 4)
        [2, 2, 2, 2]
    """
    if num_experts % world_size:
        base, extra = divmod(num_experts, world_size)
        uneven = [base + (r < extra) for r in range(world_size)]
        hint = (
            f"pass placement={uneven} (experts per rank) for an uneven placement"
            if base
            else f"use at most {num_experts} ranks per expert group"
        )
        raise ValueError(f"num_experts={num_experts} is not divisible by the {world_size} ranks of the group; {hint}")
    return [num_experts // world_size] * world_size


def _check_placement(placement: Sequence[int], num_experts: int, world: int) -> list[int]:
    values = list(placement)
    if (
        len(values) != world
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in values)
        or sum(values) != num_experts
    ):
        raise ValueError(
            f"placement must list {world} positive ints (experts per rank) summing to num_experts={num_experts}, "
            f"got {placement!r}"
        )
    return values


def _agree(values: list[tuple[str, int]], group: Any, what: str) -> None:
    """All-gather ``values`` and raise ``ValueError`` naming the first that differs between ranks."""
    mine = torch.tensor([v for _, v in values], dtype=torch.int64, device=collective_device(group))
    table = all_gather_rows(mine, group, f"the {what}").cpu()
    for c, (name, _) in enumerate(values):
        column = table[:, c]
        if bool((column != column[0]).any()):
            per_rank = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(column.tolist()))
            raise ValueError(f"the ranks disagree on the {what}: {name} ({per_rank})")


def expert_parallel(
    moe: MoE, group: Any = None, *, placement: Sequence[int] | None = None, global_aux: bool = True
) -> MoE:
    """Keep only this rank's experts of ``moe`` and exchange tokens with the other ranks (in place).

    Call it on every rank of ``group`` with the same layer (same seed, or load the same weights
    first): each rank keeps experts ``[lo, hi)`` of ``placement`` and the layer's bank becomes an
    :class:`ExpertParallelBank`. The gate and the bank's shared tensors stay replicated. The
    forward runs collectives: every rank must run every forward and backward of the layer.

    Args:
        moe: a :class:`MoE` with a sparse-capable gate (soft gates run every expert on every token).
        group: the expert-parallel process group (``None``: one group over every rank made for
            expert parallelism, :func:`default_expert_group`, so its collectives never queue
            with DDP's on the default group).
        placement: experts per rank (contiguous ranges in rank order); ``None``: ``E / world`` each.
        global_aux: sum the gate's batch statistics over the group (the balance loss of the
            global batch); ``False`` keeps them per rank.

    Returns:
        ``moe`` itself.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: not a :class:`MoE`; a gate that reads the bank's weights (avg-k on keys,
            MoEfication's routers): it would need every expert on every rank.
        ValueError: ``E`` not divisible by the group size without a ``placement``; a bad
            ``placement``; ranks that disagree on the layer (checked here and on every forward).

    Examples:
        >>> dist.init_process_group()  # doctest: +SKIP
        >>> moe = expert_parallel(MoE(TopKGate(768, 64, k=2), MPOExperts(768, 3072, 64)))  # doctest: +SKIP
    """
    require_initialized("expert_parallel")
    if group is None:
        group = default_expert_group()
    if not isinstance(moe, MoE):
        raise TypeError(f"expert_parallel expects a mpolab_moe.MoE layer, got {type(moe).__name__}")
    if isinstance(moe.experts, ExpertParallelBank):
        raise ValueError("this MoE layer is already expert-parallel")
    gate, bank = moe.gate, moe.experts
    if isinstance(gate, BankBoundGate) or gate.requires():
        raise TypeError(
            f"{type(gate).__name__} reads the expert bank's weights (keys or neuron groups), which expert parallelism "
            "splits over ranks; use a learned router (TopKGate, TopAnyGate, SoftMergeGate, MLPGate, AvgKGate with "
            "score='router')"
        )
    world, rank = group_size(group), group_rank(group)
    E = bank.num_experts
    place = even_placement(E, world) if placement is None else _check_placement(placement, E, world)
    names = expert_tensor_names(bank)
    gate_repr = f"{type(gate).__qualname__}({gate.extra_repr()})"
    _agree(
        [
            ("num_experts", E),
            ("d_model", bank.in_features),
            ("d_out", bank.out_features),
            ("bank type", zlib.crc32(type(bank).__qualname__.encode())),
            ("gate configuration", zlib.crc32(gate_repr.encode())),
            ("capacity", zlib.crc32(moe.extra_repr().encode())),
            ("placement", zlib.crc32(repr(place).encode())),
            ("global_aux", int(global_aux)),
        ],
        group,
        "expert-parallel layer configuration",
    )
    lo = sum(place[:rank])
    local = local_bank(bank, lo, lo + place[rank])
    sharded = ExpertParallelBank(local, num_experts=E, placement=place, group=group, expert_names=names)
    moe.experts = sharded
    if global_aux:
        gate.batch_sum = GroupReducer(group)
    return moe


def shard_experts(
    model: nn.Module, group: Any = None, *, placement: Sequence[int] | None = None, global_aux: bool = True
) -> dict[str, tuple[int, int]]:
    """:func:`expert_parallel` on every :class:`MoE` layer of ``model``; returns each layer's ``[lo, hi)``.

    Raises:
        ValueError: ``model`` has no MoE layer (and what :func:`expert_parallel` raises).

    Examples:
        >>> mpolab_moe.moefy(model, num_experts=8, experts="mpo")  # doctest: +SKIP
        >>> shard_experts(model)                                    # doctest: +SKIP
        {'model.layers.0.mlp': (0, 4), ...}
    """
    layers = moe_layers(model)
    if layers and group is None:
        require_initialized("shard_experts")
        group = default_expert_group()
    if not layers:
        raise ValueError(f"{type(model).__name__} has no mpolab_moe.MoE layer to shard (moefy or upcycle it first)")
    out = {}
    for name, moe in layers.items():
        expert_parallel(moe, group, placement=placement, global_aux=global_aux)
        bank = moe.experts
        assert isinstance(bank, ExpertParallelBank)
        out[name] = (bank.lo, bank.hi)
    return out


def expert_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(qualified name, tensor)`` of every per-expert parameter and buffer this rank owns."""
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            tensors: dict[str, Tensor] = dict(module.local.named_parameters())
            tensors.update(dict(module.local.named_buffers()))
            for name in sorted(module.expert_names):
                yield f"{prefix}.local.{name}" if prefix else f"local.{name}", tensors[name]


def replicated_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that every rank holds (all but :func:`expert_tensors`)."""
    local = {id(t) for _, t in expert_tensors(model)}
    for name, p in model.named_parameters():
        if id(p) not in local:
            yield name, p


def ignore_expert_tensors_in_ddp(model: nn.Module) -> list[str]:
    """Tell ``DistributedDataParallel`` (before wrapping ``model``) to leave the expert tensors alone.

    DDP would otherwise average (and broadcast at start) tensors that differ by design between
    ranks. Returns the ignored names.

    Examples:
        >>> ignore_expert_tensors_in_ddp(model)  # doctest: +SKIP
        >>> model = torch.nn.parallel.DistributedDataParallel(model)  # doctest: +SKIP
    """
    names = [name for name, _ in expert_tensors(model)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def average_replicated_gradients(model: nn.Module, group: Any = None) -> int:
    """Average the replicated parameters' gradients over ``group`` (what DDP does), in one all-reduce.

    For expert-parallel training without DDP; call it after ``backward()`` and before the
    optimizer step. A parameter without a gradient on this rank counts as zero. Returns the
    number of elements reduced.

    Examples:
        >>> loss.backward(); average_replicated_gradients(model); optimizer.step()  # doctest: +SKIP
    """
    require_initialized("average_replicated_gradients")
    params = [p for _, p in replicated_parameters(model) if p.requires_grad]
    if not params:
        return 0
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    with named_collective("all_reduce of the replicated gradients", group):
        dist.all_reduce(flat, group=group)
    flat /= group_size(group)
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).clone()
        start += n
    return flat.numel()


def distributed_gradient_mask(
    model: nn.Module, p_b: float = 0.5, *, seed: int | None = None, group: Any = None
) -> GradientMask:
    """A :class:`~mpolab_moe.GradientMask` that draws the same decision on every rank of ``group``.

    Every rank must mask the same steps (the shared central tensors are replicated). With a
    ``seed``, the seeds are checked to agree (one all-gather, here); with ``seed=None`` rank 0
    draws one and broadcasts it (once, here). The draws themselves need no communication.

    Raises:
        ValueError: the ranks passed different seeds.

    Examples:
        >>> mask = distributed_gradient_mask(model, p_b=0.5, seed=0).attach(optimizer)  # doctest: +SKIP
    """
    require_initialized("distributed_gradient_mask")
    if seed is None:
        with named_collective("broadcast of the gradient mask's seed", group):
            seed = broadcast_seed(group)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    _agree([("seed", seed), ("p_b", zlib.crc32(repr(float(p_b)).encode()))], group, "gradient mask")
    return GradientMask(model, p_b, seed=seed)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, *, eps: float = 1e-6) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for an expert-parallel model: the norm of the whole model.

    ``torch.nn.utils.clip_grad_norm_`` on one rank sees only that rank's experts, so each rank
    would scale its replicated gradients by a different factor and the replicas would drift
    apart. Here the squared norms of the expert gradients are summed over the expert group (one
    all-reduce) and added once to those of the replicated parameters (equal on every rank once
    DDP has averaged them); every rank then scales by the same factor. Call it after the
    backward (after :func:`average_replicated_gradients` without DDP) and before the optimizer
    step. Returns the total norm (fp32), the same on every rank.

    Raises:
        ValueError: ``max_norm`` not a positive number; RuntimeError: ``torch.distributed`` not initialised.

    Examples:
        >>> loss.backward(); clip_grad_norm_(model, 1.0); optimizer.step()  # doctest: +SKIP
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    require_initialized("clip_grad_norm_")
    banks = [m for m in model.modules() if isinstance(m, ExpertParallelBank)]
    local = {id(t) for _, t in expert_tensors(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expert_sq = torch.zeros((), dtype=torch.float32)
    replicated_sq = torch.zeros((), dtype=torch.float32)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().float().square().sum().cpu()
        if id(p) in local:
            expert_sq += sq
        else:
            replicated_sq += sq
    if banks:
        group = banks[0].group
        expert_sq = expert_sq.to(collective_device(group))
        with named_collective("all_reduce of the expert gradients' squared norm", group):
            dist.all_reduce(expert_sq, group=group)
        expert_sq = expert_sq.cpu()
    total = (expert_sq + replicated_sq).sqrt()
    scale = float(max_norm) / (float(total) + eps)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total
