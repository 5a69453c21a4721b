"""Dense experts run expert by expert through the activation (chunked_ffn): same values and gradients."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mpolab_moe.experts.base import chunked_ffn, grouped_ffn, grouped_matmul


def _layerwise(x, counts, w1, w2, act, w_gate=None, b1=None, b2=None):
    h = grouped_matmul(x, w1, counts, b1)
    h = act(grouped_matmul(x, w_gate, counts)) * h if w_gate is not None else act(h)
    return grouped_matmul(h, w2, counts, b2)


@contextlib.contextmanager
def _nan_filled_empty():
    """``torch.empty`` returns NaN-filled memory inside the block (deterministic mode's option)."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_ffn_matches_the_layerwise_reference(gated, bias):
    torch.manual_seed(0)
    E, d, Fd, counts = 4, 8, 16, [3, 0, 5, 2]  # an empty expert too
    x = torch.randn(sum(counts), d, requires_grad=True)
    params = {
        "w1": torch.randn(E, d, Fd, requires_grad=True),
        "w2": torch.randn(E, Fd, d, requires_grad=True),
        "w_gate": torch.randn(E, d, Fd, requires_grad=True) if gated else None,
        "b1": torch.randn(E, Fd, requires_grad=True) if bias else None,
        "b2": torch.randn(E, d, requires_grad=True) if bias else None,
    }
    act = F.silu if gated else F.relu
    ours = chunked_ffn(
        x, counts, params["w1"], params["w2"], act, w_gate=params["w_gate"], b1=params["b1"], b2=params["b2"]
    )
    ref = _layerwise(x, counts, act=act, **params)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grouped_ffn(x, counts, act=act, **params), ref)  # grouped_ffn takes this path
    leaves = [x, *(p for p in params.values() if p is not None)]
    # the backward allocates its gradients uninitialised: deterministic mode fills such memory with
    # NaN, so an expert slice left unwritten (the empty expert's) would show
    with _nan_filled_empty():
        g_ours = torch.autograd.grad(ours.square().sum(), leaves)
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="counts has 3 groups, w1 has 4"):
        chunked_ffn(x, [3, 5, 2], params["w1"], params["w2"], act)


@pytest.mark.parametrize("gated", [False, True])
def test_groups_of_any_expert_with_scaled_weight_gradients(gated):
    """Groups in any expert order, an expert owning several groups (rows from several ranks), and the
    weights' gradients scaled inside their GEMMs: as a per-group reference, weights' grads times 0.5."""
    torch.manual_seed(1)
    E, d, Fd = 3, 6, 10
    counts, experts = [2, 3, 0, 1, 2, 4], [0, 1, 2, 0, 1, 1]  # expert 2's only group is empty
    x = torch.randn(sum(counts), d, requires_grad=True)
    params = {
        "w1": torch.randn(E, d, Fd, requires_grad=True),
        "w2": torch.randn(E, Fd, d, requires_grad=True),
        "w_gate": torch.randn(E, d, Fd, requires_grad=True) if gated else None,
        "b1": torch.randn(E, Fd, requires_grad=True),
        "b2": torch.randn(E, d, requires_grad=True),
    }
    act = F.silu if gated else F.relu
    p = params
    parts, start = [], 0
    for e, n in zip(experts, counts):
        xe = x[start : start + n]
        h = xe @ p["w1"][e] + p["b1"][e]
        h = act(xe @ p["w_gate"][e]) * h if gated else act(h)
        parts.append(h @ p["w2"][e] + p["b2"][e])
        start += n
    ref = torch.cat(parts)
    ours = chunked_ffn(x, counts, act=act, experts=experts, weight_grad_scale=0.5, **params)
    torch.testing.assert_close(ours, ref)
    leaves = [x, *(q for q in params.values() if q is not None)]
    with _nan_filled_empty():
        g_ours = torch.autograd.grad(ours.square().sum(), leaves)
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-4, atol=1e-4)  # the input's gradient is not scaled
    for a, b in zip(g_ours[1:], g_ref[1:]):
        torch.testing.assert_close(a, 0.5 * b, rtol=1e-4, atol=1e-4)
    assert float(g_ours[1][2].abs().sum()) == 0.0  # the idle expert's slice: zeros, not garbage


def test_groups_need_a_valid_expert_per_group():
    x, w1, w2 = torch.randn(3, 4), torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"experts must give each of the 2 groups an expert id in \[0, 2\)"):
        chunked_ffn(x, [1, 2], w1, w2, F.relu, experts=[0, 2])
    with pytest.raises(ValueError, match="experts must give each of the 2 groups"):
        chunked_ffn(x, [1, 2], w1, w2, F.relu, experts=[0])
