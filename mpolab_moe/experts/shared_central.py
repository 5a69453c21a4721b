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


# ---------------------------------------------------------------------------------------- fast rebuild
def reversed_blocks(left: Tensor, central: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The blocks of the same matrices with the core chain read right to left (views, no copies).

    ``left [E, I_L, J_L, r_L]``, ``central [r_L, i_c, j_c, r_R]``, ``right [E, r_R, I_R, J_R]`` become
    ``[E, I_R, J_R, r_R]``, ``[r_R, i_c, j_c, r_L]``, ``[E, r_L, I_L, J_L]``: :func:`grouped_rebuild`
    of these writes the output side in natural order and the input side digit-reversed.
    """
    return right.permute(0, 2, 3, 1), central.permute(3, 1, 2, 0), left.permute(0, 3, 1, 2)


def grouped_rebuild(left: Tensor, central: Tensor, right: Tensor) -> Tensor:
    """All ``E`` matrices, input side natural, output side digit-reversed: ``[E, J_L·j_c·J_R, I_R·i_c·I_L]``.

    ``W_e[(jL, jc, jR), (iR, ic, iL)] = Σ_ab L_e[iL, jL, a] C[a, ic, jc, b] R_e[b, iR, jR]`` for
    ``left [E, I_L, J_L, r_L]`` (the merged auxiliary cores before the central one), ``central
    [r_L, i_c, j_c, r_R]`` and ``right [E, r_R, I_R, J_R]``.

    Why this layout: a matrix whose row and column indices both interleave factors of all three
    blocks cannot be the output of a GEMM in natural order on both sides (the last GEMM's two free
    groups are contiguous), so a natural ``[E, J, I]`` costs a permute copy of all ``E`` matrices.
    Reversing the three digit groups of one side (an FFN's hidden side, which no one outside the
    FFN sees) lets the last GEMM write each ``[(jR iR), (ic iL)]`` tile in place: the output is
    consumed by the grouped GEMM as it is, and its gradient comes back in the same layout. The
    first GEMM (``L ⊗ C``, the cheaper one) runs as one large GEMM over all experts; its result
    ``[E, J_L·j_c, r_R, i_c·I_L]`` (the size of ``W`` at exact ranks, a sixth of it at rank 64) is
    reordered once in forward and once in backward. The backward also reorders the incoming
    gradient one expert at a time, so that the right block's gradient is one GEMM with a long inner
    dimension (the alternative, ``J_L·j_c`` accumulating GEMMs of inner size ``i_c·I_L``, ran at
    a few GFLOP/s on CPU). The order of the two GEMMs is fixed by the layout (``L ⊗ C`` first,
    then ``R``; the mirror for the other hidden side); both run batched over the experts.
    FLOPs: ``2·E·r_L·(I_L·J_L)·(i_c·j_c·r_R) + 2·E·r_R·(I_R·J_R)·(J_L·j_c·i_c·I_L)``.
    """
    out: Tensor = _GroupedRebuild.apply(left, central, right)
    return out


class _GroupedRebuild(torch.autograd.Function):
    """:func:`grouped_rebuild`: large GEMMs and batched GEMMs forward and backward (see its docstring)."""

    @staticmethod
    def forward(ctx: Any, left: Tensor, central: Tensor, right: Tensor) -> Tensor:
        E, I_L, J_L, A = left.shape
        _, i_c, j_c, B = central.shape
        I_R, J_R = right.shape[2], right.shape[3]
        M, G = j_c * B * i_c, J_L * j_c
        c_mat = central.permute(2, 3, 1, 0).reshape(M, A)  # [(jc b ic), a]: one copy of the shared core
        l_mat = left.permute(3, 0, 2, 1).reshape(A, E * J_L * I_L)  # [a, (e jL iL)]
        t = (c_mat @ l_mat).view(j_c, B, i_c, E, J_L, I_L).permute(3, 4, 0, 1, 2, 5).contiguous()
        t = t.view(E, G, B, i_c * I_L)  # [e, (jL jc), b, (ic iL)]
        r_mat = right.permute(0, 3, 2, 1).reshape(E, J_R * I_R, B)  # [e, (jR iR), b]
        w = left.new_empty(E, G, J_R * I_R, i_c * I_L)
        for e in range(E):  # every (jL, jc) tile of expert e: [(jR iR), b] @ [b, (ic iL)], written in place
            torch.bmm(r_mat[e].expand(G, -1, -1), t[e], out=w[e])
        ctx.save_for_backward(c_mat, l_mat, t, r_mat)
        ctx.sizes = (E, I_L, J_L, A, i_c, j_c, B, I_R, J_R)
        return w.view(E, J_L * j_c * J_R, I_R * i_c * I_L)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        c_mat, l_mat, t, r_mat = ctx.saved_tensors
        E, I_L, J_L, A, i_c, j_c, B, I_R, J_R = ctx.sizes
        G, M = J_L * j_c, j_c * B * i_c
        grad = grad.contiguous().view(E, G, J_R * I_R, i_c * I_L)
        g_t = grad.new_empty(E, G, B, i_c * I_L)
        g_r = grad.new_empty(E, J_R * I_R, B)
        for e in range(E):
            torch.bmm(r_mat[e].T.expand(G, -1, -1), grad[e], out=g_t[e])
            # Σ over the G tiles as ONE GEMM with a long inner dimension (G·i_c·I_L): this reorders one
            # expert's gradient at a time. G accumulating GEMMs with inner dimension i_c·I_L instead ran
            # at a few GFLOP/s (measured: 1.6 s of a 4.3 s rebuild backward at T5-base's exact ranks).
            if ctx.needs_input_grad[2]:
                tiles = grad[e].transpose(0, 1).reshape(J_R * I_R, -1)
                torch.mm(tiles, t[e].transpose(0, 1).reshape(B, -1).T, out=g_r[e])
        g_tm = g_t.view(E, J_L, j_c, B, i_c, I_L).permute(2, 3, 4, 0, 1, 5).reshape(M, E * J_L * I_L)
        g_c = (g_tm @ l_mat.T).view(j_c, B, i_c, A).permute(3, 2, 0, 1) if ctx.needs_input_grad[1] else None
        g_l = (c_mat.T @ g_tm).view(A, E, J_L, I_L).permute(1, 3, 2, 0) if ctx.needs_input_grad[0] else None
        g_right = g_r.view(E, J_R, I_R, B).permute(0, 3, 2, 1) if ctx.needs_input_grad[2] else None
        return g_l, g_c, g_right


def digit_reversal(values: Tensor, groups: tuple[int, int, int]) -> Tensor:
    """``values [..., n]`` with the last index ``(d0, d1, d2)`` of sizes ``groups`` reordered to ``(d2, d1, d0)``.

    The hidden order :func:`grouped_rebuild` writes (for ``b1`` of an FFN whose ``W1`` it rebuilds).

    Examples:
        >>> digit_reversal(torch.arange(6.0), (1, 2, 3)).tolist()
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    """
    lead = values.shape[:-1]
    n = len(lead)
    return values.reshape(*lead, *groups).permute(*range(n), n + 2, n + 1, n).reshape(*lead, -1)


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
    #: the side an FFN keeps private (``"out"`` for ``W1``/``W_gate``, ``"in"`` for ``W2``), which
    #: :meth:`grouped_weights` writes digit-reversed (:func:`grouped_rebuild`); ``None``: natural order
    hidden_side: str | None = None

    def __init__(self, mpo: mpolab.MPO, num_experts: int) -> None:
        super().__init__()
        self.out_features, self.in_features = mpo.shape
        self.num_experts = check_positive_int(num_experts, "num_experts")
        c = mpo.central_index
        self.central = nn.Parameter(mpo.cores[c].detach().clone(memory_format=torch.contiguous_format))
        stack = lambda core: nn.Parameter(core.detach().unsqueeze(0).repeat(num_experts, 1, 1, 1, 1))  # noqa: E731
        self.left = nn.ParameterList(stack(core) for core in mpo.cores[:c])
        self.right = nn.ParameterList(stack(core) for core in mpo.cores[c + 1 :])
        self._cache = VersionedCache()
        self._natural_cache = VersionedCache()  # natural-order weights when grouped_weights() reverses a side

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
        if self.hidden_side is None:
            return self.grouped_weights()
        if self._needs_grad():
            return self.rebuild()
        return self._natural_cache.get(self.stacked_cores(), self.rebuild)

    def side_groups(self, side: str) -> tuple[int, int, int]:
        """Sizes of the three digit groups (before, at, after the central core) of the ``"out"`` or ``"in"`` side."""
        factors = self.out_factors if side == "out" else self.in_factors
        c = self.central_index
        return math.prod(factors[:c]), factors[c], math.prod(factors[c + 1 :])

    def supports_grouped_rebuild(self) -> bool:
        """Whether :func:`grouped_rebuild` applies: no zero padding on either side."""
        return math.prod(self.out_factors) == self.out_features and math.prod(self.in_factors) == self.in_features

    def rebuild_grouped(self) -> Tensor:
        """All experts' matrices ``[E, in_features, out_features]`` now, the :attr:`hidden_side` digit-reversed."""
        if self.hidden_side is None:
            return self.rebuild()
        L, R = self._blocks()
        if self.hidden_side == "out":
            return grouped_rebuild(L, self.central, R)
        return grouped_rebuild(*reversed_blocks(L, self.central, R))

    def rebuild_flops(self) -> int:
        """FLOPs of one forward :meth:`rebuild_grouped` (its backward costs twice as much): the two
        large GEMMs of :func:`grouped_rebuild`, or opt_einsum's count for the natural-order rebuild."""
        if self.hidden_side is None:
            shapes = self._shapes()
            return _opt_cost(_rebuild_expression(shapes, self.central_index), shapes).flops
        E = self.num_experts
        r_L, i_c, j_c, r_R = (int(d) for d in self.central.shape)
        I_L, _, I_R = self.side_groups("out")
        J_L, _, J_R = self.side_groups("in")
        if self.hidden_side == "in":  # the chain read right to left (reversed_blocks)
            r_L, I_L, J_L, r_R, I_R, J_R = r_R, I_R, J_R, r_L, I_L, J_L
        return 2 * E * r_L * (I_L * J_L) * (i_c * j_c * r_R) + 2 * E * r_R * (I_R * J_R) * (J_L * j_c * i_c * I_L)

    def grouped_weights(self) -> Tensor:
        """What the grouped GEMM consumes: ``[E, in_features, out_features]``, the hidden side digit-reversed.

        Materialised once per optimiser step under :func:`mpolab.materialize`; cached in no-grad mode.
        Equals :meth:`expert_weights` when :attr:`hidden_side` is ``None``.
        """
        cores = self.stacked_cores()
        if self._needs_grad():
            if self.step_weight is None:
                return self.rebuild_grouped()
            return self.step_weight.get(cores, self.rebuild_grouped)
        if self.step_weight is not None and (held := self.step_weight.peek(cores)) is not None:
            return held
        return self._cache.get(cores, self.rebuild_grouped)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._natural_cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> SharedCentralMPO:  # .to(), .half(), ...
        self.clear_cache()
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
