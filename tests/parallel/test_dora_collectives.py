"""DoRA adds no collective per micro-batch: a DoRA layer runs its LoRA twin's collectives, through the modules.

Every c10d call of a ``ColumnParallelLoRA`` / ``RowParallelLoRA`` with ``use_dora=True`` is counted
on every rank of a TP 2 group, two ways at once: torch.profiler's ``c10d::`` events (every call
that reaches the dispatcher, by name; ``test_collectives.count_c10d``) and the bench's
``torch.distributed`` wrapper (``bench.runner.count_collectives``: each call's op and the bytes of
its largest tensor). Both must agree in number. Then, against the same layer with a plain LoRA
adapter (same base, same factors), for a no-grad forward and a forward + backward:

* the same calls, by name and in number, in every phase (column and row, SP off and on, dropout
  off and on);
* the same buffer sizes, except a row layer's forward collective over ``[z | u]``, which carries
  the LoRA part of the row norms: N more values per block (one block without SP, t blocks under
  SP's reduce-scatter), and with dropout the dropped product (T·N more: PEFT's DoRA with
  dropout needs the base GEMM on the dropped x, whose partial sums ride along);
* a row layer's ``‖W‖²`` (N fp32 values) is all-reduced once per base-weight version: in the first
  forward after the layer is made, not in the second, and again in the first forward after the
  base weight changes in place (``copy_`` into it under no_grad, as a checkpoint load does); a
  column layer never needs it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench.runner import count_collectives
from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA

from ..support import layers
from ..support.harness import cpu_kernel_backend
from .test_collectives import count_c10d

S, BT, R = 8, 2, 3
IN, OUT = {"column": (16, 12), "row": (12, 16)}, {"column": 12, "row": 16}  # (K, N) of each kind's layer
ELEM = 4  # fp32


def _counted(fn) -> tuple[dict[str, int], list[dict]]:
    """``fn()`` under both counters: (profiler c10d names -> calls, the wrapper's [{op, bytes}])."""
    log: list = []
    with count_collectives(log, ["-"]):
        c10d = count_c10d(fn)
    return c10d, [{"op": e["op"], "bytes": e["bytes"]} for e in log]


def _layer(ctx, kind: str, sp: bool, dora: bool, p: float, backend: str):
    """The same base layer (seeded) and the same adapter (seeded), with or without DoRA."""
    make, wrap = (layers.column, ColumnParallelLoRA) if kind == "column" else (layers.row, RowParallelLoRA)
    base = make(ctx.group, ctx.tp, *IN[kind], sp=sp)
    torch.manual_seed(3)
    return wrap(base, r=R, lora_alpha=2 * R, lora_dropout=p, init_lora_weights=False, use_dora=dora,
                backend=backend, seed=77)


def dora_collectives_task(ctx, *, kind: str, sp: bool, p: float, backend: str) -> dict:
    """Counts of one LoRA layer and its DoRA twin on this rank.

    Returns:
        ``{"lora"|"dora": {phase: (c10d counts, wrapper log)}}`` with phases ``fwd1`` (the first
        no-grad forward after construction), ``fwd`` (a later no-grad forward), ``fwdbwd`` (forward
        + backward), ``reload`` (the first no-grad forward after ``copy_`` into the base weight),
        ``after_reload`` (the next one); and ``x_rows``, the rows of the layer's input.
    """
    x_full = layers.inputs((S, BT, IN[kind][0]), seed=9)
    if kind == "column":
        x = layers.split_rows(x_full, ctx.group) if sp else x_full
    else:
        x = layers.split_cols(x_full, ctx.group)
    dy = None
    out: dict = {}
    for name, dora in (("lora", False), ("dora", True)):
        layer = _layer(ctx, kind, sp, dora, p, backend)
        res = {}

        def fwd(layer=layer):
            with torch.no_grad():
                layer(x)

        def fwdbwd(layer=layer):
            xg = x.clone().requires_grad_()
            y, _ = layer(xg)
            y.backward(torch.ones_like(y) if dy is None else dy)

        res["fwd1"] = _counted(fwd)
        res["fwd"] = _counted(fwd)
        res["fwdbwd"] = _counted(fwdbwd)
        w = layer.base_layer.weight
        with torch.no_grad():
            w.copy_(w * 1.5)  # a checkpoint load: copy_ into the parameter
        res["reload"] = _counted(fwd)
        res["after_reload"] = _counted(fwd)
        out[name] = res
    out["x_rows"] = x.shape[0] * x.shape[1]
    return out


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
MODES = [(kind, sp, p) for kind in ("column", "row") for sp in (False, True) for p in (0.0, 0.25)]


def _fmt(c10d: dict, log: list) -> str:
    names = ", ".join(f"{k.removeprefix('c10d::')}: {v}" for k, v in sorted(c10d.items()))
    return "{" + names + "} " + str([f"{e['op']}:{e['bytes']}" for e in log])


def _extra_bytes(kind: str, sp: bool, p: float, tp: int) -> int:
    """How many more bytes the DoRA layer's forward collective carries than its LoRA twin's.

    Row: N norm values per block (t blocks under SP, whose reduce-scatter's input is all of
    them), and with dropout the dropped product ``[T, N]``. Column: none.
    """
    if kind == "column":
        return 0
    n = OUT[kind]
    return (n * (tp if sp else 1) + (S * BT * n if p else 0)) * ELEM


@pytest.mark.parametrize(("kind", "sp", "p"), MODES,
                         ids=[f"{k}-sp_{'on' if s else 'off'}-p{p:g}" for k, s, p in MODES])
def test_dora_adds_no_collective(dist_pool, kernel_backend, kind, sp, p):
    """Per micro-batch a DoRA layer runs exactly its LoRA twin's collectives (row: the forward one wider by
    the norm values); a row layer's ‖W‖² all-reduce runs once per base-weight version."""
    tp = 2
    results = dist_pool.run(dora_collectives_task, tp, kind=kind, sp=sp, p=p,
                            backend=cpu_kernel_backend(kernel_backend))
    where = f"{kind} tp={tp} sp={sp} p={p}"
    for rank, res in enumerate(results[1:], start=1):
        assert res == results[0], f"{where}: rank {rank} ran other collectives than rank 0"
    res = results[0]
    lora, dora = res["lora"], res["dora"]
    for impl in ("lora", "dora"):
        for phase, (c10d, log) in res[impl].items():
            assert sum(c10d.values()) == len(log), (
                f"{where} {impl} {phase}: the profiler counted {sum(c10d.values())} c10d calls, the wrapper "
                f"{len(log)}: {_fmt(c10d, log)}")
    # Per micro-batch: the same calls as LoRA's, in every phase.
    for phase in ("fwd", "fwdbwd", "after_reload"):
        (c_l, log_l), (c_d, log_d) = lora[phase], dora[phase]
        assert Counter(c_d) == Counter(c_l) and [e["op"] for e in log_d] == [e["op"] for e in log_l], (
            f"{where} {phase}: DoRA runs {_fmt(c_d, log_d)}, LoRA {_fmt(c_l, log_l)}")
        extra = _extra_bytes(kind, sp, p, tp)
        diffs = [d["bytes"] - lo["bytes"] for d, lo in zip(log_d, log_l)]
        want = [extra if i == 0 else 0 for i in range(len(log_l))]
        assert diffs == want, (f"{where} {phase}: DoRA's collectives carry {diffs} bytes more than LoRA's, expected "
                               f"{want} ({'N norm values per block' if kind == 'row' else 'none'}): DoRA "
                               f"{_fmt(c_d, log_d)}, LoRA {_fmt(c_l, log_l)}")
    if kind == "row":
        assert lora["fwd"][1], f"{where}: the counter saw no collective at all in a row layer's forward"
    # The one-time ||W||^2 all-reduce: a row layer's first forward after creation and after a reload.
    once = [{"op": "all_reduce", "bytes": OUT[kind] * ELEM}] if kind == "row" else []
    extra = _extra_bytes(kind, sp, p, tp)
    for phase in ("fwd1", "reload"):
        (c_l, log_l), (c_d, log_d) = lora[phase], dora[phase]
        want = once + [{"op": e["op"], "bytes": e["bytes"] + (extra if i == 0 else 0)} for i, e in enumerate(log_l)]
        assert log_d == want, (
            f"{where} {phase}: DoRA runs {_fmt(c_d, log_d)}, expected {want}: LoRA's {_fmt(c_l, log_l)} "
            f"{'after one all-reduce of the N fp32 ||W||^2 values' if once else 'and nothing else'}")
        assert sum(c_d.values()) == sum(c_l.values()) + len(once), \
            f"{where} {phase}: profiler counts DoRA {_fmt(c_d, log_d)} vs LoRA {_fmt(c_l, log_l)}"
