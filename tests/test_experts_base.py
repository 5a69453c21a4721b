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


def test_ffn_weights_is_validated_once_with_the_bad_shape_named():
    from mpolab_moe import FFNWeights

    w1, w2 = torch.randn(16, 8), torch.randn(6, 16)
    ffn = FFNWeights(w1, w2, b1=torch.zeros(16))
    assert (ffn.d_model, ffn.d_ff, ffn.d_out, ffn.gated, ffn.has_bias) == (8, 16, 6, False, True)
    assert ffn.num_params == 16 * 8 + 6 * 16 + 16
    with pytest.raises(ValueError, match=r"w2 \(6, 15\) does not take w1's 16 hidden units"):
        FFNWeights(w1, torch.randn(6, 15))
    with pytest.raises(ValueError, match=r"w_gate must be \[16, 8\], got \(16, 9\)"):
        FFNWeights(w1, w2, w_gate=torch.randn(16, 9))
    with pytest.raises(ValueError, match=r"b2 must be \[6\]"):
        FFNWeights(w1, w2, b2=torch.zeros(16))
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        FFNWeights(w1, w2, activation="swishy")


@pytest.mark.parametrize("gated", [False, True])
def test_grouped_ffn_matches_each_expert_on_its_rows(gated):
    from mpolab_moe.experts.base import grouped_ffn

    torch.manual_seed(0)
    E, d, F_, counts = 3, 5, 7, [2, 0, 4]
    w1, w2, wg = torch.randn(E, d, F_), torch.randn(E, F_, d), torch.randn(E, d, F_) if gated else None
    b1, b2 = torch.randn(E, F_), torch.randn(E, d)
    x = torch.randn(sum(counts), d)
    y = grouped_ffn(x, counts, w1, w2, torch.relu, w_gate=wg, b1=b1, b2=b2)
    rows = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    for t, e in enumerate(rows.tolist()):
        h = x[t] @ w1[e] + b1[e]
        h = torch.relu(x[t] @ wg[e]) * h if gated else torch.relu(h)
        torch.testing.assert_close(y[t], h @ w2[e] + b2[e])


def test_mpo_experts_are_built_through_init_and_are_central_tensor_modules():
    import mpolab
    from mpolab_moe import FFNWeights, MPOExperts

    bank = MPOExperts.from_ffn(FFNWeights(torch.randn(64, 16), torch.randn(16, 64)), 3)
    assert isinstance(bank, mpolab.nn.HasCentralTensor)
    assert len(list(bank.central_parameters())) == 2 and bank.reconstruction_error.keys() == {"w1", "w2"}
    wrong = {"w1": mpolab.decompose(torch.randn(64, 16), 3), "w2": mpolab.decompose(torch.randn(16, 48), 3)}
    with pytest.raises(ValueError, match=r"mpos must give w1 \[64, 16\], w2 \[16, 64\]"):
        MPOExperts(16, 64, 3, mpos=wrong)
