"""Recognise the feed-forward networks of Hugging Face models: :class:`FFN` and :func:`find_ffns`.

:func:`find_ffns` finds the FFNs of a model (T5, GPT-2, BERT, LLaMA families) and reads their
weights in one layout, ``w1 [F, d]``, ``w2 [d_out, F]`` (``nn.Linear``'s), as :class:`FFN`, an
:class:`~mpolab_moe.experts.base.FFNWeights` that also knows where it sits in the model
(:meth:`FFN.install` puts a MoE in its place).

Layer indices are positions in :func:`ffn_slots`, the model's FFNs in block order, those already
converted to a mixture of experts included, so an index means the same FFN before and after a
conversion. For T5 the encoder's blocks come first: with ``n`` blocks per stack, indices
``0..n-1`` are the encoder's FFNs and ``n..2n-1`` the decoder's. Module names work as well
(``"decoder.block.1"``, ``"encoder"``).

Examples:
    >>> ffn = find_ffns(gpt2)[0]
    >>> ffn.name, ffn.w1.shape, ffn.activation
    ('transformer.h.0.mlp', torch.Size([3072, 768]), 'gelu_new')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from mpolab.utils import is_conv1d, set_submodule

from .activations import ACTIVATIONS, Activation
from .experts.base import FFNWeights
from .layer import moe_layers

__all__ = ["FFN", "SUPPORTED_FFNS", "LayerSpec", "MoEWithDropout", "ffn_slots", "find_ffns"]

Family = Literal["t5", "gpt2", "bert", "llama", "sequential"]
LayerSpec = int | str | Sequence[int | str] | None

#: The FFN shapes :func:`~mpolab_moe.upcycle.upcycle` and :func:`find_ffns` recognise, as named in error messages.
SUPPORTED_FFNS: tuple[str, ...] = (
    "T5DenseActDense (wi, wo)",
    "T5DenseGatedActDense (wi_0, wi_1, wo)",
    "GPT2MLP (c_fc, c_proj as Conv1D or Linear)",
    "BertLayer (intermediate.dense + output.dense)",
    "LlamaMLP and look-alikes (gate_proj, up_proj, down_proj)",
    "nn.Sequential(Linear, activation, Linear) (only when passed directly or by name)",
)

#: The config attribute that names each family's FFN activation.
_CONFIG_ACTIVATION = {"t5": "dense_act_fn", "gpt2": "activation_function", "bert": "hidden_act", "llama": "hidden_act"}

#: Activation modules whose function has a name in :data:`~mpolab_moe.activations.ACTIVATIONS`.
_ACTIVATION_CLASSES = {
    "ReLU": "relu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_new",
    "GELUTanh": "gelu_pytorch_tanh",
    "PytorchGELUTanh": "gelu_pytorch_tanh",
    "FastGELUActivation": "gelu_fast",
    "QuickGELUActivation": "quick_gelu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "Tanh": "tanh",
    "Identity": "identity",
}


@dataclass(frozen=True, eq=False, kw_only=True)
class FFN(FFNWeights):
    """One feed-forward network of a model: its :class:`FFNWeights` and its place in the model.

    The tensors are detached views of the model's parameters (GPT-2's ``Conv1D`` weights are
    transposed), so building an FFN copies nothing. Every bank's ``from_ffn`` takes it directly.

    Attributes:
        w1, w2, w_gate, b1, b2, activation: see :class:`FFNWeights` (``w1`` is LLaMA's ``up_proj`` /
            T5 gated ``wi_1``; ``w_gate`` LLaMA's ``gate_proj`` / T5 ``wi_0``). ``activation`` is a
            name from :data:`~mpolab_moe.activations.ACTIVATIONS`, or the module's own activation
            callable when the config names one that has no entry there.
        name: qualified module name in the model (``""`` for a module given on its own).
        module: the FFN module (for BERT the ``BertLayer`` that holds ``intermediate`` and ``output``).
        family: ``"t5"``, ``"gpt2"``, ``"bert"``, ``"llama"`` or ``"sequential"``.

    Examples:
        >>> ffn = find_ffns(gpt2)[0]
        >>> ffn.name, ffn.w1.shape, ffn.activation
        ('transformer.h.0.mlp', torch.Size([3072, 768]), 'gelu_new')
        >>> DenseExperts.from_ffn(ffn, num_experts=8)
    """

    name: str
    module: nn.Module
    family: Family

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "", config: Any = None) -> FFN:
        """Recognise ``module`` as an FFN; ``config`` (the model's HF config) names its activation.

        Raises:
            TypeError: ``module`` is none of :data:`SUPPORTED_FFNS`.
        """
        if config is None:
            config = getattr(module, "config", None)  # LlamaMLP keeps its config
        ffn = _recognise(module, name, config, allow_sequential=True)
        if ffn is None:
            raise TypeError(
                f"cannot upcycle a {type(module).__name__}{f' ({name!r})' if name else ''}; "
                f"supported FFN modules: {', '.join(SUPPORTED_FFNS)}"
            )
        return ffn

    def install(self, model: nn.Module, moe: nn.Module) -> None:
        """Put ``moe`` in place of this FFN inside ``model`` so that the model's forward uses it.

        * T5: ``DenseReluDense`` becomes ``moe``; ``T5LayerFF`` keeps its layer norm, dropout and residual.
        * GPT-2: ``mlp`` becomes :class:`MoEWithDropout` (``moe`` then GPT-2's residual dropout).
        * BERT: ``intermediate`` becomes ``nn.Identity`` and ``output.dense`` becomes ``moe``, so
          ``BertOutput`` still applies dropout, the residual and ``LayerNorm``.
        * LLaMA and ``nn.Sequential``: the module becomes ``moe``.

        Raises:
            ValueError: the FFN was given on its own (no name), or ``model`` no longer holds it there.
        """
        if not self.name:
            raise ValueError(
                f"this {type(self.module).__name__} was given on its own and has no place in a model; "
                "get FFNs with find_ffns(model) to install into the model"
            )
        try:
            current = model.get_submodule(self.name)
        except AttributeError:
            current = None
        if current is not self.module:
            found = "nothing" if current is None else f"a {type(current).__name__}"
            raise ValueError(
                f"model holds {found} at {self.name!r}, not this FFN's {type(self.module).__name__} "
                "(already converted, or an FFN of another model?)"
            )
        moe.__dict__["converted_ffn"] = self.name  # keeps this FFN's slot (its layer index) in ffn_slots
        if self.family == "bert":
            self.module.intermediate = nn.Identity()
            self.module.get_submodule("output").dense = moe
        elif self.family == "gpt2":
            set_submodule(model, self.name, MoEWithDropout(moe, self.module.get_submodule("dropout")))
        else:
            set_submodule(model, self.name, moe)


class MoEWithDropout(nn.Module):
    """``dropout(moe(x))``: what takes GPT-2's ``mlp`` slot (GPT2MLP ends with the residual dropout).

    Examples:
        >>> block.mlp = MoEWithDropout(moe, block.mlp.dropout)
    """

    def __init__(self, moe: nn.Module, dropout: nn.Module) -> None:
        super().__init__()
        self.moe, self.dropout = moe, dropout

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` -> ``[..., d_out]``."""
        return self.dropout(self.moe(x))


def _linear(module: Any) -> tuple[Tensor, Tensor | None] | None:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or HF ``Conv1D`` (stored ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        w = module.weight
    elif is_conv1d(module) and isinstance(module.weight, Tensor):
        w = module.weight.T
    else:
        return None
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return w.detach(), bias


def _activation(family: str, act: Any, config: Any) -> Activation:
    """The FFN's activation: the config's name when it is in ACTIVATIONS, else the module's callable."""
    name = None
    if config is not None and family in _CONFIG_ACTIVATION:
        name = getattr(config, _CONFIG_ACTIVATION[family], None)
        if name is None and family == "t5":  # configs older than ``dense_act_fn``
            proj = getattr(config, "feed_forward_proj", "relu")
            name = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
        if callable(name):  # BERT accepts a callable hidden_act
            return name
    if name is None and act is not None:
        cls = type(act).__name__
        if cls == "GELU":  # torch.nn.GELU
            name = "gelu" if getattr(act, "approximate", "none") == "none" else "gelu_pytorch_tanh"
        else:
            name = _ACTIVATION_CLASSES.get(cls)
    if isinstance(name, str) and name in ACTIVATIONS:
        return name
    if act is None or not callable(act):
        raise ValueError(f"cannot tell the activation of this {family} FFN (config says {name!r})")
    return act


def _recognise(module: nn.Module, name: str, config: Any, *, allow_sequential: bool) -> FFN | None:
    """An :class:`FFN` when ``module`` has one of the supported structures, else ``None``."""

    def ffn(family: Family, w1: Any, w2: Any, act: Any, w_gate: Any = None) -> FFN:
        (W1, B1), (W2, B2) = w1, w2
        Wg = None
        if w_gate is not None:
            Wg, Bg = w_gate
            if Bg is not None:
                raise ValueError(f"{name or type(module).__name__}: a bias on the gate projection is not supported")
        activation = _activation(family, act, config)
        return FFN(
            w1=W1, w2=W2, w_gate=Wg, b1=B1, b2=B2, activation=activation, name=name, module=module, family=family
        )

    get = module._modules.get
    if get("wo") is not None and (get("wi") is not None or (get("wi_0") is not None and get("wi_1") is not None)):
        wo = _linear(get("wo"))
        act = getattr(module, "act", None)
        if get("wi") is not None:
            wi = _linear(get("wi"))
            if wi is not None and wo is not None:
                return ffn("t5", wi, wo, act)
        else:
            wi_0, wi_1 = _linear(get("wi_0")), _linear(get("wi_1"))
            if wi_0 is not None and wi_1 is not None and wo is not None:
                return ffn("t5", wi_1, wo, act, w_gate=wi_0)
    if get("c_fc") is not None and get("c_proj") is not None and get("dropout") is not None:
        c_fc, c_proj = _linear(get("c_fc")), _linear(get("c_proj"))
        if c_fc is not None and c_proj is not None:
            return ffn("gpt2", c_fc, c_proj, getattr(module, "act", None))
    if all(get(n) is not None for n in ("gate_proj", "up_proj", "down_proj")):
        gate, up, down = (_linear(get(n)) for n in ("gate_proj", "up_proj", "down_proj"))
        if gate is not None and up is not None and down is not None:
            return ffn("llama", up, down, getattr(module, "act_fn", None), w_gate=gate)
    inter, out = get("intermediate"), get("output")
    if inter is not None and out is not None and hasattr(out, "LayerNorm"):
        dense_in, dense_out = _linear(getattr(inter, "dense", None)), _linear(getattr(out, "dense", None))
        if dense_in is not None and dense_out is not None:
            return ffn("bert", dense_in, dense_out, getattr(inter, "intermediate_act_fn", None))
    if allow_sequential and isinstance(module, nn.Sequential) and len(module) == 3:
        first, act, last = _linear(module[0]), module[1], _linear(module[2])
        if first is not None and last is not None and _linear(act) is None:
            return ffn("sequential", first, last, act)
    return None


# ---------------------------------------------------------------------------------- find_ffns


def ffn_slots(model: nn.Module) -> list[FFN | str]:
    """The model's FFN positions in block order: an :class:`FFN`, or the name of one already converted.

    :meth:`FFN.install` marks the module it installs (``converted_ffn``), so a converted FFN keeps
    its position and layer indices stay the model's own layer numbers across conversions.

    Examples:
        >>> moefy(gpt2, layers=[0]); ffn_slots(gpt2)[:2]
        ['transformer.h.0.mlp', FFN(name='transformer.h.1.mlp', ...)]
    """
    config = getattr(model, "config", None)
    slots: list[FFN | str] = []
    converted_at: str | None = None
    for name, module in model.named_modules():
        if converted_at is not None and _under(name, converted_at):
            continue
        converted = module.__dict__.get("converted_ffn")
        if isinstance(converted, str):
            slots.append(converted)
            converted_at = name
            continue
        ffn = _recognise(module, name, config, allow_sequential=False)
        if ffn is not None:
            slots.append(ffn)
    return slots


def find_ffns(model: nn.Module, layers: LayerSpec = None) -> list[FFN]:
    """The recognised FFNs of ``model`` in block order, or the chosen ones.

    Args:
        model: a Hugging Face model (T5, GPT-2, BERT, LLaMA families, any head) or any module
            holding such FFNs.
        layers: ``None`` (all), an index or a list of indices into the full list (negative ones
            count from the end; T5: encoder blocks ``0..n-1``, then decoder blocks ``n..2n-1``),
            or module names: a name selects every FFN at or under that module (``"encoder"``), or
            the FFN containing it (``"encoder.layer.0.output"``); a name of an ``nn.Sequential(
            Linear, act, Linear)`` selects that module.

    Returns:
        :class:`FFN` list in block order, without duplicates.

    Raises:
        ValueError: no recognised FFN, an index out of range, or an unknown module name.
        TypeError: a named module that is not a supported FFN.

    Examples:
        >>> [f.name for f in find_ffns(t5, layers=[0, -1])]
        ['encoder.block.0.layer.1.DenseReluDense', 'decoder.block.5.layer.2.DenseReluDense']
    """
    slots = ffn_slots(model)
    found = {i: s for i, s in enumerate(slots) if isinstance(s, FFN)}
    if layers is None:
        if not found:
            raise _no_ffn_error(model)
        return list(found.values())
    specs = [layers] if isinstance(layers, (int, str)) else list(layers)
    if not specs:
        raise ValueError("layers is empty; give None for every FFN, or indices / module names")
    chosen: dict[int, FFN] = {}
    extra: list[FFN] = []
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise TypeError(f"layers must hold ints (block indices) or str (module names), got {spec!r}")
        if isinstance(spec, int):
            chosen[spec % len(slots)] = _slot(model, slots, spec)
            continue
        hits = {i: f for i, f in found.items() if _under(f.name, spec) or _under(spec, f.name)}
        if hits:
            chosen.update(hits)
            continue
        try:
            module = model.get_submodule(spec)
        except AttributeError:
            ffns = list(found.values())
            names = ", ".join(repr(f.name) for f in ffns[:4]) + (", ..." if len(ffns) > 4 else "")
            raise ValueError(
                f"{type(model).__name__} has no module named {spec!r}" + (f"; its FFNs are {names}" if found else "")
            ) from None
        ffn = FFN.from_module(module, spec, getattr(model, "config", None))
        if all(e.module is not module for e in extra):
            extra.append(ffn)
    return [chosen[i] for i in sorted(chosen)] + extra


def _slot(model: nn.Module, slots: list[FFN | str], index: int) -> FFN:
    """The FFN at layer ``index`` of ``slots``, refusing an index out of range or already converted."""
    if not slots:
        raise _no_ffn_error(model)
    if not -len(slots) <= index < len(slots):
        raise ValueError(
            f"layer index {index} out of range: {type(model).__name__} has {len(slots)} FFNs, "
            f"valid indices 0..{len(slots) - 1} (or -{len(slots)}..-1)"
        )
    slot = slots[index % len(slots)]
    if isinstance(slot, str):
        raise ValueError(
            f"layer {index} ({slot!r}) is already a mixture of experts; moefy converts each FFN once "
            "(layer indices are the model's own FFN numbers, converted ones included)"
        )
    return slot


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside it (``""`` is the root, which holds everything)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _no_ffn_error(model: nn.Module) -> ValueError:
    converted = len(moe_layers(model))
    note = f" (it already has {converted} MoE layers: moefy converts each FFN once)" if converted else ""
    return ValueError(f"found no supported FFN in {type(model).__name__}{note}; supported: {', '.join(SUPPORTED_FFNS)}")
