"""Split the ``F`` hidden neurons of a dense FFN into ``E`` equal groups (MoEfication, EMoE).

Every function returns ``groups``, an int64 tensor ``[E, F/E]`` whose rows list each expert's
neuron indices (a permutation of ``range(F)``, each row sorted), ready for
:meth:`~mpolab_moe.experts.sliced.SlicedExperts.from_ffn`:

* :func:`balanced_kmeans`: parameter clustering, balanced k-means on the L2-normalised rows of
  ``W1`` (MoEfication, EMoE). A built-in balanced assignment (default) or ``k-means-constrained``;
* :func:`coactivation_split`: neurons that fire together go together, a co-activation graph from
  recorded hidden states partitioned with METIS (``pymetis``), then rebalanced;
* :func:`random_split` and :func:`contiguous_split`: baselines.

The optional dependencies come with ``pip install mpolab-torch[moefication]``.

Examples:
    >>> groups = balanced_kmeans(ffn.w1, num_experts=16)             # [16, F/16]
    >>> bank = SlicedExperts.from_ffn(ffn, groups)                     # ffn from find_ffns
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .activations import get_activation

__all__ = [
    "balanced_kmeans",
    "check_split_sizes",
    "coactivation_split",
    "contiguous_split",
    "groups_from_labels",
    "neuron_activity",
    "random_split",
]

EXTRA = "pip install mpolab-torch[moefication]"

#: The built-in method polishes its balanced k-means with exact assignments (``linear_sum_assignment``
#: on an ``F x F`` cost matrix) up to this many neurons; above it the greedy assignment is final.
EXACT_ASSIGNMENT_MAX_F = 4096


def check_split_sizes(num_neurons: int, num_experts: int) -> int:
    """``F / E`` after checking that ``E`` splits ``F`` into equal groups.

    Raises:
        ValueError: ``E < 1``, ``E > F``, or ``F`` not divisible by ``E`` (the message lists valid ``E``).
    """
    F_, E = num_neurons, num_experts
    for name, value in (("num_neurons", F_), ("num_experts", E)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if F_ < 1:
        raise ValueError(f"the FFN must have at least one hidden neuron, got F={F_}")
    if E < 1:
        raise ValueError(f"num_experts must be >= 1, got {E}")
    if E > F_:
        raise ValueError(f"num_experts={E} is more than the FFN's F={F_} hidden neurons")
    if F_ % E:
        divisors = [e for e in range(1, F_ + 1) if F_ % e == 0]
        near = sorted(divisors, key=lambda e: (abs(e - E), e))[:4]
        raise ValueError(
            f"F={F_} hidden neurons do not split into num_experts={E} equal groups; "
            f"valid num_experts near {E}: {sorted(near)}"
        )
    return F_ // E


def groups_from_labels(labels: Tensor | np.ndarray, num_experts: int) -> Tensor:
    """Cluster labels ``[F]`` (each ``0..E-1``, exactly ``F/E`` each) -> ``groups [E, F/E]``, rows sorted."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    m = check_split_sizes(labels.numel(), num_experts)
    counts = torch.bincount(labels, minlength=num_experts)
    if counts.numel() != num_experts or not bool((counts == m).all()):
        raise ValueError(f"labels must give each of {num_experts} experts exactly {m} neurons, got {counts.tolist()}")
    return torch.argsort(labels, stable=True).view(num_experts, m)


def random_split(num_neurons: int, num_experts: int, seed: int = 0) -> Tensor:
    """Baseline: a random permutation of ``range(F)`` cut into ``E`` groups ``[E, F/E]`` (rows sorted).

    Examples:
        >>> random_split(8, 2, seed=0).shape
        torch.Size([2, 4])
    """
    m = check_split_sizes(num_neurons, num_experts)
    perm = torch.randperm(num_neurons, generator=torch.Generator().manual_seed(seed))
    return perm.view(num_experts, m).sort(dim=1).values


def contiguous_split(num_neurons: int, num_experts: int) -> Tensor:
    """Baseline: neurons ``e*F/E .. (e+1)*F/E - 1`` form expert ``e``.

    Examples:
        >>> contiguous_split(6, 3).tolist()
        [[0, 1], [2, 3], [4, 5]]
    """
    m = check_split_sizes(num_neurons, num_experts)
    return torch.arange(num_neurons).view(num_experts, m)


# ------------------------------------------------------------------------------ balanced k-means


def balanced_kmeans(
    w1: Tensor,
    num_experts: int,
    *,
    seed: int = 0,
    method: Literal["auto", "builtin", "constrained"] = "auto",
    n_init: int | None = None,
    max_iter: int = 100,
) -> Tensor:
    """Parameter clustering: balanced k-means of the L2-normalised rows of ``w1``.

    Args:
        w1: ``[F, d]`` the neurons' key rows (``W1``; for gated FFNs the gate projection).
        num_experts: ``E``; must divide ``F``.
        seed: random state (k-means++ seeding).
        method: ``"builtin"`` (k-means++ seeding, Lloyd iterations whose assignment step fills
            every cluster with exactly ``F/E`` neurons greedily by regret, then exact assignments
            with :func:`scipy.optimize.linear_sum_assignment` until stable when
            ``F <= EXACT_ASSIGNMENT_MAX_F``); ``"constrained"`` (``k_means_constrained`` as the
            MoEfication authors used, min-cost-flow assignments, slower); ``"auto"``: builtin.
        n_init: runs from different seeds, the lowest inertia wins. Default: 1 for builtin, 10 for
            constrained (``KMeansConstrained``'s default, which the authors ran).
        max_iter: Lloyd iterations of the built-in method.

    Returns:
        ``groups [E, F/E]`` int64.

    Raises:
        ValueError: bad sizes (see :func:`check_split_sizes`), an unknown method, or ``"constrained"``
            without ``k_means_constrained`` installed.

    Examples:
        >>> groups = balanced_kmeans(bert.encoder.layer[0].intermediate.dense.weight, 16)
    """
    if not isinstance(w1, Tensor) or w1.dim() != 2:
        raise ValueError(f"w1 must be a 2-D tensor [F, d], got {getattr(w1, 'shape', type(w1).__name__)}")
    m = check_split_sizes(w1.shape[0], num_experts)
    if method not in ("auto", "builtin", "constrained"):
        raise ValueError(f"method must be 'auto', 'builtin' or 'constrained', got {method!r}")
    x = torch.nn.functional.normalize(w1.detach().to("cpu", torch.float32), dim=1)
    if num_experts == 1:
        return torch.arange(w1.shape[0]).view(1, -1)
    if n_init is not None and (not isinstance(n_init, int) or n_init < 1):
        raise ValueError(f"n_init must be a positive int or None, got {n_init!r}")
    if method == "constrained":
        module = _optional("k_means_constrained", "balanced_kmeans(method='constrained')")
        km = module.KMeansConstrained(
            n_clusters=num_experts, size_min=m, size_max=m, random_state=seed, n_init=n_init or 10
        )
        labels = km.fit_predict(x.double().numpy())
        return groups_from_labels(labels, num_experts)
    best: tuple[float, np.ndarray] | None = None
    for run in range(n_init or 1):
        labels = _builtin_balanced_kmeans(x, num_experts, m, seed + run, max_iter)
        score = _inertia(x, labels, num_experts, m)
        if best is None or score < best[0]:
            best = (score, labels)
    assert best is not None
    return groups_from_labels(best[1], num_experts)


def _inertia(x: Tensor, labels: np.ndarray, k: int, m: int) -> float:
    """Sum of squared distances of the rows of ``x`` to their cluster means."""
    return float((x - _centers(x, labels, k, m)[torch.from_numpy(labels)]).square().sum())


def _optional(module: str, what: str):  # noqa: ANN202 - a module
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the optional package {module!r}: {EXTRA}") from None


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: ``k`` rows of ``x [F, d]`` -> centers ``[k, d]``."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centers = [x[first]]
    dist = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        nxt = int(torch.multinomial(dist.clamp(min=0) + 1e-12, 1, generator=generator))
        centers.append(x[nxt])
        dist = torch.minimum(dist, (x - x[nxt]).square().sum(1))
    return torch.stack(centers)


def _greedy_balanced(cost: np.ndarray, m: int) -> np.ndarray:
    """Assign rows of ``cost [F, E]`` to columns, ``m`` rows each; rows with most to lose choose first."""
    F_, E = cost.shape
    pref = np.argsort(cost, axis=1)
    ranked = np.take_along_axis(cost, pref[:, :2], axis=1)
    order = np.argsort(ranked[:, 0] - ranked[:, 1], kind="stable")  # most negative = largest regret first
    room = [m] * E
    labels = np.empty(F_, dtype=np.int64)
    prefs = pref.tolist()
    for i in order.tolist():
        for e in prefs[i]:
            if room[e]:
                room[e] -= 1
                labels[i] = e
                break
    return labels


def _exact_balanced(cost: np.ndarray, m: int) -> np.ndarray:
    """Optimal balanced assignment: ``linear_sum_assignment`` with every column repeated ``m`` times."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.repeat(cost, m, axis=1))
    labels = np.empty(cost.shape[0], dtype=np.int64)
    labels[rows] = cols // m
    return labels


def _centers(x: Tensor, labels: np.ndarray, k: int, m: int) -> Tensor:
    """Cluster means ``[k, d]`` of balanced labels (``m`` rows each)."""
    order = torch.from_numpy(np.argsort(labels, kind="stable"))
    return x[order].view(k, m, -1).mean(1)


def _builtin_balanced_kmeans(x: Tensor, k: int, m: int, seed: int, max_iter: int) -> np.ndarray:
    """Balanced Lloyd iterations on unit rows ``x [F, d]``; returns labels ``[F]``.

    Greedy assignments first (cheap, near optimal), then exact ones, each followed by a centroid
    update; with exact assignments every step lowers the inertia or stops.
    """
    gen = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp(x, k, gen)
    labels: np.ndarray | None = None

    def cost(c: Tensor) -> np.ndarray:  # squared distance up to the constant ||x||^2 = 1
        return (c.square().sum(1) - 2 * x @ c.T).numpy()

    best = float("inf")
    for _ in range(max_iter):  # greedy assignments need not lower the inertia: stop when they stop helping
        new = _greedy_balanced(cost(centers), m)
        if labels is not None and np.array_equal(new, labels):
            break
        new_centers = _centers(x, new, k, m)
        score = float((x - new_centers[torch.from_numpy(new)]).square().sum())
        if score >= best * (1 - 1e-6):
            break
        labels, centers, best = new, new_centers, score
    assert labels is not None
    if x.shape[0] <= EXACT_ASSIGNMENT_MAX_F:
        for _ in range(max_iter):
            new = _exact_balanced(cost(centers), m)
            if np.array_equal(new, labels):
                break
            labels = new
            centers = _centers(x, labels, k, m)
    return labels


# ------------------------------------------------------------------------------ co-activation


def neuron_activity(
    hidden_states: Tensor,
    w1: Tensor,
    b1: Tensor | None = None,
    *,
    activation: str | Callable[[Tensor], Tensor] = "relu",
    w_gate: Tensor | None = None,
) -> Tensor:
    """How strongly each neuron fires for each token, ``>= 0``: ``[N, d]`` -> ``[N, F]``.

    Plain FFNs: the positive part of ``act(x W1^T + b1)`` (ReLU's activation exactly, as MoEfication
    uses; GELU's negative lobe is bounded by 0.17 and dropped). Gated FFNs (SwiGLU): the magnitude
    ``|act(x Wg^T) * (x W1^T)|`` of the intermediate activation, whose sign the up branch sets.
    """
    act = get_activation(activation)
    pre = hidden_states @ w1.T
    if b1 is not None:
        pre = pre + b1
    if w_gate is not None:
        return (act(hidden_states @ w_gate.T) * pre).abs()
    return act(pre).clamp(min=0)


def coactivation_split(
    w1: Tensor,
    b1: Tensor | None,
    hidden_states: Tensor,
    num_experts: int,
    *,
    activation: str | Callable[[Tensor], Tensor] = "relu",
    w_gate: Tensor | None = None,
    batch: int = 8,
    seed: int = 0,
) -> Tensor:
    """Group neurons that fire together: co-activation graph + METIS + rebalancing (MoEfication).

    1. ``a = neuron_activity(h) [N, F]``; for each batch of ``batch`` consecutive tokens,
       ``clamp(sum_t a_t a_t^T, max=1)`` is added to ``A [F, F]`` (batched matmuls, no token loop);
    2. the threshold is the first non-zero of the 10th, 20th, ... percentiles of ``A``, times 0.99;
       ``A`` is divided by it and pairs with ``A_ij >= 1`` become edges of weight ``int(A_ij)``;
    3. METIS (``pymetis``) cuts the graph into ``E`` parts; over-full parts give random surplus
       members to under-full ones until each holds ``F/E``.

    Args:
        w1: ``[F, d]``; b1: ``[F]`` or ``None``; w_gate: ``[F, d]`` for gated FFNs.
        hidden_states: ``[N, d]`` inputs of the FFN recorded on real text (MoEfication used ~200k tokens).
        num_experts: ``E``, must divide ``F``.
        activation: the FFN's activation; batch: tokens per clamped outer-product sum; seed: METIS
            and rebalancing seed.

    Returns:
        ``groups [E, F/E]`` int64.

    Raises:
        ImportError: ``pymetis`` missing (names the extra to install).
        ValueError: bad sizes, hidden states of the wrong width, or no co-activation at all.

    Examples:
        >>> groups = coactivation_split(ffn.w1, ffn.b1, recorded_inputs, 16, activation="gelu")
    """
    pymetis = _optional("pymetis", "coactivation_split")
    F_, d = w1.shape
    m = check_split_sizes(F_, num_experts)
    if hidden_states.dim() != 2 or hidden_states.shape[1] != d:
        raise ValueError(f"hidden_states must be [N, {d}] (the FFN's input width), got {tuple(hidden_states.shape)}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if num_experts == 1:
        return torch.arange(F_).view(1, -1)
    with torch.no_grad():
        a = neuron_activity(hidden_states.float(), w1.float(), None if b1 is None else b1.float(),
                            activation=activation, w_gate=None if w_gate is None else w_gate.float())  # fmt: skip
        A = _coactivation_counts(a, batch)
    weights = _threshold_edges(A.cpu().numpy())
    if weights.nnz == 0:
        raise ValueError("the hidden states produce no co-activation between different neurons; record more tokens")
    opts = pymetis.Options(seed=int(seed))
    starts, adjacent = weights.indptr.astype(np.int64), weights.indices.astype(np.int64)
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2
        graph = {"adjacency": pymetis.CSRAdjacency(starts, adjacent)}
    else:
        graph = {"xadj": starts, "adjncy": adjacent}
    _, membership = pymetis.part_graph(num_experts, **graph, eweights=weights.data.astype(np.int64), options=opts)
    labels = _rebalance(np.asarray(membership, dtype=np.int64), num_experts, m, seed)
    return groups_from_labels(labels, num_experts)


def _coactivation_counts(a: Tensor, batch: int) -> Tensor:
    """``sum_b clamp(a_b^T a_b, max=1)`` over consecutive ``batch``-token blocks of ``a [N, F]`` -> ``[F, F]``."""
    N, F_ = a.shape
    pad = (-N) % batch
    if pad:
        a = torch.cat([a, a.new_zeros(pad, F_)])
    blocks = a.view(-1, batch, F_)
    chunk = max(1, (1 << 26) // (F_ * F_))  # about 256 MB of [chunk, F, F] at a time
    A = a.new_zeros(F_, F_)
    for part in torch.split(blocks, chunk):
        A += torch.bmm(part.transpose(1, 2), part).clamp_(max=1).sum(0)
    return A


def _threshold_edges(A: np.ndarray):  # noqa: ANN202 - scipy.sparse.csr_matrix
    """Integer edge weights ``int(A / t)`` where ``>= 1``, ``t`` = 0.99 x the first non-zero decile; no self-loops."""
    from scipy.sparse import csr_matrix

    A = A.astype(np.float64)
    np.fill_diagonal(A, 0)
    flat = A.reshape(-1)
    threshold = 0.0
    for pos in range(10, 101, 10):
        threshold = float(np.percentile(flat, pos))
        if threshold > 0:
            break
    if threshold <= 0:
        return csr_matrix(A.shape, dtype=np.int64)
    scaled = A / (threshold * 0.99)
    scaled[scaled < 1] = 0
    weights = np.minimum(scaled, 2**30 // max(1, A.shape[0])).astype(np.int64)  # METIS sums weights in int32
    graph = csr_matrix(weights)
    graph.eliminate_zeros()
    return graph


def _rebalance(labels: np.ndarray, k: int, m: int, seed: int) -> np.ndarray:
    """Move random members of over-full parts to under-full ones until every part has ``m``."""
    rng = np.random.default_rng(seed)
    labels = labels.copy()
    surplus: list[int] = []
    for e in range(k):
        members = np.flatnonzero(labels == e)
        if members.size > m:
            surplus.extend(rng.choice(members, members.size - m, replace=False).tolist())
    rng.shuffle(surplus)
    counts = np.bincount(labels, minlength=k)
    for e in range(k):
        missing = m - counts[e] if counts[e] < m else 0
        for _ in range(missing):
            labels[surplus.pop()] = e
    return labels
