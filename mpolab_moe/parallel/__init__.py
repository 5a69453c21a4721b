"""Expert parallelism on ``torch.distributed``: each rank owns ``E / world`` experts of a MoE layer.

Examples:
    >>> import torch.distributed as dist
    >>> from mpolab_moe import MoE, TopKGate, MPOExperts
    >>> from mpolab_moe.parallel import expert_parallel, average_replicated_gradients
    >>> dist.init_process_group()                                  # doctest: +SKIP
    >>> moe = expert_parallel(MoE(TopKGate(768, 64, k=2), MPOExperts(768, 3072, 64)))  # doctest: +SKIP

See ``docs/distributed.md``.
"""

from .api import (
    GroupReducer,
    average_replicated_gradients,
    clip_grad_norm_,
    distributed_gradient_mask,
    even_placement,
    expert_parallel,
    expert_tensors,
    ignore_expert_tensors_in_ddp,
    replicated_parameters,
    shard_experts,
)
from .bank import ExpertParallelBank
from .collectives import ByteCounter, CollectiveError, GroupRef, all_to_all, default_expert_group
from .sharding import expert_tensor_names, local_bank, register_expert_tensors
from .state import full_state_dict, load_full_state_dict

__all__ = [
    "ByteCounter",
    "CollectiveError",
    "ExpertParallelBank",
    "GroupRef",
    "GroupReducer",
    "all_to_all",
    "average_replicated_gradients",
    "clip_grad_norm_",
    "default_expert_group",
    "distributed_gradient_mask",
    "even_placement",
    "expert_parallel",
    "expert_tensor_names",
    "expert_tensors",
    "full_state_dict",
    "ignore_expert_tensors_in_ddp",
    "load_full_state_dict",
    "local_bank",
    "register_expert_tensors",
    "replicated_parameters",
    "shard_experts",
]
