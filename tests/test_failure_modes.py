"""Failure modes found by an adversarial pass; each test failed before its fix.

Rank functions sit beside the tests that run them and assert on the rank: a failed assertion
comes back as ``RankFailed`` naming the rank and the message.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tplora_kernels import column_parallel_lora, row_parallel_lora
from tplora_kernels.reference import lora_dense

from .harness import RemoteError
from .support.layers import column, row
from .support.problems import weights as shards

FNS = {"column": column_parallel_lora, "row": row_parallel_lora}


def _mlp(group, tp: int, *, rslora_fc2: bool = False):
    """A two-layer megatron MLP wrapped in our modules (fc1 column, fc2 row), identical on every rank."""
    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA

    torch.manual_seed(3)
    fc1 = column(group, tp, 16, 24, seed=None, bias=False, init=torch.nn.init.normal_)
    fc2 = row(group, tp, 24, 16, seed=None, bias=False, init=torch.nn.init.normal_)
    model = torch.nn.Module()
    model.fc1 = ColumnParallelLoRA(fc1, r=4, init_lora_weights=False)
    model.fc2 = RowParallelLoRA(fc2, r=4, init_lora_weights=False, use_rslora=rslora_fc2)
    return model


# ---------------------------------------------------------------------------------------------
# 1, 2: save_adapter errors reach every rank; with DP > 1 every rank waits for the file
# ---------------------------------------------------------------------------------------------
def _save_errors(ctx, path: str, case: str):
    from tplora_kernels import save_adapter

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
    results = dist_pool.run(_save_errors, 2, raise_errors=False, timeout=120, path=str(tmp_path), case=case)
    for rank, r in enumerate(results):
        assert isinstance(r, RemoteError), f"{case}: rank {rank} did not raise (it would hang its peers): {r}"
        assert r.type_name == exc and words in r.message, f"{case}: rank {rank} raised {r.type_name}: {r.message}"


def _save_with_dp(ctx, path: str):
    """World of 4 = two TP groups [0,1] and [2,3] (DP = 2); every rank saves, then loads at once."""
    from tplora_kernels import load_adapter, save_adapter

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
    keys = dist_pool.run(_save_with_dp, 4, timeout=120, path=str(tmp_path / "adapter"))
    assert all(k == keys[0] for k in keys) and len(keys[0]) == 4, f"every rank must return the same 4 keys: {keys}"


def _load_over_merged(ctx, path: str):
    """Loading over an adapter that is merged in some layer: refused before any layer changes."""
    from tplora_kernels import load_adapter, save_adapter

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
    res = dist_pool.run(_load_over_merged, 2, timeout=120, path=str(tmp_path / "adapter"))
    for rank, r in enumerate(res):
        assert r["error"] and "merged" in r["error"], f"rank {rank}: loading over a merged adapter: {r['error']}"
        assert r["unchanged"], f"rank {rank}: a layer was replaced before the refusal"


# ---------------------------------------------------------------------------------------------
# 3: double backward is refused, not silently wrong
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_double_backward_raises(kernel_backend, kind, backend):
    if backend == "interpret" and kernel_backend != "interpret":
        pytest.skip("the interpreter is off in this session (a GPU machine)")
    p = shards(kind, 0, 1, 16, 8, 4)
    x = torch.randn(6, 16, requires_grad=True)
    y = FNS[kind](x, p["weight"], p["lora_a"].requires_grad_(), p["lora_b"], scale=0.5, backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"differentiate twice|once_differentiable"):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------
# 4: the outputs can be modified in place, as the base layers' can
# ---------------------------------------------------------------------------------------------
def _in_place(ctx, kind: str, sp: bool, backend: str):
    t, rank = ctx.tp, ctx.rank
    p = shards(kind, rank, t, 16, 8, 4)
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
    backend = "interpret" if kernel_backend == "interpret" else "torch"
    for rank, r in enumerate(dist_pool.run(_in_place, tp, kind=kind, sp=sp, backend=backend)):
        assert r == ["add_", "dropout"], f"{kind} tp={tp} sp={sp} rank {rank}: {r}"


# ---------------------------------------------------------------------------------------------
# 5, 9: numbers: fp32's range, numpy scalars, 0-d tensors, huge seeds, K = 0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e39, -1e39, float("inf")], ids=["1e39", "-1e39", "inf"])
def test_scale_beyond_fp32_is_refused(scale):
    p = shards("column", 0, 1, 16, 8, 4)
    with pytest.raises(ValueError, match="scale must be finite and within fp32's range"):
        column_parallel_lora(torch.randn(4, 16), p["weight"], p["lora_a"], p["lora_b"], scale=scale)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_numpy_and_tensor_scalars_are_accepted(kind):
    p = shards(kind, 0, 1, 16, 8, 4)
    x = torch.randn(4, 16)
    want = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=0.5, dropout_p=0.25, seed=2**63 + 5,
                     backend="torch")
    for scale, drop, seed in ((np.float32(0.5), np.float64(0.25), np.uint64(2**63 + 5)),
                              (torch.tensor(0.5), torch.tensor(0.25), torch.tensor(-(2**63) + 5))):
        got = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=scale, dropout_p=drop, seed=seed,
                        backend="torch")
        assert torch.equal(got, want), f"{kind}: scale={scale!r} p={drop!r} seed={seed!r} changed the result"


def test_zero_input_features_is_a_clear_error():
    with pytest.raises(ValueError, match="input size must be >= 1"):
        column_parallel_lora(torch.randn(4, 0), torch.randn(8, 0), torch.randn(4, 0), torch.randn(8, 4))


# ---------------------------------------------------------------------------------------------
# 6: an Inf in another rank's dy rows must not become NaN in this rank's dB (row SP)
# ---------------------------------------------------------------------------------------------
def _inf_rows(ctx, backend: str):
    from tplora_kernels.distributed import sum_sequence_parallel_grads

    t, rank = ctx.tp, ctx.rank
    p = shards("row", rank, t, 16, 8, 4)
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
    kernels = "interpret" if kernel_backend == "interpret" else "torch"
    got = dist_pool.run(_inf_rows, 2, backend=kernels)
    want = dist_pool.run(_inf_rows, 2, backend="torch")
    assert not torch.isnan(got[0][0]).any(), "rank 0's partial dB has NaN from rank 1's Inf rows"
    assert torch.isfinite(got[0][0]).all(), "rank 0's own rows are finite: its partial dB must be"
    summed, ref = got[0][1], want[0][1]
    assert torch.equal(torch.isnan(summed), torch.isnan(ref)) and torch.equal(torch.isinf(summed), torch.isinf(ref)), \
        "the summed dB must have NaN/Inf exactly where the torch backend's has"


# ---------------------------------------------------------------------------------------------
# 7: autocast changes nothing, on every backend alike
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["column", "row"])
def test_autocast_does_not_change_what_is_computed(kernel_backend, kind):
    backends = ["torch"] + (["interpret"] if kernel_backend == "interpret" else [])
    p = shards(kind, 0, 1, 32, 16, 4)
    x = torch.randn(8, 32)
    plain = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=0.5, backend="torch")
    for backend in backends:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = FNS[kind](x, p["weight"], p["lora_a"], p["lora_b"], scale=0.5, backend=backend)
        assert got.dtype == torch.float32, f"{backend}: autocast changed the output dtype to {got.dtype}"
        err = (got - plain).abs().max().item() / plain.abs().max().item()
        assert err < 1e-5, f"{kind} {backend}: under autocast the result moved by {err:.2e} (rel)"


# ---------------------------------------------------------------------------------------------
# 8: fp16 activations with fp32 factors: u does not overflow where PEFT's fp32 branch does not
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["column", "row"])
def test_fp16_with_fp32_factors_keeps_u_in_range(kernel_backend, kind):
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
