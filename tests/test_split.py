"""MoEfication splits: balanced k-means (built-in and k-means-constrained), co-activation + METIS, baselines."""

import sys

import numpy as np
import pytest
import torch

from mpolab_moe.split import (
    _coactivation_counts,
    _rebalance,
    balanced_kmeans,
    check_split_sizes,
    coactivation_split,
    contiguous_split,
    groups_from_labels,
    neuron_activity,
    random_split,
)


def assert_partition(groups: torch.Tensor, F: int, E: int) -> None:
    assert groups.dtype == torch.long and groups.shape == (E, F // E)
    assert torch.equal(groups.reshape(-1).sort().values, torch.arange(F))


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return {tuple(sorted(r)) for r in a.tolist()} == {tuple(sorted(r)) for r in b.tolist()}


def planted(F: int, E: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of E well-separated directions (scaled, noisy, shuffled) and the true groups."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(E, d, generator=g), dim=1)
    label = torch.randperm(F, generator=g) % E
    scale = torch.rand(F, 1, generator=g) * 5 + 0.1  # normalisation must remove the scale
    w1 = (dirs[label] + 0.05 * torch.randn(F, d, generator=g)) * scale
    return w1, groups_from_labels(label, E)


def test_baselines() -> None:
    assert contiguous_split(12, 3).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    r = random_split(96, 8, seed=5)
    assert_partition(r, 96, 8)
    assert torch.equal(r, random_split(96, 8, seed=5)) and not torch.equal(r, random_split(96, 8, seed=6))
    assert torch.equal(r, r.sort(dim=1).values)


@pytest.mark.parametrize(
    "F,E,match",
    [(1536, 10, r"F=1536.*num_experts=10.*8, 12"), (8, 9, "more than"), (8, 0, ">= 1"), (0, 1, "at least one")],
)
def test_bad_sizes(F: int, E: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_split_sizes(F, E)
    if F > 0 and E > 0:
        with pytest.raises(ValueError, match=match):
            random_split(F, E)
        with pytest.raises(ValueError, match=match):
            balanced_kmeans(torch.randn(F, 4), E)


@pytest.mark.parametrize("method", ["builtin", "constrained"])
def test_balanced_kmeans_recovers_planted_clusters(method: str) -> None:
    w1, truth = planted(96, 6, 16)
    groups = balanced_kmeans(w1, 6, method=method)
    assert_partition(groups, 96, 6)
    assert same_partition(groups, truth)


def test_balanced_kmeans_is_balanced_on_unbalanced_data() -> None:
    # two natural clusters of 40 and 8 rows, asked for 4 equal groups of 12
    g = torch.Generator().manual_seed(0)
    w1 = torch.cat([torch.randn(40, 8, generator=g) * 0.1 + 3, torch.randn(8, 8, generator=g) * 0.1 - 3])
    for method in ("builtin", "constrained"):
        groups = balanced_kmeans(w1, 4, method=method)
        assert_partition(groups, 48, 4)
        small = [set(r) & set(range(40, 48)) for r in groups.tolist()]
        assert max(len(s) for s in small) == 8  # the small cluster stays together


def test_builtin_quality_matches_constrained_and_beats_random() -> None:
    torch.manual_seed(0)
    w1 = torch.randn(192, 24) + torch.randn(8, 24).repeat_interleave(24, 0) * 0.7

    def inertia(groups: torch.Tensor) -> float:
        x = torch.nn.functional.normalize(w1.double(), dim=1)[groups]
        return float((x - x.mean(1, keepdim=True)).square().sum())

    built, constrained = balanced_kmeans(w1, 8, method="builtin"), balanced_kmeans(w1, 8, method="constrained")
    assert inertia(built) <= 1.02 * inertia(constrained)
    assert inertia(built) < 0.9 * inertia(random_split(192, 8))


def test_balanced_kmeans_seed_and_errors() -> None:
    w1 = torch.randn(64, 8)
    assert torch.equal(balanced_kmeans(w1, 4, seed=1), balanced_kmeans(w1, 4, seed=1))
    assert torch.equal(balanced_kmeans(w1, 1), torch.arange(64).view(1, -1))
    with pytest.raises(ValueError, match="method"):
        balanced_kmeans(w1, 4, method="spectral")
    with pytest.raises(ValueError, match=r"\[F, d\]"):
        balanced_kmeans(torch.randn(64), 4)


def test_missing_optional_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "k_means_constrained", None)
    monkeypatch.setitem(sys.modules, "pymetis", None)
    with pytest.raises(ImportError, match=r"mpolab-torch\[moefication\]"):
        balanced_kmeans(torch.randn(16, 4), 4, method="constrained")
    with pytest.raises(ImportError, match=r"mpolab-torch\[moefication\]"):
        coactivation_split(torch.randn(16, 4), None, torch.randn(8, 4), 4)


def test_coactivation_counts_match_a_token_loop() -> None:
    a = torch.rand(21, 10) * (torch.rand(21, 10) > 0.6)
    ref = torch.zeros(10, 10)
    for start in range(0, 21, 8):
        block = a[start : start + 8]
        ref += sum(torch.outer(t, t) for t in block).clamp(max=1)
    torch.testing.assert_close(_coactivation_counts(a, 8), ref)


def test_coactivation_split_groups_neurons_that_fire_together() -> None:
    # neuron i listens to input direction label[i]; each token excites one direction
    F, E = 64, 4
    g = torch.Generator().manual_seed(0)
    label = torch.randperm(F, generator=g) % E
    w1 = torch.eye(E)[label] + 0.01 * torch.randn(F, E, generator=g)
    tokens = torch.eye(E)[torch.randint(E, (400,), generator=g)] * (torch.rand(400, 1, generator=g) + 0.5)
    groups = coactivation_split(w1, torch.full((F,), -0.1), tokens, E, activation="relu", batch=1)
    assert_partition(groups, F, E)
    assert same_partition(groups, groups_from_labels(label, E))


def test_coactivation_split_rebalances_and_validates() -> None:
    F, E = 48, 4
    g = torch.Generator().manual_seed(1)
    label = torch.randint(3, (F,), generator=g)  # three natural groups of uneven size for four experts
    w1 = torch.eye(3)[label] + 0.01 * torch.randn(F, 3, generator=g)
    tokens = torch.eye(3)[torch.randint(3, (300,), generator=g)]
    groups = coactivation_split(w1, None, tokens, E, activation="gelu", w_gate=None)
    assert_partition(groups, F, E)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        coactivation_split(w1, None, torch.randn(10, 4), E)
    with pytest.raises(ValueError, match="no co-activation"):
        coactivation_split(w1, torch.full((F,), -10.0), tokens, E, activation="relu")


def test_rebalance_moves_only_surplus() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2] * 2 + [3] * 4)
    out = _rebalance(labels, 4, 4, seed=0)
    assert np.bincount(out, minlength=4).tolist() == [4, 4, 4, 4]
    assert (out[7:10] == 1).all() and (out[10:12] == 2).all() and (out[12:] == 3).all()


def test_neuron_activity_rules() -> None:
    x, w1, wg = torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 3)
    a = neuron_activity(x, w1, activation="gelu")
    torch.testing.assert_close(a, torch.nn.functional.gelu(x @ w1.T).clamp(min=0))
    g = neuron_activity(x, w1, activation="silu", w_gate=wg)
    torch.testing.assert_close(g, (torch.nn.functional.silu(x @ wg.T) * (x @ w1.T)).abs())
