"""State dicts of expert-parallel models in the single-process layout (for checkpoints and export).

An expert-parallel model's own ``state_dict()`` holds this rank's experts under
``<layer>.experts.local.<name>``. :func:`full_state_dict` gathers every rank's experts back into
the layout of the model before :func:`~mpolab_moe.parallel.expert_parallel`
(``<layer>.experts.<name>``, all ``E`` experts), the same on every rank; :func:`load_full_state_dict`
does the reverse, each rank keeping its slice. A checkpoint written from ``N`` ranks this way
loads into one process (plain ``load_state_dict``) and into ``M`` ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .bank import ExpertParallelBank
from .collectives import named_collective

__all__ = ["full_state_dict", "load_full_state_dict"]


def _banks(model: nn.Module) -> dict[str, ExpertParallelBank]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelBank)}


def _full_key(key: str, banks: Mapping[str, ExpertParallelBank]) -> tuple[str, ExpertParallelBank | None, str]:
    """``(single-process key, its bank or None, the tensor's name inside the local bank)``."""
    for prefix, bank in banks.items():
        head = f"{prefix}.local." if prefix else "local."
        if key.startswith(head):
            inner = key[len(head) :]
            return (f"{prefix}.{inner}" if prefix else inner), bank, inner
    return key, None, ""


def _gather_experts(t: Tensor, bank: ExpertParallelBank) -> Tensor:
    """This rank's ``[E_local, ...]`` -> every rank's, ``[E, ...]`` (uneven placements padded for the gather)."""
    largest = max(bank.placement)
    padded = t.new_zeros(largest, *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(bank.world)]
    with named_collective("all_gather of expert tensors (full_state_dict)", bank.group):
        dist.all_gather(parts, padded.contiguous(), group=bank.group)
    return torch.cat([p[:n] for p, n in zip(parts, bank.placement, strict=True)])


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every expert-parallel bank gathered into the single-process layout.

    Every rank of each expert group must call it (it gathers); every rank gets the whole dict.

    Examples:
        >>> state = full_state_dict(model)  # doctest: +SKIP
        >>> if dist.get_rank() == 0: torch.save(state, "model.pt")  # doctest: +SKIP
    """
    banks = _banks(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        full, bank, inner = _full_key(key, banks)
        out[full] = _gather_experts(value, bank) if bank is not None and inner in bank.expert_names else value
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, strict: bool = True) -> None:
    """Load a single-process state dict into an expert-parallel ``model``: each rank takes its experts.

    Args:
        model: a model after :func:`~mpolab_moe.parallel.shard_experts` (any number of ranks).
        state: a state dict in the single-process layout (:func:`full_state_dict`, or the model's
            own before sharding).
        strict: as ``nn.Module.load_state_dict``.

    Raises:
        ValueError: a per-expert tensor whose leading dimension is not the layer's ``E``.

    Examples:
        >>> load_full_state_dict(sharded_model, torch.load("model.pt"))  # doctest: +SKIP
    """
    banks = _banks(model)
    local: dict[str, Tensor] = {}
    by_full = {_full_key(key, banks)[0]: key for key in model.state_dict()}
    for full, value in state.items():
        key = by_full.get(full, full)
        _, bank, inner = _full_key(key, banks)
        if bank is not None and inner in bank.expert_names:
            if value.shape[0] != bank.num_experts:
                raise ValueError(f"{full} has {value.shape[0]} experts along dim 0; the layer has {bank.num_experts}")
            value = value[bank.lo : bank.hi]
        local[key] = value
    model.load_state_dict(local, strict=strict)
