"""The kernels compile for Hopper (sm_90) with triton's real compiler, here on a CPU machine.

CI has no GPU, so the interpreter checks what the kernels compute, and this checks that they
compile the way a GPU launch would: pipelined (cp.async + wgmma), within the register file and
without spilling, for every dtype with and without dropout. It runs tests/aot_compile.py in a
child process because the session has TRITON_INTERPRET=1 set (and ``@triton.jit`` reads it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "aot_compile.py"), "--arch", "90"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"aot_compile.py printed nothing (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    return rows


def test_every_variant_compiles_to_cubin(compiled):
    failed = [f"{r['kernel']} {r['variant']}: {r['error']}" for r in compiled if not r["ok"]]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n".join(failed)
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"shrink_fwd", "linear_fwd", "dy_bwd", "linear_dx", "shrink_bwd"}, f"missing: {kernels}"
    assert {r["variant"].split()[0] for r in compiled} == {"bf16", "fp16", "fp32"}


def test_no_register_spills(compiled):
    spills = [f"{r['kernel']} {r['variant']}: {r['spill_bytes']} B local memory, {r['regs']} regs"
              for r in compiled if r["ok"] and r.get("spill_bytes", 0) > 0]
    assert not spills, "variants that spill registers to local memory:\n" + "\n".join(spills)
    assert all("regs" in r for r in compiled if r["ok"]), "cuobjdump gave no resource usage"


def test_main_loops_are_pipelined(compiled):
    # Every kernel streams its big operand through shared memory with cp.async (num_stages > 1);
    # the two GEMMs use Hopper's wgmma for 16-bit inputs.
    for r in compiled:
        what = f"{r['kernel']} {r['variant']}"
        assert r["async_copies"] > 0, f"{what}: main loop not software-pipelined (no cp.async)"
        if r["kernel"] in ("linear_fwd", "linear_dx") and not r["variant"].startswith("fp32"):
            assert r["wgmma"] > 0, f"{what}: no wgmma on sm_90"
