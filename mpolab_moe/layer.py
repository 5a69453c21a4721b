"""``MoE(gate, experts)``: the one mixture-of-experts layer every gate and expert bank plugs into."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from .experts.base import Capability, ExpertBank, SoftBank
from .gates.base import BankBoundGate, Gate
from .routing import Routing, RoutingStats
from .rows import combine_rows

__all__ = ["ExchangingBank", "MoE", "aux_loss", "check_pair", "moe_layers"]


@runtime_checkable
class ExchangingBank(Protocol):
    """A bank whose experts live in several processes (:class:`mpolab_moe.parallel.ExpertParallelBank`).

    :class:`MoE` hands it the tokens, which token each routed row is (sorted by expert) and its
    combine weight, with what a plain bank does not need: the capacity (a fixed-size exchange),
    this process's routing statistics to sum over the group, and a fingerprint of the layer's
    routing configuration that every rank must share. The bank gathers the rows and combines
    their outputs itself, in whatever layout its exchange wants.
    """

    def exchange_forward(
        self,
        tokens: Tensor,
        token: Tensor | None,
        weight: Tensor | None,
        counts: list[int],
        *,
        capacity: int | None,
        stats: Sequence[int],
        config: Sequence[tuple[str, int]],
    ) -> tuple[Tensor, Tensor]:
        """``tokens [T, d]``, ``token [N]`` (sorted by expert), ``weight [N]`` -> ``([T, d_out], [E + len(stats)])``:
        the tokens' combined outputs, and the group's rows per expert and ``stats`` summed."""
        ...


def check_pair(gate: Gate, experts: ExpertBank, *, capacity_factor: float | None = None) -> None:
    """Refuse a gate/bank pair that cannot work, naming both and the reason.

    Checks: ``gate`` is a :class:`~mpolab_moe.gates.base.Gate` and ``experts`` an
    :class:`~mpolab_moe.experts.base.ExpertBank`; they agree on ``E`` and ``d``; the bank has every
    capability ``gate.requires()``; ``capacity_factor`` is ``None`` or ``> 0``, and ``None`` for a
    soft gate (capacity limits the tokens each expert takes, while soft routing gives every token
    to every expert: there is nothing to drop, and a cap would silently turn soft merging off).

    Raises:
        TypeError: not a gate / not a bank / a missing capability.
        ValueError: sizes that disagree, a bad ``capacity_factor``, capacity with a soft gate.

    Examples:
        >>> check_pair(AvgKGate(16, 4, k=2), DenseExperts(16, 32, 4))
        Traceback (most recent call last):
        TypeError: AvgKGate cannot route DenseExperts: the gate needs KEYS, which DenseExperts lacks ...
    """
    if not isinstance(gate, Gate):
        raise TypeError(
            f"gate must be a Gate (TopKGate, AvgKGate, TopAnyGate, SoftMergeGate, ...), got {type(gate).__name__}"
        )
    if not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be an ExpertBank (DenseExperts, MPOExperts, ...), got {type(experts).__name__}")
    g, b = type(gate).__name__, type(experts).__name__
    if gate.num_experts != experts.num_experts:
        raise ValueError(f"{g} routes to {gate.num_experts} experts but the bank has {experts.num_experts}")
    if gate.d_model != experts.in_features:
        raise ValueError(f"{g} expects d_model={gate.d_model} but the experts take {experts.in_features}")
    missing = gate.requires() - experts.capabilities
    if missing:
        names = ", ".join(sorted(c.name for c in missing))
        has = ", ".join(sorted(c.name for c in experts.capabilities)) or "none"
        raise TypeError(
            f"{g} cannot route {b}: the gate needs {names}, which {b} lacks (its capabilities: {has}); "
            "use a bank that has them (SlicedExperts has KEYS and NEURON_GROUPS)"
        )
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be None (dropless) or a number > 0, got {capacity_factor!r}")
        if gate.soft:
            raise ValueError(
                f"capacity_factor={capacity_factor} with the soft gate {g}: soft routing gives every token to every "
                "expert, so a capacity would drop merges at random; leave capacity_factor=None"
            )


class MoE(nn.Module):
    """Mixture-of-experts layer: ``x [..., d] -> [..., d_out]``.

    The forward flattens tokens to ``[T, d]``, asks the gate for a :class:`~mpolab_moe.Routing`,
    sorts the (token, expert) assignments by expert (a stable sort, so each expert sees its tokens
    in order, first choices before second choices), hands the expert bank one contiguous group per
    expert, and scatter-adds the weighted outputs back. Dropless by default; with
    ``capacity_factor`` each expert takes at most ``ceil(k * capacity_factor * T / E)`` assignments
    (GShard: earlier choices and earlier tokens first) and the rest are dropped: their
    contribution is zero, so with a residual connection around the layer the token passes through
    unchanged. The capacity applies **in training only** by default: in eval mode a token's output
    would otherwise depend on which other sequences share its batch; pass ``capacity_in_eval=True``
    to drop at inference too (e.g. to bound the work per expert). Soft routing (MoV, MoLoRA) goes
    to the bank's ``forward_soft`` when it has one (``Capability.SOFT``), else every expert runs on
    every token; it takes no capacity.

    The pair is checked when the layer is built (:func:`check_pair`): a gate that needs a bank
    capability the bank lacks is refused with the reason. A
    :class:`~mpolab_moe.gates.base.BankBoundGate` is then bound to the bank.

    After each forward, :attr:`aux_loss` holds the gate's weighted auxiliary losses (a scalar
    tensor with gradient, or ``None``) and :attr:`last_stats` a :class:`RoutingStats` (over every
    rank's tokens when the bank is expert-parallel, :mod:`mpolab_moe.parallel`).
    ``copy.deepcopy`` and pickling leave out :attr:`aux_loss` and :attr:`last_routing` (they hold
    the last forward's autograd graph), so a copy (EMA, teacher) starts with ``None`` there.

    Args:
        gate: a :class:`~mpolab_moe.gates.base.Gate`.
        experts: an :class:`~mpolab_moe.experts.base.ExpertBank` with the gate's ``num_experts``.
        capacity_factor: ``None`` (dropless) or ``> 0`` (sparse gates only).
        capacity_in_eval: apply ``capacity_factor`` in eval mode too (default ``False``: inference
            is dropless, so outputs do not depend on batch composition).

    Examples:
        >>> layer = MoE(TopKGate(768, 8, k=1), DenseExperts(768, 3072, 8))    # Switch
        >>> y = layer(torch.randn(4, 128, 768))
        >>> layer.last_stats.tokens_per_expert.sum()
        tensor(512)
    """

    def __init__(
        self,
        gate: Gate,
        experts: ExpertBank,
        *,
        capacity_factor: float | None = None,
        capacity_in_eval: bool = False,
    ) -> None:
        super().__init__()
        check_pair(gate, experts, capacity_factor=capacity_factor)
        if not isinstance(capacity_in_eval, bool):
            raise TypeError(f"capacity_in_eval must be True or False, got {capacity_in_eval!r}")
        self.gate, self.experts, self.capacity_factor = gate, experts, capacity_factor
        self.capacity_in_eval = capacity_in_eval
        if isinstance(gate, BankBoundGate):
            gate.bind(experts)
        self.aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor the next forward applies: ``None`` in eval unless ``capacity_in_eval``."""
        if self.training or self.capacity_in_eval:
            return self.capacity_factor
        return None

    def __getstate__(self) -> dict[str, object]:
        """The module's state without the last forward's graph (``aux_loss``, ``last_routing``).

        Those tensors are non-leaf nodes of an autograd graph after a training forward, which
        ``copy.deepcopy`` refuses; a copy starts without them, as a fresh layer does.
        """
        state = dict(super().__getstate__())
        state["aux_loss"] = None
        state["last_routing"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        d = self.experts.in_features
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"MoE expects floating-point hidden states [..., {d}], got {what}")
        if x.ndim == 0 or x.shape[-1] != d:
            raise ValueError(f"MoE expects inputs [..., {d}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, d)
        routing = self.gate(tokens)
        if routing.num_tokens != tokens.shape[0] or routing.num_experts != self.num_experts:
            raise ValueError(
                f"{type(self.gate).__name__} routed {routing.num_tokens} tokens over {routing.num_experts} experts; "
                f"expected {tokens.shape[0]} over {self.num_experts}"
            )
        if routing.is_soft and self.experts.has(Capability.SOFT):
            out = self._soft(tokens, routing)
        else:
            out = self._sparse(tokens, routing.as_sparse())
        bias = self.experts.output_bias
        if bias is not None:
            out = out + bias
        self.aux_loss = routing.aux_loss
        self.last_routing = routing
        return out.reshape(*lead, out.shape[-1])

    def _soft(self, tokens: Tensor, routing: Routing) -> Tensor:
        weight = routing.soft_weight
        assert weight is not None
        # _soft runs only for banks declaring Capability.SOFT, which guarantees forward_soft (checked at class creation)
        out = cast(SoftBank, self.experts).forward_soft(tokens, weight)
        used = (weight != 0).sum(0).detach()
        self._record(routing, used, dropped=0, without=int((weight == 0).all(-1).sum()))
        return out

    def _sparse(self, tokens: Tensor, routing: Routing) -> Tensor:
        index, weight = routing.expert_index, routing.combine_weight
        assert index is not None and weight is not None
        T, k = index.shape
        E = self.num_experts
        # slot-major order: every token's first choice precedes any second choice (GShard priority)
        flat_index = index.t().reshape(-1)
        flat_weight = weight.t().reshape(-1)
        flat_token = torch.arange(T, device=tokens.device).repeat(k)
        valid = flat_index >= 0
        if not bool(valid.all()):
            flat_index, flat_weight, flat_token = flat_index[valid], flat_weight[valid], flat_token[valid]
        if flat_index.numel() and int(flat_index.max()) >= E:
            raise ValueError(f"{type(self.gate).__name__} returned expert id {int(flat_index.max())} >= E={E}")
        order = torch.argsort(flat_index, stable=True)
        expert, token, combine = flat_index[order], flat_token[order], flat_weight[order]
        counts = torch.bincount(expert, minlength=E)
        dropped, capacity = 0, None
        capacity_factor = self.active_capacity_factor
        if capacity_factor is not None:
            capacity = math.ceil(k * capacity_factor * T / E)
            starts = counts.cumsum(0) - counts
            keep = torch.arange(expert.numel(), device=expert.device) - starts[expert] < capacity
            dropped = int((~keep).sum())
            if dropped:
                expert, token, combine = expert[keep], token[keep], combine[keep]
                counts = counts.clamp(max=capacity)
        reached = torch.zeros(T, dtype=torch.bool, device=tokens.device)
        reached[token] = True
        without = int((~reached).sum())
        if isinstance(self.experts, ExchangingBank):  # every rank must call it, even with no rows
            out, totals = self.experts.exchange_forward(
                tokens,
                token,
                combine,
                counts.tolist(),
                capacity=capacity,
                stats=[dropped, without, T],
                config=self._config_fingerprint(),
            )
            self._record(
                routing, totals[:E], dropped=int(totals[E]), without=int(totals[E + 1]), num_tokens=int(totals[E + 2])
            )
            return out
        if token.numel() == 0:  # an empty batch, or no token routed: no bank call on empty groups
            out = self._zeros_in_graph(tokens, T)
        else:
            out = combine_rows(self.experts(tokens.index_select(0, token), counts.tolist()), token, combine, T)
        self._record(routing, counts.detach(), dropped=dropped, without=without)
        return out

    def _zeros_in_graph(self, tokens: Tensor, num_tokens: int) -> Tensor:
        """``[T, d_out]`` zeros that, when grad is on, depend on every trainable parameter (with weight 0).

        A layer where no token reaches any expert (DynMoE's top-any gate allows it in training) would
        otherwise leave the gate and the bank out of the graph, and DDP with
        ``find_unused_parameters=False`` fails on the next step (parameters that received no gradient).
        Here they receive zero gradients, as unrouted experts of a stacked bank do.
        """
        out = tokens.new_zeros(num_tokens, self.experts.out_features)
        params = [p for p in self.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and params:
            out = out + 0.0 * torch.stack([p.sum() for p in params]).sum().to(out.dtype)
        return out

    def _config_fingerprint(self) -> list[tuple[str, int]]:
        """What every rank of an expert group must agree on (name, value): gate, capacity, train/eval mode."""
        gate = f"{type(self.gate).__qualname__}({self.gate.extra_repr()})"
        return [
            ("the gate's configuration", zlib.crc32(gate.encode())),
            ("capacity_factor", zlib.crc32(self.extra_repr().encode())),
            ("train/eval mode", int(self.training)),
        ]

    def _record(
        self, routing: Routing, counts: Tensor, *, dropped: int, without: int, num_tokens: int | None = None
    ) -> None:
        self.last_stats = RoutingStats(
            tokens_per_expert=counts.cpu(),
            dropped=dropped,
            tokens_without_expert=without,
            num_tokens=routing.num_tokens if num_tokens is None else num_tokens,
            aux_losses={name: float(v.detach()) for name, v in routing.aux_losses.items()},
        )

    def extra_repr(self) -> str:
        if self.capacity_factor is None:
            return "dropless"
        where = "training and eval" if self.capacity_in_eval else "training only"
        return f"capacity_factor={self.capacity_factor} ({where})"


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every :class:`MoE` in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses of every :class:`MoE` layer in ``model`` from its latest forward.

    Add it to the task loss (``loss = task_loss + 0.01 * aux_loss(model)``); a zero tensor when the
    model has no MoE layer or no gate with aux losses.

    Examples:
        >>> loss = out.loss + 0.01 * aux_loss(model)
    """
    terms = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    if not terms:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=None if ref is None else ref.device)
    return torch.stack([t.float() for t in terms]).sum()
