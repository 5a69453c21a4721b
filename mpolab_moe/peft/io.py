"""Save and load adapters only: ``adapter_model.safetensors`` plus ``adapter_config.json``.

The folder holds the adapters' tensors (experts, routers, ``modules_to_save``) and a JSON record
of the config and of every adapted module (kind, in/out features, experts, feed-forward flag,
scaled output slice). Loading never unpickles: the JSON is parsed, the adapters are rebuilt
around the base model's layers, and the tensors are read with :func:`safetensors.torch.load_file`.
Both files are written with :func:`mpolab.utils.atomic_files`: to temporaries in the folder,
fsynced, moved into place once both are complete (the config last), with ordinary
``0666 & ~umask`` permissions; a failed save leaves an earlier adapter intact.

By default the folder is in HF peft's format (:mod:`~mpolab_moe.peft.peft_format`): plain LoRA
and IA3 load with ``peft.PeftModel.from_pretrained``, mixtures carry ``peft_type``
``"MPOLAB_MOLORA"`` / ``"MPOLAB_MOV"`` (peft refuses them), and mpolab's record rides in the
safetensors metadata. Folders written by peft itself (LoRA, IA3) load too.

``format="mpolab"`` writes mpolab's own format 2, which stores each adapter's tensors under its
``MoE`` (``<module>.moe.gate.weight``, ``<module>.moe.experts.lora_A``, ...); format 1 folders
(``<module>.router.weight``, ``<module>.experts.lora_A``) still load.

Examples:
    >>> save_adapter(model, "adapter/")
    >>> model = load_adapter(make_base_model(), "adapter/")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from torch import Tensor, nn

from mpolab.io import read_json_object
from mpolab.utils import atomic_files

from .config import AdapterConfig, config_from_dict
from .layers import base_features, can_wrap
from .model import (
    CONFIG_ATTR,
    SAVED_MODULES_ATTR,
    adapter_layers,
    adapter_state_dict,
    attach,
    build_layers,
    layers_state_dict,
    model_type_of,
)
from .peft_format import (
    MIXTURE_PEFT_TYPES,
    from_peft_config,
    from_peft_tensors,
    peft_adapter_config,
    peft_specs,
    to_peft_tensors,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT_VERSION",
    "PEFT_FORMAT_VERSION",
    "load_adapter",
    "save_adapter",
]

#: mpolab's own folder format (``format="mpolab"``).
FORMAT_VERSION = 2
#: Version of the mpolab record kept in the safetensors metadata of a peft-format folder.
PEFT_FORMAT_VERSION = 3
#: mpolab formats :func:`load_adapter` reads (besides peft folders).
READABLE_FORMATS = (1, 2)
SaveFormat = Literal["peft", "mpolab"]
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


def save_adapter(model: nn.Module, path: str | os.PathLike[str], format: SaveFormat = "peft") -> Path:
    """Write the adapters of ``model`` (not the base weights) to the folder ``path``.

    Args:
        model: a model returned by :func:`~mpolab_moe.peft.get_model` (or :func:`load_adapter`).
        path: the folder; created if missing.
        format: ``"peft"`` (HF peft's layout: plain LoRA / IA3 load with
            ``PeftModel.from_pretrained``) or ``"mpolab"`` (format 2).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the model has no adapters, ``path`` exists and is not a folder, or an unknown ``format``.

    Examples:
        >>> save_adapter(model, "adapter/")
        PosixPath('adapter')
    """
    if format not in ("peft", "mpolab"):
        raise ValueError(f"format must be 'peft' or 'mpolab', got {format!r}")
    layers = adapter_layers(model)
    config = getattr(model, CONFIG_ATTR, None)
    if not layers or config is None:
        raise ValueError("the model has no mpolab adapters to save (get_model or load_adapter adds them)")
    from mpolab import __version__

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save the adapter to {folder}: it exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    saved = list(getattr(model, SAVED_MODULES_ATTR, []))
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in adapter_state_dict(model).items()}
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "mpolab_version": __version__,
        "config": config.to_dict(),
        "modules": {name: layer.describe() for name, layer in layers.items()},
        "modules_to_save": saved,
    }
    metadata = {"format": "pt", "method": config.method}
    if format == "peft":
        tensors = to_peft_tensors(tensors, layers)
        metadata["mpolab"] = json.dumps({**record, "format_version": PEFT_FORMAT_VERSION})
        text = json.dumps(peft_adapter_config(model, config, layers, saved), indent=2) + "\n"
    else:
        text = json.dumps(record, indent=2) + "\n"
    with atomic_files(folder) as files:  # the config goes last: it marks the folder complete
        # serialise to bytes and write them into the prepared temporary: safetensors.save_file
        # would recreate the file with mode 0600 instead of 0666 & ~umask
        data = safetensors.torch.save(tensors, metadata)
        files.write_with(ADAPTER_WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(data))
        files.write_text(ADAPTER_CONFIG_NAME, text)
    return folder


def _read_json(folder: Path) -> dict[str, Any]:
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"{folder} is not an adapter folder: expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    return read_json_object(config_path, "an adapter folder needs it")


def _read_tensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; a damaged file is a ``ValueError`` naming it."""
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as err:  # SafetensorError (truncated, garbled header), OSError
        raise ValueError(
            f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); save the adapter again"
        ) from err
    return tensors, metadata


def _mpolab_record(record: dict[str, Any], file: Path) -> dict[str, Any]:
    """Check the mpolab record (format 1, 2 or the metadata of a peft-format folder) has what loading needs."""
    missing = [k for k in ("config", "modules") if not isinstance(record.get(k), dict)]
    if missing:
        raise ValueError(
            f"{file}: the adapter record lacks {missing} (a JSON object each); it was not written by "
            "mpolab_moe.peft.save_adapter or is damaged"
        )
    return record


def _check_modules(base: nn.Module, modules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every recorded module exists in ``base``, can be wrapped and has the recorded shape; returns the specs."""
    named = dict(base.named_modules())
    specs: dict[str, dict[str, Any]] = {}
    for name, desc in modules.items():
        module = named.get(name)
        kind = desc.get("kind", "an") if isinstance(desc, dict) else "an"
        if module is None:
            raise ValueError(f"the adapter has a {kind} adapter on {name!r}, but the base model has no such module")
        if not can_wrap(module):
            raise ValueError(f"the adapter wraps {name!r}, which in the base model is a {type(module).__name__}")
        if not isinstance(desc, dict):
            raise ValueError(f"the adapter's record of module {name!r} must be a JSON object, got {desc!r}")
        have = base_features(module)
        want = (desc.get("in_features", have[0]), desc.get("out_features", have[1]))
        if have != want:
            raise ValueError(
                f"module {name!r}: the adapter was made for in_features={want[0]}, out_features={want[1]} "
                f"but the base layer has in_features={have[0]}, out_features={have[1]}"
            )
        specs[name] = {"feedforward": desc.get("feedforward", False), "out_slice": desc.get("out_slice")}
    return specs


def load_adapter(base: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the adapters saved in ``path`` around ``base``'s layers (in place) and return ``base``.

    Reads folders written by :func:`save_adapter` (peft format, mpolab formats 1 and 2) and LoRA /
    IA3 folders written by HF peft. ``base`` must have the architecture the adapter was trained
    on, without adapters. Every check runs before ``base`` is touched. The adapters (and
    ``modules_to_save``) are trainable and the rest frozen, as after
    :func:`~mpolab_moe.peft.get_model`.

    Raises:
        ValueError: the folder is not an adapter, its files are damaged (invalid JSON, a truncated
            safetensors file, a record without ``modules``); ``base`` already has adapters; a
            module the adapter names is missing, cannot be wrapped, or has other shapes (the
            message names the module and both shapes); the tensors do not match the adapters; a
            peft folder of a type other than LoRA / IA3.

    Examples:
        >>> model = load_adapter(AutoModel.from_pretrained(name), "adapter/")
    """
    folder = Path(path)
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    record = _read_json(folder)
    if adapter_layers(base):
        raise ValueError("the base model already has adapters; load into a model without any")
    peft_type = record.get("peft_type")
    version = record.get("format_version")
    if peft_type is None and version not in READABLE_FORMATS:
        raise ValueError(
            f"{config_path}: unsupported adapter format {version!r}; this version reads mpolab formats "
            f"{READABLE_FORMATS} and peft folders (with a 'peft_type')"
        )
    tensors, metadata = _read_tensors(weights_path)
    peft_authored = False
    if peft_type is not None:
        if "mpolab" in metadata:
            try:
                record = json.loads(metadata["mpolab"])
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{weights_path}: the mpolab record in its metadata is not valid JSON: {err}"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{weights_path}: the mpolab record in its metadata must be a JSON object")
        elif peft_type in MIXTURE_PEFT_TYPES.values():
            raise ValueError(f"{weights_path}: a {peft_type} adapter without its mpolab record; save it again")
        else:
            peft_authored = True
    if peft_authored:
        config: AdapterConfig = from_peft_config(record, model_type_of(base))
        modules: dict[str, Any] = peft_specs(tensors)
        if not modules:
            raise ValueError(f"{weights_path} holds no LoRA or IA3 tensors (lora_A.weight, ia3_l)")
        saved = list(record.get("modules_to_save") or [])
    else:
        record = _mpolab_record(record, config_path)
        config = config_from_dict(record["config"])
        modules = record["modules"]
        saved = list(record.get("modules_to_save", []))
    specs = _check_modules(base, modules)
    named = dict(base.named_modules())
    if peft_authored:  # peft names the module classes of modules_to_save; find their instances
        saved = [n for n in named if n and any(n == p or n.endswith("." + p) for p in saved)]
        saved = [n for n in saved if not any(n.startswith(o + ".") for o in saved if o != n)]
    missing_saved = [n for n in saved if n not in named]
    if missing_saved:
        raise ValueError(f"modules_to_save {missing_saved} do not exist in the base model")
    layers = build_layers(base, config, specs)
    expected = layers_state_dict(base, layers, saved)
    if peft_type is not None:
        tensors = from_peft_tensors(tensors, layers)
    elif record["format_version"] == 1:
        tensors = _from_format_1(tensors, list(layers))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
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
