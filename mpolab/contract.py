"""Contracting MPO cores: rebuilding the matrix, and applying the operator to activations.

Cores have shape ``[r_{k-1}, i_k, j_k, r_k]`` (``i`` indexes output rows, ``j`` input columns).
Every contraction goes through an :func:`opt_einsum.contract_expression` that is built once per
(core shapes, batch class) and cached, so the path search never runs on the hot path.

Two ways to compute ``y = x Wᵀ`` for ``x: [B, J]``:

* **dense**: rebuild ``W: [I, J]`` from the cores, then one GEMM (``2·B·I·J`` FLOPs plus the
  rebuild, which is free when the weight is cached);
* **cores**: contract ``x`` through the cores without ever forming ``W``.

:func:`choose_path` compares the two by the FLOP count opt_einsum reports, with a penalty on
the core path for its chain of small, badly shaped GEMMs and a cap on its largest intermediate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import opt_einsum
import torch
import torch.nn.functional as F

__all__ = [
    "ContractionCost",
    "PathCosts",
    "apply_mpo",
    "batch_class",
    "choose_path",
    "compare_paths",
    "core_path_penalty",
    "core_shapes",
    "core_terms",
    "einsum_symbols",
    "merge_cores",
    "path_costs",
]

CoreShapes = tuple[tuple[int, int, int, int], ...]
Path = Literal["cores", "dense"]

#: The core path runs a chain of small GEMMs with permutes in between; it reaches a fraction of
#: the GEMM rate of one large matmul, and a smaller fraction the larger the batch (its
#: intermediates grow with the batch and stream through memory, while one big GEMM gets more
#: efficient). Measured in ``benchmarks/bench_linear.py`` (break-even penalty: median ~1.4 at 32
#: rows, ~6 at 1024, ~16 at 8192), fitted as ``CORE_PATH_PENALTY * (batch / 32) ** CORE_PATH_PENALTY_GROWTH``
#: (see :func:`core_path_penalty`): a core path needs that many times fewer FLOPs to win.
CORE_PATH_PENALTY = 3.0
CORE_PATH_PENALTY_GROWTH = 0.25
#: Without a cached weight (training, or ``cache_weight=False``) the dense path first rebuilds
#: ``W`` through its own chain of small contractions, so at small batches the core path wins even
#: at equal FLOPs: break-even penalty median 0.72 at 32 rows in ``benchmarks/bench_linear.py``
#: (part b). The uncached penalty is ``UNCACHED_CORE_PATH_PENALTY * (batch / 32) ** 0.9``, capped
#: by the cached one, which it meets near 600 rows (at 1024 rows a lower penalty sent rank-4
#: training steps to a core path 1.5x slower than the rebuild).
UNCACHED_CORE_PATH_PENALTY = 0.75
UNCACHED_CORE_PATH_PENALTY_GROWTH = 0.9
#: The core path is refused when its largest intermediate exceeds this many times the larger of
#: the input and output activations, unless the dense path's own intermediate (``W``) is larger.
CORE_PATH_MAX_INTERMEDIATE = 4.0


@dataclass(frozen=True)
class ContractionCost:
    """FLOPs and largest intermediate (in elements) of one contraction."""

    flops: int
    largest_intermediate: int


def einsum_symbols(num_cores: int) -> tuple[list[str], list[str], list[str], str]:
    """Index letters for einsum equations over ``num_cores`` cores.

    Returns:
        ``(bonds, rows, cols, extra)``: ``num_cores + 1`` bond letters, ``num_cores`` row letters,
        ``num_cores`` column letters, and one more letter (``opt_einsum.get_symbol(3n + 1)``) that
        is free for a batch index (:func:`apply_mpo`) or an expert index (stacked cores).

    Examples:
        >>> bonds, rows, cols, extra = einsum_symbols(2)
        >>> len(bonds), len(rows), len(cols), extra not in bonds + rows + cols
        (3, 2, 2, True)
    """
    sym = opt_einsum.get_symbol
    n = num_cores
    bonds = [sym(k) for k in range(n + 1)]
    rows = [sym(n + 1 + k) for k in range(n)]
    cols = [sym(2 * n + 1 + k) for k in range(n)]
    return bonds, rows, cols, sym(3 * n + 1)


def core_terms(num_cores: int, stacked: Sequence[bool] | None = None, first: int = 0) -> list[str]:
    """One einsum term per core: ``bond_k row_k col_k bond_{k+1}``.

    Args:
        num_cores: cores of the whole MPO (fixes the letters, see :func:`einsum_symbols`).
        stacked: per core of the run, whether it carries a leading extra (expert) index
            ``[E, r_{k-1}, i_k, j_k, r_k]``; ``None``: every core, none stacked.
        first: index of the first core of the run; the run is cores
            ``first … first + len(stacked) - 1``.

    Examples:
        >>> core_terms(2)
        ['adfb', 'begc']
        >>> core_terms(3, stacked=[True, False], first=1)   # expert letter 'k' on core 1
        ['kbfic', 'cgjd']
    """
    bonds, rows, cols, extra = einsum_symbols(num_cores)
    flags = [False] * num_cores if stacked is None else list(stacked)
    if first < 0 or first + len(flags) > num_cores:
        raise ValueError(f"cores {first}..{first + len(flags) - 1} are not all among the {num_cores} cores")
    return [
        (extra if flag else "") + bonds[k] + rows[k] + cols[k] + bonds[k + 1]
        for k, flag in zip(range(first, first + len(flags)), flags)
    ]


def _merge_equation(n: int) -> str:
    bonds, rows, cols, _ = einsum_symbols(n)
    return f"{','.join(core_terms(n))}->{bonds[0]}{''.join(rows)}{''.join(cols)}{bonds[n]}"


def _apply_equation(n: int) -> str:
    _, rows, cols, batch = einsum_symbols(n)
    return f"{batch}{''.join(cols)},{','.join(core_terms(n))}->{batch}{''.join(rows)}"


def batch_class(batch: int) -> int:
    """Round a batch size up to a power of two: one cached path per class, not per size.

    Examples:
        >>> batch_class(33)
        64
    """
    return 1 << max(0, math.ceil(math.log2(max(batch, 1))))


@functools.lru_cache(maxsize=512)
def _merge_expression(shapes: CoreShapes) -> opt_einsum.contract.ContractExpression:
    return opt_einsum.contract_expression(_merge_equation(len(shapes)), *shapes, optimize="auto-hq")


@functools.lru_cache(maxsize=512)
def _apply_expression(shapes: CoreShapes, rows_class: int) -> opt_einsum.contract.ContractExpression:
    x_shape = (rows_class, *(s[2] for s in shapes))
    return opt_einsum.contract_expression(_apply_equation(len(shapes)), x_shape, *shapes, optimize="auto-hq")


@functools.lru_cache(maxsize=512)
def _merge_cost(shapes: CoreShapes) -> ContractionCost:
    _, info = opt_einsum.contract_path(_merge_equation(len(shapes)), *shapes, shapes=True, optimize="auto-hq")
    return ContractionCost(int(info.opt_cost), int(info.largest_intermediate))


@functools.lru_cache(maxsize=512)
def _apply_cost(shapes: CoreShapes, rows_class: int) -> ContractionCost:
    x_shape = (rows_class, *(s[2] for s in shapes))
    _, info = opt_einsum.contract_path(_apply_equation(len(shapes)), x_shape, *shapes, shapes=True, optimize="auto-hq")
    return ContractionCost(int(info.opt_cost), int(info.largest_intermediate))


def core_shapes(cores: Sequence[torch.Tensor]) -> CoreShapes:
    return tuple(tuple(int(d) for d in c.shape) for c in cores)  # type: ignore[misc]


def merge_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract a run of cores into one block.

    Args:
        cores: ``[r_{k-1}, i_k, j_k, r_k]`` for ``k`` in the run.

    Returns:
        ``[r_first, Π i_k, Π j_k, r_last]``; for a whole MPO, ``[1, I', J', 1]``.
    """
    shapes = core_shapes(cores)
    block = _merge_expression(shapes)(*cores)
    rows = math.prod(s[1] for s in shapes)
    cols = math.prod(s[2] for s in shapes)
    return block.reshape(shapes[0][0], rows, cols, shapes[-1][3])


@dataclass(frozen=True)
class PathCosts:
    """Costs of both ways to apply an MPO to ``batch`` rows, and the one :func:`choose_path` picks."""

    cores: ContractionCost
    dense: ContractionCost
    chosen: Path


@functools.lru_cache(maxsize=4096)  # pure in its arguments; the forward calls it every time
def path_costs(shapes: CoreShapes, batch: int, *, weight_cached: bool = False) -> PathCosts:
    """FLOPs and memory of the core path and the dense path for a batch of ``batch`` rows.

    ``dense`` counts the rebuild of ``W`` unless ``weight_cached`` and one ``[batch, J] x [J, I]``
    GEMM; its largest intermediate is ``W`` itself.
    """
    rows = math.prod(s[1] for s in shapes)
    cols = math.prod(s[2] for s in shapes)
    rows_class = batch_class(batch)
    gemm = 2 * rows_class * rows * cols
    merge = ContractionCost(0, 0) if weight_cached else _merge_cost(shapes)
    dense = ContractionCost(merge.flops + gemm, max(merge.largest_intermediate, rows * cols))
    cores = _apply_cost(shapes, rows_class)
    return compare_paths(cores, dense, batch, rows_class * max(rows, cols), weight_cached=weight_cached)


def compare_paths(
    cores: ContractionCost, dense: ContractionCost, batch: int, activations: int, *, weight_cached: bool
) -> PathCosts:
    """The decision rule shared by every MPO-shaped operator: pick ``"cores"`` only when its FLOPs
    times :func:`core_path_penalty` beat the dense path's and its largest intermediate stays within
    :data:`CORE_PATH_MAX_INTERMEDIATE` times ``activations`` (or below the dense path's own).
    """
    memory_cap = max(CORE_PATH_MAX_INTERMEDIATE * activations, dense.largest_intermediate)
    penalty = core_path_penalty(batch, weight_cached=weight_cached)
    cores_ok = cores.flops * penalty < dense.flops and cores.largest_intermediate <= memory_cap
    return PathCosts(cores, dense, "cores" if cores_ok else "dense")


def core_path_penalty(batch: int, *, weight_cached: bool = True) -> float:
    """How many times fewer FLOPs the core path needs than the dense path to be chosen, for ``batch`` rows.

    ``weight_cached``: whether the dense path has ``W`` already (eval with the cache) or must rebuild it.
    """
    scale = max(1.0, batch / 32)
    cached = CORE_PATH_PENALTY * scale**CORE_PATH_PENALTY_GROWTH
    if weight_cached:
        return cached
    return min(cached, UNCACHED_CORE_PATH_PENALTY * scale**UNCACHED_CORE_PATH_PENALTY_GROWTH)


def choose_path(shapes: CoreShapes, batch: int, *, weight_cached: bool = False) -> Path:
    """``"cores"`` or ``"dense"``: the cheaper way to apply an MPO to ``batch`` rows."""
    return path_costs(shapes, batch, weight_cached=weight_cached).chosen


def apply_mpo(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    out_features: int,
    in_features: int,
    *,
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    path: Path | Literal["auto"] = "auto",
) -> torch.Tensor:
    """``y = x Wᵀ + b`` for the MPO ``W: [out_features, in_features]`` given by ``cores``.

    Args:
        x: ``[..., in_features]``.
        cores: ``[r_{k-1}, i_k, j_k, r_k]``; ``Π i_k >= out_features`` and ``Π j_k >= in_features``
            (zero padding beyond the true sizes is handled here).
        bias: optional ``[out_features]``.
        weight: the rebuilt ``W: [out_features, in_features]`` if the caller has it cached.
        path: ``"auto"`` picks by :func:`choose_path`.

    Returns:
        ``[..., out_features]``.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"expected input with last dimension {in_features}, got shape {tuple(x.shape)}")
    shapes = core_shapes(cores)
    lead = x.shape[:-1]
    batch = math.prod(lead)
    if batch == 0:
        y = x.new_zeros(*lead, out_features)
        return y if bias is None else y + bias
    if path == "auto":
        path = choose_path(shapes, batch, weight_cached=weight is not None)
    if path == "dense":
        if weight is None:
            weight = merge_cores(cores)[0, :out_features, :in_features, 0]
        return F.linear(x, weight, bias)
    cols = math.prod(s[2] for s in shapes)
    flat = x.reshape(batch, in_features)
    if cols != in_features:
        flat = F.pad(flat, (0, cols - in_features))
    flat = flat.reshape(batch, *(s[2] for s in shapes))
    y = _apply_expression(shapes, batch_class(batch))(flat, *cores).reshape(batch, -1)[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)
