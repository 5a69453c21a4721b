"""MPOE's gradient mask: shared central tensors skip a random fraction of optimizer updates.

Every token of every expert sends gradient into the shared central tensors, so in plain training
they move much more than any expert's auxiliary tensors ("unbalanced optimization" in the MPOE
paper). The mask fixes that: before each optimizer step it draws ``P_m ~ U(0, 1)``; if
``P_m < p_b`` the step is *masked*: the central tensors are not updated and, of the per-expert
tensors, only the experts that received tokens since the previous step are; otherwise the step
updates everything. ``p_b = 1`` is a frozen central tensor (MPOP's lightweight fine-tuning),
``p_b = 0`` plain training.

A zero gradient is not enough to hold a tensor still under Adam (its momentum keeps moving it) or
under weight decay, so a masked step:

* sets the central tensors' ``.grad`` to ``None``: torch optimizers skip such parameters and leave
  their state untouched;
* snapshots the slices of unrouted experts in every per-expert tensor (auxiliary cores and biases,
  stacked ``[E, ...]``) and in the optimizer state tensors of the same shape (``exp_avg``,
  ``exp_avg_sq``, ``momentum_buffer``, ...) before the step and writes them back after it, so those
  experts are bit-identical afterwards. (Adam's scalar ``step`` counter is shared by all slices of
  a tensor and still advances.)

Routed experts are counted by forward pre-hooks on the :class:`~mpolab_moe.experts.mpo.MPOExperts`
banks (their ``counts`` argument), accumulated over forwards since the last step, so gradient
accumulation works. Under :func:`mpolab.materialize` the banks' core gradients wait in their
materialised weights until the step; :meth:`GradientMask.apply` flushes them first
(:func:`mpolab.step_weight.flush_pending`), so the order in which the mask and the materializer
were attached to the optimiser does not matter.

The mask holds its banks and its optimizer by weak reference (their hooks hold the mask): no
reference cycle, so the mask goes when the model and the optimizer go, not at some later garbage
collection; and it holds its ``replica_group`` by name (:class:`~mpolab_moe.parallel.GroupRef`),
so a model kept to the end of a script does not keep a destroyed group alive either (a gloo
group still alive when the interpreter finalises can abort the process at exit).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mpolab.step_weight import flush_pending

from .experts.mpo import MPOExperts

__all__ = ["GradientMask", "broadcast_seed"]


def broadcast_seed(group: Any = None) -> int:
    """A seed drawn from torch's global RNG on the first rank of ``group``, the same on every rank.

    A collective (a broadcast): every rank of ``group`` (``None``: the default group) must call it.
    """
    from .parallel.bank import collective_device  # here: the parallel package imports this module

    shared = torch.randint(2**62, (1,), dtype=torch.int64).to(collective_device(group))
    dist.broadcast(shared, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(shared.item())


class GradientMask:
    """Randomly mask the shared central tensors' updates of every MPOE bank in a model.

    Args:
        model: a module tree containing :class:`MPOExperts` banks, or an iterable of banks.
        p_b: probability that a step is masked, in ``[0, 1]``.
        seed: seed of the mask's own random generator (``None``: drawn from torch's global RNG;
            with a ``replica_group``, the group's first rank draws it and broadcasts it here, so
            replicas mask the same steps whatever their RNG states: every replica must build the
            mask). Replicas that pass a seed must pass the same one.
        replica_group: the process group over which the banks are *replicated* (DDP, FSDP2; e.g.
            ``torch.distributed.group.WORLD``): the record of routed experts is OR-reduced over it
            before each step. ``None``: no communication (one process, or expert parallelism).

    Examples:
        >>> mask = GradientMask(model, p_b=0.5, seed=0).attach(optimizer)
        >>> loss.backward(); optimizer.step()          # masked or not, decided inside step()
        >>> mask.last_masked, mask.num_masked, mask.num_steps

    Without :meth:`attach`, call ``mask.apply(optimizer)`` before and ``mask.restore()`` after
    ``optimizer.step()``.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[MPOExperts],
        p_b: float = 0.5,
        *,
        seed: int | None = None,
        replica_group: Any = None,
    ) -> None:
        if isinstance(p_b, bool) or not isinstance(p_b, (int, float)) or not 0.0 <= float(p_b) <= 1.0:
            raise ValueError(f"p_b must be a probability in [0, 1], got {p_b!r}")
        if isinstance(model, nn.Module):
            banks = [m for m in model.modules() if isinstance(m, MPOExperts)]
            searched = type(model).__name__
        else:
            banks = list(model)
            searched = "the given iterable"
            for bank in banks:
                if not isinstance(bank, MPOExperts):
                    raise TypeError(f"expected MPOExperts banks, got {type(bank).__name__}")
        if not banks:
            raise ValueError(
                f"no MPOExperts bank found in {searched}; the gradient mask applies to MPOE layers "
                "(build them with upcycle/moefy(..., experts='mpo') or MPOExperts)"
            )
        if replica_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "replica_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first, or pass replica_group=None in one process"
            )
        self._bank_refs = [weakref.ref(bank) for bank in banks]
        self.p_b = float(p_b)
        from .parallel.collectives import GroupRef  # here: the parallel package imports this module

        # by name, looked up on use: neither the mask nor the model holding its hooks keeps the group alive
        self._replica = None if replica_group is None else GroupRef(replica_group)
        if seed is None:
            seed = int(torch.randint(2**62, ()).item()) if replica_group is None else broadcast_seed(replica_group)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.last_masked = False
        self.num_steps = 0
        self.num_masked = 0
        self._routed = {id(b): torch.zeros(b.num_experts, dtype=torch.bool) for b in banks}
        self._saved: list[tuple[Tensor, Tensor, Tensor]] = []
        self._optimizer_ref: weakref.ref[torch.optim.Optimizer] | None = None
        self._handles = [b.register_forward_pre_hook(self._record) for b in banks]

    @property
    def banks(self) -> list[MPOExperts]:
        """The :class:`MPOExperts` banks this mask acts on.

        Raises:
            RuntimeError: a bank was freed (the model is gone while the mask lives on).
        """
        banks = [ref() for ref in self._bank_refs]
        if any(bank is None for bank in banks):
            raise RuntimeError("GradientMask: its MPOExperts banks were freed; build a new mask for the new model")
        return banks  # type: ignore[return-value]

    @property
    def replica_group(self) -> Any:
        """The process group the banks are replicated over, or ``None`` (no communication)."""
        return None if self._replica is None else self._replica.get()

    @property
    def _optimizer(self) -> torch.optim.Optimizer | None:
        return None if self._optimizer_ref is None else self._optimizer_ref()

    # ------------------------------------------------------------------ routing record
    def _record(self, bank: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and len(args) >= 2:
            counts = torch.as_tensor(list(args[1])) > 0
            self._routed[id(bank)] |= counts

    def routed_experts(self, bank: MPOExperts) -> Tensor:
        """``[E]`` bool: which experts of ``bank`` received tokens (with grad) since the last step."""
        return self._routed[id(bank)].clone()

    # ------------------------------------------------------------------ the step
    def attach(self, optimizer: torch.optim.Optimizer) -> GradientMask:
        """Run :meth:`apply` / :meth:`restore` around every ``optimizer.step()`` (any torch optimizer).

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: it does not hold every trainable central tensor of the banks (the mask
                would clear their gradients while this optimizer never steps them).
        """
        self.check_optimizer(optimizer)
        self._optimizer_ref = weakref.ref(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        return self

    def check_optimizer(self, optimizer: object) -> None:
        """Refuse an optimizer that does not hold the banks' trainable central tensors (see :meth:`attach`)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        central = [(k, p) for k, bank in enumerate(self.banks) for p in bank.central_parameters() if p.requires_grad]
        missing = [(k, tuple(p.shape)) for k, p in central if id(p) not in held]
        if missing:
            k, shape = missing[0]
            raise ValueError(
                f"{type(optimizer).__name__} does not hold {len(missing)} of the {len(central)} trainable central "
                f"tensors of the MPOE banks (first: bank {k}, shape {list(shape)}); the mask would clear their "
                "gradients while this optimizer never updates them. Build the optimizer over the model's "
                "parameters (e.g. torch.optim.AdamW(model.parameters())) or freeze the central tensors"
            )

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()

    def detach(self) -> None:
        """Remove every hook this mask registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def draw(self) -> bool:
        """Draw ``P_m ~ U(0, 1)`` from the mask's generator: ``True`` (mask this step) when ``P_m < p_b``."""
        return bool(torch.rand((), generator=self.generator).item() < self.p_b)

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Decide this step; if masked, drop central gradients and snapshot unrouted experts. Returns masked.

        Pending gradients of materialised banks (:func:`mpolab.materialize`) reach the cores first.
        """
        optimizer = optimizer if optimizer is not None else self._optimizer
        with torch.enable_grad():
            for bank in self.banks:
                flush_pending(bank)
        self.last_masked = self.draw()
        self.num_steps += 1
        self._saved = []
        if not self.last_masked:
            return False
        self.num_masked += 1
        self._reduce_routed()
        for bank in self.banks:
            for p in bank.central_parameters():
                p.grad = None
            idle = (~self._routed[id(bank)]).nonzero().flatten()
            if idle.numel() == 0:
                continue
            for p in bank.expert_parameters():
                tensors: list[Tensor] = [p]
                if optimizer is not None:
                    state = optimizer.state.get(p, {})
                    tensors += [s for s in state.values() if isinstance(s, Tensor) and s.shape == p.shape]
                for t in tensors:
                    local, idx = _local_rows(t, idle)
                    if idx.numel():
                        self._saved.append((local, idx, local[idx].clone()))
        return True

    def _reduce_routed(self) -> None:
        """OR the routed-expert records over :attr:`replica_group` (one all-reduce for all banks)."""
        group = self.replica_group
        if group is None:
            return
        records = list(self._routed.values())
        device = next(self.banks[0].central_parameters()).device
        flags = torch.cat(records).to(device=device, dtype=torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        for record, reduced in zip(records, flags.cpu().bool().split([r.numel() for r in records])):
            record.copy_(reduced)

    @torch.no_grad()
    def restore(self) -> None:
        """After ``optimizer.step()``: put back the unrouted experts' slices and reset the routing record."""
        for tensor, idx, values in self._saved:
            tensor[idx] = values
        self._saved = []
        for routed in self._routed.values():
            routed.zero_()

    def __repr__(self) -> str:
        return (
            f"GradientMask(p_b={self.p_b}, banks={len(self.banks)}, steps={self.num_steps}, masked={self.num_masked})"
        )


def _local_rows(tensor: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """The tensor this process holds and the rows of it that belong to ``experts`` (global ids).

    A plain tensor is its own local part. A ``DTensor`` (FSDP2) sharded along dim 0 holds the
    ``torch.chunk`` block of rows ``[rank · ceil(E / n), ...)`` of its mesh; replicated, all rows.

    Raises:
        ValueError: a DTensor sharded along another dimension or on a multi-dimensional mesh.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return tensor, experts.to(tensor.device)
    local = tensor.to_local()
    placements = tuple(tensor.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return local, experts.to(local.device)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(
            f"GradientMask can restore expert slices of tensors sharded along the expert dimension (Shard(0) on a "
            f"1-D mesh, as FSDP2's fully_shard does), got placements {placements}"
        )
    mesh = tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())
    start = mesh.get_local_rank() * chunk
    rows = experts[(experts >= start) & (experts < start + local.shape[0])] - start
    return local, rows.to(local.device)
