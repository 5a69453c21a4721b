"""``MPOExperts``: MPOE, FFN experts that share one central tensor per matrix.

Each FFN matrix (``W1 [F, d]``, ``W2 [d_out, F]``, and ``Wg [F, d]`` for gated FFNs) is an MPO
(:mod:`mpolab`): ``n`` cores ``[r_{k-1}, i_k, j_k, r_k]`` whose middle one, the central tensor, holds
almost all the parameters. In MPOE every expert has its own auxiliary cores and all experts share
the central one (:class:`~mpolab_moe.experts.shared_central.SharedCentralMPO`), so a bank of ``E``
experts costs ``|C| + E·|aux|`` parameters instead of the ``E·|W|`` of Switch's dense experts
(0.33 / 0.20 / 0.14 of Switch at ``E`` = 4 / 8 / 16 for T5-base's 768↔3072 matrices at exact
ranks; see :func:`mpoe_param_ratio` and ``docs/mpoe.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

import mpolab
from mpolab import TruncationOptions
from mpolab.nn import init_cores_, random_mpo
from mpolab.shapes import plan_factors
from mpolab.truncation import bond_caps, num_params_for_ranks
from mpolab.utils import check_positive_int

from ..activations import Activation
from .base import FFNBank, FFNWeights, grouped_ffn
from .dense import DenseExperts
from .shared_central import SharedCentralMPO, digit_reversal

__all__ = ["MPOExperts", "mpoe_param_ratio"]

MATRICES = ("w1", "w_gate", "w2")


class MPOExperts(FFNBank):
    """MPOE: ``E`` FFN experts ``y = act(x W1_eᵀ + b1_e) W2_eᵀ + b2_e`` sharing each matrix's central tensor.

    Gated FFNs (LLaMA's SwiGLU, T5 v1.1) compute ``act(x Wg_eᵀ) * (x W1_eᵀ)``. Every matrix is a
    :class:`SharedCentralMPO`: its central tensor is one parameter for all experts, its auxiliary
    tensors are stacked ``[E, ...]``. Biases are per expert, ``b1 [E, F]`` and ``b2 [E, d_out]``.
    The bank has ``central_parameters()`` / ``auxiliary_parameters()``, so
    :func:`mpolab.set_trainable` and :func:`mpolab.param_groups` treat it like an MPO layer.

    Args:
        d_model, d_ff, num_experts: as :class:`DenseExperts`.
        num_cores: cores per matrix (MPOE uses 5).
        max_rank: bond dimension(s) of the random initialisation.
        activation, gated, bias, d_out: as :class:`DenseExperts`.
        mpos: ``{"w1": MPO [F, d], "w2": MPO [d_out, F], "w_gate": MPO [F, d]}`` every expert starts
            from (upcycling, see :meth:`from_ffn`); ``None``: random cores (``num_cores``, ``max_rank``).

    Examples:
        >>> bank = MPOExperts.from_ffn(FFNWeights(ffn.wi.weight, ffn.wo.weight), num_experts=8)   # T5 upcycling
        >>> MoE(TopKGate(768, 8, k=1, weighting="one"), bank)
        >>> bank.reconstruction_error      # {'w1': 1e-7, 'w2': 1e-7} at exact ranks
    """

    w1: SharedCentralMPO
    w2: SharedCentralMPO
    w_gate: SharedCentralMPO | None
    b1: nn.Parameter | None
    b2: nn.Parameter | None

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        num_cores: int = 5,
        max_rank: int | Sequence[int] = 16,
        mpos: Mapping[str, mpolab.MPO] | None = None,
        activation: Activation = "relu",
        gated: bool = False,
        bias: bool = True,
        d_out: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_sizes(d_model, d_ff, num_experts, d_out, activation)
        E = num_experts
        check_positive_int(num_cores, "num_cores")
        shapes = {"w1": (d_ff, d_model), "w_gate": (d_ff, d_model), "w2": (self.out_features, d_ff)}
        names = [n for n in MATRICES if n != "w_gate" or gated]
        random = mpos is None
        if mpos is None:
            mpos = {
                n: random_mpo(*shapes[n], max_rank=max_rank, num_cores=num_cores, device=device, dtype=dtype)
                for n in names
            }
        elif sorted(mpos) != sorted(names) or any(tuple(mpos[n].shape) != shapes[n] for n in names):
            given = {n: tuple(m.shape) for n, m in mpos.items()}
            raise ValueError(f"mpos must give {', '.join(f'{n} {list(shapes[n])}' for n in names)}; got {given}")
        self.w1 = SharedCentralMPO(mpos["w1"], E)
        self.w_gate = SharedCentralMPO(mpos["w_gate"], E) if gated else None
        self.w2 = SharedCentralMPO(mpos["w2"], E)
        ref = mpos["w1"]  # biases live with the cores
        self.b1 = nn.Parameter(torch.zeros(E, self.d_ff, device=ref.device, dtype=ref.dtype)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(E, self.out_features, device=ref.device, dtype=ref.dtype)) if bias else None
        self._use_grouped_rebuild()
        if random:
            self.reset_parameters()

    def _use_grouped_rebuild(self) -> None:
        """Let the matrices write their weights with the hidden side digit-reversed (no permute copy of the
        ``E`` weights, see :func:`~mpolab_moe.experts.shared_central.grouped_rebuild`) when the hidden
        side's digit groups agree between ``W1`` (and ``W_gate``) outputs and ``W2`` inputs and nothing is padded."""
        first = [m for name, m in self.matrices().items() if name != "w2"]
        if not all(m.supports_grouped_rebuild() for m in self.matrices().values()):
            return
        if any(m.side_groups("out") != self.w2.side_groups("in") for m in first):
            return
        for m in first:
            m.hidden_side = "out"
        self.w2.hidden_side = "in"

    @property
    def hidden_groups(self) -> tuple[int, int, int] | None:
        """Digit groups of the hidden side when the weights are rebuilt digit-reversed (else ``None``)."""
        return self.w2.side_groups("in") if self.w2.hidden_side == "in" else None

    def reset_parameters(self) -> None:
        """Random cores with ``nn.Linear``'s weight variance for every expert (experts differ), zero biases."""
        with torch.no_grad():
            for matrix in self.matrices().values():
                for e in range(self.num_experts):
                    cores = [c[e] for c in matrix.left] + [matrix.central] + [c[e] for c in matrix.right]
                    init_cores_(cores, target_std=1.0 / math.sqrt(3 * matrix.in_features))
                matrix.clear_cache()
            for b in (self.b1, self.b2):
                if b is not None:
                    b.zero_()

    @classmethod
    def from_ffn(cls, ffn: FFNWeights, num_experts: int, *, options: TruncationOptions | None = None) -> MPOExperts:
        """Upcycle one pretrained FFN: every expert starts as its MPO (exact unless ``options`` truncate).

        Args:
            ffn: the FFN (:class:`FFNWeights`, or an :class:`~mpolab_moe.ffn.FFN` from ``find_ffns``).
            num_experts: ``E``.
            options: how :func:`mpolab.decompose` cuts each matrix (``TruncationOptions(num_cores=5)``
                by default: MPOE's five cores, exact ranks).

        The achieved relative Frobenius error per matrix is in ``reconstruction_error``.

        Examples:
            >>> MPOExperts.from_ffn(ffn, 8, options=TruncationOptions(max_rank=64))
        """
        if not isinstance(ffn, FFNWeights):
            raise TypeError(f"ffn must be an FFNWeights (or an FFN from find_ffns), got {type(ffn).__name__}")
        E = check_positive_int(num_experts, "num_experts")
        options = TruncationOptions(num_cores=5) if options is None else options
        if not isinstance(options, TruncationOptions):
            raise TypeError(f"options must be a mpolab TruncationOptions, got {type(options).__name__}")
        mpos = {name: mpolab.decompose(w.detach(), options=options) for name, w in ffn.matrices().items()}
        bank = cls(
            ffn.d_model,
            ffn.d_ff,
            E,
            activation=ffn.activation,
            gated=ffn.gated,
            bias=ffn.has_bias,
            d_out=ffn.d_out,
            mpos=mpos,
        )
        bank.reconstruction_error = {n: _relative_error(mpos[n], w.detach()) for n, w in ffn.matrices().items()}
        with torch.no_grad():
            for b, given in ((bank.b1, ffn.b1), (bank.b2, ffn.b2)):
                if b is not None and given is not None:
                    b.copy_(given.expand_as(b))
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

    def forward(
        self,
        x: torch.Tensor,
        counts: Sequence[int],
        *,
        order: torch.Tensor | None = None,
        weight_grad_scale: float = 1.0,
    ) -> torch.Tensor:
        """``x [N, d]`` sorted by expert, ``counts[e]`` rows each -> ``[N, d_out]`` (``order``,
        ``weight_grad_scale``: see :meth:`FFNBank.forward <mpolab_moe.experts.base.FFNBank.forward>`).

        When every matrix takes the rebuild path, the stacked weights ``[E, in, out]`` (hidden side
        digit-reversed where :attr:`hidden_groups` says so, ``b1`` reordered to match) go to the same
        expert-by-expert FFN as Switch's dense experts (:func:`~mpolab_moe.experts.base.chunked_ffn`);
        otherwise each matrix applies itself (through its cores where that is cheaper).
        """
        matrices = self.matrices()
        num_rows = x.shape[0] if order is None else order.numel()
        if num_rows and all(m.choose_path(num_rows) == "dense" for m in matrices.values()):
            w = {name: m.grouped_weights() for name, m in matrices.items()}
            groups = self.hidden_groups
            b1 = self.b1 if self.b1 is None or groups is None else digit_reversal(self.b1, groups)
            return grouped_ffn(
                x,
                counts,
                w["w1"],
                w["w2"],
                self.act,
                w_gate=w.get("w_gate"),
                b1=b1,
                b2=self.expert_bias(),
                order=order,
                weight_grad_scale=weight_grad_scale,
            )
        return super().forward(x, counts, order=order, weight_grad_scale=weight_grad_scale)

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
            activation=self.activation,
            gated=self.gated,
            bias=self.b1 is not None,
            d_out=self.out_features,
            device=self.w1.central.device,
            dtype=self.w1.central.dtype,
        )
        with torch.no_grad():
            for name, matrix in m.items():
                getattr(bank, name).copy_(matrix.rebuild())
            for dst, src in ((bank.b1, self.b1), (bank.b2, self.b2)):
                if dst is not None and src is not None:
                    dst.copy_(src)
        return bank

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, params={self.num_params} "
            f"({self.num_params / self.dense_equivalent_params:.1%} of {self.num_experts} dense experts)"
        )


def _relative_error(mpo: mpolab.MPO, w: torch.Tensor) -> float:
    """``||MPO - W||_F / ||W||_F`` in at least fp32."""
    exact = w.to(torch.promote_types(w.dtype, torch.float32))
    return float(torch.linalg.norm(mpo.to_matrix().to(exact.dtype) - exact) / torch.linalg.norm(exact).clamp_min(1e-30))


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

    Examples:
        >>> [round(mpoe_param_ratio(3072, 768, e), 2) for e in (4, 8, 16)]
        [0.33, 0.2, 0.14]
    """
    check_positive_int(num_experts, "num_experts")
    plan = plan_factors(out_features, in_features, num_cores)
    sizes = [i * j for i, j in zip(plan.out_factors, plan.in_factors)]
    ranks = bond_caps(sizes, max_rank=max_rank)
    bonds = [1, *ranks, 1]
    c = num_cores // 2
    central = bonds[c] * sizes[c] * bonds[c + 1]
    aux = num_params_for_ranks(sizes, ranks) - central
    return (central + num_experts * aux) / (num_experts * out_features * in_features)
