"""Save and load models with MPO layers: safetensors for the tensors, JSON for the structure.

A saved model is a folder:

* ``model.safetensors``: the whole ``state_dict`` (MPO cores as ``<layer>.cores.<k>``). Tensors
  shared between names (tied embeddings and ``lm_head``) are stored once.
* ``mpolab_config.json``: ``format_version``, ``mpolab_version``, the SHA-256 of
  ``model.safetensors`` (``weights_sha256``, checked on load), each MPO layer's kind, shape,
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

Examples:
    >>> mpolab.compress(model, "all-linear", ratio=0.5)
    >>> mpolab.save(model, "out/")
    >>> restored = mpolab.load("out/")                      # Hugging Face models: rebuilt from config.json
    >>> restored = mpolab.load("out/", base=make_model())   # any model: give a module of the same architecture
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from torch import nn

from .mpo import MPO
from .nn import MPOEmbedding, MPOLinear, MPOModule, check_padding_idx, mpo_modules
from .utils import atomic_files, is_conv1d, set_submodule

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "HF_CONFIG_NAME",
    "MARKER_MODEL_TYPE",
    "check_hf_model_folder",
    "WEIGHTS_NAME",
    "LayerRecord",
    "SavedRecord",
    "describe_layers",
    "file_sha256",
    "load",
    "mark_hf_config",
    "read_checked",
    "read_json_object",
    "read_record",
    "read_tensors",
    "safe_hf_config",
    "save",
    "unmark_hf_config",
    "verify_weights",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
#: The index of a sharded save (Hugging Face ``save_pretrained`` with ``max_shard_size``).
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "mpolab_config.json"
HF_CONFIG_NAME = "config.json"

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

    Examples:
        >>> mpolab.compress(model, "all-linear", max_rank=16)
        >>> mpolab.save(model, "compressed/")
        PosixPath('compressed')
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save to {path}: it exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)

    from . import __version__

    layers = describe_layers(model)
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

    with atomic_files(path) as files:  # moved into place in write order: the structure file last
        weights = files.path(WEIGHTS_NAME)
        safetensors.torch.save_model(model, str(weights), metadata={"format": "pt"})
        record["weights_sha256"] = file_sha256(weights)
        if hf_config is not None:
            data = json.loads(hf_config.to_json_string(use_diff=True))
            if layers:  # never a folder that transformers loads into random weights without a word
                data = mark_hf_config(data, loaders="mpolab.load")
            files.write_text(HF_CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")
        files.write_text(CONFIG_NAME, json.dumps(record, indent=2, sort_keys=False) + "\n")
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


def describe_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``"modules"`` map of ``mpolab_config.json``: every MPO layer's record by qualified name."""
    return {name: _describe(module) for name, module in mpo_modules(model).items()}


def _describe(module: MPOModule) -> dict[str, Any]:
    """The JSON record of one MPO layer: enough to rebuild it empty."""
    dtype = str(module.cores[0].dtype).removeprefix("torch.")
    common = {
        "in_factors": list(module.in_factors),
        "out_factors": list(module.out_factors),
        "ranks": list(module.ranks),
        "dtype": dtype,
        "cache_weight": bool(getattr(module, "cache_weight", True)),
        "original": module.original_type,
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


# ---------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike[str],
    base: nn.Module | None = None,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
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
        verify: check ``model.safetensors`` against the SHA-256 recorded at save time (one
            read of the file); ``False`` skips it (huge files). Folders saved before the hash
            was recorded load without the check.

    Returns:
        The model. A given ``base`` keeps its train/eval mode; a model built from the folder is
        returned in eval mode (as ``from_pretrained`` does).

    Raises:
        FileNotFoundError: ``path`` or one of its files does not exist.
        ValueError: a corrupt or unknown-version file, weights whose SHA-256 is not the
            recorded one, a recorded structure the file's tensors do not have, a base whose modules or tensors do not
            match the saved ones (naming them and their shapes), or no ``base`` for a folder that
            does not record a ``transformers`` model class. On these errors a given ``base`` is
            left as it was.

    Examples:
        >>> model = mpolab.load("compressed/")                     # Hugging Face model
        >>> model = mpolab.load("compressed/", base=MyNet())       # any other model
    """
    saved, state = read_checked(path, map_location, verify=verify)
    config_file, weights_file = saved.folder / CONFIG_NAME, saved.folder / WEIGHTS_NAME

    if base is None:
        model = _build_hf_model(saved.folder, saved.model_class, config_file)
        model.eval()
        model.to(_device(map_location))
    else:
        model = base

    model, replaced = _install_layers(model, saved.layers, config_file)
    try:
        _check_and_load(model, state, strict, weights_file)
    except BaseException:
        for name, old in replaced:
            if name:
                set_submodule(model, name, old)
        raise
    for module in mpo_modules(model).values():
        module.clear_cache()
    return model


@dataclass(frozen=True)
class LayerRecord:
    """One saved MPO layer, as recorded in ``mpolab_config.json`` (validated by :func:`read_record`).

    Attributes:
        name: qualified module name (``""`` for a model that is one MPO layer).
        kind: ``"linear"`` or ``"embedding"``.
        shape: ``(out_features, in_features)`` (``(num_embeddings, embedding_dim)``).
        out_factors, in_factors, ranks: the MPO structure; cores are ``[r_{k-1}, i_k, j_k, r_k]``.
        dtype: the cores' dtype.
        bias, padding_idx, cache_weight: as the layer had them.
        original: class name of the dense layer it replaced, or ``None``.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    dtype: torch.dtype
    bias: bool
    padding_idx: int | None
    cache_weight: bool
    original: str | None

    @property
    def core_keys(self) -> list[str]:
        """The ``state_dict`` names of the cores (``<name>.cores.<k>``)."""
        prefix = f"{self.name}.cores." if self.name else "cores."
        return [f"{prefix}{k}" for k in range(len(self.out_factors))]

    @property
    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        bonds = [1, *self.ranks, 1]
        return [(bonds[k], i, j, bonds[k + 1]) for k, (i, j) in enumerate(zip(self.out_factors, self.in_factors))]

    def mpo_from(self, tensors: Mapping[str, torch.Tensor], file: Path | str = WEIGHTS_NAME) -> MPO:
        """The layer's :class:`MPO` from ``tensors`` (as :func:`read_tensors` returns them).

        Raises:
            ValueError: a core is missing or its shape is not the recorded one.
        """
        cores = []
        for key, shape in zip(self.core_keys, self.core_shapes):
            if key not in tensors:
                raise ValueError(f"{file} lacks {key!r}, recorded for layer {self.name!r} in {CONFIG_NAME}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{file}: {key!r} has shape {tuple(tensors[key].shape)}, but {CONFIG_NAME} records {shape}"
                )
            cores.append(tensors[key])
        return MPO(cores, *self.shape)

    def empty_layer(self, device: torch.device | None = None) -> MPOModule:
        """An MPO layer of this structure with zero cores (to be filled from the file)."""
        cores = [torch.zeros(s, dtype=self.dtype, device=device) for s in self.core_shapes]
        mpo = MPO(cores, *self.shape)
        if self.kind == "embedding":
            return MPOEmbedding.from_mpo(
                mpo, padding_idx=self.padding_idx, cache_weight=self.cache_weight, original_type=self.original
            )
        bias = torch.zeros(self.shape[0], dtype=self.dtype, device=device) if self.bias else None
        return MPOLinear.from_mpo(mpo, bias, cache_weight=self.cache_weight, original_type=self.original)


@dataclass(frozen=True)
class SavedRecord:
    """The validated ``mpolab_config.json`` of a folder written by :func:`save`."""

    folder: Path
    format_version: int
    mpolab_version: str | None
    model_class: str | None
    layers: dict[str, LayerRecord]
    weights_sha256: str | None = None


def read_record(path: str | os.PathLike[str]) -> SavedRecord:
    """Read and validate the structure of a folder written by :func:`save` (no tensors are read).

    :func:`load` and ``mpolab inspect`` both start here, so they accept and refuse the same folders.

    Raises:
        FileNotFoundError: ``path``, its ``model.safetensors`` or its ``mpolab_config.json`` is missing.
        ValueError: ``path`` is a file; the JSON is invalid, of another ``format_version``, or a
            layer record is inconsistent (naming the layer and the field).

    Examples:
        >>> saved = read_record("compressed/")
        >>> {name: layer.ranks for name, layer in saved.layers.items()}
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; expected {_EXPECTED}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; expected {_EXPECTED}")
    for file in (folder / CONFIG_NAME, folder / WEIGHTS_NAME):
        # a sharded Hugging Face save (mpolab.from_pretrained reads it) has an index instead of one file
        if not file.is_file() and not (file.name == WEIGHTS_NAME and (folder / WEIGHTS_INDEX_NAME).is_file()):
            raise FileNotFoundError(f"{file} is missing; expected {_EXPECTED}")
    file = folder / CONFIG_NAME
    record = _read_json(file)
    layers = {name: _parse_layer(name, rec, file) for name, rec in record["modules"].items()}
    version = record.get("mpolab_version")
    digest = record.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"{file}: weights_sha256 must be 64 lowercase hex digits, got {digest!r}")
    model_class = record.get("model_class")
    if model_class is not None and not isinstance(model_class, str):
        raise ValueError(f"{file}: model_class must be a string ('transformers.<Name>'), got {model_class!r}")
    return SavedRecord(
        folder,
        record["format_version"],
        None if version is None else str(version),
        model_class or None,
        layers,
        digest,
    )


def read_tensors(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``model.safetensors`` (never unpickles), on ``map_location``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a readable safetensors file.
    """
    file = Path(path) / WEIGHTS_NAME
    device: str | int = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        return safetensors.torch.load_file(str(file), device=device)
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError (header/body truncated or garbled), OSError, ...
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def file_sha256(file: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(saved: SavedRecord) -> None:
    """Check ``model.safetensors`` against the ``weights_sha256`` of ``mpolab_config.json``.

    Nothing to check for folders saved without a hash (older mpolab, sharded saves).

    Raises:
        ValueError: the recorded hash is not a SHA-256 hex string, or the file's bytes differ.
    """
    expected = saved.weights_sha256
    file = saved.folder / WEIGHTS_NAME
    if expected is None or not file.is_file():
        return
    actual = file_sha256(file)
    if actual != expected:
        raise ValueError(
            f"{file} is not the file that was saved: its SHA-256 is {actual[:16]}..., {CONFIG_NAME} records "
            f"{expected[:16]}... (corrupted or modified after saving); re-save the model, or pass verify=False "
            "to load it anyway"
        )


def read_checked(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, verify: bool = True
) -> tuple[SavedRecord, dict[str, torch.Tensor]]:
    """The record and the tensors of a saved folder, with every check that needs no base model.

    :func:`load` and ``mpolab inspect`` both read through this, so they refuse the same folders:
    :func:`read_record`'s checks, the weights' SHA-256 (unless ``verify=False``), and every
    recorded layer against the file: its cores (present, of the recorded shapes and dtype, all
    read from the file's header before anything is allocated for the layer), its bias, and its
    ``padding_idx``.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_record` and :func:`read_tensors`; a layer
            whose recorded structure the file does not hold (naming the layer, the field, both values).
    """
    saved = read_record(path)
    if verify:
        verify_weights(saved)
    tensors = read_tensors(saved.folder, map_location)
    file = saved.folder / WEIGHTS_NAME
    for layer in saved.layers.values():
        _check_layer_tensors(layer, tensors, file)
    return saved, tensors


def _check_layer_tensors(layer: LayerRecord, tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """``layer``'s cores and bias in ``tensors`` have the recorded shapes and dtype."""
    mpo = layer.mpo_from(tensors, file)
    if mpo.dtype != layer.dtype:
        raise ValueError(f"{file}: layer {layer.name!r} has {mpo.dtype} cores, but {CONFIG_NAME} records {layer.dtype}")
    bias_key = f"{layer.name}.bias" if layer.name else "bias"
    if layer.bias and layer.kind == "linear":
        bias = tensors.get(bias_key)
        if bias is None or tuple(bias.shape) != (layer.shape[0],):
            found = "no bias" if bias is None else f"a bias of shape {tuple(bias.shape)}"
            raise ValueError(
                f"{file}: {CONFIG_NAME} records a bias [{layer.shape[0]}] for layer {layer.name!r}, "
                f"the file holds {found}"
            )
    elif bias_key in tensors:
        raise ValueError(f"{file} holds {bias_key!r}, but {CONFIG_NAME} records layer {layer.name!r} without bias")


def check_hf_model_folder(path: str | os.PathLike[str]) -> Path:
    """Check a local Hugging Face model folder before any work is spent on it (the CLI's input).

    It must be a folder with a ``config.json`` holding a JSON object with a ``model_type`` and
    safetensors weights (``model.safetensors`` or a sharded index); pickled weights
    (``pytorch_model.bin``) are refused, since loading them would unpickle.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: not a folder; an invalid ``config.json``; no weights, or only pickled ones.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist, so it is not a model folder; give a local Hugging Face one")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a model folder; give a local Hugging Face one")
    config = folder / HF_CONFIG_NAME
    data = read_json_object(config, f"{folder} is not a Hugging Face model folder")
    if not isinstance(data.get("model_type"), str):
        raise ValueError(f"{config} must be a JSON object with a 'model_type' (a transformers config)")
    if (folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file():
        return folder
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}), which mpolab never loads (unpickling "
            "can run code); convert them to model.safetensors with a trusted tool first"
        )
    raise ValueError(f"{folder} holds no weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")


def _read_json(file: Path) -> dict[str, Any]:
    record = read_json_object(file, "re-save the model with mpolab.save")
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


def _parse_layer(name: str, rec: Any, file: Path) -> LayerRecord:
    """Validate one layer record of ``file``."""
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
    given = [rec.get(k) for k in keys]
    if not _positive_ints(given):
        raise ValueError(f"{where} needs positive integer {keys[0]} and {keys[1]}, got {tuple(given)}")
    shape = (int(given[0]), int(given[1]))  # type: ignore[arg-type]
    out_f, in_f, ranks = rec.get("out_factors"), rec.get("in_factors"), rec.get("ranks")
    if not (_positive_ints(out_f) and _positive_ints(in_f) and _positive_ints(ranks)):
        raise ValueError(f"{where} needs lists of positive integers out_factors, in_factors and ranks")
    out_f, in_f, ranks = cast("list[int]", out_f), cast("list[int]", in_f), cast("list[int]", ranks)
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
    if kind == "linear" and padding_idx is not None:
        raise ValueError(f"{where}: a linear layer has no padding_idx, got {padding_idx!r}")
    try:
        padding_idx = check_padding_idx(padding_idx, shape[0])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    for flag in ("bias", "cache_weight"):
        if flag in rec and not isinstance(rec[flag], bool):
            raise ValueError(f"{where}: {flag} must be true or false, got {rec[flag]!r}")
    if kind == "embedding" and rec.get("bias"):
        raise ValueError(f"{where}: an embedding has no bias, got bias=true")
    original = rec.get("original")
    if original is not None and not isinstance(original, str):
        raise ValueError(f"{where}: original must be a class name or null, got {original!r}")
    return LayerRecord(
        name=name,
        kind=kind,
        shape=shape,
        out_factors=tuple(out_f),
        in_factors=tuple(in_f),
        ranks=tuple(ranks),
        dtype=dtype,
        bias=bool(rec.get("bias", False)),
        padding_idx=padding_idx,
        cache_weight=bool(rec.get("cache_weight", True)),
        original=None if original is None else str(original),
    )


def _device(map_location: str | torch.device) -> torch.device:
    return torch.device(f"cuda:{map_location}" if isinstance(map_location, int) else map_location)


def _build_hf_model(path: Path, name: str | None, config_file: Path) -> nn.Module:
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
    config_class = cls.config_class
    if config_class is None:
        raise ValueError(f"{config_file}: model_class {name!r} has no config class to read {hf_config} with")
    try:
        data = json.loads(hf_config.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        config = config_class.from_dict(safe_hf_config(unmark_hf_config(data), str(hf_config)))
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{hf_config} is not a valid {config_class.__name__} ({e})") from e
    return cls(config)


def read_json_object(file: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``file``.

    Raises:
        FileNotFoundError: ``file`` does not exist (the message ends with ``missing``).
        ValueError: it is not valid UTF-8 JSON, or not a JSON object.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; {missing}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


#: ``model_type`` written to ``config.json`` of a folder with mpolab layers: transformers refuses it.
MARKER_MODEL_TYPE = "mpolab"
#: Where the real ``model_type`` and ``dtype`` go in a marked ``config.json``.
ORIGINAL_TYPE_KEY = "mpolab_model_type"
ORIGINAL_DTYPE_KEY = "mpolab_dtype"
NOTE_KEY = "mpolab_note"


def mark_hf_config(config: dict[str, Any], loaders: str = "mpolab.from_pretrained") -> dict[str, Any]:
    """``config`` (a ``config.json`` dict) marked so that transformers refuses to load the folder.

    ``AutoModel.from_pretrained`` refuses the unknown ``model_type`` ``"mpolab"``; a model class's
    own ``from_pretrained`` (``BertModel.from_pretrained``) ignores ``model_type`` but stops on the
    ``dtype``, which is set to a note naming the loader. The real values are kept under
    ``mpolab_model_type`` / ``mpolab_dtype`` and :func:`unmark_hf_config` restores them. Marking
    twice is the same as marking once.
    """
    marked = dict(config)
    if marked.get("model_type") != MARKER_MODEL_TYPE:
        marked[ORIGINAL_TYPE_KEY] = marked.get("model_type")
        marked["model_type"] = MARKER_MODEL_TYPE
    note = f"a model with mpolab layers: load it with {loaders}(folder)"
    marked[NOTE_KEY] = note
    if ORIGINAL_DTYPE_KEY not in marked:
        marked[ORIGINAL_DTYPE_KEY] = marked.get("dtype")
    marked["dtype"] = note
    return marked


def unmark_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict as Hugging Face wrote it, from one marked by :func:`mark_hf_config`."""
    plain = dict(config)
    if plain.get("model_type") == MARKER_MODEL_TYPE:
        plain["model_type"] = plain.pop(ORIGINAL_TYPE_KEY, None)
    if ORIGINAL_DTYPE_KEY in plain:
        plain["dtype"] = plain.pop(ORIGINAL_DTYPE_KEY)
        if plain["dtype"] is None:
            del plain["dtype"]
    plain.pop(NOTE_KEY, None)
    return plain


#: ``config.json`` fields that make transformers load code (remote modules, hub kernels).
_CODE_FIELDS = ("auto_map", "trust_remote_code", "custom_pipelines")
_ATTENTION_FIELDS = ("attn_implementation", "_attn_implementation")
#: attention implementations built into transformers (anything else may fetch a hub kernel).
SAFE_ATTENTION = ("eager", "sdpa")


def safe_hf_config(data: dict[str, Any], source: str = HF_CONFIG_NAME) -> dict[str, Any]:
    """A copy of a ``config.json`` dict that cannot make transformers load code, with a warning per change.

    Code-loading fields (``auto_map``, ``trust_remote_code``, ``custom_pipelines``) are dropped, and
    an attention implementation other than ``"eager"`` / ``"sdpa"`` (a hub kernel such as
    ``"kernels-community/flash-attn"``) is removed so transformers picks its built-in default;
    nested sub-configs (``text_config``, ...) likewise.
    """
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if key in _CODE_FIELDS:
            warnings.warn(f"{source}: ignoring {key!r} (mpolab.load never loads code from a folder)", stacklevel=4)
        elif key in _ATTENTION_FIELDS and value is not None and value not in SAFE_ATTENTION:
            warnings.warn(
                f"{source}: ignoring {key}={value!r}; building with a built-in attention implementation "
                f"({' or '.join(SAFE_ATTENTION)}) instead, since others may download code",
                stacklevel=4,
            )
        elif isinstance(value, dict):
            clean[key] = safe_hf_config(value, source)
        else:
            clean[key] = value
    return clean


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
        rows, cols = tuple(module.get_parameter("weight").shape)  # Conv1D stores [in, out]
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


def _install_layers(
    model: nn.Module, layers: Mapping[str, LayerRecord], config_file: Path
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
                f"{_shape_text(rec.kind, rec.shape)}; is it the saved architecture?"
            )
        found = _compatible_shape(old)
        if found is None or found[:2] != (rec.kind, rec.shape):
            have = f"{found[2]} {_shape_text(*found[:2])}" if found else f"a {type(old).__name__}"
            raise ValueError(
                f"module {name!r}: saved as an MPO {_shape_text(rec.kind, rec.shape)}, but the base has {have}"
            )
        plan.append((name, old, found[2]))
    replaced = []
    for name, old, old_type in plan:
        layer = layers[name].empty_layer(_module_device(old))
        if layer.original_type is None and not old_type.startswith("MPO"):
            layer.original_type = old_type
        layer.train(old.training)
        if name:
            set_submodule(model, name, layer)
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
    live: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for key, t in live.items():
            saved = state.get(key)
            if saved is not None and t.dtype != saved.dtype:
                t.data = t.data.to(saved.dtype)
    usable = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(usable, strict=False)
