"""Build each MPO weight once per optimiser step and accumulate its gradient there.

In training, an MPO layer (or an MPOE bank) rebuilds its dense weight from the cores in every
forward and backpropagates through that rebuild in every backward. With gradient accumulation
over ``m`` micro-batches that is ``m`` rebuilds and ``m`` backwards through them, although the
cores only change when the optimiser steps. :func:`materialize` changes this for a whole model:

* the first training forward of a step builds ``W`` from the cores and keeps it as a **leaf**
  tensor (plus the autograd graph of the rebuild);
* every micro-batch's backward accumulates ``∂L/∂W`` into that leaf (the GEMMs only);
* just before ``optimizer.step()`` (an optimiser step pre-hook), one backward through the kept
  rebuild carries the accumulated ``∂L/∂W`` to the cores. Core gradients are then exactly what
  the plain path would have accumulated (up to float summation order).

Never a stale weight: the leaf is keyed on every core's storage, version counter, dtype, device
and ``requires_grad`` (as :class:`mpolab.nn.VersionedCache`), so an optimiser step,
``load_state_dict``, an in-place edit or ``.to()`` makes the next forward rebuild. If the cores
change while a gradient is still pending (an edit between micro-batches), the next forward and
the flush raise ``RuntimeError`` rather than carry a gradient computed for another weight.
Writes through ``.data`` bypass version counters (call :meth:`Materializer.discard` after them).

No-grad forwards (evaluation between micro-batches) use the leaf's values when it is current and
the layers' no-grad caches otherwise; they never create or change a pending gradient.

**Gradient clipping** (and AMP's ``unscale_``) read the core gradients *before*
``optimizer.step()``: call :meth:`Materializer.flush` before clipping, or pass ``flush_after``
(``m``: flush at the end of every ``m``-th backward; a callable: flush at the end of each backward
for which it returns ``True``, e.g. ``lambda: trainer.accelerator.sync_gradients`` inside the
Hugging Face Trainer, which clips before it steps).

**Distributed data parallel**: DDP all-reduces the gradients of *parameters* during backward; the
deferred core gradients would bypass it. :func:`materialize` and :meth:`Materializer.attach`
refuse with ``RuntimeError`` when ``torch.distributed`` is initialised with more than one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Materializable", "Materializer", "StepWeight", "flush_pending", "materialize"]

Key = tuple[tuple[Any, ...], ...]


def _key(params: Sequence[Tensor]) -> Key:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device, p.requires_grad) for p in params)


class StepWeight:
    """One weight built once per optimiser step as a leaf tensor that collects the step's gradient.

    A layer calls :meth:`get` in its training forwards and :meth:`peek` in its no-grad ones; the
    :class:`Materializer` calls :meth:`flush` before the optimiser steps. Not carried by pickling
    or ``copy.deepcopy`` (a copy of a layer is not materialised).

    Examples:
        >>> slot = StepWeight()
        >>> w = slot.get(cores, rebuild)          # built once; the same leaf until the cores change
        >>> (x @ w).sum().backward()              # ∂L/∂W accumulates in w.grad
        >>> slot.flush()                          # one backward through the rebuild: cores get .grad
        True
    """

    def __init__(self, owner: Materializer | None = None) -> None:
        self.owner = owner
        self._params: list[Tensor] = []
        self._key: Key | None = None
        self._graph: Tensor | None = None
        self._leaf: Tensor | None = None

    # ------------------------------------------------------------------ state
    @property
    def built(self) -> bool:
        """Whether a weight is held for the current step."""
        return self._leaf is not None

    @property
    def pending(self) -> bool:
        """Whether micro-batch gradients wait in the leaf for :meth:`flush`."""
        return self._leaf is not None and self._leaf.grad is not None

    @property
    def params(self) -> list[Tensor]:
        """The parameters the held weight was built from (empty when none is held)."""
        return list(self._params)

    def _stale(self) -> bool:
        return self._leaf is not None and _key(self._params) != self._key

    def _refuse_stale(self, where: str) -> None:
        changed = [k for k, (p, old) in enumerate(zip(self._params, self._key or ())) if _key([p])[0] != old]
        raise RuntimeError(
            f"{where}: parameters {changed} of a materialised weight changed (in place, load_state_dict, "
            ".to() or requires_grad) while gradients of earlier micro-batches were still pending; those "
            "gradients belong to the old weight. Call Materializer.flush() (or optimizer.step()) before "
            "changing parameters, or Materializer.discard() to drop the pending gradients"
        )

    # ------------------------------------------------------------------ use
    def get(self, params: Sequence[Tensor], build: Callable[[], Tensor]) -> Tensor:
        """The step's weight as a leaf that requires grad, built with ``build()`` (with autograd) if needed.

        Args:
            params: the parameters ``build`` reads (the key: storage, version, dtype, device, requires_grad).
            build: rebuilds the weight from ``params`` (any shape, e.g. ``[out, in]`` or ``[E, in, out]``).

        Raises:
            RuntimeError: ``params`` changed while a gradient is pending (see the module docstring).
        """
        params = list(params)
        if self._leaf is not None and (_key(params) != self._key or len(params) != len(self._params)):
            if self.pending:
                self._refuse_stale("forward")
            self.clear()
        if self._leaf is None:
            with torch.enable_grad():
                graph = build()
            leaf = graph.detach().requires_grad_(graph.requires_grad)
            if leaf.requires_grad and self.owner is not None:
                leaf.register_post_accumulate_grad_hook(self.owner._accumulated)
            self._params, self._key, self._graph, self._leaf = params, _key(params), graph, leaf
        return self._leaf

    def peek(self, params: Sequence[Tensor]) -> Tensor | None:
        """The held weight's values (detached) if it is current for ``params``, else ``None``."""
        if self._leaf is None or _key(list(params)) != self._key:
            return None
        return self._leaf.detach()

    def flush(self) -> bool:
        """Carry the accumulated ``∂L/∂W`` to the parameters (one backward through the rebuild); drop the weight.

        Returns whether a gradient was carried. The next training forward rebuilds.

        Raises:
            RuntimeError: the parameters changed since the weight was built while a gradient is pending.
        """
        if not self.pending:
            self.clear()
            return False
        if self._stale():
            self._refuse_stale("flush")
        assert self._graph is not None and self._leaf is not None and self._leaf.grad is not None
        torch.autograd.backward(self._graph, self._leaf.grad)
        self.clear()
        if self.owner is not None:
            self.owner.num_flushed += 1
        return True

    def clear(self) -> None:
        """Drop the held weight and any pending gradient."""
        self._params, self._key, self._graph, self._leaf = [], None, None, None

    def __getstate__(self) -> dict[str, Any]:
        return {"owner": None, "_params": [], "_key": None, "_graph": None, "_leaf": None}


@runtime_checkable
class Materializable(Protocol):
    """A module whose training forward can use a :class:`StepWeight` (``MPOLinear``, ``MPOEmbedding``,
    ``mpolab_moe``'s ``SharedCentralMPO``): it reads ``step_weight`` (``None``: rebuild every forward)
    and names the parameters its weight is built from."""

    step_weight: StepWeight | None

    def weight_parameters(self) -> list[nn.Parameter]:
        """The parameters the materialised weight is rebuilt from (the cores)."""
        ...


def _materializable(model: nn.Module) -> list[Materializable]:
    return [m for m in model.modules() if isinstance(m, Materializable)]


def _refuse_distributed(what: str) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            raise RuntimeError(
                f"{what}: torch.distributed is initialised with {world} processes. DDP/FSDP all-reduce the "
                "gradients of parameters during backward, and materialised weights defer the cores' gradients "
                "to optimizer.step(), past that reduction; train without mpolab.materialize under data parallelism"
            )


class Materializer:
    """The materialised layers of one model, and the hooks that flush their gradients.

    Made by :func:`materialize`. See the module docstring for the semantics.

    Examples:
        >>> weights = mpolab.materialize(model).attach(optimizer)
        >>> for micro_batch in batches:                  # m micro-batches, one rebuild per layer
        ...     (model(micro_batch).loss / m).backward()
        >>> optimizer.step(); optimizer.zero_grad()      # the cores get their gradients first
        >>> weights.detach()                             # back to rebuilding in every forward
    """

    def __init__(self, modules: Sequence[Materializable], flush_after: int | Callable[[], bool] | None = None) -> None:
        if flush_after is not None and not callable(flush_after):
            if isinstance(flush_after, bool) or not isinstance(flush_after, int) or flush_after < 1:
                raise ValueError(
                    f"flush_after must be None, a positive number of backwards or a callable, got {flush_after!r}"
                )
        self.modules = list(modules)
        self.flush_after = flush_after
        self.num_backwards = 0
        #: weight gradients carried to the cores so far (one per materialised weight per step)
        self.num_flushed = 0
        self._queued = False
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        self._handles: list[Any] = []
        for m in self.modules:
            current = m.step_weight
            if current is not None and current.owner is not None and current.owner is not self:
                raise ValueError(
                    f"{type(m).__name__} is already materialised by another Materializer; call its detach() first"
                )
            m.step_weight = StepWeight(self)

    def step_weights(self) -> Iterator[StepWeight]:
        for m in self.modules:
            sw = m.step_weight
            if sw is not None:
                yield sw

    @property
    def pending(self) -> bool:
        """Whether any layer holds micro-batch gradients not yet carried to its cores."""
        return any(sw.pending for sw in self.step_weights())

    # ------------------------------------------------------------------ optimiser
    def attach(self, optimizer: torch.optim.Optimizer) -> Materializer:
        """Flush before every ``optimizer.step()`` (a step pre-hook). Returns ``self``.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: it holds some but not all trainable parameters of a materialised layer, or
                another optimiser attached to this materializer holds them too (two optimisers over
                one layer would each step half of a gradient that is flushed once).
            RuntimeError: under ``torch.distributed`` with more than one process.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _refuse_distributed("Materializer.attach")
        if id(optimizer) in self._optimizers:
            return self
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        others = {id(p) for o in self._optimizers.values() for group in o.param_groups for p in group["params"]}
        for m in self.modules:
            trainable = [p for p in m.weight_parameters() if p.requires_grad]
            mine = [id(p) in held for p in trainable]
            name = type(m).__name__
            if any(mine) and not all(mine):
                raise ValueError(
                    f"{type(optimizer).__name__} holds {sum(mine)} of the {len(mine)} trainable parameters of a "
                    f"materialised {name}; one optimiser must hold all of a layer's cores (its weight is flushed once)"
                )
            if any(mine) and any(id(p) in others for p in trainable):
                raise ValueError(
                    f"two optimisers hold the parameters of one materialised {name}: its accumulated gradient is "
                    "flushed once per step, so only one optimiser may step it"
                )
        self._optimizers[id(optimizer)] = optimizer
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        return self

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.flush()

    # ------------------------------------------------------------------ flushing
    def flush(self) -> int:
        """Carry every pending weight gradient to the cores now. Returns how many weights had one."""
        carried = sum(sw.flush() for sw in list(self.step_weights()))
        self.num_backwards = 0
        return carried

    def discard(self) -> None:
        """Drop every held weight and pending gradient (after ``zero_grad`` without a step, or writes to ``.data``)."""
        for sw in self.step_weights():
            sw.clear()
        self.num_backwards = 0

    def _accumulated(self, leaf: Tensor) -> None:
        """A leaf received a micro-batch gradient: count the backward once, at its end."""
        if self.flush_after is not None and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._queued = False
        self.num_backwards += 1
        due = self.flush_after() if callable(self.flush_after) else self.num_backwards >= self.flush_after  # type: ignore[operator]
        if due:
            self.flush()

    def detach(self) -> None:
        """Flush, remove the hooks and return the layers to rebuilding in every forward."""
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizers.clear()
        for m in self.modules:
            if m.step_weight is not None and m.step_weight.owner is self:
                m.step_weight = None

    def __repr__(self) -> str:
        return (
            f"Materializer(layers={len(self.modules)}, optimizers={len(self._optimizers)}, "
            f"flush_after={self.flush_after!r}, flushed={self.num_flushed}, pending={self.pending})"
        )


def materialize(model: nn.Module, *, flush_after: int | Callable[[], bool] | None = None) -> Materializer:
    """Build every MPO weight in ``model`` once per optimiser step (exact gradient accumulation).

    Applies to every :class:`Materializable` module: ``MPOLinear`` and ``MPOEmbedding`` (when they
    use their rebuilt weight) and MPOE banks' ``SharedCentralMPO`` matrices. Call
    :meth:`Materializer.attach` with the optimiser so the accumulated gradients reach the cores
    before each step.

    Args:
        model: the model (or one layer).
        flush_after: also flush at the end of a backward: every ``m``-th one (an int), or whenever the
            callable returns ``True`` (needed when gradients are clipped before ``optimizer.step()``).

    Raises:
        ValueError: no materialisable layer in ``model``; a bad ``flush_after``.
        RuntimeError: under ``torch.distributed`` with more than one process.

    Examples:
        >>> weights = mpolab.materialize(model).attach(optimizer)       # the one line
        >>> weights = mpolab.materialize(model, flush_after=8).attach(optimizer)   # clipping after 8 micro-batches
        >>> weights = mpolab.materialize(model, flush_after=lambda: trainer.accelerator.sync_gradients)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_distributed("mpolab.materialize")
    modules = _materializable(model)
    if not modules:
        raise ValueError(
            f"no materialisable layer in {type(model).__name__}: materialize applies to MPOLinear, MPOEmbedding "
            "and MPOE expert banks (mpolab.compress, mpolab_moe.moefy(..., experts='mpo'))"
        )
    return Materializer(modules, flush_after)


def flush_pending(model: nn.Module) -> int:
    """Carry the pending weight gradients of every materialised layer in ``model`` to its cores.

    For code that reads core gradients before ``optimizer.step()`` (``GradientMask`` does).
    Returns how many weights had one.
    """
    return sum(m.step_weight.flush() for m in _materializable(model) if m.step_weight is not None)
