"""mpolab's LoRA / IA3 next to the real HF peft package on tiny BERT, GPT-2, T5 and LLaMA.

Same trainable counts, same outputs, same merged weights; folders go both ways; peft's names
and config objects are accepted; mixtures use peft's layout and peft refuses them.
"""

import copy
import json

import pytest
import safetensors
import torch
from torch import nn

from mpolab_moe import peft as mpeft
from tests._hf import FAMILIES, output_for

peft = pytest.importorskip("peft")

#: peft's own default LoRA targets (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: make() for name, make in FAMILIES.items()}


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor away from its init, in name order (so both libraries see non-trivial adapters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _configs(family: str, method: str) -> tuple[object, object]:
    """(mpolab config in peft's spelling, the peft config object) meaning the same adapters."""
    if method == "lora":
        kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": LORA_TARGETS[family]}
        return mpeft.LoraConfig(**kw, init_lora_weights=True), peft.LoraConfig(**kw)
    return mpeft.IA3Config(), peft.IA3Config()  # default targets: mpolab's IA3 follows peft's per family


def _both(bases, family: str, method: str) -> tuple[nn.Module, nn.Module]:
    ours_cfg, theirs_cfg = _configs(family, method)
    ours = mpeft.get_peft_model(copy.deepcopy(bases[family]), ours_cfg)
    theirs = peft.get_peft_model(copy.deepcopy(bases[family]), theirs_cfg)
    return ours, theirs


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_counts_outputs_and_merged_weights_as_peft(bases, tmp_path, family, method):
    ours, theirs = _both(bases, family, method)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # peft's adapted module names (stripped of its wrappers) are ours
    theirs_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer")}
    assert set(mpeft.adapter_layers(ours)) == {n for n in theirs_names if not n.endswith("base_layer")}

    _perturb(ours)
    base_out = output_for(bases[family], family)
    assert not torch.allclose(output_for(ours, family), base_out, atol=1e-3)  # a non-trivial adapter
    ours.save_pretrained(tmp_path)  # peft's format by default
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bases[family]), tmp_path)
    torch.testing.assert_close(output_for(loaded, family), output_for(ours, family), rtol=1e-5, atol=1e-5)

    merged_ours = ours.merge_and_unload()
    merged_theirs = loaded.merge_and_unload()
    state_ours, state_theirs = merged_ours.state_dict(), merged_theirs.state_dict()
    assert state_ours.keys() == state_theirs.keys()
    for key, value in state_ours.items():
        torch.testing.assert_close(value, state_theirs[key], rtol=1e-6, atol=1e-6, msg=key)
    assert not hasattr(merged_ours, "mpolab_adapter_config") and "save_pretrained" not in vars(merged_ours)


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_folders_load_into_mpolab(bases, tmp_path, family, method):
    _, theirs = _both(bases, family, method)
    _perturb(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = mpeft.PeftModel.from_pretrained(copy.deepcopy(bases[family]), tmp_path)
    torch.testing.assert_close(output_for(ours, family), output_for(theirs, family), rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # and back out: peft reads what mpolab writes of a peft-authored adapter
    ours.save_pretrained(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(bases[family]), tmp_path / "again")
    torch.testing.assert_close(output_for(again, family), output_for(theirs, family), rtol=1e-5, atol=1e-5)


def test_peft_config_objects_mean_the_same_adapters(bases):
    base = bases["t5"]
    # target_modules=None: peft's default LoRA placement (q and v), not mpolab's own
    from_peft = mpeft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, task_type="SEQ_2_SEQ_LM"))
    names = {n.rsplit(".", 1)[-1] for n in mpeft.adapter_layers(from_peft)}
    assert names == {"q", "v"}
    cfg = from_peft.mpolab_adapter_config
    assert (cfg.r, cfg.alpha, cfg.task_type, cfg.init) == (2, 4.0, "SEQ_2_SEQ_LM", "kaiming")
    ia3 = mpeft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k", "v"], feedforward_modules=[]))
    assert not any(layer.feedforward for layer in mpeft.adapter_layers(ia3).values())
    with pytest.raises(ValueError, match="use_dora"):
        mpeft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, use_dora=True, target_modules=["q"]))
    with pytest.raises(ValueError, match="peft_type 'PREFIX_TUNING' is not supported"):
        mpeft.from_peft_config(peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))


def test_peft_argument_names_are_accepted():
    cfg = mpeft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, init_lora_weights="gaussian", task_type="CAUSAL_LM")
    assert (cfg.alpha, cfg.dropout, cfg.init, cfg.task_type) == (32, 0.1, "gaussian", "CAUSAL_LM")
    assert "lora_alpha" not in cfg.to_dict() and mpeft.config_from_dict(cfg.to_dict()) == cfg
    assert mpeft.MoLoRAConfig(lora_alpha=8).alpha == 8
    assert mpeft.IA3Config(feedforward_modules=[]).feedforward_modules == []
    with pytest.raises(ValueError, match="give alpha=16 or lora_alpha=32, not both"):
        mpeft.LoraConfig(alpha=16, lora_alpha=32)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' is not supported; valid: True"):
        mpeft.LoraConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        mpeft.LoraConfig(bias="all")


@pytest.mark.parametrize("method", ["molora", "mov"])
def test_mixtures_use_peft_layout_with_their_own_marker_and_peft_refuses(bases, tmp_path, method):
    cfg = mpeft.MoLoRAConfig(r=2, num_experts=3) if method == "molora" else mpeft.MoVConfig(num_experts=3)
    model = mpeft.get_peft_model(copy.deepcopy(bases["gpt2"]), cfg)
    _perturb(model)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["peft_type"] == f"MPOLAB_{method.upper()}" and record["num_experts"] == 3
    with safetensors.safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model.") for k in f.keys())  # noqa: SIM118
    with pytest.raises((KeyError, ValueError), match=f"MPOLAB_{method.upper()}"):
        peft.PeftModel.from_pretrained(copy.deepcopy(bases["gpt2"]), tmp_path)
    loaded = mpeft.from_pretrained(copy.deepcopy(bases["gpt2"]), tmp_path)
    torch.testing.assert_close(output_for(loaded, "gpt2"), output_for(model, "gpt2"), rtol=0, atol=0)


def test_print_trainable_parameters_counts_as_peft(bases, capsys):
    ours, theirs = _both(bases, "bert", "lora")
    counts = ours.print_trainable_parameters()
    trainable, total = theirs.get_nb_trainable_parameters()
    assert counts == {"trainable": trainable, "total": total}
    assert f"{trainable:,} of {total:,} parameters" in capsys.readouterr().out


def test_save_pretrained_takes_the_trainers_arguments(bases, tmp_path):
    model = mpeft.get_peft_model(copy.deepcopy(bases["llama"]), mpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, state_dict=model.state_dict(), safe_serialization=True)  # as the Trainer calls it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(TypeError, match=r"unexpected arguments \['bogus'\]"):
        model.save_pretrained(tmp_path, bogus=1)
    with pytest.raises(ValueError, match="push_to_hub=True is not supported"):
        model.save_pretrained(tmp_path, push_to_hub=True)
