"""LoRA adds no collective: the fused path runs exactly the base layer's own, in every mode.

Collectives are counted with torch.profiler on every rank: events named ``c10d::*`` (gloo emits
``c10d::allreduce_``, ``c10d::_allgather_base_`` and ``c10d::_reduce_scatter_base_``), for a
no-grad forward and for a forward plus backward. The base is ``functional.parallel_linear``
measured the same way; the unfused reference (PEFT's structure) must show its extra collective
on the LoRA branch, which also proves the counter sees collectives run inside autograd.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tplora_kernels.distributed import sum_sequence_parallel_grads
from tplora_kernels.functional import column_parallel_lora, parallel_linear, row_parallel_lora
from tplora_kernels.reference import column_parallel_lora_reference, row_parallel_lora_reference

from ..support.harness import cpu_kernel_backend
from ..support.problems import Shapes, full_problem, shard

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


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def count_c10d(fn) -> dict[str, int]:
    """Run ``fn()`` under torch.profiler; count events whose name starts with ``c10d::``, by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.name.startswith("c10d::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def collectives_task(ctx, *, kind: str, sp: bool, opt: bool, backend: str, x_grad: bool = True) -> dict:
    """Collective counts of the base layer alone, the fused path and the unfused reference.

    Returns:
        ``{impl: {"fwd": {name: n}, "fwdbwd": {name: n}}}`` for impl in base, fused, reference;
        ``fwd`` is a no-grad forward, ``fwdbwd`` a forward plus backward with grads on x (if
        ``x_grad``) and on the LoRA factors (the base weight is frozen).
    """
    loc = shard(kind, full_problem(7, Shapes(S=8, Bt=2, K=16, N=12, r=3)), ctx.rank, ctx.tp, sp, opt)
    W = loc["W"].float()
    bias = loc["bias"].float()
    mode = dict(sequence_parallel=sp, group=ctx.group)
    mode["gather_output" if kind == "column" else "input_is_parallel"] = opt

    def call(impl, x, a, b):
        if impl == "base":
            return parallel_linear(x, W, kind=kind, bias=bias, **mode)
        if impl == "fused":
            fn = column_parallel_lora if kind == "column" else row_parallel_lora
            return fn(x, W, a, b, bias=bias, scale=0.5, dropout_p=0.25, seed=11, backend=backend, **mode)
        fn = column_parallel_lora_reference if kind == "column" else row_parallel_lora_reference
        return fn(x, W, a, b, bias=bias, scale=0.5, dropout_p=0.25, seed=11, **mode)

    out = {}
    for impl in ("base", "fused", "reference"):
        def fwd(impl=impl):
            with torch.no_grad():
                call(impl, loc["x"].float(), loc["A"].float(), loc["B"].float())

        def fwdbwd(impl=impl):
            x = loc["x"].float().requires_grad_(x_grad)
            a = loc["A"].float().requires_grad_()
            b = loc["B"].float().requires_grad_()
            y = call(impl, x, a, b)
            y.backward(loc["dy"].float())

        # The frozen base alone has nothing to differentiate without x's grad: backward-free.
        both = fwd if impl == "base" and not x_grad else fwdbwd
        out[impl] = {"fwd": count_c10d(fwd), "fwdbwd": count_c10d(both)}
    return out


def sp_grad_sum_task(ctx, *, sp: bool) -> None:
    """``sum_sequence_parallel_grads`` on two fp32 params (marked under SP) and one unmarked one.

    Asserts on this rank: one all-reduce exactly when something is marked at TP > 1, the marked
    grads only are summed, and they hold the sum over ranks while the unmarked one is untouched.
    """
    params = [torch.nn.Parameter(torch.zeros(3, 5)), torch.nn.Parameter(torch.zeros(4)),
              torch.nn.Parameter(torch.zeros(2, 2))]
    for i, prm in enumerate(params):
        prm.grad = torch.full_like(prm, float(ctx.rank + 1 + 10 * i))
    if sp:
        params[0].sequence_parallel = True
        params[1].sequence_parallel = True
    summed = []
    counts = count_c10d(lambda: summed.append(sum_sequence_parallel_grads(params, ctx.group)))
    at = f"rank {ctx.rank} tp={ctx.tp} sp={sp}"
    want = 1 if sp and ctx.tp > 1 else 0
    assert _total(counts) == want, f"{at}: {_fmt(counts)}, expected {want} all-reduce"
    assert summed[0] == (2 if sp else 0), f"{at}: summed {summed[0]} grads, expected the marked ones only"
    for i, prm in enumerate(params):
        marked = sp and i < 2
        expect = sum(r + 10 * i for r in range(1, ctx.tp + 1)) if marked else ctx.rank + 1 + 10 * i
        got = prm.grad.unique().tolist()
        assert got == [expect], (f"{at}: param {i} ({'marked' if marked else 'unmarked'}) grad {got}, expected "
                                 f"{'the sum over ranks' if marked else 'its own'} {expect}")


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------

def check_only_base_collectives(dist_pool, mode, tp: int, backend: str) -> None:
    """Every rank runs the same collectives; the fused path exactly the base's; the reference its extra ones."""
    kind, sp, opt = mode
    results = dist_pool.run(collectives_task, tp, kind=kind, sp=sp, opt=opt, backend=backend)
    where = f"{_mode_id(mode)} tp={tp} backend={backend}"
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


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("mode", MODES, ids=[_mode_id(m) for m in MODES])
def test_fused_runs_only_the_base_collectives(dist_pool, kernel_backend, mode, tp):
    """In every mode the fused path runs exactly the base layer's collectives, forward and backward;
    the unfused reference shows its extra one.
    """
    check_only_base_collectives(dist_pool, mode, tp, cpu_kernel_backend(kernel_backend))


@pytest.mark.parametrize("mode", MODES, ids=[_mode_id(m) for m in MODES])
def test_cublas_runs_only_the_base_collectives(dist_pool, kernel_backend, mode):
    """The cublas backend's GEMMs write into the same collective buffers: still no collective of its own."""
    if kernel_backend != "interpret":
        pytest.skip("the gloo ranks hold CPU tensors; cublas runs on them only under the interpreter")
    check_only_base_collectives(dist_pool, mode, 2, "cublas")


@pytest.mark.parametrize("mode", [("column", False, False), ("column", True, False), ("row", False, True),
                                  ("row", True, True)], ids=_mode_id)
def test_input_without_grad(dist_pool, kernel_backend, mode):
    """x needs no gradient (a first layer): the frozen base then runs no backward collective at all.

    LoRA's backward still needs one where its math spans ranks: column reduces du (all-reduce, or
    reduce-scatter under SP; documented in ``autograd``), row under SP gathers dy's rows. Row
    without SP needs none. The reference pays at least as much.
    """
    kind, sp, opt = mode
    backend = cpu_kernel_backend(kernel_backend)
    res = dist_pool.run(collectives_task, 2, kind=kind, sp=sp, opt=opt, backend=backend, x_grad=False)[0]
    where = f"{_mode_id(mode)} tp=2 x.requires_grad=False"
    base, fused, ref = (_total(res[i]["fwdbwd"]) for i in ("base", "fused", "reference"))
    want = base + (1 if kind == "column" or sp else 0)
    assert fused == want, (f"{where}: fused runs {fused} collectives in fwd+bwd, expected {want} (base {base}, "
                           f"reference {ref}): fused {_fmt(res['fused']['fwdbwd'])}")
    assert fused <= ref, f"{where}: fused {fused} > reference {ref}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_sequence_parallel_grad_sum_is_one_all_reduce(dist_pool, sp, tp):
    """sum_sequence_parallel_grads sums exactly the SP-marked gradients over the group, in one
    all-reduce (none when nothing is marked or at TP 1)."""
    dist_pool.run(sp_grad_sum_task, tp, sp=sp)
