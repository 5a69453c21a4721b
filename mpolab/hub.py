"""Hugging Face ``save_pretrained`` / ``from_pretrained`` for models with mpolab layers.

Without this module, ``model.save_pretrained(d)`` on a compressed Hugging Face model writes the
MPO cores under their own names (``<layer>.cores.0``), and ``AutoModel.from_pretrained(d)`` then
builds the dense model, finds none of its weights there and initialises them at random, with
only a warning. With it (installed when :mod:`mpolab` is imported), ``save_pretrained`` of a
model that carries MPO layers (or a registered extension's layers, such as ``mpolab_moe``'s MoE
layers) writes:

* what Hugging Face writes: ``config.json``, ``model.safetensors`` (or shards and
  ``model.safetensors.index.json`` with ``max_shard_size``), ``generation_config.json``;
* ``mpolab_config.json``: the MPO layers' structure, as :func:`mpolab.save` records it, the
  ``model_class`` and the extensions' records;
* ``config.json`` with ``"model_type": "mpolab"`` (the real one kept as ``"mpolab_model_type"``),
  so ``AutoModel.from_pretrained(d)`` / ``AutoConfig`` refuse the folder with an error instead of
  loading random weights, and a ``"dtype"`` that is a note naming the loader (the real one kept
  as ``"mpolab_dtype"``), so a class's own ``BertModel.from_pretrained(d)``, which does not check
  the model type, fails too (``AttributeError: module 'torch' has no attribute 'a model with
  mpolab layers: load it with mpolab.from_pretrained(folder)'``).

:func:`from_pretrained` reads such a folder back exactly (and folders written by
:func:`mpolab.save`). Models without mpolab layers save exactly as before.

Examples:
    >>> mpolab.compress(model, "all-linear", ratio=0.5)
    >>> model.save_pretrained("out/")                  # HF layout + mpolab_config.json
    >>> AutoModel.from_pretrained("out/")              # ValueError: model type `mpolab` ... not recognised
    >>> model = mpolab.from_pretrained("out/")         # the compressed model, exactly
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .io import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HF_CONFIG_NAME,
    MARKER_MODEL_TYPE,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    describe_layers,
    mark_hf_config,
    read_json_object,
    read_record,
    safe_hf_config,
    unmark_hf_config,
    verify_weights,
)
from .nn import mpo_modules
from .utils import set_submodule

__all__ = [
    "MARKER_MODEL_TYPE",
    "HubExtension",
    "from_pretrained",
    "install",
    "read_weights",
    "register_extension",
    "save_pretrained",
]


@dataclass(frozen=True)
class HubExtension:
    """Layers another package adds to a model (``mpolab_moe`` registers its MoE layers).

    Attributes:
        key: the key of its record in ``mpolab_config.json``.
        record: ``model -> dict | None``: what to record for a model (``None``: the model has none
            of these layers).
        rebuild: ``(model, record, folder, options) -> model``: put the layers back into a freshly
            built model before its tensors are loaded.
        loader: the function to name in errors (``"mpolab_moe.from_pretrained"``).
    """

    key: str
    record: Callable[[nn.Module], dict[str, Any] | None]
    rebuild: Callable[[nn.Module, dict[str, Any], Path, Mapping[str, Any]], nn.Module]
    loader: str


_EXTENSIONS: dict[str, HubExtension] = {}
#: The keys of ``mpolab_config.json`` that mpolab itself writes; any other key belongs to an extension.
_CORE_RECORD_KEYS = frozenset({"format_version", "mpolab_version", "modules", "model_class", "weights_sha256"})


def register_extension(extension: HubExtension) -> None:
    """Make ``save_pretrained`` / :func:`from_pretrained` handle another package's layers."""
    _EXTENSIONS[extension.key] = extension


def _records(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MPO layer records, extension records) of ``model``; both empty for a plain model."""
    extra = {}
    for key, ext in _EXTENSIONS.items():
        rec = ext.record(model)
        if rec is not None:
            extra[key] = rec
    return describe_layers(model), extra


# ---------------------------------------------------------------------------- save


def _hf_model_class(model: nn.Module) -> str | None:
    import transformers

    name = type(model).__name__
    return f"transformers.{name}" if getattr(transformers, name, None) is type(model) else None


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike[str], original: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """What the patched ``PreTrainedModel.save_pretrained`` runs: Hugging Face's save, plus the mpolab record.

    Args:
        model: a ``transformers.PreTrainedModel``.
        save_directory: the folder.
        original: Hugging Face's ``save_pretrained``.
        *args, **kwargs: passed to it (``max_shard_size``, ``safe_serialization``, ...).

    Raises:
        ValueError: ``push_to_hub=True`` (the folder must be marked before it leaves the machine:
            use ``model.push_to_hub(repo)``, which saves through this function first), or
            ``safe_serialization=False`` for a model with mpolab layers.
    """
    layers, extra = _records(model)
    if not layers and not extra:
        return original(model, save_directory, *args, **kwargs)
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) is refused for a model with mpolab layers: the folder is completed "
            "after Hugging Face writes it. Call model.push_to_hub(repo_id) (it saves through the same hook), or "
            "save and then upload the folder"
        )
    if kwargs.get("safe_serialization") is False:
        raise ValueError(
            "safe_serialization=False is refused for a model with mpolab layers: they load from safetensors"
        )
    out = original(model, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return out
    from . import __version__

    folder = Path(save_directory)
    record: dict[str, Any] = {"format_version": FORMAT_VERSION, "mpolab_version": __version__, "modules": layers}
    model_class = _hf_model_class(model)
    if model_class is not None:
        record["model_class"] = model_class
    record.update(extra)
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    loaders = sorted({ext.loader for key, ext in _EXTENSIONS.items() if key in extra} or {"mpolab.from_pretrained"})
    hf_config = mark_hf_config(json.loads((folder / HF_CONFIG_NAME).read_text(encoding="utf-8")), " or ".join(loaders))
    (folder / HF_CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _patch(pretrained_model: type) -> None:
    original = pretrained_model.save_pretrained  # type: ignore[attr-defined]
    if getattr(original, "_mpolab_hook", False):
        return

    @functools.wraps(original)
    def hooked(self: nn.Module, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        return save_pretrained(self, save_directory, original, *args, **kwargs)

    hooked._mpolab_hook = True  # type: ignore[attr-defined]
    pretrained_model.save_pretrained = hooked  # type: ignore[attr-defined]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``PreTrainedModel.save_pretrained`` right after ``transformers.modeling_utils`` is imported."""

    target = "transformers.modeling_utils"

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module.PreTrainedModel)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Hook ``transformers.PreTrainedModel.save_pretrained`` now, or when transformers' modelling code is imported.

    Called when :mod:`mpolab` is imported; idempotent. It never imports transformers itself.
    """
    module = sys.modules.get(_PatchOnImport.target)
    if module is not None:
        _patch(module.PreTrainedModel)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


# ---------------------------------------------------------------------------- load


def _hf_config(folder: Path) -> dict[str, Any]:
    file = folder / HF_CONFIG_NAME
    config = read_json_object(file, "mpolab.from_pretrained builds the model from it")
    return safe_hf_config(unmark_hf_config(config), str(file))


def _build(folder: Path, model_class: str | None, config: dict[str, Any]) -> nn.Module:
    m = re.fullmatch(r"transformers\.([A-Za-z_][A-Za-z0-9_]*)", str(model_class or ""))
    if m is None:
        raise ValueError(
            f"{folder / CONFIG_NAME} records model_class {model_class!r}; from_pretrained builds classes of the "
            "transformers package only ('transformers.<Name>'); use mpolab.load(folder, base=...) for other models"
        )
    import transformers

    cls = getattr(transformers, m.group(1), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and cls.config_class):
        raise ValueError(f"{folder / CONFIG_NAME}: model_class {model_class!r} is not a transformers model class")
    config.pop("transformers_version", None)
    return cls(cls.config_class.from_dict(config))


def read_weights(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards a ``model.safetensors.index.json`` lists."""
    device = str(map_location)
    index = folder / WEIGHTS_INDEX_NAME
    files = [folder / WEIGHTS_NAME]
    if not files[0].is_file() and index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(safetensors.torch.load_file(str(file), device=device))
        except FileNotFoundError:
            raise
        except Exception as e:  # SafetensorError: truncated or garbled
            raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return tensors


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Load ``tensors`` strictly; a key the file lacks is fine only when it is tied to one it has."""
    expected = model.state_dict(keep_vars=True)
    by_storage: dict[Any, set[str]] = {}
    for key, t in expected.items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), set()).add(key)
    tied = {k: g for g in by_storage.values() for k in g}
    missing = sorted(k for k in set(expected) - set(tensors) if not (tied.get(k, set()) & tensors.keys()))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {list(v.shape)}, model {list(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{folder} does not match the model it describes: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape mismatches {wrong[:6]}"
        )
    model.load_state_dict(tensors, strict=False)


def from_pretrained(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", **options: Any
) -> nn.Module:
    """Load a Hugging Face model with mpolab layers saved by ``save_pretrained`` (or :func:`mpolab.save`).

    Builds ``model_class`` from ``config.json`` (no hub access, no unpickling), replaces the
    recorded layers by empty MPO layers of the recorded structure, lets registered extensions
    rebuild theirs (``mpolab_moe``'s MoE layers), then loads every tensor strictly: a missing
    tensor that is not tied to a present one, an unexpected one or a shape mismatch is an error.

    Args:
        path: the folder.
        map_location: where the model goes.
        **options: passed to the extensions (e.g. ``moefy={...}`` for ``mpolab_moe``).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the folder records an extension that is not loaded (the message names its
            loader), or its tensors do not match the model it describes.

    Examples:
        >>> model = mpolab.from_pretrained("compressed/")
    """
    saved = read_record(path)
    verify_weights(saved)
    folder = saved.folder
    record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    model = _build(folder, saved.model_class, _hf_config(folder))
    for name, layer in saved.layers.items():
        set_submodule(model, name, layer.empty_layer())
    for key in sorted(set(record) - _CORE_RECORD_KEYS):
        ext = _EXTENSIONS.get(key)
        if ext is None:
            raise ValueError(
                f"{folder / CONFIG_NAME} records {key!r} layers that mpolab alone cannot rebuild; "
                f"import the package that wrote them and use its loader (e.g. mpolab_moe.from_pretrained)"
            )
        model = ext.rebuild(model, record[key], folder, options)
    if options and not any(key in _EXTENSIONS for key in record):
        raise TypeError(f"from_pretrained got options {sorted(options)}, but {folder} records no layers that use them")
    _load_state(model, read_weights(folder), folder)
    for module in mpo_modules(model).values():
        module.clear_cache()
    return model.to(map_location).eval()


install()
