"""Data-parallel and sharded training of models with mpolab layers: what DDP and FSDP2 need.

**DDP** (``torch.nn.parallel.DistributedDataParallel``) needs nothing from this module: MPO
layers are plain parameters, the optimiser's in-place updates (and DDP's broadcast at
construction) bump their version counters, so the no-grad weight cache stays correct. Save with
:func:`save_gathered` (rank 0 writes :func:`mpolab.save`'s folder).

**FSDP2** (``torch.distributed.fsdp.fully_shard``) needs two things, which :func:`fully_shard`
does around torch's own call:

* **contiguous parameters.** ``fully_shard`` refuses a non-contiguous parameter
  (``NotImplementedError: FSDP does not support non-contiguous parameters yet``). The MPO layers
  store contiguous cores (:func:`mpolab.decompose` returns permuted views, which they copy); any
  other non-contiguous parameter of the model is copied by :func:`make_contiguous` first (values
  unchanged).
* **no weight cache across forwards.** FSDP2 frees each unit's unsharded parameters after its
  forward and all-gathers them again into re-allocated storage before the next one, *hiding that
  write from the version counter* (``torch.autograd._unsafe_preserve_version_counter``). The
  no-grad caches of :class:`~mpolab.nn.MPOModule` (and of any module with a ``clear_cache()``
  method, e.g. ``mpolab_moe``'s MPOE matrices) are keyed on storage address and version, so a
  cache built before an optimiser step would be served again whenever the allocator hands back the
  same address. :func:`clear_caches_around_forward` clears those caches before and after each
  FSDP unit's forward: never stale, and no dense copy outlives the forward that built it.

Examples:
    >>> mpolab.compress(model, "all-linear", max_rank=64)
    >>> mpolab.distributed.fully_shard(model, units=model.transformer.h)   # blocks, then the root
    >>> ...                                                                  # train as usual
    >>> mpolab.distributed.save_gathered(model, "out/", base=build_model())  # rank 0 writes
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp import fully_shard as _torch_fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from .io import save

__all__ = ["cache_owners", "clear_caches_around_forward", "fully_shard", "make_contiguous", "save_gathered"]


def make_contiguous(model: nn.Module) -> int:
    """Give every non-contiguous parameter of ``model`` contiguous storage (same values, same object).

    ``fully_shard`` requires contiguous parameters. The :class:`~torch.nn.Parameter` objects are
    kept (an optimiser built before still holds them); their no-grad caches are cleared. Call it
    before ``fully_shard``.

    Returns:
        How many parameters were copied.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` is already sharded (its parameters are DTensors).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    copied = 0
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            raise ValueError(f"{name} is already sharded (a DTensor); call make_contiguous before fully_shard")
        if not p.is_contiguous():
            p.data = p.data.contiguous()
            copied += 1
    if copied:
        for owner in cache_owners(model):
            _clear(owner)
    return copied


def cache_owners(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that keep a derived weight between forwards (those with ``clear_cache()``)."""
    return [m for m in model.modules() if callable(getattr(m, "clear_cache", None))]


def _clear(owner: nn.Module) -> None:
    getattr(owner, "clear_cache")()  # noqa: B009 - a module attribute, typed as Tensor | Module by nn.Module


def clear_caches_around_forward(model: nn.Module, units: Iterable[nn.Module] | None = None) -> list[RemovableHandle]:
    """Clear the weight caches of ``model`` before and after each unit's forward.

    Args:
        model: the module tree whose caches (see :func:`cache_owners`) must not outlive a forward.
        units: the modules whose forwards bound the caches' lifetime; default: every FSDP2 unit of
            ``model`` (each module ``fully_shard`` was applied to), or ``model`` itself when it has
            none. A unit clears the caches of every owner inside it (nested units included).

    Returns:
        The hook handles (``handle.remove()`` undoes it).

    Raises:
        TypeError: ``model`` or a unit is not an ``nn.Module``.
        ValueError: a unit is not inside ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inside = {id(m) for m in model.modules()}
    chosen: list[nn.Module]
    if units is None:
        chosen = [m for m in model.modules() if isinstance(m, FSDPModule)] or [model]
    else:
        chosen = list(units)
        for unit in chosen:
            if not isinstance(unit, nn.Module):
                raise TypeError(f"units must be nn.Modules, got {type(unit).__name__}")
            if id(unit) not in inside:
                raise ValueError(f"unit {type(unit).__name__} is not a submodule of the model")
    handles: list[RemovableHandle] = []
    for unit in chosen:
        owners = cache_owners(unit)
        if not owners:
            continue

        def clear(*_: Any, owners: list[nn.Module] = owners) -> None:
            for owner in owners:
                _clear(owner)

        handles.append(unit.register_forward_pre_hook(clear))
        handles.append(unit.register_forward_hook(clear, always_call=True))
    return handles


def fully_shard(model: nn.Module, units: Iterable[nn.Module] = (), **kwargs: Any) -> nn.Module:
    """FSDP2 for a model with mpolab layers: :func:`make_contiguous`, torch's ``fully_shard`` on each
    of ``units`` and then on ``model``, and :func:`clear_caches_around_forward`.

    Args:
        model: the model (sharded in place; becomes the root FSDP unit).
        units: submodules to shard as their own units first (e.g. the transformer blocks), so that
            only one unit's parameters are unsharded at a time.
        **kwargs: passed to ``torch.distributed.fsdp.fully_shard`` (``mesh``,
            ``reshard_after_forward``, ``mp_policy``, ...).

    Returns:
        ``model`` (now an ``FSDPModule``).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fully_shard needs an initialised process group: call torch.distributed.init_process_group() "
            "first (torchrun / accelerate launch set the environment it reads)"
        )
    make_contiguous(model)
    for unit in units:
        _torch_fully_shard(unit, **kwargs)
    _torch_fully_shard(model, **kwargs)
    clear_caches_around_forward(model)
    return model


def _has_dtensors(model: nn.Module) -> bool:
    return any(isinstance(t, DTensor) for t in (*model.parameters(), *model.buffers()))


def save_gathered(model: nn.Module, path: str | os.PathLike[str], *, base: nn.Module | None = None) -> Path | None:
    """Write the full model from a DDP, FSDP2 or plain process group as one :func:`mpolab.save` folder.

    Every rank must call it (FSDP2 gathers the shards with collectives); rank 0 writes and the
    others wait for it, so the folder is complete when any rank returns. The folder
    loads with :func:`mpolab.load` on one process, or on any number of ranks (load, then wrap).

    Args:
        model: the trained model: plain, wrapped in ``DistributedDataParallel`` (its ``.module``
            is saved), or sharded with FSDP2.
        path: the folder to write.
        base: for an FSDP2 model only: an unsharded module of the same architecture (same MPO
            ranks, e.g. the model built as before sharding, or :func:`mpolab.load` of the starting
            folder) on rank 0; the gathered weights are loaded into it and it is saved. Ignored on
            the other ranks (pass ``None`` there).

    Returns:
        ``path`` as a :class:`~pathlib.Path` on rank 0, ``None`` on the others.

    Raises:
        ValueError: on every rank, when rank 0 has an FSDP2 model but no ``base`` or a sharded
            one, or when writing failed there (a ``base`` whose tensors do not match, with
            ``load_state_dict``'s message; an unwritable folder).
    """
    distributed = dist.is_available() and dist.is_initialized()
    writer = dist.get_rank() == 0 if distributed else True
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    sharded = _has_dtensors(inner)
    problem: str | None = None
    if writer and sharded:
        if base is None:
            problem = (
                "save_gathered of an FSDP2 model needs base=: an unsharded module of the same architecture on "
                "rank 0 to load the gathered weights into (e.g. the model built as before fully_shard)"
            )
        elif _has_dtensors(base):
            problem = "base must be an unsharded module (its parameters are DTensors)"
    _raise_everywhere(problem, distributed)  # before the gather, so no rank is left waiting in it
    full = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    written: Path | None = None
    if writer and not distributed:
        written = _write(inner, full, base, path)
    elif writer:
        try:
            written = _write(inner, full, base, path)
        except (RuntimeError, ValueError, OSError) as exc:
            problem = f"save_gathered failed on rank 0: {type(exc).__name__}: {exc}"
    _raise_everywhere(problem, distributed)  # instead of the other ranks waiting for a folder never written
    return written


def _write(model: nn.Module, full: dict[str, Any] | None, base: nn.Module | None, path: str | os.PathLike[str]) -> Path:
    """:func:`mpolab.save` of ``model``, or of ``base`` holding the gathered state dict ``full``."""
    if full is None:
        return save(model, path)
    assert base is not None
    base.load_state_dict(full, strict=True)
    for owner in cache_owners(base):
        _clear(owner)
    return save(base, path)


def _raise_everywhere(problem: str | None, distributed: bool) -> None:
    """Raise ``ValueError(problem)`` on every rank when rank 0 found one (one broadcast)."""
    if distributed:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise ValueError(problem)
