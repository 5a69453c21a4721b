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
