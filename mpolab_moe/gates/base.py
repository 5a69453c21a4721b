"""The gate contract: ``x [T, d] -> Routing``, with what it requires of the expert bank.

A gate declares

* whether it routes *softly* (:attr:`Gate.soft`: every expert gets a weight, :meth:`Routing.soft
  <mpolab_moe.Routing.soft>`) or sparsely (expert ids and combine weights);
* which bank :class:`~mpolab_moe.experts.base.Capability` it needs (:meth:`Gate.requires`, per
  instance: EMoE's avg-k gate needs neuron keys only when it was not given keys of its own);
* whether it reads the bank's weights (:class:`BankBoundGate`: the :class:`~mpolab_moe.MoE` layer
  calls :meth:`BankBoundGate.bind` once, after checking the requirements).

Batch statistics inside aux losses (the balance loss's expert fractions and mean probabilities)
are over this process's tokens, unless :attr:`Gate.batch_sum` is set: then they are summed over
the processes it reduces over, so the loss is the one of the global batch
(:func:`mpolab_moe.parallel.expert_parallel` sets it; see ``docs/distributed.md``).

Router tensors listed in :attr:`Gate.fp32_tensors` stay in float32 when the model is cast to half
precision (``model.half()``, ``.to(torch.bfloat16)``), as Switch Transformers keep their routers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from mpolab.utils import check_positive_int

from ..experts.base import Capability, ExpertBank
from ..routing import Routing

__all__ = [
    "BankBoundGate",
    "Gate",
    "check_finite_logits",
    "check_k",
    "load_balancing_loss",
    "router_z_loss",
    "top_k_weights",
]


class Gate(nn.Module, ABC):
    """Base class of gates. Subclasses set ``num_experts`` and ``d_model`` and implement :meth:`forward`.

    Examples:
        >>> class First(Gate):
        ...     def __init__(self, d, E):
        ...         super().__init__(); self.d_model, self.num_experts = d, E
        ...     def forward(self, x):
        ...         index = torch.zeros(x.shape[0], 1, dtype=torch.long)
        ...         return Routing(index, torch.ones(x.shape[0], 1), self.num_experts)
    """

    num_experts: int
    d_model: int
    #: ``True`` for gates that return soft routing (a weight for every expert).
    soft: ClassVar[bool] = False
    #: Names of parameters/buffers kept in float32 under ``.half()`` / ``.to(bfloat16)``.
    fp32_tensors: ClassVar[tuple[str, ...]] = ()
    #: Differentiable sum over processes (``[n] -> [n]``) for global batch statistics, or ``None``
    #: (statistics of this process's tokens only). Set by :func:`mpolab_moe.parallel.expert_parallel`.
    batch_sum: Callable[[Tensor], Tensor] | None = None

    @abstractmethod
    def forward(self, x: Tensor) -> Routing:
        """``x [T, d]`` -> :class:`Routing` for the ``T`` tokens."""

    def requires(self) -> frozenset[Capability]:
        """The bank capabilities this gate needs (none by default)."""
        return frozenset()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Gate:
        super()._apply(fn, recurse)
        for name in self.fp32_tensors:
            tensor = getattr(self, name)
            if tensor.dtype == torch.float32:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.float()
            else:
                self._buffers[name] = tensor.float()
        return self


class BankBoundGate(Gate):
    """A gate that reads its expert bank's weights; :class:`~mpolab_moe.MoE` calls :meth:`bind` once.

    ``bind`` runs after the layer has checked :meth:`requires` against the bank's capabilities.
    """

    @abstractmethod
    def bind(self, experts: ExpertBank) -> None:
        """Take what the gate needs from ``experts`` (the layer's bank)."""


def check_k(k: object, num_experts: int, name: str = "k") -> int:
    """``k`` (experts per token) as an int in ``[1, num_experts]``; the error names ``name``."""
    value = check_positive_int(k, name)
    if value > num_experts:
        raise ValueError(f"{name}={value} exceeds num_experts={num_experts}; valid: 1 <= {name} <= num_experts")
    return value


def top_k_weights(top_p: Tensor, *, normalize: bool) -> Tensor:
    """The ``k`` selected probabilities ``[T, k]``, renormalised to sum to 1 when ``normalize``."""
    if not normalize:
        return top_p
    return top_p / top_p.sum(-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny)


def check_finite_logits(logits: Tensor, where: str) -> None:
    """Raise a clear error instead of routing on NaN/Inf logits."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).sum().item()
        raise ValueError(
            f"{where}: router logits are not finite for {bad} of {logits.shape[0]} tokens "
            "(NaN/Inf in the hidden states or the router weights; check the learning rate and the input)"
        )


def load_balancing_loss(
    probs: Tensor, first_choice: Tensor, *, batch_sum: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * mean_p_e``.

    Args:
        probs: ``[T, E]`` router probabilities.
        first_choice: ``[T]`` each token's first expert (``-1``: none, not counted).
        batch_sum: a differentiable sum over processes (:attr:`Gate.batch_sum`): ``f_e`` and
            ``mean_p_e`` are then those of every process's tokens together (the global batch).

    ``f_e`` is the fraction of tokens whose first choice is ``e`` (no gradient), ``mean_p_e`` the
    mean probability of ``e``; the loss is 1 at perfect balance and ``E`` at total collapse.

    Examples:
        >>> probs = torch.softmax(torch.randn(6, 4), -1)
        >>> load_balancing_loss(probs, probs.argmax(-1)) >= 0
        tensor(True)
    """
    E = probs.shape[-1]
    chosen = first_choice[first_choice >= 0]
    if batch_sum is not None:  # every rank takes this branch: the collective runs on all of them
        counts = torch.bincount(chosen, minlength=E).to(probs.dtype)
        size = probs.new_tensor([float(probs.shape[0])])
        total = batch_sum(torch.cat([probs.sum(0), counts, size]))
        p_sum, f_counts, tokens = total[:E], total[E : 2 * E].detach(), total[2 * E].detach()
        if float(tokens) == 0 or float(f_counts.sum()) == 0:
            return p_sum.sum() * 0
        return E * (f_counts / f_counts.sum() * (p_sum / tokens)).sum()
    if probs.shape[0] == 0 or chosen.numel() == 0:
        return probs.sum() * 0
    f = torch.bincount(chosen, minlength=E).to(probs.dtype) / chosen.numel()
    return E * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` over tokens."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    return torch.logsumexp(logits, dim=-1).square().mean()
