"""The expert-bank contract, the FFN weights value and the grouped products every bank uses.

An expert bank computes ``E`` experts on tokens that the :class:`~mpolab_moe.MoE` layer has
already sorted by expert: ``x [N, d_in]`` holds ``counts[0]`` rows for expert 0, then
``counts[1]`` rows for expert 1, and so on.

**Output contract.** ``bank(x, counts)`` returns ``[N, d_out]``, in the same order: for each
routed row, its expert's *contribution to the layer output*. The layer multiplies each row by
its combine weight and sums the rows of a token, then adds :attr:`ExpertBank.output_bias` once:
``MoE(x)_t = sum_s w_ts * bank_{e_ts}(x_t) + output_bias``. What that sum stands for is the
bank's :attr:`ExpertBank.output_kind` (:class:`BankOutput`): the layer's output itself (FFN
experts), an update added to a frozen base layer's output (LoRA), or the input rescaled (IA3).
The PEFT adapters compose a base layer with a MoE according to it, in one place
(:meth:`mpolab_moe.peft.layers.AdapterLayer.forward`).

**Capabilities.** A bank declares what else it offers in :attr:`ExpertBank.capabilities`
(:class:`Capability`); gates declare what they require (:meth:`mpolab_moe.gates.base.Gate.requires`)
and :class:`~mpolab_moe.MoE` refuses a pair whose requirements the bank lacks, at construction.
Declaring a capability without its methods is a ``TypeError`` when the class is defined.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from mpolab.utils import check_positive_int

from ..activations import ACTIVATIONS, Activation, activation_name, get_activation
from ..rows import place_rows, scale_gradient, take_rows, unused_rows

__all__ = [
    "BankOutput",
    "Capability",
    "ExpertBank",
    "FFNBank",
    "FFNWeights",
    "GroupedLinear",
    "KeyedBank",
    "NeuronGroupBank",
    "SoftBank",
    "expand_per_row",
    "chunked_ffn",
    "grouped_ffn",
    "grouped_matmul",
    "use_padded_bmm",
]

#: Padded ``bmm`` is used when padding every group to the largest adds at most this fraction of rows.
PAD_OVERHEAD = 0.25


# ------------------------------------------------------------------------------- capabilities


class Capability(str, Enum):
    """What a bank offers beyond ``forward(x, counts)``.

    * ``KEYS``: ``keys() -> [E, m, d]``, the rows each expert's neurons score a token against
      (:class:`KeyedBank`; EMoE's avg-k gate reads them).
    * ``NEURON_GROUPS``: the bank is one dense FFN split into groups of hidden neurons, with
      ``hidden(x)``/``activity(x) -> [T, E, m]``, ``act``, ``b1`` and ``gated``
      (:class:`NeuronGroupBank`; MoEfication's oracle router and avg-k's activation score need it).
    * ``SOFT``: ``forward_soft(x [T, d], weight [T, E]) -> [T, d_out]`` merges all experts per token
      (:class:`SoftBank`; MoV, MoLoRA). Soft routing still works without it: the layer then runs
      every expert on every token.
    """

    KEYS = "keys"
    NEURON_GROUPS = "neuron_groups"
    SOFT = "soft"


class BankOutput(str, Enum):
    """What the weighted sum of a bank's rows stands for (see the module docstring).

    * ``OUTPUT``: the layer's output (FFN experts replace the FFN).
    * ``UPDATE``: an update added to a frozen base layer's output, ``y = base(x) + moe(x)`` (LoRA).
    * ``SCALED``: the input tensor rescaled elementwise (``d_in == d_out``), which then takes the
      input's place (IA3: before or after the base layer).
    """

    OUTPUT = "output"
    UPDATE = "update"
    SCALED = "scaled"


@runtime_checkable
class KeyedBank(Protocol):
    """A bank with neuron keys (:attr:`Capability.KEYS`)."""

    num_experts: int
    in_features: int

    def keys(self) -> Tensor:
        """``[E, m, d]`` key rows per expert and neuron."""
        ...


@runtime_checkable
class NeuronGroupBank(KeyedBank, Protocol):
    """A dense FFN split into neuron groups (:attr:`Capability.NEURON_GROUPS`)."""

    act: Callable[[Tensor], Tensor]

    # read-only: banks store ``b1`` as an ``nn.Parameter`` and derive ``gated`` from their weights
    @property
    def b1(self) -> Tensor | None: ...

    @property
    def gated(self) -> bool: ...

    def hidden(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> every expert's intermediate activation ``[T, E, m]``."""
        ...

    def activity(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> how strongly each neuron fires, ``[T, E, m]``, ``>= 0``."""
        ...


@runtime_checkable
class SoftBank(Protocol):
    """A bank that merges its experts per token (:attr:`Capability.SOFT`)."""

    def forward_soft(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x [T, d_in]``, ``weight [T, E]`` -> ``[T, d_out]``, ``sum_e weight[:, e] * expert_e(x)``."""
        ...


#: The methods each capability promises (checked when a bank class is defined).
_PROMISED: dict[Capability, tuple[str, ...]] = {
    Capability.KEYS: ("keys",),
    Capability.NEURON_GROUPS: ("keys", "hidden", "activity"),
    Capability.SOFT: ("forward_soft",),
}


class ExpertBank(nn.Module, ABC):
    """Base class of expert banks: ``forward(x [N, d_in], counts) -> [N, d_out]`` (see the module docstring).

    Subclasses set ``num_experts``, ``in_features`` and ``out_features``, implement :meth:`forward`,
    and declare :attr:`capabilities` and :attr:`output_kind`.

    Examples:
        >>> class Scale(ExpertBank):
        ...     capabilities = frozenset({Capability.SOFT})
        ...     output_kind = BankOutput.SCALED
        ...     def forward(self, x, counts): ...
        ...     def forward_soft(self, x, weight): ...
    """

    num_experts: int
    in_features: int
    out_features: int
    #: What the bank offers besides :meth:`forward`.
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: What the weighted sum of its rows stands for.
    output_kind: ClassVar[BankOutput] = BankOutput.OUTPUT

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for capability in cls.capabilities:
            missing = [m for m in _PROMISED[capability] if not callable(getattr(cls, m, None))]
            if missing:
                raise TypeError(f"{cls.__name__} declares {capability.name} but has no {', '.join(missing)}()")

    @abstractmethod
    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """``x [N, d_in]`` sorted by expert, ``counts[e]`` rows each -> ``[N, d_out]`` contributions."""

    def has(self, capability: Capability) -> bool:
        """Whether this bank declares ``capability``."""
        return capability in self.capabilities

    @property
    def output_bias(self) -> Tensor | None:
        """A bias added once per token after combining (e.g. a dense FFN's b2 shared by sliced experts)."""
        return None


# ------------------------------------------------------------------------------- FFN weights


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


@dataclass(frozen=True, eq=False)
class FFNWeights:
    """One feed-forward network in ``nn.Linear`` layout, validated once.

    ``y = act(x w1^T + b1) w2^T + b2``, gated: ``(act(x w_gate^T) * (x w1^T + b1)) w2^T + b2``.

    Attributes:
        w1: ``[F, d]`` up projection (LLaMA ``up_proj``, T5 gated ``wi_1``).
        w2: ``[d_out, F]`` down projection.
        w_gate: ``[F, d]`` gate projection of a gated FFN (the branch ``act`` applies to), or ``None``.
        b1: ``[F]`` or ``None``; b2: ``[d_out]`` or ``None``.
        activation: a name from :data:`mpolab_moe.activations.ACTIVATIONS` or a callable.

    Raises:
        ValueError: shapes that do not form an FFN (the message names them); TypeError: a non-tensor.

    Examples:
        >>> ffn = FFNWeights(up.weight, down.weight, b1=up.bias, b2=down.bias, activation="gelu")
        >>> DenseExperts.from_ffn(ffn, num_experts=8)
    """

    w1: Tensor
    w2: Tensor
    w_gate: Tensor | None = None
    b1: Tensor | None = None
    b2: Tensor | None = None
    activation: Activation = "relu"

    def __post_init__(self) -> None:
        w1, w2 = self.w1, self.w2
        if not isinstance(w1, Tensor) or not isinstance(w2, Tensor) or w1.dim() != 2 or w2.dim() != 2:
            raise ValueError(f"w1 must be [F, d] and w2 [d_out, F] matrices, got {_shape(w1)} and {_shape(w2)}")
        F_ = w1.shape[0]
        if w2.shape[1] != F_:
            raise ValueError(f"w2 {tuple(w2.shape)} does not take w1's {F_} hidden units (expected [d_out, {F_}])")
        expected = {"w_gate": tuple(w1.shape), "b1": (F_,), "b2": (w2.shape[0],)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != shape):
                raise ValueError(f"{name} must be {list(shape)}, got {_shape(value)}")
        get_activation(self.activation)  # raises for unknown names

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]

    @property
    def d_out(self) -> int:
        return self.w2.shape[0]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None or self.b2 is not None

    @property
    def num_params(self) -> int:
        """Parameters of the matrices and biases."""
        return sum(t.numel() for t in (self.w1, self.b1, self.w2, self.b2, self.w_gate) if t is not None)

    def matrices(self) -> dict[str, Tensor]:
        """``{"w1": ..., "w_gate": ..., "w2": ...}`` (``w_gate`` only when gated), ``nn.Linear`` layout."""
        return {n: w for n, w in (("w1", self.w1), ("w_gate", self.w_gate), ("w2", self.w2)) if w is not None}


# ------------------------------------------------------------------------------- grouped products


def expand_per_row(values: Tensor, counts: Sequence[int]) -> Tensor:
    """``values [E, ...]`` repeated ``counts[e]`` times: one row per sorted token, ``[N, ...]``."""
    repeats = torch.as_tensor(counts, device=values.device)
    return values.repeat_interleave(repeats, dim=0, output_size=int(sum(counts)))


def use_padded_bmm(x: Tensor, counts: Sequence[int]) -> bool:
    """Whether :func:`grouped_matmul` pads the groups into one ``bmm`` rather than one GEMM per group.

    Only on accelerators, where one kernel beats ``E`` launches, and only when the groups are
    nearly balanced (padding adds at most :data:`PAD_OVERHEAD` of the rows). On CPU one ``mm`` /
    ``addmm`` per group is faster: no padding copy, no masked rows, bias fused (measured in
    ``benchmarks/bench_moe.py``: padded ``bmm`` made Switch 1.5x slower than a per-expert loop).
    """
    E, N = len(counts), x.shape[0]
    return x.device.type != "cpu" and E > 1 and max(counts) * E <= (1 + PAD_OVERHEAD) * N


def grouped_matmul(x: Tensor, weight: Tensor, counts: Sequence[int], bias: Tensor | None = None) -> Tensor:
    """``out[rows of e] = x[rows of e] @ weight[e] (+ bias[e])`` for contiguous groups.

    Args:
        x: ``[N, a]`` rows sorted by group.
        weight: ``[E, a, b]``.
        counts: ``E`` group sizes summing to ``N``.
        bias: optional ``[E, b]``, added to each group's rows (fused into the GEMM).

    Returns:
        ``[N, b]``.

    One GEMM per non-empty group on views of ``x`` (no copies of the weights, no masks), or one
    padded ``bmm`` on accelerators when the groups are nearly balanced (:func:`use_padded_bmm`).
    """
    E = weight.shape[0]
    if len(counts) != E:
        raise ValueError(f"counts has {len(counts)} groups, weight has {E}")
    if bias is not None and bias.shape != (E, weight.shape[-1]):
        raise ValueError(f"bias must be [E={E}, {weight.shape[-1]}], got {tuple(bias.shape)}")
    N = x.shape[0]
    if N == 0:
        return x.new_zeros(0, weight.shape[-1])
    if use_padded_bmm(x, counts):
        return padded_bmm(x, weight, counts, bias)
    chunks = torch.split(x, list(counts))
    # unbind, not weight[e]: its backward stacks the E gradients once instead of materialising a
    # zero-filled [E, a, b] gradient per expert (which made training 2x slower than a loop over
    # separate nn.Linear experts in benchmarks/bench_moe.py)
    weights = weight.unbind(0)
    if bias is None:
        parts = [chunk @ weights[e] for e, chunk in enumerate(chunks) if chunk.shape[0]]
    else:
        biases = bias.unbind(0)
        parts = [torch.addmm(biases[e], chunk, weights[e]) for e, chunk in enumerate(chunks) if chunk.shape[0]]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def padded_bmm(x: Tensor, weight: Tensor, counts: Sequence[int], bias: Tensor | None = None) -> Tensor:
    """:func:`grouped_matmul` as one ``bmm`` over the groups padded to the largest (``[N, a]`` -> ``[N, b]``)."""
    E, largest = weight.shape[0], max(counts)
    if all(c == largest for c in counts):
        padded = x.view(E, largest, -1)
        out = torch.bmm(padded, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), padded, weight)
        return out.reshape(x.shape[0], -1)
    group = torch.repeat_interleave(torch.arange(E, device=x.device), torch.as_tensor(counts, device=x.device))
    starts = torch.as_tensor([0, *counts[:-1]], device=x.device).cumsum(0)
    position = torch.arange(x.shape[0], device=x.device) - starts[group]
    padded = x.new_zeros(E, largest, x.shape[1])
    padded[group, position] = x
    out = torch.bmm(padded, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), padded, weight)
    return out[group, position]


@runtime_checkable
class GroupedLinear(Protocol):
    """A per-expert linear map on rows grouped by expert (``SharedCentralMPO``): ``(x, counts, bias) -> y``."""

    def __call__(self, x: Tensor, counts: Sequence[int], bias: Tensor | None = None) -> Tensor: ...


def _linear(weight: Tensor | GroupedLinear, x: Tensor, counts: Sequence[int], bias: Tensor | None) -> Tensor:
    if isinstance(weight, Tensor):
        return grouped_matmul(x, weight, counts, bias)
    return weight(x, counts, bias)


def grouped_ffn(
    x: Tensor,
    counts: Sequence[int],
    w1: Tensor | GroupedLinear,
    w2: Tensor | GroupedLinear,
    act: Callable[[Tensor], Tensor],
    *,
    w_gate: Tensor | GroupedLinear | None = None,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    order: Tensor | None = None,
    weight_grad_scale: float = 1.0,
) -> Tensor:
    """``E`` FFNs on rows grouped by expert: ``act(x W1_e + b1_e) W2_e + b2_e``.

    Gated: ``(act(x Wg_e) * (x W1_e + b1_e)) W2_e + b2_e``.

    Args:
        x: ``[N, d]`` sorted by expert; with ``order``, ``[M, d]`` in any order.
        counts: ``E`` group sizes.
        w1, w_gate: ``[E, d, F]`` stacked input-major weights, or a :class:`GroupedLinear`.
        w2: ``[E, F, d_out]`` or a :class:`GroupedLinear`.
        b1: ``[E, F]``; b2: ``[E, d_out]``.
        order: ``[N]`` distinct row ids of ``x``: the rows sorted by expert are ``x[order]``;
            rows of ``x`` it leaves out get zero output and zero gradient (see :func:`chunked_ffn`).
        weight_grad_scale: factor on the gradients of the weights and biases (not of ``x``).

    Returns:
        ``[N, d_out]`` (with ``order``: ``[M, d_out]``, row ``order[i]`` for sorted row ``i``).

    Stacked weights (dense experts) on the per-group path run expert by expert through the
    activation (:func:`chunked_ffn`): no ``[N, F]`` hidden tensor is concatenated and split again,
    and the activation runs on per-expert chunks; grouped linear maps go layer by layer.
    """
    weights = (w1, w2) if w_gate is None else (w1, w2, w_gate)
    num_rows = x.shape[0] if order is None else order.numel()
    if all(isinstance(w, Tensor) for w in weights) and num_rows and not use_padded_bmm(x[:num_rows], counts):
        return chunked_ffn(
            x,
            counts,
            cast(Tensor, w1),
            cast(Tensor, w2),
            act,
            w_gate=cast("Tensor | None", w_gate),
            b1=b1,
            b2=b2,
            order=order,
            weight_grad_scale=weight_grad_scale,
        )
    pad = None if order is None else unused_rows(order, x.shape[0])
    rows = x if order is None else take_rows(x, order, pad)
    # the factor on the parameters' gradients, carried by the rows: / s on the way in, * s on the way out
    if weight_grad_scale != 1.0:
        rows = scale_gradient(rows, 1.0 / weight_grad_scale)
    h = _linear(w1, rows, counts, b1)
    h = act(_linear(w_gate, rows, counts, None)) * h if w_gate is not None else act(h)
    out = _linear(w2, h, counts, b2)
    if weight_grad_scale != 1.0:
        out = scale_gradient(out, weight_grad_scale)
    return out if order is None else place_rows(out, order, pad, x.shape[0])


def chunked_ffn(
    x: Tensor,
    counts: Sequence[int],
    w1: Tensor,
    w2: Tensor,
    act: Callable[[Tensor], Tensor],
    *,
    w_gate: Tensor | None = None,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    order: Tensor | None = None,
    weight_grad_scale: float = 1.0,
) -> Tensor:
    """:func:`grouped_ffn` for stacked weights, one expert at a time from input to output.

    Args:
        x: ``[N, d]`` sorted by expert; with ``order``, ``[M, d]`` in any order.
        counts: ``E`` group sizes summing to ``N``.
        w1, w_gate: ``[E, d, F]``; w2: ``[E, F, d_out]``; b1: ``[E, F]``; b2: ``[E, d_out]``.
        order: ``[N]`` distinct row ids of ``x``; the rows sorted by expert are ``x[order]``.
            Each expert reads its rows where they are (a slice per run of consecutive ids, or a
            gather by id) and writes its output rows back to the same places, so rows that
            arrive in another order (an expert-parallel exchange delivers them grouped by source
            rank) need no sorted copy of ``[N, d]`` and no unsorting one; rows ``order`` leaves
            out (padding) get zero output and zero gradient.
        weight_grad_scale: factor on the gradients of the weights and biases, applied inside
            their GEMMs (expert parallelism divides them by the group size this way); the
            gradient of ``x`` is not scaled.

    Returns:
        ``[N, d_out]`` (with ``order``: ``[M, d_out]``): each expert's rows
        ``act(x_e W1_e + b1_e) W2_e + b2_e`` (gated: ``(act(x_e Wg_e) * (x_e W1_e + b1_e)) W2_e + b2_e``).

    Each expert's output is written straight into its rows of one ``[N, d_out]`` tensor (no
    concatenation); the activation runs on per-expert chunks. With gradients, a custom backward
    does the same: input and weight gradients go straight into their rows and expert slices (no
    concatenation of ``[N, F]`` hiddens, no stacking of ``E`` weight gradients); the activation's
    derivative comes from autograd on the saved pre-activations, so any activation works.
    """
    E = w1.shape[0]
    if len(counts) != E:
        raise ValueError(f"counts has {len(counts)} groups, w1 has {E}")
    counts = [int(c) for c in counts]
    num_rows = x.shape[0] if order is None else order.numel()
    if order is not None and (order.ndim != 1 or order.dtype != torch.int64 or num_rows > x.shape[0]):
        raise ValueError(
            f"order must be a 1-D int64 tensor of at most {x.shape[0]} row ids, got {order.dtype} {tuple(order.shape)}"
        )
    if sum(counts) != num_rows:
        where = "order lists" if order is not None else "x has"
        raise ValueError(f"counts sum to {sum(counts)}, {where} {num_rows} rows")
    layout = _Layout(counts, order, x.shape[0], float(weight_grad_scale))
    tensors = (x, w1, w2, w_gate, b1, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out: Tensor = _ChunkedFFN.apply(x, w1, w2, w_gate, b1, b2, layout, act)
        return out
    with torch.no_grad():
        return _chunked_forward(x, w1, w2, w_gate, b1, b2, layout, act, keep=None)


#: Where one expert's rows are in ``x``: contiguous ``(begin, length)`` pieces, or row ids.
_Where = list[tuple[int, int]] | Tensor


class _Layout:
    """Where each expert's rows are in ``x``: ``counts`` consecutive rows, or rows ``x[order]``.

    An ``order`` on the CPU made of long runs of consecutive ids (an expert-parallel exchange
    delivers each expert's rows as one run per source rank) is cut into those runs: an expert
    reads and writes its rows by slices (a view when it has one run), not by gathering and
    scattering ids (``index_copy_`` is ~3x slower than a slice copy on the CPU).
    """

    #: at most this many runs per expert on average, else the rows are moved by ids
    MAX_RUNS_PER_EXPERT = 4

    def __init__(self, counts: list[int], order: Tensor | None, size: int, weight_grad_scale: float) -> None:
        self.counts, self.size, self.weight_grad_scale = counts, size, weight_grad_scale
        starts = [0, *itertools.accumulate(counts)][:-1]
        self.where: list[_Where] = []
        runs = None if order is None else self._runs(order, starts)
        for e, (begin, n) in enumerate(zip(starts, counts)):
            if order is None:
                self.where.append([(begin, n)])
            elif runs is not None:
                self.where.append(runs[e])
            else:
                self.where.append(order[begin : begin + n])
        # padding rows (not in ``order``): zero in the output and in the input's gradient
        self.pad = None if order is None else unused_rows(order, size)

    def _runs(self, order: Tensor, starts: list[int]) -> list[list[tuple[int, int]]] | None:
        """Each expert's rows as ``(begin, length)`` runs of ``x``, or ``None`` (not on the CPU, too many runs)."""
        n = order.numel()
        if order.device.type != "cpu" or n == 0:
            return None
        breaks = (torch.nonzero(order[1:] - order[:-1] != 1).squeeze(1) + 1).tolist()
        if len(breaks) > self.MAX_RUNS_PER_EXPERT * len(self.counts):
            return None
        cuts = sorted({0, *breaks, *(b for b in starts if 0 < b < n)})
        first = order[cuts].tolist()  # the row of x where each piece begins
        ends = [*cuts[1:], n]
        runs: list[list[tuple[int, int]]] = [[] for _ in self.counts]
        e = 0
        for cut, row, end in zip(cuts, first, ends):
            while e + 1 < len(starts) and cut >= starts[e + 1]:
                e += 1
            runs[e].append((row, end - cut))
        return runs

    def groups(self) -> Iterator[tuple[int, _Where]]:
        """``(expert, where)`` of every expert with rows."""
        for e, n in enumerate(self.counts):
            if n:
                yield e, self.where[e]

    @staticmethod
    def take(t: Tensor, where: _Where) -> Tensor:
        """An expert's rows of ``t``: a view (one run), a concatenation of runs, or a gather by ids."""
        if isinstance(where, Tensor):
            return t.index_select(0, where)
        if len(where) == 1:
            begin, n = where[0]
            return t[begin : begin + n]
        return torch.cat([t[begin : begin + n] for begin, n in where])

    @staticmethod
    def target(out: Tensor, where: _Where) -> Tensor | None:
        """The rows of ``out`` to compute an expert's result into, when they are one run (else ``None``)."""
        if isinstance(where, Tensor) or len(where) != 1:
            return None
        begin, n = where[0]
        return out[begin : begin + n]

    @staticmethod
    def put(out: Tensor, where: _Where, rows: Tensor) -> None:
        """Write an expert's ``rows`` to its rows of ``out`` (nothing to do when computed in place)."""
        if isinstance(where, Tensor):
            out.index_copy_(0, where, rows)
        elif len(where) > 1:
            offset = 0
            for begin, n in where:
                out[begin : begin + n].copy_(rows[offset : offset + n])
                offset += n

    def zero_padding(self, out: Tensor) -> None:
        if self.pad is not None and self.pad.numel():
            out.index_fill_(0, self.pad, 0)


def _chunked_forward(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    w_gate: Tensor | None,
    b1: Tensor | None,
    b2: Tensor | None,
    layout: _Layout,
    act: Callable[[Tensor], Tensor],
    keep: list[tuple[Tensor, Tensor, Tensor | None]] | None,
) -> Tensor:
    """The expert loop; ``keep`` collects each expert's input rows and pre-activations ``(x_e, x W1 + b1, x Wg)``."""
    out = x.new_empty(layout.size, w2.shape[-1])
    for e, where in layout.groups():
        xe = layout.take(x, where)
        a = torch.addmm(b1[e], xe, w1[e]) if b1 is not None else xe @ w1[e]
        g = xe @ w_gate[e] if w_gate is not None else None
        h = act(g) * a if g is not None else act(a)
        rows = layout.target(out, where)
        if b2 is not None:
            rows = torch.addmm(b2[e], h, w2[e], out=rows) if rows is not None else torch.addmm(b2[e], h, w2[e])
        else:
            rows = torch.mm(h, w2[e], out=rows) if rows is not None else torch.mm(h, w2[e])
        layout.put(out, where, rows)
        if keep is not None:
            keep.append((xe, a, g))
    layout.zero_padding(out)
    return out


class _ChunkedFFN(torch.autograd.Function):
    """:func:`chunked_ffn` with a backward that writes every gradient in place (no cat, no stack)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        w2: Tensor,
        w_gate: Tensor | None,
        b1: Tensor | None,
        b2: Tensor | None,
        layout: _Layout,
        act: Callable[[Tensor], Tensor],
    ) -> Tensor:
        keep: list[tuple[Tensor, Tensor, Tensor | None]] = []
        out = _chunked_forward(x, w1, w2, w_gate, b1, b2, layout, act, keep)
        # each expert's input rows are saved (views of x, or the rows it gathered), not x itself: the
        # same numbers once, and a view still refuses a backward after x was modified in place
        ctx.save_for_backward(w1, w2, w_gate, b1, b2, *(xe for xe, _, _ in keep))
        ctx.x_meta = (x.shape, x.dtype, x.device)
        ctx.layout, ctx.act, ctx.keep = layout, act, [(a, g) for _, a, g in keep]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        w1, w2, w_gate, b1, b2, *inputs = ctx.saved_tensors
        layout: _Layout = ctx.layout
        scale = layout.weight_grad_scale
        needs = ctx.needs_input_grad
        shape, dtype, device = ctx.x_meta
        gx = torch.empty(shape, dtype=dtype, device=device) if needs[0] else None
        # every expert with rows writes its whole slice below; only the idle experts' slices are zeroed
        # (a zero-fill of the [E, d, F] gradients was ~10% of a Switch layer's training step)
        gw1 = torch.empty_like(w1) if needs[1] else None
        gw2 = torch.empty_like(w2) if needs[2] else None
        gwg = torch.empty_like(w_gate) if w_gate is not None and needs[3] else None
        gb1 = torch.empty_like(b1) if b1 is not None and needs[4] else None
        gb2 = torch.empty_like(b2) if b2 is not None and needs[5] else None
        for e, n in enumerate(layout.counts):
            if n == 0:
                for grad in (gw1, gw2, gwg, gb1, gb2):
                    if grad is not None:
                        grad[e].zero_()

        def weight_grad(out: Tensor | None, a: Tensor, b: Tensor) -> None:
            if out is None:
                return
            if scale == 1.0:
                torch.mm(a, b, out=out)
            else:  # beta=0 ignores the slice's uninitialised values; alpha scales inside the GEMM
                out.addmm_(a, b, beta=0.0, alpha=scale)

        def bias_grad(out: Tensor | None, g: Tensor) -> None:
            if out is not None:
                torch.sum(g, 0, out=out)
                if scale != 1.0:
                    out.mul_(scale)

        grad_out = grad_out.contiguous()
        pre = iter(zip(inputs, ctx.keep))
        for e, where in layout.groups():
            xe, (a, g) = next(pre)
            go = layout.take(grad_out, where)
            with torch.enable_grad():
                a_ = a.detach().requires_grad_()
                g_ = g.detach().requires_grad_() if g is not None else None
                h_ = ctx.act(g_) * a_ if g_ is not None else ctx.act(a_)
            gh = go @ w2[e].T  # [n, F]
            weight_grad(None if gw2 is None else gw2[e], h_.detach().T, go)
            bias_grad(None if gb2 is None else gb2[e], go)
            gg: Tensor | None = None
            if g_ is not None:
                ga, gg = torch.autograd.grad(h_, [a_, g_], gh)
            else:
                (ga,) = torch.autograd.grad(h_, [a_], gh)
            weight_grad(None if gw1 is None else gw1[e], xe.T, ga)
            bias_grad(None if gb1 is None else gb1[e], ga)
            if gg is not None:
                weight_grad(None if gwg is None else gwg[e], xe.T, gg)
            if gx is not None:
                rows = layout.target(gx, where)
                rows = torch.mm(ga, w1[e].T, out=rows) if rows is not None else torch.mm(ga, w1[e].T)
                if gg is not None:
                    rows.addmm_(gg, w_gate[e].T)
                layout.put(gx, where, rows)
        if gx is not None:
            layout.zero_padding(gx)
        ctx.keep = None
        return gx, gw1, gw2, gwg, gb1, gb2, None, None


class FFNBank(ExpertBank):
    """Shared base of the banks whose experts are FFNs (dense, sliced, MPO): activation, forward, repr.

    Subclasses hold ``w1``, ``w2``, ``w_gate`` (stacked tensors or :class:`GroupedLinear` modules)
    and ``b1``, ``b2`` (``None`` when absent), and set ``d_ff``.
    """

    d_ff: int
    w1: Tensor | nn.Module
    w2: Tensor | nn.Module
    w_gate: Tensor | nn.Module | None
    b1: Tensor | None
    b2: Tensor | None
    act: Callable[[Tensor], Tensor]
    activation_name: str

    def __init__(self) -> None:
        super().__init__()
        #: relative Frobenius error of each matrix against the FFN it was built from
        #: (``{"w1": ..., "w2": ...}``; exact copies 0.0; empty when not built from an FFN)
        self.reconstruction_error: dict[str, float] = {}

    def _set_sizes(self, d_model: int, d_ff: int, num_experts: int, d_out: int | None, activation: Activation) -> None:
        """Validate and set ``num_experts``, ``in_features``, ``d_ff``, ``out_features`` and the activation."""
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.in_features = check_positive_int(d_model, "d_model")
        self.d_ff = check_positive_int(d_ff, "d_ff")
        self.out_features = self.in_features if d_out is None else check_positive_int(d_out, "d_out")
        self._set_activation(activation)

    def _set_activation(self, activation: Activation) -> None:
        self.activation_name = activation_name(activation)
        self.act = get_activation(activation)

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    @property
    def activation(self) -> Activation:
        """The activation as given: its name when ``ACTIVATIONS`` has it, else the callable."""
        return self.activation_name if self.activation_name in ACTIVATIONS else self.act

    def expert_bias(self) -> Tensor | None:
        """``[E, d_out]`` bias each expert adds to its rows (``None``: none, or added elsewhere)."""
        return self.b2

    def forward(
        self, x: Tensor, counts: Sequence[int], *, order: Tensor | None = None, weight_grad_scale: float = 1.0
    ) -> Tensor:
        """``x [N, d]`` sorted by expert, ``counts[e]`` rows each -> ``[N, d_out]``.

        ``order`` and ``weight_grad_scale``: rows in any order and a factor on the parameters'
        gradients, as :func:`grouped_ffn` takes them (expert parallelism passes both).
        """
        return grouped_ffn(
            x,
            counts,
            self.w1,
            self.w2,
            self.act,
            w_gate=self.w_gate,
            b1=self.b1,
            b2=self.expert_bias(),
            order=order,
            weight_grad_scale=weight_grad_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.in_features}, d_ff={self.d_ff}, "
            f"d_out={self.out_features}, activation={self.activation_name!r}, gated={self.gated}, "
            f"bias={self.b1 is not None}"
        )
