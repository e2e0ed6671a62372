"""tplora_kernels: fused Triton LoRA for Megatron tensor-parallel linear layers.

Layers, each calling the one below it::

    ops.kernels  ->  ops.launch  ->  autograd  ->  functional  ->  modules  ->  dispatch

Quick start (inside an initialised tensor-parallel group)::

    from tplora_kernels import ColumnParallelLoRA
    layer = ColumnParallelLoRA(megatron_column_linear, r=16, lora_alpha=32, lora_dropout=0.1)
    y, bias = layer(x)          # same contract as the base layer's forward
"""

from ._backend import BACKENDS, interpreter_active, resolve_backend
from .checkpoint import adapter_sharded_state_dict, gather_full_factors, load_adapter, save_adapter
from .dispatch import LoRAConfig, apply_lora, dispatch_megatron
from .distributed import sum_sequence_parallel_grads
from .functional import column_parallel_lora, draw_seed, parallel_linear, row_parallel_lora
from .modules import ColumnParallelLoRA, RowParallelLoRA

__version__ = "0.1.0.dev0"

__all__ = [
    "BACKENDS",
    "ColumnParallelLoRA",
    "LoRAConfig",
    "RowParallelLoRA",
    "adapter_sharded_state_dict",
    "apply_lora",
    "column_parallel_lora",
    "dispatch_megatron",
    "draw_seed",
    "gather_full_factors",
    "interpreter_active",
    "load_adapter",
    "parallel_linear",
    "resolve_backend",
    "row_parallel_lora",
    "save_adapter",
    "sum_sequence_parallel_grads",
]
