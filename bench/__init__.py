"""``python -m bench``: frozen base vs unfused (PEFT-structured) LoRA vs fused LoRA, per TP mode.

Modules, one job each:

* ``cases``: the case registry (``Case``, the per-kind shard builders and contenders) and the
  FLOP / byte / roofline formulas.
* ``runner``: spawns the ranks (gloo on CPU, NCCL on enough GPUs, one process otherwise) and,
  on each rank, times the contenders and counts collectives, saved activations and memory.
* ``report``: the stdout table, JSON, CSV, the PNG plot and the target checks.
* ``gpu_check``: the one-shot CUDA correctness / int64 / bench script behind ``gpu_check.sh``.

Nothing here is installed: run it from the repository root. Method and results: ``NOTES.md``.
"""
