"""Per-rank LoRA ops: Triton kernels, their launch wrappers and the torch backend."""

from .launch import lora_dy_bwd, lora_linear_dx, lora_linear_fwd, lora_shrink_bwd, lora_shrink_fwd

__all__ = ["lora_dy_bwd", "lora_linear_dx", "lora_linear_fwd", "lora_shrink_bwd", "lora_shrink_fwd"]
