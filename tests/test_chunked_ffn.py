"""Dense experts run expert by expert through the activation (chunked_ffn): same values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from mpolab_moe.experts.base import chunked_ffn, grouped_ffn, grouped_matmul
from tests._memory import nan_filled_empty


def _layerwise(x, counts, w1, w2, act, w_gate=None, b1=None, b2=None):
    h = grouped_matmul(x, w1, counts, b1)
    h = act(grouped_matmul(x, w_gate, counts)) * h if w_gate is not None else act(h)
    return grouped_matmul(h, w2, counts, b2)


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
    with nan_filled_empty():
        g_ours = torch.autograd.grad(ours.square().sum(), leaves)
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="counts has 3 groups, w1 has 4"):
        chunked_ffn(x, [3, 5, 2], params["w1"], params["w2"], act)


class _Grouped:
    """A stacked weight behind the GroupedLinear interface: sends grouped_ffn down its layer-wise path."""

    def __init__(self, w):
        self.w = w

    def __call__(self, x, counts, bias=None):
        return grouped_matmul(x, self.w, counts, bias)


@pytest.mark.parametrize("path", ["chunked", "layerwise"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("moves", ["runs", "ids"])
def test_rows_in_any_order_with_padding_and_a_weight_gradient_factor(path, gated, moves, monkeypatch):
    """order= reads each expert's rows where they are and writes its outputs back there (padding rows 0);
    weight_grad_scale= multiplies the parameters' gradients, not the input's."""
    from mpolab_moe.experts import base

    torch.manual_seed(0)
    E, d, Fd, counts = 3, 8, 16, [4, 0, 3]
    M = 10  # rows of x; 7 of them are listed in order, 3 are padding
    # sorted row i lives in x[order[i]]: expert 0 in two runs (7..8 and 2..3, as from two source
    # ranks), expert 2 in one (4..6, computed straight into its rows)
    order = torch.tensor([7, 8, 2, 3, 4, 5, 6])
    padding = torch.tensor([0, 1, 9])
    if moves == "ids":  # every row moved by its id (scattered rows, or not on the CPU)
        monkeypatch.setattr(base._Layout, "MAX_RUNS_PER_EXPERT", 0)
    layout = base._Layout(counts, order, M, 1.0)
    assert layout.where[0] == [(7, 2), (2, 2)] if moves == "runs" else isinstance(layout.where[0], torch.Tensor)
    x = torch.randn(M, d, requires_grad=True)
    params = {
        "w1": torch.randn(E, d, Fd, requires_grad=True),
        "w2": torch.randn(E, Fd, d, requires_grad=True),
        "w_gate": torch.randn(E, d, Fd, requires_grad=True) if gated else None,
        "b1": torch.randn(E, Fd, requires_grad=True),
        "b2": torch.randn(E, d, requires_grad=True),
    }
    act = F.silu if gated else F.relu
    if path == "layerwise":  # GroupedLinear weights: the gather / place fallback
        weights = {k: (_Grouped(v) if k in ("w1", "w2", "w_gate") and v is not None else v) for k, v in params.items()}
    else:
        weights = params
    leaves = [x, *(p for p in params.values() if p is not None)]
    probe = torch.randn(M, d)
    with nan_filled_empty():  # an unwritten row or slice would show as NaN
        ours = grouped_ffn(x, counts, act=act, order=order, weight_grad_scale=0.25, **weights)
        g_ours = torch.autograd.grad((ours * probe).sum(), leaves)
    sorted_ref = _layerwise(x[order], counts, act=act, **params)
    ref = torch.zeros(M, d).index_copy(0, order, sorted_ref)
    torch.testing.assert_close(ours, ref)
    assert torch.equal(ours[padding], torch.zeros(3, d))
    g_ref = torch.autograd.grad((ref * probe).sum(), leaves)
    torch.testing.assert_close(g_ours[0], g_ref[0])  # the input's gradient: not scaled
    assert torch.equal(g_ours[0][padding], torch.zeros(3, d))
    for a, b in zip(g_ours[1:], g_ref[1:]):
        torch.testing.assert_close(a, 0.25 * b)
    with pytest.raises(ValueError, match="order must be a 1-D int64"):
        chunked_ffn(x, counts, params["w1"], params["w2"], act, order=order.to(torch.int32))
    with pytest.raises(ValueError, match="order lists 7 rows"):
        chunked_ffn(x, [4, 0, 4], params["w1"], params["w2"], act, order=order)


@pytest.mark.parametrize("ordered", [False, True])
def test_an_input_modified_in_place_after_the_forward_is_refused_in_the_backward(ordered):
    """The experts' input rows are saved for the backward as views of x: autograd's version check still holds."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    h = x * 1  # a non-leaf, as a layer's input is
    w1, w2 = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    order = torch.tensor([3, 4, 5, 0, 1, 2]) if ordered else None  # one run per expert: views of h
    y = chunked_ffn(h, [3, 3], w1, w2, torch.relu, order=order)
    torch.autograd.grad(y.sum(), [w1], retain_graph=True)  # fine before the modification
    h.add_(1.0)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(y.sum(), [w1])
