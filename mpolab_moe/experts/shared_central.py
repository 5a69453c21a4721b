"""``SharedCentralMPO``: one matrix for ``E`` experts in MPOE form (shared central core, per-expert auxiliary cores).

Two ways to apply expert ``e``'s matrix to its tokens, chosen per call by FLOP count
(:meth:`SharedCentralMPO.path_costs`):

* ``"dense"``: rebuild all ``E`` dense weights in ONE opt_einsum contraction over the stacked
  cores (the expert index is a batch index of the auxiliary cores only), then a grouped matmul.
  In no-grad mode the rebuilt weights are cached until a parameter changes.
* ``"cores"``: contract each expert's tokens with its merged left and right auxiliary blocks
  (grouped matmuls), then contract ALL tokens with the shared central tensor in one GEMM.

The einsum equations use :func:`mpolab.contract.einsum_symbols` / :func:`mpolab.contract.core_terms`
(the expert index is their extra letter).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import opt_einsum
import torch
from torch import Tensor, nn

import mpolab
from mpolab import contract
from mpolab.contract import ContractionCost, PathCosts, batch_class, core_terms, einsum_symbols
from mpolab.nn import VersionedCache
from mpolab.step_weight import StepWeight
from mpolab.utils import check_choice, check_positive_int

from .base import expand_per_row, grouped_matmul

__all__ = ["SharedCentralMPO"]

PATHS = ("auto", "dense", "cores")


# ---------------------------------------------------------------------------------------- equations
@functools.lru_cache(maxsize=256)
def _rebuild_expression(shapes: tuple[tuple[int, ...], ...], central: int) -> Any:
    """All experts' matrices ``[E, Π j, Π i]`` (input-major) from the stacked cores in one contraction."""
    n = len(shapes)
    _, rows, cols, e = einsum_symbols(n)
    lhs = ",".join(core_terms(n, [k != central for k in range(n)]))
    return opt_einsum.contract_expression(f"{lhs}->{e}{''.join(cols)}{''.join(rows)}", *shapes, optimize="auto-hq")


@functools.lru_cache(maxsize=256)
def _block_expression(shapes: tuple[tuple[int, ...], ...], side: str) -> Any:
    """Merge a run of stacked auxiliary cores: left ``[E, Π i, Π j, r_out]``, right ``[E, r_in, Π i, Π j]``."""
    n = len(shapes)
    bonds, rows, cols, e = einsum_symbols(n)
    lhs = ",".join(core_terms(n, [True] * n))
    out = "".join(rows) + "".join(cols)
    out = f"{e}{out}{bonds[n]}" if side == "left" else f"{e}{bonds[0]}{out}"
    return opt_einsum.contract_expression(f"{lhs}->{out}", *shapes, optimize="auto-hq")


# ---------------------------------------------------------------------------------------- one matrix
class SharedCentralMPO(nn.Module):
    """One matrix ``W_e: [out_features, in_features]`` for ``E`` experts in MPOE form.

    Attributes:
        central: the shared central core ``[r_L, i_c, j_c, r_R]`` (one parameter for all experts).
        left, right: the auxiliary cores before and after it, each stacked over experts
            ``[E, r_{k-1}, i_k, j_k, r_k]``.

    Examples:
        >>> m = SharedCentralMPO(mpolab.decompose(torch.randn(3072, 768)), num_experts=8)
        >>> m.expert_weights().shape        # [8, 768, 3072], input-major
    """

    #: set by :func:`mpolab.materialize`: all ``E`` weights built once per optimiser step (``None``: every forward)
    step_weight: StepWeight | None = None

    def __init__(self, mpo: mpolab.MPO, num_experts: int) -> None:
        super().__init__()
        self.out_features, self.in_features = mpo.shape
        self.num_experts = check_positive_int(num_experts, "num_experts")
        c = mpo.central_index
        self.central = nn.Parameter(mpo.cores[c].detach().clone())
        stack = lambda core: nn.Parameter(core.detach().unsqueeze(0).repeat(num_experts, 1, 1, 1, 1))  # noqa: E731
        self.left = nn.ParameterList(stack(core) for core in mpo.cores[:c])
        self.right = nn.ParameterList(stack(core) for core in mpo.cores[c + 1 :])
        self._cache = VersionedCache()

    # ------------------------------------------------------------------ structure
    @property
    def num_cores(self) -> int:
        return len(self.left) + 1 + len(self.right)

    @property
    def central_index(self) -> int:
        return len(self.left)

    def stacked_cores(self) -> list[Tensor]:
        """The cores in order: auxiliary ones ``[E, r, i, j, r]``, the central one ``[r, i, j, r]``."""
        return [*self.left, self.central, *self.right]

    def weight_parameters(self) -> list[nn.Parameter]:
        """The cores the expert weights are rebuilt from (:class:`mpolab.step_weight.Materializable`)."""
        return list(self.stacked_cores())  # type: ignore[arg-type]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(c.shape[-1]) for c in self.stacked_cores()[:-1])

    @property
    def out_factors(self) -> tuple[int, ...]:
        return tuple(int(c.shape[-3]) for c in self.stacked_cores())

    @property
    def in_factors(self) -> tuple[int, ...]:
        return tuple(int(c.shape[-2]) for c in self.stacked_cores())

    def expert_mpo(self, expert: int) -> mpolab.MPO:
        """Expert ``expert``'s matrix as an :class:`mpolab.MPO` (detached views of the parameters)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        cores = (
            [c.detach()[expert] for c in self.left] + [self.central.detach()] + [c.detach()[expert] for c in self.right]
        )
        return mpolab.MPO(cores, self.out_features, self.in_features)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ rebuild ("dense" path)
    def _shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(d) for d in c.shape) for c in self.stacked_cores())

    def rebuild(self) -> Tensor:
        """All experts' matrices ``[E, in_features, out_features]`` rebuilt now (with gradient; no cache)."""
        cores = self.stacked_cores()
        w = _rebuild_expression(self._shapes(), self.central_index)(*cores)
        return w.reshape(self.num_experts, math.prod(self.in_factors), math.prod(self.out_factors))[
            :, : self.in_features, : self.out_features
        ]

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def expert_weights(self) -> Tensor:
        """All experts' matrices, input-major ``[E, in_features, out_features]`` (``W_eᵀ``).

        One contraction for all experts; under :func:`mpolab.materialize` once per optimiser step (a
        leaf collecting the step's gradient); served from a cache in no-grad mode until a parameter changes.
        """
        cores = self.stacked_cores()
        if self._needs_grad():
            return self.rebuild() if self.step_weight is None else self.step_weight.get(cores, self.rebuild)
        if self.step_weight is not None and (held := self.step_weight.peek(cores)) is not None:
            return held
        return self._cache.get(cores, self.rebuild)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> SharedCentralMPO:  # .to(), .half(), ...
        self._cache.clear()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ through the cores ("cores" path)
    def _blocks(self) -> tuple[Tensor, Tensor]:
        """Merged auxiliary blocks per expert: left ``[E, I_L, J_L, r_L]``, right ``[E, r_R, I_R, J_R]``."""
        E, c = self.num_experts, self.central_index
        blocks = []
        for cores, side in ((self.left, "left"), (self.right, "right")):
            if cores:
                shapes = tuple(tuple(int(d) for d in core.shape) for core in cores)
                blocks.append(_block_expression(shapes, side)(*cores))
            else:
                blocks.append(self.central.new_ones(E, 1, 1, 1))
        I_L, J_L = math.prod(self.out_factors[:c]), math.prod(self.in_factors[:c])
        I_R, J_R = math.prod(self.out_factors[c + 1 :]), math.prod(self.in_factors[c + 1 :])
        return blocks[0].reshape(E, I_L, J_L, -1), blocks[1].reshape(E, -1, I_R, J_R)

    def _left_first(self, num_tokens: int) -> bool:
        return _core_path_plan(self._shapes(), self.central_index, num_tokens)[0]

    def _apply_cores(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """Auxiliary cores of one side (grouped by expert), the shared central core (one GEMM), the other side."""
        N = x.shape[0]
        r_L, i_c, j_c, r_R = (int(d) for d in self.central.shape)
        L, R = self._blocks()
        E, I_L, J_L, _ = L.shape
        I_R, J_R = R.shape[2], R.shape[3]
        pad = J_L * j_c * J_R - self.in_features
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        t = x.reshape(N, J_L, j_c, J_R)

        def per_expert(t: Tensor, weight: Tensor) -> Tensor:
            """Contract ``t [N, ..., a]`` with each token's expert matrix ``weight [E, a, b]``."""
            rows = t.shape[1:-1].numel()
            out = grouped_matmul(t.reshape(N * rows, t.shape[-1]), weight, [c * rows for c in counts])
            return out.reshape(*t.shape[:-1], weight.shape[-1])

        if self._left_first(N):
            t = per_expert(t.permute(0, 2, 3, 1), L.permute(0, 2, 1, 3).reshape(E, J_L, I_L * r_L))
            t = t.reshape(N, j_c, J_R, I_L, r_L).permute(0, 2, 3, 4, 1).reshape(N * J_R * I_L, r_L * j_c)
            t = t @ self.central.permute(0, 2, 1, 3).reshape(r_L * j_c, i_c * r_R)  # shared: all tokens at once
            t = t.reshape(N, J_R, I_L, i_c, r_R).permute(0, 2, 3, 1, 4).reshape(N, I_L, i_c, J_R * r_R)
            y = per_expert(t, R.permute(0, 3, 1, 2).reshape(E, J_R * r_R, I_R))  # [N, I_L, i_c, I_R]
        else:
            t = per_expert(t, R.permute(0, 3, 1, 2).reshape(E, J_R, r_R * I_R))
            t = t.reshape(N, J_L, j_c, r_R, I_R).permute(0, 1, 4, 2, 3).reshape(N * J_L * I_R, j_c * r_R)
            t = t @ self.central.permute(2, 3, 0, 1).reshape(j_c * r_R, r_L * i_c)  # shared: all tokens at once
            t = t.reshape(N, J_L, I_R, r_L, i_c).permute(0, 4, 2, 1, 3).reshape(N, i_c, I_R, J_L * r_L)
            y = per_expert(t, L.permute(0, 2, 3, 1).reshape(E, J_L * r_L, I_L)).permute(0, 3, 1, 2)
        return y.reshape(N, -1)[:, : self.out_features]

    # ------------------------------------------------------------------ path choice
    def path_costs(self, num_tokens: int, *, weight_cached: bool = False) -> PathCosts:
        """FLOPs and largest intermediate of both paths for ``num_tokens`` routed rows.

        ``dense`` is the batched rebuild of all ``E`` weights (free when cached) plus the grouped
        GEMMs; ``cores`` merges the auxiliary blocks per expert, contracts the tokens with them and
        then with the shared central tensor. The core path must win by
        :func:`mpolab.contract.core_path_penalty` and keep its intermediates within
        :data:`mpolab.contract.CORE_PATH_MAX_INTERMEDIATE` times the activations, as for one MPO.
        """
        return _path_costs(
            self._shapes(), self.central_index, self.out_features, self.in_features, num_tokens, weight_cached
        )

    def choose_path(self, num_tokens: int) -> str:
        """``"dense"`` or ``"cores"`` for ``num_tokens`` rows (a materialised weight counts as cached)."""
        cached = not self._needs_grad() or self.step_weight is not None
        return self.path_costs(num_tokens, weight_cached=cached).chosen

    def forward(self, x: Tensor, counts: Sequence[int], bias: Tensor | None = None, *, path: str = "auto") -> Tensor:
        """``x [N, in_features]`` sorted by expert, ``counts[e]`` rows each -> ``[N, out_features]``.

        ``bias``: optional per-expert ``[E, out_features]`` added to each expert's rows.
        """
        check_choice(path, "path", PATHS)
        if path == "auto":
            path = self.choose_path(x.shape[0])
        if path == "cores":
            y = self._apply_cores(x, counts)
            return y if bias is None else y + expand_per_row(bias, counts)
        return grouped_matmul(x, self.expert_weights(), counts, bias)

    def extra_repr(self) -> str:
        return (
            f"[{self.out_features}, {self.in_features}], num_experts={self.num_experts}, "
            f"out_factors={self.out_factors}, in_factors={self.in_factors}, ranks={self.ranks}, "
            f"central={list(self.central.shape)}"
        )


def _core_path_plan(
    shapes: tuple[tuple[int, ...], ...], central: int, num_tokens: int
) -> tuple[bool, list[tuple[int, int]]]:
    """Whether to start with the left auxiliary block, and ``(output size, contracted size)`` per step."""
    core = [s[-4:] for s in shapes]
    N = batch_class(num_tokens)
    I_L, J_L = math.prod(s[1] for s in core[:central]), math.prod(s[2] for s in core[:central])
    I_R, J_R = math.prod(s[1] for s in core[central + 1 :]), math.prod(s[2] for s in core[central + 1 :])
    r_L, i_c, j_c, r_R = core[central]
    left_first = [
        (N * j_c * J_R * I_L * r_L, J_L),
        (N * J_R * I_L * i_c * r_R, r_L * j_c),
        (N * I_L * i_c * I_R, J_R * r_R),
    ]
    right_first = [
        (N * J_L * j_c * r_R * I_R, J_R),
        (N * J_L * I_R * r_L * i_c, j_c * r_R),
        (N * I_L * i_c * I_R, J_L * r_L),
    ]
    cost = lambda steps: sum(o * k for o, k in steps)  # noqa: E731
    return (True, left_first) if cost(left_first) <= cost(right_first) else (False, right_first)


def _opt_cost(expression: Any, shapes: Sequence[Sequence[int]]) -> ContractionCost:
    _, info = opt_einsum.contract_path(expression.contraction, *shapes, shapes=True, optimize="auto-hq")
    return ContractionCost(int(info.opt_cost), int(info.largest_intermediate))


@functools.lru_cache(maxsize=1024)
def _path_costs(
    shapes: tuple[tuple[int, ...], ...],
    central: int,
    out_features: int,
    in_features: int,
    num_tokens: int,
    cached: bool,
) -> PathCosts:
    E = shapes[0][0] if central > 0 else shapes[-1][0]
    core = [s[-4:] for s in shapes]
    rows, cols = math.prod(s[1] for s in core), math.prod(s[2] for s in core)
    N = batch_class(num_tokens)
    gemm = 2 * N * out_features * in_features
    if cached:
        dense = ContractionCost(gemm, E * out_features * in_features)
    else:
        rebuild = _opt_cost(_rebuild_expression(shapes, central), shapes)
        dense = ContractionCost(rebuild.flops + gemm, max(rebuild.largest_intermediate, E * rows * cols))
    # The core path: merged auxiliary blocks, one side's grouped contraction, the shared central GEMM, the other side.
    left, right = shapes[:central], shapes[central + 1 :]
    blocks = ((left, "left"), (right, "right"))
    merge = sum(_opt_cost(_block_expression(s, side), s).flops for s, side in blocks if len(s) > 1)
    _, steps = _core_path_plan(shapes, central, num_tokens)
    flops = merge + 2 * sum(o * k for o, k in steps)
    cores = ContractionCost(flops, max(o for o, _ in steps))
    return contract.compare_paths(cores, dense, num_tokens, N * max(rows, cols), weight_cached=cached)
