"""``python -m bench.gpu_summary DIR``: what ``bench/gpu_check.sh`` found, in a few lines.

Reads what the run left in DIR: ``steps.txt`` (each step's exit status and time), the CUDA
tests' JUnit report ``pytest.xml`` and their verdicts ``checks/*.json`` (the tightest one
against its bar), and the bench's ``bench/bench.json``: its fused cases, the backend that ran in
each and ``ops.select``'s per-shape choices, the multi-adapter cases, the verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .report import format_backends, format_multi, format_targets


def _steps(out: Path) -> list[str]:
    steps = out / "steps.txt"
    return ["steps: " + "; ".join(steps.read_text().split("\n")).strip("; ")] if steps.exists() else []


def _tests(out: Path) -> list[str]:
    xml = out / "pytest.xml"
    if not xml.exists():
        return ["CUDA tests: no result (the step failed before pytest reported, or timed out; see pytest.log)"]
    cases = ET.parse(xml).getroot().iter("testcase")
    failed, skipped, passed = [], [], []
    for c in cases:
        name = f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}"
        if c.find("failure") is not None or c.find("error") is not None:
            failed.append(name)
        elif c.find("skipped") is not None:
            skipped.append(name)
        else:
            passed.append(name)
    lines = [f"CUDA tests: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"]
    lines += [f"  FAIL {n}" for n in failed[:12]]
    verdicts = [v for f in sorted((out / "checks").glob("*.json")) for v in json.loads(f.read_text())]
    bad = [v for v in verdicts if not v.get("ok")]
    lines.append(f"  checks: {len(verdicts) - len(bad)}/{len(verdicts)} within the tolerance rule")
    for v in bad[:8]:
        lines.append("  FAIL " + json.dumps({k: x for k, x in v.items() if k != "ok"})[:300])
    judged = [v for v in verdicts if "err" in v and "tol" in v]
    if judged:
        w = max(judged, key=lambda v: v["err"] / v["tol"] if v["tol"] else 0)
        lines.append(f"  tightest: {w['check']} {w.get('dtype', '')} err {w['err']:.2e} vs tol {w['tol']:.2e}")
    return lines


def _bench(out: Path) -> list[str]:
    bj = out / "bench" / "bench.json"
    if not bj.exists():
        return ["bench: no bench.json (step failed or timed out; see bench.log)"]
    data = json.loads(bj.read_text())
    lines = [f"bench ({data['meta'].get('wall_s')} s, {data['meta']['machine'].get('gpus')}):"]
    for r in data["results"]:
        if r["contender"] != "fused":
            continue
        frac = r.get("cublas_frac_fwd")
        lines.append(f"  {r['label']:<24} fused fwd {r['fwd_ms']['median']:.3f} ms, fwd+bwd "
                     f"{r['fwd_bwd_ms']['median']:.3f} ms, speedup vs reference "
                     f"{r.get('speedup_vs_reference_fwd', 0):.2f}x / "
                     f"{r.get('speedup_vs_reference_fwd_bwd', 0):.2f}x, "
                     f"overhead over base {r.get('overhead_pct_fwd_bwd', 0):+.1f}%, "
                     f"{r.get('tflops_fwd_bwd') or 0:.0f} TFLOP/s, cuBLAS frac fwd "
                     f"{'n/a' if frac is None else f'{frac:.2f}'}")
    lines.append(format_backends(data["meta"], data["results"]))
    if multi := format_multi(data["results"]):
        lines.append(multi)
    lines.append(format_targets(data["targets"]))
    return lines


def summarize(out: Path) -> str:
    """A short text summary of a ``gpu_check.sh`` run's directory.

    Args:
        out: the run's directory (``$OUT``).

    Returns:
        The summary, one item per line.
    """
    return "\n".join([f"gpu_check summary ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})", *_steps(out), *_tests(out),
                      *_bench(out)])


def main(argv: list[str] | None = None) -> int:
    """CLI: print ``summarize(DIR)``."""
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the directory gpu_check.sh wrote ($OUT)")
    print(summarize(ap.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
