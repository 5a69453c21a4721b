"""Property suite for save/load: bit-exact round trips, or a clear error for every damaged folder.

* round trips of random models (layer kinds, dtypes, ranks, bias, padding_idx) are bit-exact;
* every single-field edit of ``mpolab_config.json`` either loads the exact saved tensors (a field
  that does not change them, such as ``mpolab_version``) or raises a ``ValueError`` /
  ``FileNotFoundError`` naming the file: never a bare ``KeyError`` / ``TypeError`` /
  ``RuntimeError``, never a silently different model;
* a truncated or bit-flipped ``model.safetensors`` is always refused (its SHA-256 is recorded).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mpolab
from mpolab import MPOEmbedding, MPOLinear
from mpolab.io import CONFIG_NAME, WEIGHTS_NAME

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLEAR_ERRORS = (ValueError, FileNotFoundError)


def make_base(dtype: torch.dtype = torch.float32, bias: bool = True, padding_idx: int | None = 0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(24, 12, padding_idx=padding_idx, dtype=dtype),
        nn.Linear(12, 16, bias=bias, dtype=dtype),
        nn.Linear(16, 6, dtype=dtype),
    )


def compressed(dtype: torch.dtype, rank: int, bias: bool, padding_idx: int | None) -> nn.Module:
    model = make_base(dtype, bias, padding_idx)
    model[0] = MPOEmbedding.from_embedding(model[0], num_cores=3, max_rank=rank)
    model[1] = MPOLinear.from_linear(model[1], num_cores=2, max_rank=rank)
    return model


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@contextmanager
def copy_of(folder: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "saved"
        shutil.copytree(folder, target)
        yield target


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = compressed(torch.float32, 3, True, 0)
    folder = tmp_path_factory.mktemp("saved")
    mpolab.save(model, folder)
    return model, folder


@SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    rank=st.integers(1, 8),
    bias=st.booleans(),
    padding_idx=st.sampled_from([None, 0, 5, 23]),
)
def test_round_trip_is_bit_exact(dtype, rank, bias, padding_idx):
    model = compressed(dtype, rank, bias, padding_idx)
    with tempfile.TemporaryDirectory() as tmp:
        mpolab.save(model, tmp)
        loaded = mpolab.load(tmp, base=make_base())
        again = mpolab.load(tmp, base=compressed(torch.float32, 2, bias, padding_idx))  # other ranks in the base
    assert same_state(model, loaded) and same_state(model, again)
    assert loaded[0].padding_idx == model[0].padding_idx
    x = torch.randint(0, 24, (3, 5))
    assert torch.equal(model(x), loaded(x))


# ----------------------------------------------------------------------------- config edits

LAYER_FIELDS = [
    "kind",
    "in_features",
    "out_features",
    "num_embeddings",
    "embedding_dim",
    "out_factors",
    "in_factors",
    "ranks",
    "dtype",
    "bias",
    "padding_idx",
    "cache_weight",
    "original",
]
TOP_FIELDS = ["format_version", "mpolab_version", "model_class", "weights_sha256", "modules"]

replacement = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([10**12, 2**40, -(10**9)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "linear", "embedding", "float16", "int8", "torch.float32", "x" * 64, "0" * 64]),
    st.lists(st.integers(-1, 10**6), max_size=4),
    st.sampled_from([[1, 1], [10**6, 10**6], [3, 4, 2], [2, 2, 6]]),
    st.dictionaries(st.sampled_from(["0", "1", "x"]), st.integers(0, 3), max_size=2),
)


def edit(record: dict[str, Any], layer: str | None, field: str, value: Any) -> bool:
    """Set (or delete, for the sentinel ``...``) one field; ``False`` when the edit changes nothing."""
    target = record if layer is None else record["modules"][layer]
    if value is ...:
        if field not in target:
            return False
        del target[field]
        return True
    if field in target and target[field] == value and type(target[field]) is type(value):
        return False
    target[field] = value
    return True


def load_after_edit(folder: Path, layer: str | None, field: str, value: Any) -> tuple[nn.Module | None, bool]:
    record = json.loads((folder / CONFIG_NAME).read_text())
    changed = edit(record, layer, field, value)
    (folder / CONFIG_NAME).write_text(json.dumps(record))
    try:
        return mpolab.load(folder, base=make_base()), changed
    except CLEAR_ERRORS as e:
        assert str(folder) in str(e) or "module" in str(e) or "padding_idx" in str(e), f"unclear: {e}"
        return None, changed


@SETTINGS
@given(
    layer=st.sampled_from(["0", "1"]),
    field=st.sampled_from(LAYER_FIELDS),
    value=st.one_of(replacement, st.just(...)),
)
def test_every_layer_field_edit_is_exact_or_a_clear_error(saved_folder, layer, field, value):
    model, folder = saved_folder
    with copy_of(folder) as copy:
        loaded, _ = load_after_edit(copy, layer, field, value)
    if loaded is not None:
        assert same_state(model, loaded), (field, value)


@SETTINGS
@given(field=st.sampled_from(TOP_FIELDS), value=st.one_of(replacement, st.just(...)))
def test_every_top_level_field_edit_is_exact_or_a_clear_error(saved_folder, field, value):
    model, folder = saved_folder
    with copy_of(folder) as copy:
        loaded, _ = load_after_edit(copy, None, field, value)
    if loaded is not None:
        assert same_state(model, loaded), (field, value)


@pytest.mark.parametrize("layer", ["0", "1"])
@pytest.mark.parametrize("field", ["ranks", "out_factors", "in_factors", "dtype", "bias", "padding_idx", "kind"])
def test_structural_edits_are_refused(saved_folder, layer, field):
    """Edits that describe another model must not load (the sampled suite may miss one)."""
    _, folder = saved_folder
    record = json.loads((folder / CONFIG_NAME).read_text())
    rec = record["modules"][layer]
    other = {
        "ranks": [r + 1 for r in rec["ranks"]],
        "out_factors": rec["out_factors"][::-1] if rec["out_factors"][::-1] != rec["out_factors"] else [1, 10**6],
        "in_factors": rec["in_factors"][::-1] if rec["in_factors"][::-1] != rec["in_factors"] else [1, 10**6],
        "dtype": "float16",
        "bias": not rec["bias"],
        "padding_idx": 24 if rec["kind"] == "embedding" else 0,
        "kind": "linear" if rec["kind"] == "embedding" else "embedding",
    }[field]
    with copy_of(folder) as copy, pytest.raises(CLEAR_ERRORS):
        load_after_edit_strict(copy, layer, field, other)


def load_after_edit_strict(folder: Path, layer: str, field: str, value: Any) -> None:
    record = json.loads((folder / CONFIG_NAME).read_text())
    record["modules"][layer][field] = value
    (folder / CONFIG_NAME).write_text(json.dumps(record))
    mpolab.load(folder, base=make_base())


def test_edited_ranks_are_refused_before_allocating(saved_folder, monkeypatch):
    _, folder = saved_folder
    allocated: list[int] = []
    real_zeros = torch.zeros

    def counting_zeros(*shape: Any, **kwargs: Any) -> torch.Tensor:
        allocated.append(1)
        return real_zeros(*shape, **kwargs)

    with copy_of(folder) as copy:
        record = json.loads((copy / CONFIG_NAME).read_text())
        record["modules"]["1"]["ranks"] = [10**9]
        (copy / CONFIG_NAME).write_text(json.dumps(record))
        monkeypatch.setattr(torch, "zeros", counting_zeros)
        with pytest.raises(ValueError, match=r"'1.cores.0' has shape .* records \(1, \d+, \d+, 1000000000\)"):
            mpolab.load(copy, base=make_base())
    assert not allocated


# ----------------------------------------------------------------------------- damaged weights


@SETTINGS
@given(data=st.data())
def test_truncated_or_bit_flipped_weights_are_refused(saved_folder, data):
    _, folder = saved_folder
    with copy_of(folder) as copy:
        file = copy / WEIGHTS_NAME
        raw = bytearray(file.read_bytes())
        if data.draw(st.booleans(), label="truncate"):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
        else:
            bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
            raw[bit // 8] ^= 1 << (bit % 8)
        file.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match=WEIGHTS_NAME):
            mpolab.load(copy, base=make_base())


def test_bit_flip_in_tensor_data_loads_only_with_verify_false(saved_folder):
    model, folder = saved_folder
    with copy_of(folder) as copy:
        file = copy / WEIGHTS_NAME
        raw = bytearray(file.read_bytes())
        raw[-3] ^= 0x40  # inside the last tensor's bytes (the header is at the start)
        file.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match="is not the file that was saved.*verify=False"):
            mpolab.load(copy, base=make_base())
        loaded = mpolab.load(copy, base=make_base(), verify=False)  # the documented opt-out
    assert not same_state(model, loaded)


def test_read_checked_is_what_load_and_inspect_share(saved_folder):
    from mpolab.io import read_checked

    _, folder = saved_folder
    with copy_of(folder) as copy:
        record = json.loads((copy / CONFIG_NAME).read_text())
        record["modules"]["1"]["bias"] = False
        (copy / CONFIG_NAME).write_text(json.dumps(record))
        for reader in (read_checked, lambda p: mpolab.load(p, base=make_base())):
            with pytest.raises(ValueError, match="records layer '1' without bias"):
                reader(copy)
