"""``TopAnyGate``: DynMoE's top-any gating over pre-allocated expert slots, with its adaptive process.

Each token picks *any* number of experts: expert ``e`` is on for token ``x`` when
``s_e = sigmoid(cos(x, W_e)) * m_e`` exceeds a trainable threshold ``theta_e = sigmoid(G_e)``.
``W [d, M]`` are trainable expert embeddings (orthogonal init), ``G [M]`` threshold logits (init 0)
and ``m [M]`` a non-trained 0/1 mask of the active slots. The forward value of the decision is the
step ``g = 1[s > theta]``; its backward is the gradient of ``relu(s - theta)`` (the authors'
straight-through estimator: ``sign`` is skipped, ``relu`` is not). In training a token may get no
expert at all (its MoE output is zero, only the residual passes); in eval such a token goes to
``argmax_e s_e``. The experts' outputs are averaged: combine weight ``g / k_t`` for the ``k_t``
experts the token activated.

The adaptive process works on the slots, never on the parameters' shapes, so an optimizer built
before training stays valid: while *recording*, the gate counts the tokens each expert got and sums
the inputs of the tokens that got none; :meth:`TopAnyGate.adapt` then deactivates the experts that
got no token and, if some token found no expert, activates one free slot with
``W_e = normalised sum of those inputs`` and ``G_e = 0``. By default this runs by itself in
training forwards: record ``record_steps`` forwards, update, stay idle ``idle_steps`` forwards,
repeat (300 / 300 as in the paper).

Examples:
    >>> gate = TopAnyGate(768, num_experts=16, num_active=8)        # 16 slots, 8 experts live
    >>> layer = MoE(gate, DenseExperts(768, 3072, num_experts=16))   # the bank has one expert per slot
    >>> y = layer(torch.randn(4, 128, 768))
    >>> gate.num_active, sorted(layer.last_routing.aux_losses)
    (8, ['balance', 'diversity', 'efficiency', 'simplicity'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mpolab.utils import check_non_negative_float, check_positive_int

from ..routing import Routing
from .base import Gate, check_finite_logits, check_k

__all__ = ["AUX_TERMS", "AdaptResult", "TopAnyGate"]

#: Names of the auxiliary loss terms a :class:`TopAnyGate` can return.
AUX_TERMS = ("diversity", "simplicity", "balance", "efficiency")


@dataclass(frozen=True)
class AdaptResult:
    """What one :meth:`TopAnyGate.adapt` call changed.

    Attributes:
        removed: slots deactivated because no recorded token reached them.
        added: the slot activated for the tokens that found no expert, or ``None``.
        num_active: active experts after the update.
        unrouted_tokens: recorded tokens that activated no expert.
        recorded_tokens: tokens seen while recording.
    """

    removed: list[int]
    added: int | None
    num_active: int
    unrouted_tokens: int
    recorded_tokens: int


class TopAnyGate(Gate):
    """DynMoE top-any gate over ``num_experts`` pre-allocated slots (see the module docstring).

    Args:
        d_model: token width ``d``.
        num_experts: ``M``, the number of slots; the expert bank must have ``M`` experts (inactive
            slots simply get no tokens).
        num_active: slots active at the start (the first ``num_active``); default all ``M``.
            DynMoE's GLUE recipe starts with 8 of 16.
        aux_loss_weight: coefficient of every auxiliary term (0.01 in the paper).
        aux_terms: which of :data:`AUX_TERMS` to return, each in ``Routing.aux_losses`` under its
            name, already weighted:

            * ``diversity``: ``||(Wh^T Wh - I) * m m^T||_F`` with ``Wh`` the column-normalised ``W``;
            * ``simplicity``: mean over active slots of ``||W_e||``;
            * ``balance``: over tokens with at least one expert, ``n * sum_e me_e * ce_e`` where
              ``me_e`` is the mean of ``g / sum(g)``, ``ce_e`` the fraction of tokens activating ``e``
              and ``n`` the number of active experts (1 at perfect balance);
            * ``efficiency``: ``mean(g)`` over tokens and slots (fewer experts per token).
        adaptive: run the record / update / idle schedule automatically in training forwards.
        record_steps: training forwards recorded before each automatic update (``>= 1``).
        idle_steps: training forwards without recording after each update (``>= 0``).
        device: where to put the parameters.

    Attributes:
        weight: ``W [d, M]`` expert embeddings (fp32, trainable).
        threshold_logits: ``G [M]`` (fp32, trainable); the threshold is ``sigmoid(G)``.
        active: ``[M]`` bool buffer, the mask ``m``.
        record_group: a process group whose ranks hold replicas of this gate (DDP, FSDP2):
            :meth:`adapt` sums their routing records first (one all-reduce), so every replica
            makes the same update. ``None``: this process's records, or the expert-parallel
            group's when :attr:`batch_sum` is set (:func:`mpolab_moe.parallel.expert_parallel`).

    Examples:
        >>> gate = TopAnyGate(64, num_experts=8, num_active=2, record_steps=100, idle_steps=100)
        >>> r = gate.train()(torch.randn(32, 64))
        >>> r.expert_index.shape[0], int(r.experts_per_token.max()) <= 2
        (32, True)
        >>> gate.start_recording(); _ = gate(torch.randn(32, 64)); result = gate.adapt()   # by hand
        >>> result.removed, result.added, gate.num_active                # e.g. ([], 2, 3)
    """

    fp32_tensors = ("weight", "threshold_logits", "unrouted_sum")
    # buffers (registered in __init__)
    active: Tensor
    routed_counts: Tensor
    unrouted_sum: Tensor

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        num_active: int | None = None,
        aux_loss_weight: float = 0.01,
        aux_terms: Sequence[str] = AUX_TERMS,
        adaptive: bool = True,
        record_steps: int = 300,
        idle_steps: int = 300,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("record_steps", record_steps)):
            check_positive_int(value, name)
        if not isinstance(idle_steps, int) or isinstance(idle_steps, bool) or idle_steps < 0:
            raise ValueError(f"idle_steps must be an int >= 0, got {idle_steps!r}")
        num_active = check_k(num_experts if num_active is None else num_active, num_experts, "num_active")
        check_non_negative_float(aux_loss_weight, "aux_loss_weight")
        if isinstance(aux_terms, str):
            aux_terms = (aux_terms,)
        unknown = [t for t in aux_terms if t not in AUX_TERMS]
        if unknown:
            raise ValueError(f"unknown aux_terms {unknown}; valid: {list(AUX_TERMS)}")
        self.d_model, self.num_experts = d_model, num_experts
        self.aux_loss_weight, self.aux_terms = float(aux_loss_weight), tuple(aux_terms)
        self.adaptive, self.record_steps, self.idle_steps = adaptive, record_steps, idle_steps
        self.weight = nn.Parameter(torch.empty(d_model, num_experts, device=device, dtype=torch.float32))
        self.threshold_logits = nn.Parameter(torch.zeros(num_experts, device=device, dtype=torch.float32))
        active = torch.zeros(num_experts, dtype=torch.bool, device=device)
        active[:num_active] = True
        self.register_buffer("active", active)
        # routing records (not saved in the state dict: they describe a window of training forwards)
        counts = torch.zeros(num_experts, dtype=torch.long, device=device)
        self.register_buffer("routed_counts", counts, persistent=False)
        self.register_buffer("unrouted_sum", torch.zeros(d_model, device=device), persistent=False)
        self.recording = False
        self.recorded_forwards = 0
        self.recorded_tokens = 0
        self.unrouted_tokens = 0
        #: training forwards seen by the automatic schedule
        self.schedule_step = 0
        self.record_group: Any = None
        self.history: list[AdaptResult] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``W`` orthogonal (orthonormal columns when ``M <= d``), ``G = 0``."""
        with torch.no_grad():
            rows = nn.init.orthogonal_(torch.empty(self.num_experts, self.d_model, device=self.weight.device))
            self.weight.copy_(rows.T)
            self.threshold_logits.zero_()

    # ------------------------------------------------------------------ state
    @property
    def num_active(self) -> int:
        """Number of active experts (slots with ``m = 1``)."""
        return int(self.active.sum())

    @property
    def active_experts(self) -> Tensor:
        """``[num_active]`` indices of the active slots."""
        return self.active.nonzero().flatten()

    @property
    def thresholds(self) -> Tensor:
        """``[M]`` per-expert thresholds ``sigmoid(G)``."""
        return torch.sigmoid(self.threshold_logits)

    def scores(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> ``s [T, M] = sigmoid(cos(x, W_e)) * m`` in fp32 (zero for inactive slots)."""
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"gate expects tokens [T, d_model={self.d_model}], got {tuple(x.shape)}")
        h = x.float()
        # divide the [T, M] product by ||x|| rather than normalising x [T, d]: same value, far less
        # elementwise work in the backward (the same eps as F.normalize)
        cos = (h @ F.normalize(self.weight.float(), dim=0)) / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        check_finite_logits(cos, type(self).__name__)
        # a fresh float copy of the mask: adapt() may flip the buffer before this graph is used
        return torch.sigmoid(cos) * self.active.to(cos.dtype)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Routing:
        if self.training and self.adaptive:
            self._schedule_before_forward()
        s = self.scores(x)
        z = F.relu(s - self.thresholds.float())
        hard = (z > 0).to(s.dtype)
        if self.recording:
            self._record(x, hard)
        g = hard + (z - z.detach())  # value: step(s - theta); gradient: that of relu(s - theta)
        if not self.training:
            g, hard = self._eval_fallback(s, g, hard)
        k_t = hard.sum(-1, keepdim=True)
        combine = g / k_t.clamp(min=1)
        index = torch.where(hard > 0, torch.arange(self.num_experts, device=s.device), -1)
        index, combine = self._compact(index, combine, hard, int(k_t.max()) if k_t.numel() else 0)
        aux = self._aux_losses(g, hard) if self.aux_loss_weight and self.aux_terms else {}
        if self.training and self.adaptive:
            self.schedule_step += 1
        return Routing(index, combine, self.num_experts, aux_losses=aux, probs=s.detach())

    def _eval_fallback(self, s: Tensor, g: Tensor, hard: Tensor) -> tuple[Tensor, Tensor]:
        """A token with no expert goes to ``argmax_e s_e`` with weight 1."""
        none = hard.sum(-1) == 0
        if not bool(none.any()):
            return g, hard
        if self.num_active == 0:
            raise ValueError("TopAnyGate has no active expert; activate one (gate.active[e] = True) or call adapt()")
        fallback = F.one_hot(s.argmax(-1), self.num_experts).to(s.dtype) * none.unsqueeze(-1).to(s.dtype)
        return g + fallback, hard + fallback

    @staticmethod
    def _compact(index: Tensor, combine: Tensor, hard: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
        """Keep ``max(k_t, 1)`` columns: chosen slots first, ``-1`` padding after."""
        M = index.shape[1]
        k_max = max(k_max, 1)
        if k_max >= M:
            return index, combine
        order = hard.argsort(dim=-1, descending=True, stable=True)[:, :k_max]
        return index.gather(1, order), combine.gather(1, order)

    def _aux_losses(self, g: Tensor, hard: Tensor) -> dict[str, Tensor]:
        w = self.aux_loss_weight
        m = self.active.to(g.dtype)
        n_active = m.sum().clamp(min=1)
        W = self.weight.float()
        aux: dict[str, Tensor] = {}
        if "diversity" in self.aux_terms:
            Wh = F.normalize(W, dim=0)
            eye = torch.eye(self.num_experts, device=W.device, dtype=W.dtype)
            aux["diversity"] = w * torch.linalg.matrix_norm((Wh.T @ Wh - eye) * torch.outer(m, m))
        if "simplicity" in self.aux_terms:
            aux["simplicity"] = w * (W.norm(dim=0) * m).sum() / n_active
        if "balance" in self.aux_terms:
            routed = hard.sum(-1) > 0
            if self.batch_sum is not None:  # over every process's tokens (all ranks run the collective)
                gr = g[routed]
                share = (gr / gr.sum(-1, keepdim=True)).sum(0)
                total = self.batch_sum(torch.cat([share, hard[routed].sum(0), g.new_tensor([float(gr.shape[0])])]))
                E, n = self.num_experts, total[-1].detach()
                me, ce = total[:E] / n.clamp(min=1), total[E : 2 * E].detach() / n.clamp(min=1)
                aux["balance"] = w * n_active * (me * ce).sum()
            elif bool(routed.any()):
                gr = g[routed]
                me = (gr / gr.sum(-1, keepdim=True)).mean(0)
                ce = hard[routed].mean(0)
                aux["balance"] = w * n_active * (me * ce).sum()
            else:
                aux["balance"] = g.sum() * 0
        if "efficiency" in self.aux_terms:
            aux["efficiency"] = w * g.mean() if g.numel() else g.sum() * 0
        return aux

    # --------------------------------------------------------------- records
    def start_recording(self) -> None:
        """Clear the routing records and record every following forward (train or eval)."""
        self.reset_records()
        self.recording = True

    def stop_recording(self) -> None:
        """Stop recording; the records are kept for :meth:`adapt`."""
        self.recording = False

    def reset_records(self) -> None:
        """Clear per-expert token counts and the sum of inputs that found no expert."""
        self.routed_counts.zero_()
        self.unrouted_sum.zero_()
        self.recorded_forwards = self.recorded_tokens = self.unrouted_tokens = 0

    @torch.no_grad()
    def _record(self, x: Tensor, hard: Tensor) -> None:
        # the threshold rule's decision, before the eval fallback: that is what adapting is about
        self.routed_counts += hard.sum(0).long()
        none = hard.sum(-1) == 0
        if bool(none.any()):
            self.unrouted_sum += x[none].float().sum(0)
            self.unrouted_tokens += int(none.sum())
        self.recorded_forwards += 1
        self.recorded_tokens += x.shape[0]

    def _schedule_before_forward(self) -> None:
        """Automatic schedule: forwards ``n`` with ``n % (R + I) < R`` record; the update runs at the
        start of the forward after the last recorded one (never under a live graph of this gate)."""
        R, cycle = self.record_steps, self.record_steps + self.idle_steps
        n = self.schedule_step
        if n > 0 and n % cycle == R % cycle and self.recorded_tokens > 0:
            self.adapt()
        if n % cycle == 0:
            self.start_recording()
        elif n % cycle >= R:
            self.recording = False

    # ---------------------------------------------------------------- adapt
    @torch.no_grad()
    def adapt(self, optimizer: torch.optim.Optimizer | None = None) -> AdaptResult:
        """Apply DynMoE's update from the routing records, then clear them and stop recording.

        Deactivates every active expert that got no recorded token; if some recorded token found no
        expert, activates the first free slot ``e`` with ``W_e = u / ||u||`` (``u``: sum of those
        tokens' inputs) and ``G_e = 0`` (at most one per update). Parameters keep their shapes and
        identities; pass ``optimizer`` to also zero that slot's optimizer moments (Adam's
        ``exp_avg`` etc.), which otherwise carry over from the slot's previous life.

        Raises:
            ValueError: when nothing was recorded since the last update (call :meth:`start_recording`
                and run forwards first, or let the automatic schedule do it).
        """
        self._sum_records_over_ranks()
        if self.recorded_forwards == 0 or self.recorded_tokens == 0:
            raise ValueError(
                "TopAnyGate.adapt() needs routing records: call gate.start_recording() and run forwards "
                "first (or keep adaptive=True and let training forwards record)"
            )
        before = self.active.clone()
        used = self.routed_counts > 0
        after = before & used
        added: int | None = None
        norm = self.unrouted_sum.norm()
        if self.unrouted_tokens > 0 and bool(norm > 0):
            free = (~after).nonzero().flatten()
            if free.numel():
                added = int(free[0])
                after[added] = True
                self.weight.data[:, added] = (self.unrouted_sum / norm).to(self.weight.dtype)
                self.threshold_logits.data[added] = 0.0
                if optimizer is not None:
                    self._reset_optimizer_slot(optimizer, added)
        removed = (before & ~used).nonzero().flatten().tolist()
        if not bool(after.any()):
            after, removed = before, []  # nothing would be left: keep the experts (no token reached any)
        self.active.copy_(after)
        result = AdaptResult(removed, added, self.num_active, self.unrouted_tokens, self.recorded_tokens)
        self.history.append(result)
        self.reset_records()
        self.recording = False
        return result

    def _sum_records_over_ranks(self) -> None:
        """Replace this rank's routing records by the sum over :attr:`record_group` (or the ``batch_sum`` group).

        Every rank of the group must call :meth:`adapt` at the same point (the automatic schedule
        does: it counts training forwards, which replicas and expert-parallel ranks run in step).
        """
        if self.record_group is None and self.batch_sum is None:
            return
        packed = torch.cat(
            [
                self.routed_counts.double(),
                self.unrouted_sum.double(),
                self.routed_counts.new_tensor([self.recorded_tokens, self.unrouted_tokens]).double(),
            ]
        )
        if self.record_group is not None:
            dist.all_reduce(packed, group=self.record_group)
            total = packed
        else:
            assert self.batch_sum is not None
            total = self.batch_sum(packed)
        E = self.num_experts
        self.routed_counts.copy_(total[:E].round().long())
        self.unrouted_sum.copy_(total[E:-2].to(self.unrouted_sum.dtype))
        self.recorded_tokens, self.unrouted_tokens = (int(v) for v in total[-2:].round().tolist())

    def _reset_optimizer_slot(self, optimizer: torch.optim.Optimizer, slot: int) -> None:
        for param, dim in ((self.weight, 1), (self.threshold_logits, 0)):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.select(dim, slot).zero_()

    def extra_repr(self) -> str:
        schedule = f"record={self.record_steps}, idle={self.idle_steps}" if self.adaptive else "manual"
        return (
            f"d_model={self.d_model}, slots={self.num_experts}, active={self.num_active}, "
            f"aux_loss_weight={self.aux_loss_weight}, adaptive: {schedule}"
        )
