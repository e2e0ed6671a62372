"""Rank-side task functions for the multi-rank tests, and the helpers they share.

Every task here runs on ranks ``0..tp-1`` of ``tests.harness.DistPool`` as ``fn(ctx, **kwargs)``
and returns only picklable values (floats, dicts, CPU tensors); the test process asserts.

The problem is always built the same way on every rank: full fp64 matrices from one seed
(``full_problem``), then each rank slices its shards (``shard``). The oracle is
``reference.lora_dense`` on the full fp64 matrices, run through autograd, and sliced the way
the TP layout says this rank should see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tplora_kernels.distributed import sum_sequence_parallel_grads
from tplora_kernels.functional import column_parallel_lora, row_parallel_lora
from tplora_kernels.mappings import base_parallel_linear
from tplora_kernels.mask import dropout_threshold, keep_mask
from tplora_kernels.reference import column_parallel_lora_reference, lora_dense, row_parallel_lora_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRADS = ("y", "dx", "dA", "dB")


def cpu_kernel_backend(kernel_backend: str) -> str:
    """The backend that runs the Triton kernels on the gloo ranks' CPU tensors.

    ``interpret`` on a CPU machine; on a CUDA machine (no interpreter, and gloo's collectives want
    CPU tensors) the multi-rank tests fall back to the ``torch`` backend.
    """
    return "interpret" if kernel_backend == "interpret" else "torch"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def abs_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got - exact| in fp64; inf if got has a NaN/Inf where exact is finite, or a wrong shape."""
    if got is None or got.shape != exact.shape:
        return math.inf
    diff = (got.double() - exact.double()).abs()
    return diff.max().item() if torch.isfinite(diff).all() and diff.numel() else (0.0 if not diff.numel() else math.inf)


def rel_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got - exact| / max |exact| (STYLE.md's rule), computed in fp64. NaN in got -> inf."""
    denom = exact.double().abs().max().item() if exact.numel() else 0.0
    return abs_err(got, exact) / (denom if denom > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# The problem and its shards
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """x is ``[S, Bt, K]`` (dim 0 is the sequence, split under SP), W ``[N, K]``, LoRA rank r."""

    S: int
    Bt: int
    K: int
    N: int
    r: int


def full_problem(data_seed: int, sh: Shapes) -> dict[str, torch.Tensor]:
    """Full fp64 x, W, A, B, bias and the output gradient dy, identical on every rank.

    W and A are ~1/sqrt(K) and B ~1/sqrt(r), so the base and the LoRA terms are of the same size
    and an error in either shows in the output and in dx.
    """
    g = torch.Generator().manual_seed(data_seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    return dict(
        x=rnd(sh.S, sh.Bt, sh.K),
        W=rnd(sh.N, sh.K, std=sh.K ** -0.5),
        A=rnd(sh.r, sh.K, std=sh.K ** -0.5),
        B=rnd(sh.N, sh.r, std=sh.r ** -0.5),
        bias=rnd(sh.N),
        dy=rnd(sh.S, sh.Bt, sh.N),
    )


def shard(kind: str, full: dict[str, torch.Tensor], rank: int, t: int, sp: bool, opt: bool) -> dict:
    """This rank's inputs and the slices of full tensors it should get back.

    Args:
        kind: ``"column"`` or ``"row"``.
        full: ``full_problem`` (any dtype).
        rank, t: this rank, the TP size.
        sp: sequence parallel.
        opt: gather_output (column) / input_is_parallel (row).

    Returns:
        ``x, W, A, B, bias, dy``: this rank's inputs; ``y, dx, dA, dB``: functions mapping a full
        tensor (the oracle's output / gradients) to the slice this rank must hold.
    """
    S, K, N = full["x"].shape[0], full["x"].shape[-1], full["W"].shape[0]
    rows = slice(rank * S // t, (rank + 1) * S // t)
    allr = slice(None)
    sp = sp and t > 1
    if kind == "column":
        n = slice(rank * N // t, (rank + 1) * N // t)
        out = dict(W=full["W"][n], A=full["A"], B=full["B"][n], bias=full["bias"][n],
                   x=full["x"][rows] if sp else full["x"],
                   y=(lambda f: f) if opt else (lambda f: f[..., n]),
                   dx=(lambda f: f[rows]) if sp else (lambda f: f),
                   dA=lambda f: f, dB=lambda f: f[n])
        out["dy"] = out["y"](full["dy"])
    elif kind == "row":
        k = slice(rank * K // t, (rank + 1) * K // t)
        out = dict(W=full["W"][:, k], A=full["A"][:, k], B=full["B"], bias=full["bias"],
                   x=full["x"][..., k] if opt else full["x"],
                   y=lambda f: f[rows if sp else allr],
                   dx=(lambda f: f[..., k]) if opt else (lambda f: f),
                   dA=lambda f: f[:, k], dB=lambda f: f)
        out["dy"] = out["y"](full["dy"])
    else:
        raise ValueError(kind)
    return out


def dense_grads(full: dict[str, torch.Tensor], dtype: torch.dtype, lora_dtype: torch.dtype, *, bias: bool,
                scale: float, p: float, seed: int, compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``lora_dense`` on the full matrices: y, dx, dA, dB.

    The inputs are rounded to ``dtype`` (x, W, bias, dy) and ``lora_dtype`` (A, B); the math then
    runs in ``compute_dtype`` (default ``dtype``). ``compute_dtype=float64`` with low-precision
    inputs gives the error that rounding the inputs alone causes.
    """
    cdt = compute_dtype or dtype
    lcdt = compute_dtype or lora_dtype

    def rounded(t, dt, cd):
        return t.to(dt).to(cd).clone()

    x = rounded(full["x"], dtype, cdt).requires_grad_()
    a = rounded(full["A"], lora_dtype, lcdt).requires_grad_()
    b = rounded(full["B"], lora_dtype, lcdt).requires_grad_()
    y = lora_dense(x, rounded(full["W"], dtype, cdt), a, b, bias=rounded(full["bias"], dtype, cdt) if bias else None,
                   scale=scale, dropout_p=p, seed=seed)
    y.backward(rounded(full["dy"], dtype, cdt))
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)


def run_parallel(impl: str, kind: str, loc: dict, *, group, t: int, sp: bool, opt: bool, dtype, lora_dtype,
                 bias: bool, scale: float, p: float, seed, backend: str | None) -> dict[str, torch.Tensor]:
    """One rank's fused (``impl="fused"``) or unfused reference forward+backward: y, dx, dA, dB.

    Under SP the replicated factor is marked ``sequence_parallel`` and its partial gradient is summed
    with ``sum_sequence_parallel_grads``, as a training loop without Megatron's finalize would do.
    """
    x = loc["x"].to(dtype).clone().requires_grad_()
    a = torch.nn.Parameter(loc["A"].to(lora_dtype).clone())
    b = torch.nn.Parameter(loc["B"].to(lora_dtype).clone())
    if sp and t > 1:
        (a if kind == "column" else b).sequence_parallel = True
    kw = dict(bias=loc["bias"].to(dtype) if bias else None, scale=scale, dropout_p=p, seed=seed,
              sequence_parallel=sp, group=group)
    kw["gather_output" if kind == "column" else "input_is_parallel"] = opt
    if impl == "fused":
        fn = column_parallel_lora if kind == "column" else row_parallel_lora
        kw["backend"] = backend
    else:
        fn = column_parallel_lora_reference if kind == "column" else row_parallel_lora_reference
    y = fn(x, loc["W"].to(dtype), a, b, **kw)
    y.backward(loc["dy"].to(dtype))
    sum_sequence_parallel_grads([a, b], group)
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
def equivalence_task(ctx, *, kind: str, sp: bool, opt: bool, bias: bool, dtype: str, lora_dtype: str, p: float,
                     seed: int, data_seed: int, shapes: Shapes, scale: float, backend: str) -> dict:
    """Fused fwd+bwd on this rank vs the fp64 dense math, and torch's own errors in ``dtype``.

    Returns:
        ``{"scale": {name: max |exact|}, "fused": {name: max abs err}}`` for name in y, dx, dA, dB, for
        this rank's slice; for fp16/bf16 also the max abs errors of ``reference`` (the unfused
        reference at this TP and dtype; with fp32 LoRA weights, the larger of it and the same with its
        LoRA branch in the activation dtype), ``dense`` (``lora_dense`` run in the dtype) and
        ``inputs`` (``lora_dense`` in fp64 on the inputs rounded to the dtype: the error that rounding
        the inputs alone makes, which every implementation in that dtype pays).
    """
    dt = DTYPES[dtype]
    ldt = torch.float32 if lora_dtype == "fp32" else dt
    full = full_problem(data_seed, shapes)
    loc = shard(kind, full, ctx.rank, ctx.tp, sp, opt)
    opts = dict(bias=bias, scale=scale, p=p, seed=seed)
    exact = dense_grads(full, torch.float64, torch.float64, **opts)
    exact = {n: loc[n](exact[n]) for n in GRADS}
    run = dict(group=ctx.group, t=ctx.tp, sp=sp, opt=opt, dtype=dt, lora_dtype=ldt, backend=backend, **opts)
    fused = run_parallel("fused", kind, loc, **run)
    out = {"scale": {n: exact[n].abs().max().item() if exact[n].numel() else 0.0 for n in GRADS},
           "fused": {n: abs_err(fused[n], exact[n]) for n in GRADS}}
    if dt != torch.float32:
        ref = run_parallel("reference", kind, loc, **run)
        low = dense_grads(full, dt, ldt, **opts)
        quant = dense_grads(full, dt, ldt, compute_dtype=torch.float64, **opts)
        out["reference"] = {n: abs_err(ref[n], exact[n]) for n in GRADS}
        if ldt != dt:
            # The fused path moves u (row) or du (column) through the base's collective buffer, in the
            # activation dtype; torch's analogue is the reference with its LoRA branch in that dtype.
            ref_low = run_parallel("reference", kind, loc, **{**run, "lora_dtype": dt})
            out["reference"] = {n: max(out["reference"][n], abs_err(ref_low[n].to(ldt), exact[n])) for n in GRADS}
        out["dense"] = {n: abs_err(loc[n](low[n]), exact[n]) for n in GRADS}
        out["inputs"] = {n: abs_err(loc[n](quant[n]), exact[n]) for n in GRADS}
    return out


def identity_adapter_task(ctx, *, kind: str, sp: bool, p: float, seed: int, T: int, K: int, scale: float,
                          backend: str) -> dict:
    """An adapter that exposes the mask: W = 0, A = B = I (r = N = K), no bias, fp32.

    Then ``y = s · x ⊙ M / (1-p)`` and ``dx = s · dy ⊙ M / (1-p)``: the zeros of y are the forward's
    dropped elements and the zeros of dx are the mask that backward regenerated.

    Returns:
        This rank's ``y, dx, dA, dB`` and the fp64 oracle's slices of them (``exact_*``), as CPU
        tensors; ``keep_y``, ``keep_dx``: this rank's slices of ``mask.keep_mask`` in y's and dx's
        layouts.
    """
    g = torch.Generator().manual_seed(1234)
    eye = torch.eye(K, dtype=torch.float64)
    full = dict(x=torch.randn(T, 1, K, generator=g, dtype=torch.float64), W=torch.zeros(K, K, dtype=torch.float64),
                A=eye, B=eye, bias=torch.zeros(K, dtype=torch.float64),
                dy=torch.randn(T, 1, K, generator=g, dtype=torch.float64))
    opt = kind == "column"  # column gathers y; row takes the full x and gathers dx: y and dx span all of K
    loc = shard(kind, full, ctx.rank, ctx.tp, sp, opt)
    opts = dict(bias=False, scale=scale, p=p, seed=seed)
    exact = dense_grads(full, torch.float64, torch.float64, **opts)
    got = run_parallel("fused", kind, loc, group=ctx.group, t=ctx.tp, sp=sp, opt=opt, dtype=torch.float32,
                       lora_dtype=torch.float32, backend=backend, **opts)
    keep = keep_mask(seed, 0, T, 0, K, dropout_threshold(p)).view(T, 1, K)
    out = {n: got[n] for n in GRADS}
    out.update({f"exact_{n}": loc[n](exact[n]) for n in GRADS})
    out["keep_y"] = loc["y"](keep)
    out["keep_dx"] = loc["dx"](keep)
    return out


# ---------------------------------------------------------------------------------------------
# Collective counts
# ---------------------------------------------------------------------------------------------
def count_c10d(fn) -> dict[str, int]:
    """Run ``fn()`` under torch.profiler; count events whose name starts with ``c10d::``, by name."""
    from torch.profiler import ProfilerActivity, profile

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
    sh = Shapes(S=8, Bt=2, K=16, N=12, r=3)
    full = full_problem(7, sh)
    loc = shard(kind, full, ctx.rank, ctx.tp, sp, opt)
    W = loc["W"].float()
    bias = loc["bias"].float()
    mode = dict(sequence_parallel=sp, group=ctx.group)
    mode["gather_output" if kind == "column" else "input_is_parallel"] = opt

    def call(impl, x, a, b):
        if impl == "base":
            return base_parallel_linear(x, W, kind=kind, bias=bias, **mode)
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

        if impl == "base" and not x_grad:
            # The frozen base alone has nothing to differentiate without x's grad: backward-free.
            out[impl] = {"fwd": count_c10d(fwd), "fwdbwd": count_c10d(fwd)}
            continue
        out[impl] = {"fwd": count_c10d(fwd), "fwdbwd": count_c10d(fwdbwd)}
    return out


def sp_grad_sum_task(ctx, *, sp: bool) -> tuple[dict[str, int], int, bool]:
    """``sum_sequence_parallel_grads`` on two marked fp32 params and one unmarked one.

    Returns:
        (collective counts, number of grads summed, whether marked grads equal the sum over ranks
        and the unmarked one is untouched).
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
    ranks = range(1, ctx.tp + 1)
    ok = True
    for i, prm in enumerate(params):
        marked = sp and i < 2
        want = sum(r + 10 * i for r in ranks) if marked else ctx.rank + 1 + 10 * i
        ok = ok and bool((prm.grad == want).all())
    return counts, summed[0], ok


# ---------------------------------------------------------------------------------------------
# Modules around real megatron-core layers
# ---------------------------------------------------------------------------------------------
def _gather_dim(t: torch.Tensor, dim: int, group, tp: int) -> torch.Tensor:
    """All-gather this rank's shard along ``dim`` (test-side only; gloo on CPU)."""
    import torch.distributed as dist

    if tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def build_module(ctx, *, kind: str, sp: bool, opt: bool, bias: bool, skip_bias_add: bool, K: int, N: int,
                 params_dtype=torch.float32, base_seed: int = 0, lora_seed: int = 1, **lora_kwargs):
    """A megatron-core Column/RowParallelLinear on ``ctx.group`` wrapped in our module.

    ``torch.manual_seed`` is set to ``base_seed`` before the base layer and to ``lora_seed`` before
    the wrapper, on every rank, as Megatron seeds the default generator alike on all TP ranks.
    """
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA

    cfg = ModelParallelConfig(tensor_model_parallel_size=ctx.tp, sequence_parallel=sp and ctx.tp > 1,
                              use_cpu_initialization=True, params_dtype=params_dtype)

    def init(w):
        return torch.nn.init.normal_(w, std=K ** -0.5)

    torch.manual_seed(base_seed)
    if kind == "column":
        base = ColumnParallelLinear(K, N, config=cfg, init_method=init, bias=bias, gather_output=opt,
                                    skip_bias_add=skip_bias_add, tp_group=ctx.group)
        if bias:
            with torch.no_grad():
                base.bias.normal_()
        torch.manual_seed(lora_seed)
        return ColumnParallelLoRA(base, **lora_kwargs)
    base = RowParallelLinear(K, N, config=cfg, init_method=init, bias=bias, input_is_parallel=opt,
                             skip_bias_add=skip_bias_add, tp_group=ctx.group)
    if bias:
        with torch.no_grad():
            base.bias.normal_()
    torch.manual_seed(lora_seed)
    return RowParallelLoRA(base, **lora_kwargs)


def full_factors(ctx, layer) -> dict[str, torch.Tensor]:
    """Gathered full W [N, K], bias [N] (or None), A [r, K] and B [N, r] of an adapted layer."""
    kind, tp, g = layer.kind, ctx.tp, ctx.group
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    if kind == "column":
        return dict(W=_gather_dim(base.weight, 0, g, tp), A=a.detach().clone(), B=_gather_dim(b, 0, g, tp),
                    bias=_gather_dim(bias, 0, g, tp) if bias is not None else None)
    return dict(W=_gather_dim(base.weight, 1, g, tp), A=_gather_dim(a, 1, g, tp), B=b.detach().clone(), bias=bias)


def module_contract_task(ctx, *, kind: str, sp: bool, opt: bool, bias: bool, skip_bias_add: bool, r: int,
                         alpha: float, rslora: bool, backend: str) -> dict:
    """Construction and forward contract of one adapted layer, and its fwd+bwd vs the fp64 math.

    Returns shapes, flags and errors (see ``tests/test_modules.py``); B is initialised non-zero
    (``init_lora_weights=False``) so that the LoRA branch shows in the output.
    """
    S, Bt, K, N = 8, 3, 24, 20
    layer = build_module(ctx, kind=kind, sp=sp, opt=opt, bias=bias, skip_bias_add=skip_bias_add, K=K, N=N, r=r,
                         lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False, backend=backend)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = dict(
        state_keys=sorted(layer.state_dict().keys()),
        a_shape=tuple(a.shape), b_shape=tuple(b.shape),
        base_frozen=all(not prm.requires_grad for prm in base.parameters()),
        lora_trainable=a.requires_grad and b.requires_grad,
        scaling=layer.scaling["default"],
        a_sp=getattr(a, "sequence_parallel", False), b_sp=getattr(b, "sequence_parallel", False),
    )
    full = full_factors(ctx, layer)
    g = torch.Generator().manual_seed(5)
    x_full = torch.randn(S, Bt, K, generator=g, dtype=torch.float64)
    dy_full = torch.randn(S, Bt, N, generator=g, dtype=torch.float64)
    f64 = {k: v.double() if v is not None else None for k, v in full.items()}
    if f64["bias"] is None:
        f64["bias"] = torch.zeros(N, dtype=torch.float64)
    f64.update(x=x_full, dy=dy_full)
    loc = shard(kind, f64, ctx.rank, ctx.tp, sp, opt)
    x = loc["x"].float().clone().requires_grad_()
    layer.train()
    y, y_bias = layer(x)
    out["out_shape"], out["x_shape"] = tuple(y.shape), tuple(x.shape)
    out["bias_is_base_bias"] = y_bias is not None and y_bias is base.bias
    out["bias_returned"] = y_bias is not None
    y.backward(loc["dy"].float())
    summed = sum_sequence_parallel_grads(layer.parameters(), ctx.group)
    out["sp_summed"] = summed
    out["base_grads"] = [prm.grad is not None for prm in base.parameters()]
    # The oracle: the bias is in the output only when the base does not skip adding it.
    xe = x_full.clone().requires_grad_()
    ae, be = f64["A"].clone().requires_grad_(), f64["B"].clone().requires_grad_()
    add_bias = bias and not skip_bias_add
    ye = lora_dense(xe, f64["W"], ae, be, bias=f64["bias"] if add_bias else None,
                    scale=alpha / (math.sqrt(r) if rslora else r))
    ye.backward(dy_full)
    exact = dict(y=ye.detach(), dx=xe.grad, dA=ae.grad, dB=be.grad)
    got = dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)
    out["errors"] = {n: rel_err(got[n], loc[n](exact[n])) for n in GRADS}
    return out


def module_init_task(ctx, *, kind: str, init, r: int, lora_seed: int) -> dict:
    """The full A and B an adapted layer holds (gathered over TP) after ``torch.manual_seed(lora_seed)``."""
    layer = build_module(ctx, kind=kind, sp=False, opt=kind == "row", bias=False, skip_bias_add=False, K=32, N=24,
                         r=r, init_lora_weights=init, lora_seed=lora_seed, backend="torch")
    full = full_factors(ctx, layer)
    return dict(A=full["A"], B=full["B"])


def module_seed_task(ctx, *, kind: str, sp: bool, p: float, seeds: list[int], backend: str) -> dict:
    """Training-mode forwards after ``torch.manual_seed(s)`` for each s, and the fp64 math for each
    with the seed that ``functional.draw_seed`` draws after the same ``manual_seed``; one eval forward."""
    from tplora_kernels.functional import draw_seed

    layer = build_module(ctx, kind=kind, sp=sp, opt=kind == "row", bias=False, skip_bias_add=False, K=24, N=16,
                         r=4, lora_alpha=8.0, lora_dropout=p, init_lora_weights=False, backend=backend)
    full = {k: v.double() if v is not None else None for k, v in full_factors(ctx, layer).items()}
    g = torch.Generator().manual_seed(9)
    full.update(x=torch.randn(8, 2, 24, generator=g, dtype=torch.float64),
                dy=torch.zeros(8, 2, 16, dtype=torch.float64), bias=torch.zeros(16, dtype=torch.float64))
    loc = shard(kind, full, ctx.rank, ctx.tp, sp, kind == "row")
    x = loc["x"].float()
    outs, errs = [], []
    layer.train()
    for s in seeds:
        torch.manual_seed(s)
        with torch.no_grad():
            y, _ = layer(x)
        outs.append(y)
        torch.manual_seed(s)
        drawn = int(draw_seed("cpu").item())
        want = lora_dense(full["x"], full["W"], full["A"], full["B"], scale=layer.scaling["default"], dropout_p=p,
                          seed=drawn)
        errs.append(rel_err(y, loc["y"](want)))
    layer.eval()
    with torch.no_grad():
        y_eval, _ = layer(x)
    want = lora_dense(full["x"], full["W"], full["A"], full["B"], scale=layer.scaling["default"])
    return dict(outs=outs, errs=errs, eval_err=rel_err(y_eval, loc["y"](want)))
