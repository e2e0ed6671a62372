"""LoRA adds no collective: the fused path runs exactly the base layer's own, in every mode.

Collectives are counted with torch.profiler on every rank: events named ``c10d::*`` (gloo emits
``c10d::allreduce_``, ``c10d::_allgather_base_`` and ``c10d::_reduce_scatter_base_``), for a
no-grad forward and for a forward plus backward. The base is ``mappings.base_parallel_linear``
measured the same way; the unfused reference (PEFT's structure) must show its extra collective
on the LoRA branch, which also proves the counter sees collectives run inside autograd.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests import tp_cases as C

# (kind, sequence_parallel, gather_output / input_is_parallel)
MODES = [
    ("column", False, False), ("column", False, True), ("column", True, False), ("column", True, True),
    ("row", False, True), ("row", False, False), ("row", True, True), ("row", True, False),
]


def reference_extra(kind: str, sp: bool, opt: bool) -> tuple[int, int]:
    """Collectives PEFT's structure adds over the base: (in forward, in forward + backward).

    Column: the LoRA-B layer's input mapping (under SP an all-gather of u in forward) and its
    backward (all-reduce of du, or reduce-scatter under SP), plus a separate all-gather of the
    LoRA output with gather_output. Row: the LoRA-A layer's output reduction of u (all-reduce, or
    reduce-scatter under SP, whose backward all-gathers), plus, when the input is not parallel,
    the LoRA branch's own scatter of x, whose backward all-gathers dx.
    """
    if kind == "column":
        fwd = int(sp) + int(opt)
        return fwd, fwd + 1
    return 1, 1 + int(sp) + int(not opt)

def _mode_id(m) -> str:
    kind, sp, opt = m
    return f"{kind}-sp_{'on' if sp else 'off'}-{'gather_output' if kind == 'column' else 'input_is_parallel'}_{opt}"


def _fmt(c: dict) -> str:
    return "{" + ", ".join(f"{k.removeprefix('c10d::')}: {v}" for k, v in sorted(c.items())) + "}"


def _total(c: dict) -> int:
    return sum(c.values())


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("mode", MODES, ids=[_mode_id(m) for m in MODES])
def test_fused_runs_only_the_base_collectives(dist_pool, kernel_backend, mode, tp):
    kind, sp, opt = mode
    backend = C.cpu_kernel_backend(kernel_backend)
    results = dist_pool.run(C.collectives_task, tp, kind=kind, sp=sp, opt=opt, backend=backend)
    where = f"{_mode_id(mode)} tp={tp}"
    for rank, res in enumerate(results[1:], start=1):
        assert res == results[0], f"{where}: rank {rank} ran other collectives than rank 0: {res} vs {results[0]}"
    res = results[0]
    report = "; ".join(f"{impl} fwd {_fmt(res[impl]['fwd'])} fwd+bwd {_fmt(res[impl]['fwdbwd'])}"
                       for impl in ("base", "fused", "reference"))
    for phase in ("fwd", "fwdbwd"):
        assert Counter(res["fused"][phase]) == Counter(res["base"][phase]), (
            f"{where} {phase}: fused collectives {_fmt(res['fused'][phase])} != base {_fmt(res['base'][phase])} "
            f"[{report}]")
    extra_fwd, extra_all = reference_extra(kind, sp, opt)
    got_fwd = _total(res["reference"]["fwd"]) - _total(res["base"]["fwd"])
    got_all = _total(res["reference"]["fwdbwd"]) - _total(res["base"]["fwdbwd"])
    assert (got_fwd, got_all) == (extra_fwd, extra_all), (
        f"{where}: reference runs +{got_fwd} (fwd) / +{got_all} (fwd+bwd) collectives over the base, expected "
        f"+{extra_fwd} / +{extra_all} [{report}]")
    assert _total(res["base"]["fwdbwd"]) >= 1, f"{where}: the profiler saw no base collective at all [{report}]"


@pytest.mark.parametrize("mode", [("column", False, False), ("column", True, False), ("row", False, True),
                                  ("row", True, True)], ids=_mode_id)
def test_input_without_grad(dist_pool, kernel_backend, mode):
    """x needs no gradient (a first layer): the frozen base then runs no backward collective at all.

    LoRA's backward still needs one where its math spans ranks: column reduces du (all-reduce, or
    reduce-scatter under SP; documented in ``autograd``), row under SP gathers dy's rows. Row
    without SP needs none. The reference pays at least as much.
    """
    kind, sp, opt = mode
    backend = C.cpu_kernel_backend(kernel_backend)
    res = dist_pool.run(C.collectives_task, 2, kind=kind, sp=sp, opt=opt, backend=backend, x_grad=False)[0]
    where = f"{_mode_id(mode)} tp=2 x.requires_grad=False"
    base, fused, ref = (_total(res[i]["fwdbwd"]) for i in ("base", "fused", "reference"))
    want = base + (1 if kind == "column" or sp else 0)
    assert fused == want, (f"{where}: fused runs {fused} collectives in fwd+bwd, expected {want} (base {base}, "
                           f"reference {ref}): fused {_fmt(res['fused']['fwdbwd'])}")
    assert fused <= ref, f"{where}: fused {fused} > reference {ref}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_sequence_parallel_grad_sum_is_one_all_reduce(dist_pool, sp, tp):
    res = dist_pool.run(C.sp_grad_sum_task, tp, sp=sp)
    want = 1 if sp and tp > 1 else 0
    for rank, (counts, summed, grads_ok) in enumerate(res):
        assert _total(counts) == want, f"rank {rank} tp={tp} sp={sp}: {_fmt(counts)}, expected {want} all-reduce"
        assert summed == (2 if sp else 0), f"rank {rank} tp={tp} sp={sp}: summed {summed} grads, expected marked only"
        assert grads_ok, f"rank {rank} tp={tp} sp={sp}: marked grads are not the sum over ranks (or unmarked changed)"
