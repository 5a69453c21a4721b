"""``moefy``: turn chosen FFNs of a Hugging Face model into mixtures of experts, in place.

Three steps, each usable on its own:

* :func:`~mpolab_moe.ffn.find_ffns` recognises the FFNs of a model (:mod:`mpolab_moe.ffn`);
* a conversion method builds one :class:`~mpolab_moe.MoE` per FFN: ``"upcycle"``
  (:func:`~mpolab_moe.upcycle.upcycle`, MPOE with ``experts="mpo"``) or a recipe
  (``"moefication"``, ``"emoe"``, ``"dynmoe"``, :mod:`mpolab_moe.recipes`), looked up in
  :mod:`mpolab_moe.registry`;
* :func:`moefy` does both for chosen layers and returns a :class:`MoefyReport`.

Examples:
    >>> model = T5ForConditionalGeneration.from_pretrained("t5-small")
    >>> report = moefy(model, layers=[4, 5], num_experts=8, experts="mpo")   # last two encoder FFNs
    >>> print(report)
    >>> loss = model(**batch).loss + 0.01 * aux_loss(model)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from mpolab.tables import TableReport

from .experts.base import FFNBank
from .ffn import FFN, LayerSpec, ffn_slots, find_ffns
from .layer import MoE
from .registry import get_method
from .upcycle import expert_kind

__all__ = ["MoefyLayerReport", "MoefyReport", "moefy"]


@dataclass
class MoefyLayerReport:
    """One converted FFN."""

    name: str
    family: str
    method: str
    experts: str
    num_experts: int
    k: int | None
    params_before: int
    params_after: int
    reconstruction_error: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float | None:
        return max(self.reconstruction_error.values()) if self.reconstruction_error else None


@dataclass
class MoefyReport(TableReport):
    """What :func:`moefy` did: one row per converted FFN plus totals; ``print(report)`` shows a table."""

    layers: list[MoefyLayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters of the converted FFNs."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the MoE layers that replaced them."""
        return sum(r.params_after for r in self.layers)

    @property
    def max_error(self) -> float:
        """Largest relative reconstruction error over every converted matrix (0 when all exact)."""
        errors = [r.max_error for r in self.layers if r.max_error is not None]
        return max(errors, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }

    def header(self) -> list[str]:
        return ["layer", "family", "method", "experts", "E", "k", "params", "x", "rel. error"]

    def rows(self) -> list[list[str]]:
        return [
            [
                r.name,
                r.family,
                r.method,
                r.experts,
                str(r.num_experts),
                "-" if r.k is None else str(r.k),
                f"{r.params_before:,} -> {r.params_after:,}",
                f"{r.params_after / max(r.params_before, 1):.2f}",
                "-" if r.max_error is None else ", ".join(f"{n} {e:.2e}" for n, e in r.reconstruction_error.items()),
            ]
            for r in self.layers
        ]

    def summary(self) -> list[str]:
        return [
            f"{len(self.layers)} FFNs: {self.params_before:,} -> {self.params_after:,} parameters; "
            f"model: {self.model_params_before:,} -> {self.model_params_after:,}; "
            f"max relative error {self.max_error:.2e}"
        ]


def moefy(
    model: nn.Module,
    layers: LayerSpec = None,
    num_experts: int | None = None,
    experts: str | None = None,
    gate: str | None = None,
    method: str | None = None,
    **kwargs: Any,
) -> MoefyReport:
    """Replace FFNs of ``model`` by MoE layers, in place.

    Args:
        model: a Hugging Face model (or any module holding supported FFNs, see :func:`find_ffns`).
        layers: which FFNs (indices / names as in :func:`find_ffns`); ``None``: the method's default
            layers (every FFN for upcycling). Indices are the model's own FFN numbers, converted
            ones included: ``layers=[0]`` always means the first FFN, and converting it twice is an error.
        num_experts, experts, gate: for upcycling (``method=None``) default to ``8``, ``"mpo"``,
            ``"top1"``; for another method they are passed to its builder only when given, so the
            method's own defaults apply otherwise.
        method: ``None`` or ``"upcycle"`` (:func:`~mpolab_moe.upcycle.upcycle`), or a name given to
            :func:`~mpolab_moe.registry.register_method` (``"moefication"``, ``"emoe"``, ``"dynmoe"``
            from :mod:`mpolab_moe.recipes`).
        **kwargs: passed to the builder (for upcycling: ``upcycle``'s keyword arguments, e.g.
            ``rel_tol``, ``max_rank``, ``k``, ``capacity_factor``).

    Every MoE is built before the first is installed, so an error leaves the model untouched.

    Returns:
        :class:`MoefyReport`: per layer the name, expert kind, parameters before/after and
        reconstruction errors.

    Raises:
        ValueError: unknown method (the message lists the registered ones), bad layers, bad options.

    Examples:
        >>> report = moefy(gpt2, layers=[-2, -1], num_experts=8, experts="mpo", max_rank=64)
        >>> print(report)
        >>> loss = gpt2(**batch, labels=batch["input_ids"]).loss + 0.01 * aux_loss(gpt2)
    """
    name = "upcycle" if method is None else method
    recipe = get_method(name)
    if layers is None and recipe.default_layers is not None:
        family = find_ffns(model)[0].family
        layers = [int(i) for i in recipe.default_layers(len(ffn_slots(model)), family)]
    ffns = find_ffns(model, layers)
    given = {"num_experts": num_experts, "experts": experts, "gate": gate}
    options = {key: value for key, value in given.items() if value is not None} | kwargs
    params_before = _count(model)
    built = [(ffn, recipe.builder(ffn, **options)) for ffn in ffns]
    report = MoefyReport(model_params_before=params_before)
    for ffn, moe in built:
        ffn.install(model, moe)
        report.layers.append(_layer_report(ffn, moe, name))
    report.model_params_after = _count(model)
    return report


def _layer_report(ffn: FFN, moe: nn.Module, method: str) -> MoefyLayerReport:
    """The report row of one converted FFN, read off the layer that replaced it."""
    bank = moe.experts if isinstance(moe, MoE) else None
    errors = bank.reconstruction_error if isinstance(bank, FFNBank) else {}
    return MoefyLayerReport(
        name=ffn.name,
        family=ffn.family,
        method=method,
        experts=expert_kind(bank) if bank is not None else type(moe).__name__,
        num_experts=int(getattr(moe, "num_experts", 0)),
        k=getattr(getattr(moe, "gate", None), "k", None),
        params_before=ffn.num_params,
        params_after=sum(p.numel() for p in moe.parameters()),
        reconstruction_error={n: float(e) for n, e in errors.items()},
    )


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
