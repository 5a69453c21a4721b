"""Save and load adapters only: ``adapter_model.safetensors`` plus ``adapter_config.json``.

The folder holds the adapters' tensors (experts, routers, ``modules_to_save``) and a JSON record
of the config and of every adapted module (kind, in/out features, experts, feed-forward flag,
scaled output slice). Loading never unpickles: the JSON is parsed, the adapters are rebuilt
around the base model's layers, and the tensors are read with :func:`safetensors.torch.load_file`.
Both files are written with :func:`mpolab.utils.atomic_files`: to temporaries in the folder,
fsynced, moved into place once both are complete (the config last), with ordinary
``0666 & ~umask`` permissions; a failed save leaves an earlier adapter intact.

Format 2 stores each adapter's tensors under its ``MoE`` (``<module>.moe.gate.weight``,
``<module>.moe.experts.lora_A``, ...); format 1 folders (``<module>.router.weight``,
``<module>.experts.lora_A``) still load.

Examples:
    >>> save_adapter(model, "adapter/")
    >>> model = load_adapter(make_base_model(), "adapter/")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from mpolab.utils import atomic_files

from .config import config_from_dict
from .layers import base_features, can_wrap
from .model import (
    CONFIG_ATTR,
    SAVED_MODULES_ATTR,
    adapter_layers,
    adapter_state_dict,
    attach,
    build_layers,
    layers_state_dict,
)

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "FORMAT_VERSION", "load_adapter", "save_adapter"]

FORMAT_VERSION = 2
#: Formats :func:`load_adapter` reads.
READABLE_FORMATS = (1, 2)
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Format 1 kept each adapter's router and experts directly on the adapter module.
_V1_PARTS = {".router.": ".moe.gate.", ".experts.": ".moe.experts."}


def _from_format_1(tensors: dict[str, Tensor], adapters: list[str]) -> dict[str, Tensor]:
    """Rename format-1 keys of the adapters' tensors (``<name>.router.*``) to format 2 (``<name>.moe.gate.*``)."""
    out = {}
    for key, value in tensors.items():
        for name in adapters:
            for old, new in _V1_PARTS.items():
                if key.startswith(name + old):
                    key = name + new + key[len(name + old) :]
                    break
        out[key] = value
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the adapters of ``model`` (not the base weights) to the folder ``path``.

    Args:
        model: a model returned by :func:`~mpolab_moe.peft.get_model` (or :func:`load_adapter`).
        path: the folder; created if missing.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the model has no adapters, or ``path`` exists and is not a folder.

    Examples:
        >>> save_adapter(model, "adapter/")
        PosixPath('adapter')
    """
    layers = adapter_layers(model)
    config = getattr(model, CONFIG_ATTR, None)
    if not layers or config is None:
        raise ValueError("the model has no mpolab adapters to save (get_model or load_adapter adds them)")
    from mpolab import __version__

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save the adapter to {folder}: it exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in adapter_state_dict(model).items()}
    record = {
        "format_version": FORMAT_VERSION,
        "mpolab_version": __version__,
        "config": config.to_dict(),
        "modules": {name: layer.describe() for name, layer in layers.items()},
        "modules_to_save": list(getattr(model, SAVED_MODULES_ATTR, [])),
    }
    metadata = {"format": "pt", "method": config.method}
    with atomic_files(folder) as files:  # the config goes last: it marks the folder complete
        # serialise to bytes and write them into the prepared temporary: safetensors.save_file
        # would recreate the file with mode 0600 instead of 0666 & ~umask
        data = safetensors.torch.save(tensors, metadata)
        files.write_with(ADAPTER_WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(data))
        files.write_text(ADAPTER_CONFIG_NAME, json.dumps(record, indent=2) + "\n")
    return folder


def _read_record(folder: Path) -> dict[str, Any]:
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"{folder} is not an adapter folder: expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    version = record.get("format_version") if isinstance(record, dict) else None
    if version not in READABLE_FORMATS:
        raise ValueError(
            f"{config_path}: unsupported adapter format {version!r}; this version reads formats {READABLE_FORMATS}"
        )
    return record


def load_adapter(base: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the adapters saved in ``path`` around ``base``'s layers (in place) and return ``base``.

    ``base`` must have the architecture the adapter was trained on, without adapters. Every check
    runs before ``base`` is touched. The adapters (and ``modules_to_save``) are trainable and the
    rest frozen, as after :func:`~mpolab_moe.peft.get_model`.

    Raises:
        ValueError: the folder is not an adapter; ``base`` already has adapters; a module the
            adapter names is missing, cannot be wrapped, or has other shapes (the message names
            the module and both shapes); the tensors do not match the adapters.

    Examples:
        >>> model = load_adapter(AutoModel.from_pretrained(name), "adapter/")
    """
    folder = Path(path)
    record = _read_record(folder)
    if adapter_layers(base):
        raise ValueError("the base model already has adapters; load into a model without any")
    config = config_from_dict(record["config"])
    named = dict(base.named_modules())
    specs: dict[str, dict[str, Any]] = {}
    for name, desc in record["modules"].items():
        module = named.get(name)
        if module is None:
            raise ValueError(
                f"the adapter has a {desc['kind']} adapter on {name!r}, but the base model has no such module"
            )
        if not can_wrap(module):
            raise ValueError(f"the adapter wraps {name!r}, which in the base model is a {type(module).__name__}")
        have = base_features(module)
        want = (desc["in_features"], desc["out_features"])
        if have != want:
            raise ValueError(
                f"module {name!r}: the adapter was made for in_features={want[0]}, out_features={want[1]} "
                f"but the base layer has in_features={have[0]}, out_features={have[1]}"
            )
        specs[name] = {"feedforward": desc.get("feedforward", False), "out_slice": desc.get("out_slice")}
    saved = list(record.get("modules_to_save", []))
    missing_saved = [n for n in saved if n not in named]
    if missing_saved:
        raise ValueError(f"modules_to_save {missing_saved} do not exist in the base model")
    layers = build_layers(base, config, specs)
    expected = layers_state_dict(base, layers, saved)
    tensors = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    if record["format_version"] == 1:
        tensors = _from_format_1(tensors, list(layers))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{folder / ADAPTER_WEIGHTS_NAME} does not match its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            module = key.rsplit(".", 1)[0]
            raise ValueError(
                f"module {module!r}: {key} has shape {list(value.shape)} in the adapter but "
                f"{list(expected[key].shape)} in the model"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)
    return attach(base, config, layers, saved)
