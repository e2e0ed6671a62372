"""Results: derived ratios, target checks, the stdout table, JSON, CSV and the PNG plot.

Ratios are taken between contenders of the same case on medians: ``overhead_pct`` of LoRA over
the frozen base, ``t / t_base - 1``; the fused path's ``speedup_vs_reference``,
``t_reference / t_fused``. The targets are the issue's: LoRA adds no collective where the
reference adds one, fused saved activations at most half the reference's at p > 0, and a
fused / reference forward+backward ratio of at most 1.0 at every TP size.
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
from pathlib import Path

__all__ = ["collect_meta", "derive", "format_table", "format_targets", "plot", "targets", "write_csv",
           "write_json"]

_PHASES = ("fwd", "fwd_bwd")
_MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Derived figures and targets
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


def derive(records: list[dict]) -> list[dict]:
    """Add per-case ratios to every record, in place, and return the list.

    Adds ``overhead_pct_{fwd,fwd_bwd}`` (reference and fused, over base),
    ``speedup_vs_reference_{fwd,fwd_bwd}`` and ``saved_ratio_vs_reference`` (fused), and
    ``lora_collectives_{fwd,bwd}`` (collectives beyond the base's; None when not measured).

    Example:
        >>> derive([])
        []
    """
    for trio in _by_case(records).values():
        base, ref = trio.get("base"), trio.get("reference")
        for name, rec in trio.items():
            for ph in _PHASES:
                t = rec[f"{ph}_ms"]["median"]
                if name != "base" and base:
                    tb = base[f"{ph}_ms"]["median"]
                    rec[f"overhead_pct_{ph}"] = 100.0 * (t / tb - 1.0) if tb > 0 else None
                if name == "fused" and ref:
                    rec[f"speedup_vs_reference_{ph}"] = ref[f"{ph}_ms"]["median"] / t if t > 0 else None
            if name == "fused" and ref:
                rs = ref["saved_bytes"]
                rec["saved_ratio_vs_reference"] = rec["saved_bytes"] / rs if rs else None
            if name != "base" and base:
                for ph in ("fwd", "bwd"):
                    a, b = _coll_total(rec, ph), _coll_total(base, ph)
                    rec[f"lora_collectives_{ph}"] = None if a is None or b is None else a - b
    return records


def targets(records: list[dict]) -> dict:
    """Check the issue's three CPU targets against derived ``records``.

    Returns:
        ``{"collectives": ..., "saved": ..., "time": ...}``, each with ``met`` (bool, or None
        when nothing was measured) and the numbers behind it.

    Example:
        >>> targets([])["time"]["met"] is None
        True
    """
    coll_rows, saved_rows = [], []
    per_tp: dict[int, list[float]] = defaultdict(list)
    for label, trio in _by_case(records).items():
        case = next(iter(trio.values()))["case"]
        fused, ref = trio.get("fused"), trio.get("reference")
        if fused is None or ref is None:
            continue
        if case["tp"] > 1 and fused.get("lora_collectives_fwd") is not None:
            f = (fused["lora_collectives_fwd"], fused["lora_collectives_bwd"])
            r = (ref["lora_collectives_fwd"], ref["lora_collectives_bwd"])
            # Per phase: the fused path adds none; the reference adds one wherever LoRA needs a
            # reduction of its own (column bwd, row fwd; both phases under SP).
            coll_rows.append({"case": label, "fused_extra": f, "reference_extra": r,
                              "ok": f == (0, 0) and max(r) >= 1})
        if case["p"] > 0 and fused.get("saved_ratio_vs_reference") is not None:
            saved_rows.append({"case": label, "ratio": fused["saved_ratio_vs_reference"],
                               "fused_bytes": fused["saved_bytes"], "reference_bytes": ref["saved_bytes"],
                               "ok": fused["saved_ratio_vs_reference"] <= 0.5})
        s = fused.get("speedup_vs_reference_fwd_bwd")
        if s:
            per_tp[case["tp"]].append(1.0 / s)
    time_rows = [{"tp": tp, "worst_ratio": max(v), "geomean_ratio": math.exp(sum(map(math.log, v)) / len(v)),
                  "cases": len(v), "cases_over_1": sum(x > 1.0 for x in v), "ok": max(v) <= 1.0}
                 for tp, v in sorted(per_tp.items())]

    def met(rows):
        return all(r["ok"] for r in rows) if rows else None

    return {
        "collectives": {"target": "fused LoRA adds 0 collectives in every (mode, phase) where the reference "
                                  "adds 1 (t > 1)",
                        "met": met(coll_rows), "rows": coll_rows},
        "saved": {"target": "fused saved activations <= 50% of the reference's at p > 0",
                  "met": met(saved_rows), "rows": saved_rows},
        "time": {"target": "fused / reference fwd+bwd median time <= 1.0 at each TP (every case)",
                 "met": met(time_rows), "rows": time_rows},
    }


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def _ms(t: dict) -> str:
    return f"{t['median']:8.3f} [{t['p20']:.3f}, {t['p80']:.3f}]"


def _pct(v) -> str:
    return "" if v is None else f"{v:+.1f}"


def _coll(rec: dict) -> str:
    c = rec.get("collectives", {})
    if not c.get("measured"):
        return "not measured"
    mib = (c["fwd"]["bytes"] + c["bwd"]["bytes"]) / _MIB
    flag = "" if c.get("count_check") == "ok" else " (!c10d)"
    return f"{c['fwd']['count']}+{c['bwd']['count']} {mib:7.2f} MiB{flag}"


def format_table(records: list[dict]) -> str:
    """The stdout table: one row per (case, contender), ratios on the LoRA rows.

    Columns: median [p20, p80] ms of forward and of forward+backward; overhead % over base
    (fwd / fwd+bwd); the fused path's speedup over the reference (fwd / fwd+bwd); collectives
    per pass (forward + backward count, total buffer MiB); saved activations, peak memory and
    the forward+backward throughput (GFLOP/s per rank).

    Example:
        >>> format_table([]).splitlines()[0].split()[0]
        'case'
    """
    head = (f"{'case':<24} {'contender':<9} {'fwd ms [p20, p80]':>26} {'fwd+bwd ms [p20, p80]':>27} "
            f"{'ovh% f/fb':>13} {'speedup f/fb':>13} {'coll f+b  bytes':>19} {'saved MiB':>9} "
            f"{'peak MiB':>8} {'GFLOP/s':>8}")
    lines = [head, "-" * len(head)]
    last = None
    for r in records:
        label = r["label"] if r["label"] != last else ""
        last = r["label"]
        ovh = "" if r["contender"] == "base" else \
            f"{_pct(r.get('overhead_pct_fwd'))}/{_pct(r.get('overhead_pct_fwd_bwd'))}"
        sp = ""
        if r.get("speedup_vs_reference_fwd"):
            sp = f"{r['speedup_vs_reference_fwd']:.2f}x/{r['speedup_vs_reference_fwd_bwd']:.2f}x"
        gf = r.get("tflops_fwd_bwd")
        lines.append(f"{label:<24} {r['contender']:<9} {_ms(r['fwd_ms']):>26} {_ms(r['fwd_bwd_ms']):>27} "
                     f"{ovh:>13} {sp:>13} {_coll(r):>19} {r['saved_bytes'] / _MIB:9.2f} "
                     f"{r['peak_bytes'] / _MIB:8.2f} {'' if gf is None else f'{gf * 1e3:8.1f}':>8}")
    return "\n".join(lines)


def format_targets(t: dict) -> str:
    """Human-readable target verdicts, with the numbers.

    Example:
        >>> "time" in format_targets(targets([]))
        True
    """
    word = {True: "MET", False: "MISSED", None: "not measured"}
    lines = []
    c = t["collectives"]
    lines.append(f"[{word[c['met']]}] collectives: {c['target']}")
    for r in c["rows"]:
        if not r["ok"]:
            lines.append(f"    {r['case']}: fused adds {r['fused_extra']}, reference adds {r['reference_extra']}")
    if c["rows"]:
        adds = sorted({f"{r['case'].split(' p=')[0].split(' tp=')[0]} sp={r['case'].split('sp=')[1].split()[0]}: "
                       f"{r['reference_extra']}" for r in c["rows"]})
        lines.append(f"    {sum(r['ok'] for r in c['rows'])}/{len(c['rows'])} cases: fused adds (fwd, bwd) = (0, 0); "
                     f"reference adds {'; '.join(adds)}")
    s = t["saved"]
    lines.append(f"[{word[s['met']]}] saved: {s['target']}")
    if s["rows"]:
        worst = max(s["rows"], key=lambda r: r["ratio"])
        lines.append(f"    worst fused/reference = {worst['ratio']:.3f} ({worst['case']}: "
                     f"{worst['fused_bytes'] / _MIB:.2f} / {worst['reference_bytes'] / _MIB:.2f} MiB)")
    tt = t["time"]
    lines.append(f"[{word[tt['met']]}] time: {tt['target']}")
    for r in tt["rows"]:
        lines.append(f"    tp={r['tp']}: worst {r['worst_ratio']:.3f}, geomean {r['geomean_ratio']:.3f}, "
                     f"{r['cases_over_1']}/{r['cases']} cases over 1.0")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files
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


def plot(path: Path, records: list[dict]) -> bool:
    """Overhead % (reference, fused) and fused speedup vs TP size, one row of panels per kind.

    Forward+backward medians; one colour per (SP, p), fused solid, reference dashed. Returns False
    when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = sorted({r["case"]["kind"] for r in records})
    if not kinds:
        return False
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.6 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        series: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            c = r["case"]
            if c["kind"] != kind or r["contender"] == "base":
                continue
            key = (c["sp"], c["p"])
            series[key][r["contender"]].append((c["tp"], r.get("overhead_pct_fwd_bwd"),
                                                r.get("speedup_vs_reference_fwd_bwd")))
        ax_o, ax_s = axes[row]
        for i, ((sp, p), by) in enumerate(sorted(series.items())):
            tag, color = f"SP {'on' if sp else 'off'}, p={p:g}", f"C{i}"
            for name, style in (("reference", "--"), ("fused", "-")):
                pts = sorted(x for x in by.get(name, []) if x[1] is not None)
                if pts:
                    ax_o.plot([x[0] for x in pts], [x[1] for x in pts], style, color=color, marker="o",
                              label=f"{name}, {tag}")
            pts = sorted(x for x in by.get("fused", []) if x[2] is not None)
            if pts:
                ax_s.plot([x[0] for x in pts], [x[2] for x in pts], "-", color=color, marker="o", label=tag)
        ax_o.axhline(0, color="grey", lw=0.8)
        ax_s.axhline(1, color="grey", lw=0.8)
        ax_o.set(title=f"{kind}: LoRA overhead over the frozen base (fwd+bwd)", xlabel="TP size",
                 ylabel="overhead %")
        ax_s.set(title=f"{kind}: fused speedup over the unfused reference (fwd+bwd)", xlabel="TP size",
                 ylabel="t_reference / t_fused")
        for ax in (ax_o, ax_s):
            tps = sorted({r["case"]["tp"] for r in records})
            ax.set_xticks(tps)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
