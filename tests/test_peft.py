"""The PEFT front door: get_model on tiny T5/GPT-2/BERT/LLaMA, identity at init, gradients, merge, save/load, MPO."""

import copy
import json
import os
import stat

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import mpolab
from mpolab_moe import MoE
from mpolab_moe import peft as mpeft
from mpolab_moe.peft.layers import IA3Layer, LoRALayer
from mpolab_moe.peft.model import CONFIG_ATTR
from tests._hf import FAMILIES, inputs_for, main_output, output_for

METHODS = {
    "lora": mpeft.LoRAConfig,
    "ia3": mpeft.IA3Config,
    "molora": lambda **kw: mpeft.MoLoRAConfig(num_experts=4, **kw),
    "mov": lambda **kw: mpeft.MoVConfig(num_experts=4, **kw),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: make() for name, make in FAMILIES.items()}


def _perturb(model: nn.Module, scale: float = 0.3) -> None:
    """Move every adapter away from its init (so merge / save tests compare non-trivial adapters)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_identity_at_init_and_only_adapters_get_gradients(bases, family, method):
    base = bases[family]
    model = mpeft.get_model(copy.deepcopy(base), METHODS[method]())
    layers = mpeft.adapter_layers(model)
    assert layers and all(isinstance(m, LoRALayer if "lora" in method else IA3Layer) for m in layers.values())
    routed = method in ("molora", "mov")
    assert all((layer.router is not None) == routed for layer in layers.values())
    # Same outputs as the base model at step 0 (LoRA's B = 0, IA3 vectors = 1, softmax weights sum to 1).
    torch.testing.assert_close(output_for(model, family), output_for(base, family), rtol=0, atol=1e-5)

    model.train()
    main_output(model, model(**inputs_for(family))).float().pow(2).mean().backward()
    adapter_ids = {
        id(p)
        for layer in layers.values()
        for p in [*layer.experts.parameters(), *(layer.router or nn.Module()).parameters()]
    }
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # the update moves away from zero as soon as it can: B (LoRA) or the vectors (IA3) get a gradient
    moving = [
        p.grad.abs().sum()
        for layer in layers.values()
        for n, p in layer.experts.named_parameters()
        if n in ("lora_B", "vectors")
    ]
    assert sum(moving) > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_outputs_equal_unmerged(bases, family, method):
    model = mpeft.get_model(copy.deepcopy(bases[family]), METHODS[method]())
    _perturb(model)
    before = output_for(model, family)
    assert not torch.allclose(before, output_for(bases[family], family), atol=1e-3)  # the adapters do something
    merged = mpeft.merge_and_unload(model)
    assert not mpeft.adapter_layers(merged)
    assert not any(isinstance(m, (LoRALayer, IA3Layer)) for m in merged.modules())
    torch.testing.assert_close(output_for(merged, family), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["molora", "mov"])
def test_merging_a_routed_mixture_names_the_module_and_changes_nothing(bases, method):
    model = mpeft.get_model(copy.deepcopy(bases["t5"]), METHODS[method]())
    _perturb(model)
    before = output_for(model, "t5")
    with pytest.raises(
        ValueError,
        match=r"adapter of encoder\.block\.0\.layer\.0\.SelfAttention\.\w+: it is a routed mixture of 4 experts",
    ):
        mpeft.merge_and_unload(model)
    assert mpeft.adapter_layers(model)
    torch.testing.assert_close(output_for(model, "t5"), before, rtol=0, atol=0)


def test_gpt2_fused_c_attn_mov_scales_only_keys_and_values(bases):
    # plain IA3 scales every column of c_attn, as peft does; MoV only the keys and values (the paper)
    ia3 = mpeft.get_model(copy.deepcopy(bases["gpt2"]), mpeft.IA3Config())
    assert ia3.get_submodule("transformer.h.0.attn.c_attn").out_slice is None
    model = mpeft.get_model(copy.deepcopy(bases["gpt2"]), mpeft.MoVConfig(num_experts=2))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert layer.out_slice == (32, 96) and layer.experts.vectors.shape == (2, 64)
    assert model.get_submodule("transformer.h.0.mlp.c_proj").feedforward
    _perturb(model)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x)[:, :32], layer.base_layer(x)[:, :32])  # queries untouched
    assert not torch.allclose(layer(x)[:, 32:], layer.base_layer(x)[:, 32:])


def test_default_placements_follow_the_papers(bases):
    def targets(family: str, cfg: mpeft.AdapterConfig) -> set[str]:
        names = mpeft.adapter_layers(mpeft.get_model(copy.deepcopy(bases[family]), cfg))
        return {n.rsplit(".", 1)[-1] if family != "bert" else ".".join(n.split(".")[-2:]) for n in names}

    assert targets("t5", mpeft.MoLoRAConfig(num_experts=2)) == {"q", "k", "v", "o", "wi", "wo"}
    assert targets("t5", mpeft.MoVConfig(num_experts=2)) == {"k", "v", "wo"}
    assert targets("llama", mpeft.MoVConfig(num_experts=2)) == {"k_proj", "v_proj", "down_proj"}
    assert targets("bert", mpeft.IA3Config()) == {"self.key", "self.value", "output.dense"}
    bert = mpeft.get_model(copy.deepcopy(bases["bert"]), mpeft.MoVConfig(num_experts=2))
    ffn, attn_out = "encoder.layer.0.output.dense", "encoder.layer.0.attention.output.dense"
    assert bert.get_submodule(ffn).feedforward and not isinstance(bert.get_submodule(attn_out), IA3Layer)
    # MoV's router reads the tensor it scales: the key output (32 wide) or the FFN activation (64 wide)
    assert bert.get_submodule(ffn).router.d_model == 64
    assert bert.get_submodule("encoder.layer.0.attention.self.key").router.d_model == 32


def test_save_load_round_trip_writes_only_adapter_tensors(bases, tmp_path):
    cfg = mpeft.MoVConfig(num_experts=3, top_k=2, modules_to_save=["classifier"])

    class Classifier(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder, self.classifier = encoder, nn.Linear(32, 3)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])

    torch.manual_seed(0)
    base = Classifier(copy.deepcopy(bases["bert"]))
    fresh = copy.deepcopy(base)
    head_only = mpeft.get_model(
        copy.deepcopy(base), mpeft.LoRAConfig(target_modules="all-linear", modules_to_save="classifier")
    )
    assert isinstance(head_only.classifier, nn.Linear) and head_only.classifier.weight.requires_grad  # no adapter in it
    model = mpeft.get_model(base, cfg)
    assert model.classifier.weight.requires_grad
    _perturb(model)
    ids = inputs_for("bert")["input_ids"]
    with torch.no_grad():
        expected = model(ids)
    mpeft.save_adapter(model, tmp_path / "adapter", format="mpolab")  # peft's format: tests/test_peft_interop.py
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(tensors) == set(mpeft.adapter_state_dict(model))
    assert not any("base_layer" in k or "embeddings" in k for k in tensors)
    assert {"classifier.weight", "classifier.bias"} <= set(tensors)
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["config"]["method"] == "mov" and record["config"]["top_k"] == 2

    loaded = mpeft.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=0)
    assert mpeft.trainable_parameters(loaded) == mpeft.trainable_parameters(model)
    mpeft.save_adapter(loaded, tmp_path / "adapter")  # overwriting in place works and leaves no temp files
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == files


def test_load_into_other_shapes_names_the_module_and_shapes(bases, tmp_path):
    model = mpeft.get_model(copy.deepcopy(bases["llama"]), mpeft.LoRAConfig(r=2))
    mpeft.save_adapter(model, tmp_path)
    cfg = bases["llama"].config.to_dict()
    cfg["intermediate_size"] = 48
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\.0\.mlp\.gate_proj': .*out_features=64 .*out_features=48"
    ):
        mpeft.load_adapter(other, tmp_path)
    assert not mpeft.adapter_layers(other)  # untouched
    with pytest.raises(ValueError, match="not an adapter folder"):
        mpeft.load_adapter(other, tmp_path / "missing")
    with pytest.raises(ValueError, match="has no such module"):
        mpeft.load_adapter(copy.deepcopy(bases["bert"]), tmp_path)


def test_molora_on_an_mpo_compressed_model_trains_only_the_adapters(bases):
    model = copy.deepcopy(bases["bert"])
    mpolab.compress(model, "all-linear", max_rank=4)
    compressed = output_for(model, "bert")
    model = mpeft.get_model(model, mpeft.MoLoRAConfig(r=2, num_experts=3, target_modules="all-linear"))
    layers = mpeft.adapter_layers(model)
    assert len(layers) == 13 and all(isinstance(m.base_layer, mpolab.MPOLinear) for m in layers.values())
    torch.testing.assert_close(output_for(model, "bert"), compressed, rtol=0, atol=1e-5)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs_for("bert")["input_ids"]
    target = torch.randn(2, 7, 32)
    model.train()
    losses = []
    for _ in range(8):
        loss = (model(input_ids=ids).last_hidden_state - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="routed mixture"):
        mpeft.merge_and_unload(model)


def test_lora_on_mpo_cannot_merge():
    model = nn.Sequential(nn.Linear(16, 16))
    mpolab.compress(model, "all-linear", max_rank=2)
    model = mpeft.get_model(model, mpeft.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="into a MPOLinear: merging needs a dense weight"):
        mpeft.merge_and_unload(model)


def test_print_trainable_parameters(bases, capsys):
    model = mpeft.get_model(copy.deepcopy(bases["t5"]), mpeft.IA3Config())
    counts = mpeft.print_trainable_parameters(model)
    expected = sum(layer.experts.vectors.numel() for layer in mpeft.adapter_layers(model).values())
    assert counts == {"trainable": expected, "total": sum(p.numel() for p in model.parameters())}
    text = capsys.readouterr().out
    assert text.startswith(f"trainable: {expected / counts['total']:.2%} of ") and f"{expected:,} of" in text


def test_bad_configs():
    with pytest.raises(ValueError, match=r"r must be a positive int \(>= 1\), got 0"):
        mpeft.LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int \(>= 1\), got 0"):
        mpeft.MoLoRAConfig(num_experts=0)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int \(>= 1\)"):
        mpeft.MoVConfig(num_experts=-2)
    with pytest.raises(ValueError, match="top_k=.* exceeds num_experts=3"):
        mpeft.MoVConfig(num_experts=3, top_k=4)
    with pytest.raises(TypeError, match="target_modules must be"):
        mpeft.LoRAConfig(target_modules=[1, 2])
    cfg = mpeft.MoLoRAConfig(r=2, num_experts=3, target_modules=["q"])
    assert mpeft.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_targets_list_what_matched(bases):
    t5 = copy.deepcopy(bases["t5"])
    with pytest.raises(ValueError, match=r"matched no .*near misses: \['q'\]"):
        mpeft.get_model(t5, mpeft.LoRAConfig(target_modules=["qq"]))
    with pytest.raises(ValueError, match=r"cannot wrap.*'shared': 'Embedding'.*Wrappable matches: \['.*\.q'"):
        mpeft.get_model(t5, mpeft.LoRAConfig(target_modules=["shared", "q"]))
    with pytest.raises(ValueError, match=r"layer_norm.*T5LayerNorm"):
        mpeft.get_model(t5, mpeft.IA3Config(target_modules=["layer_norm"]))
    assert not mpeft.adapter_layers(t5)  # errors leave the model untouched
    with pytest.raises(ValueError, match="no default target_modules for model_type None"):
        mpeft.get_model(nn.Sequential(nn.Linear(4, 4)), mpeft.LoRAConfig())
    with pytest.raises(ValueError, match="feedforward_modules \\['wi'\\] match none of the targets"):
        mpeft.get_model(t5, mpeft.IA3Config(target_modules=["k"], feedforward_modules=["wi"]))
    model = mpeft.get_model(t5, mpeft.LoRAConfig(target_modules=["q"]))
    with pytest.raises(ValueError, match="already has 6 adapters"):
        mpeft.get_model(model, mpeft.LoRAConfig(target_modules=["k"]))
    with pytest.raises(TypeError, match="config must be"):
        mpeft.get_model(t5, {"r": 4})


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_every_method_on_gpt2(bases, method, tmp_path):
    model = mpeft.get_model(copy.deepcopy(bases["gpt2"]), METHODS[method]())
    _perturb(model)
    mpeft.save_adapter(model, tmp_path)
    loaded = mpeft.load_adapter(copy.deepcopy(bases["gpt2"]), tmp_path)
    assert type(getattr(loaded, CONFIG_ATTR)) is type(getattr(model, CONFIG_ATTR))
    assert {n: m.describe() for n, m in mpeft.adapter_layers(loaded).items()} == {
        n: m.describe() for n, m in mpeft.adapter_layers(model).items()
    }
    torch.testing.assert_close(output_for(loaded, "gpt2"), output_for(model, "gpt2"), rtol=0, atol=0)


def test_saved_adapter_files_get_ordinary_permissions(bases, tmp_path):
    model = mpeft.get_model(copy.deepcopy(bases["llama"]), mpeft.LoRAConfig(r=2))
    old = os.umask(0o022)
    try:
        mpeft.save_adapter(model, tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_format_1_adapters_still_load(bases, tmp_path):
    """Format 1 kept ``<module>.router.*`` / ``<module>.experts.*``; now they live under ``<module>.moe``."""
    model = mpeft.get_model(copy.deepcopy(bases["gpt2"]), METHODS["molora"]())
    _perturb(model)
    mpeft.save_adapter(model, tmp_path, format="mpolab")
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert any(".moe.gate.weight" in k for k in tensors) and any(".moe.experts.lora_A" in k for k in tensors)
    old = {k.replace(".moe.gate.", ".router.").replace(".moe.experts.", ".experts."): v for k, v in tensors.items()}
    safetensors.torch.save_file(old, tmp_path / "adapter_model.safetensors")
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**record, "format_version": 1}))
    loaded = mpeft.load_adapter(copy.deepcopy(bases["gpt2"]), tmp_path)
    torch.testing.assert_close(output_for(loaded, "gpt2"), output_for(model, "gpt2"), rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_adapters_are_moe_layers_with_routing_statistics(bases, method):
    model = mpeft.get_model(copy.deepcopy(bases["t5"]), METHODS[method]())
    output_for(model, "t5")
    for layer in mpeft.adapter_layers(model).values():
        assert isinstance(layer.moe, MoE)
        stats = layer.moe.last_stats
        E = layer.experts.num_experts
        assert stats is not None and stats.tokens_per_expert.shape == (E,)
        assert stats.tokens_per_expert.tolist() == [stats.num_tokens] * E  # soft: every expert weighs in
        assert layer.last_routing is layer.moe.last_routing


def test_damaged_adapter_folders_give_clear_errors(bases, tmp_path):
    """Issue 13: a truncated weights file or a record without "modules" is a ValueError naming the problem."""
    model = mpeft.get_model(copy.deepcopy(bases["gpt2"]), mpeft.LoRAConfig(r=2))
    for fmt in ("peft", "mpolab"):
        folder = tmp_path / fmt
        mpeft.save_adapter(model, folder, format=fmt)
        weights = folder / "adapter_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
            mpeft.load_adapter(copy.deepcopy(bases["gpt2"]), folder)
        weights.write_bytes(data)
    record = json.loads((tmp_path / "mpolab" / "adapter_config.json").read_text())
    del record["modules"]
    (tmp_path / "mpolab" / "adapter_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"the adapter record lacks \['modules'\]"):
        mpeft.load_adapter(copy.deepcopy(bases["gpt2"]), tmp_path / "mpolab")
    (tmp_path / "mpolab" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        mpeft.load_adapter(copy.deepcopy(bases["gpt2"]), tmp_path / "mpolab")
