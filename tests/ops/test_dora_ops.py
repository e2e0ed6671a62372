"""DoRA's per-rank op features (issue 18) against the fp64 math, on every backend.

DoRA's output is ``g ⊙ (x Wᵀ + s·u Bᵀ)`` with a per-output-column factor ``g`` (fp32 ``[N]``,
a constant in the backward). The ops take it as ``col_scale``, and add what the magnitude's
gradient and DoRA's dropout need:

* ``lora_linear_fwd``: ``acc = drop(x) Wᵀ + s·u Bᵀ``, ``out0 <- acc``, ``out = g ⊙ acc + bias``;
* ``lora_dy_bwd``: ``du = s·(g ⊙ dy) B``, ``dB = s·(g ⊙ dy)ᵀ u``, ``dm = Σ_t dy ⊙ y0`` over u's rows;
* ``lora_linear_dx``: ``(g ⊙ dy) W + (du A) ⊙ M/(1-p)``, or with ``mask_all`` the whole sum masked.

Each case runs on inputs in its dtype and is compared with the same math in fp64 on those inputs,
with the project's one tolerance rule (``support.checks``): fp32 within 1e-5 relative, 16-bit
within 2x torch's own error doing the same in that dtype + 1e-6. Layouts: ``plain``;
``chunked`` row operands as 3-D views of ``RowChunkedBuffer``s (as the autograd layer hands
them over) with a NaN guard operand; ``strided`` inputs (column-major rows, every-other-column
weights and vectors) and outputs cut from NaN-filled buffers, so a kernel that ignores a stride
reads NaN and a write outside a view shows. The dropout mask is checked element by element
against ``mask.keep_mask`` (the kernels' and shrink_fwd's mask, ``tests/ops/test_mask.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from tplora_kernels import mask as M
from tplora_kernels.distributed import RowChunkedBuffer
from tplora_kernels.ops import configs as C
from tplora_kernels.ops import launch as L

from ..support.checks import assert_raises, bar_for, exceeds, rel_err

T, K, N = 63, 60, 40
SCALE = 0.75
ROW0, COL0 = 21, 13  # global position of x[0, 0] / dx[0, 0]: odd, so the per-element mask path
CHUNKS = 3  # row-chunked layout: 3 chunks of 21 rows
GUARD = 3  # width of the NaN guard operand beside each chunked one
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (activations, LoRA weights): fp32 LoRA weights beside 16-bit activations too.
PRECISIONS = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32")]
BACKENDS = ["interpret", "torch", "cublas"]
LAYOUTS = ["plain", "chunked", "strided"]


def _where(kernel_backend: str, backend: str) -> tuple[str, str]:
    """(backend name, device): "interpret" means the kernels, compiled where a GPU is."""
    name = kernel_backend if backend == "interpret" else backend
    return name, "cuda" if kernel_backend == "triton" and name != "torch" else "cpu"


class Layout:
    """Places operands in one layout, and checks afterwards that nothing was written outside them."""

    def __init__(self, kind: str, device: str) -> None:
        self.kind, self.device = kind, device
        self.guards: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, buffer, outside-the-view)

    def _nan(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "chunked" and len(shape) == 2:
            buf = RowChunkedBuffer(shape[0], (shape[1], GUARD), CHUNKS, dtype, self.device)
            buf.flat.fill_(math.nan)
            self.guards.append((name, buf.views[1], torch.ones_like(buf.views[1], dtype=torch.bool)))
            return buf.views[0]
        if len(shape) == 1:  # every other element
            base = torch.full((2 * shape[0] + 1,), math.nan, dtype=dtype, device=self.device)
            view, outside = base[1::2], torch.ones_like(base, dtype=torch.bool)
            outside[1::2] = False
        elif name in ("x", "dy", "u", "du", "y0"):  # rows column-major, padded leading dimension
            base = torch.full((shape[1], shape[0] + 5), math.nan, dtype=dtype, device=self.device)
            view, outside = base[:, 2:shape[0] + 2].t(), torch.ones_like(base, dtype=torch.bool)
            outside[:, 2:shape[0] + 2] = False
        else:  # every other column
            base = torch.full((shape[0], 2 * shape[1] + 3), math.nan, dtype=dtype, device=self.device)
            view, outside = base[:, 1:2 * shape[1] + 1:2], torch.ones_like(base, dtype=torch.bool)
            outside[:, 1:2 * shape[1] + 1:2] = False
        self.guards.append((name, base, outside))
        return view

    def put(self, name: str, t: torch.Tensor, *, rows: bool = False) -> torch.Tensor:
        """``t`` in this layout: ``rows`` operands chunked or column-major, the rest strided."""
        if self.kind == "plain" or (self.kind == "chunked" and not rows):
            return t.clone().to(self.device)
        v = self._nan(name, tuple(t.shape), t.dtype)
        v.copy_(t.view(v.shape) if v.dim() == 3 else t)
        return v

    def out(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An output of this layout (plain: a fresh contiguous tensor)."""
        if self.kind == "plain" or (self.kind == "chunked" and len(shape) == 1):
            return torch.full(shape, math.nan, dtype=dtype, device=self.device)
        return self._nan(name, shape, dtype)

    def untouched(self) -> list[str]:
        return [f"{name}: written outside its {self.kind} view" for name, base, outside in self.guards
                if not torch.isnan(base[outside]).all()]


def flat(t: torch.Tensor) -> torch.Tensor:
    return (t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t).cpu()


def _rnd(g: torch.Generator, *shape, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


def _col_scale(g: torch.Generator) -> torch.Tensor:
    """A DoRA-like g: positive, around 1, spread enough that a missing or misplaced g shows."""
    return (0.4 + 1.2 * torch.rand(N, generator=g, dtype=torch.float64)).float()


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: str
    lora: str
    p: float
    layout: str
    r: int

    @property
    def id(self) -> str:
        lora = f"-lora_{self.lora}" if self.lora != self.dtype else ""
        return f"{self.backend}-{self.dtype}{lora}-p{self.p:g}-{self.layout}-r{self.r}"


def _cases(ps: tuple[float, ...]) -> list[Case]:
    out = []
    for backend in BACKENDS:
        for i, (dt, lora) in enumerate(PRECISIONS):
            for p in ps:
                # Every layout in fp32 and with fp32 LoRA weights beside bf16; plain elsewhere.
                layouts = LAYOUTS if (dt, lora) in (("fp32", "fp32"), ("bf16", "fp32")) else ["plain"]
                out += [Case(backend, dt, lora, p, lay, (1, 5, 16)[(i + j) % 3]) for j, lay in enumerate(layouts)]
    return out


def _check(case_id: str, results: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]], dt: torch.dtype,
           lay: Layout) -> None:
    """Every (name, ours, exact fp64, torch in dt) within the bar; nothing written outside a view."""
    failures = [f"{case_id}: {m}" for m in lay.untouched()]
    for name, ours, exact, low in results:
        own = None if dt == torch.float32 else {f"torch in {dt}": rel_err(low.double(), exact)}
        bar, why = bar_for(dt, own)
        failures.append(exceeds(f"{name} ({case_id})", rel_err(flat(ours), exact), bar, why))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


def _drop(p: float, device: str, row0: int = ROW0, col0: int = COL0) -> tuple[M.DropoutSpec, torch.Tensor, float]:
    """(spec, keep-mask [T, K] from mask.keep_mask, 1/(1-p))."""
    thr = M.dropout_threshold(p)
    seed = torch.tensor([0x5EED0D0A], dtype=torch.int64, device=device)
    spec = M.DropoutSpec(seed, thr, row0, col0) if thr else M.NO_DROPOUT
    return spec, M.keep_mask(seed, row0, T, col0, K, thr), M.keep_scale(thr)


# ---------------------------------------------------------------------------------------------
# lora_linear_fwd: col_scale, out0, drop (and bias)
# ---------------------------------------------------------------------------------------------
FWD_CASES = _cases((0.0, 0.1))


@pytest.mark.parametrize("case", FWD_CASES, ids=[c.id for c in FWD_CASES])
def test_linear_fwd_dora(kernel_backend, case):
    backend, dev = _where(kernel_backend, case.backend)
    dt, ldt, r = DTYPES[case.dtype], DTYPES[case.lora], case.r
    g = torch.Generator().manual_seed(1)
    x, W, u = _rnd(g, T, K, dtype=dt), _rnd(g, N, K, dtype=dt, std=K ** -0.5), _rnd(g, T, r, dtype=dt)
    B, bias, gs = _rnd(g, N, r, dtype=ldt, std=r ** -0.5), _rnd(g, N, dtype=dt), _col_scale(g)
    drop, keep, inv = _drop(case.p, dev)
    lay = Layout(case.layout, dev)
    x_, W_, u_, B_ = lay.put("x", x, rows=True), lay.put("W", W), lay.put("u", u, rows=True), lay.put("B", B)
    # out0 wider than out (strided), out wider than out0 (chunked, 16-bit): cublas accumulates in the wider.
    o0_dt = torch.float32 if case.layout == "strided" else dt
    out_dt = torch.float32 if case.layout == "chunked" else dt

    x64, W64, u64, B64, g64 = x.double(), W.double(), u.double(), B.double(), gs.double()
    acc64 = (x64 * keep.double() * inv) @ W64.t() + SCALE * u64 @ B64.t()
    acc_low = (x * keep.to(dt)) @ W.t() * inv + SCALE * (u @ B.to(dt).t())
    results = []
    # (col_scale, out0, bias): all together everywhere; the others (cublas' other epilogues) plain only.
    combos = [(True, True, True)] + ([(True, False, False), (False, True, False), (False, True, True)]
                                     if case.layout == "plain" else [])
    for with_g, with_o0, with_bias in combos:
        tag = "".join(n for n, on in (("g", with_g), ("+out0", with_o0), ("+bias", with_bias)) if on)
        out0 = lay.out("out0", (T, N), o0_dt) if with_o0 else None
        out = lay.out("out", (T, N), out_dt)
        y = L.lora_linear_fwd(x_, W_, u_, B_, scale=SCALE, bias=lay.put("bias", bias) if with_bias else None, out=out,
                              col_scale=lay.put("g", gs) if with_g else None, out0=out0, drop=drop, backend=backend)
        assert y is out, f"{case.id} {tag}: must return out"
        want = acc64 * (g64 if with_g else 1) + (bias.double() if with_bias else 0)
        low = acc_low * (gs.to(dt) if with_g else 1) + (bias if with_bias else 0)
        results.append((f"out[{tag}]", y, want, low))
        if with_o0:
            results.append((f"out0[{tag}]", out0, acc64, acc_low))
    _check(case.id, results, dt, lay)


# ---------------------------------------------------------------------------------------------
# lora_dy_bwd: col_scale, y0 -> dm_out
# ---------------------------------------------------------------------------------------------
DY_CASES = _cases((0.0,))


@pytest.mark.parametrize("case", DY_CASES, ids=[c.id for c in DY_CASES])
def test_dy_bwd_dora(kernel_backend, case):
    backend, dev = _where(kernel_backend, case.backend)
    dt, ldt, r = DTYPES[case.dtype], DTYPES[case.lora], case.r
    g = torch.Generator().manual_seed(2)
    # u and y0 hold all of dy's rows (plain), or rows [10, 50) (row-parallel SP's own rows).
    row0, rows = (0, T) if case.layout == "plain" else (10, 40)
    dy, B, gs = _rnd(g, T, N, dtype=dt), _rnd(g, N, r, dtype=ldt, std=r ** -0.5), _col_scale(g)
    u = _rnd(g, rows, r, dtype=dt)
    y0 = _rnd(g, rows, N, dtype=torch.float32 if case.layout == "strided" else dt)
    lay = Layout(case.layout, dev)
    dy_, B_, g_ = lay.put("dy", dy, rows=True), lay.put("B", B), lay.put("g", gs)
    u_ = lay.put("u", u, rows=case.layout == "strided")  # u and y0 are plain 2-D operands (any strides)
    y0_ = lay.put("y0", y0, rows=case.layout == "strided")

    sl = slice(row0, row0 + rows)
    gdy64, gdy_low = gs.double() * dy.double(), gs.to(dt) * dy
    want_du, low_du = SCALE * gdy64 @ B.double(), SCALE * (gdy_low @ B.to(dt))
    want_db, low_db = SCALE * gdy64[sl].t() @ u.double(), SCALE * (gdy_low[sl].t() @ u)
    want_dm, low_dm = (dy.double()[sl] * y0.double()).sum(0), (dy[sl] * y0.to(dt)).sum(0)

    dm = lay.out("dm", (N,), torch.float32)
    du, db = L.lora_dy_bwd(dy_, B_, u_, scale=SCALE, u_row0=row0, du_out=lay.out("du", (T, r), dt), col_scale=g_,
                           y0=y0_, dm_out=dm, backend=backend)
    assert db.dtype == torch.float32, f"dB must come back in fp32, got {db.dtype}"
    results = [("du", du, want_du, low_du), ("dB", db, want_db, low_db), ("dm", dm, want_dm, low_dm)]
    # dm alone (no u, no du): the same partials in the same order, so the same bits.
    dm_only = torch.full((N,), math.nan, device=dev)
    assert L.lora_dy_bwd(dy_, B_, None, scale=SCALE, u_row0=row0, compute_du=False, y0=y0_, dm_out=dm_only,
                         backend=backend) == (None, None)
    assert torch.equal(dm_only, dm.contiguous()), f"{case.id}: dm without u and du differs from dm beside them"
    _check(case.id, results, dt, lay)


def test_dy_bwd_partials_cross_row_blocks(kernel_backend, monkeypatch):
    """dm's and dB's fp32 partials over several row blocks (the dy pass's 256 rows shrunk to 16), y0
    from row 10: summed in a fixed order, so the same bits twice, and against fp64 and the torch backend."""
    backend, dev = _where(kernel_backend, "interpret")
    monkeypatch.setattr(C, "DY_ROWS", 16)
    g = torch.Generator().manual_seed(3)
    row0, rows, r = 10, 45, 5  # rows 10..54: row blocks 0 to 3, four partial slots
    dy, B, gs = _rnd(g, T, N, dtype=torch.bfloat16), _rnd(g, N, r, dtype=torch.float32), _col_scale(g)
    u, y0 = _rnd(g, rows, r, dtype=torch.bfloat16), _rnd(g, rows, N, dtype=torch.bfloat16)
    dy_, B_, g_, u_, y0_ = (t.to(dev) for t in (dy, B, gs, u, y0))
    runs = []
    for _ in range(2):
        dm = torch.empty(N, device=dev)
        _, db = L.lora_dy_bwd(dy_, B_, u_, scale=SCALE, u_row0=row0, col_scale=g_, y0=y0_, dm_out=dm,
                              compute_du=False, backend=backend)
        runs.append((db, dm))
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "dB / dm differ between two identical calls"
    sl = slice(row0, row0 + rows)
    want_db = SCALE * (gs.double() * dy.double())[sl].t() @ u.double()
    want_dm = (dy.double()[sl] * y0.double()).sum(0)
    dm_t = torch.empty(N)
    _, db_t = L.lora_dy_bwd(dy, B, u, scale=SCALE, u_row0=row0, col_scale=gs, y0=y0, dm_out=dm_t, compute_du=False,
                            backend="torch")
    # Products of two bf16 values are exact in fp32 and dm sums them in fp32: the fp32 bar holds; so
    # does the torch backend's dB, which takes g ⊙ dy in fp32.
    for name, got, want in (("dm", runs[0][1], want_dm), ("dm torch", dm_t, want_dm), ("dB torch", db_t, want_db)):
        assert rel_err(got.cpu(), want) <= 1e-5, f"{name}: rel err {rel_err(got.cpu(), want):.1e}"
    # dB: g ⊙ dy rounded once to bf16 in the kernel, exact in the torch backend.
    bar, why = bar_for(torch.bfloat16, {"torch in bf16": rel_err(
        SCALE * ((gs.to(torch.bfloat16) * dy)[sl].t() @ u).double(), want_db)})
    assert rel_err(runs[0][0].cpu(), want_db) <= bar, f"dB: rel err {rel_err(runs[0][0].cpu(), want_db):.1e} ({why})"


# ---------------------------------------------------------------------------------------------
# lora_linear_dx: col_scale, mask_all
# ---------------------------------------------------------------------------------------------
DX_CASES = _cases((0.0, 0.1))


@pytest.mark.parametrize("case", DX_CASES, ids=[c.id for c in DX_CASES])
def test_linear_dx_dora(kernel_backend, case):
    backend, dev = _where(kernel_backend, case.backend)
    dt, ldt, r = DTYPES[case.dtype], DTYPES[case.lora], case.r
    g = torch.Generator().manual_seed(4)
    dy, W, du = _rnd(g, T, N, dtype=dt), _rnd(g, N, K, dtype=dt, std=N ** -0.5), _rnd(g, T, r, dtype=dt)
    A, gs = _rnd(g, r, K, dtype=ldt, std=r ** -0.5), _col_scale(g)
    drop, keep, inv = _drop(case.p, dev)
    lay = Layout(case.layout, dev)
    dy_, W_, du_, A_ = lay.put("dy", dy, rows=True), lay.put("W", W), lay.put("du", du, rows=True), lay.put("A", A)
    m64, m_low = keep.double() * inv, keep.to(dt) * inv

    results = []
    # (col_scale, mask_all); without g, mask_all on the plain layout only.
    for with_g, mask_all in [(True, False), (True, True)] + ([(False, True)] if case.layout == "plain" else []):
        tag = f"g={with_g},mask_all={mask_all}"
        dx = L.lora_linear_dx(dy_, W_, du_, A_, drop=drop, out=lay.out("dx", (T, K), dt),
                              col_scale=lay.put("g", gs) if with_g else None, mask_all=mask_all, backend=backend)
        base64 = ((gs.double() if with_g else 1) * dy.double()) @ W.double()
        base_low = ((gs.to(dt) if with_g else 1) * dy) @ W
        lora64, lora_low = du.double() @ A.double(), du @ A.to(dt)
        if mask_all:
            want, low = (base64 + lora64) * m64, (base_low + lora_low) * m_low
        else:
            want, low = base64 + lora64 * m64, base_low + lora_low * m_low
        results.append((f"dx[{tag}]", dx, want, low))
    _check(case.id, results, dt, lay)


# ---------------------------------------------------------------------------------------------
# The dropout mask, element by element
# ---------------------------------------------------------------------------------------------
# (row0, col0): per-element mask (col0 odd), 8-column groups (col0 % 8 == 0), past 2^32 rows and 2^35 columns.
MASK_AT = [(ROW0, COL0), (5, 16), (2**32 - 3, 2**35 - 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("row0", "col0"), MASK_AT, ids=[f"row{r}-col{c}" for r, c in MASK_AT])
def test_masks_are_keep_mask(kernel_backend, backend, dtype, row0, col0):
    """With W = I the forward's out0 is drop(x) itself and mask_all's dx is drop(dy): each equals
    x ⊙ keep_mask ⋅ (1/(1-p)) exactly, so every element's keep bit is shrink_fwd's."""
    backend, dev = _where(kernel_backend, backend)
    dt, Kw = DTYPES[dtype], K  # N = K here, so that W is square
    g = torch.Generator().manual_seed(5)
    x = (0.5 + torch.rand(T, Kw, generator=g)).to(dt).to(dev)  # no zeros: a zero in the output is a drop
    eye = torch.eye(Kw, dtype=dt, device=dev)
    thr = M.dropout_threshold(0.3)
    seed = torch.tensor([987654321], dtype=torch.int64, device=dev)
    drop = M.DropoutSpec(seed, thr, row0, col0)
    keep = M.keep_mask(seed, row0, T, col0, Kw, thr).to(dev)
    inv = torch.tensor(M.keep_scale(thr), dtype=torch.float32)
    want = ((x.float() * keep) * inv.to(dev)).to(dt)

    out0 = torch.empty(T, Kw, dtype=dt, device=dev)
    zeros_r = torch.zeros(T, 4, dtype=dt, device=dev)
    L.lora_linear_fwd(x, eye, zeros_r, torch.zeros(Kw, 4, device=dev), scale=SCALE, out0=out0, drop=drop,
                      backend=backend)
    dx = L.lora_linear_dx(x, eye, zeros_r, torch.zeros(4, Kw, device=dev), drop=drop, mask_all=True,
                          col_scale=torch.ones(Kw, device=dev), backend=backend)
    for name, got in (("linear_fwd out0", out0), ("linear_dx mask_all", dx)):
        bad = (got != want).nonzero()
        assert not len(bad), (f"{name} at ({row0}, {col0}): {len(bad)} elements differ from x ⊙ keep_mask / (1-p), "
                              f"first at {bad[0].tolist()}: {got[tuple(bad[0])]} vs {want[tuple(bad[0])]}")


def test_per_row_thresholds_in_the_forward(kernel_backend):
    """A mixed batch of adapters (one p per sample, ``row_thr``): out0 = x ⊙ keep_mask(row_thr), the
    rescale left to the caller as in every op."""
    backend, dev = _where(kernel_backend, "interpret")
    x = (0.5 + torch.rand(T, K, generator=torch.Generator().manual_seed(6))).to(dev)
    row_thr = torch.tensor([M.dropout_threshold(p) for p in (0.0, 0.5, 0.2)], dtype=torch.int32, device=dev)
    seed = torch.tensor([42], dtype=torch.int64, device=dev)
    drop = M.DropoutSpec(seed, int(row_thr.max()), ROW0, COL0, row_thr=row_thr)
    out0 = torch.empty(T, K, device=dev)
    L.lora_linear_fwd(x, torch.eye(K, device=dev), torch.zeros(T, 2, device=dev), torch.zeros(K, 2, device=dev),
                      scale=SCALE, out0=out0, drop=drop, backend=backend)
    keep = M.keep_mask(seed, ROW0, T, COL0, K, 0, row_thr=row_thr).to(dev)
    assert torch.equal(out0, x * keep), f"per-row thresholds: {(out0 != x * keep).sum().item()} elements differ"


# ---------------------------------------------------------------------------------------------
# Defaults change nothing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_neutral_dora_arguments_give_todays_bits(kernel_backend, backend, dtype):
    """g = 1, out0 alone, p = 0 and mask_all without dropout are exact no-ops on top of today's ops:
    each output equals the plain call's bit for bit (multiplying by 1.0 and storing twice are exact).
    With a bias, cublas adds it after its GEMM once g or out0 is given (the bias follows g, and out0
    has none), instead of in the Triton LoRA term before it: a different rounding order."""
    backend, dev = _where(kernel_backend, backend)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(7)
    x, W, u, B = (_rnd(g, T, K, dtype=dt), _rnd(g, N, K, dtype=dt, std=0.1), _rnd(g, T, 5, dtype=dt),
                  _rnd(g, N, 5, dtype=torch.float32))
    dy, du, A, bias = _rnd(g, T, N, dtype=dt), _rnd(g, T, 5, dtype=dt), _rnd(g, 5, K, dtype=torch.float32), \
        _rnd(g, N, dtype=dt)
    x, W, u, B, dy, du, A, bias = (t.to(dev) for t in (x, W, u, B, dy, du, A, bias))
    ones = torch.ones(N, device=dev)
    mk = dict(backend=backend)
    pairs = []
    for b in (None, bias) if backend != "cublas" else (None,):
        plain = L.lora_linear_fwd(x, W, u, B, scale=SCALE, bias=b, **mk)
        out0 = torch.empty(T, N, dtype=dt, device=dev)
        same = {
            "linear_fwd col_scale=1": L.lora_linear_fwd(x, W, u, B, scale=SCALE, bias=b, col_scale=ones, **mk),
            "linear_fwd out0": L.lora_linear_fwd(x, W, u, B, scale=SCALE, bias=b, out0=out0, **mk),
            "linear_fwd p=0": L.lora_linear_fwd(x, W, u, B, scale=SCALE, bias=b, drop=_drop(0.0, dev)[0], **mk),
        }
        pairs += [(f"{k} (bias={b is not None})", v, plain) for k, v in same.items()]
    pairs.append(("out0 = out without bias", out0, L.lora_linear_fwd(x, W, u, B, scale=SCALE, **mk)))
    du0, db0 = L.lora_dy_bwd(dy, B, u, scale=SCALE, **mk)
    du1, db1 = L.lora_dy_bwd(dy, B, u, scale=SCALE, col_scale=ones, **mk)
    pairs += [("dy_bwd du col_scale=1", du1, du0), ("dy_bwd dB col_scale=1", db1, db0)]
    dx0 = L.lora_linear_dx(dy, W, du, A, **mk)
    pairs += [("linear_dx col_scale=1", L.lora_linear_dx(dy, W, du, A, col_scale=ones, **mk), dx0),
              ("linear_dx mask_all, p=0", L.lora_linear_dx(dy, W, du, A, mask_all=True, **mk), dx0)]
    bad = [name for name, a, b in pairs if not torch.equal(a, b)]
    assert not bad, f"{backend} {dtype}: not bit-identical to the plain call: {bad}"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def test_bad_dora_arguments_are_refused():
    x, W, u, B = torch.randn(8, 12), torch.randn(6, 12), torch.randn(8, 2), torch.randn(6, 2)
    dy, du, A = torch.randn(8, 6), torch.randn(8, 2), torch.randn(2, 12)
    fwd = lambda **kw: L.lora_linear_fwd(x, W, u, B, scale=1.0, backend="torch", **kw)  # noqa: E731
    dyb = lambda **kw: L.lora_dy_bwd(dy, B, kw.pop("u", u), scale=1.0, backend="torch", **kw)  # noqa: E731
    dxb = lambda **kw: L.lora_linear_dx(dy, W, du, A, backend="torch", **kw)  # noqa: E731
    y0, dm = torch.randn(8, 6), torch.empty(6)
    cases = [
        ("col_scale list", TypeError, ["col_scale", "torch.Tensor"], fwd, dict(col_scale=[1.0] * 6)),
        ("col_scale bf16", TypeError, ["col_scale", "float32"], fwd, dict(col_scale=torch.ones(6).bfloat16())),
        ("col_scale length", ValueError, ["col_scale", "[6]"], fwd, dict(col_scale=torch.ones(7))),
        ("col_scale 2-D", ValueError, ["col_scale", "[6]"], dxb, dict(col_scale=torch.ones(1, 6))),
        ("col_scale dy_bwd", ValueError, ["col_scale", "[6]"], dyb, dict(col_scale=torch.ones(12))),
        ("out0 rows", ValueError, ["out0", "8 rows of width 6"], fwd, dict(out0=torch.empty(7, 6))),
        ("out0 width", ValueError, ["out0", "8 rows of width 6"], fwd, dict(out0=torch.empty(8, 5))),
        ("out0 int", TypeError, ["out0", "float32"], fwd, dict(out0=torch.empty(8, 6, dtype=torch.int32))),
        ("drop", TypeError, ["drop", "DropoutSpec"], fwd, dict(drop=0.1)),
        ("y0 alone", ValueError, ["y0", "dm_out", "together"], dyb, dict(y0=y0)),
        ("dm_out alone", ValueError, ["y0", "dm_out", "together"], dyb, dict(dm_out=dm)),
        ("y0 width", ValueError, ["y0", "[Y, 6]"], dyb, dict(y0=torch.randn(8, 5), dm_out=dm)),
        ("y0 rows vs u", ValueError, ["y0", "u's rows"], dyb, dict(y0=torch.randn(7, 6), dm_out=dm)),
        ("y0 past dy", ValueError, ["y0", "u_row0"], dyb, dict(u=None, y0=torch.randn(5, 6), dm_out=dm, u_row0=4)),
        ("dm_out dtype", TypeError, ["dm_out", "float32"], dyb, dict(y0=y0, dm_out=torch.empty(6).double())),
        ("dm_out shape", ValueError, ["dm_out", "[6]"], dyb, dict(y0=y0, dm_out=torch.empty(8))),
        ("mask_all", TypeError, ["mask_all", "bool"], dxb, dict(mask_all=1)),
    ]
    for what, exc, words, fn, kw in cases:
        assert_raises(what, exc, words, fn, **kw)
