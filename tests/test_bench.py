"""``python -m bench``: its option checks, and a tiny --quick run at TP 1 and 2 on real gloo ranks.

The run checks the files and their fields, and the collective accounting the bench exists to
show: the fused path runs exactly the base layer's collectives in every mode and phase, while the
unfused reference and PEFT's own LoraParallelLinear add one wherever LoRA needs a reduction of its
own. It also checks what the output says: structural verdicts met, the GPU speed targets not
judged on CPU, a legend for the table, and no progress bar when nobody watches a terminal.
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

# (kind, sp) -> collectives the unfused contenders add over the base in (forward, backward)
REFERENCE_ADDS = {("column", False): (0, 1), ("column", True): (1, 1), ("row", False): (1, 0), ("row", True): (1, 1)}


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the CLI; stdout and stderr decoded as they were written (text mode would turn \\r into \\n)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI's own default
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          timeout=timeout)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    # Pipes, not a terminal: the progress must come as plain lines, without a bar.
    proc = _bench("--quick", "--tp", "1,2", "--backend", "torch", "--out-dir", str(out))
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads((out / "bench.json").read_text())
    return {"data": data, "dir": out, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def bench_json(bench_run) -> dict:
    return bench_run["data"]


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
        sp = next(iter(trio.values()))["case"]["sp"]
        want = ["base", "fused", "reference"] if sp else ["base", "fused", "peft", "reference"]
        assert sorted(trio) == want, f"{label}: contenders {sorted(trio)}, expected {want}"
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


def test_collectives_fused_equals_base_unfused_add_one(bench_json):
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
        want = REFERENCE_ADDS[(case["kind"], case["sp"])]
        for name in ("reference", "peft"):
            if name in counts:
                adds = tuple(r - b for r, b in zip(counts[name], counts["base"]))
                assert adds == want, f"{label}: {name} adds {adds} over base, expected {want}"


def test_saved_activations_below_reference_at_dropout(bench_json):
    for label, trio in _trios(bench_json).items():
        f = trio["fused"]["saved_bytes"]
        for name in ("reference", "peft"):
            if name in trio:
                other = trio[name]["saved_bytes"]
                assert 0 < f < other, f"{label}: fused saves {f} B, {name} {other} B"


def test_peft_contender_is_peft_layer_with_our_weights(bench_json):
    """PEFT's own layer runs with SP off; with dropout off it computes the reference's output."""
    for label, trio in _trios(bench_json).items():
        skipped = trio["fused"]["peft_skipped"]
        if "peft" not in trio:
            assert skipped and "torch.cuda" in skipped, f"{label}: peft skipped for {skipped!r}"
            continue
        assert skipped is None, f"{label}: peft ran but is marked skipped: {skipped!r}"
        err = trio["peft"]["check_rel_err_vs_reference"]
        assert err < 1e-5, f"{label}: PEFT's layer (dropout off) vs reference p=0: rel err {err:.2e} > 1e-05"


def test_output_says_what_cpu_numbers_mean(bench_run):
    out, err = bench_run["stdout"], bench_run["stderr"]
    for line in ("[MET] fused LoRA adds 0 collectives", "[MET] fused saves only x, u", "Legend:", "ovh% f/fb",
                 "coll f+b MiB", "What CPU times mean", "[not judged here] fused fwd+bwd <= 1.05x",
                 "[not judged here] fused fwd+bwd >= 1.45x", "--quick: a smoke run"):
        assert line in out, f"stdout lacks {line!r}:\n{out[-4000:]}"
    assert "MISSED" not in out, f"a CPU run reports a missed target:\n{out[-4000:]}"
    assert "\r" not in out + err, "carriage returns (a progress bar) in output that is not a terminal"
    done = [ln for ln in err.splitlines() if ln.startswith("[") and " done (" in ln]
    assert len(done) == len(_trios(bench_run["data"])), f"one progress line per case expected, got {done}"


@pytest.mark.parametrize("args, message", [
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--tp", "1,-2"], "--tp must be >= 1, got -2"),
    (["--tokens", "-5"], "--tokens must be >= 1, got -5"),
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["--in", "-64"], "--in must be >= 1, got -64"),
    (["--out", "0"], "--out must be >= 1, got 0"),
    (["--r", "0"], "--r must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--reps", "0"], "--reps must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--p", "1"], "--p must be in [0, 1), got 1"),
    (["--p", "0.1,x"], "argument --p: expected comma-separated numbers"),
    (["--kind", "diag"], "--kind must be column and/or row, got 'diag'"),
    (["--tp", ""], "--tp needs at least one value"),
    (["--tp", "3"], "must divide by tp=3"),
    (["--tp", "2", "--sp", "on", "--tokens", "1023", "--in", "64", "--out", "64"], "--tokens 1023 divisible by tp=2"),
    (["--backend", "triton", "--device", "cpu"], "--backend triton needs CUDA"),
])
def test_bad_options_fail_up_front(args, message, capsys, monkeypatch):
    """A bad value is one argparse-style line (exit status 2) before any rank starts."""
    import bench.runner
    from bench.__main__ import main

    def no_ranks(*a, **k):
        raise AssertionError(f"ranks started for {args}")

    monkeypatch.setattr(bench.runner, "run_cases", no_ranks)
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"{args}: exit status {exc.value.code}, stderr {err!r}"
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m bench: error: ") and message in last, f"{args}: {last!r} lacks {message!r}"
    assert "Traceback" not in err, f"{args}: traceback:\n{err}"


def test_bad_option_from_the_shell():
    proc = _bench("--tp", "0", timeout=60)
    want = "python -m bench: error: --tp must be >= 1, got 0"
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == want, \
        f"rc {proc.returncode}, stderr {proc.stderr!r}"


def _records(backend: str, base: float, fused: float, ref: float) -> list[dict]:
    """One synthetic case's records (fwd+bwd medians in ms) with what ``report.targets`` reads."""
    from bench.report import derive

    case = {"kind": "column", "tp": 2, "sp": False, "tokens": 64, "d_in": 64, "d_out": 64, "r": 8, "p": 0.1,
            "dtype": "bf16", "emulated": False}
    saved = {"base": 0, "reference": 64 * 64 * 9, "fused": 64 * 64 * 2 + 64 * 8 * 2 + 8}
    coll = {"base": (0, 1), "reference": (0, 2), "fused": (0, 1)}
    recs = []
    for name, t in (("base", base), ("reference", ref), ("fused", fused)):
        c = {ph: {"count": n, "bytes": 1} for ph, n in zip(("fwd", "bwd"), coll[name])}
        recs.append({"label": "column tp=2 sp=off p=0.1", "contender": name, "case": case, "backend": backend,
                     "device": "cpu" if backend == "torch" else "NVIDIA H200",
                     "fwd_ms": {"median": t / 3}, "fwd_bwd_ms": {"median": t}, "saved_bytes": saved[name],
                     "collectives": {**c, "measured": True}})
    return derive(recs)


@pytest.mark.parametrize("base, fused, ref, met", [(1.0, 1.04, 1.6, (True, True)), (1.0, 1.06, 1.6, (False, True)),
                                                   (1.0, 1.04, 1.4, (True, False))])
def test_gpu_speed_targets_judged_on_triton_only(base, fused, ref, met):
    from bench.report import format_targets, targets

    t = targets(_records("triton", base, fused, ref))
    got = (t["gpu_overhead"]["met"], t["gpu_speedup"]["met"])
    assert got == met, f"triton: fused/base {fused / base:.2f}, ref/fused {ref / fused:.2f}: met {got}, expected {met}"
    assert t["saved_ratio"]["judged"] and t["saved_ratio"]["met"], f"bf16 saved ratio: {t['saved_ratio']}"
    cpu = targets(_records("torch", base, fused, ref))
    assert not cpu["gpu_overhead"]["judged"] and not cpu["gpu_speedup"]["judged"], "torch backend judged for speed"
    text = format_targets(cpu)
    assert "MISSED" not in text and "What CPU times mean" in text, text


def test_csv_and_plot_written(bench_run, bench_json):
    out = bench_run["dir"]
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


def test_duration_stated_alike_in_help_readme_and_notes():
    from bench.__main__ import DEFAULT_RUN_MINUTES, build_parser

    phrase = f"about {DEFAULT_RUN_MINUTES} minutes"
    texts = {"--help": " ".join(build_parser().format_help().split()),
             "README.md": " ".join((ROOT / "README.md").read_text().split()),
             "bench/NOTES.md": " ".join((ROOT / "bench" / "NOTES.md").read_text().split())}
    missing = [name for name, text in texts.items() if phrase not in text]
    assert not missing, f"{missing} do not state the default run's duration as {phrase!r}"
