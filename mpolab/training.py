"""Fine-tuning compressed models: what trains, learning-rate groups, and dimension squeezing.

* :func:`set_trainable`: MPOP's lightweight fine-tuning (``"auxiliary"``: central tensors frozen,
  auxiliary tensors and every non-MPO parameter train), or ``"central"`` / ``"all"``.
* :func:`param_groups`: optimizer groups with a separate learning rate for MPO tensors (the MPOP
  authors' ``mpo_lr``), for any ``torch.optim`` optimizer.
* :func:`squeeze` and :class:`DimensionSqueezer`: MPOP's dimension squeezing: lower bond
  dimensions during training while the loss stays near its target, swapping the new, smaller
  parameters into the optimizer so training goes on.

Examples:
    >>> mpolab.compress(model, "all-linear", ratio=0.5)
    >>> mpolab.set_trainable(model, "auxiliary")
    >>> opt = torch.optim.AdamW(mpolab.param_groups(model, lr=1e-4, mpo_lr=5e-5))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .allocate import Spectrum, allocate_ranks
from .nn import HasCentralTensor, MPOModule, mpo_modules
from .truncation import check_rel_tol
from .utils import check_non_negative_float, check_positive_int

__all__ = ["DimensionSqueezer", "SqueezeResult", "central_modules", "param_groups", "set_trainable", "squeeze"]

Trainable = Literal["auxiliary", "central", "all"]


def _require_mpo_modules(model: nn.Module) -> dict[str, MPOModule]:
    found = mpo_modules(model)
    if not found:
        raise ValueError("the model has no MPO layers; run mpolab.compress(model, ...) first")
    return found


def central_modules(model: nn.Module) -> dict[str, HasCentralTensor]:
    """Every module of ``model`` with central and auxiliary tensors (:class:`~mpolab.nn.HasCentralTensor`).

    MPO layers and any other module with ``central_parameters()`` / ``auxiliary_parameters()``
    (the MPO expert banks of ``mpolab_moe``), by qualified name.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, HasCentralTensor)}


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(central, auxiliary)`` parameters of every :func:`central_modules` module, each once."""
    central: dict[int, nn.Parameter] = {}
    auxiliary: dict[int, nn.Parameter] = {}
    for m in central_modules(model).values():
        central.update((id(p), p) for p in m.central_parameters())
        auxiliary.update((id(p), p) for p in m.auxiliary_parameters())
    return list(central.values()), [p for i, p in auxiliary.items() if i not in central]


def set_trainable(model: nn.Module, mode: Trainable = "auxiliary", *, others: bool = True) -> dict[str, int]:
    """Choose which parameters train.

    Works on every module with central and auxiliary tensors (:class:`~mpolab.nn.HasCentralTensor`:
    MPO layers, MPO expert banks).

    Args:
        mode: ``"auxiliary"`` (MPOP lightweight fine-tuning: central tensors frozen),
            ``"central"`` (only central tensors of the MPO layers), or ``"all"``.
        others: whether the parameters outside MPO layers' cores (biases, norms, embeddings,
            heads) train. MPOP trains them.

    Returns:
        ``{"trainable": n, "total": m}`` parameter counts.
    """
    if mode not in ("auxiliary", "central", "all"):
        raise ValueError(f"mode must be 'auxiliary', 'central' or 'all', got {mode!r}")
    central, auxiliary = _split_parameters(model)
    if not central and not auxiliary:
        raise ValueError("the model has no MPO layers; run mpolab.compress(model, ...) first")
    core_ids = {id(p) for p in central + auxiliary}
    for p in model.parameters():
        if id(p) not in core_ids:
            p.requires_grad_(others)
    for p in central:
        p.requires_grad_(mode in ("central", "all"))
    for p in auxiliary:
        p.requires_grad_(mode in ("auxiliary", "all"))
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "total": total}


def param_groups(
    model: nn.Module,
    lr: float,
    mpo_lr: float | None = None,
    *,
    weight_decay: float = 0.0,
    mpo_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: MPO tensors at ``mpo_lr``, everything else at ``lr``.

    MPO tensors are the central and auxiliary parameters of every
    :class:`~mpolab.nn.HasCentralTensor` module (MPO layers, MPO expert banks). Only trainable
    parameters are included; empty groups are left out.

    Examples:
        >>> opt = torch.optim.AdamW(param_groups(model, lr=1e-4, mpo_lr=5e-5))
    """
    central, auxiliary = _split_parameters(model)
    core_ids = {id(p) for p in central + auxiliary}
    trainable = [p for p in model.parameters() if p.requires_grad]
    cores = [p for p in trainable if id(p) in core_ids]
    rest = [p for p in trainable if id(p) not in core_ids]
    groups = [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {
            "params": cores,
            "lr": lr if mpo_lr is None else mpo_lr,
            "weight_decay": weight_decay if mpo_weight_decay is None else mpo_weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]


@dataclass
class SqueezeResult:
    """Ranks before and after a squeeze, per MPO layer, and the parameter totals."""

    ranks_before: dict[str, tuple[int, ...]]
    ranks_after: dict[str, tuple[int, ...]]
    params_before: int
    params_after: int
    rel_errors: dict[str, float]


def squeeze(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    max_rank: int | None = None,
    shrink: int | None = None,
    rel_tol: float | None = None,
    ratio: float | None = None,
    modules: Sequence[str] | None = None,
) -> SqueezeResult:
    """Re-truncate MPO layers to smaller bonds in the middle of training (TT rounding).

    Exactly one rule: ``max_rank`` (cap every bond), ``shrink`` (lower every bond by this many),
    ``rel_tol`` (per-layer error relative to the current layer), or ``ratio`` (a global budget
    as a fraction of the layers' current MPO parameters, allocated by their current bond
    spectra as :func:`mpolab.compress` does). The new cores replace the old parameters; in
    ``optimizer`` the new parameters take the old ones' places and the old ones' state (Adam
    moments) is dropped, so the same optimizer keeps working.
    """
    rules = [x is not None for x in (max_rank, shrink, rel_tol, ratio)]
    if sum(rules) != 1:
        raise ValueError("give exactly one of max_rank, shrink, rel_tol, ratio")
    check_rel_tol(rel_tol)
    layers = _require_mpo_modules(model)
    if modules is not None:
        missing = [n for n in modules if n not in layers]
        if missing:
            raise ValueError(f"not MPO layers of this model: {missing}; MPO layers are {sorted(layers)[:10]}…")
        layers = {n: layers[n] for n in modules}
    before = {n: m.ranks for n, m in layers.items()}
    params_before = sum(m.num_mpo_params() for m in layers.values())
    caps: dict[str, Any] = {}
    if max_rank is not None:
        caps = {n: {"max_rank": max_rank} for n in layers}
    elif shrink is not None:
        check_positive_int(shrink, "shrink")
        caps = {n: {"max_rank": [max(1, r - shrink) for r in m.ranks]} for n, m in layers.items()}
    elif rel_tol is not None:
        caps = {n: {"rel_tol": rel_tol} for n in layers}
    else:
        if ratio is None or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1] of the current MPO parameters, got {ratio!r}")
        spectra = {}
        for n, m in layers.items():
            exact = m.mpo.truncate(max_rank=max(m.ranks))  # rounding without loss: current spectra
            sizes = [i * j for i, j in zip(m.out_factors, m.in_factors)]
            assert exact.singular_values is not None
            spectra[n] = Spectrum(sizes, exact.singular_values, max(exact.norm() ** 2, 1e-30), list(m.ranks))
        allocated = allocate_ranks(spectra, int(ratio * params_before))
        caps = {n: {"max_rank": r} for n, r in allocated.items()}
    errors = {}
    for n, m in layers.items():
        new = m.mpo.truncate(**caps[n])
        swaps = m.set_mpo(new)
        errors[n] = float(new.truncation_error or 0.0)
        if optimizer is not None:
            _swap_in_optimizer(optimizer, swaps)
    return SqueezeResult(
        before,
        {n: m.ranks for n, m in layers.items()},
        params_before,
        sum(m.num_mpo_params() for m in layers.values()),
        errors,
    )


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, swaps: Mapping[nn.Parameter, nn.Parameter]) -> None:
    for group in optimizer.param_groups:
        group["params"] = [swaps.get(p, p) for p in group["params"]]
    for old in swaps:
        optimizer.state.pop(old, None)


class DimensionSqueezer:
    """MPOP's dimension squeezing as a training-loop helper.

    Call :meth:`step` with each training loss. After ``warmup`` steps (at the first step for
    ``warmup=0``) the exponential moving average of the loss becomes the target. Whenever the
    average has stayed within ``(1 + tolerance)`` of the target for ``settle`` steps, every bond
    is lowered by ``shrink`` (never below ``min_rank``). If after a squeeze the average does not
    come back within ``patience`` steps, the last squeeze is undone (the previous cores are
    restored) and squeezing stops.

    Examples:
        >>> squeezer = DimensionSqueezer(model, optimizer, shrink=8)
        >>> for batch in data:
        ...     loss = step(batch)
        ...     squeezer.step(loss.item())

    Raises:
        TypeError: a count or rate of the wrong type.
        ValueError: ``shrink``, ``min_rank``, ``settle`` or ``patience`` below 1, ``warmup`` below 0,
            ``tolerance`` below 0, ``ema`` outside ``[0, 1)``, or a model without MPO layers.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        shrink: int = 8,
        min_rank: int = 4,
        tolerance: float = 0.05,
        warmup: int = 100,
        settle: int = 50,
        patience: int = 300,
        ema: float = 0.98,
    ) -> None:
        for arg, value in (("shrink", shrink), ("min_rank", min_rank), ("settle", settle), ("patience", patience)):
            check_positive_int(value, arg)
        if isinstance(warmup, bool) or not isinstance(warmup, int):
            raise TypeError(f"warmup must be an int >= 0, got {warmup!r}")
        if warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup}")
        check_non_negative_float(tolerance, "tolerance")  # allowed relative rise of the loss
        if isinstance(ema, bool) or not isinstance(ema, (int, float)):
            raise TypeError(f"ema must be a float, got {ema!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1) (weight of the previous average), got {ema}")
        _require_mpo_modules(model)
        self.model, self.optimizer = model, optimizer
        self.shrink, self.min_rank, self.tolerance = shrink, min_rank, tolerance
        self.warmup, self.settle, self.patience, self.ema = warmup, settle, patience, ema
        self.average: float | None = None
        self.target: float | None = None
        self.steps = 0
        self._good_steps = 0
        self._since_squeeze = 0
        self._backup: dict[str, list[torch.Tensor]] | None = None
        self.done = False
        self.history: list[tuple[int, dict[str, tuple[int, ...]]]] = []

    def step(self, loss: float) -> bool:
        """Record one loss; returns ``True`` when this call changed the ranks."""
        self.steps += 1
        self.average = loss if self.average is None else self.ema * self.average + (1 - self.ema) * loss
        if self.done:
            return False
        if self.target is None and self.steps >= self.warmup:  # warmup=0: the first loss is the target
            self.target = self.average
        if self.target is None:
            return False
        self._since_squeeze += 1
        near = self.average <= self.target * (1 + self.tolerance)
        self._good_steps = self._good_steps + 1 if near else 0
        if self._backup is not None and not near and self._since_squeeze >= self.patience:
            self._restore()
            self.done = True
            return True
        if self._good_steps >= self.settle:
            return self._squeeze()
        return False

    def _squeeze(self) -> bool:
        layers = mpo_modules(self.model)
        if all(max(m.ranks) <= self.min_rank for m in layers.values()):
            self.done = True
            return False
        self._backup = {n: [c.detach().clone() for c in m.cores] for n, m in layers.items()}
        for m in layers.values():
            target = [max(self.min_rank, r - self.shrink) if r > self.min_rank else r for r in m.ranks]
            _swap_in_optimizer(self.optimizer, m.set_mpo(m.mpo.truncate(max_rank=target)))
        self.history.append((self.steps, {n: m.ranks for n, m in layers.items()}))
        self._good_steps = 0
        self._since_squeeze = 0
        return True

    def _restore(self) -> None:
        assert self._backup is not None
        layers = mpo_modules(self.model)
        for n, cores in self._backup.items():
            m = layers[n]
            _swap_in_optimizer(self.optimizer, m.set_mpo(type(m.mpo)(cores, m.out_features, m.in_features)))
        self.history.append((self.steps, {n: m.ranks for n, m in layers.items()}))
