"""``TopKGate``: the Switch (k = 1) / GShard (k = 2) router for any k."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpolab.utils import check_choice, check_non_negative_float, check_positive_int

from ..routing import Routing
from .base import Gate, check_finite_logits, check_k, load_balancing_loss, router_z_loss, top_k_weights

__all__ = ["TopKGate"]

Noise = Literal["jitter", "gaussian"]
Weighting = Literal["prob", "one"]


class TopKGate(Gate):
    """Linear router ``d -> E`` in fp32, optional noise, softmax, top-k.

    Args:
        d_model: token width ``d``.
        num_experts: ``E``.
        k: experts per token, ``1 <= k <= E``.
        noise: ``None``; ``"jitter"`` (Switch: the router input is multiplied by
            ``U(1 - noise_eps, 1 + noise_eps)``) or ``"gaussian"`` (``N(0, noise_eps^2)`` added to the
            logits); only in training.
        noise_eps: the noise scale above.
        normalize: renormalise the k selected probabilities to sum to 1 (GShard). Default: ``k > 1``.
        weighting: ``"prob"`` multiplies each expert's output by its (renormalised) probability;
            ``"one"`` by ``p / p.detach()``, value 1 with the gradient still reaching the router (the
            MPOE authors' choice: an upcycled layer then equals the dense FFN at step 0).
        balance_loss_weight: coefficient of :func:`~mpolab_moe.gates.base.load_balancing_loss`.
        z_loss_weight: coefficient of :func:`~mpolab_moe.gates.base.router_z_loss` (ST-MoE uses 1e-3).

    The aux losses are returned already weighted; ``mpolab_moe.aux_loss(model)`` sums them over
    the model's MoE layers.

    Examples:
        >>> gate = TopKGate(768, num_experts=8, k=2)                       # GShard top-2
        >>> routing = gate(torch.randn(10, 768))
        >>> routing.expert_index.shape, routing.aux_losses.keys()
        (torch.Size([10, 2]), dict_keys(['balance']))
    """

    fp32_tensors = ("weight",)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        *,
        noise: Noise | None = None,
        noise_eps: float = 1e-2,
        normalize: bool | None = None,
        weighting: Weighting = "prob",
        balance_loss_weight: float = 1.0,
        z_loss_weight: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        self.k = check_k(k, check_positive_int(num_experts, "num_experts"))
        check_choice(noise, "noise", (None, "jitter", "gaussian"))
        check_choice(weighting, "weighting", ("prob", "one"))
        for name, value in (
            ("noise_eps", noise_eps),
            ("balance_loss_weight", balance_loss_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            check_non_negative_float(value, name)
        self.d_model, self.num_experts = d_model, num_experts
        self.noise, self.noise_eps = noise, noise_eps
        self.normalize = k > 1 if normalize is None else normalize
        self.weighting = weighting
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        # the router stays fp32 even when the model is cast to half (Gate.fp32_tensors)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.d_model**-0.5 * 0.1)

    def logits(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> fp32 router logits ``[T, E]`` (noise included in training)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"gate expects tokens of width d_model={self.d_model}, got {x.shape[-1]}")
        h = x.float()
        if self.training and self.noise == "jitter" and self.noise_eps > 0:
            h = h * torch.empty_like(h).uniform_(1 - self.noise_eps, 1 + self.noise_eps)
        logits = F.linear(h, self.weight.float())
        if self.training and self.noise == "gaussian" and self.noise_eps > 0:
            logits = logits + torch.randn_like(logits) * self.noise_eps
        return logits

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        check_finite_logits(logits, type(self).__name__)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        top_p = top_k_weights(top_p, normalize=self.normalize)
        weight = top_p / top_p.detach().clamp_min(torch.finfo(top_p.dtype).tiny) if self.weighting == "one" else top_p
        aux: dict[str, Tensor] = {}
        if self.balance_loss_weight:
            aux["balance"] = self.balance_loss_weight * load_balancing_loss(
                probs, top_i[:, 0], batch_sum=self.batch_sum
            )
        if self.z_loss_weight:
            aux["z"] = self.z_loss_weight * router_z_loss(logits)
        return Routing(top_i, weight, self.num_experts, aux_losses=aux, probs=probs.detach())

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, noise={self.noise!r}, "
            f"normalize={self.normalize}, weighting={self.weighting!r}"
        )
