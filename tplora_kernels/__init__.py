"""tplora_kernels."""
