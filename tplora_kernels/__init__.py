"""tplora_kernels: fused Triton LoRA for Megatron tensor-parallel linear layers.

Layers, each calling the one below it::

    ops.kernels -> ops.launch (+ backends) -> autograd -> functional -> modules -> dispatch

beside them: ``config`` (options), ``layout`` (the shard rule), ``base`` (base-layer
recognisers), ``rng`` (dropout seeds), ``mask`` (the dropout mask), ``adapters`` (registry),
``checkpoint`` (adapter files), ``hf`` (adapters under Hugging Face names), ``multi`` (several
adapters in one batch), ``peft`` (PEFT integration).

Quick start (inside an initialised tensor-parallel group)::

    from tplora_kernels import ColumnParallelLoRA
    layer = ColumnParallelLoRA(megatron_column_linear, r=16, lora_alpha=32, lora_dropout=0.1)
    y, bias = layer(x)          # same contract as the base layer's forward
"""

from .backends import BACKENDS, get_backend, interpreter_active, resolve_backend
from .checkpoint import adapter_sharded_state_dict, gather_full_factors, load_adapter, save_adapter
from .config import LoRAConfig
from .dispatch import apply_lora, dispatch_megatron
from .distributed import sum_sequence_parallel_grads
from .functional import column_parallel_lora, parallel_linear, row_parallel_lora
from .hf import export_hf_adapter, load_hf_adapter
from .modules import ColumnParallelLoRA, RowParallelLoRA, lora_modules, set_batch_adapters
from .rng import checkpoint_context_fn, draw_seed

__version__ = "0.1.0.dev0"

__all__ = [
    "BACKENDS",
    "ColumnParallelLoRA",
    "LoRAConfig",
    "RowParallelLoRA",
    "adapter_sharded_state_dict",
    "apply_lora",
    "checkpoint_context_fn",
    "column_parallel_lora",
    "dispatch_megatron",
    "draw_seed",
    "export_hf_adapter",
    "gather_full_factors",
    "get_backend",
    "interpreter_active",
    "load_adapter",
    "load_hf_adapter",
    "lora_modules",
    "parallel_linear",
    "resolve_backend",
    "row_parallel_lora",
    "save_adapter",
    "set_batch_adapters",
    "sum_sequence_parallel_grads",
]
