"""ColumnParallelLoRA / RowParallelLoRA around real megatron-core layers, at TP 1, 2 and 4.

The contract of the wrapped layer (``(output, bias)`` like the base, frozen base, PEFT's
state-dict keys, shard shapes, scaling), its forward and backward against the fp64 math on the
gathered full matrices, TP-invariant initialisation, and the per-call dropout seed drawn from
torch's default generator. Per-rank checks run on the ranks; comparisons across TP sizes here.
"""

from __future__ import annotations

import math

import pytest
import torch

from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA, draw_seed
from tplora_kernels.distributed import sum_sequence_parallel_grads
from tplora_kernels.layout import layout_for
from tplora_kernels.reference import lora_dense

from ..support import layers
from ..support.checks import assert_within, rel_err
from ..support.harness import cpu_kernel_backend
from ..support.problems import GRADS, shard

S, BT, K, N = 8, 3, 24, 20  # module_contract_task's sizes
R, ALPHA = 4, 8.0

# (kind, sequence_parallel, gather_output / input_is_parallel). Megatron allows no SP with a
# non-parallel row input, and its column layer gathers no output under SP.
MODES = [("column", False, False), ("column", False, True), ("column", True, False),
         ("row", False, True), ("row", False, False), ("row", True, True)]
CONTRACT = ([(tp, m, "bias", False) for tp in (1, 2, 4) for m in MODES]
            + [(2, m, bias, False) for m in MODES for bias in ("skip_bias_add", "no_bias")]
            + [(4, m, "bias", True) for m in (MODES[0], MODES[5])])


def _mode_id(m) -> str:
    kind, sp, opt = m
    return f"{kind}-sp_{'on' if sp else 'off'}-{'gather_output' if kind == 'column' else 'input_is_parallel'}_{opt}"


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def build_module(ctx, *, kind: str, sp: bool, opt: bool, bias: bool, skip_bias_add: bool, K: int, N: int,
                 params_dtype=torch.float32, base_seed: int = 0, lora_seed: int = 1, **lora_kwargs):
    """A megatron-core Column/RowParallelLinear on ``ctx.group`` wrapped in our module.

    ``torch.manual_seed`` is set to ``base_seed`` before the base layer and to ``lora_seed`` before
    the wrapper, on every rank, as Megatron seeds the default generator alike on all TP ranks.
    """
    def init(w):
        return torch.nn.init.normal_(w, std=K ** -0.5)

    make, wrap, mode = ((layers.column, ColumnParallelLoRA, {"gather_output": opt}) if kind == "column" else
                        (layers.row, RowParallelLoRA, {"input_is_parallel": opt}))
    base = make(ctx.group, ctx.tp, K, N, sp=sp and ctx.tp > 1, seed=base_seed, bias=bias, dtype=params_dtype,
                skip_bias_add=skip_bias_add, init=init, **mode)
    if bias:
        with torch.no_grad():
            base.bias.normal_()
    torch.manual_seed(lora_seed)
    return wrap(base, **lora_kwargs)


def full_factors(ctx, kind: str, layer) -> dict[str, torch.Tensor]:
    """Gathered full W [N, K], bias [N] (or None), A [r, K] and B [N, r] of an adapted layer of ``kind``."""
    W, bias = layers.full_base(layer)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    A, B = layout_for(kind).gather_factors(a, b, ctx.group)
    return dict(W=W, bias=bias, A=A.clone(), B=B.clone())


def module_contract_task(ctx, *, kind: str, sp: bool, opt: bool, bias: bool, skip_bias_add: bool, r: int,
                         alpha: float, rslora: bool, backend: str) -> None:
    """Construction and forward contract of one adapted layer, and its fwd+bwd vs the fp64 math, on this rank.

    B is initialised non-zero (``init_lora_weights=False``) so that the LoRA branch shows in the output.
    """
    layer = build_module(ctx, kind=kind, sp=sp, opt=opt, bias=bias, skip_bias_add=skip_bias_add, K=K, N=N, r=r,
                         lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False, backend=backend)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    tp = ctx.tp
    at = f"rank {ctx.rank} {kind} tp={tp} sp={sp} opt={opt} bias={bias} skip_bias_add={skip_bias_add} rslora={rslora}"
    sp_on = sp and tp > 1
    keys = sorted(layer.state_dict().keys())
    for key in ("lora_A.default.weight", "lora_B.default.weight"):
        assert key in keys, f"{at}: state_dict lacks {key!r}: {keys}"
    want_a = (r, K) if kind == "column" else (r, K // tp)
    want_b = (N // tp, r) if kind == "column" else (N, r)
    assert tuple(a.shape) == want_a, f"{at}: lora_A shard {tuple(a.shape)}, expected {want_a}"
    assert tuple(b.shape) == want_b, f"{at}: lora_B shard {tuple(b.shape)}, expected {want_b}"
    assert all(not prm.requires_grad for prm in base.parameters()), f"{at}: a base parameter still requires grad"
    assert a.requires_grad and b.requires_grad, f"{at}: a LoRA factor does not require grad"
    want_scaling = alpha / (math.sqrt(r) if rslora else r)
    assert layer.scaling["default"] == pytest.approx(want_scaling, rel=1e-12), (
        f"{at}: scaling {layer.scaling['default']}, expected alpha/{'sqrt(r)' if rslora else 'r'} = {want_scaling}")
    marked, other = (a, b) if kind == "column" else (b, a)
    assert getattr(marked, "sequence_parallel", False) == sp_on and not getattr(other, "sequence_parallel", False), (
        f"{at}: sequence_parallel marks A={getattr(a, 'sequence_parallel', False)} "
        f"B={getattr(b, 'sequence_parallel', False)}, expected only the replicated factor under SP")

    full = full_factors(ctx, kind, layer)
    g = torch.Generator().manual_seed(5)
    x_full = torch.randn(S, BT, K, generator=g, dtype=torch.float64)
    dy_full = torch.randn(S, BT, N, generator=g, dtype=torch.float64)
    f64 = {k: v.double() if v is not None else None for k, v in full.items()}
    if f64["bias"] is None:
        f64["bias"] = torch.zeros(N, dtype=torch.float64)
    f64.update(x=x_full, dy=dy_full)
    loc = shard(kind, f64, ctx.rank, tp, sp, opt)
    x = loc["x"].float().clone().requires_grad_()
    layer.train()
    y, y_bias = layer(x)
    rows = S * BT // tp if sp_on and kind == "row" else S * BT
    width = N if kind == "row" or opt else N // tp
    assert (y.shape[0] * y.shape[1], y.shape[-1]) == (rows, width), (
        f"{at}: output {tuple(y.shape)} for input {tuple(x.shape)}, expected {rows} rows of width {width}")
    assert (y_bias is not None) == skip_bias_add, (
        f"{at}: forward returned bias={y_bias is not None}, skip_bias_add={skip_bias_add}")
    if skip_bias_add:
        assert y_bias is base.bias, f"{at}: the returned bias is not the base layer's bias parameter"
    y.backward(loc["dy"].float())
    summed = sum_sequence_parallel_grads(layer.parameters(), ctx.group)
    assert summed == (1 if sp_on else 0), f"{at}: sum_sequence_parallel_grads summed {summed}"
    base_grads = [prm.grad is not None for prm in base.parameters()]
    assert not any(base_grads), f"{at}: base parameters got gradients {base_grads}"
    # The oracle: the bias is in the output only when the base does not skip adding it.
    xe = x_full.clone().requires_grad_()
    ae, be = f64["A"].clone().requires_grad_(), f64["B"].clone().requires_grad_()
    ye = lora_dense(xe, f64["W"], ae, be, bias=f64["bias"] if bias and not skip_bias_add else None,
                    scale=want_scaling)
    ye.backward(dy_full)
    exact = dict(y=ye.detach(), dx=xe.grad, dA=ae.grad, dB=be.grad)
    got = dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)
    for n in GRADS:
        assert_within(f"{n} {at} vs fp64 on the gathered layer", rel_err(got[n], loc[n](exact[n])))


def module_init_task(ctx, *, kind: str, init, r: int, lora_seed: int) -> dict:
    """The full A and B an adapted layer holds (gathered over TP) after ``torch.manual_seed(lora_seed)``."""
    layer = build_module(ctx, kind=kind, sp=False, opt=kind == "row", bias=False, skip_bias_add=False, K=32, N=24,
                         r=r, init_lora_weights=init, lora_seed=lora_seed, backend="torch")
    full = full_factors(ctx, kind, layer)
    return dict(A=full["A"], B=full["B"])


def module_seed_task(ctx, *, kind: str, sp: bool, p: float, seeds: list[int], backend: str) -> None:
    """Training-mode forwards after ``torch.manual_seed(s)`` for each s, on this rank.

    Same seed => the same output, another => another mask; each output equals the fp64 math with
    the seed that ``draw_seed`` draws after the same ``manual_seed``; eval applies no dropout.
    """
    layer = build_module(ctx, kind=kind, sp=sp, opt=kind == "row", bias=False, skip_bias_add=False, K=24, N=16,
                         r=4, lora_alpha=8.0, lora_dropout=p, init_lora_weights=False, backend=backend)
    full = {k: v.double() if v is not None else None for k, v in full_factors(ctx, kind, layer).items()}
    g = torch.Generator().manual_seed(9)
    full.update(x=torch.randn(8, 2, 24, generator=g, dtype=torch.float64),
                dy=torch.zeros(8, 2, 16, dtype=torch.float64), bias=torch.zeros(16, dtype=torch.float64))
    loc = shard(kind, full, ctx.rank, ctx.tp, sp, kind == "row")
    x = loc["x"].float()
    at = f"rank {ctx.rank} {kind} tp={ctx.tp} sp={sp}"
    outs = []
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
        assert_within(f"{at} manual_seed({s}): output vs fp64 with the seed draw_seed draws",
                      rel_err(y, loc["y"](want)))
    assert torch.equal(outs[0], outs[1]), f"{at}: same manual_seed gave different outputs"
    assert not torch.equal(outs[0], outs[2]), f"{at}: different manual_seed gave the same output"
    layer.eval()
    with torch.no_grad():
        y_eval, _ = layer(x)
    want = lora_dense(full["x"], full["W"], full["A"], full["B"], scale=layer.scaling["default"])
    assert_within(f"{at}: eval output vs no dropout", rel_err(y_eval, loc["y"](want)))


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tp", "mode", "bias_mode", "rslora"), CONTRACT,
                         ids=[f"tp{t}-{_mode_id(m)}-{b}{'-rslora' if rs else ''}" for t, m, b, rs in CONTRACT])
def test_module_contract(dist_pool, kernel_backend, tp, mode, bias_mode, rslora):
    """In every mode at TP 1/2/4 (bias, skip_bias_add, no bias, rsLoRA) the wrapped layer keeps the
    base's (output, bias) contract, freezes the base, has PEFT's keys and shard shapes, and its
    forward and backward equal the fp64 math on the gathered full matrices.
    """
    kind, sp, opt = mode
    dist_pool.run(module_contract_task, tp, kind=kind, sp=sp, opt=opt, bias=bias_mode != "no_bias",
                  skip_bias_add=bias_mode == "skip_bias_add", r=R, alpha=ALPHA, rslora=rslora,
                  backend=cpu_kernel_backend(kernel_backend))


@pytest.mark.parametrize("init", [True, "gaussian"], ids=["kaiming", "gaussian"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_init_is_tp_invariant(dist_pool, kind, init):
    """With the same ``torch.manual_seed`` before construction, TP=2 and TP=4 hold the TP=1 model."""
    one = dist_pool.run(module_init_task, 1, kind=kind, init=init, r=6, lora_seed=77)[0]
    assert torch.count_nonzero(one["B"]) == 0, f"{kind} init={init}: B is not zero at init"
    assert one["A"].std() > 0, f"{kind} init={init}: A is constant"
    for tp in (2, 4):
        for rank, res in enumerate(dist_pool.run(module_init_task, tp, kind=kind, init=init, r=6, lora_seed=77)):
            assert torch.equal(res["A"], one["A"]), (
                f"{kind} init={init} tp={tp} rank {rank}: gathered A differs from TP=1's "
                f"(std {res['A'].std():.4f} vs {one['A'].std():.4f})")
            assert torch.equal(res["B"], one["B"]), f"{kind} init={init} tp={tp} rank {rank}: B differs from TP=1's"
    other = dist_pool.run(module_init_task, 1, kind=kind, init=init, r=6, lora_seed=78)[0]
    assert not torch.equal(other["A"], one["A"]), f"{kind} init={init}: another seed gave the same A"


SEED_CASES = [("column", 1, False), ("column", 2, True), ("column", 4, False), ("row", 2, False), ("row", 4, True)]


@pytest.mark.parametrize(("kind", "tp", "sp"), SEED_CASES, ids=[f"{k}-tp{t}-sp_{'on' if s else 'off'}"
                                                               for k, t, s in SEED_CASES])
def test_dropout_seed_comes_from_the_default_generator(dist_pool, kernel_backend, kind, tp, sp):
    """Same ``torch.manual_seed`` => the same output; a different one => a different mask (checked on each rank)."""
    dist_pool.run(module_seed_task, tp, kind=kind, sp=sp, p=0.5, seeds=[11, 11, 12],
                  backend=cpu_kernel_backend(kernel_backend))
