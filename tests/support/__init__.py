"""What the tests share: the pool of ranks and what runs on it (``harness``), full problems and
their shards (``problems``), megatron-core layers (``layers``), named assertions over the one
tolerance rule (``checks``), real megatron-core models trained in spawned worlds (``gpt``,
``moe``, ``llama``, ``pipeline``) with the CPU shims they need (``megatron_shims``), and the CUDA
checks' verdicts (``cuda``)."""
