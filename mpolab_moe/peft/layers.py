"""Adapter modules: a frozen base layer composed with a :class:`~mpolab_moe.MoE` of LoRA or (IA)³ experts.

Every adapter holds ``moe = MoE(gate, bank)``: a :class:`~mpolab_moe.gates.soft_merge.SoftMergeGate`
for a mixture (MoLoRA, MoV), a :class:`~mpolab_moe.gates.single.SingleExpertGate` for one expert
(plain LoRA, (IA)³). The tokens go through ``MoE.forward``, so routing statistics
(``adapter.moe.last_stats``) and aux losses work as for any MoE layer. How the MoE's output meets
the base layer follows the bank's :class:`~mpolab_moe.experts.base.BankOutput`, in one place
(:meth:`AdapterLayer.forward`):

* ``UPDATE`` (:class:`LoRALayer`): ``y = base(x) + moe(x)``, ``moe(x) = Σ_e p_e(x) · s (x A_e) B_e``;
* ``SCALED`` (:class:`IA3Layer`): the MoE rescales a tensor, ``y = moe(base(x))`` on the output
  (optionally on a column slice of it), or ``y = base(moe(x))`` on the input for a feed-forward
  down projection; the router reads the tensor being scaled.

The base layer may be an ``nn.Linear``, Hugging Face's ``Conv1D`` (GPT-2) or an
:class:`mpolab.MPOLinear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mpolab.nn import MPOLinear
from mpolab.utils import is_conv1d

from ..experts.base import BankOutput, ExpertBank
from ..experts.ia3 import IA3Experts
from ..experts.lora import LoRAExperts, LoRAInit
from ..gates.base import Gate
from ..gates.single import SingleExpertGate
from ..gates.soft_merge import SoftMergeGate
from ..layer import MoE
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
        weight = _tensor_attr(module, "weight")  # Conv1D weight: [in, out]
        return int(weight.shape[0]), int(weight.shape[1])
    raise TypeError(f"cannot wrap {type(module).__name__}; adapters wrap {WRAPPABLE}")


def _tensor_attr(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` as a tensor (``nn.Module.__getattr__`` is typed ``Tensor | Module``)."""
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} must be a tensor, got {type(value).__name__}")
    return value


def _factory(module: nn.Module) -> dict[str, Any]:
    ref = module.cores[0] if isinstance(module, MPOLinear) else module.weight
    return {"device": ref.device, "dtype": ref.dtype if ref.dtype.is_floating_point else None}


def _gate(width: int, num_experts: int, top_k: int | None, device: torch.device) -> Gate:
    """A soft-merge router for a mixture; the single-expert gate for one expert (plain LoRA / IA3)."""
    if num_experts == 1:
        if top_k not in (None, 1):
            raise ValueError(f"top_k={top_k!r} needs num_experts > 1 (a single expert has no router)")
        return SingleExpertGate(width)
    return SoftMergeGate(width, num_experts, top_k, device=device)


class AdapterLayer(nn.Module):
    """Base class: the frozen ``base_layer`` and ``moe`` (its gate and expert bank), composed in :meth:`forward`.

    ``weight`` and ``bias`` read through to the base layer, for model code that inspects them
    (T5 reads ``wo.weight.dtype``).

    Args:
        base_layer: ``nn.Linear``, ``Conv1D`` or ``MPOLinear``.
        bank: the experts; their ``output_kind`` says how they compose with the base layer.
        top_k: the router's optional top-k mask (mixtures only).
        scale_input: for a ``SCALED`` bank, scale the base layer's input instead of its output.
        out_slice: for a ``SCALED`` bank on the output, the ``(start, stop)`` columns it scales.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        bank: ExpertBank,
        *,
        top_k: int | None = None,
        scale_input: bool = False,
        out_slice: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(base_layer, AdapterLayer):
            raise ValueError("this layer already has an adapter; adapters do not stack")
        self.in_features, self.out_features = base_features(base_layer)
        self.base_layer = base_layer
        self.feedforward, self.out_slice = bool(scale_input), out_slice
        gate = _gate(bank.in_features, bank.num_experts, top_k, _factory(base_layer)["device"])
        self.moe = MoE(gate, bank)

    @property
    def experts(self) -> ExpertBank:
        return self.moe.experts

    @property
    def router(self) -> SoftMergeGate | None:
        """The soft-merge router of a mixture, ``None`` for a single expert."""
        gate = self.moe.gate
        return gate if isinstance(gate, SoftMergeGate) else None

    @property
    def last_routing(self) -> Routing | None:
        return self.moe.last_routing

    @property
    def weight(self) -> Tensor:
        return _tensor_attr(self.base_layer, "weight")

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def routed(self) -> bool:
        return self.router is not None

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` -> ``[..., d_out]``: the base layer and the MoE, composed by the bank's output kind."""
        if self.experts.output_kind is BankOutput.UPDATE:  # LoRA: base(x) + Σ p_e Δ_e(x)
            y = self.base_layer(x)
            return y + self.moe(x).to(y.dtype)
        if self.experts.output_kind is not BankOutput.SCALED:
            raise TypeError(f"an adapter composes UPDATE or SCALED banks, not {self.experts.output_kind}")
        if self.feedforward:  # IA3 on the input: base(x ⊙ l(x))
            return self.base_layer(self.moe(x))
        y = self.base_layer(x)  # IA3 on the output: y ⊙ l(y), on all columns or a slice
        if self.out_slice is None:
            return self.moe(y)
        a, b = self.out_slice
        return torch.cat([y[..., :a], self.moe(y[..., a:b]), y[..., b:]], dim=-1)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of this adapter's structure (enough to rebuild it on the same base)."""
        raise NotImplementedError

    def merge(self) -> nn.Module:
        """Fold the adapter into the base layer's weights and return the base layer."""
        raise NotImplementedError

    def check_mergeable(self, name: str = "") -> None:
        """Raise ``ValueError`` (naming ``name``) unless :meth:`merge` can fold this adapter into its base."""
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

    Examples:
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
        d_in, d_out = base_features(base_layer)
        bank = LoRAExperts(
            d_in,
            d_out,
            num_experts,
            r,
            alpha,
            use_rslora=use_rslora,
            init=init,
            dropout=dropout,
            **_factory(base_layer),
        )
        super().__init__(base_layer, bank, top_k=top_k)

    def describe(self) -> dict[str, Any]:
        e = self.experts
        assert isinstance(e, LoRAExperts)
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
        self.check_mergeable()
        base = self.base_layer
        assert isinstance(self.experts, LoRAExperts)
        delta = self.experts.delta_weight()  # [out, in]
        weight = _tensor_attr(base, "weight")  # updated in place
        if is_conv1d(base):
            weight += delta.T.to(weight.dtype)
        else:
            weight += delta.to(weight.dtype)
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

    Examples:
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
        d_in, d_out = base_features(base_layer)
        if out_slice is not None:
            if feedforward:
                raise ValueError("out_slice applies to output scaling; a feedforward IA3 layer scales its input")
            start, stop = (int(v) for v in out_slice)
            if not 0 <= start < stop <= d_out:
                raise ValueError(f"out_slice must satisfy 0 <= start < stop <= {d_out}, got {out_slice}")
            out_slice = None if (start, stop) == (0, d_out) else (start, stop)
        if feedforward:
            width = d_in
        elif out_slice is not None:
            width = out_slice[1] - out_slice[0]
        else:
            width = d_out
        bank = IA3Experts(width, num_experts, **_factory(base_layer))
        super().__init__(base_layer, bank, top_k=top_k, scale_input=feedforward, out_slice=out_slice)

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
        self.check_mergeable()
        base = self.base_layer
        assert isinstance(self.experts, IA3Experts)
        weight = _tensor_attr(base, "weight")  # updated in place, as the bias
        scale = self.experts.vectors[0].to(weight.dtype)
        conv = is_conv1d(base)  # Conv1D weight [in, out], nn.Linear weight [out, in]
        if self.feedforward:
            weight *= scale[:, None] if conv else scale[None, :]
            return base
        a, b = self.out_slice if self.out_slice is not None else (0, self.out_features)
        if conv:
            weight[:, a:b] *= scale[None, :]
        else:
            weight[a:b] *= scale[:, None]
        bias = getattr(base, "bias", None)
        if bias is not None:
            bias[a:b] *= scale
        return base

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, out_slice={self.out_slice}"
