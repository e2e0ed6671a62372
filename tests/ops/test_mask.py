"""The dropout keep-mask: the torch implementation (``mask.keep_mask``) is the kernels' mask, bit for bit.

Checked three ways: a test-only Triton kernel that calls the kernels' own ``_keep`` and stores
it; the public launch wrappers, fed inputs that make their output the scaled mask itself; and
``mask.philox4x32`` against ``triton.language.philox`` and Random123's published answers.
Then the statistics (drop fraction) and the block algebra the TP layouts rely on (a sub-block's
mask is the slice of a bigger block's; different seeds give different masks).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tplora_kernels import mask as M
from tplora_kernels.ops import launch as L
from tplora_kernels.ops.kernels import _keep, _keep8

# Offsets that stress the counter layout (col >> 3, row, row >> 32, col >> 35): not multiples of 8,
# blocks straddling 2^31, 2^32 (the row word) and 2^35 (the column's high word), and far beyond.
OFFSETS = [
    (0, 0),
    (5, 3),
    (13, 2**31 - 3),
    (2**31 - 7, 11),
    (2**32 - 3, 2**32 - 5),
    (2**33 + 5, 2**35 + 3),
    (2**35 - 2, 2**35 - 9),
    (2**40 - 5, 2**40 - 13),
]
OFFSET_IDS = [f"row{r:#x}-col{c:#x}" for r, c in OFFSETS]
SEEDS = [0, 1, 0x0123456789ABCDEF, 2**63 - 1]
SEED_IDS = ["seed0", "seed1", "seed_hi_lo", "seed_max"]


def _device(kernel_backend: str) -> str:
    return "cuda" if kernel_backend == "triton" else "cpu"


@triton.jit
def _keep_probe_kernel(p_seed, p_out, row0, col0, THR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # The kernels' own mask function, stored as int8: [BM, BN] block at global (row0, col0).
    seed = tl.load(p_seed)
    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    keep = _keep(seed, row0 + o_m.to(tl.int64), col0 + o_n.to(tl.int64), THR)
    tl.store(p_out + o_m[:, None] * BN + o_n[None, :], keep.to(tl.int8))


@triton.jit
def _philox_probe_kernel(p_seed, p_ctr, p_out, N: tl.constexpr, ROUNDS: tl.constexpr):
    # triton.language.philox on counters p_ctr[4, N] (int64 holding uint32), words to p_out[4, N].
    seed = tl.load(p_seed)
    o = tl.arange(0, N)
    c0 = tl.load(p_ctr + o).to(tl.uint32)
    c1 = tl.load(p_ctr + N + o).to(tl.uint32)
    c2 = tl.load(p_ctr + 2 * N + o).to(tl.uint32)
    c3 = tl.load(p_ctr + 3 * N + o).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=ROUNDS)
    tl.store(p_out + o, w0.to(tl.int64))
    tl.store(p_out + N + o, w1.to(tl.int64))
    tl.store(p_out + 2 * N + o, w2.to(tl.int64))
    tl.store(p_out + 3 * N + o, w3.to(tl.int64))


def kernel_mask(seed: int, row0: int, col0: int, thr: int, device: str, bm: int = 16, bn: int = 32) -> torch.Tensor:
    out = torch.full((bm, bn), -1, dtype=torch.int8, device=device)
    _keep_probe_kernel[(1,)](torch.tensor([seed], dtype=torch.int64, device=device), out, row0, col0, THR=thr,
                             BM=bm, BN=bn)
    assert bool(((out == 0) | (out == 1)).all()), "probe kernel left unwritten elements"
    return out.bool().cpu()


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    idx = (a != b).nonzero()
    return f"{len(idx)} elements differ, first at {tuple(idx[0].tolist())}" if len(idx) else "equal"


# ---------------------------------------------------------------------------------------------
# The kernels' _keep vs mask.keep_mask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
@pytest.mark.parametrize("seed", SEEDS, ids=SEED_IDS)
@pytest.mark.parametrize(("row0", "col0"), OFFSETS, ids=OFFSET_IDS)
def test_kernel_keep_is_torch_keep_mask(kernel_backend, row0, col0, seed, p):
    """The kernels' in-register mask is keep_mask's, bit for bit, at offsets that stress the counter layout."""
    thr = M.dropout_threshold(p)
    got = kernel_mask(seed, row0, col0, thr, _device(kernel_backend))
    want = M.keep_mask(seed, row0, 16, col0, 32, thr)
    assert torch.equal(got, want), (f"kernel _keep != keep_mask at seed={seed:#x} row0={row0:#x} col0={col0:#x} "
                                    f"p={p}: {_first_diff(got, want)}")


@settings(max_examples=200)
@given(seed=st.integers(0, 2**63 - 1), row0=st.integers(0, 2**44), col0=st.integers(0, 2**44),
       thr=st.integers(1, 2**16 - 1))
@example(seed=2**63 - 1, row0=2**33 + 5, col0=2**35 + 3, thr=1)
@example(seed=0, row0=2**32 - 1, col0=2**35 - 1, thr=2**16 - 1)
def test_kernel_keep_is_torch_keep_mask_anywhere(kernel_backend, seed, row0, col0, thr):
    """The kernels' mask is keep_mask's at random seeds, offsets and thresholds."""
    got = kernel_mask(seed, row0, col0, thr, _device(kernel_backend), bm=8, bn=16)
    want = M.keep_mask(seed, row0, 8, col0, 16, thr)
    assert torch.equal(got, want), (f"kernel _keep != keep_mask at seed={seed:#x} row0={row0:#x} col0={col0:#x} "
                                    f"thr={thr}: {_first_diff(got, want)}")


# ---------------------------------------------------------------------------------------------
# Through the public launch wrappers: inputs that turn each op's output into mask / (1-p)
# ---------------------------------------------------------------------------------------------
PUBLIC_OFFSETS = [(0, 0), (5, 3), (2**32 - 3, 2**32 - 5), (2**33 + 5, 2**35 + 3)]


def _scaled_mask(seed, row0, T, col0, K, thr, dtype) -> torch.Tensor:
    return (M.keep_mask(seed, row0, T, col0, K, thr).float() * M.keep_scale(thr)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(("row0", "col0"), PUBLIC_OFFSETS, ids=[f"row{r:#x}-col{c:#x}" for r, c in PUBLIC_OFFSETS])
@pytest.mark.parametrize("backend", ["interpret", "torch", "cublas"])
def test_public_ops_apply_exactly_the_mask(kernel_backend, backend, row0, col0, dtype):
    """linear_dx with dy=0 and du=A=1 (r=1), shrink_fwd with x=1 and A=I, shrink_bwd with du=I and x=1.

    Each then outputs exactly mask · 1/(1-p) (one product per element, so no rounding but the
    final cast): the mask each kernel generates, at global offsets, against ``keep_mask``.
    """
    if backend == "interpret" and kernel_backend != "interpret":
        backend = kernel_backend
    dev = _device(kernel_backend) if backend != "torch" else "cpu"
    T, K, N, p, seed = 37, 44, 8, 0.3, 0x5EED0000F00D
    thr = M.dropout_threshold(p)
    s = torch.tensor([seed], dtype=torch.int64, device=dev)
    want = _scaled_mask(seed, row0, T, col0, K, thr, dtype)
    where = f"backend={backend} {dtype} row0={row0:#x} col0={col0:#x}"
    drop = M.DropoutSpec(s, thr, row0, col0)

    dx = L.lora_linear_dx(torch.zeros(T, N, dtype=dtype, device=dev), torch.randn(N, K, device=dev).to(dtype),
                          torch.ones(T, 1, dtype=dtype, device=dev), torch.ones(1, K, dtype=dtype, device=dev),
                          drop=drop, backend=backend).cpu()
    assert torch.equal(dx, want), f"lora_linear_dx mask ({where}): {_first_diff(dx, want)}"

    u = L.lora_shrink_fwd(torch.ones(T, K, dtype=dtype, device=dev), torch.eye(K, dtype=dtype, device=dev),
                          drop=drop, backend=backend).cpu()
    assert torch.equal(u, want), f"lora_shrink_fwd mask ({where}): {_first_diff(u, want)}"

    da = L.lora_shrink_bwd(torch.eye(T, dtype=dtype, device=dev), torch.ones(T, K, dtype=dtype, device=dev),
                           drop=drop, backend=backend).cpu()
    want32 = _scaled_mask(seed, row0, T, col0, K, thr, torch.float32)
    assert torch.equal(da, want32), f"lora_shrink_bwd mask ({where}): {_first_diff(da, want32)}"


# ---------------------------------------------------------------------------------------------
# Philox
# ---------------------------------------------------------------------------------------------
PHILOX_SEEDS = [0, 1, 0xFFFFFFFF, 2**32, 0x0123456789ABCDEF, 2**63 - 1, -1]


@pytest.mark.parametrize("seed", PHILOX_SEEDS, ids=[f"seed{s:#x}" for s in PHILOX_SEEDS])
def test_philox_matches_triton_philox(kernel_backend, seed):
    """mask.philox4x32 is triton's tl.philox, at 7 and 10 rounds, on edge-case counters."""
    dev = _device(kernel_backend)
    g = torch.Generator().manual_seed(seed & 0xFFFF)
    n = 32
    ctr = torch.randint(0, 2**32, (4, n), generator=g, dtype=torch.int64)
    ctr[:, 0] = 0
    ctr[:, 1] = 2**32 - 1
    ctr[:, 2] = torch.tensor([1, 2**31, 2**32 - 2, 7])
    out = torch.full((4, n), -1, dtype=torch.int64, device=dev)
    for rounds in sorted({M.PHILOX_ROUNDS, 10}):
        _philox_probe_kernel[(1,)](torch.tensor([seed], dtype=torch.int64, device=dev), ctr.to(dev), out, N=n,
                                   ROUNDS=rounds)
        want = torch.stack(torch.broadcast_tensors(*M.philox4x32(seed, *ctr, rounds=rounds)))
        assert torch.equal(out.cpu(), want), (f"philox4x32-{rounds} != tl.philox for seed {seed:#x}: "
                                              f"{_first_diff(out.cpu(), want)}")


# Random123 (DEShawResearch/random123) tests/kat_vectors, the three "philox4x32 10" lines: counter, key -> output.
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("ctr", "key", "want"), RANDOM123_KAT, ids=["zeros", "ones", "pi"])
def test_philox_random123_known_answers(ctr, key, want):
    """mask.philox4x32 gives Random123's published answers."""
    seed = key[0] | key[1] << 32  # Triton's (and mask's) key: low word first
    got = tuple(int(w) for w in M.philox4x32(seed, *(torch.tensor([c]) for c in ctr), rounds=10))
    assert got == want, f"philox4x32-10{ctr} key {key}: {[hex(v) for v in got]} != Random123 {[hex(v) for v in want]}"


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_drop_fraction_is_p(p):
    """The fraction of dropped elements is p."""
    thr = M.dropout_threshold(p)
    assert abs(thr / 2**16 - p) <= 2**-17, f"threshold {thr} is not p={p} rounded to 2^-16"
    assert M.keep_scale(thr) == 1 / (1 - thr / 2**16), f"keep_scale({thr}) is not the exact 1/P(keep)"
    keep = M.keep_mask(20240601, 3, 1000, 2**32 - 101, 800, thr)  # 8e5 elements, 1e5 per lane
    frac = 1 - keep.float().mean().item()
    assert abs(frac - p) <= 0.01, f"drop fraction {frac:.4f} for p={p} over {keep.numel()} elements"
    for lane in range(8):  # every 16-bit lane of the 128-bit Philox output drops at rate p
        cols = [c for c in range(800) if (2**32 - 101 + c) % 8 == lane]
        f = 1 - keep[:, cols].float().mean().item()
        assert abs(f - p) <= 0.01, f"lane {lane}: drop fraction {f:.4f} for p={p} over {keep[:, cols].numel()}"


def test_p_zero_keeps_everything():
    """p = 0 keeps every element."""
    assert M.dropout_threshold(0.0) == 0, "p=0 must give threshold 0"
    assert bool(M.keep_mask(7, 0, 64, 0, 64, 0).all()), "threshold 0 dropped something"


@pytest.mark.parametrize(("s1", "s2"), [(0, 1), (1234, 1234 + 2**32), (2**63 - 1, 2**63 - 2)],
                         ids=["low_word", "high_word", "max"])
def test_different_seeds_give_different_masks(s1, s2):
    """Masks of two seeds at p = 0.5 disagree on about half the elements, as independent masks do."""
    thr = M.dropout_threshold(0.5)
    a, b = M.keep_mask(s1, 0, 256, 0, 400, thr), M.keep_mask(s2, 0, 256, 0, 400, thr)
    disagree = (a != b).float().mean().item()
    # Independent p=0.5 masks disagree on half the elements.
    assert abs(disagree - 0.5) < 0.02, f"seeds {s1:#x} and {s2:#x}: masks disagree on {disagree:.3f}, not ~0.5"


@settings(max_examples=200)
@given(seed=st.integers(0, 2**63 - 1), row0=st.integers(0, 2**42), col0=st.integers(0, 2**42),
       rows=st.integers(1, 24), cols=st.integers(1, 40), data=st.data())
@example(seed=1, row0=2**32 - 4, col0=2**35 - 7, rows=8, cols=16, data=None)
def test_sub_block_is_slice_of_block(seed, row0, col0, rows, cols, data):
    """A block's mask, sliced, is the mask of the sub-block at the shifted global offsets.

    This is what makes TP layouts agree: a rank's rows (SP) or columns (row-parallel) are a
    sub-block of the full mask.
    """
    i = data.draw(st.integers(0, rows - 1)) if data else 3
    j = data.draw(st.integers(0, cols - 1)) if data else 5
    h = data.draw(st.integers(1, rows - i)) if data else rows - i
    w = data.draw(st.integers(1, cols - j)) if data else cols - j
    thr = M.dropout_threshold(0.4)
    big = M.keep_mask(seed, row0, rows, col0, cols, thr)
    sub = M.keep_mask(seed, row0 + i, h, col0 + j, w, thr)
    assert torch.equal(sub, big[i:i + h, j:j + w]), (
        f"mask of block at ({row0 + i:#x}, {col0 + j:#x}) [{h}x{w}] != slice [{i}:{i + h}, {j}:{j + w}] of the "
        f"block at ({row0:#x}, {col0:#x}), seed {seed:#x}: {_first_diff(sub, big[i:i + h, j:j + w])}")


@triton.jit
def _keep8_probe_kernel(p_seed, p_out, row0, g0, THR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # The kernels' packed mask (one Philox call per 8 columns): [BM, BN] block at (row0, 8·g0).
    seed = tl.load(p_seed)
    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    keep = _keep8(seed, row0 + o_m.to(tl.int64), g0, BN, THR)
    tl.store(p_out + o_m[:, None] * BN + o_n[None, :], keep.to(tl.int8))


@settings(max_examples=60)
@given(seed=st.integers(0, 2**63 - 1), row0=st.integers(0, 2**44), g0=st.integers(0, 2**41),
       thr=st.integers(1, 2**16 - 1))
@example(seed=2**63 - 1, row0=2**32 - 3, g0=2**32 - 1, thr=2**15)
@example(seed=12345, row0=0, g0=0, thr=1)
def test_packed_kernel_keep_is_torch_keep_mask(kernel_backend, seed, row0, g0, thr):
    """_keep8 (8 columns per Philox call, lanes re-interleaved) gives exactly keep_mask's bits."""
    device = _device(kernel_backend)
    out = torch.full((8, 32), -1, dtype=torch.int8, device=device)
    _keep8_probe_kernel[(1,)](torch.tensor([seed], dtype=torch.int64, device=device), out, row0, g0, THR=thr,
                              BM=8, BN=32)
    got = out.bool().cpu()
    want = M.keep_mask(seed, row0, 8, 8 * g0, 32, thr)
    assert bool(((out == 0) | (out == 1)).all()), "packed probe left unwritten elements"
    assert torch.equal(got, want), (f"kernel _keep8 != keep_mask at seed={seed:#x} row0={row0:#x} col0={8 * g0:#x} "
                                    f"thr={thr}: {_first_diff(got, want)}")


@pytest.mark.parametrize(("row", "col"), [(2**32 - 3, 5), (2**39 + 17, 2**35 + 9), (12345, 2**40 - 11)])
def test_mask_at_huge_indices_matches_independent_draws(row, col):
    """At rows past 2^32 and columns past 2^35 each mask bit is its own Philox draw, and nothing wraps."""
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
