"""``MPOExperts``: MPOE, FFN experts that share one central tensor per matrix.

Each FFN matrix (``W1 [F, d]``, ``W2 [d_out, F]``, and ``Wg [F, d]`` for gated FFNs) is an MPO
(:mod:`mpolab`): ``n`` cores ``[r_{k-1}, i_k, j_k, r_k]`` whose middle one, the central tensor, holds
almost all the parameters. In MPOE every expert has its own auxiliary cores and all experts share
the central one, so a bank of ``E`` experts costs ``|C| + E·|aux|`` parameters instead of the
``E·|W|`` of Switch's dense experts (0.33 / 0.20 / 0.14 of Switch at ``E`` = 4 / 8 / 16 for T5-base's
768↔3072 matrices at exact ranks; see :func:`mpoe_param_ratio` and ``docs/mpoe.md``).

Two ways to apply expert ``e``'s matrix to its tokens, chosen per call by FLOP count
(:meth:`SharedCentralMPO.path_costs`):

* ``"dense"``: rebuild all ``E`` dense weights in ONE opt_einsum contraction over the stacked
  cores (the expert index is a batch index of the auxiliary cores only), then a grouped matmul.
  In no-grad mode the rebuilt weights are cached until a parameter changes.
* ``"cores"``: contract each expert's tokens with its merged left and right auxiliary blocks
  (grouped matmuls), then contract ALL tokens with the shared central tensor in one GEMM.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import opt_einsum
import torch
from torch import Tensor, nn

import mpolab
from mpolab import contract
from mpolab.contract import ContractionCost, PathCosts
from mpolab.nn import VersionedCache, _init_cores_, _random_mpo
from mpolab.shapes import plan_factors
from mpolab.truncation import bond_caps, num_params_for_ranks

from ..activations import ACTIVATIONS, get_activation
from .base import ExpertBank, check_ffn_weights, expand_per_row, grouped_matmul
from .dense import DenseExperts

__all__ = ["MPOExperts", "SharedCentralMPO", "mpoe_param_ratio"]

MATRICES = ("w1", "w_gate", "w2")


# ---------------------------------------------------------------------------------------- equations
def _letters(n: int) -> tuple[list[str], list[str], list[str], str]:
    """Bond, row and column letters for ``n`` cores and the expert letter."""
    sym = opt_einsum.get_symbol
    return (
        [sym(k) for k in range(n + 1)],
        [sym(n + 1 + k) for k in range(n)],
        [sym(2 * n + 1 + k) for k in range(n)],
        sym(3 * n + 1),
    )


def _terms(n: int, stacked: Sequence[bool], first: int = 0) -> list[str]:
    bonds, rows, cols, e = _letters(n)
    return [
        (e if stacked[k - first] else "") + bonds[k] + rows[k] + cols[k] + bonds[k + 1]
        for k in range(first, first + len(stacked))
    ]


@functools.lru_cache(maxsize=256)
def _rebuild_expression(shapes: tuple[tuple[int, ...], ...], central: int) -> Any:
    """All experts' matrices ``[E, Π j, Π i]`` (input-major) from the stacked cores in one contraction."""
    n = len(shapes)
    bonds, rows, cols, e = _letters(n)
    lhs = ",".join(_terms(n, [k != central for k in range(n)]))
    return opt_einsum.contract_expression(f"{lhs}->{e}{''.join(cols)}{''.join(rows)}", *shapes, optimize="auto-hq")


@functools.lru_cache(maxsize=256)
def _block_expression(shapes: tuple[tuple[int, ...], ...], side: str) -> Any:
    """Merge a run of stacked auxiliary cores: left ``[E, Π i, Π j, r_out]``, right ``[E, r_in, Π i, Π j]``."""
    n = len(shapes)
    bonds, rows, cols, e = _letters(n)
    lhs = ",".join(_terms(n, [True] * n))
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

    Example:
        >>> m = SharedCentralMPO(mpolab.decompose(torch.randn(3072, 768)), num_experts=8)
        >>> m.expert_weights().shape        # [8, 768, 3072], input-major
    """

    def __init__(self, mpo: mpolab.MPO, num_experts: int) -> None:
        super().__init__()
        self.out_features, self.in_features = mpo.shape
        self.num_experts = num_experts
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

    def _rebuild(self) -> Tensor:
        cores = self.stacked_cores()
        w = _rebuild_expression(self._shapes(), self.central_index)(*cores)
        return w.reshape(self.num_experts, math.prod(self.in_factors), math.prod(self.out_factors))[
            :, : self.in_features, : self.out_features
        ]

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def expert_weights(self) -> Tensor:
        """All experts' matrices, input-major ``[E, in_features, out_features]`` (``W_eᵀ``).

        One contraction for all experts; served from a cache in no-grad mode until a parameter changes.
        """
        if self._needs_grad():
            return self._rebuild()
        return self._cache.get(self.stacked_cores(), self._rebuild)

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
        cached = not self._needs_grad()
        return self.path_costs(num_tokens, weight_cached=cached).chosen

    def forward(self, x: Tensor, counts: Sequence[int], bias: Tensor | None = None, *, path: str = "auto") -> Tensor:
        """``x [N, in_features]`` sorted by expert, ``counts[e]`` rows each -> ``[N, out_features]``.

        ``bias``: optional per-expert ``[E, out_features]`` added to each expert's rows.
        """
        if path == "auto":
            path = self.choose_path(x.shape[0])
        if path == "cores":
            y = self._apply_cores(x, counts)
            return y if bias is None else y + expand_per_row(bias, counts)
        if path != "dense":
            raise ValueError(f"path must be 'auto', 'dense' or 'cores', got {path!r}")
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
    N = contract._batch_class(num_tokens)
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
    N = contract._batch_class(num_tokens)
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


# ---------------------------------------------------------------------------------------- the bank
class MPOExperts(ExpertBank):
    """MPOE: ``E`` FFN experts ``y = act(x W1_eᵀ + b1_e) W2_eᵀ + b2_e`` sharing each matrix's central tensor.

    Gated FFNs (LLaMA's SwiGLU, T5 v1.1) compute ``act(x Wg_eᵀ) * (x W1_eᵀ)``. Every matrix is a
    :class:`SharedCentralMPO`: its central tensor is one parameter for all experts, its auxiliary
    tensors are stacked ``[E, ...]``. Biases are per expert, ``b1 [E, F]`` and ``b2 [E, d_out]``.

    Args:
        d_model, d_ff, num_experts, activation, gated, bias, d_out: as :class:`DenseExperts`.
        num_cores: cores per matrix (MPOE uses 5).
        max_rank: bond dimension(s) of the random initialisation.

    Example:
        >>> bank = MPOExperts.from_ffn(ffn.wi.weight, ffn.wo.weight, num_experts=8)   # T5 upcycling
        >>> MoE(TopKGate(768, 8, k=1, weighting="one"), bank)
        >>> bank.reconstruction_error      # {'w1': 1e-7, 'w2': 1e-7} at exact ranks
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        gated: bool = False,
        bias: bool = True,
        d_out: int | None = None,
        num_cores: int = 5,
        max_rank: int | Sequence[int] = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (
            ("d_model", d_model),
            ("d_ff", d_ff),
            ("num_experts", num_experts),
            ("num_cores", num_cores),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        d_out = d_model if d_out is None else d_out
        mpos = {"w1": _random_mpo(d_ff, d_model, max_rank, num_cores, None, None, device, dtype)}
        if gated:
            mpos["w_gate"] = _random_mpo(d_ff, d_model, max_rank, num_cores, None, None, device, dtype)
        mpos["w2"] = _random_mpo(d_out, d_ff, max_rank, num_cores, None, None, device, dtype)
        self._build(mpos, num_experts, activation, bias)
        self.reset_parameters()

    def _build(
        self, mpos: dict[str, mpolab.MPO], num_experts: int, activation: str | Callable[[Tensor], Tensor], bias: bool
    ) -> None:
        super().__init__()
        w1 = mpos["w1"]
        self.num_experts, self.d_ff, self.in_features = num_experts, w1.shape[0], w1.shape[1]
        self.out_features = mpos["w2"].shape[0]
        self.activation_name = activation if isinstance(activation, str) else getattr(activation, "__name__", "custom")
        self.act = get_activation(activation)
        self.gated = "w_gate" in mpos
        self.w1 = SharedCentralMPO(mpos["w1"], num_experts)
        self.w_gate = SharedCentralMPO(mpos["w_gate"], num_experts) if self.gated else None
        self.w2 = SharedCentralMPO(mpos["w2"], num_experts)
        kw = {"device": w1.device, "dtype": w1.dtype}
        self.b1 = nn.Parameter(torch.zeros(num_experts, self.d_ff, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, self.out_features, **kw)) if bias else None
        self.reconstruction_error: dict[str, float] = {}

    def reset_parameters(self) -> None:
        """Random cores with ``nn.Linear``'s weight variance for every expert (experts differ), zero biases."""
        with torch.no_grad():
            for matrix in self.matrices().values():
                for e in range(self.num_experts):
                    cores = [c[e] for c in matrix.left] + [matrix.central] + [c[e] for c in matrix.right]
                    _init_cores_(cores, target_std=1.0 / math.sqrt(3 * matrix.in_features))
                matrix.clear_cache()
            for b in (self.b1, self.b2):
                if b is not None:
                    b.zero_()

    @classmethod
    def from_ffn(
        cls,
        w1: Tensor,
        w2: Tensor,
        num_experts: int,
        *,
        b1: Tensor | None = None,
        b2: Tensor | None = None,
        w_gate: Tensor | None = None,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        num_cores: int = 5,
        rel_tol: float | None = None,
        max_rank: int | Sequence[int] | None = None,
    ) -> MPOExperts:
        """Upcycle one pretrained FFN: every expert starts as its MPO (exact without ``rel_tol``/``max_rank``).

        Args:
            w1: ``[F, d]`` up projection, ``w2``: ``[d_out, F]`` down projection, ``w_gate``: ``[F, d]``
                gate projection of a gated FFN (``nn.Linear`` layout); biases ``b1 [F]``, ``b2 [d_out]``.
            num_experts: ``E``.
            num_cores, rel_tol, max_rank: passed to :func:`mpolab.decompose` for each matrix.

        The achieved relative Frobenius error per matrix is in ``reconstruction_error``.
        """
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        F_, d, _ = check_ffn_weights(w1, w2, w_gate, b1, b2)
        given = {"w1": w1, "w_gate": w_gate, "w2": w2}
        mpos = {}
        errors = {}
        for name, w in given.items():
            if w is None:
                continue
            w = w.detach()
            mpo = mpolab.decompose(w, num_cores, rel_tol=rel_tol, max_rank=max_rank)
            mpos[name] = mpo
            exact = w.to(torch.promote_types(w.dtype, torch.float32))
            error = torch.linalg.norm(mpo.to_matrix().to(exact.dtype) - exact) / torch.linalg.norm(exact).clamp_min(
                1e-30
            )
            errors[name] = float(error)
        bank = cls.__new__(cls)
        bank._build(mpos, num_experts, activation, bias=b1 is not None or b2 is not None)
        bank.reconstruction_error = errors
        with torch.no_grad():
            if bank.b1 is not None and b1 is not None:
                bank.b1.copy_(b1.expand(num_experts, F_))
            if bank.b2 is not None and b2 is not None:
                bank.b2.copy_(b2.expand(num_experts, w2.shape[0]))
        return bank

    # ------------------------------------------------------------------ structure
    def matrices(self) -> dict[str, SharedCentralMPO]:
        """``{"w1": ..., "w_gate": ..., "w2": ...}`` (``w_gate`` only when gated)."""
        return {name: m for name in MATRICES if (m := getattr(self, name)) is not None}

    def central_parameters(self) -> Iterator[nn.Parameter]:
        """The shared central tensors, one per matrix."""
        for m in self.matrices().values():
            yield m.central

    def auxiliary_parameters(self) -> Iterator[nn.Parameter]:
        """The per-expert auxiliary tensors, stacked ``[E, r, i, j, r]`` (biases not included)."""
        for m in self.matrices().values():
            yield from m.left
            yield from m.right

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """Every per-expert parameter (auxiliary tensors and biases), each with the expert as dim 0."""
        yield from self.auxiliary_parameters()
        for b in (self.b1, self.b2):
            if b is not None:
                yield b

    def freeze_central(self) -> MPOExperts:
        """MPOP-style lightweight fine-tuning: shared central tensors stop training."""
        for p in self.central_parameters():
            p.requires_grad_(False)
        return self

    def unfreeze_central(self) -> MPOExperts:
        for p in self.central_parameters():
            p.requires_grad_(True)
        return self

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_equivalent_params(self) -> int:
        """Parameters of the same ``E`` experts as independent dense FFNs (Switch)."""
        per_expert = sum(m.out_features * m.in_features for m in self.matrices().values())
        per_expert += sum(b.shape[1] for b in (self.b1, self.b2) if b is not None)
        return self.num_experts * per_expert

    def expert_mpo(self, expert: int, which: str = "w1") -> mpolab.MPO:
        """Expert ``expert``'s matrix ``which`` ("w1", "w2", "w_gate") as an :class:`mpolab.MPO`."""
        matrices = self.matrices()
        if which not in matrices:
            raise ValueError(f"which must be one of {sorted(matrices)}, got {which!r}")
        return matrices[which].expert_mpo(expert)

    def to_dense_experts(self) -> DenseExperts:
        """The same experts as a :class:`DenseExperts` bank (dense weights, for export or comparison)."""
        m = self.matrices()
        bank = DenseExperts(
            self.in_features,
            self.d_ff,
            self.num_experts,
            activation=self.activation_name if self.activation_name in ACTIVATIONS else self.act,
            gated=self.gated,
            bias=self.b1 is not None,
            d_out=self.out_features,
            device=self.w1.central.device,
            dtype=self.w1.central.dtype,
        )
        with torch.no_grad():
            for name, matrix in m.items():
                getattr(bank, name).copy_(matrix._rebuild())
            if self.b1 is not None:
                bank.b1.copy_(self.b1)  # type: ignore[union-attr]
                bank.b2.copy_(self.b2)  # type: ignore[union-attr]
        return bank

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x [N, d]`` sorted by expert, ``counts[e]`` rows each -> ``[N, d_out]``."""
        h = self.w1(x, counts, self.b1)
        if self.w_gate is not None:
            h = self.act(self.w_gate(x, counts)) * h
        else:
            h = self.act(h)
        return self.w2(h, counts, self.b2)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.in_features}, d_ff={self.d_ff}, d_out={self.out_features}, "
            f"activation={self.activation_name!r}, gated={self.gated}, params={self.num_params} "
            f"({self.num_params / self.dense_equivalent_params:.1%} of {self.num_experts} dense experts)"
        )


def mpoe_param_ratio(
    out_features: int,
    in_features: int,
    num_experts: int,
    num_cores: int = 5,
    max_rank: int | Sequence[int] | None = None,
) -> float:
    """Parameters of one MPOE matrix for ``num_experts`` experts over those of Switch's dense experts.

    ``(|C| + E·|aux|) / (E·out·in)`` with the factors :func:`mpolab.shapes.plan_factors` picks and the
    exact bond dimensions (capped by ``max_rank``). No decomposition is run.

    Example:
        >>> [round(mpoe_param_ratio(3072, 768, e), 2) for e in (4, 8, 16)]
        [0.33, 0.2, 0.14]
    """
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    plan = plan_factors(out_features, in_features, num_cores)
    sizes = [i * j for i, j in zip(plan.out_factors, plan.in_factors)]
    ranks = bond_caps(sizes, max_rank=max_rank)
    bonds = [1, *ranks, 1]
    c = num_cores // 2
    central = bonds[c] * sizes[c] * bonds[c + 1]
    aux = num_params_for_ranks(sizes, ranks) - central
    return (central + num_experts * aux) / (num_experts * out_features * in_features)
