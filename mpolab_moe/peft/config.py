"""Adapter configurations (``LoRAConfig``, ``IA3Config``, ``MoLoRAConfig``, ``MoVConfig``) and default targets.

A config says which method, its hyper-parameters and where it goes. ``target_modules`` takes
the forms of :func:`mpolab.find_targets`: exact names, dotted name suffixes (``"q"`` matches
``"encoder.block.0.layer.0.SelfAttention.q"``), regexes matched against full names, or
``"all-linear"``. Left as ``None`` it defaults to the method's placement for the model's
architecture (``model.config.model_type``), see :data:`DEFAULT_TARGETS`.

Examples:
    >>> cfg = MoLoRAConfig(r=4, alpha=16, num_experts=10, target_modules=["q", "k", "v", "o", "wi", "wo"])
    >>> cfg.method
    'molora'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from mpolab.utils import check_positive_int

from ..experts.lora import LoRAInit
from ..gates.base import check_k

__all__ = [
    "ADAPTER_CONFIGS",
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "IA3Config",
    "LoRAConfig",
    "MoLoRAConfig",
    "MoVConfig",
    "config_from_dict",
]

Patterns = str | list[str]


def _check_patterns(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return
    raise TypeError(f"{name} must be a name, a regex, a non-empty list of them, or None; got {value!r}")


#: peft's ``init_lora_weights`` values that mean one of ours.
_PEFT_INIT: dict[bool | str, LoRAInit] = {True: "kaiming", "gaussian": "gaussian"}


def _take_alias(config: object, alias: str, name: str) -> None:
    """Move peft's spelling ``alias`` into the field ``name`` (refusing two different values)."""
    value = getattr(config, alias)
    if value is None:
        return
    default = next(f.default for f in fields(config) if f.name == name)  # type: ignore[arg-type]
    current = getattr(config, name)
    if current != default and current != value:
        raise ValueError(f"give {name}={current!r} or {alias}={value!r}, not both")
    setattr(config, name, value)
    setattr(config, alias, None)


def _check_top_k(top_k: object, num_experts: int) -> None:
    if top_k is not None:
        check_k(top_k, num_experts, "top_k")


@dataclass
class AdapterConfig:
    """Fields every method shares.

    Attributes:
        task_type: peft's task name (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), recorded and written to
            peft-format folders; it does not change where the adapters go.
        inference_mode: peft's flag, recorded (adapters loaded for inference are still trainable
            here; freeze them yourself).
        target_modules: where the adapters go (names, suffixes, regex, ``"all-linear"``);
            ``None``: the default placement for the model's architecture.
        exclude_modules: the same forms; matching modules get no adapter.
        modules_to_save: modules (any type, matched the same way) that train fully and are
            saved with the adapter, e.g. a freshly initialised classification head.
    """

    method: ClassVar[str] = ""

    target_modules: Patterns | None = None
    exclude_modules: Patterns | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.task_type is not None and not isinstance(self.task_type, str):  # peft's TaskType is a str enum
            raise TypeError(f"task_type must be None or a peft task name such as 'CAUSAL_LM', got {self.task_type!r}")
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        _check_patterns("target_modules", self.target_modules)
        _check_patterns("exclude_modules", self.exclude_modules)
        _check_patterns("modules_to_save", self.modules_to_save)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        # mixtures (MoLoRA, MoV) declare num_experts and top_k as fields; plain methods have one expert
        check_positive_int(self.num_experts, "num_experts")
        _check_top_k(getattr(self, "top_k", None), self.num_experts)

    @property
    def num_experts(self) -> int:
        return 1

    @property
    def routed(self) -> bool:
        """Whether the adapters carry a router (a mixture, which cannot be merged into the weights)."""
        return self.num_experts > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``"method"`` (peft's aliases, once folded in, are left out)."""
        record = {"method": self.method, **asdict(self)}
        for alias in ("lora_alpha", "lora_dropout", "init_lora_weights"):
            if record.get(alias, 0) is None:
                del record[alias]
        return record


@dataclass
class LoRAConfig(AdapterConfig):
    """Plain LoRA: ``y = base(x) + (α/r) · x A B``.

    Defaults follow HF peft (``r = 8``, ``α = 8``, Kaiming-uniform ``A``); the default
    placement is the MoLoRA paper's (q, k, v, o and both FFN matrices), so LoRA and MoLoRA with
    default targets differ only in the experts and the router.

    Attributes:
        r: rank ``>= 1``.
        alpha: scale numerator, ``> 0``.
        dropout: dropout on the adapter input.
        use_rslora: scale ``α/√r`` instead of ``α/r``.
        init: ``"kaiming"`` or ``"gaussian"`` (``N(0, 0.02²)``) for ``A``; ``B`` starts at 0.

    Examples:
        >>> LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    """

    method: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: LoRAInit = "kaiming"
    # peft's spellings: given, they set the fields above (and read back as None)
    lora_alpha: float | None = field(default=None, repr=False)
    lora_dropout: float | None = field(default=None, repr=False)
    init_lora_weights: bool | str | None = field(default=None, repr=False)
    bias: str = "none"
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        _take_alias(self, "lora_alpha", "alpha")
        _take_alias(self, "lora_dropout", "dropout")
        if self.init_lora_weights is not None:
            init = _PEFT_INIT.get(self.init_lora_weights)
            if init is None:
                raise ValueError(
                    f"init_lora_weights={self.init_lora_weights!r} is not supported; valid: True (Kaiming-uniform A, "
                    f"peft's default) or 'gaussian'; B always starts at zero here"
                )
            self.init, self.init_lora_weights = init, None
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: adapters train no biases; valid: 'none'")
        # fan_in_fan_out is accepted for peft configs and ignored: GPT-2's Conv1D is recognised by its type
        super().__post_init__()
        check_positive_int(self.r, "r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("gaussian", "kaiming"):
            raise ValueError(f"init must be 'gaussian' or 'kaiming', got {self.init!r}")


@dataclass
class MoLoRAConfig(LoRAConfig):
    """MoLoRA: ``y = base(x) + (α/r) Σ_e p_e(x) x A_e B_e`` with a soft-merge router on ``x``.

    Defaults are the paper's: ``r = 4``, ``α = 16``, ``E = 10``, ``A ~ N(0, 0.02²)``.

    Attributes:
        num_experts: ``E >= 1``.
        top_k: ``None`` (soft merging over all experts) or keep the ``k`` largest router weights
            (no renormalisation).

    Examples:
        >>> MoLoRAConfig(r=4, alpha=16, num_experts=10, target_modules=["q", "k", "v", "o", "wi", "wo"])
    """

    method: ClassVar[str] = "molora"

    r: int = 4
    alpha: float = 16.0
    init: LoRAInit = "gaussian"
    num_experts: int = 10
    top_k: int | None = None


@dataclass
class IA3Config(AdapterConfig):
    """Plain (IA)³: learned vectors rescale activations, ``y = base(x) ⊙ l`` (or ``base(x ⊙ l)``).

    Attributes:
        feedforward_modules: the targets whose *input* is scaled instead of their output (the
            FFN down projection, whose input is the intermediate activation), as HF peft;
            ``None``: the architecture's default. Must be among the targets.

    Examples:
        >>> IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])     # T5
    """

    method: ClassVar[str] = "ia3"

    feedforward_modules: Patterns | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_ia3_weights is not True:
            raise ValueError(f"init_ia3_weights={self.init_ia3_weights!r} is not supported; the vectors start at one")
        if isinstance(self.feedforward_modules, (list, tuple)) and not self.feedforward_modules:
            self.feedforward_modules = []  # peft's "no feed-forward module": every target scales its output
            return
        _check_patterns("feedforward_modules", self.feedforward_modules)
        if isinstance(self.feedforward_modules, tuple):
            self.feedforward_modules = list(self.feedforward_modules)


@dataclass
class MoVConfig(IA3Config):
    """MoV: a mixture of (IA)³ vectors merged by a router that reads the tensor being scaled.

    ``y = h ⊙ Σ_e p_e(h) l_e`` for ``h`` the key/value projection output or the FFN
    intermediate activation. Defaults are the paper's ``E = 10``, soft merging.

    Attributes:
        num_experts: ``E >= 1``.
        top_k: ``None`` or keep the ``k`` largest router weights (no renormalisation; the kept
            weights then sum to less than one, so the model is no longer unchanged at step 0).

    Examples:
        >>> MoVConfig(num_experts=10)
    """

    method: ClassVar[str] = "mov"

    num_experts: int = 10
    top_k: int | None = None


ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {
    c.method: c for c in (LoRAConfig, MoLoRAConfig, IA3Config, MoVConfig)
}


def config_from_dict(record: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from :meth:`AdapterConfig.to_dict` output (as read from JSON)."""
    record = dict(record)
    method = record.pop("method", None)
    cls = ADAPTER_CONFIGS.get(method)
    if cls is None:
        raise ValueError(f"unknown adapter method {method!r}; valid: {sorted(ADAPTER_CONFIGS)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; valid: {sorted(known)}")
    return cls(**record)


# ---------------------------------------------------------------------------- default placement


@dataclass(frozen=True)
class Placement:
    """Default targets of one method family on one architecture."""

    target_modules: list[str]
    feedforward_modules: list[str] = field(default_factory=list)


#: ``DEFAULT_TARGETS[family][model_type]`` with family ``"lora"`` (LoRA and MoLoRA: q, k, v, o and
#: both FFN matrices, the MoLoRA paper), ``"ia3"`` (plain IA3: HF peft's own defaults, so a default
#: ``IA3Config`` gives the model peft gives) or ``"mov"`` (MoV: key and value outputs and the FFN
#: intermediate activation, i.e. the input of the down projection, as the MoV paper).
DEFAULT_TARGETS: dict[str, dict[str, Placement]] = {
    "lora": {
        "t5": Placement(["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]),
        "gpt2": Placement(["c_attn", "c_proj", "c_fc"]),  # c_proj: both attn.c_proj and mlp.c_proj
        "bert": Placement(["query", "key", "value", "output.dense", "intermediate.dense"]),
        "llama": Placement(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    },
    # peft's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING: on BERT "output.dense" is
    # both the attention output and the FFN down projection, and both scale their input; GPT-2's
    # fused c_attn is scaled on all its columns
    "ia3": {
        "t5": Placement(["k", "v", "wo"], ["wo"]),
        "gpt2": Placement(["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        "bert": Placement(["key", "value", "output.dense"], ["output.dense"]),
        "llama": Placement(["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    },
    "mov": {
        "t5": Placement(["k", "v", "wo"], ["wo"]),
        # c_attn is the fused q|k|v projection: only its k and v columns are scaled (see layers.py)
        "gpt2": Placement(["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        # the FFN output.dense of each layer, not attention.output.dense
        "bert": Placement(["key", "value", r".*layer\.\d+\.output\.dense"], [r".*layer\.\d+\.output\.dense"]),
        "llama": Placement(["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    },
}

#: Architectures that share a family's module names.
MODEL_TYPE_ALIASES: dict[str, str] = {
    "mt5": "t5",
    "umt5": "t5",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "mistral": "llama",
    "qwen2": "llama",
}


def method_family(config: AdapterConfig) -> str:
    """``"lora"`` for LoRA/MoLoRA, ``"ia3"`` for IA3, ``"mov"`` for MoV."""
    if isinstance(config, MoVConfig):
        return "mov"
    return "ia3" if isinstance(config, IA3Config) else "lora"


def default_placement(config: AdapterConfig, model_type: str | None) -> Placement:
    """The default targets of ``config``'s method for ``model_type``.

    Raises:
        ValueError: the architecture has no default (give ``target_modules``).
    """
    family = DEFAULT_TARGETS[method_family(config)]
    key = MODEL_TYPE_ALIASES.get(model_type or "", model_type or "")
    if key not in family:
        raise ValueError(
            f"{type(config).__name__}: no default target_modules for model_type {model_type!r}; "
            f"defaults exist for {sorted(family)} (and {sorted(MODEL_TYPE_ALIASES)}); "
            "pass target_modules=[...] (names, suffixes, a regex or 'all-linear')"
        )
    return family[key]
