"""MoEfication routers for a :class:`~mpolab_moe.experts.sliced.SlicedExperts` bank.

Each router picks ``k`` of the ``E`` neuron groups per token and gives them combine weight 1: the
layer adds the selected experts' outputs unweighted, so the output is the dense FFN with the other
groups' neurons zeroed.

* :class:`GroundTruthGate`: the oracle, top-k by each expert's activation mass (it computes the
  whole dense hidden layer, so it saves nothing: an upper bound to compare routers against);
* :class:`SimilarityGate`: nearest expert centers (mean normalised key rows) to the normalised token;
* :class:`MLPGate` + :func:`train_mlp_gate`: MoEfication's learned router;
* :func:`activation_mass_captured`: the fraction of the activation mass a routing keeps.

"Activation mass" of a token on expert ``e`` is ``sum_{i in e} activity_i`` with
:meth:`SlicedExperts.activity`: the positive part of ``act(x W1 + b1)`` (ReLU's activation itself,
as in MoEfication; for GELU the negative lobe, never below -0.17, is ignored), and for gated FFNs
(SwiGLU, gated GELU) the magnitude ``|act(x Wg) * (x W1)|`` of the intermediate activation, since
the up branch can flip the sign of what the gate lets through.

Examples:
    >>> bank = SlicedExperts.from_ffn(FFNWeights(w1, w2, b1=b1, b2=b2, activation="gelu"), balanced_kmeans(w1, 16))
    >>> gate = MLPGate.from_bank(bank, k=4)
    >>> train_mlp_gate(gate, bank, recorded_inputs)
    >>> layer = MoE(gate, bank)
    >>> activation_mass_captured(bank, held_out_inputs, gate)
    0.71
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpolab.utils import check_fraction, check_positive_int

from ..experts.base import Capability, ExpertBank, KeyedBank, NeuronGroupBank
from ..routing import Routing
from .base import BankBoundGate, Gate, check_finite_logits, check_k

__all__ = [
    "GroundTruthGate",
    "MLPGate",
    "MLPGateTraining",
    "SimilarityGate",
    "activation_mass_captured",
    "expert_activation_mass",
    "expert_centers",
    "train_mlp_gate",
]


def _check_bank(bank: object) -> NeuronGroupBank:
    if not isinstance(bank, ExpertBank) or not bank.has(Capability.NEURON_GROUPS):
        raise TypeError(
            "MoEfication routers need a bank split into neuron groups (Capability.NEURON_GROUPS: "
            f"SlicedExperts), got {type(bank).__name__}"
        )
    return cast(NeuronGroupBank, bank)


def _check_tokens(x: Tensor, d_model: int, where: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != d_model:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where} expects hidden states [N, {d_model}], got {shape}")


def _top_k_routing(scores: Tensor, k: int, num_experts: int) -> Routing:
    """Top-k of ``scores [T, E]`` (largest first), every combine weight 1."""
    index = scores.topk(k, dim=-1).indices
    return Routing(index, torch.ones(index.shape, dtype=torch.float32, device=scores.device), num_experts)


def expert_activation_mass(bank: NeuronGroupBank, x: Tensor) -> Tensor:
    """Each expert's activation mass for each token: ``x [T, d]`` -> ``[T, E]`` (``>= 0``, no gradient)."""
    _check_tokens(x, _check_bank(bank).in_features, "expert_activation_mass")
    with torch.no_grad():
        return bank.activity(x.to(bank.keys().dtype)).sum(-1)


def expert_centers(bank: ExpertBank) -> Tensor:
    """``[E, d]``: the mean of each expert's L2-normalised key rows (a bank with ``Capability.KEYS``)."""
    if not isinstance(bank, ExpertBank) or not bank.has(Capability.KEYS):
        raise TypeError(
            f"expert centers need a bank with keys (Capability.KEYS: SlicedExperts), got {type(bank).__name__}"
        )
    return F.normalize(cast(KeyedBank, bank).keys().detach().float(), dim=-1).mean(1)


class GroundTruthGate(BankBoundGate):
    """Oracle router: the ``k`` experts with the largest activation mass for each token.

    Computes the full dense intermediate activation to choose, so it is an upper bound for the
    other routers, not a way to save compute. Combine weights are 1.

    Args:
        bank: the :class:`SlicedExperts` it routes for (not registered as a submodule: the MoE layer
            owns it; :meth:`bind` follows the layer's bank).
        k: experts per token.

    Requires ``Capability.NEURON_GROUPS`` of the layer's bank.

    Examples:
        >>> layer = MoE(GroundTruthGate(bank, k=4), bank)
    """

    def __init__(self, bank: ExpertBank, k: int) -> None:
        super().__init__()
        _check_bank(bank)
        self.num_experts, self.d_model = bank.num_experts, bank.in_features
        self.k = check_k(k, bank.num_experts)
        self._bank = [bank]  # a list keeps nn.Module from registering the bank twice

    @property
    def bank(self) -> ExpertBank:
        return self._bank[0]

    def requires(self) -> frozenset[Capability]:
        return frozenset({Capability.NEURON_GROUPS})

    def bind(self, experts: ExpertBank) -> None:
        """Route for the layer's bank from now on (must have this gate's shape)."""
        bank = _check_bank(experts)
        if (bank.num_experts, bank.in_features) != (self.num_experts, self.d_model):
            raise ValueError(f"bank has {bank.num_experts} experts of width {bank.in_features}; gate expects "
                             f"{self.num_experts} of {self.d_model}")  # fmt: skip
        self._bank = [experts]

    def forward(self, x: Tensor) -> Routing:
        """``x [T, d]`` -> top-k :class:`Routing` with weight 1."""
        _check_tokens(x, self.d_model, type(self).__name__)
        with torch.no_grad():
            scores = expert_activation_mass(_check_bank(self.bank), x).float()
        check_finite_logits(scores, type(self).__name__)
        return _top_k_routing(scores, self.k, self.num_experts)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"


class SimilarityGate(BankBoundGate):
    """Route to the ``k`` experts whose center is nearest the normalised token (MoEfication).

    ``center_e`` = mean of expert ``e``'s L2-normalised key rows (:func:`expert_centers`); a token picks
    the ``k`` smallest ``||x / ||x|| - center_e||``. No parameters; :meth:`refresh` re-derives the
    centers after the bank's weights change. Combine weights are 1. In a layer whose bank has keys
    the centers follow that bank (:meth:`bind`); with another bank (dense, MPO) the centers of the
    bank given here stay.

    Examples:
        >>> layer = MoE(SimilarityGate(bank, k=4), bank)
    """

    centers: Tensor

    def __init__(self, bank: ExpertBank, k: int) -> None:
        super().__init__()
        self.register_buffer("centers", expert_centers(bank))
        self.num_experts, self.d_model = bank.num_experts, bank.in_features
        self.k = check_k(k, bank.num_experts)

    def refresh(self, bank: ExpertBank) -> None:
        """Recompute the centers from ``bank``'s current keys."""
        self.centers = expert_centers(bank).to(self.centers.device)

    def bind(self, experts: ExpertBank) -> None:
        """Follow the layer's bank when it has keys."""
        if experts.has(Capability.KEYS):
            self.refresh(experts)

    def forward(self, x: Tensor) -> Routing:
        """``x [T, d]`` -> top-k :class:`Routing` with weight 1."""
        _check_tokens(x, self.d_model, type(self).__name__)
        xn = F.normalize(x.detach().float(), dim=-1)
        dist2 = self.centers.square().sum(-1) - 2 * xn @ self.centers.T  # ||xn - c||^2 - 1
        check_finite_logits(dist2, type(self).__name__)
        return _top_k_routing(-dist2, self.k, self.num_experts)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"


class MLPGate(Gate):
    """MoEfication's learned router ``Linear(d, E) -> tanh -> Linear(E, E)`` (no biases), top-k, weight 1.

    The token is L2-normalised first (as the similarity router and the authors' training do).
    Initialised with the expert centers as the first layer's rows (when ``centers`` is given, or via
    :meth:`from_bank`) and the identity as the second; trained by :func:`train_mlp_gate` to predict
    which experts carry a token's activation mass.

    Args:
        d_model: token width ``d``; num_experts: ``E``; k: experts per token.
        centers: ``[E, d]`` initial first-layer rows (:func:`expert_centers`), else ``nn.Linear``'s init.

    Examples:
        >>> gate = MLPGate.from_bank(bank, k=4)
        >>> train_mlp_gate(gate, bank, recorded_inputs)
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, centers: Tensor | None = None) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.k = check_k(k, num_experts)
        self.fc1 = nn.Linear(d_model, num_experts, bias=False)
        self.fc2 = nn.Linear(num_experts, num_experts, bias=False)
        with torch.no_grad():
            self.fc2.weight.copy_(torch.eye(num_experts))
            if centers is not None:
                if centers.shape != (num_experts, d_model):
                    raise ValueError(f"centers must be [{num_experts}, {d_model}], got {tuple(centers.shape)}")
                self.fc1.weight.copy_(centers)

    @classmethod
    def from_bank(cls, bank: ExpertBank, k: int) -> MLPGate:
        """An untrained router for ``bank``, first layer = :func:`expert_centers`."""
        centers = expert_centers(bank)
        return cls(bank.in_features, bank.num_experts, k, centers=centers).to(centers.device)

    def logits(self, x: Tensor) -> Tensor:
        """``x [T, d]`` -> ``[T, E]`` scores (BCE logits of "expert e carries mass") of the normalised ``x``."""
        _check_tokens(x, self.d_model, type(self).__name__)
        return self.fc2(torch.tanh(self.fc1(F.normalize(x.to(self.fc1.weight.dtype), dim=-1))))

    def forward(self, x: Tensor) -> Routing:
        """``x [T, d]`` -> top-k :class:`Routing` with weight 1."""
        scores = self.logits(x).detach()
        check_finite_logits(scores, type(self).__name__)
        return _top_k_routing(scores, self.k, self.num_experts)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"


@dataclass
class MLPGateTraining:
    """What :func:`train_mlp_gate` did.

    Attributes:
        losses: mean BCE per epoch on the training tokens.
        val_mass: activation mass captured on the held-out tokens after each epoch (empty without a
            validation split).
        best_epoch: the epoch whose weights the gate keeps (the last one without a validation split).
    """

    losses: list[float]
    val_mass: list[float]
    best_epoch: int


def train_mlp_gate(
    gate: MLPGate,
    bank: NeuronGroupBank,
    hidden_states: Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 0.01,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> MLPGateTraining:
    """Fit ``gate`` to the bank's activation mass on recorded FFN inputs (MoEfication's recipe).

    Target for a batch: each token's per-expert activation mass (:func:`expert_activation_mass`,
    computed by the real FFN, biases included) divided by the largest value in the batch (so it lies
    in ``[0, 1]`` and keeps every token's ranking of experts); loss: BCE with logits of
    :meth:`MLPGate.logits` (which sees the normalised token); Adam. As the authors do, a held-out
    ``val_fraction`` of the tokens picks the epoch whose weights are kept (by activation mass
    captured at the gate's ``k``).

    Args:
        gate: the router to train in place; bank: the experts it routes for.
        hidden_states: ``[N, d]`` inputs of the FFN recorded on real text.
        epochs, batch_size, lr: MoEfication's defaults 30, 512, 0.01.
        val_fraction: share of tokens held out for epoch selection, in ``[0, 1)`` (0: keep the last epoch).
        seed: the split and the shuffling.

    Returns:
        :class:`MLPGateTraining`.

    Raises:
        ValueError: hidden states of the wrong width, no tokens, or a gate/bank mismatch.

    The steps are tiny (``[512, d] x [d, E]``): on a CPU shared with other jobs,
    ``torch.set_num_threads(1)`` made it 10-50x faster than two threads waiting on each other.

    Examples:
        >>> result = train_mlp_gate(gate, bank, torch.cat(recorded))
        >>> result.val_mass[result.best_epoch]
        0.74
    """
    if not isinstance(gate, MLPGate):
        raise TypeError(f"gate must be an MLPGate, got {type(gate).__name__}")
    _check_bank(bank)
    if (gate.num_experts, gate.d_model) != (bank.num_experts, bank.in_features):
        raise ValueError(f"gate ({gate.num_experts} experts, d={gate.d_model}) does not match the bank "
                         f"({bank.num_experts} experts, d={bank.in_features})")  # fmt: skip
    _check_tokens(hidden_states, gate.d_model, "train_mlp_gate")
    if hidden_states.shape[0] == 0:
        raise ValueError("train_mlp_gate needs at least one recorded token")
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if val_fraction != 0:
        check_fraction(val_fraction, "val_fraction")
    device = gate.fc1.weight.device
    x_all = hidden_states.detach().to(device, gate.fc1.weight.dtype)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x_all.shape[0], generator=generator).to(device)
    n_val = int(x_all.shape[0] * val_fraction)
    x_val, x_train = x_all[perm[:n_val]], x_all[perm[n_val:]]
    if x_train.shape[0] == 0:
        raise ValueError(f"no training tokens left after holding out val_fraction={val_fraction}")
    mass = torch.cat([expert_activation_mass(bank, c) for c in x_train.split(4096)]).float()
    val_target = expert_activation_mass(bank, x_val) if n_val else None
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    losses: list[float] = []
    val_mass: list[float] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    for epoch in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator).to(device)
        total = 0.0
        for idx in order.split(batch_size):
            target = mass[idx]
            target = target / target.max().clamp_min(torch.finfo(target.dtype).tiny)
            loss = F.binary_cross_entropy_with_logits(gate.logits(x_train[idx]).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / x_train.shape[0])
        if n_val:
            with torch.no_grad():
                val_mass.append(_mass_share(val_target, gate(x_val).expert_index))  # type: ignore[arg-type]
            if best is None or val_mass[-1] > best[0]:
                best = (val_mass[-1], epoch, {k: v.detach().clone() for k, v in gate.state_dict().items()})
    if best is not None:
        gate.load_state_dict(best[2])
        return MLPGateTraining(losses, val_mass, best[1])
    return MLPGateTraining(losses, val_mass, epochs - 1)


def activation_mass_captured(
    bank: NeuronGroupBank,
    hidden_states: Tensor,
    routing_or_gate: Routing | Gate | Tensor,
    k: int | None = None,
) -> float:
    """Fraction of the total activation mass that lands in the selected experts.

    Args:
        bank: the split FFN; hidden_states: ``[N, d]`` its inputs.
        routing_or_gate: a :class:`Routing` for these ``N`` tokens, a gate (called on them), an
            index tensor ``[N, k]`` (``-1`` = empty slot) or a score tensor ``[N, E]`` (float; its top
            ``k`` are taken).
        k: with a score tensor, how many experts to take (required there).

    Returns:
        ``sum over tokens of selected mass / total mass`` in ``[0, 1]`` (1.0 when all experts are selected).

    Examples:
        >>> activation_mass_captured(bank, x, SimilarityGate(bank, k=4))
        0.58
    """
    _check_bank(bank)
    _check_tokens(hidden_states, bank.in_features, "activation_mass_captured")
    with torch.no_grad():
        if isinstance(routing_or_gate, nn.Module):
            routing_or_gate = routing_or_gate(hidden_states)
        if isinstance(routing_or_gate, Routing):
            index = routing_or_gate.as_sparse().expert_index
        elif isinstance(routing_or_gate, Tensor) and routing_or_gate.is_floating_point():
            if k is None:
                raise ValueError("k is required when routing_or_gate is a score tensor [N, E]")
            index = routing_or_gate.topk(check_k(k, bank.num_experts), dim=-1).indices
        elif isinstance(routing_or_gate, Tensor):
            index = routing_or_gate.long()
        else:
            raise TypeError(
                f"routing_or_gate must be a Routing, a Gate or a tensor, got {type(routing_or_gate).__name__}"
            )
        assert index is not None
        if index.dim() != 2 or index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"routing covers {tuple(index.shape)} slots; expected [{hidden_states.shape[0]}, k]")
        return _mass_share(expert_activation_mass(bank, hidden_states), index)


def _mass_share(mass: Tensor, index: Tensor) -> float:
    """Share of ``mass [T, E]`` in the experts ``index [T, k]`` selects (``-1`` slots and duplicates ignored)."""
    mass = mass.double()
    selected = torch.zeros_like(mass, dtype=torch.bool)
    valid = index >= 0
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
    selected[rows[valid], index[valid]] = True
    total = mass.sum()
    return float((mass * selected).sum() / total) if total > 0 else 1.0
