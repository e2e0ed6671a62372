"""The kernels compile for Hopper (sm_90a) with triton's real compiler, here on a CPU machine.

CI has no GPU, so the interpreter checks what the kernels compute, and this checks how they
compile: every variant down to cubin; the two GEMMs (linear_fwd, linear_dx) in every autotune
config, bf16 and fp16 (dx also with dropout, and with per-row dropout thresholds), within the
register file (ptxas reports no spill stores or loads) and with an unserialised wgmma pipeline
(no ptxas note C7510..C7519); main loops software-pipelined (cp.async or TMA); wgmma in the
16-bit GEMMs. The pinned (first) config of every kernel must compile in bf16, fp16 and fp32,
with each compile-time flag (COPY_X, CHUNKED, ROW_THR) both ways, and in 16 bits without a spill,
also at Σr = 64 (four r = 16 adapters in one batch) and within one SM's shared memory; fp32 GEMM
spills (IEEE dots run as an FMA loop, not on tensor cores) are reported by aot_compile.py, not
asserted. DoRA's variants (``aot_compile.py --dora``: the forward with col_scale, out0 and
dropout, the dy pass with col_scale and dm, dx with col_scale and mask_all) are held to the same
rules: pinned configs in every dtype and at r = 64 and 128, and every GEMM config they launch
(``ops.configs.fits``) in bf16 (fp16 compiles to the same register counts).

It runs tools/aot_compile.py in a child process (the session has TRITON_INTERPRET=1 set, and
``@triton.jit`` reads it at import). Environment:

* ``TPLORA_AOT_PYTHON``: more interpreters to run the same checks under, ``os.pathsep``-separated
  (e.g. one with triton 3.6, the oldest triton the kernels support, so both compilers are gated).
* ``TPLORA_AOT_SOURCE``: a module whose kernels / config tables replace the package's
  (``aot_compile.py --source``), to gate prototypes with the same checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tplora_kernels.ops import configs as C

ROOT = Path(__file__).resolve().parents[2]
GEMMS = ("linear_fwd", "linear_dx")
KERNELS = {"shrink_fwd", "linear_fwd", "dy_bwd", "linear_dx", "shrink_bwd"}
# CI's share (budget: 4 minutes on 2 cores): every GEMM config in the dtypes and dropout settings
# a Hopper run uses, plus the pinned (first) config of every kernel in every dtype. All configs
# of the non-GEMM kernels and fp32 GEMMs (aot_compile.py --all-configs) would triple it.
RUNS = {
    "gemm_all_configs": ["--all-configs", "--kernels", ",".join(GEMMS), "--dtypes", "bf16,fp16",
                         "--dropout", "0,0.1"],
    "pinned_all_kernels": ["--dtypes", "bf16,fp16,fp32", "--dropout", "0,0.1"],
    # Several adapters in one batch stack their factors to rank Σr: four adapters of r = 16.
    "pinned_rank64": ["--dtypes", "bf16", "--dropout", "0.1", "--no-flag-sweep", "--rank", "64"],
    # r = 128, the largest the README guarantees (or eight r = 16 adapters): the pinned forward
    # config is 128x128 there, and the dy pass reduces dB over 128-row blocks.
    "pinned_rank128": ["--dtypes", "bf16", "--dropout", "0.1", "--no-flag-sweep", "--rank", "128"],
    # DoRA (issue 18): the same checks with each kernel's DoRA flags on.
    "dora_gemm_all_configs": ["--dora", "--all-configs", "--kernels", ",".join(GEMMS), "--dtypes", "bf16",
                              "--dropout", "0,0.1", "--no-flag-sweep"],
    "dora_pinned": ["--dora", "--dtypes", "bf16,fp16,fp32", "--dropout", "0,0.1"],
    "dora_pinned_rank64": ["--dora", "--dtypes", "bf16", "--dropout", "0.1", "--no-flag-sweep", "--rank", "64"],
    "dora_pinned_rank128": ["--dora", "--dtypes", "bf16", "--dropout", "0.1", "--no-flag-sweep", "--rank", "128"],
}


def _pythons() -> list[str]:
    extra = [p for p in os.environ.get("TPLORA_AOT_PYTHON", "").split(os.pathsep) if p]
    return [sys.executable, *extra]


def _run(python: str, args: list[str], timeout: float) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    source = os.environ.get("TPLORA_AOT_SOURCE")
    cmd = [python, str(ROOT / "tools" / "aot_compile.py"), "--jobs", "2", *args, *(["--source", source] if source
                                                                                   else [])]
    # Its own session, so the compile workers it spawns go with it if it has to be killed.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, rows, err


@pytest.fixture(scope="module", params=_pythons(), ids=lambda p: "this-python" if p == sys.executable else p)
def compiled(request) -> dict:
    """{"rows": every variant's row, "runs": {run: (exit code, its rows, stderr)}} under one interpreter."""
    rows, runs = [], {}
    for name, args in RUNS.items():
        rc, got, err = _run(request.param, args, timeout=600)
        assert got, f"aot_compile.py {name} under {request.param} printed no rows (rc={rc}):\n{err[-3000:]}"
        rows += got
        runs[name] = (rc, got, err)
    return {"rows": rows, "runs": runs, "python": request.param}


def _gemm_16bit(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["ok"] and r["kernel"] in GEMMS and r["dtype"] in ("bf16", "fp16")]


def test_every_variant_compiles_to_cubin(compiled):
    rows = compiled["rows"]
    failed = [f"{r['name']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(rows)} variants do not compile for sm_90a:\n" + "\n".join(failed)
    assert {r["kernel"] for r in rows} == KERNELS, f"kernels compiled: {sorted({r['kernel'] for r in rows})}"
    assert {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}, f"dtypes: {sorted({r['dtype'] for r in rows})}"
    assert {"p0", "p0.1"} <= {r["variant"] for r in rows}, f"variants: {sorted({r['variant'] for r in rows})}"
    targets = {r["ptx_target"] for r in rows}
    assert targets == {"sm_90a"}, f"PTX targets {targets}, expected sm_90a (wgmma needs the 'a' features)"


def test_gemm_configs_all_compiled(compiled):
    # Every config of the GEMM autotune tables that a launch may use (ops.configs.fits: the
    # forward with dropout or DoRA's flags keeps a part), in both 16-bit dtypes; dx without
    # dropout, with it, and with per-row thresholds (several adapters in one batch); DoRA's in bf16.
    plain = (("linear_fwd", {"p0", "p0.1"}), ("linear_dx", {"p0", "p0.1", "p0.1_row_thr"}))
    dora = (("linear_fwd", {"p0_col_scale_out0", "p0.1_col_scale_out0"}),
            ("linear_dx", {"p0_col_scale", "p0.1_col_scale_mask_all"}))
    for run, dtypes, kernels in (("gemm_all_configs", ("bf16", "fp16"), plain),
                                 ("dora_gemm_all_configs", ("bf16",), dora)):
        rows = _gemm_16bit(compiled["runs"][run][1])
        for kernel, base in kernels:
            variants = base | {f"{v}_w16" for v in base}  # fp32 LoRA weights, and 16-bit ones
            got = {(r["dtype"], r["variant"], r["config"]) for r in rows if r["kernel"] == kernel}
            table = C.CONFIGS[kernel]
            want = {(d, v, i) for d in dtypes for v in variants for i, c in enumerate(table)
                    if C.fits(kernel, c, dora="col_scale" in v, dropout=v.startswith("p0.1"))}
            assert got == want, (f"{run} {kernel}: missing (dtype, variant, config) {sorted(want - got)}, "
                                 f"unexpected {sorted(got - want)}")


def _spills(r: dict) -> bool:
    return bool(r["spill_stores"] or r["spill_loads"])


def test_no_gemm_variant_spills(compiled):
    # fp32 GEMMs (IEEE dots: an FMA loop, not tensor cores) are reported by aot_compile.py, not gated.
    spills = [f"{r['name']}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads, "
              f"{r['regs']} registers (ptxas {r['ptxas_version']})"
              for r in _gemm_16bit(compiled["rows"]) if _spills(r)]
    assert not spills, f"{len(spills)} 16-bit GEMM variants spill registers to local memory:\n" + "\n".join(spills)


def _pinned_16bit(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["ok"] and r["pinned"] and r["dtype"] in ("bf16", "fp16")]


def test_no_pinned_variant_spills(compiled):
    # What TPLORA_AUTOTUNE=0 launches, every kernel, at r = 16, 64 and 128.
    spills = [f"{r['name']} r={r['rank']}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads, "
              f"{r['regs']} registers" for r in _pinned_16bit(compiled["rows"]) if _spills(r)]
    assert not spills, f"{len(spills)} pinned 16-bit variants spill registers:\n" + "\n".join(spills)


def test_no_gemm_variant_serialises_wgmma(compiled):
    notes = [f"{r['name']}: ptxas {', '.join(r['c751x'])} (wgmma serialised), {r['regs']} registers"
             for r in compiled["rows"] if r["ok"] and r["kernel"] in GEMMS and r["c751x"]]
    assert not notes, f"{len(notes)} GEMM variants have their wgmma pipeline serialised:\n" + "\n".join(notes)


def test_main_loops_are_pipelined(compiled):
    # num_stages > 1 makes triton stream the loop's operands through shared memory with cp.async
    # (or TMA); without it every K step would wait on global memory.
    flat = [f"{r['name']}: {r['cp_async']} cp.async, {r['tma']} TMA copies in the PTX"
            for r in compiled["rows"] if r["ok"] and r["cp_async"] + r["tma"] == 0]
    assert not flat, f"{len(flat)} variants with no pipelined main loop:\n" + "\n".join(flat)


def test_16bit_gemms_use_wgmma(compiled):
    rows = _gemm_16bit(compiled["rows"])
    assert rows, "no 16-bit GEMM variant compiled"
    missing = [f"{r['name']}: 0 wgmma.mma_async ({r['mma_sync']} mma.sync)" for r in rows if r["wgmma"] == 0]
    assert not missing, f"{len(missing)} 16-bit GEMM variants without Hopper's wgmma:\n" + "\n".join(missing)


def test_pinned_configs_fit_on_an_sm(compiled):
    # TPLORA_AUTOTUNE=0 launches config 0 without the autotuner, which would skip a config that
    # does not fit: it must fit in an SM's registers and shared memory (227 KiB per CTA on sm_90).
    big = [f"{r['name']}: {r['shared']} B shared memory, {r['regs']} registers x {r['num_warps']} warps"
           for r in compiled["rows"] if r["ok"] and r["pinned"] and r["ctas_per_sm"] < 1]
    assert not big, f"{len(big)} pinned variants do not fit on an sm_90 SM:\n" + "\n".join(big)


def test_exit_status_matches_the_rows(compiled):
    # The script is also the command-line gate: non-zero exactly when one of its rows fails the gate.
    for name, (rc, rows, err) in compiled["runs"].items():
        bad = [r["name"] for r in rows if not r["ok"]]
        bad += [r["name"] for r in _gemm_16bit(rows) if _spills(r) or r["c751x"]]
        bad += [r["name"] for r in _pinned_16bit(rows) if r["kernel"] not in GEMMS and _spills(r)]
        assert (rc != 0) == bool(bad), (f"aot_compile.py {name}: exit code {rc} with {len(bad)} failing rows "
                                        f"{bad[:5]}; stderr:\n{err[-2000:]}")
