"""Turn the feed-forward networks of Hugging Face models into mixtures of experts.

Three steps, each usable on its own:

* :func:`find_ffns` recognises the FFNs of a model (T5, GPT-2, BERT, LLaMA families) and reads
  their weights in one layout, ``w1 [F, d]``, ``w2 [d_out, F]`` (``nn.Linear``'s), as :class:`FFN`;
* :func:`upcycle` builds an :class:`~mpolab_moe.MoE` from one FFN whose every expert starts as a
  copy of it (MPOE with ``experts="mpo"``, Switch-style with ``experts="dense"``);
* :func:`moefy` does both for chosen layers of a model, in place, and returns a :class:`MoefyReport`.

Other conversion methods (MoEfication, EMoE, DynMoE) plug in with :func:`register_method`.

Layer indices are positions in :func:`find_ffns`' list, which follows block order. For T5 the
encoder's blocks come first: with ``n`` blocks per stack, indices ``0..n-1`` are the encoder's FFNs
and ``n..2n-1`` the decoder's. Module names work as well (``"decoder.block.1"``, ``"encoder"``).

Example:
    >>> model = T5ForConditionalGeneration.from_pretrained("t5-small")
    >>> report = moefy(model, layers=[4, 5], num_experts=8, experts="mpo")   # last two encoder FFNs
    >>> print(report)
    >>> loss = model(**batch).loss + 0.01 * aux_loss(model)
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from mpolab.tables import text_table

from .activations import ACTIVATIONS
from .experts.dense import DenseExperts
from .experts.mpo import MPOExperts
from .gates.top_k import TopKGate
from .layer import MoE, moe_layers

__all__ = [
    "FFN",
    "SUPPORTED_FFNS",
    "Method",
    "MoEWithDropout",
    "MoefyLayerReport",
    "MoefyReport",
    "UpcycleReport",
    "find_ffns",
    "moefy",
    "register_method",
    "registered_methods",
    "upcycle",
]

Activation = str | Callable[[Tensor], Tensor]
Family = Literal["t5", "gpt2", "bert", "llama", "sequential"]
LayerSpec = int | str | Sequence[int | str] | None

#: The FFN shapes :func:`upcycle` and :func:`find_ffns` recognise, as named in error messages.
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


# ---------------------------------------------------------------------------------------- FFN


@dataclass(eq=False)
class FFN:
    """One feed-forward network of a model, its weights in ``nn.Linear`` layout.

    The FFN computes ``act(x w1^T + b1) w2^T + b2`` (gated: ``(act(x w_gate^T) * (x w1^T)) w2^T``).
    The tensors are detached views of the model's parameters (GPT-2's ``Conv1D`` weights are
    transposed), so building an FFN copies nothing.

    Attributes:
        name: qualified module name in the model (``""`` for a module given on its own).
        module: the FFN module (for BERT the ``BertLayer`` that holds ``intermediate`` and ``output``).
        w1: ``[F, d]`` up projection (LLaMA ``up_proj``, T5 gated ``wi_1``).
        b1: ``[F]`` or ``None``.
        w2: ``[d_out, F]`` down projection.
        b2: ``[d_out]`` or ``None``.
        w_gate: ``[F, d]`` gate projection of a gated FFN (LLaMA ``gate_proj``, T5 ``wi_0``), else ``None``.
        activation: a name from :data:`~mpolab_moe.activations.ACTIVATIONS`, or the module's own
            activation callable when the config names one that has no entry there.
        family: ``"t5"``, ``"gpt2"``, ``"bert"``, ``"llama"`` or ``"sequential"``.

    Example:
        >>> ffn = find_ffns(gpt2)[0]
        >>> ffn.name, ffn.w1.shape, ffn.activation
        ('transformer.h.0.mlp', torch.Size([3072, 768]), 'gelu_new')
    """

    name: str
    module: nn.Module
    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    w_gate: Tensor | None
    activation: Activation
    family: Family

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]

    @property
    def num_params(self) -> int:
        """Parameters of the FFN's matrices and biases (not BERT's LayerNorm, which stays)."""
        return sum(t.numel() for t in (self.w1, self.b1, self.w2, self.b2, self.w_gate) if t is not None)

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
        if self.family == "bert":
            self.module.intermediate = nn.Identity()
            self.module.output.dense = moe
        elif self.family == "gpt2":
            _set_submodule(model, self.name, MoEWithDropout(moe, self.module.dropout))
        else:
            _set_submodule(model, self.name, moe)


class MoEWithDropout(nn.Module):
    """``dropout(moe(x))``: what takes GPT-2's ``mlp`` slot (GPT2MLP ends with the residual dropout).

    Example:
        >>> block.mlp = MoEWithDropout(moe, block.mlp.dropout)
    """

    def __init__(self, moe: nn.Module, dropout: nn.Module) -> None:
        super().__init__()
        self.moe, self.dropout = moe, dropout

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` -> ``[..., d_out]``."""
        return self.dropout(self.moe(x))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _linear(module: Any) -> tuple[Tensor, Tensor | None] | None:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or HF ``Conv1D`` (stored ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        w = module.weight
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, Tensor):
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
        return FFN(name, module, W1, B1, W2, B2, Wg, _activation(family, act, config), family)

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


def _discover(model: nn.Module) -> list[FFN]:
    config = getattr(model, "config", None)
    found: list[FFN] = []
    for name, module in model.named_modules():
        ffn = _recognise(module, name, config, allow_sequential=False)
        if ffn is not None:
            found.append(ffn)
    return found


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

    Example:
        >>> [f.name for f in find_ffns(t5, layers=[0, -1])]
        ['encoder.block.0.layer.1.DenseReluDense', 'decoder.block.5.layer.2.DenseReluDense']
    """
    found = _discover(model)
    if layers is None:
        if not found:
            raise _no_ffn_error(model)
        return found
    specs = [layers] if isinstance(layers, (int, str)) else list(layers)
    if not specs:
        raise ValueError("layers is empty; give None for every FFN, or indices / module names")
    chosen: dict[int, FFN] = {}
    extra: list[FFN] = []
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise TypeError(f"layers must hold ints (block indices) or str (module names), got {spec!r}")
        if isinstance(spec, int):
            if not found:
                raise _no_ffn_error(model)
            if not -len(found) <= spec < len(found):
                raise ValueError(
                    f"layer index {spec} out of range: {type(model).__name__} has {len(found)} FFNs, "
                    f"valid indices 0..{len(found) - 1} (or -{len(found)}..-1)"
                )
            chosen[spec % len(found)] = found[spec % len(found)]
            continue
        hits = {i: f for i, f in enumerate(found) if _under(f.name, spec) or _under(spec, f.name)}
        if hits:
            chosen.update(hits)
            continue
        try:
            module = model.get_submodule(spec)
        except AttributeError:
            names = ", ".join(repr(f.name) for f in found[:4]) + (", ..." if len(found) > 4 else "")
            raise ValueError(
                f"{type(model).__name__} has no module named {spec!r}" + (f"; its FFNs are {names}" if found else "")
            ) from None
        ffn = FFN.from_module(module, spec, getattr(model, "config", None))
        if all(e.module is not module for e in extra):
            extra.append(ffn)
    return [chosen[i] for i in sorted(chosen)] + extra


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside it (``""`` is the root, which holds everything)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _no_ffn_error(model: nn.Module) -> ValueError:
    converted = len(moe_layers(model))
    note = f" (it already has {converted} MoE layers: moefy converts each FFN once)" if converted else ""
    return ValueError(f"found no supported FFN in {type(model).__name__}{note}; supported: {', '.join(SUPPORTED_FFNS)}")


# ------------------------------------------------------------------------------------ upcycle


@dataclass
class UpcycleReport:
    """What :func:`upcycle` built; kept on the returned layer as ``moe.upcycle_report``.

    Attributes:
        experts: ``"mpo"`` or ``"dense"``.
        num_experts: ``E``.
        k: experts per token.
        weighting: the gate's ``"one"`` or ``"prob"``.
        params_before: the FFN's parameters.
        params_after: the MoE layer's parameters (router included; a shared MPO central tensor counted once).
        reconstruction_error: relative Frobenius error per matrix (``"w1"``, ``"w2"``, ``"w_gate"``);
            zeros for dense copies.
        exact_at_init: the layer's output equals the FFN's at step 0 up to float round-off (exact
            experts, combine weights summing to 1, no capacity drops).
    """

    experts: str
    num_experts: int
    k: int
    weighting: str
    params_before: int
    params_after: int
    reconstruction_error: dict[str, float]
    exact_at_init: bool


#: Reconstruction error below which an expert counts as an exact copy (fp32 round-off of a TT-SVD).
EXACT_TOL = 1e-5


def upcycle(
    ffn: FFN | nn.Module,
    num_experts: int = 8,
    *,
    experts: Literal["mpo", "dense"] = "mpo",
    gate: Literal["top1", "top2", "topk"] = "top1",
    k: int | None = None,
    weighting: Literal["one", "prob"] | None = None,
    noise: Literal["jitter", "gaussian"] | None = None,
    capacity_factor: float | None = None,
    rel_tol: float | None = None,
    max_rank: int | None = None,
    num_cores: int = 5,
    balance_loss_weight: float = 1.0,
    z_loss_weight: float = 0.0,
    activation: Activation | None = None,
) -> MoE:
    """An MoE layer whose every expert starts as a copy of ``ffn`` (upcycling; MPOE with ``"mpo"``).

    Args:
        ffn: an :class:`FFN` from :func:`find_ffns`, or a bare FFN module (see :data:`SUPPORTED_FFNS`).
        num_experts: ``E``.
        experts: ``"mpo"`` (:class:`~mpolab_moe.experts.mpo.MPOExperts`: one shared central tensor,
            per-expert auxiliary tensors) or ``"dense"`` (:class:`~mpolab_moe.DenseExperts`, E copies).
        gate: ``"top1"`` (Switch), ``"top2"`` (GShard) or ``"topk"`` (give ``k``).
        k: experts per token; must agree with ``gate`` for top1/top2, ``1 <= k <= E``.
        weighting: ``"one"`` (combine weight ``p / p.detach()``: value 1, gradient to the router) or
            ``"prob"`` (renormalised probabilities for ``k > 1``, the raw probability for ``k = 1``).
            Default: ``"one"`` for ``k = 1``, ``"prob"`` for ``k > 1`` -- both exact at step 0.
        noise: router noise in training, ``None``, ``"jitter"`` or ``"gaussian"``.
        capacity_factor: ``None`` (dropless) or the GShard capacity factor.
        rel_tol, max_rank, num_cores: MPO truncation (``"mpo"`` only); both ``None`` keeps exact ranks.
        balance_loss_weight, z_loss_weight: coefficients of the gate's aux losses.
        activation: override the activation read from the model config / module.

    Returns:
        :class:`~mpolab_moe.MoE` on the FFN's device and dtype (router in fp32), in the FFN's
        train/eval mode, with ``moe.upcycle_report`` (:class:`UpcycleReport`).

    When the output equals the FFN's at step 0 (every expert a copy, so only the combine weights
    matter; a token's output is ``sum_i w_i * FFN(x)``):

    ============================  =================================  ==============================
    gate, weighting               sum of the combine weights          equal to the FFN?
    ============================  =================================  ==============================
    top1, ``"one"`` (default)     ``p / p.detach()`` = 1              yes; router gradient ``FFN(x)/p``
    topk k > 1, ``"prob"`` (def.) renormalised ``sum p_i / sum p`` = 1  yes; router gradient 0 at step 0
    top1, ``"prob"``              ``p`` < 1                            no: ``p * FFN(x)`` (Switch)
    topk k > 1, ``"one"``         ``k``                                no: ``k * FFN(x)`` (warns)
    ============================  =================================  ==============================

    It also needs exact experts (``"dense"``, or ``"mpo"`` at exact ranks: equal to float
    round-off) and no dropped tokens (``capacity_factor`` ``None`` or ``>= E / k``). T5's inner
    dropout (between the activation and ``wo``) has no counterpart in the expert banks; in eval
    mode that changes nothing.

    Raises:
        TypeError: an unrecognised module.
        ValueError: unknown ``experts``/``gate``/``weighting``, ``k`` out of range or contradicting
            ``gate``, truncation options with dense experts.

    Example:
        >>> moe = upcycle(t5.encoder.block[0].layer[1].DenseReluDense, num_experts=8, experts="mpo")
        >>> moe.upcycle_report.reconstruction_error
        {'w1': 3.1e-07, 'w2': 2.9e-07}
    """
    if not isinstance(ffn, FFN):
        if not isinstance(ffn, nn.Module):
            raise TypeError(f"upcycle takes an FFN or an nn.Module, got {type(ffn).__name__}")
        ffn = FFN.from_module(ffn)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if experts not in ("mpo", "dense"):
        raise ValueError(f"unknown experts {experts!r}; valid: 'mpo', 'dense'")
    k = _resolve_k(gate, k, num_experts)
    if weighting is None:
        weighting = "one" if k == 1 else "prob"
    if weighting not in ("one", "prob"):
        raise ValueError(f"weighting must be 'one' or 'prob', got {weighting!r}")
    if experts == "dense" and (rel_tol is not None or max_rank is not None):
        raise ValueError(f"rel_tol={rel_tol!r} / max_rank={max_rank!r} truncate MPO experts; use experts='mpo'")
    if weighting == "one" and k > 1:
        warnings.warn(
            f"weighting='one' with k={k}: every token sums {k} copies of the FFN, so the upcycled layer "
            f"outputs {k}x the FFN at step 0; weighting='prob' (renormalised over the k) keeps it equal",
            stacklevel=2,
        )
    act = ffn.activation if activation is None else activation
    device, dtype = ffn.w1.device, ffn.w1.dtype
    weights = {"b1": ffn.b1, "b2": ffn.b2, "w_gate": ffn.w_gate, "activation": act}
    if experts == "dense":
        bank = DenseExperts.from_ffn(ffn.w1, ffn.w2, num_experts, **weights)
    else:
        bank = MPOExperts.from_ffn(
            ffn.w1, ffn.w2, num_experts, **weights, num_cores=num_cores, rel_tol=rel_tol, max_rank=max_rank
        )
    router = TopKGate(
        ffn.d_model,
        num_experts,
        k,
        noise=noise,
        weighting=weighting,
        balance_loss_weight=balance_loss_weight,
        z_loss_weight=z_loss_weight,
        device=device,
    )
    moe = MoE(router, bank, capacity_factor=capacity_factor)
    moe.to(device=device, dtype=dtype)  # the router keeps fp32 (TopKGate._apply)
    moe.train(ffn.module.training)
    errors = {name: float(v) for name, v in getattr(bank, "reconstruction_error", {}).items()}
    if experts == "dense":
        errors = {name: 0.0 for name in ("w1", "w2", "w_gate") if name == "w1" or getattr(ffn, name) is not None}
    sums_to_one = (k == 1 and weighting == "one") or (k > 1 and weighting == "prob")
    no_drops = capacity_factor is None or capacity_factor >= num_experts / k
    moe.upcycle_report = UpcycleReport(
        experts=experts,
        num_experts=num_experts,
        k=k,
        weighting=weighting,
        params_before=ffn.num_params,
        params_after=sum(p.numel() for p in moe.parameters()),
        reconstruction_error=errors,
        exact_at_init=sums_to_one and no_drops and all(e <= EXACT_TOL for e in errors.values()),
    )
    return moe


def _resolve_k(gate: str, k: int | None, num_experts: int) -> int:
    fixed = {"top1": 1, "top2": 2}
    if gate not in (*fixed, "topk"):
        raise ValueError(f"unknown gate {gate!r}; valid: 'top1', 'top2', 'topk' (with k=...)")
    if gate in fixed:
        if k is not None and k != fixed[gate]:
            raise ValueError(f"gate={gate!r} routes to {fixed[gate]} experts but k={k}; use gate='topk' with k={k}")
        k = fixed[gate]
    elif k is None:
        raise ValueError("gate='topk' needs k (experts per token)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k={k!r} out of range; valid: 1 <= k <= num_experts={num_experts}")
    return k


# ----------------------------------------------------------------------------- method registry


@dataclass(frozen=True)
class Method:
    """A conversion method :func:`moefy` can apply.

    Attributes:
        name: what ``moefy(..., method=name)`` asks for.
        builder: ``builder(ffn: FFN, **kwargs) -> MoE``, called once per chosen FFN with ``moefy``'s
            extra keyword arguments (``num_experts``, ``experts``, ``gate`` only when given).
        default_layers: ``default_layers(num_layers, family) -> list[int]``, the layers the method's
            paper converts when ``layers=None``; ``None`` means every FFN.
    """

    name: str
    builder: Callable[..., nn.Module]
    default_layers: Callable[[int, str], list[int]] | None = None


_METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    builder: Callable[..., nn.Module],
    default_layers: Callable[[int, str], list[int]] | None = None,
) -> None:
    """Make ``moefy(model, method=name)`` build each MoE with ``builder``.

    Registering a name again replaces it (so re-importing a recipes module is harmless).
    ``mpolab_moe.recipes``, when present, is imported by :func:`moefy` before a method is looked up,
    and registers ``"moefication"``, ``"emoe"`` and ``"dynmoe"`` with this function.

    Example:
        >>> register_method("switch8", lambda ffn, **kw: upcycle(ffn, 8, experts="dense", **kw),
        ...                 lambda n, family: list(range(1, n, 2)))        # every other layer
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable as builder(ffn, **kwargs) -> MoE, got {type(builder).__name__}")
    if default_layers is not None and not callable(default_layers):
        raise TypeError(
            f"default_layers must be None or callable (num_layers, family) -> list[int], got {default_layers!r}"
        )
    _METHODS[name] = Method(name, builder, default_layers)


def registered_methods() -> list[str]:
    """Names ``moefy(method=...)`` accepts (importing ``mpolab_moe.recipes`` first when it exists)."""
    _load_recipes()
    return sorted(_METHODS)


def _load_recipes() -> None:
    if importlib.util.find_spec(f"{__package__}.recipes") is not None:
        importlib.import_module(f"{__package__}.recipes")


def _upcycle_builder(
    ffn: FFN, num_experts: int = 8, experts: str = "mpo", gate: str = "top1", **kwargs: Any
) -> nn.Module:
    return upcycle(ffn, num_experts, experts=experts, gate=gate, **kwargs)  # type: ignore[arg-type]


register_method("upcycle", _upcycle_builder)


# -------------------------------------------------------------------------------------- moefy


@dataclass
class MoefyLayerReport:
    """One converted FFN."""

    name: str
    family: str
    method: str
    experts: str
    num_experts: int
    k: int | None
    params_before: int
    params_after: int
    reconstruction_error: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float | None:
        return max(self.reconstruction_error.values()) if self.reconstruction_error else None


@dataclass
class MoefyReport:
    """What :func:`moefy` did: one row per converted FFN plus totals; ``print(report)`` shows a table."""

    layers: list[MoefyLayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters of the converted FFNs."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the MoE layers that replaced them."""
        return sum(r.params_after for r in self.layers)

    @property
    def max_error(self) -> float:
        """Largest relative reconstruction error over every converted matrix (0 when all exact)."""
        errors = [r.max_error for r in self.layers if r.max_error is not None]
        return max(errors, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }

    def __str__(self) -> str:
        header = ["layer", "family", "method", "experts", "E", "k", "params", "x", "rel. error"]
        rows = [
            [
                r.name,
                r.family,
                r.method,
                r.experts,
                str(r.num_experts),
                "-" if r.k is None else str(r.k),
                f"{r.params_before:,} -> {r.params_after:,}",
                f"{r.params_after / max(r.params_before, 1):.2f}",
                "-" if r.max_error is None else ", ".join(f"{n} {e:.2e}" for n, e in r.reconstruction_error.items()),
            ]
            for r in self.layers
        ]
        lines = text_table(header, rows)
        lines.append(
            f"{len(self.layers)} FFNs: {self.params_before:,} -> {self.params_after:,} parameters; "
            f"model: {self.model_params_before:,} -> {self.model_params_after:,}; "
            f"max relative error {self.max_error:.2e}"
        )
        return "\n".join(lines)


def moefy(
    model: nn.Module,
    layers: LayerSpec = None,
    num_experts: int | None = None,
    experts: str | None = None,
    gate: str | None = None,
    method: str | None = None,
    **kwargs: Any,
) -> MoefyReport:
    """Replace FFNs of ``model`` by MoE layers, in place.

    Args:
        model: a Hugging Face model (or any module holding supported FFNs, see :func:`find_ffns`).
        layers: which FFNs (indices / names as in :func:`find_ffns`); ``None``: the method's default
            layers (every FFN for upcycling).
        num_experts, experts, gate: for upcycling (``method=None``) default to ``8``, ``"mpo"``,
            ``"top1"``; for another method they are passed to its builder only when given, so the
            method's own defaults apply otherwise.
        method: ``None`` or ``"upcycle"`` (:func:`upcycle`), or a name given to
            :func:`register_method` (``"moefication"``, ``"emoe"``, ``"dynmoe"`` from
            ``mpolab_moe.recipes``).
        **kwargs: passed to the builder (for upcycling: :func:`upcycle`'s keyword arguments, e.g.
            ``rel_tol``, ``max_rank``, ``k``, ``capacity_factor``).

    Every MoE is built before the first is installed, so an error leaves the model untouched.

    Returns:
        :class:`MoefyReport`: per layer the name, expert kind, parameters before/after and
        reconstruction errors.

    Raises:
        ValueError: unknown method (the message lists the registered ones), bad layers, bad options.

    Example:
        >>> report = moefy(gpt2, layers=[-2, -1], num_experts=8, experts="mpo", max_rank=64)
        >>> print(report)
        >>> loss = gpt2(**batch, labels=batch["input_ids"]).loss + 0.01 * aux_loss(gpt2)
    """
    name = "upcycle" if method is None else method
    if name not in _METHODS:
        _load_recipes()
    if name not in _METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(_METHODS)} (method=None upcycles)")
    recipe = _METHODS[name]
    if layers is None and recipe.default_layers is not None:
        found = find_ffns(model)
        layers = [int(i) for i in recipe.default_layers(len(found), found[0].family)]
    ffns = find_ffns(model, layers)
    given = {"num_experts": num_experts, "experts": experts, "gate": gate}
    options = {key: value for key, value in given.items() if value is not None} | kwargs
    params_before = _count(model)
    built = [(ffn, recipe.builder(ffn, **options)) for ffn in ffns]
    report = MoefyReport(model_params_before=params_before)
    for ffn, moe in built:
        ffn.install(model, moe)
        report.layers.append(_layer_report(ffn, moe, name))
    report.model_params_after = _count(model)
    return report


def _layer_report(ffn: FFN, moe: nn.Module, method: str) -> MoefyLayerReport:
    up: UpcycleReport | None = getattr(moe, "upcycle_report", None)
    bank = getattr(moe, "experts", None)
    errors = up.reconstruction_error if up is not None else dict(getattr(bank, "reconstruction_error", {}) or {})
    return MoefyLayerReport(
        name=ffn.name,
        family=ffn.family,
        method=method,
        experts=up.experts if up is not None else type(bank).__name__,
        num_experts=int(getattr(moe, "num_experts", 0)),
        k=getattr(getattr(moe, "gate", None), "k", None),
        params_before=ffn.num_params,
        params_after=sum(p.numel() for p in moe.parameters()),
        reconstruction_error={n: float(e) for n, e in errors.items()},
    )


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
