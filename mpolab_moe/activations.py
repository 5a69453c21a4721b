"""Activation functions by name, as Hugging Face configs spell them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "activation_name", "get_activation"]

#: An activation given by name (a key of :data:`ACTIVATIONS`) or as a callable.
Activation = str | Callable[[Tensor], Tensor]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


#: Names accepted wherever an ``activation=`` argument is taken.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def get_activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    """The callable for ``activation`` (a name from :data:`ACTIVATIONS` or a callable)."""
    if callable(activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name or a callable, got {type(activation).__name__}")
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)} or a callable") from None


def activation_name(activation: Activation) -> str:
    """The name to show for ``activation``: itself for a name, the callable's ``__name__`` (or ``"custom"``)."""
    return activation if isinstance(activation, str) else getattr(activation, "__name__", "custom")
