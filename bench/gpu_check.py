"""The CUDA checks behind ``bench/gpu_check.sh``: correctness, an int64-offset probe, a summary.

``python -m bench.gpu_check correctness --out DIR``
    1. Every kernel (the five launch wrappers) against fp64 math on the same inputs and the same
       Philox mask, for fp32 / fp16 / bf16 (and bf16 activations with fp32 LoRA weights),
       p = 0 and 0.1, at a TP=1 shape, odd sizes, a wide r, and shard shapes with the global
       row / column offsets and row-chunked (reduce-scatter) output buffers of TP=4.
    2. Every mode (column: SP off/on × gather_output; row: SP off/on × input_is_parallel)
       through the functional API, forward and backward, at TP = 1, 2 and 4 against the
       single-device fp64 math. TP > 1 runs t processes on the one GPU: the kernels run on
       CUDA, and the collectives are bridged through a CPU gloo group (each call copies the
       buffer to the host, runs the gloo collective and copies it back), so the package's own
       collective code paths and buffers are exercised unchanged.
    Tolerance: the test suite's one rule and error metric, imported from
    ``tests.support.checks`` (``bar_for``, ``rel_err``): fp32 results within ``FP32_BAR`` of
    fp64; fp16/bf16 results within ``LOW_FACTOR`` × torch's own error doing the same in that dtype
    + ``LOW_TINY``. The GPU image runs from a copy of the working tree, so ``tests`` imports.

``python -m bench.gpu_check int64 --out DIR``
    Each kernel reads or writes one operand of more than 2^31 elements (bf16, 4.3 GB); the rows
    at both ends are compared with fp64 math on the same slices (the mask with its global rows),
    under the same rule, torch's own error being torch's bf16 result on those slices.

``python -m bench.gpu_check summary --out DIR``
    A short summary of the JSON files the steps left in DIR and of the bench's bench.json: its
    fused cases, the backend that ran in each and ``ops.select``'s per-shape choices, the
    multi-adapter cases, the verdicts.

``--device cpu --backend torch|interpret`` runs the same checks at tiny sizes on CPU, which is
how they were tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

from tests.support.checks import bar_for, rel_err

_SEED = 0x5EED1234


def _judge(triples, dtype) -> dict:
    """``[(got, fp64 math, torch in dtype)]``: the worst error of got and of torch's own, and the rule's bar."""
    err = max(rel_err(got, ref) for got, ref, _ in triples)
    err_t = max(rel_err(low, ref) for _, ref, low in triples)
    tol, why = bar_for(dtype, err_t)
    return {"err": err, "err_torch": err_t, "tol": tol, "rule": why, "ok": err <= tol}


def _verdict(name: str, got, ref64, torch_dt, results: list, **tags) -> None:
    """Record the rule's verdict on ``got`` (tags name the case; ``dtype`` is the activations')."""
    import torch

    results.append({"check": name, **tags, **_judge([(got, ref64, torch_dt)], getattr(torch, tags["dtype"]))})


# ---------------------------------------------------------------------------------------------
# 1. Kernels
# ---------------------------------------------------------------------------------------------
_KERNEL_SHAPES = [
    # name, T, K, N, r, row0, col0, chunks (row-chunked buffers as under SP at TP=chunks), bias
    ("tp1", 1024, 1024, 1024, 16, 0, 0, 1, False),
    ("odd", 63, 60, 40, 1, 0, 0, 1, True),
    ("wide-r", 130, 200, 72, 40, 0, 0, 1, False),
    ("column-shard-t4-sp", 512, 1024, 256, 16, 0, 0, 4, True),
    ("row-shard-t4-rank3", 512, 256, 1024, 16, 384, 768, 4, False),
]
_SMALL_SHAPES = [
    ("tp1", 64, 64, 48, 8, 0, 0, 1, False),
    ("odd", 63, 60, 40, 1, 0, 0, 1, True),
    ("row-shard-t4-rank3", 64, 32, 64, 8, 48, 96, 4, False),
]


def check_kernels(device, backend: str, small: bool, results: list) -> None:
    """The five launch wrappers against fp64 and torch-in-dtype math (see module docstring)."""
    import torch

    every = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
    for shape in (_SMALL_SHAPES if small else _KERNEL_SHAPES):
        # Every dtype on the TP=1, odd and row-shard shapes; bf16 on the rest (compile time).
        dtypes = every if shape[0] in ("tp1", "odd", "row-shard-t4-rank3") else every[2:3]
        for dt, ldt in dtypes:
            for p in (0.0, 0.1):
                _kernel_case(shape, dt, ldt or dt, p, device, backend, results)


def _kernel_case(shape, dt, ldt, p, device, backend, results) -> None:
    import torch

    from tplora_kernels.distributed import RowChunkedBuffer
    from tplora_kernels.mask import DropoutSpec, dropout_threshold, keep_mask, keep_scale
    from tplora_kernels.ops import launch as L

    name, T, K, N, r, row0, col0, chunks, has_bias = shape
    tags = {"shape": name, "dtype": str(dt)[6:], "lora_dtype": str(ldt)[6:], "p": p}
    g = torch.Generator().manual_seed(zlib.crc32(f"{name} {p}".encode()))

    def rnd(*s, std=1.0, dtype=dt):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    x, w, dy = rnd(T, K), rnd(N, K, std=K ** -0.5), rnd(T, N)
    a, b = rnd(r, K, std=K ** -0.5, dtype=ldt), rnd(N, r, std=0.1, dtype=ldt)
    u_in, du_in = rnd(T, r), rnd(T, r)
    bias = rnd(N) if has_bias else None
    thr = dropout_threshold(p)
    seed = torch.tensor([_SEED], dtype=torch.int64, device=device) if thr else None
    spec = DropoutSpec(seed, thr, row0=row0, col0=col0)  # this block's place in the global mask
    ks = keep_scale(thr)
    m = keep_mask(_SEED, row0, T, col0, K, thr, device=device) if thr else None
    s = 0.5

    def drop(t):
        return t if m is None else t * m.to(t.dtype) * ks

    def both(f):
        return f(torch.float64), f(dt)

    # shrink fwd, into the [z | u] buffer's u (row-chunked as under SP) when chunks > 1
    buf = RowChunkedBuffer(T, (N, r), chunks, dt, device) if chunks > 1 else None
    out = buf.views[1] if buf is not None else None
    u = L.lora_shrink_fwd(x, a, drop=spec, out=out, backend=backend)
    u = out.reshape(T, r) if out is not None else u
    _verdict("shrink_fwd u", u, *both(lambda d: drop(x.to(d)) @ a.to(d).t()), results, **tags)
    # linear fwd (+bias), into the buffer's z when chunked
    out = buf.views[0] if buf is not None else None
    z = L.lora_linear_fwd(x, w, u_in, b, scale=s, bias=bias, out=out, backend=backend)
    z = out.reshape(T, N) if out is not None else z
    _verdict("linear_fwd out", z, *both(lambda d: x.to(d) @ w.to(d).t() + s * u_in.to(d) @ b.to(d).t()
                                        + (0 if bias is None else bias.to(d))), results, **tags)
    # dy pass
    du, db = L.lora_dy_bwd(dy, b, u_in, scale=s, backend=backend)
    _verdict("dy_bwd du", du, *both(lambda d: s * dy.to(d) @ b.to(d)), results, **tags)
    _verdict("dy_bwd dB", db, *both(lambda d: s * dy.to(d).t() @ u_in.to(d)), results, **tags)
    # linear dx, the mask regenerated in the epilogue
    dx = L.lora_linear_dx(dy, w, du_in, a, drop=spec, backend=backend)
    _verdict("linear_dx dx", dx, *both(lambda d: dy.to(d) @ w.to(d) + drop(du_in.to(d) @ a.to(d))), results, **tags)
    # shrink bwd
    da = L.lora_shrink_bwd(du_in, x, drop=spec, backend=backend)
    _verdict("shrink_bwd dA", da, *both(lambda d: du_in.to(d).t() @ drop(x.to(d))), results, **tags)


# ---------------------------------------------------------------------------------------------
# 2. Modes, TP = 1, 2, 4 on one GPU
# ---------------------------------------------------------------------------------------------
def _bridge_collectives() -> None:
    """Route torch.distributed's collectives through host copies, so gloo serves CUDA tensors."""
    import torch.distributed as dist

    def bridged(fn, n_out: int):
        def call(*args, **kwargs):
            ts = list(args)
            dev = [t for t in ts if hasattr(t, "device")]
            if not dev or dev[0].device.type == "cpu":
                return fn(*args, **kwargs)
            host = [t.cpu() if hasattr(t, "device") else t for t in ts]
            work = fn(*host, **kwargs)
            for i in range(n_out):
                ts[i].copy_(host[i])
            return work

        return call

    dist.all_reduce = bridged(dist.all_reduce, 1)
    dist.all_gather_into_tensor = bridged(dist.all_gather_into_tensor, 1)
    dist.reduce_scatter_tensor = bridged(dist.reduce_scatter_tensor, 1)


_MODES = [("column", {"sequence_parallel": sp, "gather_output": go}) for sp in (False, True) for go in (False, True)] \
    + [("row", {"sequence_parallel": sp, "input_is_parallel": iip}) for sp in (False, True) for iip in (True, False)]


def _mode_case(tp, rank, group, kind, opts, dt, p, shape, device, backend, results) -> None:
    import torch

    import tplora_kernels as tk
    from tplora_kernels.reference import lora_dense

    T, K, N, r = shape
    g = torch.Generator().manual_seed(T * 31 + K)
    X, W = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g) * K ** -0.5
    A, B = torch.randn(r, K, generator=g) * K ** -0.5, torch.randn(N, r, generator=g) * 0.1
    dY = torch.randn(T, N, generator=g)
    s, sp = 0.5, opts["sequence_parallel"] and tp > 1
    grads = {}
    for d in (torch.float64, dt):
        xs, As, Bs = (t.to(device, d, copy=True).requires_grad_(True) for t in (X, A, B))
        y = lora_dense(xs, W.to(device, d), As, Bs, scale=s, dropout_p=p, seed=_SEED)
        y.backward(dY.to(device, d))
        grads[d] = {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad}
    rows = slice(rank * T // tp, (rank + 1) * T // tp)
    if kind == "column":
        n = slice(rank * N // tp, (rank + 1) * N // tp)
        sel = {"y": (slice(None), slice(None) if opts["gather_output"] else n), "dx": (rows if sp else slice(None),),
               "dA": (slice(None),), "dB": (n,)}
        x_in = X[rows] if sp else X
        w_i, a_i, b_i = W[n], A, B[n]
        dy_in = dY if opts["gather_output"] else dY[:, n]
    else:
        k = slice(rank * K // tp, (rank + 1) * K // tp)
        iip = opts["input_is_parallel"]
        sel = {"y": (rows if sp else slice(None),), "dx": (slice(None), k if iip else slice(None)),
               "dA": (slice(None), k), "dB": (slice(None),)}
        x_in = X[:, k] if iip else X
        w_i, a_i, b_i = W[:, k], A[:, k], B
        dy_in = dY[rows] if sp else dY
    x_in, a_i, b_i = (t.to(device, dt, copy=True).requires_grad_(True) for t in (x_in, a_i, b_i))
    fn = tk.column_parallel_lora if kind == "column" else tk.row_parallel_lora
    y = fn(x_in, w_i.to(device, dt), a_i, b_i, scale=s, dropout_p=p, seed=_SEED, group=group, backend=backend,
           **opts)
    y.backward(dy_in.to(device, dt))
    if sp:
        (a_i if kind == "column" else b_i).sequence_parallel = True
        tk.sum_sequence_parallel_grads([a_i, b_i], group)
    got = {"y": y.detach(), "dx": x_in.grad, "dA": a_i.grad, "dB": b_i.grad}
    tags = {"tp": tp, "rank": rank, "kind": kind, **opts, "dtype": str(dt)[6:], "p": p, "shape": list(shape)}
    for name in ("y", "dx", "dA", "dB"):
        ix = sel[name]
        _verdict(f"{kind} {name}", got[name], grads[torch.float64][name][ix], grads[dt][name][ix], results,
                 **tags)


def _mode_rank(rank: int, tp: int, port: int, device_s: str, backend: str, small: bool, queue) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    results: list = []
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=tp, timeout=timedelta(seconds=60))
        _bridge_collectives()
        device = torch.device(device_s)
        shapes = [(64, 64, 48, 8), (68, 120, 88, 3)] if small else [(256, 512, 384, 16), (68, 120, 88, 3)]
        odd_dtypes = (torch.float32, torch.bfloat16)  # the odd shape: fewer dtypes, fewer compiles
        for kind, opts in _MODES:
            if tp == 1 and (opts["sequence_parallel"] or opts.get("gather_output")
                            or not opts.get("input_is_parallel", True)):
                continue
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                for p in (0.0, 0.1):
                    for shape in shapes:
                        if shape is shapes[-1] and dt not in odd_dtypes:
                            continue
                        try:
                            _mode_case(tp, rank, dist.group.WORLD, kind, opts, dt, p, shape, device, backend, results)
                        except Exception as e:  # reported as a failed check, the rest still run
                            results.append({"check": f"{kind} mode", "tp": tp, "rank": rank, **opts,
                                            "dtype": str(dt)[6:], "p": p, "ok": False,
                                            "error": f"{type(e).__name__}: {e}"})
                            raise
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # the parent reports it
        results.append({"check": "mode rank", "tp": tp, "rank": rank, "ok": False, "error": traceback.format_exc()})
    queue.put(results)


def check_modes(device_s: str, backend: str, small: bool, results: list, tps=(1, 2, 4), after_tp=None) -> None:
    """Every mode at TP = 1, 2, 4: t processes on one device, collectives bridged through gloo."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for tp in tps:
        with socket.socket() as sck:
            sck.bind(("127.0.0.1", 0))
            port = sck.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_mode_rank, args=(r, tp, port, device_s, backend, small, q)) for r in range(tp)]
        for pr in procs:
            pr.start()
        for _ in procs:
            try:
                results.extend(q.get(timeout=300))
            except Exception as e:  # a rank died without reporting
                results.append({"check": "mode rank", "tp": tp, "ok": False, "error": f"no result: {e!r}"})
                break
        for pr in procs:
            pr.join(timeout=30)
            if pr.is_alive():
                pr.kill()
        if after_tp is not None:
            after_tp()


# ---------------------------------------------------------------------------------------------
# int64 offsets
# ---------------------------------------------------------------------------------------------
def check_int64(device, backend: str, results: list, big_rows: int | None = None) -> None:
    """Each kernel on an operand of more than 2^31 elements; ends compared with fp64 math under the rule."""
    import torch

    from tplora_kernels.mask import DropoutSpec, dropout_threshold, keep_mask, keep_scale
    from tplora_kernels.ops import launch as L

    dt, W_ = torch.bfloat16, 4096
    T = big_rows or (2**31 // W_ + 192)  # T·4096 > 2^31 elements
    r, s, e = 16, 0.5, 128
    thr = dropout_threshold(0.1)
    spec = DropoutSpec(torch.tensor([_SEED], dtype=torch.int64, device=device), thr)
    ends = (slice(0, e), slice(T - e, T))

    def gen(*shape, std=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dt)

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            for what, triples in fn().items():
                results.append({"check": f"int64 {name} {what}", "rows": T, "elements": T * W_,
                                **_judge(triples, dt), "s": round(time.perf_counter() - t0, 1)})
        except Exception as ex:  # one probe's failure must not hide the others
            results.append({"check": f"int64 {name}", "rows": T, "ok": False, "error": f"{type(ex).__name__}: {ex}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def mask(rows: slice, cols: int):
        keep = keep_mask(_SEED, rows.start, rows.stop - rows.start, 0, cols, thr, device=device)
        return keep.float() * keep_scale(thr)

    def chunked(f):  # an fp64 sum over all T rows, 2^16 rows at a time
        return sum(f(slice(c, c + (1 << 16))) for c in range(0, T, 1 << 16))

    # Each probe returns {output: [(kernel result, fp64 math, torch in bf16)]} on the same slices.
    def linear_fwd():  # writes out [T, 4096]
        x, w, u, b = gen(T, 16), gen(W_, 16, std=0.25), gen(T, r), gen(W_, r, std=0.1)
        out = L.lora_linear_fwd(x, w, u, b, scale=s, backend=backend)
        return {"out": [(out[i], x[i].double() @ w.double().t() + s * u[i].double() @ b.double().t(),
                         x[i] @ w.t() + s * (u[i] @ b.t())) for i in ends]}

    def linear_dx():  # writes dx [T, 4096], mask at rows past 2^31 / 4096 · 8
        dy, w, du, a = gen(T, 16), gen(16, W_, std=0.25), gen(T, r), gen(r, W_, std=0.1)
        dx = L.lora_linear_dx(dy, w, du, a, drop=spec, backend=backend)
        return {"dx": [(dx[i], dy[i].double() @ w.double() + (du[i].double() @ a.double()) * mask(i, W_).double(),
                        dy[i] @ w + (du[i] @ a) * mask(i, W_).to(dt)) for i in ends]}

    def shrink_fwd():  # reads x [T, 4096]
        x, a = gen(T, W_), gen(r, W_, std=W_ ** -0.5)
        u = L.lora_shrink_fwd(x, a, drop=spec, backend=backend)
        return {"u": [(u[i], (x[i].double() * mask(i, W_).double()) @ a.double().t(),
                       (x[i] * mask(i, W_).to(dt)) @ a.t()) for i in ends]}

    def dy_bwd():  # reads dy [T, 4096]
        dy, b, u = gen(T, W_), gen(W_, r, std=0.1), gen(T, r)
        du, db = L.lora_dy_bwd(dy, b, u, scale=s, backend=backend)
        return {"du": [(du[i], s * dy[i].double() @ b.double(), s * (dy[i] @ b)) for i in ends],
                "dB": [(db, chunked(lambda c: s * dy[c].double().t() @ u[c].double()), s * (dy.t() @ u))]}

    def shrink_bwd():  # reads x [T, 4096], p = 0 so the oracle needs no full-size mask
        du, x = gen(T, r), gen(T, W_)
        da = L.lora_shrink_bwd(du, x, backend=backend)
        return {"dA": [(da, chunked(lambda c: du[c].double().t() @ x[c].double()), du.t() @ x)]}

    for name, fn in (("linear_fwd write", linear_fwd), ("linear_dx write", linear_dx),
                     ("shrink_fwd read", shrink_fwd), ("dy_bwd read", dy_bwd), ("shrink_bwd read", shrink_bwd)):
        record(name, fn)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def summarize(out: Path) -> str:
    """A short text summary of the JSON files under ``out``."""
    lines = [f"gpu_check summary ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})"]
    steps = out / "steps.txt"
    if steps.exists():
        lines.append("steps: " + "; ".join(steps.read_text().split("\n")).strip("; "))
    for name in ("correctness", "int64"):
        f = out / f"{name}.json"
        if not f.exists():
            lines.append(f"{name}: no result (step failed or timed out; see {name}.log)")
            continue
        res = json.loads(f.read_text())["results"]
        bad = [r for r in res if not r.get("ok")]
        lines.append(f"{name}: {len(res) - len(bad)}/{len(res)} checks passed")
        for r in bad[:8]:
            lines.append("  FAIL " + json.dumps({k: v for k, v in r.items() if k != "ok"})[:300])
        worst = [r for r in res if "err" in r and "tol" in r]
        if worst:
            w = max(worst, key=lambda r: r["err"] / r["tol"] if r["tol"] else 0)
            lines.append(f"  tightest: {w['check']} {w.get('dtype', '')} err {w['err']:.2e} vs tol {w['tol']:.2e}")
    bj = out / "bench" / "bench.json"
    if bj.exists():
        data = json.loads(bj.read_text())
        lines.append(f"bench ({data['meta'].get('wall_s')} s, {data['meta']['machine'].get('gpus')}):")
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
        from .report import format_backends, format_multi, format_targets

        lines.append(format_backends(data["meta"], data["results"]))
        if multi := format_multi(data["results"]):
            lines.append(multi)
        lines.append(format_targets(data["targets"]))
    else:
        lines.append("bench: no bench.json (step failed or timed out; see bench.log)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``correctness``, ``int64`` or ``summary`` (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["correctness", "int64", "summary"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out/gpu_check")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default=None, help="default: triton on CUDA, torch on CPU")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU dry runs)")
    ap.add_argument("--tp", default="1,2,4", help="TP sizes for the mode checks")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "summary":
        print(summarize(args.out))
        return 0
    import torch

    device = torch.device(args.device)
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    results: list = []
    t0 = time.perf_counter()

    def write() -> None:  # after every stage, so a step killed by its time limit still leaves results
        (args.out / f"{args.step}.json").write_text(json.dumps({
            "device": str(device), "backend": backend, "wall_s": round(time.perf_counter() - t0, 1),
            "results": results}, indent=1, default=str))

    try:
        # Pinned configs: these checks are about the math and the addressing (and autotuning a
        # 4 GB probe would take minutes); the bench step exercises the autotuner.
        os.environ.setdefault("TPLORA_AUTOTUNE", "0")
        if args.step == "correctness":
            check_kernels(device, backend, args.small, results)
            print(f"kernels: {sum(r['ok'] for r in results)}/{len(results)} ok ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
            write()
            check_modes(str(device), backend, args.small, results, tps=[int(t) for t in args.tp.split(",")],
                        after_tp=write)
        else:
            check_int64(device, backend, results, big_rows=1024 if args.small else None)
    except Exception:  # whatever ran is still written
        results.append({"check": args.step, "ok": False, "error": traceback.format_exc()})
    n_ok = sum(bool(r.get("ok")) for r in results)
    write()
    for r in results:
        if not r.get("ok"):
            print("FAIL", json.dumps(r, default=str)[:500])
    print(f"{args.step}: {n_ok}/{len(results)} ok in {time.perf_counter() - t0:.0f}s")
    return 0 if n_ok == len(results) and results else 1


if __name__ == "__main__":
    sys.exit(main())
