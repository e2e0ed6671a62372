"""Compile the Triton kernels for Hopper without a GPU, and gate the GEMMs on what ptxas reports.

Triton's real compiler runs down to cubin for sm_90a, with each kernel's launch-time
specialisation (see ``_signature``), with fp32 LoRA weights and with weights in the
activations' 16-bit dtype (variant suffix ``_w16``, ``apply_lora``'s default). For every
variant it reads, from the ``ptxas -v`` log of the very ptxas call triton makes (same binary,
same options): registers, spill stores/loads, stack frame and the wgmma-serialisation notes
C7510..C7519; from the PTX: wgmma, cp.async and TMA instructions; from triton: shared memory.
CTAs per SM follow from registers, shared memory and warps on sm_90 (64K registers, 228 KiB
shared memory, 64 warps per SM).

Prints one JSON line per variant. Exits non-zero, with a summary on stderr, if a variant does
not compile, or if, on tensor cores (bf16, fp16, tf32), a GEMM kernel (linear_fwd, linear_dx) in
any config spills or has a C751x note, or another kernel in its pinned config spills; the other
configs' and fp32's spills are reported on stderr only.
Configs come from the triton backend's autotune tables (the one ``TPLORA_AUTOTUNE=0`` pins at
``--rank``, unless ``--all-configs`` or ``--configs``); ``--source FILE`` swaps in a module's kernels and tables of
the same names, to gate prototypes.

Run it where TRITON_INTERPRET is unset (tests/ops/test_compile_sm90.py runs it in a child process),
e.g. ``python tools/aot_compile.py --all-configs --kernels linear_fwd,linear_dx --jobs 2``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
import triton.backends.nvidia.compiler as _nvcc
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tplora_kernels.mask import dropout_threshold
from tplora_kernels.ops import configs as C  # the launch tables the triton backend uses
from tplora_kernels.ops import kernels as K

# Per kernel: its function in ops.kernels, its autotune table, every pointer's dtype by role, and
# the compile-time flags whose both settings are real launches (swept; the rest are fixed below).
# Roles: "x" the activation dtype, "w" the LoRA weights (fp32: the mixed case), "f" fp32 partial
# sums, "i" the int64 seed, "t" the per-row thresholds (int32; the seed stands in when ROW_THR is off).
KERNELS = {
    "shrink_fwd": ("_lora_shrink_fwd_kernel", "SHRINK_CONFIGS",
                   {"p_x": "x", "p_a": "w", "p_u": "x", "p_seed": "i", "p_xo": "x", "p_rthr": "t"},
                   ("COPY_X", "ROW_THR")),
    "linear_fwd": ("_lora_linear_fwd_kernel", "LINEAR_CONFIGS",
                   {"p_x": "x", "p_w": "x", "p_u": "x", "p_b": "w", "p_bias": "x", "p_out": "x", "p_g": "f",
                    "p_out0": "x", "p_seed": "i", "p_rthr": "t"}, ()),
    "dy_bwd": ("_lora_dy_bwd_kernel", "DY_CONFIGS", {"p_dy": "x", "p_b": "w", "p_u": "x", "p_dup": "f",
                                                      "p_dbp": "f", "p_g": "f", "p_y0": "x", "p_dmp": "f"}, ()),
    "linear_dx": ("_lora_linear_dx_kernel", "DX_CONFIGS",
                  {"p_dy": "x", "p_w": "x", "p_du": "x", "p_a": "w", "p_dx": "x", "p_seed": "i", "p_rthr": "t",
                   "p_g": "f"}, ("ROW_THR",)),
    "shrink_bwd": ("_lora_shrink_bwd_kernel", "SHRINK_BWD_CONFIGS",
                   {"p_du": "x", "p_x": "x", "p_dap": "f", "p_seed": "i", "p_rthr": "t"}, ("CHUNKED", "ROW_THR")),
}
GEMMS = ("linear_fwd", "linear_dx")
# DoRA's flags (issue 18), all on with --dora: each kernel's heaviest DoRA launch. In the forward,
# dropout (p > 0) is DoRA's too; MASK_ALL only exists with dropout.
DORA = {"linear_fwd": ("COL_SCALE", "OUT0"), "dy_bwd": ("COL_SCALE", "COMPUTE_DM"),
        "linear_dx": ("COL_SCALE", "MASK_ALL")}
# The gate covers, on tensor cores, every GEMM config and the pinned config of the other kernels
# (what TPLORA_AUTOTUNE=0 launches, with no autotuner to skip a bad one). fp32 under torch's
# default precision runs IEEE dots, an FMA loop with no wgmma pipeline; its spills are reported.
GATED_DTYPES = ("bf16", "fp16", "tf32")
# "tf32" is fp32 data with torch.set_float32_matmul_precision("high"); "fp32" is torch's default.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
_SCALARS_F32 = ("scale", "inv_keep")
# What the JIT's specialisation sees at a real launch on contiguous tensors with model dims that
# are multiples of 16: unit innermost strides become constexpr 1; pointers and the other ints
# (not do_not_specialize) carry tt.divisibility=16.
_UNIT_STRIDES = {"s_bias", "s_xok", "s_xk", "s_wk", "s_ak", "s_ur", "s_br", "s_on", "s_dyn", "s_dur", "s_dxk",
                 "s_pr", "s_pk", "s_g", "s_o0n", "s_y0n", "s_qn"}
# sm_90 per-SM limits (CUDA occupancy calculator): registers are allocated per warp in units of
# 256 from four 16K sub-partition files; shared memory in 128 B units plus 1 KiB per CTA.
_SM90 = {"regs": 65536, "smem": 233472, "smem_per_cta": 232448, "warps": 64, "ctas": 32}


def _load_source(path: str | None):
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_aot_source", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pick(src, module, name: str):
    return getattr(src, name) if src is not None and hasattr(src, name) else getattr(module, name)


def _configs(kernel: str, src) -> list[triton.Config]:
    return _pick(src, C, KERNELS[kernel][1])


def _launch_consts(kernel: str, dtype: str, p: float, flags: dict, block_r: int) -> dict:
    """The constexprs the launch passes this kernel, but the autotuned tiles."""
    td = DTYPES[dtype]
    thr = dropout_threshold(p)
    # On a GPU: no interpreter fix-ups; fp32 dots are IEEE under torch's default matmul precision
    # ("highest"), TF32 when the user allows it; r is padded to a power of two >= 16.
    common = {"INTERP_BF16": False, "BLOCK_R": C.block_r(block_r),
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    drop = {"THR": thr, "HAS_DROPOUT": thr > 0, "PACKED": True, "ROW_THR": False}
    return {
        "shrink_fwd": {**drop, "COPY_X": False, "BLOCK_K": C.RED[td]},
        "linear_fwd": {**drop, "HAS_BIAS": True, "COL_SCALE": False, "OUT0": False, "BLOCK_K": C.RED[td],
                       "GROUP_M": C.GROUP_M},
        "dy_bwd": {"COMPUTE_DU": True, "COMPUTE_DB": True, "COL_SCALE": False, "COMPUTE_DM": False,
                   "BLOCK_M": C.dy_rows(C.block_r(block_r)), "BLOCK_N": C.RED[td]},
        "linear_dx": {**drop, "COL_SCALE": False, "MASK_ALL": False, "BLOCK_N": C.RED[td], "GROUP_M": C.GROUP_M},
        "shrink_bwd": {**drop, "CHUNKED": False, "BLOCK_M": C.ROW_RED},
    }[kernel] | common | flags


def _flag_sets(kernel: str, p: float, sweep: bool, dora: bool = False) -> list[dict]:
    """Every combination of the kernel's swept flags (ROW_THR only where dropout is on); with
    ``dora``, each with the kernel's DoRA flags on (MASK_ALL only with dropout)."""
    names = [f for f in KERNELS[kernel][3] if sweep and (f != "ROW_THR" or p > 0)]
    on = {f: True for f in DORA.get(kernel, ()) if dora and (f != "MASK_ALL" or p > 0)}
    return [dict(zip(names, bits)) | on for bits in itertools.product((False, True), repeat=len(names))]


def _variant(p: float, flags: dict) -> dict:
    """What ``configs.fits`` and ``configs.pinned`` need to know of a launch: DoRA's flags, dropout."""
    return {"dora": bool(flags.get("COL_SCALE") or flags.get("OUT0")), "dropout": p > 0}


def _check_consts(fn, consts: dict) -> None:
    want = {q.name for q in fn.params if q.is_constexpr}
    if want != set(consts):
        raise TypeError(f"{fn.__name__}'s constexprs changed: aot_compile.py does not set {sorted(want - set(consts))} "
                        f"and sets unknown {sorted(set(consts) - want)}; update _launch_consts to match the launch")


def _signature(fn, roles: dict[str, str], dtype: str, consts: dict, w16: bool) -> tuple[dict, dict]:
    """(signature, attrs) for ASTSource, as the JIT would specialise a launch (``w16``: LoRA weights
    in the activations' 16-bit dtype, as ``apply_lora`` makes them by default, else fp32)."""
    act = {"bf16": "bf16", "fp16": "fp16"}.get(dtype, "fp32")
    by_role = {"x": act, "w": act if w16 else "fp32", "f": "fp32", "i": "i64",
               "t": "i32" if consts.get("ROW_THR") else "i64"}
    dns = set(fn.do_not_specialize) | {fn.arg_names[i] for i in fn.do_not_specialize if isinstance(i, int)}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name.startswith("p_"):
            if name not in roles:
                raise TypeError(f"{fn.__name__} has a new pointer {name}: give it a dtype role in KERNELS")
            sig[name] = "*" + by_role[roles[name]]
        else:
            sig[name] = "fp32" if name in _SCALARS_F32 else "i32"
        if name not in _SCALARS_F32 and name not in dns:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ctas_per_sm(regs: int, shared: int, warps: int) -> tuple[int, str]:
    """(CTAs per SM on sm_90, the limiting resource)."""
    if shared > _SM90["smem_per_cta"]:
        return 0, "smem"
    regs_per_warp = -(-regs * 32 // 256) * 256
    by = {"regs": (_SM90["regs"] // 4 // regs_per_warp) * 4 // warps,
          "smem": _SM90["smem"] // (-(-(shared + 1024) // 128) * 128),
          "warps": _SM90["warps"] // warps, "ctas": _SM90["ctas"]}
    limit = min(by, key=by.get)
    return by[limit], limit


class _PtxasRecorder:
    """Stands in for ``subprocess`` inside triton's NVIDIA backend: runs triton's ptxas call
    unchanged and keeps its argv and its ``-v`` log (triton writes the log to a file it deletes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str]] = []

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        res = subprocess.run(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(log, "name"):
            with open(log.name) as f:
                self.calls.append((list(cmd), f.read()))
        return res


_RECORDER = _PtxasRecorder()
_SOURCE = None


def _init_worker(source: str | None, cache_dir: str) -> None:
    global _SOURCE
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its log
    _nvcc.subprocess = _RECORDER
    _SOURCE = _load_source(source)


@functools.cache
def _ptxas_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [^\n]*", out)
    return m.group(0) if m else out.strip()[-80:]


def _parse_ptxas(log: str) -> dict:
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None  # noqa: E731
    notes = re.findall(r"\((C\d{4})\)", log)
    # One line per C751x code, without the function name and line number that follow it.
    why = {c: t.split(" in the function")[0] for c, t in re.findall(r"\((C751\d)\) ([^\n]*)", log)}
    return {"c751x_text": why, "regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "c751x": sorted({c for c in notes if c.startswith("C751")}), "ptxas_notes": sorted(set(notes))}


def _sass_counts(cubin: bytes) -> dict:
    """SASS instruction counts (NOPs left out) from cuobjdump -sass, triton's own copy: the whole
    kernel and its longest loop (the body of the longest backward branch, i.e. the main loop)."""
    tool = os.path.join(os.path.dirname(_nvcc.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(a, 16), op) for a, op in re.findall(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", text, re.M)]
    at = {a: i for i, (a, _) in enumerate(ins)}
    real = [not op.endswith("NOP") for _, op in ins]
    loops = [sum(real[at[t]:i + 1]) for i, (a, op) in enumerate(ins)
             if (m := re.search(r"\bBRA (0x[0-9a-f]+)", op)) and (t := int(m.group(1), 16)) < a and t in at]
    return {"sass": sum(real), "sass_loop": max(loops, default=0)}


def _tiles(fn, cfg: triton.Config, consts: dict) -> str:
    # The kernel's own BLOCK_* order (dx tiles M, K, N); BLOCK_R is the LoRA rank, not a tile.
    dims = [n for n in fn.arg_names if n.startswith("BLOCK_") and n != "BLOCK_R"]
    return "_".join(f"{n[6:]}{consts[n]}" for n in dims) + f"_w{cfg.num_warps}_s{cfg.num_stages}"


def _why(e: BaseException) -> str:
    """The root cause first (triton's CompilationError opens with the kernel source), then the rest."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    msg = root.args[-1] if type(root).__name__ == "CompilationError" and root.args else root
    return f"{type(e).__name__}: {msg}\n{e}"[:3000]


def compile_one(job: tuple) -> dict:
    kernel, dtype, p, flags, index, block_r, arch, dump, sass, w16 = job
    fn_name, _, roles, _ = KERNELS[kernel]
    fn = _pick(_SOURCE, K, fn_name)
    configs = _configs(kernel, _SOURCE)
    cfg = configs[index]
    consts = {**_launch_consts(kernel, dtype, p, flags, block_r), **cfg.kwargs}
    variant = "_".join(["pany" if "THR" not in consts else f"p{p:g}", *(f.lower() for f, on in flags.items() if on),
                        *(["w16"] if w16 else [])])
    name = f"{kernel}_{dtype}_{variant}_{_tiles(fn, cfg, consts)}"
    row = {"name": name, "kernel": kernel, "dtype": dtype, "variant": variant, "rank": block_r, "config": index,
           "pinned": index == C.pinned(kernel, C.block_r(block_r), **_variant(p, flags)),
           "n_configs": len(configs), "tiles": {k: v for k, v in consts.items() if k.startswith("BLOCK_")},
           "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "triton": triton.__version__}
    t0 = time.time()
    _RECORDER.calls.clear()
    try:
        _check_consts(fn, consts)
        consts.update({n: 1 for n in fn.arg_names if n in _UNIT_STRIDES})
        sig, attrs = _signature(fn, roles, dtype, consts, w16)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as e:
        return {**row, "ok": False, "error": _why(e)}
    if len(_RECORDER.calls) != 1:
        return {**row, "ok": False, "error": f"expected one ptxas call from triton, saw {len(_RECORDER.calls)}"}
    cmd, log = _RECORDER.calls[0]
    ptx = k.asm["ptx"]
    res = _parse_ptxas(log)
    if res["regs"] is None or res["spill_stores"] is None:
        return {**row, "ok": False, "error": f"no register/spill line in the ptxas -v log:\n{log[-2000:]}"}
    ctas, limit = ctas_per_sm(res["regs"], k.metadata.shared, cfg.num_warps)
    if dump:
        for ext, data in (("ptx", ptx.encode()), ("cubin", k.asm["cubin"])):
            with open(os.path.join(dump, f"{name}.{ext}"), "wb") as f:
                f.write(data)
    target = re.search(r"^\.target (\S+)", ptx, re.M)
    if sass:
        res.update(_sass_counts(k.asm["cubin"]))
    return {**row, "ok": True, **res, "shared": k.metadata.shared, "ctas_per_sm": ctas, "occupancy_limit": limit,
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "cp_async": len(re.findall(r"cp\.async\.c[ag]\.", ptx)), "tma": ptx.count("cp.async.bulk.tensor"),
            "ptx_target": target.group(1) if target else None,
            "ptxas": cmd[0], "ptxas_version": _ptxas_version(cmd[0]),
            "ptxas_options": [a for a in cmd[1:] if a.startswith("-") and a != "-o"],
            "seconds": round(time.time() - t0, 2)}


def gated(row: dict) -> bool:
    return row["ok"] and (row["kernel"] in GEMMS or row["pinned"]) and row["dtype"] in GATED_DTYPES


def gate_failures(rows: list[dict]) -> list[str]:
    """Why this run fails: a variant that does not compile, or a gated one that spills or serialises wgmma."""
    out = [f"{r['name']}: does not compile: {r['error'].splitlines()[0]}" for r in rows if not r["ok"]]
    for r in rows:
        if gated(r):
            why = []
            if r["spill_stores"] or r["spill_loads"]:
                why.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads at {r['regs']} regs")
            if r["c751x"] and r["kernel"] in GEMMS:  # the memory-bound passes' are reported
                why.append(f"wgmma serialised ({', '.join(r['c751x'])})")
            if why:
                out.append(f"{r['name']}: " + "; ".join(why))
    return out


def _weight_kinds(kernel: str, dtype: str, lora_dtypes: list[str]) -> list[bool]:
    """The w16 settings to compile: a 16-bit-weights variant only where the kernel reads LoRA
    weights and the activations are 16-bit (with fp32 ones, "act" is fp32 again)."""
    reads_w = "w" in KERNELS[kernel][2].values()
    kinds = [False] if "fp32" in lora_dtypes else []
    if "act" in lora_dtypes and reads_w and dtype in ("bf16", "fp16"):
        kinds.append(True)
    return kinds or [False]


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200, sm_90a)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the pinned one")
    ap.add_argument("--configs", type=_csv(int), help="only these indices of each table (e.g. 0 or 6,7)")
    ap.add_argument("--kernels", type=_csv(str), default=list(KERNELS), help="comma list, default all five")
    ap.add_argument("--dtypes", type=_csv(str), default=["bf16", "fp16", "fp32"],
                    help="comma list of bf16, fp16, fp32, tf32 (fp32 data, TF32 dots)")
    ap.add_argument("--dropout", type=_csv(float), default=[0.0, 0.1], help="dropout probabilities, e.g. 0,0.1")
    ap.add_argument("--no-flag-sweep", action="store_true",
                    help="only the usual setting of COPY_X, CHUNKED, ROW_THR (off), not both")
    ap.add_argument("--lora-dtypes", type=_csv(str), default=["fp32", "act"],
                    help="LoRA weight dtypes: fp32, and/or act (the activations' 16-bit dtype, apply_lora's default)")
    ap.add_argument("--dora", action="store_true",
                    help="DoRA's variants (flags in DORA) instead of the plain ones, for the kernels that have them")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (BLOCK_R = next power of two >= 16)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--dump", metavar="DIR", help="write each variant's .ptx and .cubin here")
    ap.add_argument("--sass", action="store_true",
                    help="also count SASS instructions (cuobjdump): the kernel's and its main loop's")
    ap.add_argument("--source", metavar="FILE", help="a module whose kernels / config tables replace the package's")
    args = ap.parse_args(argv)
    bad = [k for k in args.kernels if k not in KERNELS] + [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown kernels or dtypes: {bad}")
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    src = _load_source(args.source)
    jobs = []
    for kernel in args.kernels:
        if args.dora and kernel not in DORA:
            continue
        table = _configs(kernel, src)
        has_p = "THR" in _launch_consts(kernel, "fp32", 0.0, {}, args.rank)
        for dtype in args.dtypes:
            for p in args.dropout if has_p else [0.0]:
                for flags in _flag_sets(kernel, p, not args.no_flag_sweep, args.dora):
                    # The configs this variant launches (configs.fits), or the one TPLORA_AUTOTUNE=0 pins.
                    if args.all_configs or args.configs:
                        indices = [i for i, c in enumerate(table) if (args.configs is None or i in args.configs)
                                   and C.fits(kernel, c, **_variant(p, flags))]
                    else:
                        indices = [C.pinned(kernel, C.block_r(args.rank), **_variant(p, flags))]
                    for w16 in _weight_kinds(kernel, dtype, args.lora_dtypes):
                        jobs += [(kernel, dtype, p, flags, i, args.rank, args.arch, args.dump, args.sass, w16)
                                 for i in indices]
    cache_dir = tempfile.mkdtemp(prefix="tplora_aot_")
    t0 = time.time()
    rows = []
    try:
        if args.jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                                        initargs=(args.source, cache_dir)) as pool:
                for row in pool.map(compile_one, jobs):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        else:
            _init_worker(args.source, cache_dir)
            for job in jobs:
                rows.append(compile_one(job))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    ptxas = next((f"{r['ptxas']} ({r['ptxas_version']})" for r in rows if r["ok"]), "not run")
    print(f"aot_compile: triton {triton.__version__}, ptxas {ptxas}, {len(rows)} variants in {time.time() - t0:.0f} s",
          file=sys.stderr)
    reported = [f"{r['name']}: {r['spill_stores']}/{r['spill_loads']} B spill stores/loads, {r['regs']} regs"
                for r in rows if r["ok"] and not gated(r) and (r["spill_stores"] or r["spill_loads"])]
    reported += [f"{r['name']}: wgmma serialised ({', '.join(r['c751x'])})"
                 for r in rows if r["ok"] and r["kernel"] not in GEMMS and r["c751x"]]
    if reported:
        print(f"aot_compile: reported, not gated: {len(reported)} variants spill or serialise wgmma:\n  "
              + "\n  ".join(reported), file=sys.stderr)
    failures = gate_failures(rows)
    if failures:
        print(f"aot_compile: FAIL: {len(failures)} of {len(rows)} variants:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
