"""Property suite for the MoE layer: token counts, empty batches, dtypes, NaN inputs, batch independence.

For random sizes, gates and banks: the output has the input's leading shape; dropless top-k
routing hands every token to exactly ``k`` experts (``tokens_per_expert`` sums to ``k·T``); an
empty batch gives an empty output; the output dtype follows the layer's; non-finite hidden states
are a clear ``ValueError``; in eval mode a token's output does not depend on the other tokens of
the batch (capacity or not).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpolab_moe import DenseExperts, ExpertBank, Gate, MoE, MPOExperts, SoftMergeGate, TopAnyGate, TopKGate
from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.lora import LoRAExperts

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def layers(draw: st.DrawFn) -> tuple[MoE, int, int]:
    """``(layer, d, k)``: a sparse MoE layer of random sizes; ``k = 0`` for gates with a varying count."""
    torch.manual_seed(draw(st.integers(0, 1000)))
    d = draw(st.sampled_from([4, 8, 12]))
    E = draw(st.integers(1, 6))
    gate: Gate
    bank: ExpertBank
    if draw(st.booleans()):
        k = draw(st.integers(1, E))
        gate = TopKGate(d, E, k=k)
    else:
        k, gate = 0, TopAnyGate(d, E)
    if draw(st.booleans()):
        bank = DenseExperts(d, 16, E, gated=draw(st.booleans()))
    else:
        bank = MPOExperts.from_ffn(FFNWeights(torch.randn(16, d), torch.randn(d, 16)), E)
    capacity = draw(st.sampled_from([None, 0.5, 1.0, 2.0]))
    return MoE(gate, bank, capacity_factor=capacity), d, k


@SETTINGS
@given(spec=layers(), lead=st.lists(st.integers(0, 5), min_size=1, max_size=3), train=st.booleans())
def test_shapes_and_token_counts(spec, lead, train):
    layer, d, k = spec
    layer.train(train)
    x = torch.randn(*lead, d)
    y = layer(x)
    assert y.shape == (*lead, d) and y.dtype == x.dtype
    stats = layer.last_stats
    T = x.numel() // d
    assert stats.num_tokens == T
    assert int(stats.tokens_per_expert.sum()) + stats.dropped >= 0
    if k and (layer.capacity_factor is None or not train):  # dropless: every token reaches k experts
        assert int(stats.tokens_per_expert.sum()) == k * T and stats.dropped == 0
    assert stats.tokens_without_expert <= T
    assert bool(torch.isfinite(y).all())
    if T == 0:
        assert y.numel() == 0


@SETTINGS
@given(spec=layers(), T=st.integers(1, 12), extra=st.integers(1, 12))
def test_eval_output_of_a_token_does_not_depend_on_the_batch(spec, T, extra):
    layer, d, _ = spec
    layer.eval()
    x = torch.randn(T, d)
    alone = layer(x)
    together = layer(torch.cat([x, torch.randn(extra, d)]))[:T]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(spec=layers(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_output_dtype_follows_the_layer(spec, dtype):
    layer, d, _ = spec
    layer = layer.to(dtype)
    y = layer(torch.randn(3, 5, d, dtype=dtype))
    assert y.dtype == dtype and y.shape == (3, 5, d)
    assert bool(torch.isfinite(y.float()).all())


@SETTINGS
@given(spec=layers(), T=st.integers(1, 8), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_non_finite_hidden_states_are_a_clear_error(spec, T, bad):
    layer, d, _ = spec
    x = torch.randn(T, d)
    x[T // 2, 0] = bad
    with pytest.raises(ValueError, match=r"not finite for 1 of \d+ tokens"):
        layer(x)


def test_soft_gate_empty_batch_and_nan():
    layer = MoE(SoftMergeGate(8, 4), LoRAExperts(8, 8, 4))
    assert layer(torch.randn(0, 8)).shape == (0, 8)
    x = torch.randn(3, 8)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        layer(x)


def test_integer_or_scalar_inputs_are_a_clear_error():
    layer = MoE(TopKGate(8, 4), DenseExperts(8, 16, 4))
    with pytest.raises(TypeError, match="floating-point hidden states"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 8\]"):
        layer(torch.tensor(1.0))
