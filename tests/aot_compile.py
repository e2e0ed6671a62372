"""Compile the Triton kernels for a Hopper GPU without one: triton's real compiler down to cubin.

Run as a script in a process where TRITON_INTERPRET is unset (``@triton.jit`` must produce
JITFunctions). Prints one JSON line per compiled variant: kernel, variant, registers, spills,
shared memory. Exits non-zero if any variant fails to compile. tests/test_compile_sm90.py runs it.

Usage: python tests/aot_compile.py [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tplora_kernels.ops import kernels as K
from tplora_kernels.ops import launch as L

_SCALARS_F32 = ("scale", "inv_keep")
# What the JIT's specialisation would see at a real launch on contiguous tensors with model dims
# that are multiples of 16: unit innermost strides become constexpr 1, pointers and the other
# ints (not marked do_not_specialize) carry tt.divisibility=16.
_UNIT_STRIDES = {"s_bias", "s_xok", "s_xk", "s_wk", "s_ak", "s_ur", "s_br", "s_on", "s_dyn", "s_dur", "s_dxk",
                 "s_pr", "s_pk"}


def _attrs(fn, consts: dict) -> dict:
    dns = set(fn.do_not_specialize) | {fn.arg_names[i] for i in fn.do_not_specialize if isinstance(i, int)}
    out = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts or name in _SCALARS_F32 or name in dns or name == "p_seed":
            continue
        out[(i,)] = [["tt.divisibility", 16]]
    return out


def _signature(fn, ptrs: dict[str, str], consts: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.startswith("p_"):
            sig[name] = "*" + ptrs[name]
        elif name in _SCALARS_F32:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes) -> dict:
    """Registers and local-memory (spill) bytes from cuobjdump, which ships with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return {"regs": int(m.group(1)), "spill_bytes": int(m.group(2))} if m else {"resource_usage": out[-300:]}


def variants(quick: bool):
    """(kernel name, fn, pointer dtypes, constexprs, num_warps, num_stages) to compile."""
    dtypes = ("bf16",) if quick else ("bf16", "fp16", "fp32")
    for dt in dtypes:
        red = {"fp32": 32, "fp16": 64, "bf16": 64}[dt]
        prec = "ieee" if dt == "fp32" else "tf32"
        common = {"INTERP_BF16": False, "PRECISION": prec, "BLOCK_R": 16}
        w = "fp32"  # LoRA weights in fp32 with 16-bit activations: the mixed case
        for thr in ((6554,) if quick else (0, 6554)):
            drop = {"THR": thr, "HAS_DROPOUT": thr > 0, "PACKED": True}
            tiles = L._SHRINK_CONFIGS[0]
            # COPY_X is the column-SP variant (it packs [x_i | u_i] for the all-gather).
            yield ("shrink_fwd", K._lora_shrink_fwd_kernel,
                   {"p_x": dt, "p_a": w, "p_u": dt, "p_seed": "i64", "p_xo": dt},
                   {**drop, **common, **tiles.kwargs, "BLOCK_K": red, "COPY_X": thr > 0}, tiles.num_warps,
                   tiles.num_stages)
            tiles = L._DX_CONFIGS[0]
            yield ("linear_dx", K._lora_linear_dx_kernel,
                   {"p_dy": dt, "p_w": dt, "p_du": dt, "p_a": w, "p_dx": dt, "p_seed": "i64"},
                   {**drop, **common, **tiles.kwargs, "BLOCK_N": red, "GROUP_M": 8}, tiles.num_warps,
                   tiles.num_stages)
            tiles = L._SHRINK_BWD_CONFIGS[0]
            yield ("shrink_bwd", K._lora_shrink_bwd_kernel, {"p_du": dt, "p_x": dt, "p_dap": "fp32", "p_seed": "i64"},
                   {**drop, **common, **tiles.kwargs, "BLOCK_M": L._ROW_RED}, tiles.num_warps, tiles.num_stages)
        tiles = L._LINEAR_CONFIGS[0]
        yield ("linear_fwd", K._lora_linear_fwd_kernel,
               {"p_x": dt, "p_w": dt, "p_u": dt, "p_b": w, "p_bias": dt, "p_out": dt},
               {**common, **tiles.kwargs, "HAS_BIAS": True, "BLOCK_K": red, "GROUP_M": 8}, tiles.num_warps,
               tiles.num_stages)
        tiles = L._DY_CONFIGS[0]
        yield ("dy_bwd", K._lora_dy_bwd_kernel, {"p_dy": dt, "p_b": w, "p_u": dt, "p_du": dt, "p_dbp": "fp32"},
               {**common, "COMPUTE_DU": True, "COMPUTE_DB": True, "BLOCK_M": L._ROW_RED, "BLOCK_N": red},
               tiles.num_warps, tiles.num_stages)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--quick", action="store_true", help="bf16 with dropout only")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, ptrs, consts, nw, ns in variants(args.quick):
        label = f"{ptrs[next(iter(ptrs))]} thr={consts.get('THR', '-')}"
        t0 = time.time()
        try:
            consts = {**consts, **{n: 1 for n in fn.arg_names if n in _UNIT_STRIDES}}
            src = ASTSource(fn=fn, signature=_signature(fn, ptrs, consts), constexprs=consts, attrs=_attrs(fn, consts))
            k = triton.compile(src, target=target, options={"num_warps": nw, "num_stages": ns})
            ttgir = k.asm["ttgir"]
            row = {"kernel": name, "variant": label, "ok": True, **_resources(k.asm["cubin"]),
                   "async_copies": ttgir.count("async_copy_global_to_local"), "wgmma": ttgir.count("warp_group_dot"),
                   "shared": k.metadata.shared, "seconds": round(time.time() - t0, 1)}
        except Exception as e:
            failed += 1
            row = {"kernel": name, "variant": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
