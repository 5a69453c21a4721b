"""``SlicedExperts``: one dense FFN cut into ``E`` groups of hidden neurons (MoEfication, EMoE).

A dense FFN ``y = act(x W1^T + b1) W2^T + b2`` is a sum over its ``F`` hidden neurons, so
partitioning the neurons into ``E`` equal groups turns it into ``E`` small FFNs whose outputs add
up to the original (minus ``b2``, which belongs to no neuron). Routing a token to a few groups
computes only those neurons.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpolab.utils import check_choice

from ..activations import Activation
from .base import Capability, FFNBank, FFNWeights

__all__ = ["SlicedExperts", "check_groups"]

BIAS_MODES = ("shared", "split")


def check_groups(groups: Tensor, num_neurons: int) -> Tensor:
    """Validate ``groups [E, F/E]`` as a partition of ``range(F)``; returns it as int64.

    Raises:
        TypeError: not an integer tensor.
        ValueError: wrong shape, or not every neuron appears exactly once.
    """
    if not isinstance(groups, Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise TypeError(f"groups must be an integer tensor [E, F/E], got {type(groups).__name__}")
    if groups.dim() != 2 or groups.numel() != num_neurons:
        raise ValueError(
            f"groups must be [E, F/E] with E * F/E = F = {num_neurons} neuron indices, got {tuple(groups.shape)}"
        )
    groups = groups.long()
    seen = torch.bincount(groups.reshape(-1).clamp(0, num_neurons), minlength=num_neurons + 1)
    if groups.min() < 0 or groups.max() >= num_neurons or not bool((seen[:num_neurons] == 1).all()):
        raise ValueError(f"groups must be a permutation of range({num_neurons}) (each neuron in exactly one expert)")
    return groups


def _param(t: Tensor) -> nn.Parameter:
    """A trainable copy of ``t``, detached from its graph."""
    return nn.Parameter(t.detach().clone())


class SlicedExperts(FFNBank):
    """A dense FFN split into ``E`` experts of ``F/E`` hidden neurons each.

    Expert ``e`` holds the neurons ``groups[e]``: ``w1 [E, d, F/E]`` (rows of ``W1``, input-major),
    ``b1 [E, F/E]``, ``w2 [E, F/E, d_out]`` (columns of ``W2``) and ``w_gate [E, d, F/E]`` for gated
    FFNs, computed with :func:`~mpolab_moe.experts.base.grouped_ffn` like
    :class:`~mpolab_moe.experts.dense.DenseExperts`. Capabilities: ``KEYS`` and ``NEURON_GROUPS``.

    ``bias_mode`` says where the dense ``b2`` goes:

    * ``"shared"`` (default): ``b2`` is :attr:`output_bias`, added once per token by the layer. Exact
      for any number of selected experts: selecting all experts with weight 1 gives back the dense FFN.
    * ``"split"`` (EMoE's variant): each expert adds ``b2 / k`` to its output, so a token routed to
      exactly ``k`` experts with weight 1 gets ``b2`` once; with fewer or more experts (avg-k,
      top-any) the bias is scaled accordingly. ``k`` is ``bias_k`` (default ``num_experts``).

    Build with :meth:`from_ffn`; :meth:`to_dense_ffn` undoes it.

    Examples:
        >>> groups = torch.randperm(3072).view(16, 192)
        >>> bank = SlicedExperts.from_ffn(FFNWeights(w1, w2, b1=b1, b2=b2, activation="gelu"), groups)
        >>> layer = MoE(SimilarityGate(bank, k=4), bank)
    """

    capabilities = frozenset({Capability.KEYS, Capability.NEURON_GROUPS})
    w1: nn.Parameter
    w2: nn.Parameter
    w_gate: nn.Parameter | None
    b1: nn.Parameter | None
    b2: nn.Parameter | None
    groups: Tensor

    def __init__(
        self,
        w1: Tensor,
        w2: Tensor,
        groups: Tensor,
        *,
        b1: Tensor | None = None,
        b2: Tensor | None = None,
        w_gate: Tensor | None = None,
        activation: Activation = "relu",
        bias_mode: str = "shared",
        bias_k: int | None = None,
    ) -> None:
        """Stacked expert weights as stored (see :meth:`from_ffn` for the ``nn.Linear`` layout).

        Args:
            w1: ``[E, d, m]``; w2: ``[E, m, d_out]``; groups: ``[E, m]`` original neuron ids;
            b1: ``[E, m]``; b2: ``[d_out]``; w_gate: ``[E, d, m]``.
        """
        super().__init__()
        if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0] or w1.shape[2] != w2.shape[1]:
            raise ValueError(f"w1 must be [E, d, m] and w2 [E, m, d_out], got {tuple(w1.shape)} and {tuple(w2.shape)}")
        E, d, m = w1.shape
        check_choice(bias_mode, "bias_mode", BIAS_MODES)
        if bias_k is not None and (not isinstance(bias_k, int) or not 1 <= bias_k <= E):
            raise ValueError(f"bias_k must be an int in [1, {E}], got {bias_k!r}")
        if w_gate is not None and w_gate.shape != w1.shape:
            raise ValueError(f"w_gate {tuple(w_gate.shape)} must have w1's shape {tuple(w1.shape)}")
        if b1 is not None and b1.shape != (E, m):
            raise ValueError(f"b1 must be [{E}, {m}], got {tuple(b1.shape)}")
        if b2 is not None and b2.shape != (w2.shape[2],):
            raise ValueError(f"b2 must be [{w2.shape[2]}], got {tuple(b2.shape)}")
        self.register_buffer("groups", check_groups(groups, E * m).reshape(E, m).to(w1.device), persistent=True)
        self.num_experts, self.in_features, self.expert_size = E, d, m
        self.d_ff, self.out_features = E * m, w2.shape[2]
        self._set_activation(activation)
        self.bias_mode = bias_mode
        self.bias_k = E if bias_k is None else bias_k
        self.w1, self.w2 = _param(w1), _param(w2)
        self.w_gate = _param(w_gate) if w_gate is not None else None
        self.b1 = _param(b1) if b1 is not None else None
        self.b2 = _param(b2) if b2 is not None else None

    @classmethod
    def from_ffn(
        cls, ffn: FFNWeights, groups: Tensor, *, bias_mode: str = "shared", bias_k: int | None = None
    ) -> SlicedExperts:
        """Split one FFN by ``groups``.

        Args:
            ffn: the FFN (:class:`FFNWeights`, or an :class:`~mpolab_moe.ffn.FFN` from ``find_ffns``).
            groups: ``[E, F/E]`` int64, a permutation of ``range(F)``; row ``e`` lists expert ``e``'s
                neurons (from :mod:`mpolab_moe.split`).
            bias_mode, bias_k: see the class docstring.

        Examples:
            >>> ffn = FFNWeights(w1, w2, b1=b1, b2=b2, activation="gelu")
            >>> bank = SlicedExperts.from_ffn(ffn, random_split(3072, 16))
        """
        if not isinstance(ffn, FFNWeights):
            raise TypeError(f"ffn must be an FFNWeights (or an FFN from find_ffns), got {type(ffn).__name__}")
        groups = check_groups(groups, ffn.d_ff).to(ffn.w1.device)
        with torch.no_grad():
            sw1 = ffn.w1[groups].transpose(1, 2)  # [E, m, d] -> [E, d, m]
            sw2 = ffn.w2.T[groups]  # [E, m, d_out]
            sg = ffn.w_gate[groups].transpose(1, 2) if ffn.w_gate is not None else None
            sb1 = ffn.b1[groups] if ffn.b1 is not None else None
        return cls(
            sw1,
            sw2,
            groups,
            b1=sb1,
            b2=ffn.b2,
            w_gate=sg,
            activation=ffn.activation,
            bias_mode=bias_mode,
            bias_k=bias_k,
        )

    @property
    def output_bias(self) -> Tensor | None:
        """``b2`` in ``"shared"`` mode (added once per token by the layer), else ``None``."""
        return self.b2 if self.bias_mode == "shared" else None

    def expert_bias(self) -> Tensor | None:
        """``"split"`` mode: ``b2 / bias_k`` for every expert, ``[E, d_out]``; ``"shared"``: ``None``."""
        if self.bias_mode != "split" or self.b2 is None:
            return None
        return (self.b2 / self.bias_k).expand(self.num_experts, -1)

    def keys(self) -> Tensor:
        """``[E, F/E, d]``: the rows a token is scored against, per expert and neuron.

        ``W1`` rows for plain FFNs; the gate projection's rows for gated FFNs (the branch the
        activation applies to).
        """
        w = self.w_gate if self.w_gate is not None else self.w1
        return w.transpose(1, 2)

    def hidden(self, x: Tensor) -> Tensor:
        """Every expert's intermediate activation for every token: ``x [T, d]`` -> ``[T, E, F/E]``.

        ``act(x W1 + b1)``, or ``act(x Wg) * (x W1)`` for gated FFNs. Computes the full dense
        hidden layer (used by oracle routers and for measuring activation mass).
        """
        h = torch.einsum("td,edm->tem", x, self.w1)
        if self.b1 is not None:
            h = h + self.b1
        if self.w_gate is not None:
            return self.act(torch.einsum("td,edm->tem", x, self.w_gate)) * h
        return self.act(h)

    def activity(self, x: Tensor) -> Tensor:
        """How strongly each neuron fires, ``>= 0``: ``x [T, d]`` -> ``[T, E, F/E]``.

        The positive part of :meth:`hidden` for plain FFNs (ReLU's activation exactly; GELU's small
        negative lobe is dropped), its magnitude for gated FFNs (the up branch sets the sign). The
        same rule as :func:`mpolab_moe.split.neuron_activity`.
        """
        h = self.hidden(x)
        return h.abs() if self.w_gate is not None else h.clamp(min=0)

    def to_dense_ffn(self) -> FFNWeights:
        """Reassemble the dense FFN in the original neuron order, ``nn.Linear`` layout (detached copies)."""
        order = torch.argsort(self.groups.reshape(-1))
        with torch.no_grad():
            w1 = self.w1.transpose(1, 2).reshape(-1, self.in_features)[order].clone()
            w2 = self.w2.reshape(-1, self.out_features)[order].T.contiguous()
            b1 = self.b1.reshape(-1)[order].clone() if self.b1 is not None else None
            b2 = self.b2.detach().clone() if self.b2 is not None else None
            wg = (
                self.w_gate.transpose(1, 2).reshape(-1, self.in_features)[order].clone()
                if self.w_gate is not None
                else None
            )
        return FFNWeights(w1, w2, w_gate=wg, b1=b1, b2=b2, activation=self.activation)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, expert_size={self.expert_size}, d_model={self.in_features}, "
            f"d_out={self.out_features}, activation={self.activation_name!r}, gated={self.gated}, "
            f"bias_mode={self.bias_mode!r}"
        )
