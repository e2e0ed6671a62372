"""Failure modes: what is refused, alike on every rank, and what stays exact on odd but valid input.

1. Refusals. An invalid call, base layer, option or adapter file raises the same clear error on
   every rank, before any collective (so no rank waits for a peer that raised); a refused load or
   merge changes nothing; errors of a write one rank does reach every rank.
2. Odd but valid inputs (strides, sizes, NaN/Inf, T = 0, numpy scalars, autocast, fp16 with fp32
   factors, in-place use of the output) give what the unfused reference or the plain call gives.
3. Determinism: the same seed gives the same bits; recompute redraws the same dropout mask.

Rank functions sit beside the tests that run them and assert on their rank (a failed assertion
comes back as ``RankFailed`` naming the rank); that every rank raised the same error is checked in
the test process. The kernel-level cases (huge mask indices, int64 offsets, autotuning that never
varies a reduction block) are in ``tests/ops``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint as ckpt
from megatron.core.tensor_parallel import checkpoint
from megatron.core.tensor_parallel import random as mrandom
from safetensors.torch import save_file

from tplora_kernels import (
    ColumnParallelLoRA,
    RowParallelLoRA,
    column_parallel_lora,
    load_adapter,
    row_parallel_lora,
    save_adapter,
)
from tplora_kernels.distributed import sum_sequence_parallel_grads
from tplora_kernels.reference import column_parallel_lora_reference, lora_dense, row_parallel_lora_reference

from ..support.checks import assert_within, rel_err
from ..support.harness import RemoteError
from ..support.layers import column, row
from ..support.problems import weights

TP = 2
NO_HANG_S = 90  # the pool restarts and the test fails if any rank is still busy after this
GRADS = ("y", "dx", "dA", "dB")


# ---------------------------------------------------------------------------------------------
# Helpers and rank functions
# ---------------------------------------------------------------------------------------------
FNS = {"column": column_parallel_lora, "row": row_parallel_lora}


def _call(kind, x, p, *, fused=True, sp=False, opt=False, group=None, backend="torch", seed=7, scale=0.5):
    mode = {"gather_output": opt} if kind == "column" else {"input_is_parallel": opt}
    fn = {("column", True): column_parallel_lora, ("row", True): row_parallel_lora,
          ("column", False): column_parallel_lora_reference, ("row", False): row_parallel_lora_reference}[kind, fused]
    extra = {"backend": backend} if fused else {}
    return fn(x, p["weight"], p["lora_a"], p["lora_b"], bias=p["bias"], scale=scale, dropout_p=0.25, seed=seed,
              sequence_parallel=sp, group=group, **mode, **extra)


def _trainable(p: dict) -> dict:
    """Fresh copies of ``weights``' tensors; the LoRA factors require grad."""
    return {n: v.detach().clone().requires_grad_(n.startswith("lora")) for n, v in p.items()}


def _mlp(group, tp: int, *, rslora_fc2: bool = False):
    """A two-layer megatron MLP wrapped in our modules (fc1 column, fc2 row), identical on every rank."""
    torch.manual_seed(3)
    fc1 = column(group, tp, 16, 24, seed=None, bias=False, init=torch.nn.init.normal_)
    fc2 = row(group, tp, 24, 16, seed=None, bias=False, init=torch.nn.init.normal_)
    model = torch.nn.Module()
    model.fc1 = ColumnParallelLoRA(fc1, r=4, init_lora_weights=False)
    model.fc2 = RowParallelLoRA(fc2, r=4, init_lora_weights=False, use_rslora=rslora_fc2)
    return model


# ---------------------------------------------------------------------------------------------
# 1. Refusals: every rank raises the same clear error before any collective, and nothing
#    changes.
# ---------------------------------------------------------------------------------------------
def bad_call(ctx, case: str, kind: str = "column"):
    """Make one invalid call; every rank must raise before any collective."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 16, 8, 4
    p = weights(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    x = torch.randn(4, 2, k_in)
    kw = {"group": ctx.group, "backend": "torch"}
    fn = column_parallel_lora if kind == "column" else row_parallel_lora
    args = dict(bias=p["bias"], scale=0.5, dropout_p=0.1, seed=3, sequence_parallel=True)
    if case == "hidden":
        x = torch.randn(4, 2, k_in + 1)
    elif case == "seq_not_divisible":
        x = torch.randn(3, 2, k_in)
    elif case == "int_dtype":
        x = torch.ones(4, 2, k_in, dtype=torch.int32)
    elif case == "dtype_mismatch":
        x = x.half()
    elif case == "device":
        x = torch.empty(4, 2, k_in, device="meta")
    elif case == "rank_zero":
        p["lora_a"], p["lora_b"] = p["lora_a"][:0], p["lora_b"][:, :0]
    elif case == "dropout":
        args["dropout_p"] = 1.0
    elif case == "scale":
        args["scale"] = float("nan")
    elif case == "frozen":
        p["weight"].requires_grad_(True)
    elif case == "expert_sp":
        args["explicit_comm"] = True  # an expert layer's dispatcher communicates: no SP of its own
    else:
        raise AssertionError(f"unknown case {case}")
    fn(x, p["weight"], p["lora_a"], p["lora_b"], **args, **kw)
    return "no error"


BAD_CALLS = [
    # (case, kind, exception type, words the message must contain)
    ("hidden", "column", "ValueError", ["hidden size", "16"]),
    ("hidden", "row", "ValueError", ["hidden size", "8"]),
    ("seq_not_divisible", "row", "ValueError", ["sequence_parallel", "divisible", "(3, 2, 8)"]),
    ("int_dtype", "column", "TypeError", ["x must be", "int32"]),
    ("dtype_mismatch", "row", "TypeError", ["torch.float16", "torch.float32"]),
    ("device", "column", "ValueError", ["device", "meta"]),
    ("rank_zero", "column", "ValueError", ["r must be >= 1"]),
    ("dropout", "row", "ValueError", ["dropout_p", "[0, 1)", "1.0"]),
    ("scale", "column", "ValueError", ["scale", "nan"]),
    ("frozen", "row", "ValueError", ["frozen"]),
    ("expert_sp", "column", "ValueError", ["explicit_comm", "sequence_parallel"]),
]


def _assert_symmetric_error(results, exc: str, words: list[str], what: str) -> None:
    assert all(isinstance(r, RemoteError) for r in results), f"{what}: some rank did not raise: {results}"
    types = {r.type_name for r in results}
    msgs = {r.message for r in results}
    assert types == {exc}, f"{what}: expected {exc} on every rank, got {types}"
    assert len(msgs) == 1, f"{what}: ranks disagree on the message: {msgs}"
    msg = msgs.pop()
    missing = [w for w in words if w not in msg]
    assert not missing, f"{what}: message {msg!r} lacks {missing}"


@pytest.mark.parametrize(("case", "kind", "exc", "words"), BAD_CALLS, ids=[f"{c}-{k}" for c, k, _, _ in BAD_CALLS])
def test_bad_call_raises_on_every_rank(dist_pool, case, kind, exc, words):
    """An invalid functional call raises the same error, naming the problem, on every rank, before
    any collective (none hangs).
    """
    res = dist_pool.run(bad_call, TP, timeout=NO_HANG_S, raise_errors=False, case=case, kind=kind)
    _assert_symmetric_error(res, exc, words, f"{case}/{kind} tp={TP}")


def bad_module(ctx, case: str):
    """Module-level misuse: every rank must raise the same, before any collective."""
    base = column(ctx.group, ctx.tp, 16, 8, seed=None)
    if case == "not_megatron":
        ColumnParallelLoRA(torch.nn.Linear(16, 8), r=4)
    elif case == "disable_grad_reduce":
        base.disable_grad_reduce = True
        ColumnParallelLoRA(base, r=4)
    elif case == "gtp_remat_size":
        base.gtp_remat_size = 2
        ColumnParallelLoRA(base, r=4)
    elif case == "row_strided":
        base = row(ctx.group, ctx.tp, 16, 8, seed=None)
        base.weight.partition_stride = 2
        RowParallelLoRA(base, r=4)
    elif case == "r_zero":
        ColumnParallelLoRA(base, r=0)
    elif case == "dropout":
        ColumnParallelLoRA(base, r=4, lora_dropout=1.5)
    elif case == "alpha":
        ColumnParallelLoRA(base, r=4, lora_alpha=float("inf"))
    elif case == "adapter":
        ColumnParallelLoRA(base, r=4).set_adapter("nope")
    else:
        raise AssertionError(f"unknown case {case}")
    return "no error"


BAD_MODULES = [
    ("not_megatron", "TypeError", ["ColumnParallelLinear", "Linear"]),
    # Options the modules cannot reproduce are refused by name (explicit_expert_comm was one until
    # commit 137188c made expert layers supported).
    ("disable_grad_reduce", "UnsupportedBase", ["disable_grad_reduce=True"]),
    ("gtp_remat_size", "UnsupportedBase", ["gtp_remat_size=2"]),
    ("row_strided", "UnsupportedBase", ["partition_stride=2", "row-parallel"]),
    ("r_zero", "ValueError", ["r must be a positive int", "0"]),
    ("dropout", "ValueError", ["lora_dropout", "1.5"]),
    ("alpha", "ValueError", ["lora_alpha", "inf"]),
    ("adapter", "ValueError", ["unknown adapter", "'nope'", "default"]),
]


@pytest.mark.parametrize(("case", "exc", "words"), BAD_MODULES, ids=[c for c, _, _ in BAD_MODULES])
def test_bad_module_raises_on_every_rank(dist_pool, case, exc, words):
    """A base layer or option the modules cannot honour is refused alike on every rank, by name,
    before any collective.
    """
    res = dist_pool.run(bad_module, TP, timeout=NO_HANG_S, raise_errors=False, case=case)
    _assert_symmetric_error(res, exc, words, f"module {case} tp={TP}")


def merge_misuse(ctx, case: str) -> None:
    """Merging twice, or unmerging what is not merged: a warning, and the base weight intact."""
    base = column(ctx.group, ctx.tp, 16, 8, seed=None)
    layer = ColumnParallelLoRA(base, r=4, init_lora_weights=False)
    before = base.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case == "merge_twice":
            layer.merge()
            merged = base.weight.detach().clone()
            layer.merge()
            ok = torch.equal(base.weight, merged) and not torch.equal(merged, before)
        else:
            layer.unmerge()
            ok = torch.equal(base.weight, before)
    assert caught, f"{case} rank {ctx.rank}: no warning"
    assert ok, f"{case} rank {ctx.rank}: base weight changed (corrupted)"


@pytest.mark.parametrize("case", ["merge_twice", "unmerge_unmerged"])
def test_merge_misuse_warns_and_keeps_weights(dist_pool, case):
    """Merging twice or unmerging what is not merged warns and leaves the base weight as it was."""
    dist_pool.run(merge_misuse, TP, timeout=NO_HANG_S, case=case)


def bad_adapter_file(ctx, path: str):
    """load_adapter of a file whose shapes do not fit: returns the error; the model must be untouched."""
    model = torch.nn.Module()
    model.fc1 = ColumnParallelLoRA(column(ctx.group, ctx.tp, 16, 8, seed=None, bias=False), r=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    if ctx.rank == 0:  # full A must be [4, 16]; this one is [4, 12]
        os.makedirs(path, exist_ok=True)
        save_file({"base_model.model.fc1.lora_A.weight": torch.zeros(4, 12),
                   "base_model.model.fc1.lora_B.weight": torch.zeros(8, 4)},
                  os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc1"]}, f)
    dist.barrier(group=ctx.group)
    try:
        load_adapter(model, path, adapter_name="other")
        err = None
    except ValueError as e:
        err = str(e)
    after = {k: v for k, v in model.state_dict().items() if "lora" in k}
    untouched = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapters = sorted(model.fc1.lora_A)
    assert untouched and adapters == ["default"], (
        f"rank {ctx.rank}: a refused load changed the model (factors unchanged: {untouched}, adapters {adapters})")
    return err


def test_adapter_that_does_not_fit_is_refused_on_every_rank(dist_pool, tmp_path):
    """load_adapter of a file whose shapes do not fit raises the same error on every rank and changes nothing."""
    errors = set(dist_pool.run(bad_adapter_file, TP, timeout=NO_HANG_S, path=str(tmp_path / "bad")))
    assert len(errors) == 1 and None not in errors, f"ranks must raise the same error, got {errors}"
    msg = errors.pop()
    for word in ("fc1", "[4, 16]", "[4, 12]"):
        assert word in msg, f"message {msg!r} lacks {word!r}"


def _save_errors(ctx, path: str, case: str):
    model = _mlp(ctx.group, ctx.tp, rslora_fc2=case == "mixed_rslora")
    target = os.path.join(path, "adapter")
    if case == "unwritable":
        target = os.path.join(path, "a_file", "adapter")  # below a regular file: only the writer fails
        if ctx.rank == 0:
            open(os.path.join(path, "a_file"), "w").close()
        dist.barrier(group=ctx.group)
    save_adapter(model, target, group=ctx.group)
    return "no error"


@pytest.mark.parametrize(("case", "exc", "words"), [("mixed_rslora", "ValueError", "use_rslora"),
                                                      ("unwritable", "OSError", "failed")])
def test_save_adapter_error_raises_on_every_rank(dist_pool, tmp_path, case, exc, words):
    """A save_adapter error (invalid options, or a write only rank 0 attempts) reaches every rank:
    none waits forever.
    """
    results = dist_pool.run(_save_errors, 2, raise_errors=False, timeout=120, path=str(tmp_path), case=case)
    for rank, r in enumerate(results):
        assert isinstance(r, RemoteError), f"{case}: rank {rank} did not raise (it would hang its peers): {r}"
        assert r.type_name == exc and words in r.message, f"{case}: rank {rank} raised {r.type_name}: {r.message}"


def _save_with_dp(ctx, path: str):
    """World of 4 = two TP groups [0,1] and [2,3] (DP = 2); every rank saves, then loads at once."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
    tp_group = groups[ctx.rank // 2]
    model = _mlp(tp_group, 2)
    saved = save_adapter(model, path)  # default group: the whole job
    fresh = _mlp(tp_group, 2)
    with torch.no_grad():
        for m in (fresh.fc1, fresh.fc2):
            m.lora_A["default"].weight.zero_()
    load_adapter(fresh, path)  # right after: must see the file on every rank
    for name in ("fc1", "fc2"):
        got = getattr(fresh, name).lora_A["default"].weight
        want = getattr(model, name).lora_A["default"].weight
        assert torch.equal(got, want), f"rank {ctx.rank} {name}: loaded A differs from the saved one"
    return sorted(saved)


def test_save_adapter_with_data_parallel_ranks_waits_for_the_file(dist_pool, tmp_path):
    """With data-parallel replicas every rank returns from save_adapter once the file is written, so
    a load right after sees it.
    """
    keys = dist_pool.run(_save_with_dp, 4, timeout=120, path=str(tmp_path / "adapter"))
    # save_adapter returns what was written on the writing rank (the group's rank 0) only.
    assert len(keys[0]) == 4 and not any(keys[1:]), f"rank 0 must return the 4 keys written, the others none: {keys}"


def _load_over_merged(ctx, path: str):
    """Loading over an adapter that is merged in some layer: refused before any layer changes."""
    model = _mlp(ctx.group, ctx.tp)
    save_adapter(model, path, group=ctx.group)
    model.fc2.merge()  # one layer merged: loading "default" over it must not touch fc1 either
    before = {n: getattr(model, n).lora_A["default"].weight for n in ("fc1", "fc2")}
    try:
        load_adapter(model, path)
    except ValueError as e:
        unchanged = all(getattr(model, n).lora_A["default"].weight is w for n, w in before.items())
        return {"error": str(e), "unchanged": unchanged}
    return {"error": None, "unchanged": False}


def test_load_over_a_merged_adapter_changes_nothing(dist_pool, tmp_path):
    """Loading over an adapter merged in some layer is refused before any layer changes."""
    res = dist_pool.run(_load_over_merged, 2, timeout=120, path=str(tmp_path / "adapter"))
    for rank, r in enumerate(res):
        assert r["error"] and "merged" in r["error"], f"rank {rank}: loading over a merged adapter: {r['error']}"
        assert r["unchanged"], f"rank {rank}: a layer was replaced before the refusal"


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("loss", ["square", "linear"])
def test_double_backward_raises(kernel_backend, kind, backend, loss):
    """A backward that builds a graph (a gradient penalty) is refused, not silently wrong.

    With ``y.sum()`` as the first loss, dy needs no gradient, so ``once_differentiable`` let the
    penalty's gradient through without its terms through the layer (relative error 1.0 in the
    penalty's dA); ``y.square()`` raised only at the second backward. Both now raise at the first.
    """
    if backend == "interpret" and kernel_backend != "interpret":
        pytest.skip("the interpreter is off in this session (a GPU machine)")
    p = weights(kind, 0, 1, 16, 8, 4)
    x = torch.randn(6, 16, requires_grad=True)
    a = p["lora_a"].requires_grad_()
    y = FNS[kind](x, p["weight"], a, p["lora_b"], scale=0.5, backend=backend)
    first = y.square().sum() if loss == "square" else y.sum()
    with pytest.raises(RuntimeError, match=r"once-differentiable.*create_graph=True"):
        (gx,) = torch.autograd.grad(first, x, create_graph=True)
        torch.autograd.grad(gx.square().sum() + y.sum(), a)


@pytest.mark.parametrize("scale", [1e39, -1e39, float("inf")], ids=["1e39", "-1e39", "inf"])
def test_scale_beyond_fp32_is_refused(scale):
    """A scale that is not finite in fp32 is refused by name."""
    p = weights("column", 0, 1, 16, 8, 4)
    with pytest.raises(ValueError, match="scale must be finite and within fp32's range"):
        column_parallel_lora(torch.randn(4, 16), p["weight"], p["lora_a"], p["lora_b"], scale=scale)


def test_zero_input_features_is_a_clear_error():
    """K = 0 input features is refused by name, not a kernel error."""
    with pytest.raises(ValueError, match="input size must be >= 1"):
        column_parallel_lora(torch.randn(4, 0), torch.randn(8, 0), torch.randn(4, 0), torch.randn(8, 4))


# ---------------------------------------------------------------------------------------------
# 2. Odd but valid inputs give what the unfused reference (same mask) or the plain call gives.
# ---------------------------------------------------------------------------------------------
def odd_inputs(ctx, kind: str, case: str, backend: str) -> None:
    """Fused vs the unfused reference (same mask) on odd but valid inputs: same values, same NaN/Inf."""
    t, rank = ctx.tp, ctx.rank
    K, N, r, S, Bt = {"odd": (60, 36, 5, 6, 3), "r1": (16, 8, 1, 4, 2), "r128": (32, 16, 128, 4, 2)}.get(
        case, (16, 8, 4, 4, 2))
    p = weights(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    g = torch.Generator().manual_seed(11)
    if case == "noncontig":
        # Every other column of a NaN-filled buffer: a kernel that ignores strides reads NaN.
        buf = torch.full((S, Bt, 2 * k_in), float("nan"))
        buf[..., ::2] = torch.randn(S, Bt, k_in, generator=g)
        x = buf[..., ::2]
    elif case == "transposed":
        buf = torch.full((k_in, 2 * S * Bt), float("nan"))
        buf[:, ::2] = torch.randn(k_in, S * Bt, generator=g)
        x = buf[:, ::2].t()  # [T, K] with strides (2, 2T)
    else:
        x = torch.randn(S, Bt, k_in, generator=g)
    if case == "nan":
        x[1, 0, 3] = float("nan")
        x[2, 1, 5] = float("inf")
    out = {}
    for fused in (True, False):
        xx = x.detach().clone().requires_grad_(True) if case not in ("noncontig", "transposed") else \
            x.detach().requires_grad_(True)
        q = _trainable(p)
        y = _call(kind, xx, q, fused=fused, opt=True, group=ctx.group, backend=backend)
        g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        y.backward(g_out)
        out[fused] = {"y": y.detach(), "dx": xx.grad, "dA": q["lora_a"].grad, "dB": q["lora_b"].grad}
    for name in GRADS:
        what = f"{case} {kind} {backend} rank {rank} tp={t} {name}"
        a, b = out[True][name].double(), out[False][name].double()
        same_nan = bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)))
        assert same_nan, f"{what}: NaN/Inf pattern differs from the reference"
        fin = torch.isfinite(b)
        assert_within(what, rel_err(a[fin], b[fin]))  # the finite entries, whose NaN/Inf pattern matched
        if case == "nan" and name in ("y", "dA"):
            assert int((~fin).sum()) > 0, f"{what}: the NaN/Inf in x vanished (zeroed?)"


ODD = ["noncontig", "transposed", "r1", "r128", "odd", "nan"]


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("case", ODD)
def test_odd_inputs_match_reference(dist_pool, kernel_backend, case, kind, backend):
    """Odd but valid inputs (strided, transposed, r = 1 and 128, odd sizes, NaN/Inf) match the
    unfused reference with the same mask, NaN/Inf included.
    """
    if backend == "interpret":
        backend = kernel_backend
    tp = 4 if case == "odd" else TP  # odd: K=60 -> 15 per rank, N=36 -> 9 per rank
    dist_pool.run(odd_inputs, tp, kind=kind, case=case, backend=backend)


def empty_tokens(ctx, kind: str, sp: bool, opt: bool, backend: str) -> None:
    """T = 0: empty output of the right shape, zero LoRA grads, no crash, in every mode."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 16, 8, 4
    p = weights(kind, rank, t, K, N, r)
    k_in = K if (kind == "column" or not opt) else K // t
    x = torch.zeros(0, 2, k_in, requires_grad=True)
    q = _trainable(p)
    y = _call(kind, x, q, sp=sp, opt=opt, group=ctx.group, backend=backend)
    y.sum().backward()
    what = f"T=0 {kind} sp={sp} opt={opt} {backend} rank {rank}"
    n_out = N if kind == "row" or opt else N // t
    assert tuple(y.shape) == (0, 2, n_out), f"{what}: output shape {tuple(y.shape)}, expected {(0, 2, n_out)}"
    assert tuple(x.grad.shape) == (0, 2, k_in), f"{what}: dx shape {tuple(x.grad.shape)}, expected {(0, 2, k_in)}"
    dA, dB = float(q["lora_a"].grad.abs().sum()), float(q["lora_b"].grad.abs().sum())
    assert dA == 0.0 and dB == 0.0, f"{what}: LoRA grads not zero: |dA| {dA}, |dB| {dB}"


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_empty_tokens(dist_pool, kernel_backend, backend):
    """T = 0 tokens gives empty outputs of the right shapes and zero LoRA gradients in every mode."""
    backend = kernel_backend if backend == "interpret" else backend
    for kind in ("column", "row"):
        for sp in (False, True):
            for opt in (False, True):
                dist_pool.run(empty_tokens, TP, kind=kind, sp=sp, opt=opt, backend=backend)


def _in_place(ctx, kind: str, sp: bool, backend: str):
    t, rank = ctx.tp, ctx.rank
    p = weights(kind, rank, t, 16, 8, 4)
    a = p["lora_a"].requires_grad_()
    k_in = 16 if kind == "column" else 16 // t
    g = torch.Generator().manual_seed(1)
    x_full = torch.randn(8, 2, k_in, generator=g)
    x = x_full.chunk(t, dim=0)[rank] if sp and kind == "column" else x_full
    outs = []
    for how in ("add_", "dropout"):
        y = FNS[kind](x, p["weight"], a, p["lora_b"], scale=0.5, sequence_parallel=sp, group=ctx.group,
                      backend=backend)
        ref = y.detach().clone()
        if how == "add_":
            y.add_(1.0)
            assert torch.equal(y.detach(), ref + 1), f"rank {rank}: y.add_(1) did not add"
        else:
            y = torch.nn.functional.dropout(y, p=0.5, training=True, inplace=True)
        y.sum().backward()
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"rank {rank} {how}: no gradient after in-place"
        outs.append(how)
        a.grad = None
    return outs


@pytest.mark.parametrize(("kind", "tp", "sp"), [("row", 1, False), ("row", 2, False), ("row", 2, True),
                                                ("column", 2, True)])
def test_outputs_can_be_modified_in_place(dist_pool, kernel_backend, kind, tp, sp):
    """The outputs can be modified in place (add_, in-place dropout), as the base layers' can."""
    backend = "interpret" if kernel_backend == "interpret" else "torch"
    for rank, r in enumerate(dist_pool.run(_in_place, tp, kind=kind, sp=sp, backend=backend)):
        assert r == ["add_", "dropout"], f"{kind} tp={tp} sp={sp} rank {rank}: {r}"


@pytest.mark.parametrize("kind", ["column", "row"])
def test_numpy_and_tensor_scalars_are_accepted(kind):
    """numpy scalars and 0-d tensors for scale, dropout and seed (int64 extremes) give the same
    result as Python numbers.
    """
    p = weights(kind, 0, 1, 16, 8, 4)
    x = torch.randn(4, 16)
    want = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=0.5, dropout_p=0.25, seed=2**63 + 5,
                     backend="torch")
    for scale, drop, seed in ((np.float32(0.5), np.float64(0.25), np.uint64(2**63 + 5)),
                              (torch.tensor(0.5), torch.tensor(0.25), torch.tensor(-(2**63) + 5))):
        got = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=scale, dropout_p=drop, seed=seed,
                        backend="torch")
        assert torch.equal(got, want), f"{kind}: scale={scale!r} p={drop!r} seed={seed!r} changed the result"


def _inf_rows(ctx, backend: str):
    t, rank = ctx.tp, ctx.rank
    p = weights("row", rank, t, 16, 8, 4)
    b = p["lora_b"].requires_grad_()
    x = torch.randn(8, 2, 16 // t, generator=torch.Generator().manual_seed(2))
    y = row_parallel_lora(x, p["weight"], p["lora_a"], b, scale=0.5, sequence_parallel=True, group=ctx.group,
                          backend=backend)
    dy = torch.ones_like(y)
    if rank == 1:
        dy[0, 0, 0] = math.inf
    y.backward(dy)
    partial = b.grad.clone()
    b.sequence_parallel = True
    sum_sequence_parallel_grads([b], ctx.group)
    return partial, b.grad


def test_inf_in_another_ranks_rows_stays_out_of_this_ranks_db(dist_pool, kernel_backend):
    """Under row SP, an Inf in another rank's dy rows does not turn this rank's partial dB into NaN;
    the summed dB has NaN/Inf where the torch backend's has.
    """
    kernels = "interpret" if kernel_backend == "interpret" else "torch"
    got = dist_pool.run(_inf_rows, 2, backend=kernels)
    want = dist_pool.run(_inf_rows, 2, backend="torch")
    assert not torch.isnan(got[0][0]).any(), "rank 0's partial dB has NaN from rank 1's Inf rows"
    assert torch.isfinite(got[0][0]).all(), "rank 0's own rows are finite: its partial dB must be"
    summed, ref = got[0][1], want[0][1]
    assert torch.equal(torch.isnan(summed), torch.isnan(ref)) and torch.equal(torch.isinf(summed), torch.isinf(ref)), \
        "the summed dB must have NaN/Inf exactly where the torch backend's has"


@pytest.mark.parametrize("kind", ["column", "row"])
def test_autocast_does_not_change_what_is_computed(kernel_backend, kind):
    """Under autocast the fused ops compute in the inputs' dtype on every backend, as without it."""
    backends = ["torch"] + (["interpret"] if kernel_backend == "interpret" else [])
    p = weights(kind, 0, 1, 32, 16, 4)
    x = torch.randn(8, 32)
    plain = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=0.5, backend="torch")
    for backend in backends:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=0.5, backend=backend)
        assert got.dtype == torch.float32, f"{backend}: autocast changed the output dtype to {got.dtype}"
        err = rel_err(got, plain)
        assert err < 1e-5, f"{kind} {backend}: under autocast the result moved by {err:.2e} (rel)"


@pytest.mark.parametrize("kind", ["column", "row"])
def test_fp16_with_fp32_factors_keeps_u_in_range(kernel_backend, kind):
    """fp16 activations with fp32 factors: u stays finite where PEFT's fp32 LoRA branch does, on every backend."""
    backends = ["torch"] + (["interpret"] if kernel_backend == "interpret" else [])
    K, N, r = 64, 16, 4
    x = torch.full((4, K), 100.0, dtype=torch.float16)
    w = torch.zeros(N, K, dtype=torch.float16)
    a = torch.full((r, K), 16.0)  # u = 100 * 16 * 64 = 102400 > fp16's 65504
    b = torch.full((N, r), 1e-3)
    want = lora_dense(x.double(), w.double(), a.double(), b.double(), scale=1.0).half()  # 409.6, finite
    for backend in backends:
        got = FNS[kind](x, w, a, b, scale=1.0, backend=backend)
        assert torch.isfinite(got).all(), f"{kind} {backend}: u overflowed fp16 (got {got.flatten()[:3]})"
        assert torch.allclose(got.float(), want.float(), rtol=2e-3), f"{kind} {backend}: {got[0, :3]} != {want[0, :3]}"


# ---------------------------------------------------------------------------------------------
# 3. Determinism and recompute.
# ---------------------------------------------------------------------------------------------
def rerun_bits(ctx, kind: str, backend: str, sp: bool) -> None:
    """Two runs with the same seed: outputs and grads must be bit-identical."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 32, 16, 4
    p = weights(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    runs = []
    for _ in range(2):
        x = torch.randn(4, 2, k_in, generator=torch.Generator().manual_seed(9), requires_grad=True)
        q = _trainable(p)
        y = _call(kind, x, q, sp=sp, opt=True, group=ctx.group, backend=backend)
        y.backward(torch.ones_like(y))
        runs.append([y.detach(), x.grad, q["lora_a"].grad, q["lora_b"].grad])
    for name, a, b in zip(GRADS, *runs):
        assert torch.equal(a, b), f"{name} rank {rank} {kind} {backend} sp={sp}: rerun with the same seed differs"


@pytest.mark.parametrize("sp", [False, True], ids=["sp-off", "sp-on"])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_rerun_is_bit_identical(dist_pool, kernel_backend, backend, kind, sp):
    """Two runs with the same seed give bit-identical outputs and gradients."""
    backend = kernel_backend if backend == "interpret" else backend
    dist_pool.run(rerun_bits, TP, kind=kind, backend=backend, sp=sp)


def recompute(ctx, kind: str, how: str, backend: str) -> None:
    """Activation recompute (dropout on, seed drawn from the default generator) vs no recompute."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 32, 16, 4
    p = weights(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    fn = column_parallel_lora if kind == "column" else row_parallel_lora

    def layer(x, a, b):
        # seed=None: drawn from torch's default generator on x's device, as the modules do.
        return fn(x, p["weight"], a, b, bias=p["bias"], scale=0.5, dropout_p=0.3, group=ctx.group, backend=backend)

    grads = []
    for mode in ("plain", how):
        torch.manual_seed(1234)
        x = torch.randn(4, 2, k_in, requires_grad=True)
        a = p["lora_a"].detach().clone().requires_grad_(True)
        b = p["lora_b"].detach().clone().requires_grad_(True)
        if mode == "plain":
            y = layer(x, a, b)
        elif mode == "torch":
            y = ckpt.checkpoint(layer, x, a, b, use_reentrant=False)
        else:
            # Megatron's checkpoint also saves/restores the CUDA RNG; there is no CUDA here, so
            # those two calls are stubbed. The CPU RNG restore (where our seed is drawn) is real.
            with mock.patch.object(mrandom, "_get_cuda_rng_state", lambda *a, **k: None), \
                    mock.patch.object(mrandom, "_set_cuda_rng_state", lambda *a, **k: None):
                y = mrandom.checkpoint(layer, False, x, a, b)
                torch.manual_seed(999)  # disturb the generator between forward and recompute
                y.backward(torch.ones_like(y))
        if mode != "megatron":
            torch.manual_seed(999)
            y.backward(torch.ones_like(y))
        grads.append([y.detach(), x.grad, a.grad, b.grad])
    for name, u, v in zip(GRADS, *grads):
        assert torch.equal(u, v), f"{name} rank {rank} {kind} {how}-checkpoint {backend}: differs from no recompute"


@pytest.mark.parametrize("how", ["torch", "megatron"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_recompute_gives_same_grads(dist_pool, kernel_backend, kind, how):
    """Activation recompute (torch's and Megatron's checkpoint) gives the gradients of no recompute:
    the dropout seed is redrawn alike.
    """
    for backend in ("torch", kernel_backend):
        dist_pool.run(recompute, TP, kind=kind, how=how, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: megatron's checkpoint "
                    "saves and restores the CUDA RNG, which the CPU test above stubs out")
def test_megatron_checkpoint_on_cuda():
    """On CUDA, Megatron's checkpoint (which saves and restores the CUDA RNG) recomputes the same dx."""
    w = torch.randn(16, 32, device="cuda")
    a = torch.randn(4, 32, device="cuda", requires_grad=True)
    b = torch.randn(16, 4, device="cuda", requires_grad=True)
    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(0)
        x = torch.randn(8, 32, device="cuda", requires_grad=True)
        f = lambda x: column_parallel_lora(x, w, a, b, scale=0.5, dropout_p=0.3)  # noqa: E731
        y = checkpoint(f, False, x) if use_ckpt else f(x)
        y.sum().backward()
        grads.append(x.grad.clone())
        a.grad = b.grad = None
    assert torch.equal(*grads), "dx differs with megatron checkpoint"

