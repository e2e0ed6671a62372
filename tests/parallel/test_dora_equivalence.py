"""DoRA's TP invariance: every mode at TP 1/2/4, SP on/off, equals PEFT's formula in fp64 on the full layer.

DoRA (issue 18) scales each output row by ``g = m / ‖W + s·B A‖`` (row norms over K, a constant
in backward). Each hypothesis example builds full fp64 matrices and a magnitude from a seed on
every rank, takes its shards (``support.problems``; the magnitude split as B's rows), runs the
fused functional forward and backward with ``magnitude=`` and the norm parts of
``tplora_kernels.dora.norm_parts`` (a row layer all-reduces ``‖W‖²`` there; its LoRA part rides in
the layer's own ``[z | u]`` collective), sums the SP partial gradients (A for column; B and the
magnitude for row, which are marked ``sequence_parallel``), and compares y, dx, dA, dB and dm of
every rank with the matching piece of ``reference.dora_dense`` run in fp64 through autograd.
The magnitude is drawn away from its initial value (g in [0.75, 1.25]), so that every term of
the formula shows.

Bars (``support.checks``): fp32 ≤ 1e-5. fp16/bf16 ≤ 2 x torch's own error in that dtype + 1e-6,
torch's own error measured in the same example as ``test_tp_equivalence`` does: the largest of
the unfused per-rank structure at the same TP (``bench.peft_dora``: PEFT's DoRA math on each
rank's shard, with the LoRA weights' dtype, and with fp32 LoRA weights also with them in the
activation dtype, the dtype the fused path's u, du and row-norm partials travel in), ``dora_dense``
run in the dtype, and exact math on the inputs rounded to the dtype. In fp32 that per-rank
structure must itself meet the fp32 bar (so a wrong ``bench.peft_dora`` cannot widen a 16-bit
bar unseen; it is also the bench's ``peft_dora`` contender). Low precision draws at
least ``LOW_MIN`` rows and features and r >= 2, for ``test_tp_equivalence``'s reason.

Sizes are smaller than ``test_tp_equivalence``'s (DoRA runs the LoRA kernels, twice with
dropout, under Triton's interpreter): ``MAX_EXAMPLES`` examples plus the pinned ones. The
``cublas`` backend runs the same property on a fixed grid.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from bench.peft_dora import column_parallel_dora_peft, row_parallel_dora_peft
from tplora_kernels.distributed import sum_sequence_parallel_grads
from tplora_kernels.dora import norm_parts
from tplora_kernels.functional import column_parallel_lora, row_parallel_lora
from tplora_kernels.layout import layout_for
from tplora_kernels.mode import TPMode
from tplora_kernels.reference import dora_dense

from ..support.checks import abs_err, rank_failures
from ..support.harness import TP_SIZES, cpu_kernel_backend
from ..support.problems import DTYPES, Shapes, full_problem, shard, tp_case

GRADS = ("y", "dx", "dA", "dB", "dm")
LOW_MIN = 16
MAX_EXAMPLES = 40
# torch's own errors, as dora_task names them -> as a failure names them
TORCH_RUNS = {"peft": "PEFT's DoRA per rank", "dense": "dora_dense in dtype", "inputs": "input rounding"}


# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------
def dora_problem(data_seed: int, shapes: Shapes, scale: float) -> dict[str, torch.Tensor]:
    """``full_problem`` plus a magnitude ``m = ‖W + s·B A‖ ⊙ u``, u uniform in [0.75, 1.25] (fp64)."""
    full = full_problem(data_seed, shapes)
    g = torch.Generator().manual_seed(data_seed ^ 0x5A5A5A5A)
    norm = torch.linalg.norm(full["W"] + scale * full["B"] @ full["A"], dim=1)
    full["m"] = norm * (0.75 + 0.5 * torch.rand(shapes.N, generator=g, dtype=torch.float64))
    return full


def dora_shard(kind: str, full: dict, rank: int, t: int, sp: bool, opt: bool) -> dict:
    """``problems.shard`` plus the magnitude (split as B's rows) and its gradient's piece ``dm``."""
    loc = shard(kind, full, rank, t, sp, opt)
    split = layout_for(kind).lora_b

    def piece(f):
        return split.shard(f.reshape(-1, 1), rank, t).reshape(-1)

    loc["m"], loc["dm"] = piece(full["m"]), piece
    return loc


def dense_dora(full: dict, dtype, lora_dtype, *, bias: bool, scale: float, p: float, seed: int,
               compute_dtype=None) -> dict[str, torch.Tensor]:
    """``dora_dense`` on the full matrices: y, dx, dA, dB, dm.

    Inputs rounded to ``dtype`` (x, W, bias, dy) and ``lora_dtype`` (A, B, m), the math in
    ``compute_dtype`` (default: those dtypes). ``compute_dtype=float64`` gives the error that
    rounding the inputs alone makes.
    """
    def rounded(name, dt, leaf=False):
        t = full[name].to(dt).to(compute_dtype or dt).clone()
        return t.requires_grad_() if leaf else t

    x, a, b, m = rounded("x", dtype, True), rounded("A", lora_dtype, True), rounded("B", lora_dtype, True), \
        rounded("m", lora_dtype, True)
    y = dora_dense(x, rounded("W", dtype), a, b, m, bias=rounded("bias", dtype) if bias else None, scale=scale,
                   dropout_p=p, seed=seed)
    y.backward(rounded("dy", dtype))
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad, dm=m.grad)


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def run_dora(impl: str, kind: str, loc: dict, *, group, t: int, sp: bool, opt: bool, dtype, lora_dtype, bias: bool,
             scale: float, p: float, seed, backend: str | None) -> dict[str, torch.Tensor]:
    """One rank's fused (``impl="fused"``) or unfused (``"peft"``) DoRA forward+backward: y, dx, dA, dB, dm.

    Under SP the replicated factor (and a row layer's magnitude) is marked ``sequence_parallel``
    and its partial gradient summed with ``sum_sequence_parallel_grads``.
    """
    x = loc["x"].to(dtype).clone().requires_grad_()
    a, b, m = (torch.nn.Parameter(loc[n].to(lora_dtype).clone()) for n in ("A", "B", "m"))
    if sp and t > 1:
        for prm in (a,) if kind == "column" else (b, m):
            prm.sequence_parallel = True
    w = loc["W"].to(dtype)
    kw = dict(bias=loc["bias"].to(dtype) if bias else None, scale=scale, dropout_p=p, seed=seed,
              sequence_parallel=sp, group=group)
    kw["gather_output" if kind == "column" else "input_is_parallel"] = opt
    if impl == "fused":
        norm = norm_parts(w, a.detach(), b.detach(), scale, TPMode.build(kind, group=group))
        fn = column_parallel_lora if kind == "column" else row_parallel_lora
        y = fn(x, w, a, b, magnitude=m, norm=norm, backend=backend, **kw)
    else:
        fn = column_parallel_dora_peft if kind == "column" else row_parallel_dora_peft
        y = fn(x, w, a, b, m, **kw)
    y.backward(loc["dy"].to(dtype))
    sum_sequence_parallel_grads([a, b, m], group)
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad, dm=m.grad)


def dora_task(ctx, *, kind: str, sp: bool, opt: bool, bias: bool, dtype: str, lora_dtype: str, p: float, seed: int,
              data_seed: int, shapes: Shapes, scale: float, backend: str) -> dict:
    """Fused DoRA fwd+bwd on this rank vs the fp64 formula, and torch's own errors in ``dtype``.

    Returns:
        ``{"scale": {name: max |exact|}, "fused": {name: max abs err}, "peft": {...}}`` for this
        rank's piece of y, dx, dA, dB, dm (``peft``: PEFT's DoRA per rank, which in fp32 must meet
        the fp32 bar itself, so that the torch run the 16-bit bars lean on is right); for fp16/bf16
        also ``dense`` and ``inputs`` (torch's own max abs errors, see the module docstring).
    """
    dt = DTYPES[dtype]
    ldt = torch.float32 if lora_dtype == "fp32" else dt
    full = dora_problem(data_seed, shapes, scale)
    loc = dora_shard(kind, full, ctx.rank, ctx.tp, sp, opt)
    opts = dict(bias=bias, scale=scale, p=p, seed=seed)
    exact = dense_dora(full, torch.float64, torch.float64, **opts)
    exact = {n: loc[n](exact[n]) for n in GRADS}
    run = dict(group=ctx.group, t=ctx.tp, sp=sp, opt=opt, dtype=dt, lora_dtype=ldt, backend=backend, **opts)
    fused = run_dora("fused", kind, loc, **run)
    out = {"scale": {n: exact[n].abs().max().item() if exact[n].numel() else 0.0 for n in GRADS},
           "fused": {n: abs_err(fused[n], exact[n]) for n in GRADS}}
    peft = run_dora("peft", kind, loc, **run)
    out["peft"] = {n: abs_err(peft[n], exact[n]) for n in GRADS}
    if dt != torch.float32:
        if ldt != dt:
            low = run_dora("peft", kind, loc, **{**run, "lora_dtype": dt})
            out["peft"] = {n: max(out["peft"][n], abs_err(low[n], exact[n])) for n in GRADS}
        dense = dense_dora(full, dt, ldt, **opts)
        quant = dense_dora(full, dt, ldt, compute_dtype=torch.float64, **opts)
        out["dense"] = {n: abs_err(loc[n](dense[n]), exact[n]) for n in GRADS}
        out["inputs"] = {n: abs_err(loc[n](quant[n]), exact[n]) for n in GRADS}
    return out


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
def _describe(c: dict) -> str:
    opt = "gather_output" if c["kind"] == "column" else "input_is_parallel"
    sh = c["shapes"]
    return (f"DoRA {c['kind']} tp={c['tp']} sp={c['sp']} {opt}={c['opt']} bias={c['bias']} {c['dtype']}"
            f"/lora {c['lora_dtype']} p={c['p']} seed={c['seed']} data_seed={c['data_seed']} "
            f"x=[{sh.S},{sh.Bt},{sh.K}] N={sh.N} r={sh.r} s={c['scale']} backend={c['backend']}")


def check_dora(dist_pool, case: dict, kernel_backend: str = "interpret") -> None:
    """Run one case on its TP group; assert y, dx, dA, dB, dm against the bars (whole-tensor errors,
    max over ranks, relative to the max over ranks of max |exact|; the worst rank is named)."""
    case = dict(case)
    tp = case.pop("tp")
    if case["backend"] == "interpret":
        case["backend"] = cpu_kernel_backend(kernel_backend)
    results = dist_pool.run(dora_task, tp, **case)
    # The unfused per-rank structure the 16-bit bars use must itself be right in fp32.
    failures = rank_failures(results, GRADS, case["dtype"], TORCH_RUNS, _describe({**case, "tp": tp}),
                             extra=("peft", "PEFT's DoRA per rank (bench.peft_dora)"))
    assert not failures, "\n".join(failures)


@st.composite
def dora_cases(draw) -> dict:
    tp = draw(st.sampled_from(TP_SIZES))
    sp = draw(st.booleans())
    dtype = draw(st.sampled_from(["fp32", "fp32", "bf16", "fp16"]))
    lora_dtype = "fp32" if dtype == "fp32" else draw(st.sampled_from(["fp32", dtype]))
    lo = 1 if dtype == "fp32" else LOW_MIN
    r_lo = 1 if dtype == "fp32" else 2
    Bt = draw(st.integers(1, 2))
    s_min = -(-lo // Bt)
    S = draw(st.integers(-(-s_min // tp), 24 // tp)) * tp if sp else draw(st.integers(s_min, 24))
    return tp_case(
        kind=draw(st.sampled_from(["column", "row"])), tp=tp, sp=sp, opt=draw(st.booleans()), bias=draw(st.booleans()),
        dtype=dtype, lora_dtype=lora_dtype, p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.4])),
        seed=draw(st.integers(0, 2**63 - 1)), data_seed=draw(st.integers(0, 2**31 - 1)), S=S, Bt=Bt,
        K=draw(st.integers(-(-lo // tp), 40 // tp)) * tp, N=draw(st.integers(-(-lo // tp), 40 // tp)) * tp,
        r=draw(st.one_of(st.sampled_from([r_lo, 5]), st.integers(r_lo, 12))),
        scale=draw(st.sampled_from([0.5, 2.0, 1.7])),
        backend=draw(st.sampled_from(["interpret", "torch"])),
    )


@settings(max_examples=MAX_EXAMPLES)
@given(case=dora_cases())
# Pinned: a row and a column layer at TP 2 with and without SP and dropout (where a missing
# cross-rank norm sum or an undetached norm shows), odd sizes, r = 1, fp16 with fp32 factors,
# 16-bit factors riding a row layer's reduce-scatter, TP 1 and 4.
@example(case=tp_case("row", 2, sp=False, opt=True, p=0.0, S=9, K=24, N=20, r=3, seed=3, data_seed=11))
@example(case=tp_case("row", 2, sp=True, opt=False, p=0.1, S=6, Bt=2, K=24, N=20, r=3, seed=4, data_seed=12,
                    backend="torch"))
@example(case=tp_case("column", 2, sp=True, opt=True, p=0.1, S=6, Bt=2, K=20, N=24, r=3, seed=5, data_seed=13))
@example(case=tp_case("column", 2, sp=False, opt=False, p=0.0, S=9, K=20, N=24, r=1, bias=False, data_seed=14,
                    backend="torch"))
@example(case=tp_case("row", 4, sp=True, opt=True, dtype="bf16", p=0.1, S=8, Bt=2, K=32, N=24, r=4, data_seed=15))
@example(case=tp_case("column", 4, sp=False, opt=True, dtype="fp16", p=0.4, S=17, K=32, N=24, r=5, data_seed=16))
@example(case=tp_case("row", 1, dtype="bf16", lora_dtype="bf16", p=0.1, S=17, K=20, N=28, r=2, data_seed=17,
                    backend="torch"))
@example(case=tp_case("row", 2, sp=True, opt=True, dtype="fp16", lora_dtype="fp16", p=0.4, S=8, Bt=2, K=32, N=24, r=3,
                    data_seed=18))
@example(case=tp_case("column", 1, dtype="bf16", p=0.0, S=16, K=24, N=20, r=2, bias=False, data_seed=19,
                    backend="torch"))
@example(case=tp_case("column", 4, sp=True, opt=False, p=0.1, S=12, K=20, N=16, r=1, scale=2.0, data_seed=20))
def test_dora_tp_equivalence(dist_pool, kernel_backend, case):
    """DoRA in any mode at TP 1/2/4, SP on or off, any dtype and backend: y, dx, dA, dB and dm on every
    rank equal their piece of PEFT's formula in fp64 on the full layer, within the tolerance rule.
    """
    for label in (f"tp={case['tp']}", case["kind"], f"sp={case['sp']}", case["dtype"], f"lora {case['lora_dtype']}",
                  f"p>0={case['p'] > 0}", case["backend"]):
        event(label)  # shown by --hypothesis-show-statistics
    check_dora(dist_pool, case, kernel_backend)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("kind", ["column", "row"])
def test_cublas_dora_tp_equivalence(dist_pool, kernel_backend, kind, tp):
    """The cublas backend: every TP size, column and row, SP on with dropout in bf16 (fp32 factors),
    then SP off without dropout in fp32; gather_output / a non-parallel row input at TP > 1."""
    if kernel_backend != "interpret":
        pytest.skip("the gloo ranks hold CPU tensors; cublas runs on them only under the interpreter")
    common = dict(Bt=2, K=24, N=32, r=5, scale=1.7, backend="cublas", data_seed=20 + tp)
    check_dora(dist_pool, tp_case(kind, tp, sp=tp > 1, opt=False, dtype="bf16", p=0.3, S=8, seed=0xC0B1A5, **common),
               kernel_backend)
    check_dora(dist_pool, tp_case(kind, tp, sp=False, opt=tp > 1, dtype="fp32", p=0.0, S=6, **common), kernel_backend)
