"""The five kernels on a CUDA device, as compiled for it, against the fp64 math (``gpu`` marker).

* Every launch wrapper against fp64 math on the same inputs and the same Philox mask, for fp32,
  fp16, bf16 and bf16 activations with fp32 LoRA weights, p = 0 and 0.1: at a TP=1 shape, odd
  sizes, a wide r, and shard shapes with TP=4's global row / column offsets and row-chunked
  (reduce-scatter) output buffers.
* int64 addressing: each kernel reads or writes one operand of more than 2^31 elements (bf16,
  4.3 GB); the rows at both ends are compared with fp64 math on the same slices (the mask at its
  global rows), torch's own error being torch's bf16 result on those slices.

Each result must meet the one tolerance rule (``tests/support/cuda.py``). Off CUDA these skip,
with the reason; the interpreter runs the same math in ``test_kernels.py``.
"""

from __future__ import annotations

import os
import time
import zlib

import pytest
import torch

from tplora_kernels.distributed import RowChunkedBuffer
from tplora_kernels.mask import DropoutSpec, dropout_threshold, keep_mask, keep_scale
from tplora_kernels.ops import launch as L

from ..support.cuda import SEED, failures, judge, needs_cuda, target, verdict, write_verdicts

pytestmark = needs_cuda


@pytest.fixture(autouse=True)
def _pinned_configs(monkeypatch):
    """Pinned configs: these checks are about the math and the addressing (and autotuning a 4 GB
    probe would take minutes); the bench exercises the autotuner."""
    monkeypatch.setenv("TPLORA_AUTOTUNE", os.environ.get("TPLORA_AUTOTUNE", "0"))


# name: (T, K, N, r, row0, col0, chunks (row-chunked buffers as under SP at TP=chunks), bias); small: CPU dry run
SHAPES = {
    "tp1": ((1024, 1024, 1024, 16, 0, 0, 1, False), (64, 64, 48, 8, 0, 0, 1, False)),
    "odd": ((63, 60, 40, 1, 0, 0, 1, True), (63, 60, 40, 1, 0, 0, 1, True)),
    "wide-r": ((130, 200, 72, 40, 0, 0, 1, False), (34, 40, 24, 40, 0, 0, 1, False)),
    "column-shard-t4-sp": ((512, 1024, 256, 16, 0, 0, 4, True), (64, 64, 32, 8, 0, 0, 4, True)),
    "row-shard-t4-rank3": ((512, 256, 1024, 16, 384, 768, 4, False), (64, 32, 64, 8, 48, 96, 4, False)),
}
EVERY = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("name", list(SHAPES))
def test_kernels_match_fp64(name, request):
    """Each of the five kernels equals the fp64 math within the rule, in every dtype (bf16 only at
    the wide-r and column-shard shapes, to bound compile time) and at p = 0 and 0.1."""
    tg = target()
    shape = SHAPES[name][1 if tg.small else 0]
    dtypes = EVERY if name in ("tp1", "odd", "row-shard-t4-rank3") else EVERY[2:3]
    results: list = []
    for dt, ldt in dtypes:
        for p in (0.0, 0.1):
            _kernel_case(name, shape, dt, ldt or dt, p, tg, results)
    write_verdicts(request, results)
    assert failures(results) is None, failures(results)


def _kernel_case(name, shape, dt, ldt, p, tg, results) -> None:
    T, K, N, r, row0, col0, chunks, has_bias = shape
    device, backend = tg.device, tg.backend
    tags = {"shape": name, "dtype": str(dt)[6:], "lora_dtype": str(ldt)[6:], "p": p}
    g = torch.Generator().manual_seed(zlib.crc32(f"{name} {p}".encode()))

    def rnd(*s, std=1.0, dtype=dt):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    x, w, dy = rnd(T, K), rnd(N, K, std=K ** -0.5), rnd(T, N)
    a, b = rnd(r, K, std=K ** -0.5, dtype=ldt), rnd(N, r, std=0.1, dtype=ldt)
    u_in, du_in = rnd(T, r), rnd(T, r)
    bias = rnd(N) if has_bias else None
    thr = dropout_threshold(p)
    seed = torch.tensor([SEED], dtype=torch.int64, device=device) if thr else None
    spec = DropoutSpec(seed, thr, row0=row0, col0=col0)  # this block's place in the global mask
    ks = keep_scale(thr)
    m = keep_mask(SEED, row0, T, col0, K, thr, device=device) if thr else None
    s = 0.5

    def drop(t):
        return t if m is None else t * m.to(t.dtype) * ks

    def both(f):
        return f(torch.float64), f(dt)

    # shrink fwd, into the [z | u] buffer's u (row-chunked as under SP) when chunks > 1
    buf = RowChunkedBuffer(T, (N, r), chunks, dt, device) if chunks > 1 else None
    out = buf.views[1] if buf is not None else None
    u = L.lora_shrink_fwd(x, a, drop=spec, out=out, backend=backend)
    u = out.reshape(T, r) if out is not None else u
    verdict("shrink_fwd u", u, *both(lambda d: drop(x.to(d)) @ a.to(d).t()), results, **tags)
    # linear fwd (+bias), into the buffer's z when chunked
    out = buf.views[0] if buf is not None else None
    z = L.lora_linear_fwd(x, w, u_in, b, scale=s, bias=bias, out=out, backend=backend)
    z = out.reshape(T, N) if out is not None else z
    verdict("linear_fwd out", z, *both(lambda d: x.to(d) @ w.to(d).t() + s * u_in.to(d) @ b.to(d).t()
                                       + (0 if bias is None else bias.to(d))), results, **tags)
    # dy pass
    du, db = L.lora_dy_bwd(dy, b, u_in, scale=s, backend=backend)
    verdict("dy_bwd du", du, *both(lambda d: s * dy.to(d) @ b.to(d)), results, **tags)
    verdict("dy_bwd dB", db, *both(lambda d: s * dy.to(d).t() @ u_in.to(d)), results, **tags)
    # linear dx, the mask regenerated in the epilogue
    dx = L.lora_linear_dx(dy, w, du_in, a, drop=spec, backend=backend)
    verdict("linear_dx dx", dx, *both(lambda d: dy.to(d) @ w.to(d) + drop(du_in.to(d) @ a.to(d))), results, **tags)
    # shrink bwd
    da = L.lora_shrink_bwd(du_in, x, drop=spec, backend=backend)
    verdict("shrink_bwd dA", da, *both(lambda d: du_in.to(d).t() @ drop(x.to(d))), results, **tags)


# ---------------------------------------------------------------------------------------------
# int64 offsets
# ---------------------------------------------------------------------------------------------
W_ = 4096  # the wide operand's columns
PROBE_R, PROBE_S, ENDS_ROWS = 16, 0.5, 128


def _rows() -> int:
    return 1024 if target().small else 2**31 // W_ + 192  # T·4096 > 2^31 elements on CUDA


def _gen(*shape, std=1.0):
    return (torch.randn(*shape, device=target().device, dtype=torch.float32) * std).to(torch.bfloat16)


def _mask(rows: slice, cols: int, thr: int):
    keep = keep_mask(SEED, rows.start, rows.stop - rows.start, 0, cols, thr, device=target().device)
    return keep.float() * keep_scale(thr)


def _chunked(T: int, f):
    """An fp64 sum over all T rows, 2^16 rows at a time."""
    return sum(f(slice(c, c + (1 << 16))) for c in range(0, T, 1 << 16))


# Each probe returns {output: [(kernel result, fp64 math, torch in bf16)]} on the same slices.
def _linear_fwd(T, ends, spec, thr, backend):  # writes out [T, 4096]
    s, r = PROBE_S, PROBE_R
    x, w, u, b = _gen(T, 16), _gen(W_, 16, std=0.25), _gen(T, r), _gen(W_, r, std=0.1)
    out = L.lora_linear_fwd(x, w, u, b, scale=s, backend=backend)
    return {"out": [(out[i], x[i].double() @ w.double().t() + s * u[i].double() @ b.double().t(),
                     x[i] @ w.t() + s * (u[i] @ b.t())) for i in ends]}


def _linear_dx(T, ends, spec, thr, backend):  # writes dx [T, 4096], mask at rows past 2^31 / 4096 · 8
    dy, w, du, a = _gen(T, 16), _gen(16, W_, std=0.25), _gen(T, PROBE_R), _gen(PROBE_R, W_, std=0.1)
    dx = L.lora_linear_dx(dy, w, du, a, drop=spec, backend=backend)
    return {"dx": [(dx[i], dy[i].double() @ w.double() + (du[i].double() @ a.double()) * _mask(i, W_, thr).double(),
                    dy[i] @ w + (du[i] @ a) * _mask(i, W_, thr).to(torch.bfloat16)) for i in ends]}


def _shrink_fwd(T, ends, spec, thr, backend):  # reads x [T, 4096]
    x, a = _gen(T, W_), _gen(PROBE_R, W_, std=W_ ** -0.5)
    u = L.lora_shrink_fwd(x, a, drop=spec, backend=backend)
    return {"u": [(u[i], (x[i].double() * _mask(i, W_, thr).double()) @ a.double().t(),
                   (x[i] * _mask(i, W_, thr).to(torch.bfloat16)) @ a.t()) for i in ends]}


def _dy_bwd(T, ends, spec, thr, backend):  # reads dy [T, 4096]
    s = PROBE_S
    dy, b, u = _gen(T, W_), _gen(W_, PROBE_R, std=0.1), _gen(T, PROBE_R)
    du, db = L.lora_dy_bwd(dy, b, u, scale=s, backend=backend)
    return {"du": [(du[i], s * dy[i].double() @ b.double(), s * (dy[i] @ b)) for i in ends],
            "dB": [(db, _chunked(T, lambda c: s * dy[c].double().t() @ u[c].double()), s * (dy.t() @ u))]}


def _shrink_bwd(T, ends, spec, thr, backend):  # reads x [T, 4096], p = 0 so the oracle needs no full-size mask
    du, x = _gen(T, PROBE_R), _gen(T, W_)
    da = L.lora_shrink_bwd(du, x, backend=backend)
    return {"dA": [(da, _chunked(T, lambda c: du[c].double().t() @ x[c].double()), du.t() @ x)]}


PROBES = {"linear_fwd write": _linear_fwd, "linear_dx write": _linear_dx, "shrink_fwd read": _shrink_fwd,
          "dy_bwd read": _dy_bwd, "shrink_bwd read": _shrink_bwd}


@pytest.mark.parametrize("probe", list(PROBES))
def test_int64_offsets(probe, request):
    """A kernel reading or writing an operand of more than 2^31 elements gets both ends right."""
    tg = target()
    T = _rows()
    thr = dropout_threshold(0.1)
    spec = DropoutSpec(torch.tensor([SEED], dtype=torch.int64, device=tg.device), thr)
    ends = (slice(0, ENDS_ROWS), slice(T - ENDS_ROWS, T))
    t0 = time.perf_counter()
    try:
        results = [{"check": f"int64 {probe} {what}", "rows": T, "elements": T * W_, **judge(triples, torch.bfloat16),
                    "s": round(time.perf_counter() - t0, 1)}
                   for what, triples in PROBES[probe](T, ends, spec, thr, tg.backend).items()]
    finally:
        if tg.device.type == "cuda":
            torch.cuda.empty_cache()
    write_verdicts(request, results)
    assert failures(results) is None, failures(results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with > 9 GB free; CPU runs the "
                    "interpreter int64 check in test_kernels.py instead")
def test_cuda_writes_past_2_31():
    """linear_fwd writes the rows of an output past 2^31 elements right (the tail against torch)."""
    T, K, N = 2**31 // 4096 + 64, 64, 4096  # out has T*N > 2^31 elements
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    u = torch.zeros(T, 16, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(N, 16, device="cuda", dtype=torch.bfloat16)
    out = L.lora_linear_fwd(x, w, u, b, scale=1.0, backend="triton")
    tail = slice(T - 8, T)
    want = x[tail].float() @ w.float().t()
    assert torch.allclose(out[tail].float(), want, rtol=2e-2, atol=2e-2), "rows past 2^31 elements are wrong"
