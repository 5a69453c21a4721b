"""Which layers of a model to compress: pattern matching, layer kinds, near-miss suggestions.

Targets are ``nn.Linear``, ``nn.Embedding`` and Hugging Face GPT-2's ``Conv1D`` (weight stored
``[in, out]``). Patterns are exact names, dotted suffixes (``"query"`` matches
``"encoder.layer.0.attention.self.query"``), regular expressions matched against full names, or
``"all-linear"`` (every linear layer but an ``lm_head``, as peft does).

Examples:
    >>> find_targets(model, ["query", "value"], exclude_modules=r".*[.]0[.].*")
    {'encoder.layer.1.attention.self.query': Linear(...), ...}
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .shapes import prime_factors
from .utils import is_conv1d

__all__ = [
    "ALL_LINEAR",
    "TargetModules",
    "find_targets",
    "layer_kind",
    "matches",
    "not_compressible_reason",
    "weight_matrix",
]

TargetModules = str | Sequence[str]


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"embedding"``, or ``None`` for a module that cannot be compressed."""
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


ALL_LINEAR = "all-linear"


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches ``pattern``: exact name, dotted suffix or regex.

    Examples:
        >>> matches("encoder.layer.0.attention.self.query", "query")
        True
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _patterns(value: TargetModules, what: str, names: Iterable[str]) -> list[str]:
    """``value`` as a list of pattern strings, each a valid regex or the name/suffix of a module.

    Raises:
        TypeError: ``value`` is not a string or an iterable (list, tuple, set) of strings.
        ValueError: a pattern is neither a valid regular expression nor a module name or suffix.
    """
    if isinstance(value, str):
        patterns = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        patterns = list(value)  # a list, tuple or set of patterns
    else:
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    names = list(names)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} must hold strings (names, suffixes, regexes, 'all-linear'), got {p!r}")
        if p == ALL_LINEAR:
            continue
        try:
            re.compile(p)
        except re.error as e:
            if not any(n == p or n.endswith("." + p) for n in names):
                raise ValueError(
                    f"{what} entry {p!r} is not a valid regular expression ({e}) and names no module; "
                    "give exact names, dotted suffixes, valid regexes or 'all-linear'"
                ) from None
    return patterns


def _is_all_linear(name: str, module: nn.Module) -> bool:
    return layer_kind(module) in ("linear", "conv1d") and not name.endswith("lm_head")


def find_targets(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
    exclude_modules: TargetModules | None = None,
) -> dict[str, nn.Module]:
    """The modules ``compress`` would replace, by qualified name, in module order.

    Args:
        target_modules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except an ``lm_head``
            output layer, as peft does), an exact name, a dotted name suffix, a regex matched
            against full names, or a list of these (their union; ``"all-linear"`` may be one of
            them).
        exclude_modules: the same forms; matching modules are skipped.

    A pattern may match modules that cannot be compressed (a broad regex such as
    ``r".*attention.*"`` also matches dropouts and norms): those are left out as long as the
    pattern matches at least one compressible layer. Containers (``"attention"``) select nothing
    by themselves.

    Raises:
        TypeError: a pattern is not a string.
        ValueError: an empty list; a pattern that is neither a valid regex nor a module name; a
            pattern whose matches are all of unsupported types (naming them); or nothing left
            to compress (with the closest module names).
    """
    named = dict(model.named_modules())
    patterns = _patterns(target_modules, "target_modules", named)
    if not patterns:
        raise ValueError("target_modules is empty; give names, suffixes, a regex or 'all-linear'")
    excludes = [] if exclude_modules is None else _patterns(exclude_modules, "exclude_modules", named)
    found: dict[str, nn.Module] = {}
    for p in patterns:
        if p == ALL_LINEAR:
            hits = {n: m for n, m in named.items() if _is_all_linear(n, m)}
        else:
            hits = {n: m for n, m in named.items() if n and matches(n, p)}
            # A pattern naming a container ("attention") selects nothing by itself: keep leaves only.
            hits = {n: m for n, m in hits.items() if layer_kind(m) is not None or next(m.children(), None) is None}
        supported = {n: m for n, m in hits.items() if layer_kind(m) is not None}
        if hits and not supported:
            bad = {n: type(m).__name__ for n, m in list(hits.items())[:8]}
            raise ValueError(
                f"target_modules entry {p!r} matched only modules that cannot be compressed: {bad}; "
                "supported are nn.Linear, nn.Embedding and transformers' Conv1D" + _near_misses([p], named)
            )
        found.update(supported)
    found = {n: m for n, m in found.items() if not any(matches(n, p) for p in excludes)}
    found = _drop_uncompressible(found, patterns)
    if not found:
        raise ValueError(
            f"target_modules={target_modules!r} matched no compressible module" + _near_misses(patterns, named)
        )
    order = {n: i for i, n in enumerate(named)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def not_compressible_reason(module: nn.Module) -> str | None:
    """Why this layer's matrix cannot be an MPO of two or more cores, or ``None`` when it can.

    A matrix with a zero dimension has nothing to factorise; one whose two sizes have fewer than
    two prime factors together (``[1, 1]``, ``[1, 7]``) leaves a core of a single entry in every split.

    Examples:
        >>> not_compressible_reason(nn.Linear(1, 1))
        'its matrix [1, 1] has fewer than two prime factors in its sizes (every MPO split has a 1x1 core)'
    """
    rows, cols = (int(n) for n in weight_matrix(module).shape)
    if rows == 0 or cols == 0:
        return f"its matrix [{rows}, {cols}] is empty (a zero-width layer)"
    if len(prime_factors(rows)) + len(prime_factors(cols)) < 2:
        return (
            f"its matrix [{rows}, {cols}] has fewer than two prime factors in its sizes "
            "(every MPO split has a 1x1 core)"
        )
    return None


def _drop_uncompressible(found: dict[str, nn.Module], patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Leave out layers that cannot be MPOs, with a warning naming them; refuse one named exactly."""
    skipped = {n: why for n, m in found.items() if (why := not_compressible_reason(m)) is not None}
    for name, why in skipped.items():
        if name in patterns:
            raise ValueError(f"cannot compress {name!r}: {why}; keep it dense (remove it from target_modules)")
    listing = "; ".join(f"{n!r}: {why}" for n, why in list(skipped.items())[:8])
    if skipped and len(skipped) == len(found):
        raise ValueError(f"none of the {len(found)} matched layer(s) can be an MPO: {listing}")
    if skipped:
        warnings.warn(f"skipping {len(skipped)} layer(s) that cannot be MPOs (kept dense): {listing}", stacklevel=3)
    return {n: m for n, m in found.items() if n not in skipped}


def _near_misses(patterns: Sequence[str], named: Mapping[str, nn.Module]) -> str:
    """``"; near misses: [...]; compressible module names end in: [...]"`` for an error message."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if layer_kind(m) is not None})
    near = list(
        dict.fromkeys(c for p in patterns for c in difflib.get_close_matches(str(p).rsplit(".", 1)[-1], leaves, n=3))
    )
    return (f"; near misses: {near}" if near else "") + f"; compressible module names end in: {leaves[:20]}"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's matrix as ``[out, in]`` (``[num_embeddings, dim]`` for embeddings), detached.

    ``Conv1D`` stores ``[in, out]`` and is transposed (a view, no copy).
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    w = weight.detach()
    return w.T if is_conv1d(module) else w
