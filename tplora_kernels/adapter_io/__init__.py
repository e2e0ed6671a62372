"""Adapter I/O: every way an adapter leaves or enters a model, at any parallel layout.

``api`` (PEFT files, Hugging Face names, in memory), ``checkpoint`` (adapter-only Megatron dist
checkpoints), over ``collect`` (the agreement and collection protocol across ranks),
``peft_format`` and ``hf_format`` (the two formats, model-free). Layers are named by the one rule
of ``tplora_kernels.naming``. The public functions are exported by ``tplora_kernels``.
"""
