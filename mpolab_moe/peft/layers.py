"""Adapter modules: a frozen base layer plus a LoRA or (IA)³ expert bank, with an optional soft-merge router.

* :class:`LoRALayer` (LoRA, MoLoRA): ``y = base(x) + Σ_e p_e(x) · s (x A_e) B_e``; the router reads
  the layer input ``x``.
* :class:`IA3Layer` (IA3, MoV): ``y = base(x) ⊙ Σ_e p_e(h) l_e`` with ``h = base(x)``, or, for a
  feed-forward down projection, ``y = base(x ⊙ Σ_e p_e(x) l_e)``; the router reads the tensor
  being scaled. With a single expert there is no router and the sums have one term.

The base layer may be an ``nn.Linear``, Hugging Face's ``Conv1D`` (GPT-2) or an
:class:`mpolab.MPOLinear`. The adapters call the banks and the gate directly (no
:class:`~mpolab_moe.MoE` dispatch is needed for soft routing); the same banks also work inside
``MoE`` with any gate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mpolab.compress import is_conv1d
from mpolab.nn import MPOLinear

from ..experts.ia3 import IA3Experts
from ..experts.lora import LoRAExperts, LoRAInit
from ..gates.soft_merge import SoftMergeGate
from ..routing import Routing

__all__ = ["AdapterLayer", "IA3Layer", "LoRALayer", "base_features", "can_wrap"]

WRAPPABLE = "nn.Linear, transformers' Conv1D (GPT-2) and mpolab.MPOLinear"


def can_wrap(module: nn.Module) -> bool:
    """Whether an adapter can wrap ``module``."""
    return isinstance(module, (nn.Linear, MPOLinear)) or is_conv1d(module)


def base_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a wrappable layer."""
    if isinstance(module, (nn.Linear, MPOLinear)):
        return int(module.in_features), int(module.out_features)
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])  # Conv1D weight: [in, out]
    raise TypeError(f"cannot wrap {type(module).__name__}; adapters wrap {WRAPPABLE}")


def _factory(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, MPOLinear):
        ref = module.cores[0]
    else:
        ref = module.weight
    return {"device": ref.device, "dtype": ref.dtype if ref.dtype.is_floating_point else None}


def _router(width: int, num_experts: int, top_k: int | None, device: torch.device) -> SoftMergeGate | None:
    """A soft-merge router for a mixture; ``None`` for a single expert (plain LoRA / IA3)."""
    if num_experts == 1:
        if top_k not in (None, 1):
            raise ValueError(f"top_k={top_k!r} needs num_experts > 1 (a single expert has no router)")
        return None
    return SoftMergeGate(width, num_experts, top_k, device=device)


class AdapterLayer(nn.Module):
    """Base class: holds the frozen ``base_layer``, the ``experts`` bank and the ``router`` (or ``None``).

    ``weight`` and ``bias`` read through to the base layer, for model code that inspects them
    (T5 reads ``wo.weight.dtype``).
    """

    base_layer: nn.Module
    experts: nn.Module
    router: SoftMergeGate | None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if isinstance(base_layer, AdapterLayer):
            raise ValueError("this layer already has an adapter; adapters do not stack")
        self.in_features, self.out_features = base_features(base_layer)
        self.base_layer = base_layer
        self.last_routing: Routing | None = None

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def routed(self) -> bool:
        return self.router is not None

    def _route(self, h: Tensor) -> Tensor:
        """``h [T, d]`` -> soft weights ``[T, E]`` (kept in :attr:`last_routing`)."""
        assert self.router is not None
        routing = self.router(h)
        self.last_routing = routing
        assert routing.soft_weight is not None
        return routing.soft_weight

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of this adapter's structure (enough to rebuild it on the same base)."""
        raise NotImplementedError

    def merge(self) -> nn.Module:
        """Fold the adapter into the base layer's weights and return the base layer."""
        raise NotImplementedError

    def _check_mergeable(self, name: str = "") -> None:
        where = f" {name}" if name else ""
        if self.router is not None:
            raise ValueError(
                f"cannot merge the adapter of{where}: it is a routed mixture of {self.router.num_experts} experts "
                f"({type(self).__name__} with a router); its update depends on each token, so no single weight "
                "equals it. Merging works for plain LoRA and IA3 (num_experts=1)"
            )
        if not isinstance(self.base_layer, nn.Linear) and not is_conv1d(self.base_layer):
            raise ValueError(
                f"cannot merge the adapter of{where} into a {type(self.base_layer).__name__}: merging needs a "
                "dense weight (nn.Linear or Conv1D); an MPO layer would have to be re-decomposed. Convert it with "
                "MPOLinear.to_linear() first, or keep the adapter"
            )


class LoRALayer(AdapterLayer):
    """LoRA (``num_experts = 1``) or MoLoRA around a frozen base layer: ``y = base(x) + Δ(x)``.

    Args:
        base_layer: ``nn.Linear``, ``Conv1D`` or ``MPOLinear``.
        r, alpha, use_rslora, init, dropout: see :class:`~mpolab_moe.experts.lora.LoRAExperts`.
        num_experts: ``E``; with ``E > 1`` a :class:`~mpolab_moe.gates.soft_merge.SoftMergeGate`
            reads ``x`` and the experts are merged per token.
        top_k: the router's optional top-k mask.

    Shape:
        ``x [..., d_in] -> [..., d_out]``.

    Example:
        >>> layer = LoRALayer(nn.Linear(512, 512), r=4, alpha=16, num_experts=10)
        >>> y = layer(torch.randn(2, 7, 512))                 # equals the base output at init
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int = 8,
        alpha: float | None = None,
        num_experts: int = 1,
        top_k: int | None = None,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer)
        kw = _factory(base_layer)
        self.experts = LoRAExperts(
            self.in_features,
            self.out_features,
            num_experts,
            r,
            alpha,
            use_rslora=use_rslora,
            init=init,
            dropout=dropout,
            **kw,
        )
        self.router = _router(self.in_features, num_experts, top_k, kw["device"])

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        tokens = x.reshape(-1, self.in_features)
        if self.router is None:
            delta = self.experts(tokens, [tokens.shape[0]])
        else:
            delta = self.experts.forward_soft(tokens, self._route(tokens))
        return y + delta.view(y.shape).to(y.dtype)

    def describe(self) -> dict[str, Any]:
        e = self.experts
        return {
            "kind": "lora",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_experts": e.num_experts,
            "r": e.r,
            "alpha": e.alpha,
            "use_rslora": e.use_rslora,
            "top_k": None if self.router is None else self.router.top_k,
        }

    @torch.no_grad()
    def merge(self) -> nn.Module:
        self._check_mergeable()
        base = self.base_layer
        delta = self.experts.delta_weight()  # [out, in]
        if is_conv1d(base):
            base.weight += delta.T.to(base.weight.dtype)
        else:
            base.weight += delta.to(base.weight.dtype)
        return base


class IA3Layer(AdapterLayer):
    """(IA)³ (``num_experts = 1``) or MoV around a frozen base layer.

    * output mode (default): ``y = base(x)``, then ``y[..., a:b] ⊙= Σ_e p_e(y[..., a:b]) l_e``
      where ``a:b`` is ``out_slice`` (default: all outputs);
    * ``feedforward=True``: ``y = base(x ⊙ Σ_e p_e(x) l_e)``, the input is scaled (the FFN
      intermediate activation entering the down projection).

    Args:
        base_layer: ``nn.Linear``, ``Conv1D`` or ``MPOLinear``.
        num_experts: ``E``; with ``E > 1`` a soft-merge router reads the tensor being scaled.
        top_k: the router's optional top-k mask.
        feedforward: scale the input instead of the output.
        out_slice: ``(start, stop)`` output columns to scale, e.g. the key and value columns of
            GPT-2's fused ``c_attn`` (``(d, 3d)``); output mode only.

    Shape:
        ``x [..., d_in] -> [..., d_out]``.

    Example:
        >>> layer = IA3Layer(nn.Linear(512, 512), num_experts=10)      # MoV on a key projection
        >>> y = layer(torch.randn(2, 7, 512))
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        num_experts: int = 1,
        top_k: int | None = None,
        feedforward: bool = False,
        out_slice: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(base_layer)
        if out_slice is not None:
            if feedforward:
                raise ValueError("out_slice applies to output scaling; a feedforward IA3 layer scales its input")
            start, stop = (int(v) for v in out_slice)
            if not 0 <= start < stop <= self.out_features:
                raise ValueError(f"out_slice must satisfy 0 <= start < stop <= {self.out_features}, got {out_slice}")
            out_slice = (start, stop)
            if out_slice == (0, self.out_features):
                out_slice = None
        self.feedforward, self.out_slice = bool(feedforward), out_slice
        if feedforward:
            width = self.in_features
        elif out_slice is not None:
            width = out_slice[1] - out_slice[0]
        else:
            width = self.out_features
        kw = _factory(base_layer)
        self.experts = IA3Experts(width, num_experts, **kw)
        self.router = _router(width, num_experts, top_k, kw["device"])

    def _scale(self, h: Tensor) -> Tensor:
        """``h [..., w]`` -> ``h ⊙ l(h)``."""
        if self.router is None:
            return h * self.experts.vectors[0].to(h.dtype)
        tokens = h.reshape(-1, h.shape[-1])
        return self.experts.forward_soft(tokens, self._route(tokens)).view(h.shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.feedforward:
            return self.base_layer(self._scale(x))
        y = self.base_layer(x)
        if self.out_slice is None:
            return self._scale(y)
        a, b = self.out_slice
        return torch.cat([y[..., :a], self._scale(y[..., a:b]), y[..., b:]], dim=-1)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "ia3",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_experts": self.experts.num_experts,
            "top_k": None if self.router is None else self.router.top_k,
            "feedforward": self.feedforward,
            "out_slice": None if self.out_slice is None else list(self.out_slice),
        }

    @torch.no_grad()
    def merge(self) -> nn.Module:
        self._check_mergeable()
        base = self.base_layer
        scale = self.experts.vectors[0].to(base.weight.dtype)
        conv = is_conv1d(base)  # Conv1D weight [in, out], nn.Linear weight [out, in]
        if self.feedforward:
            base.weight *= scale[:, None] if conv else scale[None, :]
            return base
        a, b = self.out_slice if self.out_slice is not None else (0, self.out_features)
        if conv:
            base.weight[:, a:b] *= scale[None, :]
        else:
            base.weight[a:b] *= scale[:, None]
        if getattr(base, "bias", None) is not None:
            base.bias[a:b] *= scale
        return base

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, out_slice={self.out_slice}"
