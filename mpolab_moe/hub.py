"""``save_pretrained`` / ``from_pretrained`` for moefied Hugging Face models, and the front door for adapters.

:func:`moefy` here is :func:`mpolab_moe.convert.moefy` that also records its arguments on the
model (the one ``mpolab_moe.moefy`` exports). A moefied model's ``save_pretrained(d)`` (hooked by
:mod:`mpolab.hub`) then writes Hugging Face's folder, ``config.json`` marked so transformers
refuses it, and in ``mpolab_config.json`` the MoE layers and the recorded ``moefy`` calls;
:func:`from_pretrained` builds the dense model from ``config.json``, replays the calls (on random
weights; only the structure matters) and loads every tensor strictly, so the round trip is exact.

Examples:
    >>> mpolab_moe.moefy(gpt2, layers=[-1], num_experts=4, experts="dense")
    >>> gpt2.save_pretrained("moe/")
    >>> model = mpolab_moe.from_pretrained("moe/")
    >>> model = mpolab_moe.from_pretrained("adapter/", base=AutoModel.from_pretrained(name))   # an adapter folder
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

import mpolab
from mpolab.hub import HubExtension, register_extension

from .convert import MoefyReport
from .convert import moefy as moefy_unrecorded
from .layer import moe_layers
from .peft import adapter_layers
from .peft import from_pretrained as adapter_from_pretrained

__all__ = ["MOEFY_CALLS_ATTR", "from_pretrained", "moefy"]

#: Attribute of a model holding the JSON-ready arguments of every :func:`moefy` call on it
#: (``None`` in the list for a call whose arguments are not JSON values).
MOEFY_CALLS_ATTR = "mpolab_moefy_calls"


def _json_ready(value: Any) -> Any:
    if isinstance(value, (tuple, range)):
        value = list(value)
    json.dumps(value)  # TypeError / ValueError when it is not a JSON value
    return value


def moefy(
    model: nn.Module,
    layers: Any = None,
    num_experts: int | None = None,
    experts: str | None = None,
    gate: str | None = None,
    method: str | None = None,
    **kwargs: Any,
) -> MoefyReport:
    report = moefy_unrecorded(model, layers, num_experts, experts, gate, method, **kwargs)
    call: dict[str, Any] | None = {
        "layers": layers,
        "num_experts": num_experts,
        "experts": experts,
        "gate": gate,
        "method": method,
        **kwargs,
    }
    try:
        call = {k: _json_ready(v) for k, v in call.items() if v is not None}  # type: ignore[union-attr]
    except (TypeError, ValueError):
        call = None
    calls = [*getattr(model, MOEFY_CALLS_ATTR, []), call]
    object.__setattr__(model, MOEFY_CALLS_ATTR, calls)
    return report


moefy.__doc__ = (moefy_unrecorded.__doc__ or "") + (
    "\n    The arguments are recorded on the model (``mpolab_moefy_calls``) so that ``save_pretrained``"
    "\n    and :func:`mpolab_moe.from_pretrained` can rebuild the MoE layers.\n"
)


def _record(model: nn.Module) -> dict[str, Any] | None:
    if adapter_layers(model):
        raise ValueError(
            "this model has mpolab adapters: save the adapter with model.save_pretrained(d) (it writes the adapter "
            "only, in peft's format) or mpolab_moe.peft.save_adapter; merge_and_unload() first to save the whole model"
        )
    layers = moe_layers(model)
    if not layers:
        return None
    return {
        "layers": {
            name: {"gate": type(m.gate).__name__, "experts": type(m.experts).__name__, "num_experts": m.num_experts}
            for name, m in layers.items()
        },
        "moefy": getattr(model, MOEFY_CALLS_ATTR, None),
    }


def _rebuild(model: nn.Module, record: dict[str, Any], folder: Path, options: Mapping[str, Any]) -> nn.Module:
    calls = options.get("moefy", record.get("moefy"))
    if isinstance(calls, dict):
        calls = [calls]
    if not calls or any(c is None for c in calls):
        raise ValueError(
            f"{folder} holds MoE layers {sorted(record.get('layers', {}))[:4]} but no record of the moefy calls that "
            "made them (their arguments were not JSON values, or another function built them); pass "
            "mpolab_moe.from_pretrained(folder, moefy={...the arguments given to moefy...})"
        )
    for call in calls:
        moefy_unrecorded(model, **call)
    object.__setattr__(model, MOEFY_CALLS_ATTR, list(calls))
    built = {n: type(m.experts).__name__ for n, m in moe_layers(model).items()}
    want = {n: rec["experts"] for n, rec in record.get("layers", {}).items()}
    if built != want:
        raise ValueError(f"{folder}: replaying moefy built MoE layers {built}, but the folder records {want}")
    return model


register_extension(HubExtension("moe", _record, _rebuild, "mpolab_moe.from_pretrained"))


def from_pretrained(
    path: str | os.PathLike[str], base: nn.Module | None = None, *, moefy: Any = None, **options: Any
) -> nn.Module:
    """Load a moefied (or compressed) model saved with ``save_pretrained``, or an adapter folder onto ``base``.

    Args:
        path: the folder.
        base: for an adapter folder (``adapter_config.json``), the base model it goes on
            (as peft's ``PeftModel.from_pretrained(base, path)``); otherwise not given.
        moefy: the arguments of the ``moefy`` call(s) that built the MoE layers (a dict or a list
            of dicts), when the folder does not record them.
        **options: passed to :func:`mpolab.from_pretrained` (``map_location``).

    Raises:
        ValueError: an adapter folder without ``base``, a ``base`` for a model folder, or a
            folder whose tensors do not match the rebuilt model.

    Examples:
        >>> model = mpolab_moe.from_pretrained("moe/")
    """
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        if base is None:
            raise ValueError(f"{folder} is an adapter folder: pass base=<the model it was trained on>")
        return adapter_from_pretrained(base, folder)
    if base is not None:
        raise ValueError(f"{folder} holds a whole model (no adapter_config.json); base= is for adapter folders")
    if moefy is not None:
        options["moefy"] = moefy
    return mpolab.from_pretrained(folder, **options)
