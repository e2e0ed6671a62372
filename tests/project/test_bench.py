"""``python -m bench``: its option checks, and a tiny --quick run at TP 1 and 2 on real gloo ranks.

The run checks the files and their fields, and the collective accounting the bench exists to
show: the fused path runs exactly the base layer's collectives in every mode and phase, while the
unfused reference and PEFT's own LoraParallelLinear add one wherever LoRA needs a reduction of its
own. It also checks what the output says: structural verdicts met, the GPU speed targets not
judged on CPU, a legend for the table, and no progress bar when nobody watches a terminal.

The same run has the multi-adapter cases (``--multi on``): 4 adapters in one mixed call against
one call per adapter, whose answers must agree before anything is timed, and whose collectives
and saved bytes follow from the design (the mixed call: the base layer's collectives, n·r wide;
sequential: n times as many, each 1/n the rows). And the DoRA cases (``--dora on``): the fused
DoRA call against the fused LoRA call and PEFT's DoRA structure per rank, checked to agree
before timing; DoRA runs LoRA's collectives (a row layer's forward one n values per block
wider, plus the dropped product with dropout) and saves at most one output-sized tensor (and
two [n] row vectors) more than LoRA.
"""

from __future__ import annotations

import csv
import doctest
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import bench.runner
from bench.__main__ import DEFAULT_RUN_MINUTES, build_parser, main
from bench.cases import Case, _tensors, build, model_flops
from bench.report import derive, format_backends, format_targets, judge
from bench.runner import _backends_ran, _measure_pass, _verify, count_collectives, quantiles
from tplora_kernels import get_backend
from tplora_kernels.testing.numerics import rel_err

ROOT = Path(__file__).resolve().parents[2]

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
    proc = _bench("--quick", "--tp", "1,2", "--backend", "torch", "--multi", "on", "--dora", "on", "--out-dir",
                  str(out))
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads((out / "bench.json").read_text())
    return {"data": data, "dir": out, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def bench_json(bench_run) -> dict:
    return bench_run["data"]


def _groups(data: dict, multi: bool = False, dora: bool = False) -> dict[str, dict[str, dict]]:
    """``{label: {contender: record}}`` of the single-adapter cases (or of the multi-adapter, or the DoRA ones)."""
    out: dict[str, dict[str, dict]] = {}
    for r in data["results"]:
        if (r["case"]["adapters"] > 1) == multi and bool(r["case"].get("dora")) == dora:
            out.setdefault(r["label"], {})[r["contender"]] = r
    return out


def _trios(data: dict) -> dict[str, dict[str, dict]]:
    return _groups(data)


def test_meta_fields(bench_json):
    """bench.json's meta names the machine, the versions, the commit, the backend, when and how long."""
    meta = bench_json["meta"]
    for key in ("machine", "versions", "git", "backend", "started_utc", "wall_s", "config"):
        assert key in meta, f"meta lacks {key!r}"
    for key in ("python", "torch", "triton", "megatron-core"):
        assert key in meta["versions"], f"meta.versions lacks {key!r}"
    assert "commit" in meta["git"], "meta.git lacks the commit"
    assert meta["backend"] == ["torch"], f"backend {meta['backend']} != ['torch']"


def test_every_case_has_three_contenders_and_fields(bench_json):
    """Every case has its contenders (PEFT's where it runs) with timings, memory and collectives,
    and the fused one its ratios and its agreement with the reference.
    """
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
    """The fused path runs the base layer's collectives; the reference and PEFT's layer add one
    where LoRA needs a reduction of its own.
    """
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
    """The fused path saves fewer bytes than the unfused contenders."""
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
    """stdout states the structural verdicts, says the GPU speed targets are not judged on CPU, has
    the legend, and prints plain progress lines when not on a terminal.
    """
    out, err = bench_run["stdout"], bench_run["stderr"]
    for line in ("[MET] fused LoRA adds 0 collectives", "[MET] fused saves only x, u", "Legend:", "ovh% f/fb",
                 "coll f+b MiB", "What CPU times mean", "[not judged here] fused fwd+bwd <= 1.05x",
                 "[not judged here] fused fwd+bwd >= 1.45x", "--quick: a smoke run"):
        assert line in out, f"stdout lacks {line!r}:\n{out[-4000:]}"
    assert "MISSED" not in out, f"a CPU run reports a missed target:\n{out[-4000:]}"
    assert "\r" not in out + err, "carriage returns (a progress bar) in output that is not a terminal"
    done = [ln for ln in err.splitlines() if ln.startswith("[") and " done (" in ln]
    cases = sum(len(_groups(bench_run["data"], multi=m, dora=d)) for m, d in ((False, False), (True, False),
                                                                            (False, True)))
    assert len(done) == cases, f"one progress line per case ({cases}) expected, got {done}"
    for line in ("Multi-adapter cases", "seq/mix f/fb", "Backend that ran: torch in every case", "DoRA cases",
                 "[MET] DoRA adds 0 collectives per micro-batch", "[MET] DoRA saves at most LoRA's bytes"):
        assert line in out, f"stdout lacks {line!r}:\n{out[-4000:]}"


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
    (["--adapters", "1"], "--adapters must be >= 2, got 1"),
    (["--multi", "only", "--tp", "1", "--tokens", "66"], "--tokens 66 must divide by 4 (the 4 samples"),
    (["--multi", "only", "--tp", "2", "--tokens", "36"], "--tokens 36 must divide by 8 (the 4 samples of the "
                                                          "multi-adapter case times tp=2 under SP)"),
])
def test_bad_options_fail_up_front(args, message, capsys, monkeypatch):
    """A bad value is one argparse-style line (exit status 2) before any rank starts."""
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
    """A bad option from the shell exits with status 2 and one usage line."""
    proc = _bench("--tp", "0", timeout=60)
    want = "python -m bench: error: --tp must be >= 1, got 0"
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == want, \
        f"rc {proc.returncode}, stderr {proc.stderr!r}"


def _records(backend: str, base: float, fused: float, ref: float) -> list[dict]:
    """One synthetic case's records (fwd+bwd medians in ms) with what ``report.judge`` reads."""
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
    """The GPU speed targets are judged on GPU kernels only, against their bars; a CPU run reports no miss."""
    t = judge(_records("triton", base, fused, ref))
    got = (t["gpu_overhead"]["met"], t["gpu_speedup"]["met"])
    assert got == met, f"triton: fused/base {fused / base:.2f}, ref/fused {ref / fused:.2f}: met {got}, expected {met}"
    assert t["saved_ratio"]["judged"] and t["saved_ratio"]["met"], f"bf16 saved ratio: {t['saved_ratio']}"
    cpu = judge(_records("torch", base, fused, ref))
    assert not cpu["gpu_overhead"]["judged"] and not cpu["gpu_speedup"]["judged"], "torch backend judged for speed"
    text = format_targets(cpu)
    assert "MISSED" not in text and "What CPU times mean" in text, text


def test_csv_and_plot_written(bench_run, bench_json):
    """bench.csv has one row per record with the flattened fields, and bench.png is drawn."""
    out = bench_run["dir"]
    with (out / "bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(bench_json["results"]), f"CSV has {len(rows)} rows"
    assert {"label", "contender", "fwd_bwd_ms_median", "collectives_fwd_count"} <= set(rows[0]), sorted(rows[0])
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 1000, "bench.png missing or empty"


def test_helpers():
    """quantiles, count_collectives (wraps and restores) and model_flops give what their docstrings say."""
    assert quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p20": 1.8, "p80": 4.2}

    before = dist.all_reduce
    with count_collectives([], ["fwd"]):
        assert dist.all_reduce is not before, "all_reduce not wrapped"
    assert dist.all_reduce is before, "all_reduce not restored"
    c = Case("column", 2, False, 8, 16, 32, 4, 0.0, "fp32")
    assert model_flops(c, "base", "fwd") == 2 * 8 * 16 * 16
    assert model_flops(c, "fused", "fwd_bwd") == 4 * 8 * 16 * 16 + 6 * 8 * 4 * (16 + 16)


def test_duration_stated_alike_in_help_readme_and_notes():
    """--help, README and NOTES state the default run's duration alike."""
    phrase = f"about {DEFAULT_RUN_MINUTES} minutes"
    texts = {"--help": " ".join(build_parser().format_help().split()),
             "README.md": " ".join((ROOT / "README.md").read_text().split()),
             "bench/NOTES.md": " ".join((ROOT / "bench" / "NOTES.md").read_text().split())}
    missing = [name for name, text in texts.items() if phrase not in text]
    assert not missing, f"{missing} do not state the default run's duration as {phrase!r}"


# ---------------------------------------------------------------------------------------------
# Multi-adapter cases: mixed (one call, an AdapterMix) against sequential (one call per adapter)
# ---------------------------------------------------------------------------------------------
MULTI_CHECKS = {"y, dropout off", "dx, dropout off", "dA, dropout off", "dB, dropout off",
                "y, dropout on, vs each adapter alone on the batch"}


def test_multi_adapter_mixed_agrees_with_sequential_and_counts(bench_json):
    multis = _groups(bench_json, multi=True)
    modes = sorted((c["kind"], c["tp"], c["sp"]) for c in (g["base"]["case"] for g in multis.values()))
    want = sorted([(k, 1, False) for k in ("column", "row")] + [(k, 2, sp) for k in ("column", "row")
                                                                for sp in (False, True)])
    assert modes == want, f"multi-adapter cases run in modes {modes}, expected {want}"
    for label, g in multis.items():
        assert list(g) == ["base", "mixed", "sequential"], f"{label}: contenders {list(g)}"
        b, m, q = g["base"], g["mixed"], g["sequential"]
        case = b["case"]
        n, r, loc = case["adapters"], case["r"], Case(**case).local
        checks, bar = m["checks_vs_sequential"], m["check_bar"]
        assert set(checks) == MULTI_CHECKS and bar == 1e-5, f"{label}: checks {sorted(checks)}, bar {bar}"
        worst = max(checks, key=checks.get)
        assert checks[worst] <= bar, f"{label}: mixed vs sequential {worst}: rel err {checks[worst]:.2e} > {bar:.0e}"
        for ph in ("fwd", "fwd_bwd"):
            ratio, t_m, t_q = m[f"speedup_vs_sequential_{ph}"], m[f"{ph}_ms"]["median"], q[f"{ph}_ms"]["median"]
            assert abs(ratio - t_q / t_m) < 1e-9, f"{label} {ph}: sequential/mixed {ratio} != {t_q} / {t_m}"
        assert m["gemm_shapes"] == [f"N={loc['n']} K={loc['k']} r={n * r} T={case['tokens']}"], \
            f"{label}: mixed GEMM shapes {m['gemm_shapes']}"
        assert q["gemm_shapes"] == [f"N={loc['n']} K={loc['k']} r={r} T={case['tokens'] // n}"], \
            f"{label}: sequential GEMM shapes {q['gemm_shapes']}"
        assert m["backend"] == q["backend"] == "torch", f"{label}: backends {m['backend']}, {q['backend']}"
        # Collectives: mixed runs the base layer's, n·r columns wider wherever u rides along;
        # sequential runs them once per adapter on 1/n of the rows.
        for rec in (b, m, q):
            c = rec["collectives"]
            assert c["measured"] and c["count_check"] == "ok", f"{label} {rec['contender']}: {c}"
        for ph in ("fwd", "bwd"):
            cb, cm, cq = (rec["collectives"][ph] for rec in (b, m, q))
            assert (cm["count"], cq["count"]) == (cb["count"], n * cb["count"]), \
                f"{label} {ph}: collectives base {cb['count']}, mixed {cm['count']}, sequential {cq['count']}"
            assert cm["bytes"] - cb["bytes"] == n * (cq["bytes"] - cb["bytes"]), \
                f"{label} {ph}: bytes base {cb['bytes']}, mixed {cm['bytes']}, sequential {cq['bytes']}"
        if case["tp"] > 1:
            assert b["collectives"]["fwd"]["count"] + b["collectives"]["bwd"]["count"] > 0, f"{label}: none counted"
        # Saved: both keep all of x; mixed keeps one n·r-wide u, sequential n r-wide ones of 1/n the rows.
        x_bytes = loc["rows_in"] * loc["k"] * 4
        bound = x_bytes + case["tokens"] * n * r * 4 + 64
        assert x_bytes <= q["saved_bytes"] < m["saved_bytes"] <= bound, \
            f"{label}: saved sequential {q['saved_bytes']} B, mixed {m['saved_bytes']} B; x {x_bytes} B, " \
            f"bound {bound} B"


def test_multi_check_refuses_to_time_a_wrong_answer():
    """One adapter's B changed in the mixed call only: every check that depends on B fails, and nothing is timed."""
    case = Case("column", 1, False, 32, 16, 24, 4, 0.1, "fp32", adapters=4)
    built = build(case, group=None, device="cpu", backend="torch")
    errs = _verify(built, case, world=1)
    assert set(errs) == MULTI_CHECKS and max(errs.values()) <= 1e-5, f"unchanged factors: {errs}"
    b_all = built.params[2]
    assert b_all.shape == (24, 16), f"params[2] is not the stacked B: {tuple(b_all.shape)}"
    with torch.no_grad():
        b_all[:, 4:8] *= 1.01  # adapter 1's block
    with pytest.raises(RuntimeError, match="disagree, so nothing is timed") as exc:
        _verify(built, case, world=1)
    msg = str(exc.value)
    for name in MULTI_CHECKS - {"dB, dropout off"}:  # dB = s·dyᵀu does not read B
        assert f"{name}: rel err" in msg, f"{name!r} not reported: {msg}"
    assert "dB, dropout off: rel err" not in msg, f"dB reported though B does not enter it: {msg}"


@pytest.mark.parametrize("kind", ["column", "row"])
def test_every_rank_holds_its_piece_of_one_layer(kind):
    """The shards of TP 2 with SP, joined as the docstring's table says, are the TP 1 tensors."""
    def tensors(tp, rank):
        case = Case(kind, tp, tp > 1, 8, 16, 24, 4, 0.0, "fp32", adapters=2)
        return _tensors(case, rank, "cpu", torch.float32, seed=7)

    full, parts = tensors(1, 0), [tensors(2, rank) for rank in (0, 1)]
    # (x, W, dy, A, B): the dim each is split along over the ranks, None for replicated
    dims = {"column": (0, 0, -1, None, 0), "row": (-1, 1, 0, 1, None)}[kind]

    def pieces(s):
        return (s.x, s.w, s.dy, *[f for ab in s.factors for f in ab])

    names = ["x", "W", "dy"] + [f"{f}[{i}]" for i in range(2) for f in ("A", "B")]
    for i, name in enumerate(names):
        dim = dims[i] if i < 3 else dims[3 + (i - 3) % 2]
        got = [pieces(p)[i] for p in parts]
        joined = got[0] if dim is None else torch.cat(got, dim=dim)
        if dim is None:
            assert torch.equal(got[0], got[1]), f"{kind}: replicated {name} differs between ranks"
        assert torch.equal(joined, pieces(full)[i]), f"{kind}: {name} joined along {dim} is not the TP 1 tensor"


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="cublas and interpret run on CPU under Triton's "
                    "interpreter (tests/conftest.py sets it without CUDA)")
@pytest.mark.parametrize("backend", ["cublas", "interpret", "torch"])
def test_an_explicit_backend_is_the_one_that_runs(backend, monkeypatch):
    """``--backend NAME`` reaches the fused call as given (its forward GEMM op is seen to run), and the
    record names it."""
    case = Case("row", 1, False, 16, 16, 16, 4, 0.1, "fp32")
    want = build(case, group=None, device="cpu", backend="torch").contenders["fused"]().detach()
    cls, calls = type(get_backend("cpu", backend)), []
    real = cls.linear_fwd

    def seen(self, *args, **kwargs):
        calls.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "linear_fwd", seen)
    built = build(case, group=None, device="cpu", backend=backend)
    got = built.contenders["fused"]().detach()
    assert calls == [backend], f"--backend {backend}: the fused forward ran linear_fwd of {calls}"
    ran = _backends_ran(built, backend, torch.device("cpu"), None)
    assert ran == {"fused": backend}, f"--backend {backend}: recorded {ran}"
    err = rel_err(got, want)
    assert err <= 1e-5, f"--backend {backend} vs torch: rel err {err:.2e} > 1e-05"


def test_backends_and_gemm_decisions_are_reported():
    """The backends that ran and ops.select's choices are reported per case and shape."""
    recs = [{"label": "column tp=1 sp=off p=0.1", "contender": "fused", "backend": "cublas"},
            {"label": "column tp=1 sp=off p=0.1", "contender": "base", "backend": "cublas"},
            {"label": "row tp=1 sp=off p=0.1", "contender": "fused", "backend": "triton"}]
    key = "cuda:0 torch.bfloat16 lora=torch.bfloat16 N=4096 K=4096 r=16 T<=8192"
    meta = {"device": "cuda", "gemm_decisions": {"world=1": {key: {"choice": "cublas",
                                                                  "seconds": {"triton": 1.2e-3, "cublas": 1.1e-3}}}}}
    text = format_backends(meta, recs)
    for line in ("column tp=1 sp=off p=0.1: cublas", "row tp=1 sp=off p=0.1: triton",
                 f"world=1 {key}: cublas (triton 1.200 ms, cublas 1.100 ms)"):
        assert line in text, f"backends report lacks {line!r}:\n{text}"
    text = format_backends({"device": "cuda", "gemm_decisions": {}}, recs)
    assert "no ops.select decision" in text, f"an empty decision list is not said:\n{text}"


@pytest.mark.parametrize("name", ["bench.cases", "bench.runner", "bench.report", "bench.peft_dora"])
def test_docstring_examples_run(name):
    """Every docstring example of the bench's modules runs and shows what it prints."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted and not result.failed, f"{name}: {result.failed} of {result.attempted} examples failed"


# ---------------------------------------------------------------------------------------------
# DoRA cases: the fused DoRA call against the fused LoRA call and PEFT's DoRA structure per rank
# ---------------------------------------------------------------------------------------------
DORA_CHECKS = {f"dora vs peft_dora {n}, p={p}" for n in ("y", "dx", "dA", "dB", "dm") for p in ("0", "0.1")} | {
    "lora vs reference y, p=0.1"}
# (kind, sp) -> collectives PEFT's DoRA structure adds over the fused LoRA call at p > 0, (forward, backward):
# column: the dropped x's input mapping (backward all-reduce; under SP a forward all-gather and backward
# reduce-scatter) beside LoRA's own; row: LoRA's reduction of u, the norm's all-reduce and the dropped
# product's reduction (under SP, backward all-gathers for u and the dropped product).
PEFT_DORA_ADDS = {("column", False): (0, 2), ("column", True): (2, 2), ("row", False): (3, 0), ("row", True): (3, 2)}


def test_dora_cases_agree_count_and_save(bench_json):
    """Every DoRA case was checked before timing (dora vs peft_dora on one mask: output and gradients; lora vs
    the reference), DoRA runs LoRA's collectives (wider only where the row norm rides), PEFT's structure adds
    its own, DoRA saves one output-sized tensor (and two [n] vectors) beyond LoRA, and the ratios are the
    medians'."""
    doras = _groups(bench_json, dora=True)
    modes = sorted((c["kind"], c["tp"], c["sp"]) for c in (g["base"]["case"] for g in doras.values()))
    want = sorted([(k, 1, False) for k in ("column", "row")] + [(k, 2, sp) for k in ("column", "row")
                                                                for sp in (False, True)])
    assert modes == want, f"DoRA cases run in modes {modes}, expected {want}"
    for label, g in doras.items():
        assert list(g) == ["base", "lora", "dora", "peft_dora"], f"{label}: contenders {list(g)}"
        b, lo, d, pd = (g[n] for n in ("base", "lora", "dora", "peft_dora"))
        case = b["case"]
        loc, e = Case(**case).local, 4
        checks, bar = d["checks_vs_peft_dora"], d["check_bar"]
        assert set(checks) == DORA_CHECKS and bar == 1e-5, f"{label}: checks {sorted(checks)}, bar {bar}"
        worst = max(checks, key=checks.get)
        assert checks[worst] <= bar, f"{label}: {worst}: rel err {checks[worst]:.2e} > {bar:.0e}"
        for other in ("lora", "peft_dora"):
            ratio, t_d, t_o = d[f"dora_over_{other}_fwd_bwd"], _median_ms(d), _median_ms(g[other])
            assert abs(ratio - t_d / t_o) < 1e-9, f"{label}: dora/{other} {ratio} != {t_d} / {t_o}"
        assert d["backend"] == lo["backend"] == "torch", f"{label}: backends {d['backend']}, {lo['backend']}"
        for rec in (b, lo, d, pd):
            c = rec["collectives"]
            assert c["measured"] and c["count_check"] == "ok", f"{label} {rec['contender']}: {c}"
        counts = {n: tuple(g[n]["collectives"][ph]["count"] for ph in ("fwd", "bwd")) for n in g}
        assert counts["dora"] == counts["lora"] == counts["base"], f"{label}: collectives (fwd, bwd) {counts}"
        rows_block = case["tp"] if case["sp"] else 1
        want_wider = (rows_block * loc["n"] + case["tokens"] * loc["n"]) * e if case["kind"] == "row" and \
            case["tp"] > 1 else 0
        wider = tuple(d["collectives"][ph]["bytes"] - lo["collectives"][ph]["bytes"] for ph in ("fwd", "bwd"))
        assert wider == (want_wider, 0), (f"{label}: DoRA's collectives carry (fwd, bwd) {wider} bytes more than "
                                          f"LoRA's, expected ({want_wider}, 0): the norm's n values per block and "
                                          f"the dropped [T, n] product")
        adds = tuple(p - q for p, q in zip(counts["peft_dora"], counts["lora"]))
        want_adds = PEFT_DORA_ADDS[(case["kind"], case["sp"])] if case["tp"] > 1 else (0, 0)
        assert adds == want_adds, f"{label}: peft_dora adds {adds} collectives over lora, expected {want_adds}"
        out_bytes = loc["rows_out"] * loc["n"] * e
        extra = d["saved_bytes"] - lo["saved_bytes"]
        assert out_bytes <= extra <= out_bytes + 2 * loc["n"] * 4, (
            f"{label}: DoRA saves {extra} B beyond LoRA ({d['saved_tensors']} vs {lo['saved_tensors']}); one output "
            f"is {out_bytes} B, the two [n] fp32 row vectors {2 * loc['n'] * 4} B")
        assert pd["saved_bytes"] > d["saved_bytes"], f"{label}: peft_dora saves {pd['saved_bytes']} B <= DoRA's"
    t = bench_json["targets"]
    for name in ("dora_collectives", "dora_saved"):
        assert t[name]["judged"] and t[name]["met"], f"verdict {name}: {t[name]}"


def _median_ms(rec: dict) -> float:
    return rec["fwd_bwd_ms"]["median"]


SAVED_CASES = [("column", 0.0), ("column", 0.1), ("row", 0.0), ("row", 0.1)]


@pytest.mark.parametrize(("kind", "p"), SAVED_CASES, ids=[f"{k}-p{p:g}" for k, p in SAVED_CASES])
def test_dora_saves_at_most_one_output_more_than_lora(kind, p):
    """In one process (TP 1): the fused DoRA call saves at most LoRA's bytes plus one output-sized tensor (the
    pre-scale y0 that dm needs) and two fp32 [n] row vectors (1/norm, and at row-parallel without dropout the
    norm's values that ride the collective buffer y0 is a view of), with dropout off and on."""
    case = Case(kind, 1, False, 48, 32, 40, 4, p, "fp32", dora=True)
    built = build(case, group=None, device="cpu", backend="torch")
    cpu = torch.device("cpu")
    saved = {n: _measure_pass(built, n, cpu, measure_collectives=False) for n in ("lora", "dora")}
    extra = saved["dora"]["saved_bytes"] - saved["lora"]["saved_bytes"]
    out_bytes, vectors = 48 * 40 * 4, 2 * 40 * 4
    assert out_bytes <= extra <= out_bytes + vectors, (
        f"{kind} p={p}: DoRA saves {extra} B beyond LoRA, allowed {out_bytes} B (one output) + {vectors} B "
        f"(1/norm, the buffer's norm part): DoRA {saved['dora']['saved_tensors']}, "
        f"LoRA {saved['lora']['saved_tensors']}")
