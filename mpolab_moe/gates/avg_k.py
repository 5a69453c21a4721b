"""``AvgKGate``: EMoE's avg-k gate, a frozen router read off the experts' own key rows.

Row ``e`` of the router is the mean of expert ``e``'s key rows (``W1`` rows, or the gate
projection's rows for a gated FFN), so the logit ``x . mean_i(k_i)`` is the average pre-activation
of the expert's neurons. Training adds ``gate_noise * N(0, 1) / E`` to the logits; then softmax and
top-k. With ``one_score=True`` every selected expert gets weight 1 (no renormalisation): the layer
computes exactly the dense FFN with the unselected neuron groups zeroed.

The gate has no trainable parameter. Its router is a buffer re-derived from the current keys:
:meth:`AvgKGate.refresh` by hand, or once after every optimizer step with
``AvgKGate.attach(optimizer, model)``.

Examples:
    >>> bank = SlicedExperts.from_ffn(FFNWeights(w1, w2, b1=b1, b2=b2, activation="gelu"), balanced_kmeans(w1, 16))
    >>> layer = MoE(AvgKGate(768, 16, k=4), bank, capacity_factor=1.5)     # bind() reads bank.keys()
    >>> handle = AvgKGate.attach(optimizer, model)                          # refresh after every step
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mpolab.utils import check_choice, check_non_negative_float, check_positive_int

from ..experts.base import Capability, ExpertBank, KeyedBank
from ..routing import Routing
from .base import BankBoundGate, check_finite_logits, check_k, load_balancing_loss, top_k_weights

__all__ = ["AvgKGate", "refresh_avg_k_gates"]

Score = Literal["keys", "activation"]
SCORES = ("keys", "activation")


class AvgKGate(BankBoundGate):
    """EMoE's avg-k top-k gate over an expert bank that exposes ``keys() -> [E, F/E, d]``.

    Args:
        d_model: token width ``d``.
        num_experts: ``E``.
        k: experts per token, ``1 <= k <= E`` (EMoE: 4 of 16 for BERT, 16 of 64 for LLaMA).
        one_score: every selected expert's combine weight is 1 (EMoE's one-score gate); otherwise
            the softmax probability (renormalised over the ``k`` when ``normalize``).
        normalize: renormalise the ``k`` probabilities to sum to 1 (only without ``one_score``).
        gate_noise: training noise scale: ``gate_noise * N(0, 1) / E`` is added to the logits
            (EMoE's default 1.0; 0 for none).
        score: ``"keys"`` (default): ``logit_e = x . mean_i key_{e,i}``, the mean pre-activation of the
            expert's neurons; for a gated FFN (LLaMA) the keys are ``gate_proj`` rows, so this is
            EMoE's LLaMA score, the mean of ``gate_proj(x)`` over the expert's block.
            ``"activation"``: ``logit_e = mean_i act(x . key_{e,i} (+ b1_i))``, the mean of the
            *activated* values (needs the full ``[T, F]`` projection, the bank's ``act`` and ``b1``).
        balance_loss_weight: coefficient of the Switch/GShard balance loss on the softmax
            probabilities (EMoE: 0.01; its gradient reaches the hidden states, not the frozen router).
        keys: ``[E, m, d]`` keys to use when the bank has none (MPO or dense experts), or without
            a layer; a bank with ``keys()`` replaces them at :meth:`bind`.

    Requires (:meth:`requires`): a bank with ``Capability.KEYS`` unless ``keys`` are given, and one
    with ``Capability.NEURON_GROUPS`` (activation, biases) for ``score="activation"``.

    Attributes:
        router: ``[E, d]`` fp32 buffer, the mean key rows from the last :meth:`refresh`.

    Examples:
        >>> bank = SlicedExperts.from_ffn(FFNWeights(w1, w2), random_split(64, 4))   # w1 [64, 16]
        >>> layer = MoE(AvgKGate(16, 4, k=4), bank)                            # k = E, one score
        >>> torch.allclose(layer(x), F.relu(x @ w1.T) @ w2.T)                  # the dense FFN
        True
    """

    fp32_tensors = ("router",)
    router: Tensor  # buffer (registered in __init__)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        one_score: bool = True,
        normalize: bool = False,
        gate_noise: float = 1.0,
        score: Score = "keys",
        balance_loss_weight: float = 0.01,
        keys: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.k = check_k(k, num_experts)
        self.score = check_choice(score, "score", SCORES)
        self.gate_noise = check_non_negative_float(gate_noise, "gate_noise")
        self.balance_loss_weight = check_non_negative_float(balance_loss_weight, "balance_loss_weight")
        self.one_score, self.normalize = bool(one_score), bool(normalize)
        self.register_buffer("router", torch.zeros(num_experts, d_model, device=device))
        # the bank is held outside the module tree (it belongs to the MoE layer, not to the gate)
        self.__dict__["_bank"] = None
        self.__dict__["_keys"] = None
        self.bound = False
        if keys is not None:
            if score == "activation":
                raise ValueError("score='activation' needs the bank's activation and biases: bind a SlicedExperts bank")
            self._check_keys(keys)
            self.__dict__["_keys"] = keys
            self.bound = True
            self.refresh()

    # ---------------------------------------------------------------- keys
    def _check_keys(self, keys: Tensor) -> None:
        if not isinstance(keys, Tensor) or keys.dim() != 3 or keys.shape[0] != self.num_experts:
            shape = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise ValueError(f"keys must be [E={self.num_experts}, neurons per expert, d={self.d_model}], got {shape}")
        if keys.shape[2] != self.d_model:
            raise ValueError(f"keys have width {keys.shape[2]}, the gate expects d_model={self.d_model}")

    def requires(self) -> frozenset[Capability]:
        """``KEYS`` unless built with ``keys=``; ``NEURON_GROUPS`` for ``score="activation"``."""
        if self.score == "activation":
            return frozenset({Capability.KEYS, Capability.NEURON_GROUPS})
        return frozenset() if self.__dict__["_keys"] is not None else frozenset({Capability.KEYS})

    def bind(self, experts: ExpertBank) -> None:
        """Take the keys from ``experts.keys()`` (``[E, F/E, d]``) and derive the router from them.

        A gate built with ``keys=`` keeps them when the bank has no keys (e.g. MPO or dense
        experts routed by the mean key rows of a MoEfication split of the same FFN).

        Raises:
            TypeError: the bank lacks a capability :meth:`requires` names.
        """
        missing = self.requires() - experts.capabilities
        if missing:
            names = ", ".join(sorted(c.name for c in missing))
            raise TypeError(f"AvgKGate needs a bank with {names} (SlicedExperts), got {type(experts).__name__}")
        if not experts.has(Capability.KEYS):
            return
        self._check_keys(cast(KeyedBank, experts).keys())  # Capability.KEYS guarantees keys()
        self.__dict__["_bank"] = experts
        self.bound = True
        self.refresh()

    def keys(self) -> Tensor:
        """``[E, m, d]`` current keys (from the bound bank, else the ``keys`` given at construction)."""
        bank = self.__dict__["_bank"]
        if bank is not None:
            return bank.keys()
        keys = self.__dict__["_keys"]
        if keys is None:
            raise ValueError(
                "AvgKGate has no keys: put it in MoE(gate, SlicedExperts...) (which calls bind) or pass keys=[E, m, d]"
            )
        return keys

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derive the router from the current keys: ``router[e] = mean_i keys[e, i]``."""
        keys = self.keys()
        self.router.copy_(keys.detach().float().mean(1).to(self.router.device))

    @staticmethod
    def attach(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
        """Refresh every :class:`AvgKGate` in ``model`` after each ``optimizer.step()``.

        Returns the hook's handle (``handle.remove()`` detaches it).

        Examples:
            >>> handle = AvgKGate.attach(optimizer, model)
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, AvgKGate) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} holds no AvgKGate; nothing to refresh")

        def refresh(*_: object) -> None:
            refresh_avg_k_gates(model)

        return optimizer.register_step_post_hook(refresh)

    # -------------------------------------------------------------- forward
    def logits(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> fp32 logits ``[T, E]`` (noise not included)."""
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"gate expects tokens [T, d_model={self.d_model}], got {tuple(x.shape)}")
        if not self.bound:
            self.keys()  # raises the explanation
        if self.score == "keys":
            return x.float() @ self.router.T
        bank = self.__dict__["_bank"]
        keys = self.keys().detach()
        E, m, d = keys.shape
        pre = (x.to(keys.dtype) @ keys.reshape(E * m, d).T).view(-1, E, m)  # one [T, d] x [d, F] GEMM
        b1 = getattr(bank, "b1", None)
        if b1 is not None and not getattr(bank, "gated", False):
            pre = pre + b1.detach()
        return bank.act(pre).float().mean(-1)

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        check_finite_logits(logits, type(self).__name__)
        if self.training and self.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * (self.gate_noise / self.num_experts)
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        weight = torch.ones_like(top_p) if self.one_score else top_k_weights(top_p, normalize=self.normalize)
        aux: dict[str, Tensor] = {}
        if self.balance_loss_weight:
            aux["balance"] = self.balance_loss_weight * load_balancing_loss(
                probs, top_i[:, 0], batch_sum=self.batch_sum
            )
        return Routing(top_i, weight, self.num_experts, aux_losses=aux, probs=probs.detach())

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, one_score={self.one_score}, "
            f"gate_noise={self.gate_noise}, score={self.score!r}, balance_loss_weight={self.balance_loss_weight}"
        )


@torch.no_grad()
def refresh_avg_k_gates(model: nn.Module) -> int:
    """Call :meth:`AvgKGate.refresh` on every avg-k gate in ``model``; returns how many."""
    gates = [m for m in model.modules() if isinstance(m, AvgKGate)]
    for gate in gates:
        gate.refresh()
    return len(gates)
