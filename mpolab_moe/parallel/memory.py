"""Parameters each rank holds for one FFN layer: dense, Switch and MPOE, with and without expert parallelism.

:func:`memory_per_rank` counts them from the same factor plan and exact bond dimensions that
:class:`~mpolab_moe.MPOExperts` uses (no tensor is built); :func:`memory_table` renders the table
of ``docs/distributed.md`` (a test checks that the page shows what this code computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mpolab.shapes import plan_factors
from mpolab.truncation import bond_caps, num_params_for_ranks
from mpolab.utils import check_positive_int

from .api import even_placement

__all__ = ["LayerMemory", "memory_per_rank", "memory_table", "mpo_matrix_split"]


def mpo_matrix_split(
    out_features: int, in_features: int, num_cores: int = 5, max_rank: int | Sequence[int] | None = None
) -> tuple[int, int]:
    """``(central, auxiliary)`` parameters of one matrix's MPO: the shared tensor and one expert's own cores.

    Examples:
        >>> central, aux = mpo_matrix_split(3072, 768)
        >>> central > aux
        True
    """
    plan = plan_factors(out_features, in_features, num_cores)
    sizes = [i * j for i, j in zip(plan.out_factors, plan.in_factors, strict=True)]
    ranks = bond_caps(sizes, max_rank=max_rank)
    bonds = [1, *ranks, 1]
    c = num_cores // 2
    central = bonds[c] * sizes[c] * bonds[c + 1]
    return central, num_params_for_ranks(sizes, ranks) - central


@dataclass(frozen=True)
class LayerMemory:
    """Parameters of one FFN layer on one rank (matrices and gate; biases left out).

    Attributes:
        dense: the dense FFN (replicated on every rank).
        switch_all: Switch, all ``E`` experts on one rank; switch_ep: Switch, ``E / world`` experts per rank.
        mpoe_all: MPOE, all experts on one rank; mpoe_ep: MPOE expert-parallel (central tensors
            replicated, ``E / world`` experts' auxiliary tensors).
        central: the MPOE central tensors (what every rank pays whatever ``E``).
    """

    num_experts: int
    world_size: int
    dense: int
    switch_all: int
    switch_ep: int
    mpoe_all: int
    mpoe_ep: int
    central: int


def memory_per_rank(
    d_model: int, d_ff: int, num_experts: int, world_size: int, *, num_cores: int = 5, max_rank: int | None = None
) -> LayerMemory:
    """Parameters per rank of one FFN layer ``d_model -> d_ff -> d_model`` as dense, Switch and MPOE.

    ``max_rank`` caps the MPO bond dimensions (``None``: exact ranks, where the central tensor is
    as large as the dense matrix).

    Raises:
        ValueError: ``num_experts`` not divisible by ``world_size``.

    Examples:
        >>> m = memory_per_rank(768, 3072, 64, 8)
        >>> m.switch_ep == 8 * 2 * 768 * 3072 + 64 * 768
        True
    """
    for value, name in ((d_model, "d_model"), (d_ff, "d_ff"), (num_experts, "num_experts"), (world_size, "world")):
        check_positive_int(value, name)
    per_rank = even_placement(num_experts, world_size)[0]
    matrix = d_model * d_ff
    gate = d_model * num_experts
    c1, a1 = mpo_matrix_split(d_ff, d_model, num_cores, max_rank)
    c2, a2 = mpo_matrix_split(d_model, d_ff, num_cores, max_rank)
    return LayerMemory(
        num_experts=num_experts,
        world_size=world_size,
        dense=2 * matrix,
        switch_all=num_experts * 2 * matrix + gate,
        switch_ep=per_rank * 2 * matrix + gate,
        mpoe_all=c1 + c2 + num_experts * (a1 + a2) + gate,
        mpoe_ep=c1 + c2 + per_rank * (a1 + a2) + gate,
        central=c1 + c2,
    )


def _mib(params: int, bytes_per_param: int) -> str:
    return f"{params * bytes_per_param / 2**20:,.1f}"


def memory_table(
    d_model: int = 768,
    d_ff: int = 3072,
    experts: Sequence[int] = (8, 64, 256),
    world_size: int = 8,
    *,
    bytes_per_param: int = 4,
    max_rank: int | None = None,
) -> str:
    """A Markdown table of :func:`memory_per_rank` in MiB (``bytes_per_param``: 4 for fp32, 2 for bf16).

    Examples:
        >>> print(memory_table(experts=(8,)))  # doctest: +SKIP
    """
    head = (
        "| E | dense FFN | Switch, 1 rank | Switch, expert-parallel | MPOE, 1 rank | MPOE, expert-parallel "
        "| of which central |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for E in experts:
        m = memory_per_rank(d_model, d_ff, E, world_size, max_rank=max_rank)
        cells = [m.dense, m.switch_all, m.switch_ep, m.mpoe_all, m.mpoe_ep, m.central]
        rows.append(f"| {E} | " + " | ".join(_mib(c, bytes_per_param) for c in cells) + " |")
    return "\n".join([head, *rows])
