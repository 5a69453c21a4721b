"""HF peft's folder format and config objects, translated to and from mpolab's adapters.

A peft adapter folder holds ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight [r, d_in]``, ``...lora_B.weight [d_out, r]`` (LoRA) or
``base_model.model.<module>.ia3_l`` (IA3: ``[d_out, 1]``, or ``[1, d_in]`` on a feed-forward
module). mpolab stores ``lora_A [E, d_in, r]``, ``lora_B [E, r, d_out]`` and ``vectors [E, d]``
under ``<module>.moe.experts``; this module converts between the two.

* plain LoRA and IA3 are written exactly as peft writes them, so ``PeftModel.from_pretrained``
  loads them; mpolab's own record (config, per-module structure) travels in the safetensors
  metadata under ``"mpolab"``, which peft ignores.
* mixtures (MoLoRA, MoV) use the same layout with ``peft_type`` ``"MPOLAB_MOLORA"`` /
  ``"MPOLAB_MOV"``, which peft refuses (it knows no such type).
* a folder written by peft itself (no ``"mpolab"`` metadata) is read from peft's fields: LoRA
  and IA3 only, without per-layer rank patterns, DoRA or trained biases.

Examples:
    >>> config, adapter = peft_adapter_config(model, layers, saved)      # used by save_adapter
    >>> cfg = from_peft_config(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mpolab.utils import is_conv1d

from .config import AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig
from .layers import AdapterLayer, IA3Layer, LoRALayer

__all__ = [
    "MIXTURE_PEFT_TYPES",
    "PEFT_PREFIX",
    "from_peft_config",
    "from_peft_tensors",
    "is_peft_config",
    "peft_adapter_config",
    "peft_specs",
    "peft_type_of",
    "to_peft_tensors",
]

PEFT_PREFIX = "base_model.model."
#: Our ``peft_type`` markers for the mixtures (peft has no such types and refuses them).
MIXTURE_PEFT_TYPES = {"molora": "MPOLAB_MOLORA", "mov": "MPOLAB_MOV"}
#: peft LoRA / IA3 fields that change the model and that mpolab does not implement, with their neutral values.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "target_parameters": (None, []),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "megatron_config": (None,),
    "trainable_token_indices": (None,),
    "loftq_config": ({}, None),
}


def peft_type_of(config: AdapterConfig) -> str:
    """``"LORA"`` / ``"IA3"`` for the plain methods, our marker for a mixture."""
    if config.method in MIXTURE_PEFT_TYPES:
        return MIXTURE_PEFT_TYPES[config.method]
    return config.method.upper()


def is_peft_config(obj: object) -> bool:
    """Whether ``obj`` looks like a config object of the ``peft`` package (it has a ``peft_type``)."""
    return not isinstance(obj, AdapterConfig) and hasattr(obj, "peft_type") and hasattr(obj, "target_modules")


def _patterns(value: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value)


def _refuse_unsupported(record: Mapping[str, Any], what: str) -> None:
    bad = {k: record[k] for k, neutral in _UNSUPPORTED.items() if k in record and record[k] not in neutral}
    if bad:
        raise ValueError(f"{what} uses peft options mpolab does not implement: {bad}; remove them or use peft")


def from_peft_config(config: Any, model_type: str | None = None) -> AdapterConfig:
    """mpolab's config for a peft ``LoraConfig`` / ``IA3Config`` object or its ``adapter_config.json`` dict.

    A ``target_modules`` of ``None`` takes peft's default for ``model_type`` (peft's LoRA default
    is ``q`` and ``v`` only, not mpolab's q, k, v, o and FFN), so the result adapts what peft would.

    Raises:
        ValueError: another ``peft_type``, or peft options mpolab does not implement (DoRA,
            rank/alpha patterns, layer selection, trained biases), named in the message.
    """
    record = dict(config) if isinstance(config, Mapping) else {k: getattr(config, k) for k in vars(config)}
    peft_type = str(getattr(record.get("peft_type"), "value", record.get("peft_type")))
    what = f"peft {peft_type} config"
    _refuse_unsupported(record, what)
    task = record.get("task_type")
    common: dict[str, Any] = {
        "target_modules": _patterns(record.get("target_modules")),
        "exclude_modules": _patterns(record.get("exclude_modules")),
        "modules_to_save": _patterns(record.get("modules_to_save")),
        "task_type": None if task is None else str(getattr(task, "value", task)),
        "inference_mode": bool(record.get("inference_mode", False)),
    }
    if isinstance(common["modules_to_save"], str):
        common["modules_to_save"] = [common["modules_to_save"]]
    if peft_type == "LORA":
        if common["target_modules"] is None and model_type is not None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora_defaults

            common["target_modules"] = _patterns(lora_defaults.get(model_type))
        init = record.get("init_lora_weights", True)
        if init not in (True, "gaussian"):
            raise ValueError(f"{what}: init_lora_weights={init!r} is not supported; valid: True or 'gaussian'")
        return LoRAConfig(
            r=int(record.get("r", 8)),
            alpha=float(record.get("lora_alpha", 8)),
            dropout=float(record.get("lora_dropout", 0.0)),
            use_rslora=bool(record.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            bias=str(record.get("bias", "none")),
            **common,
        )
    if peft_type == "IA3":
        if not record.get("init_ia3_weights", True):
            raise ValueError(f"{what}: init_ia3_weights=False is not supported (the vectors start at one)")
        return IA3Config(feedforward_modules=_patterns(record.get("feedforward_modules")), **common)
    raise ValueError(f"peft_type {peft_type!r} is not supported; mpolab reads peft's 'LORA' and 'IA3' adapters")


# ---------------------------------------------------------------------------- folders


def peft_adapter_config(
    model: nn.Module, config: AdapterConfig, layers: Mapping[str, AdapterLayer], saved: list[str]
) -> dict[str, Any]:
    """The ``adapter_config.json`` peft would write for these adapters (full module names as targets)."""
    names = list(layers)
    base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    record: dict[str, Any] = {
        "peft_type": peft_type_of(config),
        "task_type": config.task_type,
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "target_modules": names,
        "exclude_modules": None,
        "modules_to_save": list(saved) or None,
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
    }
    if isinstance(config, LoRAConfig):
        record.update(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=True if config.init == "kaiming" else "gaussian",
            bias="none",
            use_dora=False,
            rank_pattern={},
            alpha_pattern={},
        )
    else:
        record.update(
            feedforward_modules=[n for n, layer in layers.items() if layer.feedforward], init_ia3_weights=True
        )
    if config.routed or isinstance(config, (MoLoRAConfig, MoVConfig)):
        record.update(num_experts=config.num_experts, top_k=getattr(config, "top_k", None))
        record["mpolab_note"] = "a mixture of experts adapter: load it with mpolab_moe.peft.from_pretrained(base, path)"
    return record


def to_peft_tensors(tensors: Mapping[str, Tensor], layers: Mapping[str, AdapterLayer]) -> dict[str, Tensor]:
    """Our adapter tensors (``<module>.moe.experts.lora_A [1, d_in, r]``, ...) under peft's names and shapes.

    Plain LoRA/IA3 tensors take peft's names (``lora_A.weight [r, d_in]``, ``lora_B.weight [d_out, r]``,
    ``ia3_l [d_out, 1]`` or ``[1, d_in]``; an IA3 vector on a column slice is padded with ones to
    the full output); everything else (mixtures, ``modules_to_save``) keeps its name. All get the
    ``base_model.model.`` prefix.
    """
    out: dict[str, Tensor] = {}
    plain = {name: layer for name, layer in layers.items() if layer.experts.num_experts == 1 and not layer.routed}
    for key, value in tensors.items():
        name, _, part = key.partition(".moe.experts.")
        layer = plain.get(name) if part else None
        if layer is None:
            out[PEFT_PREFIX + key] = value
        elif isinstance(layer, LoRALayer) and part == "lora_A":
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = value[0].T.contiguous()
        elif isinstance(layer, LoRALayer) and part == "lora_B":
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = value[0].T.contiguous()
        elif isinstance(layer, IA3Layer) and part == "vectors":
            vec = value[0]
            if layer.feedforward:
                out[f"{PEFT_PREFIX}{name}.ia3_l"] = vec[None, :].contiguous()
                continue
            if layer.out_slice is not None:
                full = vec.new_ones(layer.out_features)
                full[layer.out_slice[0] : layer.out_slice[1]] = vec
                vec = full
            out[f"{PEFT_PREFIX}{name}.ia3_l"] = vec[:, None].contiguous()
        else:
            out[PEFT_PREFIX + key] = value
    return out


def peft_specs(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Per-module specs (``feedforward``, ``out_slice``) of a peft-written folder, from its tensor names and shapes."""
    specs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        if key.endswith(".lora_A.weight"):
            specs[key[: -len(".lora_A.weight")]] = {"feedforward": False, "out_slice": None}
        elif key.endswith(".ia3_l"):
            # peft: [1, d_in] scales the input of a feed-forward module, [d_out, 1] the output
            feedforward = value.ndim == 2 and value.shape[0] == 1 and value.shape[1] > 1
            specs[key[: -len(".ia3_l")]] = {"feedforward": feedforward, "out_slice": None}
    return specs


def from_peft_tensors(tensors: Mapping[str, Tensor], layers: Mapping[str, AdapterLayer]) -> dict[str, Tensor]:
    """The inverse of :func:`to_peft_tensors`: peft's names and shapes to ours (``[1, ...]`` expert stacks)."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        for suffix in (".lora_A.weight", ".lora_B.weight", ".ia3_l"):
            name = key[: -len(suffix)] if key.endswith(suffix) else None
            if name is not None and name in layers:
                break
        else:
            out[key] = value
            continue
        layer = layers[name]
        if suffix == ".lora_A.weight":
            out[f"{name}.moe.experts.lora_A"] = value.T.contiguous()[None]
        elif suffix == ".lora_B.weight":
            out[f"{name}.moe.experts.lora_B"] = value.T.contiguous()[None]
        else:
            vec = value.reshape(-1)
            if isinstance(layer, IA3Layer) and layer.out_slice is not None and not layer.feedforward:
                a, b = layer.out_slice
                if vec.numel() == layer.out_features:
                    vec = vec[a:b]
            out[f"{name}.moe.experts.vectors"] = vec.contiguous()[None]
    return out
