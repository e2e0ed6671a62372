"""Smoke test of ``python -m bench``: a tiny --quick run at TP 1 and 2 on real gloo ranks.

It checks the files and their fields, and the collective accounting the bench exists to show:
the fused path runs exactly the base layer's collectives in every mode and phase, and the
unfused reference adds one wherever LoRA needs a reduction of its own.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (kind, sp) -> collectives the reference adds over the base in (forward, backward)
REFERENCE_ADDS = {("column", False): (0, 1), ("column", True): (1, 1), ("row", False): (1, 0), ("row", True): (1, 1)}


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI's own default
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--tp", "1,2", "--backend", "torch",
                           "--out-dir", str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "fused" in proc.stdout and "[MET] collectives" in proc.stdout, proc.stdout[-3000:]
    data = json.loads((out / "bench.json").read_text())
    data["_dir"] = out
    return data


def _trios(data: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in data["results"]:
        out.setdefault(r["label"], {})[r["contender"]] = r
    return out


def test_meta_fields(bench_json):
    meta = bench_json["meta"]
    for key in ("machine", "versions", "git", "backend", "started_utc", "wall_s", "config"):
        assert key in meta, f"meta lacks {key!r}"
    for key in ("python", "torch", "triton", "megatron-core"):
        assert key in meta["versions"], f"meta.versions lacks {key!r}"
    assert "commit" in meta["git"], "meta.git lacks the commit"
    assert meta["backend"] == ["torch"], f"backend {meta['backend']} != ['torch']"


def test_every_case_has_three_contenders_and_fields(bench_json):
    trios = _trios(bench_json)
    tps = {next(iter(t.values()))["case"]["tp"] for t in trios.values()}
    assert tps == {1, 2}, f"TP sizes run: {tps}"
    assert len(trios) == 6, f"expected 6 cases (tp1: column,row; tp2: x sp off/on), got {sorted(trios)}"
    for label, trio in trios.items():
        assert sorted(trio) == ["base", "fused", "reference"], f"{label}: contenders {sorted(trio)}"
        for name, r in trio.items():
            for ph in ("fwd_ms", "fwd_bwd_ms"):
                q = r[ph]
                assert q["p20"] <= q["median"] <= q["p80"] and q["median"] > 0, f"{label} {name} {ph}: {q}"
            for key in ("saved_bytes", "peak_bytes", "held_after_fwd_bytes", "tflops_fwd_bwd", "collectives"):
                assert key in r, f"{label} {name}: no {key!r}"
        fused = trio["fused"]
        for key in ("overhead_pct_fwd", "overhead_pct_fwd_bwd", "speedup_vs_reference_fwd",
                    "speedup_vs_reference_fwd_bwd", "saved_ratio_vs_reference"):
            assert fused.get(key) is not None, f"{label} fused: no {key!r}"
        assert fused["check_rel_err_vs_reference"] < 1e-4, \
            f"{label}: fused vs reference (same mask) rel err {fused['check_rel_err_vs_reference']:.2e}"


def test_collectives_fused_equals_base_reference_adds_one(bench_json):
    for label, trio in _trios(bench_json).items():
        case = trio["base"]["case"]
        counts = {}
        for name, r in trio.items():
            c = r["collectives"]
            assert c["measured"] and c["count_check"] == "ok", \
                f"{label} {name}: wrapper and profiler c10d counts disagree: {c}"
            counts[name] = (c["fwd"]["count"], c["bwd"]["count"])
        if case["tp"] == 1:
            assert counts == dict.fromkeys(counts, (0, 0)), f"{label}: collectives at TP 1: {counts}"
            continue
        assert counts["fused"] == counts["base"], f"{label}: fused {counts['fused']} != base {counts['base']}"
        adds = tuple(r - b for r, b in zip(counts["reference"], counts["base"]))
        want = REFERENCE_ADDS[(case["kind"], case["sp"])]
        assert adds == want, f"{label}: reference adds {adds} over base, expected {want}"


def test_saved_activations_below_reference_at_dropout(bench_json):
    for label, trio in _trios(bench_json).items():
        f, r = trio["fused"]["saved_bytes"], trio["reference"]["saved_bytes"]
        assert 0 < f < r, f"{label}: fused saves {f} B, reference {r} B"


def test_csv_and_plot_written(bench_json):
    out = bench_json["_dir"]
    with (out / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(bench_json["results"]), f"CSV has {len(rows)} rows"
    assert {"label", "contender", "fwd_bwd_ms_median", "collectives_fwd_count"} <= set(rows[0]), sorted(rows[0])
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 1000, "bench.png missing or empty"


def test_helpers():
    from bench.cases import Case, model_flops
    from bench.runner import count_collectives, quantiles

    assert quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p20": 1.8, "p80": 4.2}
    import torch.distributed as dist

    before = dist.all_reduce
    with count_collectives([], ["fwd"]):
        assert dist.all_reduce is not before, "all_reduce not wrapped"
    assert dist.all_reduce is before, "all_reduce not restored"
    c = Case("column", 2, False, 8, 16, 32, 4, 0.0, "fp32")
    assert model_flops(c, "base", "fwd") == 2 * 8 * 16 * 16
    assert model_flops(c, "fused", "fwd_bwd") == 4 * 8 * 16 * 16 + 6 * 8 * 4 * (16 + 16)
