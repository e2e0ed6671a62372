"""Failure modes made boring: rank-symmetric validation, odd inputs, determinism, big tensors."""

from __future__ import annotations

import pytest
import torch

from tplora_kernels import mask as M
from tplora_kernels.ops import triton_backend as TB
from tplora_kernels.ops import lora_linear_fwd, lora_shrink_fwd

from . import hardening_cases as C
from .harness import RemoteError

TP = 2
NO_HANG_S = 90  # the pool restarts and the test fails if any rank is still busy after this


# ---------------------------------------------------------------------------------------------
# 1. Validation before any collective: every rank raises the same clear error, none hangs.
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
    res = dist_pool.run(C.bad_call, TP, timeout=NO_HANG_S, raise_errors=False, case=case, kind=kind)
    _assert_symmetric_error(res, exc, words, f"{case}/{kind} tp={TP}")


BAD_MODULES = [
    ("not_megatron", "TypeError", ["ColumnParallelLinear", "Linear"]),
    ("explicit_expert_comm", "ValueError", ["explicit_expert_comm"]),
    ("r_zero", "ValueError", ["r must be a positive int", "0"]),
    ("dropout", "ValueError", ["lora_dropout", "1.5"]),
    ("alpha", "ValueError", ["lora_alpha", "inf"]),
    ("adapter", "ValueError", ["unknown adapter", "'nope'", "default"]),
]


@pytest.mark.parametrize(("case", "exc", "words"), BAD_MODULES, ids=[c for c, _, _ in BAD_MODULES])
def test_bad_module_raises_on_every_rank(dist_pool, case, exc, words):
    res = dist_pool.run(C.bad_module, TP, timeout=NO_HANG_S, raise_errors=False, case=case)
    _assert_symmetric_error(res, exc, words, f"module {case} tp={TP}")


@pytest.mark.parametrize("case", ["merge_twice", "unmerge_unmerged"])
def test_merge_misuse_warns_and_keeps_weights(dist_pool, case):
    for r, res in enumerate(dist_pool.run(C.bad_module, TP, timeout=NO_HANG_S, case=case)):
        assert res["warned"], f"{case} rank {r}: no warning"
        assert res["weight_intact"], f"{case} rank {r}: base weight changed (corrupted)"


def test_adapter_that_does_not_fit_is_refused_on_every_rank(dist_pool, tmp_path):
    res = dist_pool.run(C.bad_adapter_file, TP, timeout=NO_HANG_S, path=str(tmp_path / "bad"))
    errors = {r["error"] for r in res}
    assert len(errors) == 1 and None not in errors, f"ranks must raise the same error, got {errors}"
    msg = errors.pop()
    for word in ("fc1", "[4, 16]", "[4, 12]"):
        assert word in msg, f"message {msg!r} lacks {word!r}"
    for r, v in enumerate(res):
        assert v["untouched"] and v["adapters"] == ["default"], f"rank {r}: a refused load changed the model: {v}"


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
    for r, res in enumerate(dist_pool.run(C.odd_inputs, tp, kind=kind, case=case, backend=backend)):
        for name, v in res.items():
            what = f"{case} {kind} {backend} rank {r} tp={tp} {name}"
            assert v["same_nonfinite"], f"{what}: NaN/Inf pattern differs from the reference"
            assert v["err"] <= 1e-5, f"{what}: rel err {v['err']:.1e} > 1e-05"
            if case == "nan" and name in ("y", "dA"):
                assert v["n_nonfinite"] > 0, f"{what}: the NaN/Inf in x vanished (zeroed?)"


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_empty_tokens(dist_pool, kernel_backend, backend):
    backend = kernel_backend if backend == "interpret" else backend
    for kind in ("column", "row"):
        for sp in (False, True):
            for opt in (False, True):
                n_out = 8 if kind == "row" or opt else 8 // TP
                k_in = 16 if kind == "column" or not opt else 16 // TP
                res = dist_pool.run(C.empty_tokens, TP, kind=kind, sp=sp, opt=opt, backend=backend)
                for r, v in enumerate(res):
                    what = f"T=0 {kind} sp={sp} opt={opt} {backend} rank {r}"
                    assert v["y"] == (0, 2, n_out), f"{what}: output shape {v['y']}"
                    assert v["dx"] == (0, 2, k_in), f"{what}: dx shape {v['dx']}"
                    assert v["dA"] == 0.0 and v["dB"] == 0.0, f"{what}: LoRA grads not zero: {v}"


# ---------------------------------------------------------------------------------------------
# 3. Determinism and recompute.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [False, True], ids=["sp-off", "sp-on"])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_rerun_is_bit_identical(dist_pool, kernel_backend, backend, kind, sp):
    backend = kernel_backend if backend == "interpret" else backend
    for r, same in enumerate(dist_pool.run(C.rerun_bits, TP, kind=kind, backend=backend, sp=sp)):
        for name, ok in zip(("y", "dx", "dA", "dB"), same):
            assert ok, f"{name} rank {r} {kind} {backend} sp={sp}: rerun with the same seed differs"


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
        for r, same in enumerate(dist_pool.run(C.recompute, TP, kind=kind, how=how, backend=backend)):
            for name, ok in zip(("y", "dx", "dA", "dB"), same):
                assert ok, f"{name} rank {r} {kind} {how}-checkpoint {backend}: differs from no recompute"


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
