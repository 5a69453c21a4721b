"""A PEFT-style front door for the LoRA, (IA)³, MoLoRA and MoV expert banks.

Examples:
    >>> from mpolab_moe import peft as mpeft
    >>> cfg = mpeft.MoLoRAConfig(r=4, alpha=16, num_experts=10, target_modules=["q", "k", "v", "o", "wi", "wo"])
    >>> model = mpeft.get_model(model, cfg)          # base frozen, experts + routers trainable
    >>> mpeft.print_trainable_parameters(model)
    >>> mpeft.save_adapter(model, "adapter/")
    >>> model = mpeft.load_adapter(base, "adapter/")
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
from .io import load_adapter, save_adapter
from .layers import AdapterLayer, IA3Layer, LoRALayer
from .model import (
    adapter_layers,
    adapter_state_dict,
    get_model,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
)

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "AdapterLayer",
    "IA3Config",
    "IA3Layer",
    "LoRAConfig",
    "LoRALayer",
    "MoLoRAConfig",
    "MoVConfig",
    "adapter_layers",
    "adapter_state_dict",
    "config_from_dict",
    "get_model",
    "load_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "trainable_parameters",
]
