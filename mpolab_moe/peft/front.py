"""peft's front door, spelled as peft spells it: ``get_peft_model``, ``PeftModel.from_pretrained``, model methods.

An adapted model gains peft's methods as instance attributes: ``print_trainable_parameters()``,
``get_nb_trainable_parameters()``, ``merge_and_unload()`` and ``save_pretrained(d)`` (the adapter
only, in peft's folder format). On a Hugging Face model they shadow its own ``save_pretrained``,
which would otherwise write the whole model under renamed keys; ``merge_and_unload`` removes them.

Examples:
    >>> model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
    >>> model.print_trainable_parameters()
    >>> model.save_pretrained("adapter/")
    >>> model = PeftModel.from_pretrained(base, "adapter/")
"""

from __future__ import annotations

import os
import types
from typing import Any

from torch import nn

from .io import SaveFormat, save_adapter
from .io import load_adapter as load_adapter_only
from .model import PEFT_METHODS, merge_and_unload, print_trainable_parameters, trainable_parameters
from .model import get_model as get_model_only

__all__ = ["PeftModel", "add_peft_methods", "from_pretrained", "get_model", "get_peft_model", "load_adapter"]


#: Keyword arguments of Hugging Face's / peft's ``save_pretrained`` that make no difference to an adapter folder.
_IGNORED_SAVE_ARGS = frozenset({"state_dict", "max_shard_size", "variant", "save_peft_format", "selected_adapters"})


def _save_pretrained(
    adapted: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    format: SaveFormat = "peft",
    **kwargs: Any,
) -> None:
    """peft's ``model.save_pretrained(d)``: the adapter only (see :func:`~mpolab_moe.peft.save_adapter`).

    Accepts the keyword arguments the Hugging Face ``Trainer`` passes (``state_dict``,
    ``safe_serialization``, ``max_shard_size``, ...); the adapter's own tensors are written.

    Raises:
        ValueError: ``safe_serialization=False`` or ``push_to_hub=True``.
        TypeError: an argument ``save_pretrained`` does not know.
    """
    if not safe_serialization:
        raise ValueError("safe_serialization=False is not supported: adapters are saved as safetensors only")
    if kwargs.pop("push_to_hub", False):
        raise ValueError("push_to_hub=True is not supported: save the adapter, then upload the folder")
    unknown = sorted(set(kwargs) - _IGNORED_SAVE_ARGS)
    if unknown:
        raise TypeError(f"save_pretrained got unexpected arguments {unknown}")
    if is_main_process:
        save_adapter(adapted, save_directory, format=format)


def _merge_and_unload(adapted: nn.Module, progressbar: bool = False, safe_merge: bool = False) -> nn.Module:
    return merge_and_unload(adapted)


def _nb_trainable(adapted: nn.Module) -> tuple[int, int]:
    counts = trainable_parameters(adapted)
    return counts["trainable"], counts["total"]


_METHODS: dict[str, Any] = {
    "print_trainable_parameters": print_trainable_parameters,
    "get_nb_trainable_parameters": _nb_trainable,
    "merge_and_unload": _merge_and_unload,
    "save_pretrained": _save_pretrained,
}
assert tuple(_METHODS) == PEFT_METHODS


def add_peft_methods(adapted: nn.Module) -> nn.Module:
    """Give an adapted model peft's methods as instance attributes (``PEFT_METHODS``); return it."""
    for attr, fn in _METHODS.items():
        object.__setattr__(adapted, attr, types.MethodType(fn, adapted))
    return adapted


def get_model(base: nn.Module, config: Any) -> nn.Module:
    """:func:`mpolab_moe.peft.model.get_model`, and the model gains peft's methods."""
    return add_peft_methods(get_model_only(base, config))


get_model.__doc__ = get_model_only.__doc__


def get_peft_model(base: nn.Module, peft_config: Any) -> nn.Module:
    """peft's spelling of :func:`get_model` (mpolab configs and peft ``LoraConfig`` / ``IA3Config`` objects).

    Examples:
        >>> model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
    """
    return get_model(base, peft_config)


def load_adapter(base: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """:func:`mpolab_moe.peft.io.load_adapter`, and the model gains peft's methods."""
    return add_peft_methods(load_adapter_only(base, path))


load_adapter.__doc__ = load_adapter_only.__doc__


def from_pretrained(base: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """peft's ``PeftModel.from_pretrained(base, path)``: the adapter in ``path`` around ``base`` (in place).

    Reads mpolab's folders and LoRA / IA3 folders written by HF peft.

    Examples:
        >>> model = from_pretrained(AutoModelForCausalLM.from_pretrained(name), "adapter/")
    """
    return load_adapter(base, path)


class PeftModel:
    """Namespace with peft's ``PeftModel.from_pretrained(base, path)``; adapted models stay the base's class."""

    from_pretrained = staticmethod(from_pretrained)
