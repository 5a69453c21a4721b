"""A PEFT-style front door for the LoRA, (IA)³, MoLoRA and MoV expert banks.

Examples:
    >>> from mpolab_moe import peft as mpeft
    >>> cfg = mpeft.MoLoRAConfig(r=4, alpha=16, num_experts=10, target_modules=["q", "k", "v", "o", "wi", "wo"])
    >>> model = mpeft.get_model(model, cfg)          # base frozen, experts + routers trainable
    >>> mpeft.print_trainable_parameters(model)
    >>> mpeft.save_adapter(model, "adapter/")             # HF peft's folder format (PeftModel loads LoRA / IA3)
    >>> model = mpeft.load_adapter(base, "adapter/")      # also reads folders written by peft
    >>> model = mpeft.get_peft_model(model, mpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1))  # peft names
    >>> model.print_trainable_parameters(); model.save_pretrained("adapter/")
    >>> merged = mpeft.merge_and_unload(lora_model)  # plain LoRA / IA3 only
"""

from .config import (
    DEFAULT_TARGETS,
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    config_from_dict,
)
from .front import PeftModel, add_peft_methods, from_pretrained, get_model, get_peft_model, load_adapter
from .io import save_adapter
from .layers import AdapterLayer, IA3Layer, LoRALayer
from .model import (
    adapter_layers,
    adapter_state_dict,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
)
from .peft_format import from_peft_config

#: peft's class names for the same configs.
LoraConfig = LoRAConfig

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "AdapterLayer",
    "IA3Config",
    "IA3Layer",
    "LoRAConfig",
    "LoRALayer",
    "LoraConfig",
    "MoLoRAConfig",
    "MoVConfig",
    "PeftModel",
    "adapter_layers",
    "add_peft_methods",
    "adapter_state_dict",
    "config_from_dict",
    "from_peft_config",
    "from_pretrained",
    "get_model",
    "get_peft_model",
    "load_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "trainable_parameters",
]
