"""CLI: ``python -m bench [options]`` from the repository root (see ``--help`` and NOTES.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

_CPU_DEFAULTS = {"tokens": 1024, "d_in": 1024, "d_out": 1024, "r": 16, "p": "0,0.1", "dtype": "fp32",
                 "warmup": 2, "reps": 12}
_CUDA_DEFAULTS = {"tokens": 8192, "d_in": 4096, "d_out": 4096, "r": 16, "p": "0,0.1", "dtype": "bf16",
                  "warmup": 5, "reps": 30}
_QUICK = {"tokens": 64, "d_in": 64, "d_out": 64, "r": 8, "p": "0.1", "warmup": 1, "reps": 3}
# `time python -m bench` on the 2-core VM of bench/NOTES.md §3 (230 s of CPU time); README says the same.
DEFAULT_RUN_MINUTES = "4"
DEFAULT_MULTI = "off"
DEFAULT_DORA = "off"

_EPILOG = """\
Contenders per case: the frozen base layer alone (the floor); "reference", our torch emulation of
PEFT's LoraParallelLinear structure (materialised dropout, fp32 LoRA weights, its own collective);
"peft", PEFT's own LoraParallelLinear on megatron-core layers (where it runs: SP off on CPU); and
"fused", tplora_kernels. Shapes are the FULL layer (--in K, --out N); each rank builds its shard
(column: W_i [N/t, K]; row: W_i [N, K/t]).

Defaults: CPU fp32, T=1024, K=N=1024, r=16, p in {0, 0.1}, TP 1,2,4 on gloo, SP off/on, one
thread per rank: 20 cases, about {minutes} minutes on 2 cores (longer when other work shares
them). On CPU the fused path runs the torch backend: CPU times show the structure (collectives,
saved bytes), not GPU speed. CUDA: bf16, T=8192, K=N=4096, the package's GPU backend; TP sizes
beyond the GPU count run each rank's shard shapes on one GPU (collectives "not measured"). The
GPU speed targets (fused fwd+bwd <= 1.05x the base layer, >= 1.45x faster than the reference)
are judged on such runs only.

Multi-adapter cases (--multi on|only; not in the default run): per TP size and mode, --adapters
adapters of rank --r, one per sample of x [s, b, K], at the largest --p (each adapter its own
alpha and dropout): "mixed", one fused call with the mix, against "sequential", the fused call
once per adapter on its own sample; checked to agree before timing. Backend "auto" on CUDA: the
package picks triton or cublas per layer shape (recorded with its times); "triton" or "cublas"
times one path.

DoRA cases (--dora on|only; not in the default run): per TP size, mode and --p, "lora" (the fused
LoRA call), "dora" (the fused DoRA call, magnitude=; the norm's LoRA part recomputed per call, as
after every optimizer step) and "peft_dora" (PEFT's DoRA math per rank, unfused, B·A materialised
for the norm in every forward, fp32 factors: bench/peft_dora.py); checked to agree before timing.
Reported: dora/lora and dora/peft_dora fwd+bwd ratios, saved bytes (DoRA: at most LoRA's plus one
output-sized tensor), collectives (DoRA: LoRA's, none added).

Writes bench.json, bench.csv and bench.png under --out-dir, and a table on stdout.
Examples:
  python -m bench
  python -m bench --quick --tp 1,2
  python -m bench --kind row --tp 2 --sp on --tokens 2048 --p 0.1
  python -m bench --multi only --tp 1,2
  python -m bench --dora only --quick
  python -m bench --tp 1,2,4 --dtype bf16 --backend triton --out-dir bench_out/h200
""".replace("{minutes}", DEFAULT_RUN_MINUTES)


def _csv(kind, what: str):
    def parse(s: str):
        try:
            return [kind(x.strip()) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from e

    return parse


def _onoff(s: str) -> bool:
    s = s.strip().lower()
    if s in ("on", "true", "1", "yes"):
        return True
    if s in ("off", "false", "0", "no"):
        return False
    raise ValueError(s)


def build_parser() -> argparse.ArgumentParser:
    """The command line (no heavy imports)."""
    ap = argparse.ArgumentParser(prog="python -m bench", description="Fused TP-LoRA benchmark: frozen base vs "
                                 "unfused reference vs PEFT's own layer vs fused, per tensor-parallel mode.",
                                 epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("matrix")
    g.add_argument("--tp", type=_csv(int, "integers"), default=[1, 2, 4], help="TP sizes (default 1,2,4)")
    g.add_argument("--kind", type=_csv(str, "kinds"), default=["column", "row"], help="column,row (default both)")
    g.add_argument("--sp", type=_csv(_onoff, "on/off values"), default=[False, True],
                   help="sequence parallelism off,on (default both; skipped at TP 1)")
    g.add_argument("--tokens", type=int, help="T, tokens per batch (CPU 1024, CUDA 8192)")
    g.add_argument("--in", dest="d_in", type=int, help="K, the layer's full input features (CPU 1024, CUDA 4096)")
    g.add_argument("--out", dest="d_out", type=int, help="N, the layer's full output features (CPU 1024, "
                   "CUDA 4096). The output DIRECTORY is --out-dir")
    g.add_argument("--r", type=int, help="LoRA rank (16)")
    g.add_argument("--p", type=_csv(float, "numbers"), help="dropout probabilities, comma-separated (0,0.1)")
    g.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="activation dtype (auto: fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--multi", choices=["off", "on", "only"], default=DEFAULT_MULTI,
                   help=f"the multi-adapter cases, one per TP size and mode: --adapters adapters of rank --r in one "
                   f"batch, one fused call with the mix against one call per adapter, at the largest --p "
                   f"(default {DEFAULT_MULTI})")
    g.add_argument("--adapters", type=int, default=4, help="adapters in a multi-adapter case (4)")
    g.add_argument("--dora", choices=["off", "on", "only"], default=DEFAULT_DORA,
                   help=f"the DoRA cases, one per TP size, mode and --p: the fused LoRA and DoRA calls against PEFT's "
                   f"DoRA structure per rank (default {DEFAULT_DORA})")
    g.add_argument("--quick", action="store_true", help="tiny smoke config: T=K=N=64, r=8, p=0.1, 1 warm-up, "
                   "3 reps (explicit options still win); too small for its times to mean anything")
    r = ap.add_argument_group("run")
    r.add_argument("--backend", choices=["auto", "triton", "cublas", "interpret", "torch"], default="auto",
                   help="the fused path's backend (auto: the package's choice, triton or cublas on CUDA, torch "
                   "on CPU; interpret = Triton kernels on CPU, tiny shapes only)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--gpus", type=int, help="GPUs to use on CUDA (default: all); TP sizes above it are emulated")
    r.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1: steady when ranks share "
                   "cores with each other or with other work; 0 = cores // TP)")
    r.add_argument("--warmup", type=int, help="untimed repetitions (CPU 2)")
    r.add_argument("--reps", type=int, help="timed repetitions (CPU 12); do_bench on one GPU times itself")
    r.add_argument("--ref-dropout", choices=["bernoulli", "philox"], default="bernoulli",
                   help="reference dropout: nn.Dropout as PEFT runs it, or the package's Philox mask")
    r.add_argument("--lora-dtype", choices=["act", "fp32", "fp16", "bf16"], default="act",
                   help="the fused path's LoRA weight dtype (act = the activation dtype, the modules' default); "
                   "the reference and PEFT's layer always keep PEFT's fp32")
    r.add_argument("--no-peft", action="store_true", help="skip PEFT's own LoraParallelLinear")
    r.add_argument("--out-dir", "-o", type=Path, default=Path("bench_out"), help="results directory (bench_out)")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or per-case lines")
    r.add_argument("--list", action="store_true", help="print the cases and exit")
    return ap


# (option, attribute, least value): every count the bench takes, checked before any rank starts.
_MINIMA = (("--tokens", "tokens", 1), ("--in", "d_in", 1), ("--out", "d_out", 1), ("--r", "r", 1),
           ("--threads", "threads", 0), ("--warmup", "warmup", 0), ("--reps", "reps", 1), ("--gpus", "gpus", 1),
           ("--adapters", "adapters", 2))


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with argparse's one-line usage error (exit status 2), values no case could run with."""
    for opt, attr, least in _MINIMA:
        v = getattr(args, attr)
        if v is not None and v < least:
            ap.error(f"{opt} must be >= {least}, got {v}")
    for opt, vals in (("--tp", args.tp), ("--kind", args.kind), ("--sp", args.sp), ("--p", args.p)):
        if vals is not None and not vals:
            ap.error(f"{opt} needs at least one value")
    if bad := [t for t in args.tp if t < 1]:
        ap.error(f"--tp must be >= 1, got {bad[0]}")
    if bad := [k for k in args.kind if k not in ("column", "row")]:
        ap.error(f"--kind must be column and/or row, got {bad[0]!r}")
    if bad := [p for p in args.p or () if not 0.0 <= p < 1.0]:
        ap.error(f"--p must be in [0, 1), got {bad[0]:g}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (no heavy imports happen before this returns)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def _resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, dict]:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and args.backend not in ("interpret", "torch") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if device == "cpu" and args.backend in ("triton", "cublas"):
        ap.error(f"--backend {args.backend} needs CUDA; on CPU use torch or interpret")
    vals = dict(_CUDA_DEFAULTS if device == "cuda" else _CPU_DEFAULTS)
    if args.quick:
        vals.update(_QUICK)
    for k in ("tokens", "d_in", "d_out", "r", "p", "warmup", "reps"):
        v = getattr(args, k)
        if v is not None:
            vals[k] = v
    if args.dtype != "auto":
        vals["dtype"] = args.dtype
    if isinstance(vals["p"], str):
        vals["p"] = [float(x) for x in vals["p"].split(",")]
    return device, vals


class _Progress:
    """A tqdm bar on a terminal (fed by rank 0); otherwise one plain line per finished case, no ``\\r``."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        self.t0 = time.perf_counter()
        if enabled and sys.stdout.isatty() and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def __call__(self, kind: str, idx: int, label: str, payload) -> None:
        if not self.enabled:
            return
        if kind == "done":
            self.done += 1
        if self.bar is not None:
            self.bar.set_description(label)
            if kind == "done":
                self.bar.update(1)
            else:
                self.bar.set_postfix_str(str(payload))
        elif kind == "done":
            print(f"[{self.done}/{self.total}] {label} done ({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run the bench; returns the process exit code (0 even when a target is missed)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.backend == "interpret":
        # Must precede the first triton import (here and, inherited, in every spawned rank).
        os.environ["TRITON_INTERPRET"] = "1"
    from . import report
    from .cases import matrix
    from .runner import RunConfig, run_cases

    device, v = _resolve(ap, args)
    import torch

    gpus = (args.gpus if args.gpus is not None else torch.cuda.device_count()) if device == "cuda" else 0
    cases = []
    sets = {"off": [(1, v["p"], False)], "on": [(1, v["p"], False), (args.adapters, [max(v["p"])], False)],
            "only": [(args.adapters, [max(v["p"])], False)]}[args.multi]
    if args.dora == "only":
        sets = [s for s in sets if s[0] > 1]
    if args.dora != "off":
        sets.append((1, v["p"], True))
    try:
        for tp in args.tp:
            emulate = device == "cuda" and tp > max(gpus, 1)
            for adapters, ps, dora in sets:
                cases += matrix(kinds=args.kind, tps=[tp], sps=args.sp, tokens=v["tokens"], d_in=v["d_in"],
                                d_out=v["d_out"], r=v["r"], ps=ps, dtype=v["dtype"], emulate=emulate,
                                adapters=adapters, dora=dora)
    except ValueError as e:  # a shape that does not shard (Case says which)
        ap.error(str(e))
    if not cases:
        ap.error("no cases to run (SP needs TP > 1, and an emulated TP size has no SP)")
    if args.list:
        for c in cases:
            print(c.label, "(emulated)" if c.emulated else "")
        return 0
    cfg = RunConfig(device=device, backend=args.backend, warmup=v["warmup"], reps=v["reps"],
                    ref_dropout=args.ref_dropout, lora_dtype=None if args.lora_dtype == "act" else args.lora_dtype,
                    gpus=gpus, threads=args.threads, peft=not args.no_peft)
    started = datetime.now(timezone.utc)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    progress = _Progress(len(cases), not args.no_progress)
    info: dict = {}
    try:
        records = run_cases(cases, cfg, progress, info)
    finally:
        progress.close()
    wall = time.perf_counter() - t0
    report.derive(records)
    tgt = report.judge(records)
    meta = report.collect_meta()
    # Other work on the machine skews CPU timings: the 1-minute load average before and after.
    meta["machine"]["loadavg_1m"] = [None if load0 is None else round(load0[0], 2),
                                     round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None]
    meta.update({"started_utc": started.isoformat(timespec="seconds"), "wall_s": round(wall, 1),
                 "argv": sys.argv[1:] if argv is None else list(argv), "device": device,
                 "backend": sorted({r["backend"] for r in records}), "config": {**vars(cfg), **{
                     k: v[k] for k in ("tokens", "d_in", "d_out", "r", "p", "dtype")}, "multi": args.multi,
                     "adapters": args.adapters, "dora": args.dora}})
    if device == "cuda":
        meta["gemm_decisions"] = info.get("gemm_decisions", {})
    files = report.write(args.out_dir, meta, records, tgt, plot_png=not args.no_plot)
    print(report.render(meta, records, tgt, started=started, wall=wall, files=files, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
