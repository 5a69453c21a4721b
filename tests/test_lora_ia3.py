"""LoRAExperts, IA3Experts and SoftMergeGate: maths against per-expert references, init, MoE integration."""

import math

import pytest
import torch

from mpolab_moe import MoE, TopKGate
from mpolab_moe.experts.ia3 import IA3Experts
from mpolab_moe.experts.lora import LoRAExperts
from mpolab_moe.gates.soft_merge import SoftMergeGate


def _perturbed_lora(d_in: int = 12, d_out: int = 10, E: int = 5, r: int = 3, **kw) -> LoRAExperts:
    bank = LoRAExperts(d_in, d_out, E, r, **kw)
    with torch.no_grad():
        bank.lora_B.normal_()
    return bank


def _lora_reference(bank: LoRAExperts, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` on ``x`` the slow way: ``s · x A_e B_e``."""
    return bank.scaling * (x @ bank.lora_A[e] @ bank.lora_B[e])


# ------------------------------------------------------------------------------------ LoRAExperts


def test_lora_update_is_zero_at_init_and_a_follows_the_init():
    bank = LoRAExperts(64, 48, num_experts=4, r=4, alpha=16)
    x = torch.randn(9, 64)
    assert torch.equal(bank.forward_soft(x, torch.rand(9, 4)), torch.zeros(9, 48))
    assert torch.equal(bank(x, [3, 0, 4, 2]), torch.zeros(9, 48))
    assert bank.lora_A.shape == (4, 64, 4) and bank.lora_B.shape == (4, 4, 48)
    assert abs(bank.lora_A.std().item() - 0.02) < 0.003  # gaussian, the MoLoRA paper
    kaiming = LoRAExperts(64, 48, 2, 4, init="kaiming")
    assert kaiming.lora_A.abs().max() <= 1 / math.sqrt(64) and kaiming.lora_A.std() > 0.05


def test_lora_scaling_and_rslora():
    assert LoRAExperts(8, 8, r=4, alpha=16).scaling == 4.0
    assert LoRAExperts(8, 8, r=4, alpha=16, use_rslora=True).scaling == 8.0
    assert LoRAExperts(8, 8, r=4).scaling == 1.0  # alpha defaults to r


def test_lora_soft_forward_is_the_weighted_sum_of_experts():
    bank = _perturbed_lora()
    x, w = torch.randn(7, 12), torch.softmax(torch.randn(7, 5), -1)
    expected = sum(w[:, e : e + 1] * _lora_reference(bank, x, e) for e in range(5))
    torch.testing.assert_close(bank.forward_soft(x, w), expected)


def test_lora_sparse_forward_runs_each_expert_on_its_rows():
    bank = _perturbed_lora()
    counts = [2, 0, 3, 1, 4]
    x = torch.randn(sum(counts), 12)
    expected = torch.cat(
        [_lora_reference(bank, chunk, e) for e, chunk in enumerate(torch.split(x, counts)) if len(chunk)]
    )
    torch.testing.assert_close(bank(x, counts), expected)


def test_single_lora_expert_is_plain_lora_and_has_a_delta_weight():
    bank = _perturbed_lora(E=1)
    x = torch.randn(6, 12)
    torch.testing.assert_close(bank(x, [6]), x @ bank.delta_weight().T)
    torch.testing.assert_close(bank.forward_soft(x, torch.ones(6, 1)), bank(x, [6]))
    with pytest.raises(ValueError, match="single expert; this bank has 5"):
        _perturbed_lora(E=5).delta_weight()


def test_lora_gradients_reach_a_once_b_is_nonzero():
    bank = _perturbed_lora()
    x, w = torch.randn(7, 12), torch.softmax(torch.randn(7, 5), -1)
    bank.forward_soft(x, w).pow(2).sum().backward()
    assert bank.lora_A.grad.abs().sum() > 0 and bank.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be a positive int"),
        ({"num_experts": 0}, "num_experts must be a positive int"),
        ({"alpha": -1.0}, "alpha must be > 0"),
        ({"init": "xavier"}, "init must be one of 'gaussian', 'kaiming'"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_lora_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAExperts(8, 8, **kwargs)


# ------------------------------------------------------------------------------------ IA3Experts


def test_ia3_is_identity_at_init_for_weights_summing_to_one():
    bank = IA3Experts(16, num_experts=6)
    x, w = torch.randn(5, 16), torch.softmax(torch.randn(5, 6), -1)
    torch.testing.assert_close(bank.forward_soft(x, w), x)
    assert torch.equal(bank(x, [1, 1, 1, 1, 1, 0]), x)


def test_ia3_soft_forward_merges_vectors_and_equals_the_weighted_sum():
    bank = IA3Experts(16, num_experts=6)
    with torch.no_grad():
        bank.vectors.normal_()
    x, w = torch.randn(5, 16), torch.softmax(torch.randn(5, 6), -1)
    expected = sum(w[:, e : e + 1] * (x * bank.vectors[e]) for e in range(6))
    torch.testing.assert_close(bank.forward_soft(x, w), expected)


def test_ia3_sparse_forward_scales_each_row_by_its_expert():
    bank = IA3Experts(4, num_experts=3)
    with torch.no_grad():
        bank.vectors.copy_(torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4]))
    x = torch.ones(4, 4)
    out = bank(x, [1, 0, 3])
    assert torch.equal(out[:, 0], torch.tensor([1.0, 3.0, 3.0, 3.0]))


def test_ia3_validation():
    with pytest.raises(ValueError, match=r"num_experts must be a positive int \(>= 1\), got 0"):
        IA3Experts(8, num_experts=0)
    with pytest.raises(ValueError, match="features must be a positive int"):
        IA3Experts(0)


# --------------------------------------------------------------------------------- SoftMergeGate


def test_soft_merge_gate_softmax_over_all_experts_no_aux_loss():
    gate = SoftMergeGate(16, 5)
    assert abs(gate.weight.std().item() - 0.02) < 0.01 and gate.weight.dtype == torch.float32
    x = torch.randn(8, 16)
    r = gate(x)
    assert r.is_soft and r.soft_weight.shape == (8, 5) and r.aux_loss is None
    torch.testing.assert_close(r.soft_weight, torch.softmax(x @ gate.weight.T, -1))


def test_soft_merge_top_k_masks_without_renormalising():
    gate = SoftMergeGate(16, 6, top_k=2)
    with torch.no_grad():
        gate.weight.normal_()
    r = gate(torch.randn(10, 16))
    assert torch.equal((r.soft_weight > 0).sum(-1), torch.full((10,), 2))
    torch.testing.assert_close(r.soft_weight.topk(2, -1).values, r.probs.topk(2, -1).values)
    assert (r.soft_weight.sum(-1) < 1 - 1e-4).all()  # no renormalisation


def test_soft_merge_router_stays_fp32_and_takes_half_inputs():
    gate = SoftMergeGate(8, 3).to(torch.bfloat16)
    assert gate.weight.dtype == torch.float32
    r = gate(torch.randn(4, 8, dtype=torch.bfloat16))
    assert r.soft_weight.dtype == torch.float32


def test_soft_merge_gate_validation():
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        SoftMergeGate(8, 4, top_k=5)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        SoftMergeGate(8, 0)
    with pytest.raises(ValueError, match="d_model=8"):
        SoftMergeGate(8, 4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="not finite"):
        SoftMergeGate(2, 2)(torch.tensor([[float("nan"), 0.0]]))


# ------------------------------------------------------------------------------- inside MoE


def test_lora_bank_inside_moe_with_top_k_gate_matches_reference():
    bank = _perturbed_lora(d_in=12, d_out=10, E=4, r=2)
    gate = TopKGate(12, 4, k=2)
    layer = MoE(gate, bank)
    x = torch.randn(3, 5, 12)
    out = layer(x).reshape(-1, 10)
    r = gate(x.reshape(-1, 12))
    tokens = x.reshape(-1, 12)
    expected = torch.zeros(15, 10)
    for slot in range(2):
        for t in range(15):
            e = int(r.expert_index[t, slot])
            expected[t] += r.combine_weight[t, slot] * _lora_reference(bank, tokens[t : t + 1], e)[0]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert bank.lora_A.grad is not None and gate.weight.grad is not None


def test_ia3_bank_inside_moe_with_top_k_gate_scales_by_the_chosen_vector():
    bank = IA3Experts(6, num_experts=3)
    with torch.no_grad():
        bank.vectors.normal_()
    gate = TopKGate(6, 3, k=1)
    x = torch.randn(10, 6)
    out = MoE(gate, bank)(x)
    r = gate(x)
    expected = x * bank.vectors[r.expert_index[:, 0]] * r.combine_weight
    torch.testing.assert_close(out, expected)


def test_soft_merge_gate_inside_moe_uses_the_merged_path():
    bank = _perturbed_lora(E=5)
    gate = SoftMergeGate(12, 5)
    layer = MoE(gate, bank)
    x = torch.randn(2, 4, 12)
    out = layer(x)
    torch.testing.assert_close(
        out.reshape(-1, 10), bank.forward_soft(x.reshape(-1, 12), gate(x.reshape(-1, 12)).soft_weight)
    )
    assert layer.last_stats.tokens_per_expert.tolist() == [8] * 5 and layer.aux_loss is None
    mov = MoE(SoftMergeGate(12, 5), IA3Experts(12, 5))
    torch.testing.assert_close(mov(x), x)  # identity at init
