"""Failure modes made boring: rank-symmetric validation, odd inputs, determinism, big tensors.

Per-rank checks run on the ranks; that every rank raised the same error is checked here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tplora_kernels import column_parallel_lora, row_parallel_lora
from tplora_kernels import mask as M
from tplora_kernels.ops import lora_linear_fwd, lora_shrink_fwd
from tplora_kernels.ops import triton_backend as TB
from tplora_kernels.reference import column_parallel_lora_reference, row_parallel_lora_reference

from .harness import RemoteError
from .support.layers import column, row
from .support.problems import weights

TP = 2
NO_HANG_S = 90  # the pool restarts and the test fails if any rank is still busy after this
GRADS = ("y", "dx", "dA", "dB")


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
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


def bad_module(ctx, case: str):
    """Module-level misuse: every rank must raise the same, before any collective."""
    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA

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


def merge_misuse(ctx, case: str) -> None:
    """Merging twice, or unmerging what is not merged: a warning, and the base weight intact."""
    from tplora_kernels import ColumnParallelLoRA

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
        scale = b[fin].abs().max().item() if fin.any() else 1.0
        err = ((a - b)[fin].abs().max().item() / max(scale, 1e-30)) if fin.any() else 0.0
        assert err <= 1e-5, f"{what}: rel err {err:.1e} > 1e-05"
        if case == "nan" and name in ("y", "dA"):
            assert int((~fin).sum()) > 0, f"{what}: the NaN/Inf in x vanished (zeroed?)"


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
            import torch.utils.checkpoint as ckpt

            y = ckpt.checkpoint(layer, x, a, b, use_reentrant=False)
        else:
            from unittest import mock

            from megatron.core.tensor_parallel import random as mrandom

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


def bad_adapter_file(ctx, path: str):
    """load_adapter of a file whose shapes do not fit: returns the error; the model must be untouched."""
    import json
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    from tplora_kernels import ColumnParallelLoRA, load_adapter

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


# ---------------------------------------------------------------------------------------------
# In the test process. 1. Validation before any collective: every rank raises the same clear
# error, none hangs.
# ---------------------------------------------------------------------------------------------
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
    res = dist_pool.run(bad_call, TP, timeout=NO_HANG_S, raise_errors=False, case=case, kind=kind)
    _assert_symmetric_error(res, exc, words, f"{case}/{kind} tp={TP}")


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
    res = dist_pool.run(bad_module, TP, timeout=NO_HANG_S, raise_errors=False, case=case)
    _assert_symmetric_error(res, exc, words, f"module {case} tp={TP}")


@pytest.mark.parametrize("case", ["merge_twice", "unmerge_unmerged"])
def test_merge_misuse_warns_and_keeps_weights(dist_pool, case):
    dist_pool.run(merge_misuse, TP, timeout=NO_HANG_S, case=case)


def test_adapter_that_does_not_fit_is_refused_on_every_rank(dist_pool, tmp_path):
    errors = set(dist_pool.run(bad_adapter_file, TP, timeout=NO_HANG_S, path=str(tmp_path / "bad")))
    assert len(errors) == 1 and None not in errors, f"ranks must raise the same error, got {errors}"
    msg = errors.pop()
    for word in ("fc1", "[4, 16]", "[4, 12]"):
        assert word in msg, f"message {msg!r} lacks {word!r}"


# ---------------------------------------------------------------------------------------------
# 2. Odd but valid inputs match the unfused reference (same mask), NaN/Inf propagate alike.
# ---------------------------------------------------------------------------------------------
ODD = ["noncontig", "transposed", "r1", "r128", "odd", "nan"]


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("case", ODD)
def test_odd_inputs_match_reference(dist_pool, kernel_backend, case, kind, backend):
    if backend == "interpret":
        backend = kernel_backend
    tp = 4 if case == "odd" else TP  # odd: K=60 -> 15 per rank, N=36 -> 9 per rank
    dist_pool.run(odd_inputs, tp, kind=kind, case=case, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_empty_tokens(dist_pool, kernel_backend, backend):
    backend = kernel_backend if backend == "interpret" else backend
    for kind in ("column", "row"):
        for sp in (False, True):
            for opt in (False, True):
                dist_pool.run(empty_tokens, TP, kind=kind, sp=sp, opt=opt, backend=backend)


# ---------------------------------------------------------------------------------------------
# 3. Determinism and recompute.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [False, True], ids=["sp-off", "sp-on"])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_rerun_is_bit_identical(dist_pool, kernel_backend, backend, kind, sp):
    backend = kernel_backend if backend == "interpret" else backend
    dist_pool.run(rerun_bits, TP, kind=kind, backend=backend, sp=sp)


def test_autotune_never_varies_a_reduction_block():
    # Configs may differ across ranks (each times its own); results must not. Each kernel's
    # reduction blocks are passed by the launcher, never by an autotune config.
    reductions = {"_LINEAR_CONFIGS": {"BLOCK_K", "BLOCK_R"}, "_DX_CONFIGS": {"BLOCK_N", "BLOCK_R"},
                  "_SHRINK_CONFIGS": {"BLOCK_K", "BLOCK_R"}, "_SHRINK_BWD_CONFIGS": {"BLOCK_M", "BLOCK_R"},
                  "_DY_CONFIGS": {"BLOCK_M", "BLOCK_N", "BLOCK_R"}}
    for name, red in reductions.items():
        for cfg in getattr(TB, name):
            assert not red & set(cfg.kwargs), f"{name} config {cfg} tunes a reduction block {red & set(cfg.kwargs)}"
    assert TB._TUNED["linear_fwd"].keys == ["N", "K", "R"], "autotune must key on model dims, not T"


@pytest.mark.parametrize("how", ["torch", "megatron"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_recompute_gives_same_grads(dist_pool, kernel_backend, kind, how):
    for backend in ("torch", kernel_backend):
        dist_pool.run(recompute, TP, kind=kind, how=how, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: megatron's checkpoint "
                    "saves and restores the CUDA RNG, which the CPU test above stubs out")
def test_megatron_checkpoint_on_cuda():
    from megatron.core.tensor_parallel import checkpoint

    from tplora_kernels import column_parallel_lora

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


# ---------------------------------------------------------------------------------------------
# 4. Big tensors.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("row", "col"), [(2**32 - 3, 5), (2**39 + 17, 2**35 + 9), (12345, 2**40 - 11)])
def test_mask_at_huge_indices_matches_independent_draws(row, col):
    seed, thr = 0x0123456789ABCDEF, M.dropout_threshold(0.5)
    got = M.keep_mask(seed, row, 3, col, 11, thr)
    for i in range(3):
        for j in range(11):
            r, c = row + i, col + j
            words = M.philox4x32(seed, *(torch.tensor([v]) for v in (c >> 3 & 0xFFFFFFFF, r & 0xFFFFFFFF,
                                                                       r >> 32, c >> 35)))
            lane = c & 7
            bits = (int(words[lane // 2]) >> (16 * (lane % 2))) & 0xFFFF
            assert bool(got[i, j]) == (bits >= thr), f"mask({r}, {c}) disagrees with its own Philox draw"
    # No wrap: the same block 2^32 rows (or 2^35 columns) further on is a different draw.
    wide = M.keep_mask(seed, row, 64, col, 64, thr)
    assert not torch.equal(wide, M.keep_mask(seed, row + 2**32, 64, col, 64, thr)), "rows wrap at 2^32"
    assert not torch.equal(wide, M.keep_mask(seed, row, 64, col + 2**35, 64, thr)), "columns wrap at 2^35"


def test_interpreter_offsets_are_int64(kernel_backend):
    # A [3, 64] view whose rows sit 2^30 elements apart: row 2 starts at element 2^31, past int32.
    # torch.empty reserves 4 GiB of address space but only the touched pages get memory.
    if kernel_backend != "interpret":
        pytest.skip("CPU interpreter check; the CUDA check is test_cuda_writes_past_2_31")
    K, stride = 64, 2**30
    x_store = torch.empty(2 * stride + K, dtype=torch.float16)
    out_store = torch.empty(2 * stride + 16, dtype=torch.float16)
    x = x_store.as_strided((3, K), (stride, 1))
    out = out_store.as_strided((3, 16), (stride, 1))
    dense = torch.randn(3, K, generator=torch.Generator().manual_seed(0)).half()
    x.copy_(dense)
    a, w, b = torch.randn(4, K).half(), torch.randn(16, K).half(), torch.randn(16, 4).half()
    u = lora_shrink_fwd(x, a, backend="interpret")
    lora_linear_fwd(x, w, u, b, scale=0.5, out=out, backend="interpret")
    want = (dense.double() @ w.double().t() + 0.5 * (dense.double() @ a.double().t()) @ b.double().t())
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-2, f"row at element 2^31 read or written at a wrapped offset: rel err {err:.1e}"
    assert torch.equal(out_store[2 * stride:2 * stride + 16], out[2]), "output row 2 is not at element 2^31"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with > 9 GB free; CPU runs the "
                    "interpreter int64 check instead")
def test_cuda_writes_past_2_31():
    T, K, N = 2**31 // 4096 + 64, 64, 4096  # out has T*N > 2^31 elements
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    u = torch.zeros(T, 16, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(N, 16, device="cuda", dtype=torch.bfloat16)
    out = lora_linear_fwd(x, w, u, b, scale=1.0, backend="triton")
    tail = slice(T - 8, T)
    want = x[tail].float() @ w.float().t()
    assert torch.allclose(out[tail].float(), want, rtol=2e-2, atol=2e-2), "rows past 2^31 elements are wrong"
