"""The value a gate hands to the :class:`~mpolab_moe.MoE` layer.

A :class:`Routing` says, for each of ``T`` tokens, which experts see it and with what weight.
Two forms cover every gate in this package:

* **sparse** (top-k, avg-k, top-any, MoEfication routers): ``expert_index [T, k]`` and
  ``combine_weight [T, k]``; a slot holding ``-1`` is empty, so a token may use anywhere from 0 to
  ``k`` experts (top-any gates set ``k = E``);
* **soft** (MoV / MoLoRA soft merging): ``soft_weight [T, E]``, every expert gets a weight and the
  expert bank may merge its parameters before touching the tokens.

Auxiliary losses ride along already multiplied by the gate's coefficients, so the layer just adds
them up.

Examples:
    >>> idx = torch.tensor([[0], [2], [-1]])                  # third token: no expert
    >>> r = Routing(idx, torch.ones(3, 1), num_experts=4)
    >>> r.experts_per_token
    tensor([1, 1, 0])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Routing", "RoutingStats"]


@dataclass
class Routing:
    """Routing decision for ``T`` tokens over ``num_experts`` experts.

    Attributes:
        expert_index: ``[T, k]`` int64 expert ids, ``-1`` marks an empty slot. ``None`` for soft routing.
        combine_weight: ``[T, k]`` weights the expert outputs are multiplied by (fp32, carries the
            gradient to the router). ``None`` for soft routing.
        num_experts: ``E``.
        soft_weight: ``[T, E]`` weights of every expert for soft-merging gates, else ``None``.
        aux_losses: named auxiliary losses, already weighted by the gate's coefficients.
        probs: ``[T, E]`` router probabilities (for statistics), when the gate has them.
    """

    expert_index: Tensor | None
    combine_weight: Tensor | None
    num_experts: int
    soft_weight: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    probs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.soft_weight is None:
            if self.expert_index is None or self.combine_weight is None:
                raise ValueError("a sparse Routing needs expert_index and combine_weight (or give soft_weight)")
            if self.expert_index.shape != self.combine_weight.shape or self.expert_index.dim() != 2:
                raise ValueError(
                    f"expert_index {tuple(self.expert_index.shape)} and combine_weight "
                    f"{tuple(self.combine_weight.shape)} must both be [T, k]"
                )
        elif self.soft_weight.dim() != 2 or self.soft_weight.shape[1] != self.num_experts:
            raise ValueError(f"soft_weight must be [T, {self.num_experts}], got {tuple(self.soft_weight.shape)}")

    @classmethod
    def soft(cls, weight: Tensor, **kwargs: object) -> Routing:
        """Soft routing: ``weight [T, E]`` gives every expert a weight."""
        return cls(None, None, weight.shape[1], soft_weight=weight, **kwargs)  # type: ignore[arg-type]

    @property
    def is_soft(self) -> bool:
        return self.soft_weight is not None

    @property
    def num_tokens(self) -> int:
        ref = self.soft_weight if self.soft_weight is not None else self.expert_index
        assert ref is not None
        return ref.shape[0]

    @property
    def experts_per_token(self) -> Tensor:
        """``[T]`` number of experts each token uses (0 allowed for top-any gates)."""
        if self.soft_weight is not None:
            return (self.soft_weight != 0).sum(-1)
        assert self.expert_index is not None
        return (self.expert_index >= 0).sum(-1)

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the weighted auxiliary losses, ``None`` when the gate has none."""
        if not self.aux_losses:
            return None
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()

    def as_sparse(self) -> Routing:
        """Soft routing as sparse routing over all ``E`` experts (for banks that cannot merge)."""
        if self.soft_weight is None:
            return self
        T, E = self.soft_weight.shape
        index = torch.arange(E, device=self.soft_weight.device).expand(T, E)
        return Routing(index, self.soft_weight, E, aux_losses=self.aux_losses, probs=self.probs)


@dataclass
class RoutingStats:
    """What the last forward of an :class:`~mpolab_moe.MoE` layer did (detached tensors).

    Attributes:
        tokens_per_expert: ``[E]`` tokens each expert processed (after capacity drops).
        dropped: (token, expert) assignments dropped by the capacity limit.
        tokens_without_expert: tokens that reached no expert (dropped, or a top-any gate gave none).
        num_tokens: ``T``.
        aux_losses: the gate's weighted auxiliary losses, detached.
    """

    tokens_per_expert: Tensor
    dropped: int
    tokens_without_expert: int
    num_tokens: int
    aux_losses: dict[str, float] = field(default_factory=dict)

    @property
    def load_imbalance(self) -> float:
        """Max over mean tokens per expert (1.0 is perfect balance)."""
        counts = self.tokens_per_expert.float()
        mean = counts.mean().item()
        return counts.max().item() / mean if mean > 0 else float("nan")
