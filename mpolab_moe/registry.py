"""The conversion methods :func:`~mpolab_moe.moefy` can apply, by name.

``"upcycle"`` (:mod:`mpolab_moe.upcycle`) and ``"moefication"``, ``"emoe"``, ``"dynmoe"``
(:mod:`mpolab_moe.recipes`) register themselves when ``mpolab_moe`` is imported; add your own with
:func:`register_method`. This module imports nothing else of the package.

Examples:
    >>> register_method("switch8", lambda ffn, **kw: upcycle(ffn, 8, experts="dense", **kw),
    ...                 lambda n, family: list(range(1, n, 2)))        # every other layer
    >>> "switch8" in registered_methods()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Method", "get_method", "register_method", "registered_methods", "unregister_method"]

#: ``builder(ffn, **kwargs) -> MoE``.
Builder = Callable[..., nn.Module]
#: ``default_layers(num_layers, family) -> list[int]``.
DefaultLayers = Callable[[int, str], list[int]]


@dataclass(frozen=True)
class Method:
    """A conversion method :func:`~mpolab_moe.moefy` can apply.

    Attributes:
        name: what ``moefy(..., method=name)`` asks for.
        builder: ``builder(ffn: FFN, **kwargs) -> MoE``, called once per chosen FFN with ``moefy``'s
            extra keyword arguments (``num_experts``, ``experts``, ``gate`` only when given).
        default_layers: ``default_layers(num_layers, family) -> list[int]``, the layers the method's
            paper converts when ``layers=None``; ``None`` means every FFN.
    """

    name: str
    builder: Builder
    default_layers: DefaultLayers | None = None


_METHODS: dict[str, Method] = {}


def register_method(name: str, builder: Builder, default_layers: DefaultLayers | None = None) -> None:
    """Make ``moefy(model, method=name)`` build each MoE with ``builder``.

    Registering a name again replaces it (so re-importing a module that registers is harmless).

    Raises:
        ValueError: an empty name; TypeError: a builder or ``default_layers`` that is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable as builder(ffn, **kwargs) -> MoE, got {type(builder).__name__}")
    if default_layers is not None and not callable(default_layers):
        raise TypeError(
            f"default_layers must be None or callable (num_layers, family) -> list[int], got {default_layers!r}"
        )
    _METHODS[name] = Method(name, builder, default_layers)


def unregister_method(name: str) -> None:
    """Forget ``name`` (no error when it is not registered)."""
    _METHODS.pop(name, None)


def registered_methods() -> list[str]:
    """Names ``moefy(method=...)`` accepts, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name``.

    Raises:
        ValueError: no such method (the message lists the registered ones).
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered: {registered_methods()} (method=None upcycles)"
        ) from None
