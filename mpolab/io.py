"""Save and load models with MPO layers: safetensors for the tensors, JSON for the structure.

A saved model is a folder:

* ``model.safetensors``: the whole ``state_dict`` (MPO cores as ``<layer>.cores.<k>``). Tensors
  shared between names (tied embeddings and ``lm_head``) are stored once.
* ``mpolab_config.json``: ``format_version``, ``mpolab_version``, each MPO layer's kind, shape,
  factors, ranks, bias, ``padding_idx`` and dtype, and for Hugging Face models the
  ``model_class`` (``"transformers.GPT2LMHeadModel"``).
* ``config.json``: the Hugging Face config, for Hugging Face models.

Every file is written to a temporary file in the folder, and the temporary files are moved over
the final names (``os.replace``) only once all of them are complete: an error while writing
leaves the files of an earlier save untouched. Each file is replaced atomically, the folder as a
whole is not: the moves happen one after the other (``model.safetensors``, then ``config.json``,
then ``mpolab_config.json`` last), so a crash between two moves can leave new and old files side
by side. A ``config.json`` that an earlier save of a Hugging Face model wrote (its
``mpolab_config.json`` recorded a ``model_class``) is removed when a model without one is saved
over it. Loading never unpickles:
tensors are read with :func:`safetensors.torch.load_file` and MPO layers are rebuilt empty from
the recorded structure (no decomposition), then filled from the file.

Example:
    >>> mpolab.compress(model, "all-linear", ratio=0.5)
    >>> mpolab.save(model, "out/")
    >>> restored = mpolab.load("out/")                      # Hugging Face models: rebuilt from config.json
    >>> restored = mpolab.load("out/", base=make_model())   # any model: give a module of the same architecture
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .compress import _set_submodule, is_conv1d, mpo_modules
from .mpo import MPO
from .nn import MPOEmbedding, MPOLinear, MPOModule

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "HF_CONFIG_NAME", "WEIGHTS_NAME", "load", "save"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mpolab_config.json"
HF_CONFIG_NAME = "config.json"

#: Attribute an MPO layer may carry to say which dense layer it replaced (``"Linear"``,
#: ``"Conv1D"``, ``"Embedding"``); written as ``"original"`` and set again on load.
ORIGINAL_ATTR = "original_type"

_EXPECTED = f"a folder written by mpolab.save, holding {WEIGHTS_NAME} and {CONFIG_NAME}"


# ---------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save ``model`` (with or without MPO layers) to the folder ``path``.

    Writes ``model.safetensors`` (the full ``state_dict``; tied weights stored once),
    ``mpolab_config.json`` (the MPO layers' structure) and, for a Hugging Face model,
    ``config.json``. The folder is created if missing. Files of an earlier save are replaced only
    once every new file has been written completely, so an error while writing leaves them as
    they were. Each file is then replaced atomically, one after the other with
    ``mpolab_config.json`` last; the folder as a whole is not swapped atomically. When a model
    that is not a Hugging Face model is saved over an earlier save of one, that save's
    ``config.json`` is removed (it would describe another model); a ``config.json`` not written
    by ``mpolab.save`` (no earlier ``mpolab_config.json`` with a ``model_class``) is left alone,
    as are other files in the folder (tokenizer files, for instance).

    Args:
        model: any ``nn.Module``; its MPO layers are found by :func:`mpolab.compress.mpo_modules`
            (a model without any is saved with an empty ``modules`` map).
        path: the folder to write.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``path`` exists and is not a folder.

    Example:
        >>> mpolab.compress(model, "all-linear", max_rank=16)
        >>> mpolab.save(model, "compressed/")
        PosixPath('compressed')
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save to {path}: it exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)

    from . import __version__

    layers = {name: _describe(module) for name, module in mpo_modules(model).items()}
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "mpolab_version": __version__,
        "modules": layers,
    }
    model_class = _hf_model_class(model)
    if model_class is not None:
        record["model_class"] = model_class
    hf_config = getattr(model, "config", None) if _is_hf_model(model) else None
    stale_hf_config = hf_config is None and _wrote_hf_config(path)

    pending: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        tmp = _new_temp(path, WEIGHTS_NAME)
        pending.append((tmp, path / WEIGHTS_NAME))
        safetensors.torch.save_model(model, str(tmp), metadata={"format": "pt"})
        _fsync(tmp)

        if hf_config is not None:
            tmp = _new_temp(path, HF_CONFIG_NAME)
            pending.append((tmp, path / HF_CONFIG_NAME))
            _write_text(tmp, hf_config.to_json_string(use_diff=True))

        tmp = _new_temp(path, CONFIG_NAME)
        pending.append((tmp, path / CONFIG_NAME))
        _write_text(tmp, json.dumps(record, indent=2, sort_keys=False) + "\n")

        # Everything is written: move each file into place, the structure file last.
        for tmp, final in pending:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        raise
    if stale_hf_config:
        (path / HF_CONFIG_NAME).unlink(missing_ok=True)
    return path


def _wrote_hf_config(folder: Path) -> bool:
    """Whether ``folder`` holds a ``config.json`` from an earlier ``save`` of a Hugging Face model."""
    if not (folder / HF_CONFIG_NAME).is_file():
        return False
    try:
        record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and bool(record.get("model_class"))


def _describe(module: MPOModule) -> dict[str, Any]:
    """The JSON record of one MPO layer: enough to rebuild it empty."""
    dtype = str(module.cores[0].dtype).removeprefix("torch.")
    common = {
        "in_factors": list(module.in_factors),
        "out_factors": list(module.out_factors),
        "ranks": list(module.ranks),
        "dtype": dtype,
        "cache_weight": bool(getattr(module, "cache_weight", True)),
        "original": getattr(module, ORIGINAL_ATTR, None),
    }
    if isinstance(module, MPOEmbedding):
        return {
            "kind": "embedding",
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
            "bias": False,
            **common,
        }
    if isinstance(module, MPOLinear):
        return {
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "padding_idx": None,
            **common,
        }
    raise TypeError(f"cannot save MPO layer of type {type(module).__name__}; expected MPOLinear or MPOEmbedding")


def _is_hf_model(model: nn.Module) -> bool:
    import sys

    if "transformers" not in sys.modules:  # a transformers model implies transformers is imported
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _hf_model_class(model: nn.Module) -> str | None:
    """``"transformers.<Class>"`` when the model's class is importable from ``transformers`` by that name."""
    if not _is_hf_model(model):
        return None
    import transformers

    name = type(model).__name__
    return f"transformers.{name}" if getattr(transformers, name, None) is type(model) else None


def _new_temp(folder: Path, final_name: str) -> Path:
    """An empty temporary file in ``folder`` (suffix ``.tmp``, so no ``*.safetensors`` glob sees it)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{final_name}.", suffix=".tmp", delete=False) as f:
        name = f.name
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike[str],
    base: nn.Module | None = None,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a model saved by :func:`save`.

    The recorded MPO layers of ``base`` are replaced by empty MPO layers of the recorded factors
    and ranks (nothing is decomposed; the base's dense weights there are discarded), then every
    tensor is filled from ``model.safetensors``. Parameters take the saved dtypes.

    Args:
        path: the folder written by :func:`save`.
        base: a module of the saved architecture (e.g. a freshly built model of the same config,
            dense or already compressed), modified in place and returned. Without it the folder
            must hold a Hugging Face model: its ``model_class`` (a class of ``transformers``,
            nothing else is imported) is built from ``config.json`` without hub access.
        strict: missing or unexpected tensor names are errors (otherwise they are skipped with a
            warning). Shape mismatches are always errors.
        map_location: device the tensors are read to. A model built from ``config.json`` is
            moved there; with a ``base`` the values are copied into the base's own devices.

    Returns:
        The model. A given ``base`` keeps its train/eval mode; a model built from the folder is
        returned in eval mode (as ``from_pretrained`` does).

    Raises:
        FileNotFoundError: ``path`` or one of its files does not exist.
        ValueError: a corrupt or unknown-version file, a base whose modules or tensors do not
            match the saved ones (naming them and their shapes), or no ``base`` for a folder that
            does not record a ``transformers`` model class. On these errors a given ``base`` is
            left as it was.

    Example:
        >>> model = mpolab.load("compressed/")                     # Hugging Face model
        >>> model = mpolab.load("compressed/", base=MyNet())       # any other model
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_EXPECTED}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; expected {_EXPECTED}")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; expected {_EXPECTED}")

    record = _read_record(config_file)
    layers = _parse_layers(record["modules"], config_file)
    state = _read_weights(weights_file, map_location)

    if base is None:
        model = _build_hf_model(path, record, config_file)
        model.eval()
        model.to(_device(map_location))
    else:
        model = base

    model, replaced = _install_layers(model, layers, config_file)
    try:
        _check_and_load(model, state, strict, weights_file)
    except BaseException:
        for name, old in replaced:
            if name:
                _set_submodule(model, name, old)
        raise
    for module in mpo_modules(model).values():
        module.clear_cache()
    return model


def _read_record(file: Path) -> dict[str, Any]:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-save the model with mpolab.save") from e
    if not isinstance(record, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(record).__name__}")
    version = record.get("format_version")
    if version is None:
        raise ValueError(f"{file} has no format_version; it was not written by mpolab.save")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {version!r}, but this mpolab reads format_version {FORMAT_VERSION} "
            f"(written by mpolab {record.get('mpolab_version', '?')}); upgrade mpolab"
        )
    if not isinstance(record.get("modules"), dict):
        raise ValueError(f"{file}: 'modules' must be a JSON object of MPO layers by name")
    return record


def _positive_ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _parse_layers(modules: Mapping[str, Any], file: Path) -> dict[str, dict[str, Any]]:
    """Validate each layer record; returns them with ``shape`` (out, in) and a ``torch.dtype``."""
    layers = {}
    for name, rec in modules.items():
        where = f"{file}: module {name!r}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where} must be a JSON object")
        kind = rec.get("kind")
        if kind == "linear":
            keys = ("out_features", "in_features")
        elif kind == "embedding":
            keys = ("num_embeddings", "embedding_dim")
        else:
            raise ValueError(f"{where} has unknown kind {kind!r} (expected 'linear' or 'embedding')")
        shape = tuple(rec.get(k) for k in keys)
        if not _positive_ints(list(shape)):
            raise ValueError(f"{where} needs positive integer {keys[0]} and {keys[1]}, got {shape}")
        out_f, in_f, ranks = rec.get("out_factors"), rec.get("in_factors"), rec.get("ranks")
        if not (_positive_ints(out_f) and _positive_ints(in_f) and _positive_ints(ranks)):
            raise ValueError(f"{where} needs lists of positive integers out_factors, in_factors and ranks")
        if not out_f or len(out_f) != len(in_f) or len(ranks) != len(out_f) - 1:
            raise ValueError(
                f"{where} has inconsistent factors/ranks: out_factors={out_f}, in_factors={in_f}, ranks={ranks} "
                "(need equal factor counts and one rank fewer)"
            )
        if math.prod(out_f) < shape[0] or math.prod(in_f) < shape[1]:
            raise ValueError(
                f"{where}: factors out={out_f}, in={in_f} do not cover the shape {shape[0]}x{shape[1]} (out x in)"
            )
        dtype = getattr(torch, str(rec.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"{where} has unknown dtype {rec.get('dtype')!r}")
        padding_idx = rec.get("padding_idx")
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
            raise ValueError(f"{where} has a non-integer padding_idx {padding_idx!r}")
        layers[name] = {
            **rec,
            "shape": shape,
            "torch_dtype": dtype,
            "bias": bool(rec.get("bias", False)),
        }
    return layers


def _read_weights(file: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    device: str | int = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        return safetensors.torch.load_file(str(file), device=device)
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError (header/body truncated or garbled), OSError, ...
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def _device(map_location: str | torch.device) -> torch.device:
    return torch.device(f"cuda:{map_location}" if isinstance(map_location, int) else map_location)


def _build_hf_model(path: Path, record: Mapping[str, Any], config_file: Path) -> nn.Module:
    name = record.get("model_class")
    if not name:
        raise ValueError(
            f"{config_file} records no transformers model_class, so the architecture is unknown; "
            "pass base=<a module of the saved architecture> to mpolab.load"
        )
    m = re.fullmatch(r"transformers\.([A-Za-z_][A-Za-z0-9_]*)", str(name))
    if m is None:
        raise ValueError(
            f"{config_file}: model_class {name!r} is refused; only classes of the transformers package "
            "('transformers.<Name>') are built, pass base= for anything else"
        )
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"loading {path} without base= needs transformers (model_class {name})") from e
    cls = getattr(transformers, m.group(1), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{config_file}: model_class {name!r} is not a transformers model class")
    hf_config = path / HF_CONFIG_NAME
    if not hf_config.is_file():
        raise FileNotFoundError(f"{hf_config} is missing; it is needed to build {name} (or pass base=)")
    try:
        config = cls.config_class.from_json_file(hf_config)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{hf_config} is not a valid {cls.config_class.__name__} ({e})") from e
    return cls(config)


def _compatible_shape(module: nn.Module) -> tuple[str, tuple[int, int], str] | None:
    """``(kind, (out, in), description)`` of a module an MPO layer may replace, else ``None``."""
    if isinstance(module, MPOEmbedding):
        return "embedding", (module.num_embeddings, module.embedding_dim), "MPOEmbedding"
    if isinstance(module, MPOLinear):
        return "linear", (module.out_features, module.in_features), "MPOLinear"
    if isinstance(module, nn.Embedding):
        return "embedding", (module.num_embeddings, module.embedding_dim), "Embedding"
    if isinstance(module, nn.Linear):
        return "linear", (module.out_features, module.in_features), "Linear"
    if is_conv1d(module):
        rows, cols = module.weight.shape  # Conv1D stores [in, out]
        return "linear", (int(cols), int(rows)), "Conv1D"
    return None


def _shape_text(kind: str, shape: tuple[int, int]) -> str:
    if kind == "embedding":
        return f"embedding [num_embeddings={shape[0]}, embedding_dim={shape[1]}]"
    return f"linear [out_features={shape[0]}, in_features={shape[1]}]"


def _module_device(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    return None


def _empty_layer(rec: Mapping[str, Any], device: torch.device | None) -> MPOModule:
    """An MPO layer of the recorded structure with zero cores (filled from the file afterwards)."""
    out_f, in_f, ranks = rec["out_factors"], rec["in_factors"], rec["ranks"]
    dtype = rec["torch_dtype"]
    bonds = [1, *ranks, 1]
    cores = [
        torch.zeros(bonds[k], i, j, bonds[k + 1], dtype=dtype, device=device)
        for k, (i, j) in enumerate(zip(out_f, in_f))
    ]
    mpo = MPO(cores, *rec["shape"])
    cache_weight = bool(rec.get("cache_weight", True))
    if rec["kind"] == "embedding":
        return MPOEmbedding.from_mpo(mpo, padding_idx=rec.get("padding_idx"), cache_weight=cache_weight)
    bias = torch.zeros(rec["shape"][0], dtype=dtype, device=device) if rec["bias"] else None
    return MPOLinear.from_mpo(mpo, bias, cache_weight=cache_weight)


def _install_layers(
    model: nn.Module, layers: Mapping[str, Mapping[str, Any]], config_file: Path
) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """Check every recorded layer against ``model``, then swap in empty MPO layers.

    Returns the model (the new layer itself when the saved model was a bare MPO layer, name
    ``""``) and ``[(name, replaced module)]`` so the caller can undo. Nothing is changed on error.
    """
    plan = []
    for name, rec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if old is None:
            raise ValueError(
                f"the base {type(model).__name__} has no module {name!r}, which {config_file} records as an MPO "
                f"{_shape_text(rec['kind'], rec['shape'])}; is it the saved architecture?"
            )
        found = _compatible_shape(old)
        if found is None or found[:2] != (rec["kind"], rec["shape"]):
            have = f"{found[2]} {_shape_text(*found[:2])}" if found else f"a {type(old).__name__}"
            raise ValueError(
                f"module {name!r}: saved as an MPO {_shape_text(rec['kind'], rec['shape'])}, but the base has {have}"
            )
        plan.append((name, old, found[2]))
    replaced = []
    for name, old, old_type in plan:
        rec = layers[name]
        layer = _empty_layer(rec, _module_device(old))
        original = rec.get("original") or (old_type if not old_type.startswith("MPO") else None)
        if original is not None:
            setattr(layer, ORIGINAL_ATTR, original)
        layer.train(old.training)
        if name:
            _set_submodule(model, name, layer)
        else:  # the saved model was a bare MPO layer: the new layer is the model
            model = layer
        replaced.append((name, old))
    return model, replaced


def _alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, frozenset[str]]:
    """For each name, every name of ``state`` that is exactly the same tensor view (tied weights)."""
    groups: dict[tuple[Any, ...], set[str]] = {}
    for key, t in state.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(ident, set()).add(key)
    return {k: frozenset(g) for g in groups.values() for k in g}


def _listing(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_and_load(model: nn.Module, state: dict[str, torch.Tensor], strict: bool, file: Path) -> None:
    expected = model.state_dict(keep_vars=True)
    aliases = _alias_groups(expected)
    unexpected = set(state) - set(expected)
    missing = {k for k in set(expected) - set(state) if not (aliases.get(k, frozenset()) & state.keys())}
    mismatched = [
        f"{k!r}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{file}: shape mismatch between file and model for {len(mismatched)} tensor(s): "
            + "; ".join(mismatched[:8])
        )
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing from the file: {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_listing(unexpected)}")
        message = f"{file} does not match the model's state_dict: " + "; ".join(problems)
        if strict:
            raise ValueError(message + " (pass strict=False to load the rest)")
        warnings.warn(message, stacklevel=3)

    # Saved dtypes win: recast the model's tensors in place (keeps Parameter identity and ties).
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for key, t in live.items():
            saved = state.get(key)
            if saved is not None and t.dtype != saved.dtype:
                t.data = t.data.to(saved.dtype)
    usable = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(usable, strict=False)
