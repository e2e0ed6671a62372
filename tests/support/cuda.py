"""What the CUDA checks share (``tests/ops/test_cuda.py``, ``tests/parallel/test_cuda_modes.py``).

They run on a CUDA device with the ``triton`` backend and skip elsewhere, with the reason.
``TPLORA_CUDA_CHECKS_ON_CPU=torch`` (or ``interpret``) runs them on the CPU at small sizes with
that backend instead: how their plumbing is tested without a GPU.

Every result is judged by the one tolerance rule (``tplora_kernels.testing.numerics``) against
the fp64 math on the same inputs, torch's own error being torch computing the same thing in the
result's dtype. ``TPLORA_CHECKS_OUT=DIR`` also writes each test's verdicts to ``DIR/<test>.json``,
which ``python -m bench.gpu_summary`` summarises after ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tplora_kernels.testing.numerics import bar_for, rel_err

__all__ = ["ON_CPU", "SEED", "Target", "failures", "judge", "needs_cuda", "target", "verdict", "write_verdicts"]

SEED = 0x5EED1234
ON_CPU = os.environ.get("TPLORA_CUDA_CHECKS_ON_CPU")  # "torch" or "interpret": a dry run on the CPU

needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() and not ON_CPU,
    reason="needs a CUDA device (the kernels as compiled for it, on device memory); on CPU the interpreter "
           "checks in tests/ops cover the math (TPLORA_CUDA_CHECKS_ON_CPU=torch runs these at small sizes)")]


@dataclass(frozen=True)
class Target:
    """Where the checks run: the device, the backend, and whether at small (dry-run) sizes."""

    device: torch.device
    backend: str
    small: bool


def target() -> Target:
    """A CUDA device with the ``triton`` backend, or the CPU dry run ``TPLORA_CUDA_CHECKS_ON_CPU`` asks for."""
    if torch.cuda.is_available():
        return Target(torch.device("cuda"), "triton", small=False)
    return Target(torch.device("cpu"), ON_CPU or "torch", small=True)


def judge(triples, dtype: torch.dtype) -> dict:
    """``[(got, fp64 math, torch in dtype)]``: the worst error of got and of torch's own, and the rule's bar."""
    err = max(rel_err(got, ref) for got, ref, _ in triples)
    err_t = max(rel_err(low, ref) for _, ref, low in triples)
    tol, why = bar_for(dtype, err_t)
    return {"err": err, "err_torch": err_t, "tol": tol, "rule": why, "ok": err <= tol}


def verdict(name: str, got, ref64, torch_dt, results: list, **tags) -> None:
    """Append the rule's verdict on ``got`` to ``results`` (``tags`` name the case; ``dtype`` is the activations')."""
    results.append({"check": name, **tags, **judge([(got, ref64, torch_dt)], getattr(torch, tags["dtype"]))})


def write_verdicts(request: pytest.FixtureRequest, results: list) -> None:
    """Write a test's verdicts under ``TPLORA_CHECKS_OUT``, if set."""
    out = os.environ.get("TPLORA_CHECKS_OUT")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.nodeid.split("/")[-1])
    Path(out, f"{name}.json").write_text(json.dumps(results, indent=1, default=str))


def failures(results: list) -> str | None:
    """One line per failed verdict, or None when every one passed."""
    bad = [r for r in results if not r.get("ok")]
    if not bad:
        return None
    return f"{len(bad)} of {len(results)} checks failed:\n" + "\n".join(
        json.dumps({k: v for k, v in r.items() if k != "ok"}, default=str)[:400] for r in bad[:20])
