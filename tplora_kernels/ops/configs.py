"""Launch configurations of the Triton kernels: one table per kernel, with the reasons.

A leaf module (torch and triton only): the ``triton`` backend launches from it, and the sm_90a
compile gate and the tests read it. Autotune varies only tiles that no reduction depends on,
warps and stages (see ``kernels``), and is keyed on the model dimensions, never on the token
count. ``TPLORA_AUTOTUNE=0`` pins one config per kernel and rank class (``pinned``), each
checked to compile clean for sm_90a. Under Triton's interpreter the tiles are large and fixed
(``INTERP_BLOCK``), because the interpreter pays per program and per loop step.
"""

from __future__ import annotations

import torch
import triton

__all__ = [
    "AUTOTUNE_KEYS",
    "CONFIGS",
    "DX_CONFIGS",
    "DY_COLS",
    "DY_CONFIGS",
    "DY_ROWS",
    "GROUP_M",
    "INTERP_BLOCK",
    "LINEAR_CONFIGS",
    "PINNED",
    "RED",
    "ROWS_PER_SPLIT",
    "ROW_RED",
    "SHRINK_BWD_CONFIGS",
    "SHRINK_CONFIGS",
    "block_r",
    "dy_rows",
    "fits",
    "pinned",
]

# Reduction blocks are fixed per dtype (bytes per tile row stay ~128 B); autotune only varies
# the other tiles, warps and stages, so every config gives the same bits (kernels docstring).
RED = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
# shrink-grad reduces over rows in blocks of this many tokens.
ROW_RED = 64
# The dy pass reduces dB over rows in blocks of 256 tokens (one fp32 [N, r] partial each: at r <= 16
# that is at most a quarter of dy's own bytes in 16 bits) and du over N in splits of 512 columns,
# which also gives the grid (T/256) x (N/512) programs to fill the GPU.
DY_ROWS = 256
DY_COLS = 512
# Row blocks that share a column sweep of the GEMMs' grouped launch order (L2 reuse of W).
GROUP_M = 8
# Shrink-grad splits T across programs so that K/BLOCK_K programs do not idle most SMs; the split
# depends only on T, so the summation order is the same on every rank and every run.
ROWS_PER_SPLIT = 1024
# Interpreter tiles: large, because the interpreter pays per program and per loop step, not per
# element; still small enough that the tests' odd sizes (63, 60, 15) exercise every mask.
INTERP_BLOCK = 64


def _cfgs(tiles: list[dict], warps=(4, 8), stages=(3, 4)) -> list[triton.Config]:
    return [triton.Config(t, num_warps=w, num_stages=s) for t in tiles for w in warps for s in stages]


def _tiles(names: tuple[str, str], rows: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s) for a, b, w, s in rows]


# The GEMM tables are each config that compiles clean for sm_90a in bf16 and fp16, with fp32 or
# 16-bit LoRA weights, under triton 3.6 and 3.9: no register spill, no wgmma serialisation
# (ptxas notes C751x), checked without a GPU by the compile gate (tools/aot_compile.py).
# (BLOCK_M, BLOCK_N, warps, stages); the first is Hopper's 128x256x64 tile on 8 warps (two
# warpgroups, 128 fp32 accumulators per thread), which TPLORA_AUTOTUNE=0 pins up to r = 64.
# 128x256 on 4 warps is absent: 256 accumulators per thread never fit.
LINEAR_CONFIGS = _tiles(("BLOCK_M", "BLOCK_N"), [
    (128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4),
    (128, 128, 4, 3), (128, 128, 4, 4), (64, 256, 8, 3), (64, 256, 4, 3),
    (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3), (128, 64, 4, 4),
])
# (BLOCK_M, BLOCK_K, warps, stages). dx holds at most 64 fp32 accumulators per thread: with
# dropout, 128 per thread (128x256 on 8 warps, 128x128 on 4, 64x256 on 4) spills in the mask
# prologue, where the tile round-trips through a blocked layout to meet the mask; 128x64 takes
# 8 warps because on 4 the per-row thresholds (ROW_THR) tip it past 255 registers.
DX_CONFIGS = _tiles(("BLOCK_M", "BLOCK_K"), [
    (128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3), (64, 256, 8, 4),
    (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
])
# BLOCK_M=32 keeps >= 2 programs per SM at T=8192 for this memory-bound pass.
SHRINK_CONFIGS = _cfgs([{"BLOCK_M": 32}, {"BLOCK_M": 64}, {"BLOCK_M": 128}], warps=(4,))
SHRINK_BWD_CONFIGS = _cfgs([{"BLOCK_K": 64}, {"BLOCK_K": 128}], warps=(4,))
# 8 warps first: the pinned config must not spill up to Σr = 64 (four r = 16 adapters in one
# batch), where 4 warps hold 256x64 fp32 du accumulators in 128 threads and spill (ptxas: 644 B).
DY_CONFIGS = _cfgs([{}], warps=(8, 4))

# Autotune keys: the model dimensions each kernel's tiles depend on, never the token count; and the
# forward's DoRA flags, whose launches tune over a table pruned by ``fits``.
AUTOTUNE_KEYS = {"linear_fwd": ["N", "K", "R", "COL_SCALE", "OUT0", "HAS_DROPOUT"], "linear_dx": ["N", "K", "R"],
                 "shrink_fwd": ["K", "R"], "shrink_bwd": ["K", "R"], "dy_bwd": ["N", "R"]}

CONFIGS = {"linear_fwd": LINEAR_CONFIGS, "linear_dx": DX_CONFIGS, "shrink_fwd": SHRINK_CONFIGS,
           "shrink_bwd": SHRINK_BWD_CONFIGS, "dy_bwd": DY_CONFIGS}
"""Every kernel's table, by op name."""


def block_r(r: int) -> int:
    """The padded rank a kernel tiles: tl.dot needs every dim >= 16 on a GPU; r is masked up to a power of two."""
    return max(16, triton.next_power_of_2(r))


def dy_rows(padded_r: int) -> int:
    """The dy pass's row block (dB's reduction block): ``DY_ROWS``, halved above a padded rank of 64,
    where 256 rows of fp32 du accumulators spill even on 8 warps (ptxas: 500 B at r = 128). A function
    of r alone, so the summation order is the same on every rank, run and config."""
    return DY_ROWS if padded_r <= 64 else DY_ROWS // 2


# TPLORA_AUTOTUNE=0 pins each list's first config, but at larger ranks: above a padded rank of
# 64 the first forward tile's (128x256) LoRA operands outgrow sm_90's shared memory (240 KiB at
# r = 128), so 128x128 on 8 warps; above 32, shrink_fwd's 32-row tile with 16-bit factors spills
# (ptxas 13.4: 4 B at r = 64), so 64 rows. {op: ((largest padded rank, config index), ...)}; the
# compile gate checks the pinned configs at r = 16, 64 and 128.
PINNED = {"linear_fwd": ((64, 0), (128, 2)), "shrink_fwd": ((32, 0), (128, 2))}


# DoRA's forward (COL_SCALE: g per output column; OUT0: the pre-scale tile stored too; dropout of
# x in the K loop) needs registers that the plain epilogue does not have to spare: at 128 fp32
# accumulators per thread every such config spills (ptxas 13.4, sm_90a, r = 16, bf16 and fp16,
# fp32 or 16-bit factors; spill stores with COL_SCALE+OUT0 at p = 0 / p = 0.1, at 255 registers):
# 128x256 on 8 warps 156-160 / 304-312 B, 128x128 on 4 warps 196-208 / 416-540 B, 64x256 on 4
# warps 148-160 / 296-308 B. With at most 64 accumulators per thread they compile clean (166-232
# registers), but for 128x64 on 4 warps with dropout (12-16 B): 8 Philox calls per thread and K
# step, where the clean ones make at most 4 (BLOCK_M <= 16 per warp). So such launches keep
# those configs only; the plain forward keeps its whole table.
_DORA_ACC = 64


def fits(op: str, config: triton.Config, *, dora: bool = False, dropout: bool = False) -> bool:
    """Whether a launch of ``op`` with DoRA's flags (``dora``: col_scale or out0) and dropout may use ``config``.

    Only the forward restricts its table (see the comment above); every other op and the plain
    forward accept every config.

    Example:
        >>> [fits("linear_fwd", c, dora=True) for c in LINEAR_CONFIGS[:3]]
        [False, False, True]
    """
    if op != "linear_fwd" or not (dora or dropout):
        return True
    m, n, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
    return m * n // (32 * warps) <= _DORA_ACC and (not dropout or m <= 16 * warps)


def pinned(op: str, padded_r: int, *, dora: bool = False, dropout: bool = False) -> int:
    """Index in ``op``'s table of the config ``TPLORA_AUTOTUNE=0`` launches at this padded rank.

    With DoRA's flags or dropout (``fits``): the first fitting config from the plain choice on.

    Example:
        >>> pinned("linear_fwd", 128), pinned("dy_bwd", 16), pinned("linear_fwd", 16, dora=True)
        (2, 0, 2)
    """
    steps = PINNED.get(op)
    first = 0 if steps is None else next((index for top, index in steps if padded_r <= top), steps[-1][1])
    table = CONFIGS[op]
    return next(i for i in range(first, len(table)) if fits(op, table[i], dora=dora, dropout=dropout))
