import pytest
import torch
from torch import nn

import mpolab
from mpolab import DimensionSqueezer, param_groups, set_trainable, squeeze
from mpolab.nn import mpo_modules

from ._hf import FAMILIES, inputs_for


def compressed_bert(max_rank: int = 16) -> nn.Module:
    model = FAMILIES["bert"]()
    mpolab.compress(model, "all-linear", max_rank=max_rank)
    return model


def test_set_trainable_auxiliary_is_mpop_lightweight_finetuning():
    model = compressed_bert()
    counts = set_trainable(model, "auxiliary")
    layer = model.encoder.layer[0].attention.self.query
    assert not layer.cores[layer.central_index].requires_grad
    assert all(p.requires_grad for p in layer.auxiliary_parameters())
    assert layer.bias.requires_grad and model.embeddings.word_embeddings.weight.requires_grad
    assert 0 < counts["trainable"] < counts["total"]
    assert set_trainable(model, "all")["trainable"] == counts["total"]
    only_central = set_trainable(model, "central", others=False)
    assert only_central["trainable"] == sum(
        c.numel() for m in mpo_modules(model).values() for c in m.central_parameters()
    )


def test_set_trainable_errors():
    with pytest.raises(ValueError, match="compress"):
        set_trainable(FAMILIES["bert"](), "auxiliary")
    with pytest.raises(ValueError, match="mode"):
        set_trainable(compressed_bert(), "cores")  # type: ignore[arg-type]


def test_param_groups_give_mpo_tensors_their_own_lr():
    model = compressed_bert()
    set_trainable(model, "auxiliary")
    groups = param_groups(model, lr=1e-3, mpo_lr=5e-5)
    assert [g["lr"] for g in groups] == [1e-3, 5e-5]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_and_set_trainable_see_mpo_expert_banks():
    from mpolab_moe import MPOExperts

    model = nn.Sequential(nn.Linear(8, 16), MPOExperts(16, 32, num_experts=3, max_rank=4), nn.LayerNorm(16))
    bank = model[1]
    assert isinstance(bank, mpolab.HasCentralTensor) and not isinstance(bank, mpolab.MPOModule)
    central = {id(p) for p in bank.central_parameters()}
    auxiliary = {id(p) for p in bank.auxiliary_parameters()}
    assert central and auxiliary and not central & auxiliary

    counts = set_trainable(model, "auxiliary")
    assert all(not p.requires_grad for p in bank.central_parameters())
    assert all(p.requires_grad for p in bank.auxiliary_parameters())
    assert all(p.requires_grad for p in model[0].parameters())  # others train
    assert counts["trainable"] == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in bank.central_parameters()
    )

    groups = param_groups(model, lr=1e-3, mpo_lr=1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == auxiliary
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad and id(p) not in auxiliary
    }

    set_trainable(model, "central", others=False)
    assert {id(p) for p in model.parameters() if p.requires_grad} == central
    assert {id(p) for g in param_groups(model, lr=1e-3, mpo_lr=1e-4) for p in g["params"]} == central


def test_squeeze_keeps_the_optimizer_usable():
    model = compressed_bert(max_rank=16)
    set_trainable(model, "all")
    opt = torch.optim.Adam(param_groups(model, lr=1e-3))
    inputs = inputs_for("bert")
    for _ in range(2):
        opt.zero_grad()
        model(**inputs).last_hidden_state.square().mean().backward()
        opt.step()
    result = squeeze(model, opt, max_rank=6)
    assert all(max(r) <= 6 for r in result.ranks_after.values())
    assert result.params_after < result.params_before
    ids_in_model = {id(p) for p in model.parameters()}
    assert all(id(p) in ids_in_model for g in opt.param_groups for p in g["params"])
    opt.zero_grad()
    model(**inputs).last_hidden_state.square().mean().backward()
    opt.step()  # Adam state for the new shapes starts fresh; no shape error


@pytest.mark.parametrize("rule", [dict(shrink=4), dict(rel_tol=0.3), dict(ratio=0.5)])
def test_squeeze_rules(rule):
    model = compressed_bert(max_rank=16)
    result = squeeze(model, **rule)
    assert result.params_after < result.params_before
    if "ratio" in rule:
        assert result.params_after <= 0.5 * result.params_before
    if "rel_tol" in rule:
        assert all(e <= 0.3 + 1e-6 for e in result.rel_errors.values())


def test_squeeze_errors():
    model = compressed_bert()
    with pytest.raises(ValueError, match="exactly one"):
        squeeze(model, max_rank=4, shrink=2)
    with pytest.raises(ValueError, match="not MPO layers"):
        squeeze(model, max_rank=4, modules=["encoder"])


def test_dimension_squeezer_squeezes_while_loss_holds_and_reverts_when_it_does_not():
    model = compressed_bert(max_rank=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    squeezer = DimensionSqueezer(model, opt, shrink=4, min_rank=8, warmup=5, settle=3, patience=5)
    ranks0 = model.encoder.layer[0].intermediate.dense.ranks
    changed = [squeezer.step(1.0) for _ in range(12)]  # flat loss: squeeze as soon as it settles
    assert any(changed)
    ranks1 = model.encoder.layer[0].intermediate.dense.ranks
    assert max(ranks1) < max(ranks0)
    for _ in range(40):  # the loss jumps and never comes back: undo the last squeeze and stop
        squeezer.step(10.0)
    assert squeezer.done
    name = "encoder.layer.0.intermediate.dense"
    states = [ranks0] + [ranks[name] for _, ranks in squeezer.history]
    assert states[-1] == states[-3] != states[-2]  # restored to the ranks before the undone squeeze
    assert model.get_submodule(name).ranks == states[-1]


# ---------------------------------------------------------------------------- regressions


def test_dimension_squeezer_with_no_warmup_squeezes():
    model = compressed_bert(max_rank=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    squeezer = DimensionSqueezer(model, opt, shrink=4, min_rank=8, warmup=0, settle=3)
    assert any(squeezer.step(1.0) for _ in range(5))
    assert max(model.encoder.layer[0].intermediate.dense.ranks) < 16


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(warmup=-1), ValueError),
        (dict(settle=0), ValueError),
        (dict(patience=0), ValueError),
        (dict(shrink=0), ValueError),
        (dict(tolerance=-0.1), ValueError),
        (dict(ema=1.0), ValueError),
        (dict(warmup=2.5), TypeError),
    ],
)
def test_dimension_squeezer_validates_its_arguments(kwargs, error):
    model = compressed_bert(max_rank=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(error, match=next(iter(kwargs))):
        DimensionSqueezer(model, opt, **kwargs)
    with pytest.raises(ValueError, match="no MPO layers"):
        DimensionSqueezer(nn.Linear(4, 4), opt)


def test_squeeze_ratio_spends_its_budget_on_feasible_ranks():
    model = compressed_bert(max_rank=16)
    result = squeeze(model, ratio=0.3)
    assert 0.27 * result.params_before <= result.params_after <= 0.3 * result.params_before
    for m in mpo_modules(model).values():
        bonds, sizes = [1, *m.ranks, 1], [i * j for i, j in zip(m.out_factors, m.in_factors)]
        assert all(
            bonds[k] <= min(bonds[k - 1] * sizes[k - 1], bonds[k + 1] * sizes[k]) for k in range(1, len(bonds) - 1)
        )
