"""Put adapters into a model, count what trains, merge them back: ``get_model``, ``merge_and_unload``.

Examples:
    >>> from mpolab_moe import peft as mpeft
    >>> model = mpeft.get_model(model, mpeft.MoLoRAConfig(r=4, alpha=16, num_experts=10))
    >>> mpeft.print_trainable_parameters(model)
    trainable: 0.87% of 60.5M (527,360 of 60,506,624 parameters)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mpolab.nn import MPOLinear
from mpolab.targets import find_targets, matches
from mpolab.utils import is_conv1d, set_submodule

from .config import AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, default_placement
from .layers import WRAPPABLE, AdapterLayer, IA3Layer, LoRALayer, base_features, can_wrap
from .peft_format import from_peft_config, is_peft_config

__all__ = [
    "CONFIG_ATTR",
    "adapter_layers",
    "adapter_state_dict",
    "get_model",
    "merge_and_unload",
    "print_trainable_parameters",
    "trainable_parameters",
]

#: Attribute of the model holding its :class:`AdapterConfig` after :func:`get_model`.
CONFIG_ATTR = "mpolab_adapter_config"
#: Attribute holding the names of the ``modules_to_save`` that matched.
SAVED_MODULES_ATTR = "mpolab_modules_to_save"


def _as_list(patterns: str | list[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _hits(name: str, patterns: str | list[str] | None) -> bool:
    return patterns is not None and any(matches(name, p) for p in _as_list(patterns))


def model_type_of(model: nn.Module) -> str | None:
    """``config.model_type`` of ``model`` or of its first submodule that has one (a wrapped encoder)."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def resolve_targets(
    model: nn.Module, target_modules: str | list[str], exclude_modules: str | list[str] | None, method: str
) -> dict[str, nn.Module]:
    """The modules an adapter goes on, by qualified name.

    Matching is :func:`mpolab.find_targets`' (names, suffixes, regex, ``"all-linear"``, near-miss
    errors), extended to :class:`mpolab.MPOLinear` layers of a compressed model.

    Raises:
        ValueError: nothing matched, or a match is a module type the method cannot wrap (the
            message lists what matched).
    """
    patterns = _as_list(target_modules)
    all_linear = "all-linear" in patterns
    named_patterns = [p for p in patterns if p != "all-linear"] or None
    mpo = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, MPOLinear)
        and ((all_linear and not n.endswith("lm_head")) or _hits(n, named_patterns))
        and not _hits(n, exclude_modules)
    }
    try:
        found = find_targets(model, target_modules, exclude_modules)
    except ValueError as err:
        if mpo and "matched no" in str(err):  # everything it matched is an MPO layer
            found = {}
        else:
            raise ValueError(f"{method}: {err}; adapters wrap {WRAPPABLE}") from None
    found.update(mpo)
    bad = {n: type(m).__name__ for n, m in found.items() if not can_wrap(m)}
    if bad:
        good = sorted(n for n in found if n not in bad)
        raise ValueError(
            f"{method}: target_modules={target_modules!r} matched modules it cannot wrap: {bad}; adapters wrap "
            f"{WRAPPABLE}. Wrappable matches: {good[:10]}{' ...' if len(good) > 10 else ''}"
        )
    if not found:
        raise ValueError(f"{method}: target_modules={target_modules!r} matched nothing after exclude_modules")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _fused_qkv_slice(name: str, module: nn.Module) -> tuple[int, int] | None:
    """GPT-2's ``c_attn`` computes q|k|v in one Conv1D: (IA)³ scales only the k and v columns."""
    if not (name == "c_attn" or name.endswith(".c_attn")) or not is_conv1d(module):
        return None
    _, out = base_features(module)
    if out % 3:
        return None
    return (out // 3, out)


def _build(config: AdapterConfig, module: nn.Module, spec: Mapping[str, Any]) -> AdapterLayer:
    if isinstance(config, LoRAConfig):
        return LoRALayer(
            module,
            r=config.r,
            alpha=config.alpha,
            num_experts=config.num_experts,
            top_k=getattr(config, "top_k", None),
            use_rslora=config.use_rslora,
            init=config.init,
            dropout=config.dropout,
        )
    return IA3Layer(
        module,
        num_experts=config.num_experts,
        top_k=getattr(config, "top_k", None),
        feedforward=bool(spec.get("feedforward", False)),
        out_slice=tuple(spec["out_slice"]) if spec.get("out_slice") is not None else None,
    )


def plan(model: nn.Module, config: AdapterConfig) -> dict[str, dict[str, Any]]:
    """``{module name: {"feedforward": bool, "out_slice": (a, b) | None}}`` for every target of ``config``."""
    model_type = model_type_of(model)
    targets = config.target_modules
    if targets is None:
        targets = default_placement(config, model_type).target_modules
    feedforward: str | list[str] | None = None
    if isinstance(config, IA3Config):
        feedforward = config.feedforward_modules
        if feedforward is None:
            try:
                feedforward = default_placement(config, model_type).feedforward_modules
            except ValueError:
                feedforward = []
    found = resolve_targets(model, targets, config.exclude_modules, type(config).__name__)
    # modules_to_save train fully: no adapter inside them (a new head matched by "all-linear", say)
    saved = saved_modules(model, config.modules_to_save)
    found = {n: m for n, m in found.items() if not any(n == s or n.startswith(s + ".") for s in saved)}
    if not found:
        raise ValueError(
            f"{type(config).__name__}: every target is inside modules_to_save={config.modules_to_save}; "
            "nothing is left to put an adapter on"
        )
    if isinstance(config, IA3Config) and config.feedforward_modules is not None:
        stray = [p for p in _as_list(config.feedforward_modules) if not any(matches(n, p) for n in found)]
        if stray:
            raise ValueError(
                f"{type(config).__name__}: feedforward_modules {stray} match none of the targets {list(found)[:8]}; "
                "feedforward modules must be among target_modules"
            )
    specs: dict[str, dict[str, Any]] = {}
    for name, module in found.items():
        ff = isinstance(config, IA3Config) and _hits(name, feedforward or None)
        # MoV scales only the k and v columns of GPT-2's fused c_attn (the paper); plain IA3 scales
        # all of them, as peft does
        out_slice = _fused_qkv_slice(name, module) if isinstance(config, MoVConfig) and not ff else None
        specs[name] = {"feedforward": ff, "out_slice": out_slice}
    return specs


def saved_modules(model: nn.Module, patterns: str | list[str] | None) -> list[str]:
    """Qualified names of the ``modules_to_save`` (outermost matches only).

    Raises:
        ValueError: a pattern matches no module.
    """
    if not patterns:
        return []
    named = [n for n, _ in model.named_modules() if n]
    out = [n for n in named if _hits(n, patterns)]
    missing = [p for p in _as_list(patterns) if not any(matches(n, p) for n in named)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    # keep the outermost matches only (a matched container covers its children)
    return [n for n in out if not any(n.startswith(o + ".") for o in out if o != n)]


def build_layers(
    model: nn.Module, config: AdapterConfig, specs: Mapping[str, Mapping[str, Any]]
) -> dict[str, AdapterLayer]:
    """One adapter per entry of ``specs`` around the model's module of that name (not inserted yet)."""
    return {name: _build(config, model.get_submodule(name), spec) for name, spec in specs.items()}


#: The peft methods an adapted model gains as instance attributes (see :mod:`mpolab_moe.peft.front`;
#: ``merge_and_unload`` removes them).
PEFT_METHODS = ("print_trainable_parameters", "get_nb_trainable_parameters", "merge_and_unload", "save_pretrained")


def attach(model: nn.Module, config: AdapterConfig, layers: Mapping[str, AdapterLayer], saved: list[str]) -> nn.Module:
    """Freeze ``model``, put ``layers`` in place, unfreeze the adapters and the ``saved`` modules."""
    model.requires_grad_(False)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
        layer.moe.requires_grad_(True)  # the experts and the router
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, SAVED_MODULES_ATTR, list(saved))
    return model


def get_model(model: nn.Module, config: AdapterConfig | Any) -> nn.Module:
    """Add the adapters ``config`` describes to ``model`` (in place) and return it.

    The base model is frozen; the adapters, their routers and the ``modules_to_save`` train.

    Args:
        model: any ``nn.Module`` (Hugging Face T5, GPT-2, BERT, LLaMA have default targets; a
            module that wraps one, such as an encoder plus a head, uses the encoder's).
        config: :class:`LoRAConfig`, :class:`MoLoRAConfig`, :class:`IA3Config` or :class:`MoVConfig`,
            or a peft ``LoraConfig`` / ``IA3Config`` object (converted by
            :func:`~mpolab_moe.peft.peft_format.from_peft_config`; ``target_modules=None`` takes
            peft's default for the architecture).

    Returns:
        ``model``, with its target layers replaced by :class:`~mpolab_moe.peft.layers.LoRALayer`
        / :class:`~mpolab_moe.peft.layers.IA3Layer`.

    Raises:
        TypeError: ``config`` is not an adapter config.
        ValueError: the targets match nothing or a module that cannot be wrapped, the model
            already has adapters, no default targets exist for the architecture.

    Examples:
        >>> model = get_model(model, MoVConfig(num_experts=10))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_peft_config(config):
        config = from_peft_config(config, model_type_of(model))
    if not isinstance(config, (LoRAConfig, MoLoRAConfig, IA3Config, MoVConfig)):
        raise TypeError(
            "config must be LoRAConfig, MoLoRAConfig, IA3Config, MoVConfig or a peft LoraConfig / IA3Config, "
            f"got {type(config).__name__}"
        )
    existing = adapter_layers(model)
    if existing:
        raise ValueError(
            f"the model already has {len(existing)} adapters (e.g. {next(iter(existing))}); adapters do not stack: "
            "merge_and_unload it first or start from a fresh model"
        )
    specs = plan(model, config)
    saved = saved_modules(model, config.modules_to_save)
    return attach(model, config, build_layers(model, config, specs), saved)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter in ``model`` by the qualified name of the layer it wraps."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_state_dict(model: nn.Module) -> dict[str, Any]:
    """The tensors an adapter checkpoint holds: every adapter's experts and router, and ``modules_to_save``."""
    return layers_state_dict(model, adapter_layers(model), getattr(model, SAVED_MODULES_ATTR, []))


def layers_state_dict(model: nn.Module, layers: Mapping[str, AdapterLayer], saved: list[str]) -> dict[str, Any]:
    """``adapter_state_dict`` for given adapters (inserted or not) and saved-module names."""
    state: dict[str, Any] = {}
    for name, layer in layers.items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = value
    for name in saved:
        for key, value in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": m}`` parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def print_trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Print ``trainable: 0.87% of 60.5M (527,360 of 60,506,624 parameters)`` and return the counts."""
    counts = trainable_parameters(model)
    share = counts["trainable"] / max(counts["total"], 1)
    print(
        f"trainable: {share:.2%} of {_human(counts['total'])} "
        f"({counts['trainable']:,} of {counts['total']:,} parameters)"
    )
    return counts


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold plain LoRA / IA3 adapters into the base weights and remove them (in place); return ``model``.

    Every adapter is checked before any weight changes, so an error leaves the model as it was.

    Raises:
        ValueError: the model has no adapters; an adapter is a routed mixture (MoLoRA, MoV with
            ``num_experts > 1``: the error names the module); a base layer is an ``MPOLinear``.

    Examples:
        >>> merged = merge_and_unload(get_model(model, LoRAConfig(r=8)))     # plain nn.Linear layers again
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no mpolab adapters to merge (get_model adds them)")
    for name, layer in layers.items():
        layer.check_mergeable(name)
    for name, layer in layers.items():
        set_submodule(model, name, layer.merge())
    for attr in (CONFIG_ATTR, SAVED_MODULES_ATTR, *PEFT_METHODS):
        if attr in vars(model):
            delattr(model, attr)
    return model
