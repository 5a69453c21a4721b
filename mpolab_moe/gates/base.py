"""The gate interface: ``x [T, d] -> Routing``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..routing import Routing

__all__ = ["Gate", "check_finite_logits", "load_balancing_loss", "router_z_loss"]


class Gate(nn.Module):
    """Base class of gates. Subclasses set ``num_experts`` and ``d_model`` and implement :meth:`forward`.

    A gate may also implement ``bind(experts)``, which the :class:`~mpolab_moe.MoE` layer calls once
    with its expert bank (gates that derive their router from the experts' weights, such as EMoE's
    avg-k gate, use it).
    """

    num_experts: int
    d_model: int

    def forward(self, x: Tensor) -> Routing:  # pragma: no cover - interface
        """``x [T, d]`` -> :class:`Routing` for the ``T`` tokens."""
        raise NotImplementedError

    def bind(self, experts: nn.Module) -> None:
        """Called by the layer with its expert bank; the default does nothing."""


def check_finite_logits(logits: Tensor, where: str) -> None:
    """Raise a clear error instead of routing on NaN/Inf logits."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).sum().item()
        raise ValueError(
            f"{where}: router logits are not finite for {bad} of {logits.shape[0]} tokens "
            "(NaN/Inf in the hidden states or the router weights; check the learning rate and the input)"
        )


def load_balancing_loss(probs: Tensor, first_choice: Tensor) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * mean_p_e``.

    Args:
        probs: ``[T, E]`` router probabilities.
        first_choice: ``[T]`` each token's first expert (``-1``: none, not counted).

    ``f_e`` is the fraction of tokens whose first choice is ``e`` (no gradient), ``mean_p_e`` the
    mean probability of ``e``; the loss is 1 at perfect balance and ``E`` at total collapse.
    """
    E = probs.shape[-1]
    chosen = first_choice[first_choice >= 0]
    if probs.shape[0] == 0 or chosen.numel() == 0:
        return probs.sum() * 0
    f = torch.bincount(chosen, minlength=E).to(probs.dtype) / chosen.numel()
    return E * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` over tokens."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    return torch.logsumexp(logits, dim=-1).square().mean()
