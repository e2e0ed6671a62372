"""Spawning the ranks, and what each rank measures.

Parent side, ``run_cases``: the cases are grouped by how many processes they need. On CPU each
TP size t gets t spawned ranks joined by a real gloo group on 127.0.0.1; on CUDA with at least
t GPUs, t ranks on NCCL; on CUDA with fewer, one process times each rank's shard shapes
(``Case.emulated``) and collectives are "not measured". Rank 0 streams progress and results
back through a queue, so the parent owns the progress bar.

Rank side, per case: first the answers are checked (single-adapter: the fused forward and PEFT's
layer against the reference, recorded; multi-adapter: ``mixed`` against ``sequential`` and each
adapter alone; DoRA: ``dora`` against ``peft_dora`` on the same mask, output and gradients, and
``lora`` against the reference; in those two a disagreement stops the run before anything is
timed); after the warm-up, the backend each LoRA contender ran on is asked of the package with
its calls' GEMM keys. Then per contender (``base``, ``reference``, ``peft`` where it runs,
``fused``; or ``base``, ``mixed``, ``sequential``; or ``base``, ``lora``, ``dora``, ``peft_dora``):

1. **One instrumented forward + backward**, not timed:

   * collectives: ``torch.distributed``'s collective functions are wrapped for the pass and
     every call is recorded with its phase (forward / backward) and its largest tensor's bytes
     (the full buffer: all-reduce's tensor, all-gather's output, reduce-scatter's input). The
     same pass runs under ``torch.profiler``, and its ``c10d::`` dispatcher events are counted
     independently; the two counts must agree (``count_check``).
   * saved activations: ``torch.autograd.graph.saved_tensors_hooks`` see every tensor autograd
     saves in forward; bytes are summed per distinct storage (``untyped_storage().nbytes()``,
     so a saved view pins its whole buffer, as it does in reality), excluding the weights'
     storages.
   * peak memory: on CPU, the profiler's ``[memory]`` events (every allocation and free by
     torch's CPU allocator) are replayed in time order; ``peak_bytes`` is the highest live
     total above the pass's start, ``held_after_fwd_bytes`` the live total when forward
     returns. On CUDA, ``torch.cuda.max_memory_allocated`` above the start.

2. **Timing**: forward, and forward + backward (with a fixed ``dy``; grads reset between runs).
   CPU and multi-GPU: a barrier, then ``perf_counter`` around the pass (CUDA synchronised),
   contenders interleaved in a rotating order within each repetition so drift hits all three
   alike; a repetition's time is the slowest rank's. Single GPU: ``triton.testing.do_bench``
   (median, p20, p80 of its own repetitions), plus cuBLAS (``torch.matmul``) on the base GEMM's
   shapes for the "fraction of cuBLAS" figure.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

from tplora_kernels.testing import launch
from tplora_kernels.testing.numerics import FP32_BAR, rel_err

from . import peft_layer
from .cases import DTYPES, SCALE, Case, build, min_bytes, model_flops, roofline_ms

__all__ = ["RunConfig", "agree_bar", "count_collectives", "quantiles", "run_cases"]

# torch.distributed collectives the wrapper records. Each is patched on the torch.distributed
# namespace only: c10d's internal calls between them go through its own module globals, so a
# call is never counted twice.
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single", "broadcast",
    "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "all_reduce_coalesced",
    "all_gather_coalesced", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


@dataclass(frozen=True)
class RunConfig:
    """How the cases run (everything but the cases themselves).

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        backend: the fused path's backend: ``"auto"``, ``"triton"``, ``"cublas"``, ``"interpret"``, ``"torch"``.
        warmup: untimed repetitions first (CPU / multi-GPU loop).
        reps: timed repetitions (CPU / multi-GPU loop).
        ref_dropout: the reference's dropout, ``"bernoulli"`` or ``"philox"``.
        lora_dtype: the fused path's LoRA weight dtype name (``"fp32"`` ...), None = activation's.
        gpus: GPUs to use on CUDA (cases with tp > gpus are emulated on one).
        pg_timeout_s: process-group timeout, so a hung collective fails the run.
        do_bench_ms: ``(warmup, rep)`` milliseconds for triton's do_bench.
        threads: CPU threads per rank; 0 = the cores divided by the ranks. Default 1: the ranks
            share a few cores, and OpenMP's fork-join on every small op collapses when another
            process takes a core (the Philox-heavy fused path at p > 0 ran 30x slower at TP 1
            with 2 threads on a loaded 2-core machine).
        peft: also time PEFT's own LoraParallelLinear where it runs (``bench.peft_layer``).
    """

    device: str = "cpu"
    backend: str = "auto"
    warmup: int = 2
    reps: int = 12
    ref_dropout: str = "bernoulli"
    lora_dtype: str | None = None
    gpus: int = 0
    pg_timeout_s: int = 300
    do_bench_ms: tuple[int, int] = (25, 100)
    threads: int = 1
    peft: bool = True


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
def quantiles(xs: list[float]) -> dict[str, float]:
    """Median, p20 and p80 (linear interpolation) of ``xs``, in the same unit.

    Example:
        >>> quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
        {'median': 3.0, 'p20': 1.8, 'p80': 4.2}
    """
    s = sorted(xs)

    def q(f: float) -> float:
        if not s:
            return math.nan
        pos = f * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median": q(0.5), "p20": q(0.2), "p80": q(0.8)}


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


@contextlib.contextmanager
def count_collectives(log: list, phase: list):
    """Record every ``torch.distributed`` collective called inside the block.

    Each call appends ``{"op", "phase", "bytes"}`` to ``log``, where ``phase[0]`` is read at call
    time (the caller flips it between forward and backward) and ``bytes`` is the largest tensor
    argument's size (a tensor list counts as the sum of its tensors).

    Args:
        log: list to append to.
        phase: one-element list holding the current phase name.

    Example:
        >>> log = []
        >>> with count_collectives(log, ["fwd"]):
        ...     pass
        >>> log
        []
    """
    import torch.distributed as dist

    saved = {}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            sizes = [_tensor_bytes(a) for a in (*args, *kwargs.values())]
            log.append({"op": name, "phase": phase[0], "bytes": max(sizes, default=0)})
            return fn(*args, **kwargs)

        return counted

    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if callable(fn):
            saved[name] = fn
            setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _c10d_counts(prof, windows: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Dispatcher-level ``c10d::`` collective events per phase window (barriers excluded)."""
    events = []
    for e in prof.profiler.kineto_results.events():
        n = e.name()
        if n.startswith("c10d::") and "barrier" not in n:
            events.append((e.start_ns(), e.end_ns()))
    events.sort()
    counts = dict.fromkeys(windows, 0)
    outer_end = -1
    for s, e in events:
        if s < outer_end:  # nested inside the previous collective: the same call
            continue
        outer_end = e
        for ph, (ws, we) in windows.items():
            if ws <= s <= we:
                counts[ph] += 1
    return counts


def _windows(prof) -> dict[str, tuple[int, int]]:
    out = {}
    for e in prof.profiler.kineto_results.events():
        if e.name() in ("bench::fwd", "bench::bwd"):
            out[e.name()[7:]] = (e.start_ns(), e.end_ns())
    return out


def _cpu_memory(prof, fwd_end_ns: int) -> tuple[int, int]:
    """(peak live bytes above the start, live bytes at forward's end) from ``[memory]`` events."""
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = held = 0
    for t, nb in mem:
        live += nb
        peak = max(peak, live)
        if t <= fwd_end_ns:
            held = live
    return peak, held


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 briefly: kineto logs a USDT line at every profiler start/stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _backward(built, name: str, y) -> None:
    """Backward of contender ``name``'s output (a tuple of outputs: one backward over all of them)."""
    import torch

    torch.autograd.backward(y, built.dy_for.get(name, built.dy))


def _reset_grads(built) -> None:
    for t in built.grads:
        t.grad = None


def _measure_pass(built, name: str, device, measure_collectives: bool) -> dict:
    """One instrumented forward + backward of contender ``name`` (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    fn = built.contenders[name]
    _reset_grads(built)
    skip = {p.untyped_storage().data_ptr() for p in built.params}
    saved: dict[int, tuple[int, str]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = (st.nbytes(), f"{list(t.shape)} {str(t.dtype)[6:]}")
        return t

    cuda = device.type == "cuda"
    log: list = []
    phase = ["fwd"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda, record_shapes=False)
    with _quiet_stderr():
        prof.start()
    try:
        with count_collectives(log, phase):
            with record_function("bench::fwd"):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    y = fn()
                if cuda:
                    torch.cuda.synchronize()
                    held_cuda = torch.cuda.memory_allocated() - start
            phase[0] = "bwd"
            with record_function("bench::bwd"):
                _backward(built, name, y)
                if cuda:
                    torch.cuda.synchronize()
    finally:
        with _quiet_stderr():
            prof.stop()
    del y
    windows = _windows(prof)
    if cuda:
        peak, held = torch.cuda.max_memory_allocated() - start, held_cuda
    else:
        peak, held = _cpu_memory(prof, windows["fwd"][1])
    out = {"saved_bytes": sum(nb for nb, _ in saved.values()), "peak_bytes": peak, "held_after_fwd_bytes": held,
           "saved_tensors": [f"{desc}: {nb} B" for nb, desc in saved.values()]}
    if measure_collectives:
        c10d = _c10d_counts(prof, windows)
        coll = {}
        for ph in ("fwd", "bwd"):
            calls = [c for c in log if c["phase"] == ph]
            coll[ph] = {"count": len(calls), "bytes": sum(c["bytes"] for c in calls),
                        "ops": [f"{c['op']}:{c['bytes']}" for c in calls], "count_c10d": c10d[ph]}
        coll["measured"] = True
        coll["count_check"] = "ok" if all(coll[p]["count"] == coll[p]["count_c10d"] for p in ("fwd", "bwd")) \
            else "mismatch"
        out["collectives"] = coll
    else:
        out["collectives"] = {"measured": False}
    _reset_grads(built)
    return out


def _checks(built, case: Case, group) -> dict[str, float]:
    """Relative max errors against the reference: the fused forward with the same Philox mask, and
    PEFT's layer (whose nn.Dropout has no mask to share) with dropout off, in eval mode."""
    import torch

    from tplora_kernels.reference import column_parallel_lora_reference, row_parallel_lora_reference

    ref = column_parallel_lora_reference if case.kind == "column" else row_parallel_lora_reference
    x, (w, a, b) = built.x, built.params[:3]
    sp = case.sp and not case.emulated
    mode = {} if case.kind == "column" else {"input_is_parallel": True}

    def rel(y, p, dropout):
        y_r = ref(x, w, a.float(), b.float(), scale=SCALE, dropout_p=p, seed=0x5EED, sequence_parallel=sp,
                  group=group, dropout=dropout, **mode)
        return rel_err(y, y_r)

    with torch.no_grad():
        out = {"fused": rel(built.contenders["fused"](), case.p, "philox")}
        if built.peft_layer is not None:
            built.peft_layer.eval()
            try:
                out["peft"] = rel(built.contenders["peft"](), 0.0, "bernoulli")
            finally:
                built.peft_layer.train()
    return out


def _time_loop(built, names, world: int, cfg: RunConfig, device) -> dict:
    """Interleaved perf_counter timing; returns {(name, phase): [seconds per repetition]}."""
    import torch
    import torch.distributed as dist

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {(n, ph): [] for n in names for ph in ("fwd", "fwd_bwd")}
    for i in range(cfg.warmup + cfg.reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            fn = built.contenders[n]
            for ph in ("fwd", "fwd_bwd"):
                _reset_grads(built)
                sync()
                if world > 1:
                    dist.barrier()
                t0 = time.perf_counter()
                y = fn()
                if ph == "fwd_bwd":
                    _backward(built, n, y)
                sync()
                dt = time.perf_counter() - t0
                del y
                if i >= cfg.warmup:
                    out[(n, ph)].append(dt)
    _reset_grads(built)
    return out


def _do_bench(built, names, cfg: RunConfig) -> dict:
    """triton.testing.do_bench per contender and phase; returns {(name, phase): quantiles in ms}."""
    from triton.testing import do_bench

    out = {}
    w, r = cfg.do_bench_ms
    for n in names:
        fn = built.contenders[n]
        out[(n, "fwd")] = do_bench(lambda fn=fn: fn(), warmup=w, rep=r, quantiles=[0.5, 0.2, 0.8],
                                   grad_to_none=built.grads)
        out[(n, "fwd_bwd")] = do_bench(lambda fn=fn, n=n: _backward(built, n, fn()), warmup=w, rep=r,
                                       quantiles=[0.5, 0.2, 0.8], grad_to_none=built.grads)
    _reset_grads(built)
    return {k: {"median": v[0], "p20": v[1], "p80": v[2]} for k, v in out.items()}


def _cublas(case: Case, built, cfg: RunConfig) -> dict:
    """do_bench of torch.matmul on the base GEMM's shapes: forward, and forward + dgrad."""
    import torch
    from triton.testing import do_bench

    w = built.params[0]
    loc = case.local
    x = torch.randn(loc["rows"], loc["k"], dtype=w.dtype, device=w.device)
    dy = torch.randn(loc["rows"], loc["n"], dtype=w.dtype, device=w.device)
    wu, r = cfg.do_bench_ms
    fwd = do_bench(lambda: torch.matmul(x, w.t()), warmup=wu, rep=r, quantiles=[0.5, 0.2, 0.8])
    both = do_bench(lambda: (torch.matmul(x, w.t()), torch.matmul(dy, w)), warmup=wu, rep=r,
                    quantiles=[0.5, 0.2, 0.8])
    return {"fwd": fwd[0], "fwd_bwd": both[0]}


# ---------------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, cfg_d: dict, case_ds: list[dict], queue) -> None:
    """Entry point of one spawned rank (its process group already up): run every case, rank 0
    reports through ``queue``."""
    _rank_body(rank, world, RunConfig(**cfg_d), [Case(**c) for c in case_ds], queue)


def _rank_body(rank: int, world: int, cfg: RunConfig, cases: list[Case], queue) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    # torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (the package's
    # calls); one warning per rank per call site would bury the progress bar.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    if cfg.device == "cpu":
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    group = dist.group.WORLD if dist.is_initialized() else None
    lora_dtype = getattr(torch, DTYPES[cfg.lora_dtype]) if cfg.lora_dtype else None
    peft = cfg.peft and any(peft_layer.unsupported(c, device.type, group is not None) is None for c in cases
                            if c.adapters == 1 and not c.dora)
    if peft:
        peft_layer.init_parallel_state(world)
    try:
        for ci, case in enumerate(cases):
            _case(rank, world, ci, case, cfg, device, group, lora_dtype, queue)
        if rank == 0 and device.type == "cuda":
            from tplora_kernels.ops import select

            queue.put(("decisions", world, None, select.decisions()))
    finally:
        if peft:
            peft_layer.shutdown_parallel_state()


def _gather_max(obj, world: int):
    """Every rank's ``obj`` (a list of floats or a dict of ints), combined by elementwise max."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return obj
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    if isinstance(obj, dict):
        return {k: max(o[k] for o in objs) for k in obj}
    return [max(vals) for vals in zip(*objs)]


# A multi-adapter case's mixed and sequential contenders run the same math in the same dtype: in
# fp32 they differ by summation order only (the tolerance rule's fp32 bar); a 16-bit result by its
# rounding, at most half an ulp of the largest value on each side. A DoRA case's check runs
# peft_dora in the fused path's dtypes for the same reason.


def agree_bar(dtype: str) -> float:
    """The largest relative error at which two contenders' answers in ``dtype`` still agree.

    Example:
        >>> agree_bar("fp32"), agree_bar("bf16")
        (1e-05, 0.0078125)
    """
    import torch

    return FP32_BAR if dtype == "fp32" else float(torch.finfo(getattr(torch, DTYPES[dtype])).eps)


def _verify(built, case: Case, world: int) -> dict[str, float]:
    """Run the case's own checks on every rank; raise on every rank alike if any exceeds ``agree_bar``."""
    errs = _gather_max(built.verify(), world)
    bar = agree_bar(case.dtype)
    bad = {k: v for k, v in errs.items() if not v <= bar}
    if bad:
        raise RuntimeError(f"{case.label}: the contenders disagree, so nothing is timed: "
                           + "; ".join(f"{k}: rel err {v:.2e} > {bar:.1e}" for k, v in bad.items()))
    return errs


def _backends_ran(built, backend: str, device, group) -> dict[str, str]:
    """The backend each LoRA contender's calls ran on, asked of the package with each call's GEMM key.

    On CUDA with ``auto`` that is ``ops.select``'s cached choice for the shape, made by the
    warm-up's first call. A key no call made would start a new measurement: the bench's key
    would then not be the package's, so that is an error, not a guess.
    """
    from tplora_kernels import get_backend
    from tplora_kernels.ops import select

    before = len(select.decisions())
    ran = {n: ",".join(sorted({get_backend(device, backend, gemm=(*key, group)).name for key in keys}))
           for n, keys in built.gemm.items()}
    if len(select.decisions()) != before:
        raise RuntimeError(f"bench: GEMM keys {built.gemm} were not the package's (a new ops.select decision)")
    return ran


def _case(rank, world, ci, case: Case, cfg: RunConfig, device, group, lora_dtype, queue) -> None:
    import torch

    def say(stage):
        if rank == 0:
            queue.put(("stage", ci, case.label, stage))

    say("build")
    built = build(case, group=None if case.emulated else group, rank=0 if case.emulated else rank, device=device,
                  backend=cfg.backend, ref_dropout=cfg.ref_dropout, lora_dtype=lora_dtype, seed=1000 + ci,
                  peft=cfg.peft)
    names = list(built.contenders)
    if built.verify is not None:
        agreed, checks = _verify(built, case, world), {}
    else:
        agreed, checks = None, _checks(built, case, None if case.emulated else group)
    say("warm-up")
    # One untimed forward + backward each first: autotuning, lazy initialisation and first-touch
    # allocations must not land in the instrumented pass's memory figures.
    for n in names:
        _backward(built, n, built.contenders[n]())
    _reset_grads(built)
    ran = _backends_ran(built, cfg.backend, device, None if case.emulated else group)
    say("instrumented pass")
    measured = {}
    for n in names:
        m = _measure_pass(built, n, device, measure_collectives=not case.emulated)
        mem = _gather_max({k: m[k] for k in ("saved_bytes", "peak_bytes", "held_after_fwd_bytes")}, world)
        # saved_tensors stays rank 0's list; the byte counts above are the max over ranks.
        measured[n] = {**m, **mem}
    say("timing")
    single = world == 1 and device.type == "cuda"
    if single:
        times = _do_bench(built, names, cfg)
        timer = "triton.testing.do_bench"
        cublas = _cublas(case, built, cfg)
    else:
        raw = _time_loop(built, names, world, cfg, device)
        times = {k: quantiles([1e3 * s for s in _gather_max(v, world)]) for k, v in raw.items()}
        timer = "perf_counter, max over ranks" if world > 1 else "perf_counter"
        cublas = None
    if rank != 0:
        return
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    recs = []
    for n in names:
        rec = {"case": case.as_dict(), "label": case.label, "contender": n,
               "backend": ran.get(n, next(iter(ran.values()), built.backend)),
               "device": dev_name, "ranks": world, "timer": timer, "peft_skipped": built.peft_skipped,
               "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else None}
        for ph in ("fwd", "fwd_bwd"):
            t = times[(n, ph)]
            rec[f"{ph}_ms"] = t
            fl = model_flops(case, n, ph)
            rec[f"flops_{ph}"] = fl
            rec[f"tflops_{ph}"] = fl / (t["median"] * 1e-3) / 1e12 if t["median"] > 0 else None
            rec[f"min_bytes_{ph}"] = min_bytes(case, n, ph)
            rec[f"roofline_ms_{ph}"] = roofline_ms(case, n, ph, dev_name)
            if cublas is not None and n != "base":
                rec[f"cublas_ms_{ph}"] = cublas[ph]
                base_fl = model_flops(case, "base", ph)
                rec[f"cublas_frac_{ph}"] = (rec[f"tflops_{ph}"] / (base_fl / (cublas[ph] * 1e-3) / 1e12)
                                            if rec[f"tflops_{ph}"] else None)
        rec.update(measured[n])
        if n in checks:
            rec["check_rel_err_vs_reference"] = checks[n]
        if n in built.gemm:
            rec["gemm_shapes"] = sorted({f"N={k[2]} K={k[3]} r={k[4]} T={k[5]}" for k in built.gemm[n]})
        if n == built.checked_by[0] and agreed is not None:
            rec[built.checked_by[1]], rec["check_bar"] = agreed, agree_bar(case.dtype)
        recs.append(rec)
    queue.put(("done", ci, case.label, recs))


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------
def _world_of(case: Case, cfg: RunConfig) -> int:
    if case.emulated:
        return 1
    return case.tp


def _threads(cfg: RunConfig, world: int) -> int | None:
    """Intra-op threads per CPU rank: ``cfg.threads``, or the cores shared out (None on CUDA: torch's own)."""
    if cfg.device != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cfg.threads or max(1, cores // world)


def _pg_backend(cfg: RunConfig, world: int) -> str | None:
    """gloo on CPU (a real group even at TP 1), NCCL across GPUs, none for one GPU."""
    if cfg.device == "cpu":
        return "gloo"
    return "nccl" if world > 1 else None


def run_cases(cases: list[Case], cfg: RunConfig, on_event=None, info: dict | None = None) -> list[dict]:
    """Run ``cases`` on spawned ranks and return one record per (case, contender).

    Args:
        cases: from ``cases.matrix`` (emulated cases run in one process).
        cfg: the run configuration.
        on_event: optional callback ``(kind, case_index, label, payload)`` with kind ``"stage"``
            (payload: what is running) or ``"done"`` (payload: the case's records); indices count
            over ``cases``.
        info: filled, on CUDA, with ``gemm_decisions``: ``{"world=t": ops.select.decisions()}`` of
            each group of ranks' rank 0 (the per-shape choice between triton and cublas, and its times).

    Returns:
        The records, in case order.

    Raises:
        RuntimeError: a rank failed (its traceback is in the message).
    """
    import multiprocessing

    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(_world_of(c, cfg), []).append(i)
    results: dict[int, list[dict]] = {}
    for world, idx in groups.items():
        queue = multiprocessing.get_context("spawn").Queue()
        sub = [asdict(cases[i]) for i in idx]

        def drain(queue=queue, idx=idx):
            while True:
                try:
                    msg = queue.get_nowait()
                except Exception:  # queue.Empty, or a closed queue after a crash
                    return
                kind = msg[0]
                if kind == "decisions":
                    if info is not None:
                        info.setdefault("gemm_decisions", {})[f"world={msg[1]}"] = msg[3]
                    continue
                _, local, label, payload = msg
                if kind == "done":
                    results[idx[local]] = payload
                if on_event is not None:
                    on_event(kind, idx[local], label, payload)

        try:
            # No deadline: a case takes what it takes; a hung collective ends at the group's timeout.
            launch.spawn_world(_rank_main, world, args=(world, asdict(cfg), sub, queue), timeout=None,
                               backend=_pg_backend(cfg, world), pg_timeout_s=cfg.pg_timeout_s,
                               threads=_threads(cfg, world), keep="none", poll=drain, name=f"bench world={world}",
                               exit_hard=False)
        except launch.WorldFailed as e:
            drain()
            raise RuntimeError(f"a bench rank failed (world={world}): {e}") from e
    return [r for i in sorted(results) for r in results[i]]
