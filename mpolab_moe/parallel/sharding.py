"""Which tensors of an expert bank belong to one expert, and a bank holding a range of experts.

A bank stores its experts stacked along dim 0 (``w1 [E, d, F]``, MPOE auxiliary cores
``[E, r, i, j, r]``, LoRA ``lora_A [E, d, r]``, ...); a few tensors belong to no expert and are
replicated on every rank (MPOE's shared central tensors, :class:`SlicedExperts`' shared output
bias ``b2``). :func:`expert_tensor_names` says which is which for each bank type, and
:func:`local_bank` copies a bank keeping only experts ``[lo, hi)``: the per-expert tensors are
sliced (new parameters of ``hi - lo`` rows), the replicated ones are the *same* tensors (not
copied), and everything else (activation, sizes, options) is copied.

A bank type of your own: :func:`register_expert_tensors`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..experts import DenseExperts, ExpertBank, IA3Experts, LoRAExperts, MPOExperts, SlicedExperts

__all__ = ["expert_tensor_names", "local_bank", "register_expert_tensors"]

#: bank type -> names (as in ``named_parameters`` / ``named_buffers``) of its per-expert tensors
_RULES: dict[type, Callable[[Any], set[str]]] = {}


def register_expert_tensors(bank_type: type, rule: Callable[[Any], set[str]]) -> None:
    """Say which tensors of ``bank_type`` are stacked per expert (dim 0 = ``E``); the rest are replicated.

    Args:
        bank_type: an :class:`ExpertBank` subclass (its subclasses inherit the rule).
        rule: ``bank -> {qualified tensor names}``, as ``bank.named_parameters()`` /
            ``named_buffers()`` name them.

    Examples:
        >>> register_expert_tensors(MyBank, lambda bank: {"weight", "bias"})  # doctest: +SKIP
    """
    if not (isinstance(bank_type, type) and issubclass(bank_type, ExpertBank)):
        raise TypeError(f"bank_type must be an ExpertBank subclass, got {bank_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable (bank -> set of tensor names), got {type(rule).__name__}")
    _RULES[bank_type] = rule


def _mpo(bank: MPOExperts) -> set[str]:
    ids = {id(p) for p in bank.expert_parameters()}
    return {n for n, p in bank.named_parameters() if id(p) in ids}


register_expert_tensors(DenseExperts, lambda bank: {n for n, _ in bank.named_parameters()})
register_expert_tensors(SlicedExperts, lambda bank: {n for n, _ in bank.named_parameters() if n != "b2"} | {"groups"})
register_expert_tensors(LoRAExperts, lambda bank: {"lora_A", "lora_B"})
register_expert_tensors(IA3Experts, lambda bank: {"vectors"})
register_expert_tensors(MPOExperts, _mpo)


def expert_tensor_names(bank: ExpertBank) -> set[str]:
    """The names of ``bank``'s per-expert tensors (parameters and buffers, dim 0 = ``E``).

    Raises:
        TypeError: no rule is registered for the bank's type (the message lists the supported ones).
        ValueError: a tensor the rule names is missing or is not stacked over the ``E`` experts.

    Examples:
        >>> sorted(expert_tensor_names(DenseExperts(8, 16, 4, bias=False)))
        ['w1', 'w2']
    """
    rule = next((_RULES[t] for t in type(bank).__mro__ if t in _RULES), None)
    if rule is None:
        known = ", ".join(sorted(t.__name__ for t in _RULES))
        raise TypeError(
            f"expert parallelism does not know which tensors of {type(bank).__name__} belong to one expert; "
            f"supported: {known}; register yours with mpolab_moe.parallel.register_expert_tensors"
        )
    names = set(rule(bank))
    tensors = _named_tensors(bank)
    for name in sorted(names):
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{type(bank).__name__} has no tensor {name!r} (from its expert-tensor rule)")
        if t.dim() == 0 or t.shape[0] != bank.num_experts:
            raise ValueError(
                f"{type(bank).__name__}.{name} {list(t.shape)} is not stacked over its "
                f"{bank.num_experts} experts (dim 0)"
            )
    return names


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = dict(module.named_parameters())
    out.update(dict(module.named_buffers()))
    return out


def local_bank(bank: ExpertBank, lo: int, hi: int) -> ExpertBank:
    """A copy of ``bank`` with experts ``[lo, hi)`` only (``num_experts = hi - lo``).

    Per-expert tensors are sliced into new tensors (parameters keep ``requires_grad``), replicated
    tensors are shared with ``bank`` (the same objects), caches of the copy are cleared.

    Raises:
        ValueError: an empty or out-of-range ``[lo, hi)``; a bank with hooks (a
            :class:`~mpolab_moe.GradientMask` created before sharding: create it after).

    Examples:
        >>> part = local_bank(DenseExperts(8, 16, 4), 2, 4)
        >>> part.num_experts, tuple(part.w1.shape)
        (2, (2, 8, 16))
    """
    E = bank.num_experts
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= E):
        raise ValueError(f"expert range [{lo}, {hi}) must be non-empty within [0, {E})")
    hooked = [n or type(bank).__name__ for n, m in bank.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    if hooked:
        raise ValueError(
            f"{type(bank).__name__} has forward hooks (on {hooked[0]}): create GradientMask and other hooks after "
            "sharding the experts (expert_parallel / shard_experts), so they attach to the local bank"
        )
    names = expert_tensor_names(bank)
    memo: dict[int, Any] = {}
    for name, t in _named_tensors(bank).items():
        if name not in names:
            memo[id(t)] = t
            continue
        piece = t.detach()[lo:hi].clone()
        memo[id(t)] = nn.Parameter(piece, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else piece
    local = copy.deepcopy(bank, memo)
    for module in local.modules():
        if getattr(module, "num_experts", None) == E:
            object.__setattr__(module, "num_experts", hi - lo)  # a plain int attribute of the bank or matrix
        clear = getattr(module, "clear_cache", None)
        if callable(clear):
            clear()
    return local
