"""grouped_matmul (both strategies) and expand_per_row."""

import pytest
import torch

from mpolab_moe.experts import base
from mpolab_moe.experts.base import expand_per_row, grouped_matmul


def loop_reference(x, weight, counts):
    return torch.cat([chunk @ weight[e] for e, chunk in enumerate(torch.split(x, counts))])


@pytest.mark.parametrize(
    "counts",
    [[5, 5, 5, 5], [6, 5, 4, 5], [20, 0, 0, 0], [0, 3, 0, 9], [1, 0, 0, 0]],
    ids=["equal", "near-balanced", "one-group", "gaps", "single-row"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["per-group", "padded-bmm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_grouped_matmul_matches_per_group_products(counts, padded, with_bias, monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(sum(counts), 7), torch.randn(4, 7, 3)
    bias = torch.randn(4, 3) if with_bias else None
    calls = []
    real = base.padded_bmm
    monkeypatch.setattr(base, "use_padded_bmm", lambda x, counts: padded)
    monkeypatch.setattr(base, "padded_bmm", lambda *a: calls.append(1) or real(*a))
    expected = loop_reference(x, w, counts)
    if with_bias:
        expected = expected + expand_per_row(bias, counts)
    torch.testing.assert_close(grouped_matmul(x, w, counts, bias), expected)
    assert bool(calls) == padded


def test_padded_bmm_only_on_accelerators_with_balanced_groups():
    x = torch.randn(20, 3)
    assert not base.use_padded_bmm(x, [5, 5, 5, 5])  # CPU: one GEMM per group is faster
    meta = torch.empty(20, 3, device="meta")
    assert base.use_padded_bmm(meta, [5, 5, 5, 5]) and base.use_padded_bmm(meta, [6, 5, 4, 5])
    assert not base.use_padded_bmm(meta, [20, 0, 0, 0])


def test_grouped_matmul_gradients_and_errors():
    x = torch.randn(8, 3, requires_grad=True)
    w = torch.randn(2, 3, 4, requires_grad=True)
    grouped_matmul(x, w, [4, 4]).sum().backward()
    assert x.grad.shape == x.shape and w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="counts has 3 groups, weight has 2"):
        grouped_matmul(x, w, [4, 2, 2])
    with pytest.raises(ValueError, match=r"bias must be \[E=2, 4\]"):
        grouped_matmul(x, w, [4, 4], torch.zeros(4))
    assert grouped_matmul(x[:0], w, [0, 0]).shape == (0, 4)


def test_expand_per_row():
    values = torch.tensor([[1.0], [2.0], [3.0]])
    assert expand_per_row(values, [2, 0, 1]).flatten().tolist() == [1.0, 1.0, 3.0]
