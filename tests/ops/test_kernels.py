"""The five launch wrappers against the fp64 math, on the Triton kernels, the cublas and the torch backends.

Every op runs on inputs in its dtype and is compared with the same math in fp64 on those
inputs (upcast, so input rounding is not counted), dropout mask from ``mask.keep_mask`` at the
same global offsets. Bars (``support.checks``): fp32 ≤ 1e-5 relative (max abs error / max abs of
exact); fp16/bf16 ≤ 2 x the error of torch computing the same thing in that dtype (LoRA weights
cast to it, as ``reference.lora_dense`` does) + 1e-6.

Layouts: ``contiguous``; ``strided`` and ``transposed`` operands cut from NaN-filled buffers (a
kernel that ignores a stride reads NaN, and writes outside an output view show as non-NaN);
``chunked`` row operands as 3-D views of one ``distributed.RowChunkedBuffer`` (as the autograd
layer hands them over), with a guard operand that must stay NaN.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tplora_kernels import mask as M
from tplora_kernels.distributed import RowChunkedBuffer
from tplora_kernels.ops import configs as C
from tplora_kernels.ops import launch as L
from tplora_kernels.ops import select as S
from tplora_kernels.ops.registry import Support
from tplora_kernels.ops.triton_backend import TritonBackend

from ..support.checks import bar_for, exceeds, rel_err

SCALE = 0.75
ROW0, COL0 = 21, 13  # global offsets of x[0, 0] for the mask: odd, not multiples of 8
NAN_FREE_GUARD = 3  # width of the guard operand in the chunked buffer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (activation dtype, LoRA weight dtype): fp32 LoRA weights with low-precision activations too.
PRECISIONS = [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
# T, K, N, r, chunks (rows per chunk = T / chunks: 21, 1 and 65, the last straddling a 64-row block)
SHAPES = {
    "T63-K60-N40-r5": (63, 60, 40, 5, 3),
    "T63-K60-N40-r1": (63, 60, 40, 1, 3),
    "T37-K20-N24-r17": (37, 20, 24, 17, 37),
    "T130-K100-N72-r16": (130, 100, 72, 16, 2),
}
LAYOUTS = ["contiguous", "strided", "transposed", "chunked"]
OPS = ["shrink_fwd", "linear_fwd", "dy_bwd", "linear_dx", "shrink_bwd"]
MASKED_OPS = {"shrink_fwd", "linear_dx", "shrink_bwd"}
LORA_OPS = {"shrink_fwd", "linear_fwd", "dy_bwd", "linear_dx"}


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
class Placer:
    """Puts tensors into NaN-filled buffers in one layout and checks nothing wrote outside them."""

    def __init__(self, layout: str, dtype: torch.dtype, T: int, chunks: int, row_widths: dict[str, int],
                 device: str = "cpu") -> None:
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.guards: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, buffer, outside-view mask)
        self.rows: dict[str, torch.Tensor] = {}
        if layout == "chunked":
            names = [*row_widths, "guard"]
            self.buf = RowChunkedBuffer(T, [*row_widths.values(), NAN_FREE_GUARD], chunks, dtype, device)
            self.buf.flat.fill_(math.nan)
            self.rows = dict(zip(names, self.buf.views))

    def _nan_view(self, name: str, shape: tuple[int, int], dtype: torch.dtype, how: str) -> torch.Tensor:
        R, C = shape
        if how == "strided":
            base = torch.full((R, 2 * C + 3), math.nan, dtype=dtype, device=self.device)
            view = base[:, 1:2 * C + 1:2]
        else:  # transposed: column-major, padded leading dimension
            base = torch.full((C, R + 5), math.nan, dtype=dtype, device=self.device)
            view = base[:, 2:R + 2].t()
        outside = torch.ones_like(base, dtype=torch.bool)
        outside_view = outside[:, 1:2 * C + 1:2] if how == "strided" else outside[:, 2:R + 2].t()
        outside_view.fill_(False)
        self.guards.append((name, base, outside))
        return view

    def put(self, name: str, t: torch.Tensor, *, row_operand: bool = True) -> torch.Tensor:
        """A copy of ``t`` in this layout (weights and non-row operands: strided/transposed only)."""
        if self.layout == "contiguous" or (self.layout == "chunked" and not (row_operand and name in self.rows)):
            return t.clone().to(self.device)
        if self.layout == "chunked":
            v = self.rows[name]
            v.copy_(t.view(v.shape))
            return v
        if t.dim() == 1:  # a bias: every other element of a NaN buffer
            base = torch.full((2 * t.shape[0] + 1,), math.nan, dtype=t.dtype, device=self.device)
            v = base[1::2]
            outside = torch.ones_like(base, dtype=torch.bool)
            outside[1::2] = False
            self.guards.append((name, base, outside))
        else:
            v = self._nan_view(name, tuple(t.shape), t.dtype, self.layout)
        v.copy_(t)
        return v

    def out(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """A destination view for output ``name`` (None: let the op allocate)."""
        if self.layout == "contiguous":
            return None
        if self.layout == "chunked":
            return self.rows[name]
        return self._nan_view(name, shape, dtype, self.layout)

    def check_untouched(self) -> list[str]:
        bad = []
        for name, base, outside in self.guards:
            if not torch.isnan(base[outside]).all():
                bad.append(f"{name}: wrote outside its {self.layout} view")
        if self.layout == "chunked" and not torch.isnan(self.rows["guard"]).all():
            bad.append("wrote into the chunked buffer's guard operand")
        return bad


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t


# ---------------------------------------------------------------------------------------------
# One op, one case
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    op: str
    backend: str
    dtype: str
    lora: str
    p: float
    shape: str
    layout: str

    @property
    def id(self) -> str:
        lora = f"-lora_{self.lora}" if self.op in LORA_OPS and self.lora != self.dtype else ""
        p = f"-p{self.p}" if self.op in MASKED_OPS else ""
        return f"{self.op}-{self.backend}-{self.dtype}{lora}{p}-{self.shape}-{self.layout}"


def run_case(c: Case, kernel_backend: str, dims=None, seed: int = 0) -> None:
    backend = kernel_backend if c.backend == "interpret" else c.backend
    dev = "cuda" if kernel_backend == "triton" and backend != "torch" else "cpu"
    T, K, N, r, chunks = dims or SHAPES[c.shape]
    dt, ldt = DTYPES[c.dtype], DTYPES[c.lora]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=dt, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x, dy = rnd(T, K), rnd(T, N)
    W = rnd(N, K, std=K ** -0.5)
    A, B = rnd(r, K, dtype=ldt, std=K ** -0.5), rnd(N, r, dtype=ldt, std=r ** -0.5)
    u, du, bias = rnd(T, r), rnd(T, r), rnd(N)
    thr = M.dropout_threshold(c.p)
    seed_t = torch.tensor([987654321 + seed], dtype=torch.int64, device=dev)
    keep = M.keep_mask(seed_t, ROW0, T, COL0, K, thr)
    inv = M.keep_scale(thr)
    u_row0, u_rows = (T // 3, T // 3) if c.op == "dy_bwd" and c.layout != "contiguous" else (0, T)
    if c.op == "dy_bwd":
        u = u[:u_rows]
    widths = {"shrink_fwd": {"x": K, "u": r}, "linear_fwd": {"x": K, "u": r, "out": N},
              "dy_bwd": {"dy": N, "du": r}, "linear_dx": {"dy": N, "du": r, "dx": K},
              "shrink_bwd": {"du": r, "x": K}}[c.op]
    P = Placer(c.layout, dt, T, chunks, widths, device=dev)
    mk = dict(drop=M.DropoutSpec(seed_t, thr, ROW0, COL0), backend=backend)

    e64 = {k: v.double() for k, v in dict(x=x, dy=dy, W=W, A=A, B=B, u=u, du=du, bias=bias).items()}
    m64 = keep.double() * inv
    # torch "computing the same thing in that dtype": every op in dt, LoRA weights cast to dt.
    At, Bt, mt = A.to(dt), B.to(dt), keep.to(dt)
    results = []  # (name, ours, exact, torch in dtype)
    if c.op == "shrink_fwd":
        got = L.lora_shrink_fwd(P.put("x", x), P.put("A", A, row_operand=False), out=P.out("u", (T, r), dt), **mk)
        results.append(("u", got, (e64["x"] * m64) @ e64["A"].t(), (x * mt * inv) @ At.t()))
    elif c.op == "linear_fwd":
        for with_bias in (False, True):
            b = P.put("bias", bias, row_operand=False) if with_bias else None
            got = L.lora_linear_fwd(P.put("x", x), P.put("W", W, row_operand=False), P.put("u", u),
                                    P.put("B", B, row_operand=False), scale=SCALE, bias=b,
                                    out=P.out("out", (T, N), dt), backend=backend)
            want = e64["x"] @ e64["W"].t() + SCALE * e64["u"] @ e64["B"].t() + (e64["bias"] if with_bias else 0)
            low = x @ W.t() + SCALE * (u @ Bt.t()) + (bias if with_bias else 0)
            results.append((f"out(bias={with_bias})", got.clone(), want, low))
    elif c.op == "dy_bwd":
        got_du, got_db = L.lora_dy_bwd(P.put("dy", dy), P.put("B", B, row_operand=False),
                                       P.put("u", u, row_operand=False), scale=SCALE, u_row0=u_row0,
                                       du_out=P.out("du", (T, r), dt), backend=backend)
        results.append(("du", got_du, SCALE * e64["dy"] @ e64["B"], SCALE * (dy @ Bt)))
        rows = slice(u_row0, u_row0 + u_rows)
        results.append(("dB", got_db, SCALE * e64["dy"][rows].t() @ e64["u"], SCALE * (dy[rows].t() @ u)))
        assert got_db.dtype == torch.float32, f"dB must come back in fp32, got {got_db.dtype}"
    elif c.op == "linear_dx":
        got = L.lora_linear_dx(P.put("dy", dy), P.put("W", W, row_operand=False), P.put("du", du),
                               P.put("A", A, row_operand=False), out=P.out("dx", (T, K), dt), **mk)
        want = e64["dy"] @ e64["W"] + (e64["du"] @ e64["A"]) * m64
        results.append(("dx", got, want, dy @ W + (du @ At) * mt * inv))
    else:
        got = L.lora_shrink_bwd(P.put("du", du), P.put("x", x), **mk)
        results.append(("dA", got, e64["du"].t() @ (e64["x"] * m64), du.t() @ (x * mt * inv)))
        assert got.dtype == torch.float32, f"dA must come back in fp32, got {got.dtype}"

    failures = [f"{c.id}: {msg}" for msg in P.check_untouched()]
    for name, ours, exact, low in results:
        own = None if dt == torch.float32 else {f"torch in {c.dtype}": rel_err(low, exact)}
        bar, why = bar_for(dt, own)
        failures.append(exceeds(f"{name} ({c.id})", rel_err(flat(ours).cpu(), exact), bar, why))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


# cublas: torch GEMMs plus Triton LoRA terms in linear_fwd / linear_dx, the full grid; its other
# three ops are the Triton kernels themselves, run once per precision and p on one shape.
CUBLAS_OWN_OPS = {"linear_fwd", "linear_dx"}


def _cases() -> list[Case]:
    out = []
    for op in OPS:
        for backend in ("interpret", "torch", "cublas"):
            for dtype, lora in PRECISIONS:
                if op not in LORA_OPS and lora != dtype:
                    continue
                for p in (0.0, 0.3) if op in MASKED_OPS else (0.0,):
                    for shape in SHAPES:
                        # Every layout on the odd r=5 shape and on the multi-block one; contiguous elsewhere.
                        layouts = LAYOUTS if shape in ("T63-K60-N40-r5", "T130-K100-N72-r16") else ["contiguous"]
                        if backend == "cublas" and op not in CUBLAS_OWN_OPS:
                            layouts = ["contiguous"] if shape == "T63-K60-N40-r5" else []
                        out += [Case(op, backend, dtype, lora, p, shape, lay) for lay in layouts]
    return out


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_fp64(kernel_backend, case):
    """Each launch wrapper, on every backend, dtype and layout of the fixed grid, equals the fp64
    math within the tolerance rule.
    """
    run_case(case, kernel_backend)


@settings(max_examples=200)
@given(op=st.sampled_from(OPS), backend=st.sampled_from(["interpret", "torch"]), prec=st.sampled_from(PRECISIONS),
       p=st.sampled_from([0.0, 0.1, 0.6]), layout=st.sampled_from(LAYOUTS), T=st.integers(1, 140),
       K=st.integers(1, 100), N=st.integers(1, 80), r=st.integers(1, 20), seed=st.integers(0, 2**20))
def test_op_matches_fp64_any_shape(kernel_backend, op, backend, prec, p, layout, T, K, N, r, seed):
    """Random shapes (T, K, N from 1), dtypes, layouts; chunked layouts use the largest chunk count ≤ 4
    that divides T (so rows per chunk is often odd)."""
    dtype, lora = prec
    if dtype != "fp32" and min(T, K, N) < 16:
        # A max over a few elements of two single roundings is a coin toss; the fp32 bar covers tiny sizes.
        T, K, N = max(T, 16), max(K, 16), max(N, 16)
    chunks = max(c for c in (1, 2, 3, 4) if T % c == 0)
    c = Case(op, backend, dtype, lora, p, f"T{T}-K{K}-N{N}-r{r}", layout)
    run_case(c, kernel_backend, dims=(T, K, N, r, chunks), seed=seed)


# ---------------------------------------------------------------------------------------------
# ops.select: the per-shape choice between the triton and cublas GEMM paths
# ---------------------------------------------------------------------------------------------
# On a CPU machine neither candidate runs on the ranks' tensors, and no candidate is launched
# here: the timer is injected, and "triton" is allowed on CPU so that the chosen object can be
# built. What is tested is the choice, its cache, the override and the broadcast.
SHAPE = dict(dtype=torch.bfloat16, lora_dtype=torch.float32, N=96, K=64, R=8)


def _cpu_choosable():
    return mock.patch.object(TritonBackend, "supports", classmethod(lambda cls, device: Support(True)))


def _timer(seconds: dict[str, float], calls: list):
    """Seconds per candidate; a candidate given an exception raises it (it cannot run)."""
    def timer(name: str, key: tuple) -> float:
        calls.append(name)
        if isinstance(seconds[name], Exception):
            raise seconds[name]
        return seconds[name]
    return timer


@pytest.fixture
def select(monkeypatch):
    monkeypatch.delenv("TPLORA_GEMM", raising=False)
    S.reset()
    with _cpu_choosable():
        yield S
    S.reset()


@pytest.mark.parametrize("fast", ["triton", "cublas"])
def test_select_picks_the_faster_and_caches_per_shape(select, fast):
    """backend auto on CUDA picks the faster of triton and cublas for a shape, once, and reuses the choice."""
    slow = "cublas" if fast == "triton" else "triton"
    calls: list = []
    got = select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=100, group=None,
                                     timer=_timer({fast: 1e-3, slow: 2e-3}, calls))
    assert got.name == fast, f"timer says {fast} 1 ms, {slow} 2 ms: chose {got.name}"
    assert sorted(calls) == ["cublas", "triton"], f"each candidate must be timed once, timed {calls}"
    (key, decision), = select.decisions().items()
    assert decision == {"choice": fast, "seconds": {fast: 1e-3, slow: 2e-3}, "failed": {}}, (
        f"decisions() recorded {decision}")
    assert "T<=128" in key, f"T=100 must be keyed by its power-of-two bucket 128: {key!r}"
    # Same bucket (T=120 <= 128), a timer that now prefers the other: the cached choice, not timed again.
    again: list = []
    got = select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=120, group=None,
                                     timer=_timer({fast: 2e-3, slow: 1e-3}, again))
    assert got.name == fast and not again, f"T=120 must reuse T=100's choice {fast}: chose {got.name}, timed {again}"
    # Another bucket is measured afresh.
    got = select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=200, group=None,
                                     timer=_timer({fast: 2e-3, slow: 1e-3}, again))
    assert got.name == slow and sorted(again) == ["cublas", "triton"], (
        f"T=200 (bucket 256) must be timed anew and pick {slow}: chose {got.name}, timed {again}")


@pytest.mark.parametrize("forced", ["triton", "cublas"])
def test_select_honours_TPLORA_GEMM(select, monkeypatch, forced):
    """TPLORA_GEMM forces the GEMM path without measuring."""
    other = "cublas" if forced == "triton" else "triton"
    calls: list = []
    select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=64, group=None,
                               timer=_timer({other: 1e-3, forced: 2e-3}, calls))  # caches `other`
    monkeypatch.setenv("TPLORA_GEMM", f" {forced.upper()} ")
    calls.clear()
    got = select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=64, group=None,
                                     timer=_timer({other: 1e-3, forced: 2e-3}, calls))
    assert got.name == forced and not calls, (
        f"TPLORA_GEMM={forced} must win over the cached and the timed choice: chose {got.name}, timed {calls}")
    monkeypatch.setenv("TPLORA_GEMM", "cutlass")
    with pytest.raises(ValueError, match="TPLORA_GEMM must be one of"):
        select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=64, group=None, timer=_timer({}, calls))


def test_select_skips_a_path_that_cannot_run(select):
    """A path that raises while timed loses to the one that works, and its failure is recorded."""
    calls: list = []
    got = select.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=64, group=None,
                                     timer=_timer({"triton": RuntimeError("out of resources"), "cublas": 5.0}, calls))
    assert got.name == "cublas", f"triton raised while timed: the slow but working cublas must win, chose {got.name}"
    (decision,) = select.decisions().values()
    assert "out of resources" in decision["failed"].get("triton", ""), f"the failure must be recorded: {decision}"


def select_failing_task(ctx) -> str:
    """Rank 0's timer raises for both paths: every rank must raise (none may wait in the broadcast)."""
    boom = {"triton": MemoryError("no memory for triton"), "cublas": MemoryError("no memory for cublas")}
    with _cpu_choosable():
        S.reset()
        try:
            S.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=64, group=ctx.group, timer=_timer(boom, []))
        except RuntimeError as e:
            return str(e)
        finally:
            S.reset()
    return "no error"


def test_select_failure_on_rank0_reaches_every_rank(dist_pool):
    """If both paths raise while rank 0 measures, every rank raises rank 0's reasons instead of
    waiting in the broadcast.
    """
    res = dist_pool.run(select_failing_task, 2, timeout=60)
    assert len(set(res)) == 1 and "no memory for triton" in res[0] and "no memory for cublas" in res[0], (
        f"every rank must raise rank 0's reasons, got {res}")


def select_in_group_task(ctx, prefer: dict[int, str]) -> dict:
    """Choose on every rank of the group with a timer that makes rank i prefer ``prefer[i]``."""
    calls: list = []
    mine = prefer[ctx.rank]
    timer = _timer({mine: 1e-3, ("cublas" if mine == "triton" else "triton"): 2e-3}, calls)
    with _cpu_choosable(), mock.patch.dict(os.environ):
        os.environ.pop("TPLORA_GEMM", None)
        S.reset()
        try:
            first = S.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=512, group=ctx.group, timer=timer).name
            cached = S.choose_gemm_backend(torch.device("cpu"), **SHAPE, T=500, group=ctx.group, timer=timer).name
        finally:
            S.reset()
    return {"first": first, "cached": cached, "timed": calls}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("rank0", ["triton", "cublas"])
def test_select_gives_every_rank_rank0s_choice(dist_pool, tp, rank0):
    """Ranks that chose differently would drift apart: every rank must use what rank 0 measured."""
    others = "cublas" if rank0 == "triton" else "triton"
    prefer = {r: rank0 if r == 0 else others for r in range(tp)}
    res = dist_pool.run(select_in_group_task, tp, prefer=prefer)
    got = [(r["first"], r["cached"]) for r in res]
    assert got == [(rank0, rank0)] * tp, (
        f"tp={tp}: rank 0's timer prefers {rank0}, the others' {others}; (first, cached) choice per rank {got}")
    assert sorted(res[0]["timed"]) == ["cublas", "triton"], f"rank 0 must time both candidates: {res[0]['timed']}"


# ---------------------------------------------------------------------------------------------
# Rank-independent results and int64 addressing
# ---------------------------------------------------------------------------------------------
def test_autotune_never_varies_a_reduction_block():
    """No autotune config sets a reduction block, and autotuning keys on model dims, not T.

    Configs may differ across ranks (each times its own); results must not: each kernel's
    reduction blocks are passed by the launcher, never by an autotune config.
    """
    reductions = {"linear_fwd": {"BLOCK_K", "BLOCK_R"}, "linear_dx": {"BLOCK_N", "BLOCK_R"},
                  "shrink_fwd": {"BLOCK_K", "BLOCK_R"}, "shrink_bwd": {"BLOCK_M", "BLOCK_R"},
                  "dy_bwd": {"BLOCK_M", "BLOCK_N", "BLOCK_R"}}
    for op, red in reductions.items():
        for cfg in C.CONFIGS[op]:
            assert not red & set(cfg.kwargs), f"{op} config {cfg} tunes a reduction block {red & set(cfg.kwargs)}"
    keys = C.AUTOTUNE_KEYS
    assert all("T" not in keys[op] for op in reductions), f"autotune must key on model dims, not T: {keys}"
    assert keys["linear_fwd"][:3] == ["N", "K", "R"], f"linear_fwd's autotune keys: {keys['linear_fwd']}"


def test_interpreter_offsets_are_int64(kernel_backend):
    """The kernels address a row that starts at element 2^31 (past int32) without wrapping.

    A [3, 64] view whose rows sit 2^30 elements apart: row 2 starts at element 2^31. torch.empty
    reserves 4 GiB of address space but only the touched pages get memory.
    """
    if kernel_backend != "interpret":
        pytest.skip("CPU interpreter check; the CUDA check is tests/ops/test_cuda.py")
    K, stride = 64, 2**30
    x_store = torch.empty(2 * stride + K, dtype=torch.float16)
    out_store = torch.empty(2 * stride + 16, dtype=torch.float16)
    x = x_store.as_strided((3, K), (stride, 1))
    out = out_store.as_strided((3, 16), (stride, 1))
    dense = torch.randn(3, K, generator=torch.Generator().manual_seed(0)).half()
    x.copy_(dense)
    a, w, b = torch.randn(4, K).half(), torch.randn(16, K).half(), torch.randn(16, 4).half()
    u = L.lora_shrink_fwd(x, a, backend="interpret")
    L.lora_linear_fwd(x, w, u, b, scale=0.5, out=out, backend="interpret")
    want = (dense.double() @ w.double().t() + 0.5 * (dense.double() @ a.double().t()) @ b.double().t())
    err = rel_err(out, want)
    assert err < 1e-2, f"row at element 2^31 read or written at a wrapped offset: rel err {err:.1e}"
    assert torch.equal(out_store[2 * stride:2 * stride + 16], out[2]), "output row 2 is not at element 2^31"
