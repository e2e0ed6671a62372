"""tplora_kernels: fused Triton LoRA for Megatron tensor-parallel linear layers.

Layers, each calling the one below it::

    ops.kernels -> ops.launch (+ ops.registry, ops.select) -> autograd -> functional -> modules -> dispatch

beside them: ``config`` (options), ``layout`` (the shard rule), ``base`` (base-layer
recognisers), ``rng`` (dropout seeds), ``mask`` (the dropout mask), ``adapters`` (registry),
``naming`` (layout-independent layer names), ``adapter_io`` (adapter files, Hugging Face names,
in-memory export, adapter-only checkpoints), ``multi`` (several adapters in one batch), ``peft``
(PEFT integration).

Quick start (inside an initialised tensor-parallel group)::

    from tplora_kernels import ColumnParallelLoRA
    layer = ColumnParallelLoRA(megatron_column_linear, r=16, lora_alpha=32, lora_dropout=0.1)
    y, bias = layer(x)          # same contract as the base layer's forward
"""

from .adapter_io.api import (
    AdapterStream,
    adapter_state_dict,
    export_hf_adapter,
    gather_full_factors,
    iter_adapter_state_dict,
    load_adapter,
    load_adapter_state_dict,
    load_hf_adapter,
    save_adapter,
)
from .adapter_io.checkpoint import adapter_sharded_state_dict, load_adapter_checkpoint, save_adapter_checkpoint
from .config import LoRAConfig
from .dispatch import apply_lora, dispatch_megatron, merge_adapters, unmerge_adapters
from .distributed import sum_sequence_parallel_grads
from .functional import column_parallel_lora, parallel_linear, row_parallel_lora
from .modules import ColumnParallelLoRA, LoRALayer, RowParallelLoRA, lora_modules, set_batch_adapters
from .ops.kernels import interpreter_active
from .ops.registry import backend_names, register_backend
from .ops.select import get_backend, resolve_backend
from .rng import checkpoint_context_fn, draw_seed

__version__ = "0.1.0.dev0"

__all__ = [
    "AdapterStream",
    "ColumnParallelLoRA",
    "LoRAConfig",
    "LoRALayer",
    "RowParallelLoRA",
    "adapter_sharded_state_dict",
    "adapter_state_dict",
    "apply_lora",
    "backend_names",
    "checkpoint_context_fn",
    "column_parallel_lora",
    "dispatch_megatron",
    "draw_seed",
    "export_hf_adapter",
    "gather_full_factors",
    "get_backend",
    "interpreter_active",
    "iter_adapter_state_dict",
    "load_adapter",
    "load_adapter_checkpoint",
    "load_adapter_state_dict",
    "load_hf_adapter",
    "lora_modules",
    "merge_adapters",
    "parallel_linear",
    "register_backend",
    "resolve_backend",
    "row_parallel_lora",
    "save_adapter",
    "save_adapter_checkpoint",
    "set_batch_adapters",
    "sum_sequence_parallel_grads",
    "unmerge_adapters",
]
