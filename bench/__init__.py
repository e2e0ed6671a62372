"""``python -m bench``: frozen base vs unfused (PEFT-structured) LoRA vs fused LoRA, per TP mode.

Modules, one job each:

* ``cases``: the case registry (``Case``, the per-kind shard builders and contenders) and the
  FLOP / byte / roofline formulas.
* ``runner``: spawns the ranks (``tplora_kernels.testing.launch``: gloo on CPU, NCCL on enough
  GPUs, one process otherwise) and, on each rank, times the contenders and counts collectives,
  saved activations and memory.
* ``report``: derives the ratios, judges the targets, renders the stdout table, and writes the
  JSON, CSV and PNG plot.
* ``gpu_summary``: the summary of a ``gpu_check.sh`` run (the CUDA tests, then the bench).

Nothing here is installed: run it from the repository root. Method and results: ``NOTES.md``.
"""
