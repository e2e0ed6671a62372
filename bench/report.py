"""Results, in four steps: derive, judge, render, write (``python -m bench`` calls them in that order).

1. Deriving (``derive``): ratios between contenders of the same case, on medians:
   ``overhead_pct`` of LoRA over the frozen base, ``t / t_base - 1``; the fused path's
   ``speedup_vs_reference`` and ``speedup_vs_peft``, ``t_other / t_fused``; in a multi-adapter
   case, the mixed call's ``speedup_vs_sequential``, ``t_sequential / t_mixed``; in a DoRA case,
   ``dora_over_{lora,peft_dora}``, ``t_dora / t_other``, DoRA's saved bytes and collectives beyond
   LoRA's.
2. Judging (``judge``): the targets a run can judge: the structural targets (no added
   collective, nothing saved beyond x, u and the seed; DoRA: LoRA's collectives, at most one
   output more saved, ``judge_dora``) anywhere, the GPU speed targets (``GPU_TARGETS``) only on a
   run of GPU kernels; a CPU run reports its times for information, with what they mean
   (``CPU_TIMES_MEAN``).
3. Rendering (``render``, from the ``format_*`` parts): the text ``python -m bench`` prints: a
   header, the table and its legend, the multi-adapter cases, the DoRA cases, the backends, the
   verdicts.
4. Writing (``write``): ``bench.json`` (with ``collect_meta``'s machine, versions and commit),
   ``bench.csv`` and the ``bench.png`` plot.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from .cases import DESCRIBE, ELEM, Case

__all__ = ["CPU_TIMES_MEAN", "GPU_TARGETS", "collect_meta", "derive", "dora_collective_extra", "dora_saved_bound",
           "format_backends", "format_dora", "format_legend", "format_multi", "format_table", "format_targets", "judge",
           "judge_dora", "plot", "plot_title", "render", "write", "write_csv", "write_json"]

_PHASES = ("fwd", "fwd_bwd")
_MIB = 1 << 20
# The speed targets, judged on a GPU: fused fwd+bwd at most this many times the frozen base
# layer's, and the unfused reference at least this many times slower than fused.
GPU_TARGETS = {"overhead": 1.05, "speedup": 1.45}
SAVED_RATIO_MAX = 0.5
_STAND_INS = ("torch", "interpret")  # backends that run the fused math without GPU kernels


# ---------------------------------------------------------------------------------------------
# 1. Deriving: ratios between the contenders of a case
# ---------------------------------------------------------------------------------------------
def _by_case(records: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in records:
        out[r["label"]][r["contender"]] = r
    return out


def _coll_total(rec: dict, phase: str | None = None) -> int | None:
    c = rec.get("collectives", {})
    if not c.get("measured"):
        return None
    if phase is not None:
        return c[phase]["count"]
    return c["fwd"]["count"] + c["bwd"]["count"]


def _median(rec: dict, ph: str) -> float:
    return rec[f"{ph}_ms"]["median"]


# The contenders each fused contender is compared with (the first: also its saved-bytes ratio).
_VERSUS = {"fused": ("reference", "peft"), "mixed": ("sequential",), "dora": ("lora", "peft_dora")}


def derive(records: list[dict]) -> list[dict]:
    """Add per-case ratios to every record, in place, and return the list.

    Adds ``overhead_pct_{fwd,fwd_bwd}`` (LoRA contenders, over base), the fused path's
    ``speedup_vs_{reference,peft}_{fwd,fwd_bwd}`` (``t_other / t_fused``) and
    ``saved_ratio_vs_reference``, the mixed call's ``speedup_vs_sequential_{fwd,fwd_bwd}``
    (``t_sequential / t_mixed``) and ``saved_ratio_vs_sequential``, and
    ``lora_collectives_{fwd,bwd}`` (collectives beyond the base's; None when not measured).

    Example:
        >>> derive([])
        []
    """
    for group in _by_case(records).values():
        base = group.get("base")
        for name, rec in group.items():
            for ph in _PHASES:
                t = _median(rec, ph)
                if name != "base" and base:
                    tb = _median(base, ph)
                    rec[f"overhead_pct_{ph}"] = 100.0 * (t / tb - 1.0) if tb > 0 else None
                for other in _VERSUS.get(name, ()):
                    if other in group:
                        rec[f"speedup_vs_{other}_{ph}"] = _median(group[other], ph) / t if t > 0 else None
            other = _VERSUS.get(name, ("",))[0]
            if other in group:
                rs = group[other]["saved_bytes"]
                rec[f"saved_ratio_vs_{other}"] = rec["saved_bytes"] / rs if rs else None
            if name != "base" and base:
                for ph in ("fwd", "bwd"):
                    a, b = _coll_total(rec, ph), _coll_total(base, ph)
                    rec[f"lora_collectives_{ph}"] = None if a is None or b is None else a - b
            if name == "dora":
                _derive_dora(rec, group)
    return records


def _output_bytes(case: dict) -> int:
    """Bytes of one output of the case's layer on a rank: ``rows_out × n`` elements of the activation dtype."""
    loc = Case(**case).local
    return loc["rows_out"] * loc["n"] * ELEM[case["dtype"]]


def _derive_dora(rec: dict, group: dict) -> None:
    """A DoRA record's ratios: ``dora_over_{lora,peft_dora}_{fwd,fwd_bwd}`` (``t_dora / t_other``), the saved
    bytes beyond LoRA's (``saved_extra_vs_lora``) against one output's (``output_bytes``), and the collectives
    beyond LoRA's per phase (``collectives_vs_lora_{fwd,bwd}``: count and bytes)."""
    for other in ("lora", "peft_dora"):
        if other in group:
            for ph in _PHASES:
                t = _median(group[other], ph)
                rec[f"dora_over_{other}_{ph}"] = _median(rec, ph) / t if t > 0 else None
    lora = group.get("lora")
    if lora is None:
        return
    rec["saved_extra_vs_lora"] = rec["saved_bytes"] - lora["saved_bytes"]
    rec["output_bytes"] = _output_bytes(rec["case"])
    for ph in ("fwd", "bwd"):
        a, b = rec.get("collectives", {}), lora.get("collectives", {})
        rec[f"collectives_vs_lora_{ph}"] = None if not (a.get("measured") and b.get("measured")) else {
            "count": a[ph]["count"] - b[ph]["count"], "bytes": a[ph]["bytes"] - b[ph]["bytes"]}


# ---------------------------------------------------------------------------------------------
# 2. Judging: the targets this run can judge
# ---------------------------------------------------------------------------------------------
def _saved_bound(case: dict) -> int:
    """The most the fused design may save: its input x, one T×r u (fp32 at most) and the seed."""
    loc = Case(**case).local
    return loc["rows_in"] * loc["k"] * ELEM[case["dtype"]] + case["tokens"] * case["r"] * 4 + 64


def _spread(vals: list[float]) -> dict:
    return {"min": min(vals), "max": max(vals), "geomean": math.exp(sum(map(math.log, vals)) / len(vals)),
            "cases": len(vals)}


def judge(records: list[dict]) -> dict:
    """Judge the targets that ``records`` can judge; say why for the others.

    Structural targets hold on any device: the fused LoRA adds no collective where the unfused
    contenders add one (t > 1); it saves only x, u and the seed. The issue's saved ratio (at most
    half the reference's at p > 0) is judged with 16-bit activations only (see ``why_not``). The
    speed targets (``GPU_TARGETS``) are judged only when the fused path ran GPU kernels (CUDA,
    not the torch or interpreter backend); otherwise ``cpu_times`` holds the ratios, for
    information.

    Returns:
        ``{name: {"target", "judged", "met", "why_not", "rows"}}`` for ``collectives``,
        ``saved``, ``saved_ratio``, ``gpu_overhead`` and ``gpu_speedup``, plus ``cpu_times``
        (per TP size: spreads of fused/base, reference/fused and peft/fused, fwd+bwd medians);
        and for the DoRA cases (``judge_dora``) ``dora_collectives``, ``dora_saved`` and
        ``dora_times``. ``met`` is None when nothing was judged.

    Example:
        >>> t = judge([])
        >>> t["gpu_speedup"]["judged"], t["collectives"]["met"]
        (False, None)
    """
    coll_rows, saved_rows, ratio_rows, over_rows, speed_rows = [], [], [], [], []
    per_tp: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    fused_runs, dtypes = set(), set()
    for label, group in _by_case(records).items():
        fused, base, ref = group.get("fused"), group.get("base"), group.get("reference")
        if fused is None or base is None or ref is None:
            continue
        case = fused["case"]
        fused_runs.add((fused["device"], fused["backend"]))
        dtypes.add(case["dtype"])
        extra = {n: (r["lora_collectives_fwd"], r["lora_collectives_bwd"]) for n, r in group.items()
                 if n != "base" and r.get("lora_collectives_fwd") is not None}
        if case["tp"] > 1 and "fused" in extra:
            # Per phase: the fused path adds none; the unfused ones add one wherever LoRA needs a
            # reduction of its own (column bwd, row fwd; both phases under SP).
            coll_rows.append({"case": label, "extra": extra,
                              "ok": extra["fused"] == (0, 0) and all(max(v) >= 1 for n, v in extra.items()
                                                                     if n != "fused")})
        bound = _saved_bound(case)
        saved_rows.append({"case": label, "fused_bytes": fused["saved_bytes"], "bound_bytes": bound,
                           "ok": fused["saved_bytes"] <= bound})
        if case["p"] > 0 and fused.get("saved_ratio_vs_reference") is not None:
            ratio_rows.append({"case": label, "ratio": fused["saved_ratio_vs_reference"],
                               "ok": fused["saved_ratio_vs_reference"] <= SAVED_RATIO_MAX})
        t_f, t_b, t_r = _median(fused, "fwd_bwd"), _median(base, "fwd_bwd"), _median(ref, "fwd_bwd")
        over_rows.append({"case": label, "ratio": t_f / t_b, "ok": t_f / t_b <= GPU_TARGETS["overhead"]})
        speed_rows.append({"case": label, "ratio": t_r / t_f, "ok": t_r / t_f >= GPU_TARGETS["speedup"]})
        times = per_tp[case["tp"]]
        times["fused/base"].append(t_f / t_b)
        times["reference/fused"].append(t_r / t_f)
        if "peft" in group:
            times["peft/fused"].append(_median(group["peft"], "fwd_bwd") / t_f)

    # The targets are for the GPU kernels: a CUDA device with a backend other than the torch /
    # interpreter stand-ins (auto picks triton or cublas per layer shape).
    on_gpu = bool(fused_runs) and all(d != "cpu" and b not in _STAND_INS for d, b in fused_runs)
    gpu_why = None if on_gpu else (
        "the fused path ran " + ", ".join(f"the {b} backend on {d}" for d, b in sorted(fused_runs) or [("-", "no")])
        + ", not GPU kernels")
    wide = dtypes and dtypes <= {"fp16", "bf16"}
    ratio_why = None if wide else (
        "activations were fp32: PEFT's fp32 upcast then copies nothing, and the reference keeps only its "
        "dropout mask and the dropped copy of x beyond the fused path's x (nn.Dropout's mask is a 4-byte "
        "float on CPU, a 1-byte bool on CUDA), so <= 50% is out of any design's reach; judged in fp16/bf16")

    def target(text, rows, why=None):
        judged = why is None and bool(rows)
        return {"target": text, "judged": judged, "met": all(r["ok"] for r in rows) if judged else None,
                "why_not": why if why or rows else "nothing measured", "rows": rows}

    return {
        "collectives": target("fused LoRA adds 0 collectives in every (mode, phase) at t > 1, where the unfused "
                              "reference and PEFT's layer add 1", coll_rows),
        "saved": target("fused saves only x, u (T×r) and the seed: no dropout mask, no dropped copy, no fp32 "
                        "copy of x", saved_rows),
        "saved_ratio": target(f"fused saved activations <= {SAVED_RATIO_MAX:.0%} of the reference's at p > 0",
                              ratio_rows, ratio_why),
        "gpu_overhead": target(f"fused fwd+bwd <= {GPU_TARGETS['overhead']:.2f}x the frozen base layer "
                               "(every case)", over_rows, gpu_why),
        "gpu_speedup": target(f"fused fwd+bwd >= {GPU_TARGETS['speedup']:.2f}x faster than the unfused "
                              "reference, t_reference / t_fused (every case)", speed_rows, gpu_why),
        "cpu_times": {tp: {k: _spread(v) for k, v in d.items()} for tp, d in sorted(per_tp.items())},
        **judge_dora(records),
    }


def dora_collective_extra(case: dict) -> int:
    """Bytes a DoRA layer's forward collective carries beyond its LoRA twin's.

    Row-parallel: the LoRA part of the row norms, n values per block of the ``[z | u]`` buffer (t
    blocks under SP's reduce-scatter, one for the all-reduce), and with dropout the dropped product
    ``[T, n]`` (PEFT's form needs the base GEMM on the dropped x). Column-parallel: nothing (its
    norms are local); at TP 1 (or emulated) there is no collective. The collective runs in the
    activation dtype.

    Example:
        >>> dora_collective_extra({"kind": "row", "tp": 2, "sp": True, "tokens": 8, "d_in": 4, "d_out": 4, "r": 2,
        ...                        "p": 0.0, "dtype": "fp32", "emulated": False})
        32
    """
    if case["kind"] != "row" or case["tp"] == 1 or case["emulated"]:
        return 0  # no collective at all at TP 1 or on one emulating device
    loc = Case(**case).local
    blocks = case["tp"] if case["sp"] and not case["emulated"] else 1
    return (blocks * loc["n"] + (case["tokens"] * loc["n"] if case["p"] > 0 else 0)) * ELEM[case["dtype"]]


def dora_saved_bound(case: dict) -> int:
    """The most a DoRA layer may save beyond its LoRA twin: one output (the pre-scale y0 that dm needs) and
    the two fp32 row vectors ``g = m/‖·‖`` and ``1/‖·‖`` (``[n]`` each), in bytes."""
    return _output_bytes(case) + 2 * Case(**case).local["n"] * 4


def judge_dora(records: list[dict]) -> dict:
    """The DoRA cases' verdicts, on any device (they are structure), and their CPU time ratios.

    Returns:
        ``dora_collectives``: per DoRA case, the fused DoRA call runs its LoRA twin's collectives in
        number in each phase, its forward one ``dora_collective_extra`` bytes wider (rows carry the
        extra counts of ``dora`` and ``peft_dora`` over ``lora`` per phase); ``dora_saved``: DoRA saves
        at most ``dora_saved_bound`` beyond LoRA; ``dora_times``: per TP size, spreads of dora/lora and
        dora/peft_dora (fwd+bwd medians).

    Example:
        >>> judge_dora([])["dora_saved"]["met"] is None
        True
    """
    coll, saved = [], []
    per_tp: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, g in _by_case(records).items():
        dora, lora = g.get("dora"), g.get("lora")
        if dora is None or lora is None:
            continue
        case = dora["case"]
        if dora["collectives"].get("measured") and lora["collectives"].get("measured"):
            extra = {n: tuple(g[n]["collectives"][ph]["count"] - lora["collectives"][ph]["count"]
                              for ph in ("fwd", "bwd")) for n in ("dora", "peft_dora") if n in g}
            wider = tuple(dora["collectives"][ph]["bytes"] - lora["collectives"][ph]["bytes"] for ph in ("fwd", "bwd"))
            want = (dora_collective_extra(case), 0)
            coll.append({"case": label, "extra": extra, "wider_bytes": wider, "want_bytes": want,
                         "ok": extra["dora"] == (0, 0) and wider == want})
        bound = dora_saved_bound(case)
        saved.append({"case": label, "lora_bytes": lora["saved_bytes"], "dora_bytes": dora["saved_bytes"],
                      "extra_bytes": dora["saved_bytes"] - lora["saved_bytes"], "bound_bytes": bound,
                      "ok": dora["saved_bytes"] - lora["saved_bytes"] <= bound})
        for other in ("lora", "peft_dora"):
            if dora.get(f"dora_over_{other}_fwd_bwd") is not None:
                per_tp[case["tp"]][f"dora/{other}"].append(dora[f"dora_over_{other}_fwd_bwd"])

    def target(text, rows):
        return {"target": text, "judged": bool(rows), "met": all(r["ok"] for r in rows) if rows else None,
                "why_not": None if rows else "no DoRA case ran", "rows": rows}

    return {
        "dora_collectives": target("DoRA adds 0 collectives per micro-batch over LoRA in every (mode, phase); a row "
                                   "layer's forward collective is n values per block wider (+ T×n with dropout)", coll),
        "dora_saved": target("DoRA saves at most LoRA's bytes + one output-sized tensor (y0) + two fp32 [n] row "
                             "vectors (1/norm; at row p=0 the norm values riding the buffer y0 views)", saved),
        "dora_times": {tp: {k: _spread(v) for k, v in d.items()} for tp, d in sorted(per_tp.items())},
    }


# ---------------------------------------------------------------------------------------------
# 3. Rendering: the text python -m bench prints
# ---------------------------------------------------------------------------------------------
def _ms(t: dict) -> str:
    return f"{t['median']:8.3f} [{t['p20']:.3f}, {t['p80']:.3f}]"


def _pct(v) -> str:
    return "" if v is None else f"{v:+.1f}"


def _pair(rec: dict, key: str, fmt) -> str:
    a, b = rec.get(f"{key}_fwd"), rec.get(f"{key}_fwd_bwd")
    return "" if a is None or b is None else f"{fmt(a)}/{fmt(b)}"


def _coll(rec: dict) -> str:
    c = rec.get("collectives", {})
    if not c.get("measured"):
        return "not measured"
    mib = (c["fwd"]["bytes"] + c["bwd"]["bytes"]) / _MIB
    flag = "" if c.get("count_check") == "ok" else " (!c10d)"
    return f"{c['fwd']['count']}+{c['bwd']['count']} {mib:7.2f}{flag}"


def format_table(records: list[dict]) -> str:
    """The stdout table: one row per (case, contender), ratios on the LoRA rows (``format_legend`` explains).

    Example:
        >>> format_table([]).splitlines()[0].split()[0]
        'case'
    """
    def x(v):
        return f"{v:.2f}x"

    head = (f"{'case':<24} {'contender':<9} {'fwd ms [p20, p80]':>26} {'fwd+bwd ms [p20, p80]':>27} "
            f"{'ovh% f/fb':>13} {'vs ref f/fb':>12} {'vs peft f/fb':>12} {'coll f+b   MiB':>15} "
            f"{'saved MiB':>9} {'peak MiB':>8} {'GFLOP/s':>8}")
    lines = [head, "-" * len(head)]
    last = None
    for r in records:
        label = r["label"] if r["label"] != last else ""
        last = r["label"]
        ovh = "" if r["contender"] == "base" else _pair(r, "overhead_pct", _pct)
        gf = r.get("tflops_fwd_bwd")
        lines.append(f"{label:<24} {r['contender']:<9} {_ms(r['fwd_ms']):>26} {_ms(r['fwd_bwd_ms']):>27} "
                     f"{ovh:>13} {_pair(r, 'speedup_vs_reference', x):>12} {_pair(r, 'speedup_vs_peft', x):>12} "
                     f"{_coll(r):>15} {r['saved_bytes'] / _MIB:9.2f} {r['peak_bytes'] / _MIB:8.2f} "
                     f"{'' if gf is None else f'{gf * 1e3:8.1f}':>8}")
    return "\n".join(lines)


_LEGEND = """\
  ovh% f/fb       time over the base layer's, in %: forward / forward+backward
  vs ref f/fb     fused rows: t_reference / t_fused, forward / forward+backward (> 1: fused is faster)
  vs peft f/fb    fused rows: t_peft / t_fused, likewise
  fwd ms          forward time in ms: the median over the timed repetitions [20th, 80th percentile];
  fwd+bwd ms      forward + backward (x's gradient and the LoRA factors'; W is frozen). With several
                  ranks a repetition counts as long as its slowest rank
  coll f+b MiB    collectives in one pass: forward count + backward count, and their buffers' total MiB
                  (!c10d: torch.profiler's count of c10d calls disagrees with the wrapper's)
  saved MiB       activations autograd keeps from forward for backward (weights excluded)
  peak MiB        peak memory of one forward+backward above what was live before it
  GFLOP/s         model FLOPs of forward+backward per rank / the median time"""


def format_legend(records: list[dict]) -> str:
    """What the table's contenders and columns mean, and where ``peft`` did not run and why.

    Example:
        >>> format_legend([]).splitlines()[0]
        'Legend:'
    """
    present = {r["contender"] for r in records}
    lines = ["Legend:"] + [f"  {n:<15} {d}" for n, d in DESCRIBE.items() if n in present or not records] + [_LEGEND]
    skipped: dict[str, list[str]] = defaultdict(list)
    for label, group in _by_case(records).items():
        why = next(iter(group.values())).get("peft_skipped")
        if why and "peft" not in group:
            skipped[why].append(label)
    for why, labels in skipped.items():
        lines.append(f"  peft not run in {len(labels)} case(s) ({', '.join(labels)}): {why}")
    return "\n".join(lines)


def _coll_short(rec: dict) -> str:
    c = rec.get("collectives", {})
    if not c.get("measured"):
        return "not measured"
    return f"{c['fwd']['count']}+{c['bwd']['count']} ({(c['fwd']['bytes'] + c['bwd']['bytes']) / _MIB:.2f})"


MULTI_MEANS = """\
  mixed runs one n·r-wide LoRA (the other adapters' columns gated to 0) and one per-row dropout mask over
  the whole batch, with the base layer's collectives once; sequential runs n single-adapter calls on 1/n
  of the rows each: n times the collectives (each 1/n the size) and n times every per-call cost."""


def format_multi(records: list[dict]) -> str:
    """The multi-adapter cases: mixed against sequential (fwd+bwd medians, their ratio, collectives, saved bytes).

    Returns "" when no multi-adapter case ran.

    Example:
        >>> format_multi([])
        ''
    """
    rows = []
    for label, group in _by_case(records).items():
        m, q, b = group.get("mixed"), group.get("sequential"), group.get("base")
        if m is None or q is None or b is None:
            continue
        ratio = _pair(m, "speedup_vs_sequential", lambda v: f"{v:.2f}x")
        rows.append(f"  {label:<34} {_median(b, 'fwd_bwd'):9.3f} {_median(m, 'fwd_bwd'):9.3f} "
                    f"{_median(q, 'fwd_bwd'):9.3f} {ratio:>13}  {_coll_short(m):>14} {_coll_short(q):>14} "
                    f"{m['saved_bytes'] / _MIB:8.2f} {q['saved_bytes'] / _MIB:8.2f}  {m['backend']}/{q['backend']}")
    if not rows:
        return ""
    head = (f"  {'case':<34} {'base ms':>9} {'mixed ms':>9} {'seq ms':>9} {'seq/mix f/fb':>13}  "
            f"{'coll mixed':>14} {'coll seq':>14} {'saved mx':>8} {'saved sq':>8}  backend mixed/seq")
    return "\n".join(["Multi-adapter cases (fwd+bwd medians; seq/mix > 1: the mixed call is faster; collectives "
                      "f+b count (MiB); saved MiB)", head, *rows, MULTI_MEANS])


def format_dora(records: list[dict], tgt: dict) -> str:
    """The DoRA cases: fwd+bwd medians, dora/lora and dora/peft_dora, collectives, saved bytes, and the verdicts.

    Returns "" when no DoRA case ran.

    Example:
        >>> format_dora([], judge_dora([]))
        ''
    """
    rows = []
    for label, g in _by_case(records).items():
        b, lo, d, pd = (g.get(n) for n in ("base", "lora", "dora", "peft_dora"))
        if lo is None or d is None or b is None or pd is None:
            continue
        rows.append(f"  {label:<30} {_median(b, 'fwd_bwd'):8.3f} {_median(lo, 'fwd_bwd'):8.3f} "
                    f"{_median(d, 'fwd_bwd'):8.3f} {_median(pd, 'fwd_bwd'):9.3f} {d['dora_over_lora_fwd_bwd']:10.2f} "
                    f"{d['dora_over_peft_dora_fwd_bwd']:10.2f}  {_coll_short(lo):>13} {_coll_short(d):>13} "
                    f"{_coll_short(pd):>13}  {lo['saved_bytes']:>9} {d['saved_bytes']:>9} {pd['saved_bytes']:>9}")
    if not rows:
        return ""
    head = (f"  {'case':<30} {'base ms':>8} {'lora ms':>8} {'dora ms':>8} {'peft_dora':>9} {'dora/lora':>10} "
            f"{'dora/peft':>10}  {'coll lora':>13} {'coll dora':>13} {'coll peft_d':>13}  {'saved lo':>9} "
            f"{'saved do':>9} {'saved pd':>9}")
    word = {True: "MET", False: "MISSED", None: "not judged"}
    lines = ["DoRA cases (fwd+bwd medians in ms; dora/lora, dora/peft_dora: time ratios, < 1: DoRA faster; "
             "collectives f+b count (MiB); saved bytes)", head, *rows]
    for name in ("dora_collectives", "dora_saved"):
        t = tgt[name]
        lines.append(f"  [{word[t['met']]}] {t['target']}")
        for r in t["rows"]:
            if not r["ok"]:
                lines.append(f"      {r['case']}: " + ", ".join(f"{k} {v}" for k, v in r.items()
                                                                if k not in ("case", "ok")))
    if tgt["dora_collectives"]["rows"]:
        adds = sorted({f"{r['case'].removesuffix(' dora')} {r['extra'].get('peft_dora')}" for r in
                       tgt["dora_collectives"]["rows"]})
        lines.append("      peft_dora's extra (fwd, bwd) collectives over lora: " + "; ".join(adds))
    if tgt["dora_saved"]["rows"]:
        worst = max(tgt["dora_saved"]["rows"], key=lambda r: r["extra_bytes"] / r["bound_bytes"])
        lines.append(f"      closest: {worst['case']} saves {worst['extra_bytes']} B beyond LoRA, at most "
                     f"{worst['bound_bytes']} B")
    for tp, d in tgt["dora_times"].items():
        lines.append(f"  tp={tp}: " + "; ".join(f"{k} {_range(v)}" for k, v in d.items()))
    return "\n".join(lines)


def format_backends(meta: dict, records: list[dict]) -> str:
    """Which backend the LoRA contenders ran on, per case, and (CUDA, ``auto``) ``ops.select``'s choices.

    Example:
        >>> format_backends({}, [{"label": "c", "contender": "fused", "backend": "torch"}])
        'Backend that ran: torch in every case'
    """
    ran: dict[str, set] = defaultdict(set)
    for r in records:
        if r["contender"] in _VERSUS or r["contender"] in ("sequential", "lora"):
            ran[r["label"]].add(r["backend"])
    kinds = {b for v in ran.values() for b in v}
    if len(kinds) == 1:
        lines = [f"Backend that ran: {kinds.pop()} in every case"]
    else:
        lines = ["Backend that ran, per case:"] + [f"  {label}: {', '.join(sorted(v))}" for label, v in ran.items()]
    decisions = meta.get("gemm_decisions")
    if decisions:
        lines.append("GEMM path chosen per layer shape (tplora_kernels.ops.select, backend auto; median s of "
                     "linear_fwd + linear_dx):")
        for world, dec in decisions.items():
            for key, d in dec.items():
                times = ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in d.get("seconds", {}).items())
                lines.append(f"  {world} {key}: {d['choice']}" + (f" ({times})" if times else ""))
    elif meta.get("device") == "cuda":
        lines.append("GEMM path: no ops.select decision (an explicit --backend, or TPLORA_GEMM set)")
    return "\n".join(lines)


CPU_TIMES_MEAN = """\
  What CPU times mean: on CPU the fused path runs the `torch` backend, which regenerates the dropout
  mask from (seed, row, column) with Philox rounds in elementwise torch ops, in forward and again in
  backward, where the unfused contenders draw one bernoulli_ mask and store it. One core's GEMMs and
  gloo over loopback TCP make up the rest. CPU ratios therefore show the structure (collectives,
  saved bytes, passes over x), not GPU speed: the speed targets are judged on a GPU."""


def _range(s: dict) -> str:
    if s["cases"] == 1:
        return f"{s['min']:.2f}"
    return f"{s['min']:.2f}-{s['max']:.2f} (geomean {s['geomean']:.2f})"


def format_targets(t: dict) -> str:
    """The verdicts a reader should take from this run, with their numbers; the rest, with the reason.

    Example:
        >>> "GPU speed targets" in format_targets(judge([]))
        True
    """
    word = {True: "MET", False: "MISSED"}

    def head(name: str) -> str:
        tg = t[name]
        tag = word[tg["met"]] if tg["judged"] else "not judged here"
        return f"[{tag}] {tg['target']}"

    lines = ["Verdicts (structure: the same on any device)"]
    c = t["collectives"]
    lines.append("  " + head("collectives"))
    for r in c["rows"]:
        if not r["ok"]:
            lines.append(f"      {r['case']}: extra collectives (fwd, bwd) {r['extra']}")
    if c["rows"]:
        adds: dict[str, set] = defaultdict(set)
        for r in c["rows"]:
            mode = r["case"].split(" tp=")[0] + " sp=" + r["case"].split("sp=")[1].split()[0]
            for name, v in r["extra"].items():
                if name != "fused":
                    adds[name].add(f"{mode} {v}")
        lines.append(f"      {sum(r['ok'] for r in c['rows'])}/{len(c['rows'])} cases; fused adds (0, 0). Extra "
                     "(fwd, bwd) of " + "; of ".join(f"{n}: {', '.join(sorted(v))}" for n, v in sorted(adds.items())))
    s = t["saved"]
    lines.append("  " + head("saved"))
    if s["rows"]:
        worst = max(s["rows"], key=lambda r: r["fused_bytes"] / r["bound_bytes"])
        lines.append(f"      {sum(r['ok'] for r in s['rows'])}/{len(s['rows'])} cases; closest: {worst['case']} saves "
                     f"{worst['fused_bytes']} B of at most {worst['bound_bytes']} B")
    sr = t["saved_ratio"]
    lines.append("  " + head("saved_ratio"))
    if sr["rows"]:
        vals = [r["ratio"] for r in sr["rows"]]
        lines.append(f"      fused / reference: {min(vals):.3f}-{max(vals):.3f} over {len(vals)} cases")
    if not sr["judged"] and sr["why_not"]:
        lines.append(f"      not judged: {sr['why_not']}")
    lines.append("GPU speed targets (judged only when the fused path runs GPU kernels)")
    for name in ("gpu_overhead", "gpu_speedup"):
        g = t[name]
        lines.append("  " + head(name))
        if g["judged"] and g["rows"]:
            pick = max if name == "gpu_overhead" else min
            worst = pick(g["rows"], key=lambda r: r["ratio"])
            lines.append(f"      {sum(r['ok'] for r in g['rows'])}/{len(g['rows'])} cases; worst {worst['ratio']:.3f} "
                         f"({worst['case']})")
    why = t["gpu_overhead"]["why_not"]
    if why:
        lines.append(f"  Not judged: {why}.")
        if "torch" in why:
            lines.append(CPU_TIMES_MEAN)
    if t["cpu_times"] and not t["gpu_overhead"]["judged"]:
        lines.append("  Times of this run, for information (fwd+bwd medians, per TP size):")
        for tp, d in t["cpu_times"].items():
            parts = [f"{k} {_range(v)}" for k, v in d.items()]
            lines.append(f"      tp={tp}: " + "; ".join(parts))
    return "\n".join(lines)


def render(meta: dict, records: list[dict], tgt: dict, *, started: datetime, wall: float, files: list[Path],
           quick: bool = False) -> str:
    """Everything ``python -m bench`` prints after a run, in order.

    Args:
        meta: the run's metadata (``collect_meta`` plus the run's ``device``, ``backend``,
            ``config`` and the load average).
        records: the derived records.
        tgt: ``judge``'s verdicts.
        started: when the run began (UTC).
        wall: the run's wall time in seconds.
        files: what ``write`` wrote.
        quick: a ``--quick`` smoke run (says its times mean nothing).

    Returns:
        The text: a header line, a load warning where other work shared the CPU, the table, the
        multi-adapter cases, the backends, the legend, the verdicts and the files written.
    """
    c, m, git = meta["config"], meta["machine"], meta["git"]
    lines = [f"tplora bench  {started:%Y-%m-%d %H:%M} UTC  device={meta['device']} backend={','.join(meta['backend'])} "
             f"dtype={c['dtype']} T={c['tokens']} K={c['d_in']} N={c['d_out']} r={c['r']}  "
             f"commit={(git['commit'] or '?')[:10]}{'+dirty' if git['dirty'] else ''}  wall {wall:.0f}s  "
             f"load {m['loadavg_1m']}"]
    cores = m["cores"] or 1
    if meta["device"] == "cpu" and max((x for x in m["loadavg_1m"] if x is not None), default=0) > cores:
        lines.append(f"WARNING: the load average exceeded the {cores} cores during the run: other work shared the "
                     "CPU, so the times below are inflated and noisy (ratios between contenders of a case hold up "
                     "best).")
    lines.append(format_table(records))
    if multi := format_multi(records):
        lines.append(multi)
    if dora := format_dora(records, tgt):
        lines.append(dora)
    lines += [format_backends(meta, records), format_legend(records), ""]
    if any(r["contender"] == "fused" for r in records):
        lines.append(format_targets(tgt))
    elif not dora:
        lines.append("Verdicts: none; they judge the single-adapter cases, and --multi only ran none.")
    else:
        lines.append("Verdicts: the DoRA cases' above; the single-adapter ones judge single-adapter cases, and "
                     "none ran.")
    if quick:
        lines.append("--quick: a smoke run; at T=K=N=64 fixed per-call costs dominate, so its times mean nothing.")
    lines.append(f"\nwrote {', '.join(str(f) for f in files)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 4. Writing: the run's metadata, bench.json, bench.csv and the plot
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def collect_meta() -> dict:
    """Machine, versions and git commit, for the JSON header.

    Returns:
        ``{"machine": {...}, "versions": {...}, "git": {...}}``; megatron-core is reported
        from package metadata (None when absent), never imported.

    Example:
        >>> sorted(collect_meta())
        ['git', 'machine', 'versions']
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    try:
        import tplora_kernels

        pkg = tplora_kernels.__version__
    except Exception:  # metadata only: an import failure shows up in the run itself
        pkg = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpu": _cpu_model(),
                    "cores": cores, "mem_gib": mem, "gpus": gpus},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "triton": _version("triton"),
                     "megatron-core": _version("megatron-core"), "tplora_kernels": pkg,
                     "matplotlib": _version("matplotlib")},
        "git": {"commit": commit, "dirty": bool(dirty) if dirty is not None else None},
    }


def write_json(path: Path, meta: dict, records: list[dict], tgt: dict) -> None:
    """``{"meta": ..., "targets": ..., "results": records}`` to ``path``."""
    path.write_text(json.dumps({"meta": meta, "targets": tgt, "results": records}, indent=1, default=str))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        elif isinstance(v, (list, tuple)):
            out[key] = ";".join(map(str, v))
        else:
            out[key] = v
    return out


def write_csv(path: Path, records: list[dict]) -> None:
    """One flat row per (case, contender); nested fields joined with ``_``, lists with ``;``."""
    rows = [_flatten(r) for r in records]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


# Contender styles on the plot: line style AND marker differ, hollow markers for the unfused ones
# so their dashes stay visible through them.
_STYLE = {
    "reference": dict(linestyle=(0, (6, 3)), marker="s", markersize=6, markerfacecolor="none", linewidth=1.4),
    "peft": dict(linestyle=(0, (1.5, 2)), marker="^", markersize=6, markerfacecolor="none", linewidth=1.6),
    "fused": dict(linestyle="-", marker="o", markersize=4.5, linewidth=1.8),
}


def plot_title(meta: dict, records: list[dict]) -> str:
    """``device, backend, shape and dtype`` of a run, for the plot's title.

    Example:
        >>> plot_title({"device": "cpu", "backend": ["torch"], "machine": {"cpu": "EPYC", "cores": 2},
        ...             "config": {"tokens": 8, "d_in": 16, "d_out": 32, "r": 4, "dtype": "fp32"}}, [])
        'tplora bench on CPU (EPYC, 2 cores), fused backend torch: T=8 K=16 N=32 r=4, fp32'
    """
    c, m = meta["config"], meta.get("machine", {})
    dev = (f"CPU ({m.get('cpu', '?')}, {m.get('cores', '?')} cores)" if meta["device"] == "cpu"
           else next((r["device"] for r in records if r.get("device")), meta["device"]))
    return (f"tplora bench on {dev}, fused backend {','.join(meta['backend'])}: T={c['tokens']} K={c['d_in']} "
            f"N={c['d_out']} r={c['r']}, {c['dtype']}")


def plot(path: Path, records: list[dict], title: str = "") -> bool:
    """Overhead % over base and fused speedup vs TP size, one row of panels per kind (fwd+bwd medians).

    One colour per (SP, p); one line style and marker per contender (``_STYLE``); the legends sit
    outside the axes. Returns False when matplotlib is missing or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    records = [r for r in records if not r["case"].get("dora")]  # the DoRA cases have their own table
    kinds = sorted({r["case"]["kind"] for r in records})
    if not kinds:
        return False
    tps = sorted({r["case"]["tp"] for r in records})
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.6 * len(kinds)), squeeze=False)
    colours: dict[tuple, str] = {}
    for row, kind in enumerate(kinds):
        # (sp, p) -> contender -> [(tp, overhead %, speedup vs reference, speedup vs peft)]
        series: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            c = r["case"]
            if c["kind"] == kind and r["contender"] != "base":
                series[(c["sp"], c["p"])][r["contender"]].append(
                    (c["tp"], r.get("overhead_pct_fwd_bwd"), r.get("speedup_vs_reference_fwd_bwd"),
                     r.get("speedup_vs_peft_fwd_bwd")))
        ax_o, ax_s = axes[row]
        for key, by in sorted(series.items()):
            colour = colours.setdefault(key, f"C{len(colours)}")
            for name, style in _STYLE.items():
                pts = sorted(x for x in by.get(name, []) if x[1] is not None)
                if pts:
                    ax_o.plot([x[0] for x in pts], [x[1] for x in pts], color=colour, **style)
            fused = sorted(by.get("fused", []))
            for name, col in (("reference", 2), ("peft", 3)):
                pts = [(x[0], x[col]) for x in fused if x[col] is not None]
                if pts:
                    ax_s.plot([x[0] for x in pts], [x[1] for x in pts], color=colour, **_STYLE[name])
        ax_o.axhline(0, color="grey", lw=0.8)
        ax_s.axhline(1, color="grey", lw=0.8)
        ax_o.set(title=f"{kind}: LoRA overhead over the frozen base", xlabel="TP size", ylabel="fwd+bwd overhead %")
        ax_s.set(title=f"{kind}: fused speedup (> 1: fused faster)", xlabel="TP size",
                 ylabel="t_other / t_fused, fwd+bwd")
        for ax in (ax_o, ax_s):
            ax.set_xticks(tps)
            ax.grid(alpha=0.3)
    present = {r["contender"] for r in records}
    style_handles = [Line2D([], [], color="black", label=_PLOT_LABEL[n], **_STYLE[n]) for n in _STYLE if n in present]
    colour_handles = [Line2D([], [], color=c, lw=6, label=f"SP {'on' if sp else 'off'}, p={p:g}")
                      for (sp, p), c in sorted(colours.items())]
    fig.tight_layout(rect=(0, 0, 0.78, 0.95))
    fig.suptitle(title, x=0.39, y=0.995, fontsize=11)
    fig.legend(handles=style_handles, loc="upper left", bbox_to_anchor=(0.785, 0.92), fontsize=8,
               title="contender (left: overhead; right: speedup of fused over it)", title_fontsize=8, handlelength=4)
    fig.legend(handles=colour_handles, loc="upper left", bbox_to_anchor=(0.785, 0.55), fontsize=8, title="case",
               title_fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" takes in the legends beside the axes
    plt.close(fig)
    return True


_PLOT_LABEL = {"reference": "reference (our emulation of PEFT's structure)",
               "peft": "peft (PEFT's own LoraParallelLinear)", "fused": "fused (tplora_kernels)"}


def write(out_dir: Path, meta: dict, records: list[dict], tgt: dict, *, plot_png: bool = True) -> list[Path]:
    """Write ``bench.json``, ``bench.csv`` and (``plot_png``, with matplotlib) ``bench.png`` under ``out_dir``.

    Args:
        out_dir: created if missing.
        meta: the run's metadata (the JSON header; the plot's title).
        records: the derived records.
        tgt: ``judge``'s verdicts.
        plot_png: draw the plot.

    Returns:
        The files written, in that order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", meta, records, tgt)
    write_csv(out_dir / "bench.csv", records)
    files = [out_dir / "bench.json", out_dir / "bench.csv"]
    if plot_png and plot(out_dir / "bench.png", records, plot_title(meta, records)):
        files.append(out_dir / "bench.png")
    return files
