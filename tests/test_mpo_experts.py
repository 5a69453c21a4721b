"""MPOExperts (MPOE): shared central tensor, per-expert auxiliary tensors, both contraction paths."""

import pytest
import torch
import torch.nn.functional as F

import mpolab
from mpolab import TruncationOptions
from mpolab_moe import MoE, TopKGate
from mpolab_moe.experts.base import FFNWeights
from mpolab_moe.experts.dense import DenseExperts
from mpolab_moe.experts.mpo import MPOExperts, mpoe_param_ratio
from mpolab_moe.experts.shared_central import SharedCentralMPO, digit_reversal


def _perturb_experts(bank: MPOExperts, scale: float = 0.1) -> None:
    """Make the experts differ (upcycled experts start identical)."""
    with torch.no_grad():
        for p in bank.expert_parameters():
            p.add_(scale * torch.randn_like(p))


def naive_reference(bank: MPOExperts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's matrices rebuilt one by one with mpolab.MPO.to_matrix, applied to its rows."""
    out, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start : start + c]
        start += c
        h = xe @ bank.expert_mpo(e, "w1").to_matrix().T
        if bank.b1 is not None:
            h = h + bank.b1[e]
        if bank.gated:
            h = bank.act(xe @ bank.expert_mpo(e, "w_gate").to_matrix().T) * h
        else:
            h = bank.act(h)
        y = h @ bank.expert_mpo(e, "w2").to_matrix().T
        out.append(y + bank.b2[e] if bank.b2 is not None else y)
    return torch.cat(out)


@pytest.mark.parametrize("gated", [False, True])
def test_upcycled_experts_equal_the_ffn_at_exact_ranks(gated):
    w1, w2 = torch.randn(96, 24, dtype=torch.float64), torch.randn(24, 96, dtype=torch.float64)
    wg = torch.randn(96, 24, dtype=torch.float64) if gated else None
    b1, b2 = (None, None) if gated else (torch.randn(96, dtype=torch.float64), torch.randn(24, dtype=torch.float64))
    act = "silu" if gated else "gelu"
    bank = MPOExperts.from_ffn(FFNWeights(w1, w2, b1=b1, b2=b2, w_gate=wg, activation=act), 4)
    assert set(bank.reconstruction_error) == ({"w1", "w2", "w_gate"} if gated else {"w1", "w2"})
    assert max(bank.reconstruction_error.values()) < 1e-12
    x = torch.randn(13, 24, dtype=torch.float64)
    h = x @ w1.T + (b1 if b1 is not None else 0)
    h = F.silu(x @ wg.T) * h if gated else F.gelu(h)
    ffn = h @ w2.T + (b2 if b2 is not None else 0)
    counts = [4, 0, 6, 3]
    torch.testing.assert_close(bank(x, counts), ffn)


def test_truncation_reports_error_and_shrinks_parameters():
    w1, w2 = torch.randn(256, 64), torch.randn(64, 256)
    exact = MPOExperts.from_ffn(FFNWeights(w1, w2), 8)
    small = MPOExperts.from_ffn(FFNWeights(w1, w2), 8, options=TruncationOptions(max_rank=4))
    assert all(0.05 < err < 1 for err in small.reconstruction_error.values())
    assert small.num_params < exact.num_params < exact.dense_equivalent_params
    tol = MPOExperts.from_ffn(FFNWeights(w1, w2), 8, options=TruncationOptions(rel_tol=0.5))
    assert all(err <= 0.5 + 1e-6 for err in tol.reconstruction_error.values())


@pytest.mark.parametrize("num_cores", [2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(48, 40), (40, 48), (1009, 12)], ids=["tall", "wide", "padded"])
def test_both_paths_match_per_expert_reference(num_cores, shape):
    m = SharedCentralMPO(mpolab.decompose(torch.randn(*shape, dtype=torch.float64), num_cores), 3)
    with torch.no_grad():
        for p in [*m.left, *m.right]:
            p.add_(0.1 * torch.randn_like(p))
    x, counts = torch.randn(9, shape[1], dtype=torch.float64), [4, 0, 5]
    reference = torch.cat([x[:4] @ m.expert_mpo(0).to_matrix().T, x[4:] @ m.expert_mpo(2).to_matrix().T])
    for path in ("dense", "cores"):
        torch.testing.assert_close(m(x, counts, path=path), reference)
    assert m.expert_weights().shape == (3, shape[1], shape[0])


def test_bank_matches_naive_reference_after_experts_diverge():
    bank = MPOExperts.from_ffn(
        FFNWeights(
            torch.randn(64, 16, dtype=torch.float64),
            torch.randn(16, 64, dtype=torch.float64),
            b1=torch.randn(64, dtype=torch.float64),
            b2=torch.randn(16, dtype=torch.float64),
            activation="relu",
        ),
        3,
        options=TruncationOptions(num_cores=3),
    )
    _perturb_experts(bank)
    x, counts = torch.randn(11, 16, dtype=torch.float64), [2, 7, 2]
    torch.testing.assert_close(bank(x, counts), naive_reference(bank, x, counts))
    dense = bank.to_dense_experts()
    assert isinstance(dense, DenseExperts)
    torch.testing.assert_close(dense(x, counts), naive_reference(bank, x, counts))


@pytest.mark.parametrize("path", ["dense", "cores"])
def test_gradcheck_reaches_central_and_routed_auxiliary_cores(path):
    m = SharedCentralMPO(mpolab.decompose(torch.randn(12, 8, dtype=torch.float64), 3), 3)
    x, counts = torch.randn(5, 8, dtype=torch.float64, requires_grad=True), [2, 0, 3]
    params = [m.central, *m.left, *m.right]
    assert torch.autograd.gradcheck(lambda x, *ps: m(x, counts, path=path), (x, *params))
    m(x, counts, path=path).square().sum().backward()
    assert m.central.grad.abs().sum() > 0
    for aux in [*m.left, *m.right]:
        assert aux.grad[0].abs().sum() > 0 and aux.grad[2].abs().sum() > 0
        assert torch.all(aux.grad[1] == 0), "an expert with no tokens must get no gradient"


def test_path_choice_follows_flops_for_t5_base_shapes():
    W = torch.randn(3072, 768)
    exact = SharedCentralMPO(mpolab.decompose(W, 5), 8)
    low = SharedCentralMPO(mpolab.decompose(W, 5, max_rank=4), 8)
    costs = exact.path_costs(4096)
    assert costs.chosen == "dense" and costs.cores.flops > costs.dense.flops
    small_batch = low.path_costs(512)
    assert small_batch.chosen == "cores" and small_batch.cores.flops < small_batch.dense.flops
    cached = exact.path_costs(4096, weight_cached=True)
    assert cached.dense.flops == 2 * 4096 * 3072 * 768


def test_weight_cache_in_no_grad_is_invalidated_by_updates():
    bank = MPOExperts(16, 32, 4, max_rank=4)
    x, counts = torch.randn(8, 16), [2, 2, 2, 2]
    with torch.no_grad():
        first = bank.w1.expert_weights()
        assert bank.w1.expert_weights() is first
        y0 = bank(x, counts)
        bank.w1.central.mul_(2.0)
        assert bank.w1.expert_weights() is not first
        assert not torch.allclose(bank(x, counts), y0)
    y = bank(x, counts)
    assert y.requires_grad


def test_parameter_ratio_table_for_t5_base():
    # REFERENCE section 2: 0.33 / 0.20 / 0.16 / 0.14 of Switch at E = 4 / 8 / 12 / 16 (3072x768, exact ranks).
    ratios = [mpoe_param_ratio(3072, 768, e) for e in (4, 8, 12, 16)]
    assert [round(r, 2) for r in ratios] == [0.33, 0.20, 0.16, 0.14]
    assert mpoe_param_ratio(768, 3072, 8) == pytest.approx(ratios[1])
    assert mpoe_param_ratio(3072, 768, 8, max_rank=64) < ratios[1] / 4
    # The formula agrees with an actual bank.
    bank = MPOExperts(768, 3072, 8, bias=False, max_rank=64)
    ratio = bank.num_params / bank.dense_equivalent_params
    assert ratio == pytest.approx(mpoe_param_ratio(3072, 768, 8, max_rank=64), rel=1e-9)


def test_central_is_one_shared_parameter_and_freezing():
    bank = MPOExperts(16, 32, 4, gated=True, max_rank=4)
    centrals = list(bank.central_parameters())
    assert len(centrals) == 3 and all(c.ndim == 4 for c in centrals)
    assert all(a.shape[0] == 4 and a.ndim == 5 for a in bank.auxiliary_parameters())
    bank.freeze_central()
    assert not any(c.requires_grad for c in centrals)
    assert all(a.requires_grad for a in bank.auxiliary_parameters())
    # Randomly initialised experts differ from each other.
    assert not torch.allclose(bank.expert_mpo(0).to_matrix(), bank.expert_mpo(1).to_matrix())
    assert "num_experts=4" in repr(bank) and "of 4 dense experts" in repr(bank)


def test_inside_moe_trains_and_half_precision_runs():
    bank = MPOExperts.from_ffn(
        FFNWeights(torch.randn(64, 16), torch.randn(16, 64)), 4, options=TruncationOptions(max_rank=8)
    )
    layer = MoE(TopKGate(16, 4, k=2), bank)
    y = layer(torch.randn(2, 10, 16))
    (y.square().mean() + layer.aux_loss).backward()
    assert layer.gate.weight.grad is not None and bank.w1.central.grad.abs().sum() > 0
    half = MPOExperts.from_ffn(FFNWeights(torch.randn(64, 16), torch.randn(16, 64)), 2).to(torch.bfloat16)
    assert half(torch.randn(6, 16, dtype=torch.bfloat16), [3, 3]).dtype == torch.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="w2 .* hidden units"):
        MPOExperts.from_ffn(FFNWeights(torch.randn(64, 16), torch.randn(16, 32)), 4)
    with pytest.raises(ValueError, match="w_gate"):
        MPOExperts.from_ffn(FFNWeights(torch.randn(64, 16), torch.randn(16, 64), w_gate=torch.randn(16, 64)), 4)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        MPOExperts.from_ffn(FFNWeights(torch.randn(64, 16), torch.randn(16, 64)), 0)
    with pytest.raises(ValueError, match="d_ff must be a positive int"):
        MPOExperts(16, 0, 4)
    bank = MPOExperts(16, 32, 4, max_rank=4)
    with pytest.raises(ValueError, match="which must be one of"):
        bank.expert_mpo(0, "w3")
    with pytest.raises(ValueError, match=r"expert must be in \[0, 4\)"):
        bank.expert_mpo(4)
    with pytest.raises(ValueError, match="path must be"):
        bank.w1(torch.randn(4, 16), [1, 1, 1, 1], path="fast")


# ---------------------------------------------------------------------------------------- grouped rebuild


def _five_core_bank(gated=False, dtype=torch.float64):
    """96 <-> 48 in five cores: W1's output and W2's input share their digit groups (grouped rebuild applies)."""
    torch.manual_seed(0)
    ffn = FFNWeights(
        torch.randn(96, 48, dtype=dtype),
        torch.randn(48, 96, dtype=dtype),
        w_gate=torch.randn(96, 48, dtype=dtype) if gated else None,
        b1=None if gated else torch.randn(96, dtype=dtype),
        b2=None if gated else torch.randn(48, dtype=dtype),
        activation="silu" if gated else "gelu",
    )
    bank = MPOExperts.from_ffn(ffn, 3, options=TruncationOptions(num_cores=5, max_rank=6))
    _perturb_experts(bank)
    return bank


@pytest.mark.parametrize("side", ["out", "in"])
def test_grouped_rebuild_is_the_digit_reversed_rebuild_with_its_gradients(side):
    m = SharedCentralMPO(mpolab.decompose(torch.randn(96, 48, dtype=torch.float64), 5, max_rank=5), 3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    natural = m.rebuild()  # [E, in, out]
    groups = m.side_groups(side)
    reference = digit_reversal(natural, groups) if side == "out" else digit_reversal(natural.mT, groups).mT
    m.hidden_side = side
    grouped = m.rebuild_grouped()
    torch.testing.assert_close(grouped, reference)
    probe = torch.randn_like(grouped)
    params = list(m.parameters())
    ours = torch.autograd.grad((grouped * probe).sum(), params)
    theirs = torch.autograd.grad((reference * probe).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert m.rebuild_flops() < 2 * m.num_experts * 96 * 48 * 96  # counted, and below a naive E-fold matrix product


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("frozen", ["central", "left", "right", "auxiliary"])
def test_grouped_rebuild_gradients_with_frozen_cores(side, frozen):
    """The backward skips the gradients no one asked for and still gets the others right."""
    m = SharedCentralMPO(mpolab.decompose(torch.randn(96, 48, dtype=torch.float64), 5, max_rank=5), 3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.central.requires_grad_(frozen != "central")
    for p in m.left:
        p.requires_grad_(frozen not in ("left", "auxiliary"))
    for p in m.right:
        p.requires_grad_(frozen not in ("right", "auxiliary"))
    groups = m.side_groups(side)
    natural = m.rebuild()
    reference = digit_reversal(natural, groups) if side == "out" else digit_reversal(natural.mT, groups).mT
    m.hidden_side = side
    grouped = m.rebuild_grouped()
    torch.testing.assert_close(grouped, reference)
    probe = torch.randn_like(grouped)
    params = [p for p in m.parameters() if p.requires_grad]
    ours = torch.autograd.grad((grouped * probe).sum(), params)
    theirs = torch.autograd.grad((reference * probe).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gated", [False, True])
def test_bank_with_grouped_rebuild_matches_the_reference_and_its_gradients(gated):
    bank = _five_core_bank(gated)
    assert bank.hidden_groups == bank.w1.side_groups("out") and bank.w2.hidden_side == "in"
    x, counts = torch.randn(13, 48, dtype=torch.float64), [4, 0, 9]
    out = bank(x, counts)
    torch.testing.assert_close(out, naive_reference(bank, x, counts))
    natural = _five_core_bank(gated)
    for m in natural.matrices().values():
        m.hidden_side = None  # the natural-order rebuild, as before the grouped one existed
    out.square().sum().backward()
    natural(x, counts).square().sum().backward()
    for (name, p), q in zip(bank.named_parameters(), natural.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():  # the no-grad cache serves the same grouped weights
        torch.testing.assert_close(bank(x, counts), out)


def test_padded_sizes_keep_the_natural_rebuild():
    ffn = FFNWeights(torch.randn(1009, 16), torch.randn(16, 1009))  # 1009 is prime: padded to 1024
    bank = MPOExperts.from_ffn(ffn, 2, options=TruncationOptions(num_cores=3, max_rank=4))
    assert not bank.w1.supports_grouped_rebuild()
    assert bank.hidden_groups is None and all(m.hidden_side is None for m in bank.matrices().values())
    assert digit_reversal(torch.arange(6.0), (1, 2, 3)).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
