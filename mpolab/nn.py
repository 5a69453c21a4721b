"""Trainable MPO layers: :class:`MPOLinear` and :class:`MPOEmbedding`.

Each core is its own ``nn.Parameter`` (``cores.0`` … ``cores.{n-1}`` in the ``state_dict``), so
optimizers, ``requires_grad_``, DDP and checkpointing work as usual. The core at
``central_index`` is the central tensor; :meth:`MPOModule.freeze_central` gives MPOP's
lightweight fine-tuning (only auxiliary tensors train) and :meth:`MPOModule.central_parameters` /
:meth:`MPOModule.auxiliary_parameters` give per-group learning rates (the authors' ``mpo_lr``).

When no gradient is needed (under ``torch.no_grad()``/``inference_mode``, or with every core
frozen), the rebuilt dense weight is cached and reused until a core changes: any in-place update
of a core bumps its version counter, which the cache checks. (Writes through ``core.data`` bypass
the counter; call :meth:`MPOModule.clear_cache` after those.) In training, each forward either
rebuilds ``W`` once or contracts the activations through the cores, whichever
:func:`mpolab.contract.choose_path` finds cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import contract
from .decompose import decompose
from .mpo import MPO
from .options import TruncationOptions
from .shapes import plan_factors
from .step_weight import StepWeight
from .truncation import bond_caps

__all__ = [
    "HasCentralTensor",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "VersionedCache",
    "check_padding_idx",
    "init_cores_",
    "mpo_modules",
    "random_mpo",
]


@runtime_checkable
class HasCentralTensor(Protocol):
    """A module whose parameters split into central and auxiliary tensors (MPOP's two groups).

    :class:`MPOModule` satisfies it, and so does any module with these two methods (the MPO
    expert banks of ``mpolab_moe``): :func:`mpolab.set_trainable` and :func:`mpolab.param_groups`
    work on all of them. ``isinstance(module, HasCentralTensor)`` checks for the two methods.
    """

    def central_parameters(self) -> Iterator[nn.Parameter]:
        """The central tensor(s)."""
        ...

    def auxiliary_parameters(self) -> Iterator[nn.Parameter]:
        """The auxiliary tensors."""
        ...


class VersionedCache:
    """A tensor derived from some parameters, kept until one of them changes.

    The key is each parameter's storage, version counter, dtype and device, so in-place updates
    (optimizer steps, ``.to()``) invalidate it; writes through ``.data`` do not (call
    :meth:`clear`). Not carried by pickling or ``copy.deepcopy``.
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def get(self, params: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor, rebuilt with ``build()`` (without autograd) when ``params`` changed."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._entry is None or self._entry[0] != key:
            # A normal tensor even under inference_mode, so later autograd forwards can use it.
            with torch.inference_mode(False), torch.no_grad():
                self._entry = (key, build())
        return self._entry[1]

    def clear(self) -> None:
        self._entry = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_entry": None}


class MPOModule(nn.Module):
    """Shared machinery of the MPO layers: cores as parameters, central/auxiliary split, weight cache.

    The represented matrix is ``[out_features, in_features]``; for an embedding that is
    ``[num_embeddings, embedding_dim]``.
    """

    out_features: int
    in_features: int
    #: set by :func:`mpolab.materialize`: the weight is built once per optimiser step (``None``: every forward)
    step_weight: StepWeight | None = None

    def __init__(self, mpo: MPO, *, cache_weight: bool = True, original_type: str | None = None) -> None:
        """Cores copied from ``mpo`` into parameters.

        Args:
            mpo: the matrix ``[out_features, in_features]``.
            cache_weight: cache the rebuilt dense weight for no-grad forwards.
            original_type: class name of the dense layer this one replaced (``"Linear"``,
                ``"Conv1D"``, ``"Embedding"``), or ``None``; saved by :func:`mpolab.save`.
        """
        super().__init__()
        self.out_features, self.in_features = mpo.shape
        self.cores = nn.ParameterList(
            nn.Parameter(c.detach().clone(memory_format=torch.contiguous_format)) for c in mpo.cores
        )
        self.cache_weight = cache_weight
        self.original_type = original_type
        self._cache: VersionedCache | None = None  # created on the first cached rebuild

    # ------------------------------------------------------------------ structure
    @property
    def num_cores(self) -> int:
        return len(self.cores)

    @property
    def central_index(self) -> int:
        return MPO.central_index_for(self.num_cores)

    @property
    def out_factors(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_factors(self) -> tuple[int, ...]:
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def mpo(self) -> MPO:
        """The cores as an :class:`MPO` value (sharing storage, detached from autograd)."""
        return MPO([c.detach() for c in self.cores], self.out_features, self.in_features)

    def weight_parameters(self) -> list[nn.Parameter]:
        """The cores, in order (what the dense weight is rebuilt from; :class:`mpolab.step_weight.Materializable`)."""
        return list(self.cores)

    def num_mpo_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def set_mpo(self, mpo: MPO) -> dict[nn.Parameter, nn.Parameter]:
        """Replace the cores by those of ``mpo`` (ranks may change; shape and core count may not).

        New parameters keep each position's ``requires_grad``, dtype and device. Returns the
        ``{old: new}`` parameter mapping, for optimizers (see :func:`mpolab.squeeze`).
        """
        if mpo.shape != (self.out_features, self.in_features) or mpo.num_cores != self.num_cores:
            raise ValueError(
                f"set_mpo needs a {self.num_cores}-core MPO of shape [{self.out_features}, {self.in_features}], "
                f"got {mpo.num_cores} cores of shape {list(mpo.shape)}"
            )
        swaps = {}
        for k, new in enumerate(mpo.cores):
            old = self.cores[k]
            param = nn.Parameter(
                new.detach().to(old.device, old.dtype).clone(memory_format=torch.contiguous_format),
                requires_grad=old.requires_grad,
            )
            self.cores[k] = param
            swaps[old] = param
        self.clear_cache()
        return swaps

    # ------------------------------------------------------------------ training helpers
    def central_parameters(self) -> Iterator[nn.Parameter]:
        """The central tensor (one parameter)."""
        yield self.cores[self.central_index]

    def auxiliary_parameters(self) -> Iterator[nn.Parameter]:
        """The auxiliary tensors (every core but the central one)."""
        for k, core in enumerate(self.cores):
            if k != self.central_index:
                yield core

    def freeze_central(self) -> MPOModule:
        """MPOP lightweight fine-tuning: the central tensor stops training, auxiliary tensors train."""
        for p in self.central_parameters():
            p.requires_grad_(False)
        return self

    def unfreeze_central(self) -> MPOModule:
        for p in self.central_parameters():
            p.requires_grad_(True)
        return self

    # ------------------------------------------------------------------ dense weight
    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(c.requires_grad for c in self.cores)

    def _rebuild(self) -> torch.Tensor:
        return contract.merge_cores(list(self.cores))[0, : self.out_features, : self.in_features, 0]

    def dense_weight(self) -> torch.Tensor:
        """The represented matrix ``[out_features, in_features]``.

        Differentiable when gradients are needed (the step's leaf under :func:`mpolab.materialize`);
        otherwise served from (and stored in) the cache.
        """
        if self._needs_grad():
            if self.step_weight is not None:
                return self.step_weight.get(list(self.cores), self._rebuild)
            return self._rebuild()
        if self.step_weight is not None and (held := self.step_weight.peek(list(self.cores))) is not None:
            return held
        if not self.cache_weight:
            return self._rebuild()
        if self._cache is None:
            self._cache = VersionedCache()
        return self._cache.get(list(self.cores), self._rebuild)

    def _cached_weight_or_none(self) -> torch.Tensor | None:
        if self.cache_weight and not self._needs_grad():
            return self.dense_weight()
        return None

    def _step_weight_or_none(self, batch: int) -> torch.Tensor | None:
        """The step's materialised weight when training under :func:`mpolab.materialize` and the rebuild
        path wins for ``batch`` rows with the rebuild amortised over the step (else ``None``)."""
        if self.step_weight is None or not self._needs_grad():
            return None
        if contract.choose_path(contract.core_shapes(list(self.cores)), batch, weight_cached=True) != "dense":
            return None
        return self.step_weight.get(list(self.cores), self._rebuild)

    def clear_cache(self) -> None:
        """Drop the cached dense weight (it is rebuilt on the next no-grad call)."""
        self._cache = None

    def _apply(self, fn: Any, recurse: bool = True) -> MPOModule:  # .to(), .cuda(), .half()
        self._cache = None
        return super()._apply(fn, recurse)

    def _mpo_repr(self) -> str:
        dense = self.out_features * self.in_features
        return (
            f"out_factors={self.out_factors}, in_factors={self.in_factors}, ranks={self.ranks}, "
            f"params={self.num_mpo_params()} ({self.num_mpo_params() / dense:.1%} of dense)"
        )


class MPOLinear(MPOModule):
    """A linear layer ``y = x Wᵀ + b`` whose weight ``W: [out_features, in_features]`` is an MPO.

    Args:
        in_features, out_features: as :class:`torch.nn.Linear`.
        max_rank: bond dimension(s) of the randomly initialised MPO (int or one per bond).
        num_cores, in_factors, out_factors: how the sizes are factorised
            (:func:`mpolab.shapes.plan_factors`).
        bias: learn an additive bias.
        cache_weight: cache the rebuilt weight for no-grad forwards (costs one dense weight of
            memory; turn off to keep inference memory compressed).
        mpo: use this :class:`MPO` of ``[out_features, in_features]`` (its cores are copied)
            instead of a random one; ``max_rank`` and the factors are then ignored.
        original_type: class name of the dense layer this one replaces (saved by :func:`mpolab.save`).

    Shape:
        ``x: [..., in_features] -> [..., out_features]``.

    Examples:
        >>> layer = MPOLinear.from_linear(nn.Linear(768, 3072), rel_tol=0.1)
        >>> layer.freeze_central()
        >>> y = layer(torch.randn(8, 768))          # [8, 3072]
        >>> dense = layer.to_linear()
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        max_rank: int | Sequence[int] = 16,
        num_cores: int | None = None,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        bias: bool = True,
        cache_weight: bool = True,
        mpo: MPO | None = None,
        original_type: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        random = mpo is None
        mpo = _given_or_random(
            mpo,
            (out_features, in_features),
            ("out_features", "in_features"),
            max_rank=max_rank,
            num_cores=num_cores,
            out_factors=out_factors,
            in_factors=in_factors,
            device=device,
            dtype=dtype,
        )
        super().__init__(mpo, cache_weight=cache_weight, original_type=original_type)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features, device=mpo.device, dtype=mpo.dtype))
        else:
            self.register_parameter("bias", None)
        if random:
            self.reset_parameters()
        elif self.bias is not None:
            self._reset_bias()

    def reset_parameters(self) -> None:
        """Random cores whose product has ``nn.Linear``'s weight variance ``1 / (3·in_features)``.

        The bias is initialised as ``nn.Linear`` does.
        """
        init_cores_(self.cores, target_std=1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            self._reset_bias()
        self.clear_cache()

    def _reset_bias(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_mpo(
        cls,
        mpo: MPO,
        bias: torch.Tensor | None = None,
        *,
        cache_weight: bool = True,
        original_type: str | None = None,
    ) -> MPOLinear:
        """Wrap an :class:`MPO` of ``W: [out, in]`` (cores and ``bias: [out]`` are copied into parameters)."""
        if bias is not None and bias.shape != (mpo.out_features,):
            raise ValueError(f"bias must have shape [{mpo.out_features}], got {tuple(bias.shape)}")
        layer = cls(
            mpo.in_features,
            mpo.out_features,
            mpo=mpo,
            bias=bias is not None,
            cache_weight=cache_weight,
            original_type=original_type,
        )
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone().to(mpo.device))
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        options: TruncationOptions | None = None,
        cache_weight: bool = True,
        **decompose_kwargs: Any,
    ) -> MPOLinear:
        """Decompose a :class:`torch.nn.Linear` (bias kept, same device and dtype).

        The truncation is ``options`` or the ``decompose_kwargs`` of :func:`mpolab.decompose`
        (``num_cores``, ``max_rank``, ``rel_tol``, ``max_params``, ``ratio``, factors, ``svd``,
        ``pad``), not both.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        opts = TruncationOptions.from_kwargs(options, **decompose_kwargs)
        mpo = decompose(linear.weight.detach(), options=opts)
        return cls.from_mpo(mpo, linear.bias, cache_weight=cache_weight, original_type="Linear")

    def to_linear(self) -> nn.Linear:
        """A dense :class:`torch.nn.Linear` with the rebuilt weight (same device and dtype)."""
        weight = self._rebuild().detach()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` (rebuilt; for code that reads ``.weight``)."""
        return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MPOLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        weight = self._cached_weight_or_none()
        if weight is None:
            weight = self._step_weight_or_none(x.numel() // self.in_features)
        return contract.apply_mpo(
            x, list(self.cores), self.out_features, self.in_features, bias=self.bias, weight=weight
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._mpo_repr()}"
        )


def check_padding_idx(padding_idx: object, num_embeddings: int) -> int | None:
    """``padding_idx`` as :class:`torch.nn.Embedding` takes it: ``None`` or an int in
    ``[-num_embeddings, num_embeddings)``, negative ones counted from the end (returned normalised).

    Raises:
        TypeError: not an int (bools included).
        ValueError: outside the vocabulary.
    """
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be None or an int, got {padding_idx!r} ({type(padding_idx).__name__})")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx={padding_idx} is outside the vocabulary of {num_embeddings} embeddings "
            f"(valid: None or -{num_embeddings}..{num_embeddings - 1})"
        )
    return padding_idx % num_embeddings


class MPOEmbedding(MPOModule):
    """An embedding table ``[num_embeddings, embedding_dim]`` stored as an MPO.

    Lookups in training contract only the rows they need: the cores are split at one bond into
    a left block ``[I_L, J_L, r]`` and a right block ``[r, I_R, J_R]``, and a token ``v`` with
    ``(v_L, v_R) = divmod(v, I_R)`` gets ``L[v_L] @ R[:, v_R]``: ``O(tokens · dim · r)`` work,
    never the whole table. With no gradient needed, the cached table is indexed directly.

    Args:
        num_embeddings, embedding_dim, padding_idx: as :class:`torch.nn.Embedding`.
        max_rank, num_cores: structure of the randomly initialised MPO.
        mpo: use this :class:`MPO` of the table instead of a random one.
        cache_weight, original_type: as :class:`MPOLinear`.

    Shape:
        ``ids: [*] (int) -> [*, embedding_dim]``.

    Examples:
        >>> emb = MPOEmbedding.from_embedding(nn.Embedding(30522, 384), max_rank=64)
        >>> emb(torch.tensor([[101, 2023, 102]])).shape
        torch.Size([1, 3, 384])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        max_rank: int | Sequence[int] = 16,
        num_cores: int | None = None,
        padding_idx: int | None = None,
        cache_weight: bool = True,
        mpo: MPO | None = None,
        original_type: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        random = mpo is None
        mpo = _given_or_random(
            mpo,
            (num_embeddings, embedding_dim),
            ("num_embeddings", "embedding_dim"),
            max_rank=max_rank,
            num_cores=num_cores,
            device=device,
            dtype=dtype,
        )
        super().__init__(mpo, cache_weight=cache_weight, original_type=original_type)
        self.padding_idx = check_padding_idx(padding_idx, num_embeddings)
        if random:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random cores whose product has ``nn.Embedding``'s ``N(0, 1)`` entries."""
        init_cores_(self.cores, target_std=1.0)
        self.clear_cache()

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_mpo(
        cls,
        mpo: MPO,
        *,
        padding_idx: int | None = None,
        cache_weight: bool = True,
        original_type: str | None = None,
    ) -> MPOEmbedding:
        """Wrap an :class:`MPO` of the table ``[num_embeddings, embedding_dim]``."""
        return cls(
            mpo.out_features,
            mpo.in_features,
            mpo=mpo,
            padding_idx=padding_idx,
            cache_weight=cache_weight,
            original_type=original_type,
        )

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        *,
        options: TruncationOptions | None = None,
        cache_weight: bool = True,
        **decompose_kwargs: Any,
    ) -> MPOEmbedding:
        """Decompose a :class:`torch.nn.Embedding`'s table (rows are tokens).

        ``padding_idx`` is kept for :meth:`to_embedding`; its row is represented like any other
        (an MPO cannot pin one row's gradient to zero). ``max_norm`` and sparse gradients are
        not supported. The truncation is ``options`` or keywords of :func:`mpolab.decompose`.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("MPOEmbedding does not support max_norm or sparse=True embeddings")
        opts = TruncationOptions.from_kwargs(options, **decompose_kwargs)
        mpo = decompose(embedding.weight.detach(), options=opts)
        return cls.from_mpo(
            mpo, padding_idx=embedding.padding_idx, cache_weight=cache_weight, original_type="Embedding"
        )

    def to_embedding(self) -> nn.Embedding:
        weight = self._rebuild().detach()
        emb = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            emb.weight.copy_(weight)
        return emb

    @property
    def weight(self) -> torch.Tensor:
        """The dense table ``[num_embeddings, embedding_dim]`` (rebuilt)."""
        return self.dense_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"MPOEmbedding expects int64/int32 token ids, got {ids.dtype}")
        table = self._cached_weight_or_none()
        if table is None and self.step_weight is not None and self._needs_grad():
            table = self.step_weight.get(list(self.cores), self._rebuild)  # materialised: one table per step
        if table is not None:
            return F.embedding(ids, table)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"token ids must be in [0, {self.num_embeddings}), got range [{int(ids.min())}, {int(ids.max())}]"
            )
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = self._lookup(unique)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def _lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the table for distinct ``tokens: [N]`` -> ``[N, embedding_dim]``."""
        cores = list(self.cores)
        b = _best_split(cores, tokens.numel())
        left = contract.merge_cores(cores[:b])[0]  # [I_L, J_L, r]
        right = contract.merge_cores(cores[b:])[..., 0]  # [r, I_R, J_R]
        rows_right = right.shape[1]
        v_left, v_right = tokens.div(rows_right, rounding_mode="floor"), tokens.remainder(rows_right)
        rows = torch.bmm(left[v_left], right[:, v_right].transpose(0, 1))  # [N, J_L, J_R]
        return rows.reshape(tokens.numel(), -1)[:, : self.embedding_dim]

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, {self._mpo_repr()}"


def _best_split(cores: Sequence[torch.Tensor], num_tokens: int) -> int:
    """Bond to split the cores at for a lookup of ``num_tokens`` rows: least work in total."""

    def cost(b: int) -> int:
        rows_l = math.prod(c.shape[1] for c in cores[:b])
        cols_l = math.prod(c.shape[2] for c in cores[:b])
        rows_r = math.prod(c.shape[1] for c in cores[b:])
        cols_r = math.prod(c.shape[2] for c in cores[b:])
        r = cores[b].shape[0]
        return rows_l * cols_l * r + r * rows_r * cols_r + num_tokens * cols_l * cols_r * r

    return min(range(1, len(cores)), key=cost)


def random_mpo(
    out_features: int,
    in_features: int,
    *,
    max_rank: int | Sequence[int],
    num_cores: int | None = None,
    out_factors: Sequence[int] | None = None,
    in_factors: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MPO:
    """An MPO of ``[out_features, in_features]`` with the given structure and *uninitialised* cores.

    Bonds are ``max_rank`` clipped to what the factors allow; fill the cores with
    :func:`init_cores_` (or any initialiser) before use.

    Examples:
        >>> mpo = random_mpo(3072, 768, max_rank=16)
        >>> init_cores_(mpo.cores, target_std=0.02)
        >>> mpo.ranks
        (12, 16, 16, 16)
    """
    opts = TruncationOptions(max_rank=max_rank, num_cores=num_cores, out_factors=out_factors, in_factors=in_factors)
    plan = plan_factors(
        out_features,
        in_features,
        opts.num_cores_resolved,
        out_factors=opts.out_factors,
        in_factors=opts.in_factors,
    )
    ranks = bond_caps([i * j for i, j in zip(plan.out_factors, plan.in_factors)], max_rank=opts.max_rank)
    bonds = [1, *ranks, 1]
    dtype = dtype or torch.get_default_dtype()
    cores = [
        torch.empty(bonds[k], i, j, bonds[k + 1], device=device, dtype=dtype)
        for k, (i, j) in enumerate(zip(plan.out_factors, plan.in_factors))
    ]
    return MPO(cores, out_features, in_features)


@torch.no_grad()
def init_cores_(cores: Iterable[torch.Tensor], target_std: float) -> None:
    """Fill ``cores`` in place with Gaussians of one std ``σ`` so their product's entries have std ``target_std``.

    An entry of the product sums ``Π r_k`` products of ``n`` core entries, so its variance is
    ``σ^(2n) Π r_k``.
    """
    cores = list(cores)
    n = len(cores)
    bond_product = math.prod(int(c.shape[3]) for c in cores[:-1])
    sigma = (target_std**2 / bond_product) ** (1 / (2 * n))
    for core in cores:
        core.normal_(0.0, sigma)


def _given_or_random(mpo: MPO | None, shape: tuple[int, int], names: tuple[str, str], **structure: Any) -> MPO:
    """``mpo`` checked against ``shape``, or an uninitialised :func:`random_mpo` of ``structure``."""
    if mpo is None:
        return random_mpo(*shape, **structure)
    if not isinstance(mpo, MPO):
        raise TypeError(f"mpo must be an mpolab.MPO, got {type(mpo).__name__}")
    if mpo.shape != shape:
        raise ValueError(f"mpo has shape {list(mpo.shape)}, but {names[0]}={shape[0]} and {names[1]}={shape[1]}")
    return mpo


def mpo_modules(model: nn.Module) -> dict[str, MPOModule]:
    """Every MPO layer in ``model``, by qualified name (``model`` itself under ``""``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MPOModule)}
