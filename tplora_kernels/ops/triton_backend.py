"""The ``triton`` and ``interpret`` backends: the kernels of ``ops.kernels``, launched.

Launch configurations live here, as module-level lists: autotune varies only tiles that no
reduction depends on, warps and stages (see the kernels' docstring), and is keyed on the model
dimensions, never on the token count. ``TPLORA_AUTOTUNE=0`` pins the first config of each list
(no timing launches), which is therefore a good one. Under Triton's interpreter the tiles are
large and fixed (``_INTERP_BLOCK``), because the interpreter pays per program and per loop step.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..backends import Backend, Support, interpreter_active, register_backend
from . import kernels as _k

__all__ = ["InterpretBackend", "TritonBackend"]

# Reduction blocks are fixed per dtype (bytes per tile row stay ~128 B); autotune only varies
# the other tiles, warps and stages, so every config gives the same bits (kernels docstring).
_RED = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
# shrink-grad reduces over rows in blocks of this many tokens.
_ROW_RED = 64
# The dy pass reduces dB over rows in blocks of 256 tokens (one fp32 [N, r] partial each: at r <= 16
# that is at most a quarter of dy's own bytes in 16 bits) and du over N in splits of 512 columns,
# which also gives the grid (T/256) x (N/512) programs to fill the GPU.
_DY_ROWS = 256
# Row blocks that share a column sweep of the GEMMs' grouped launch order (L2 reuse of W).
_GROUP_M = 8
_DY_COLS = 512
# Shrink-grad splits T across programs so that K/BLOCK_K programs do not idle most SMs; the split
# depends only on T, so the summation order is the same on every rank and every run.
_ROWS_PER_SPLIT = 1024
# Interpreter tiles: large, because the interpreter pays per program and per loop step, not per
# element; still small enough that the tests' odd sizes (63, 60, 15) exercise every mask.
_INTERP_BLOCK = 64


def _cfgs(tiles: list[dict], warps=(4, 8), stages=(3, 4)) -> list[triton.Config]:
    return [triton.Config(t, num_warps=w, num_stages=s) for t in tiles for w in warps for s in stages]


def _tiles(names: tuple[str, str], rows: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s) for a, b, w, s in rows]


# The GEMM tables are each config that compiles clean for sm_90a in bf16 and fp16, with fp32 or
# 16-bit LoRA weights, under triton 3.6 and 3.9: no register spill, no wgmma serialisation
# (ptxas notes C751x), checked without a GPU by tests/test_compile_sm90.py. (BLOCK_M, BLOCK_N,
# warps, stages); the first is Hopper's 128x256x64 tile on 8 warps (two warpgroups, 128 fp32
# accumulators per thread), which TPLORA_AUTOTUNE=0 pins up to r = 64. 128x256 on 4 warps is
# absent: 256 accumulators per thread never fit.
_LINEAR_CONFIGS = _tiles(("BLOCK_M", "BLOCK_N"), [
    (128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4),
    (128, 128, 4, 3), (128, 128, 4, 4), (64, 256, 8, 3), (64, 256, 4, 3),
    (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3), (128, 64, 4, 4),
])
# (BLOCK_M, BLOCK_K, warps, stages). dx holds at most 64 fp32 accumulators per thread: with
# dropout, 128 per thread (128x256 on 8 warps, 128x128 on 4, 64x256 on 4) spills in the mask
# prologue, where the tile round-trips through a blocked layout to meet the mask; 128x64 takes
# 8 warps because on 4 the per-row thresholds (ROW_THR) tip it past 255 registers.
_DX_CONFIGS = _tiles(("BLOCK_M", "BLOCK_K"), [
    (128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3), (64, 256, 8, 4),
    (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
])
# BLOCK_M=32 keeps >= 2 programs per SM at T=8192 for this memory-bound pass.
_SHRINK_CONFIGS = _cfgs([{"BLOCK_M": 32}, {"BLOCK_M": 64}, {"BLOCK_M": 128}], warps=(4,))
_SHRINK_BWD_CONFIGS = _cfgs([{"BLOCK_K": 64}, {"BLOCK_K": 128}], warps=(4,))
# 8 warps first: the pinned config must not spill up to Σr = 64 (four r = 16 adapters in one
# batch), where 4 warps hold 256x64 fp32 du accumulators in 128 threads and spill (ptxas: 644 B).
_DY_CONFIGS = _cfgs([{}], warps=(8, 4))

_TUNED = {
    "linear_fwd": triton.autotune(_LINEAR_CONFIGS, key=["N", "K", "R"])(_k._lora_linear_fwd_kernel),
    "linear_dx": triton.autotune(_DX_CONFIGS, key=["N", "K", "R"])(_k._lora_linear_dx_kernel),
    "shrink_fwd": triton.autotune(_SHRINK_CONFIGS, key=["K", "R"])(_k._lora_shrink_fwd_kernel),
    "shrink_bwd": triton.autotune(_SHRINK_BWD_CONFIGS, key=["K", "R"])(_k._lora_shrink_bwd_kernel),
    "dy_bwd": triton.autotune(_DY_CONFIGS, key=["N", "R"])(_k._lora_dy_bwd_kernel),
}
_RAW = {"linear_fwd": (_k._lora_linear_fwd_kernel, _LINEAR_CONFIGS),
        "linear_dx": (_k._lora_linear_dx_kernel, _DX_CONFIGS),
        "shrink_fwd": (_k._lora_shrink_fwd_kernel, _SHRINK_CONFIGS),
        "shrink_bwd": (_k._lora_shrink_bwd_kernel, _SHRINK_BWD_CONFIGS),
        "dy_bwd": (_k._lora_dy_bwd_kernel, _DY_CONFIGS)}


def _block_r(r: int) -> int:
    # tl.dot needs every dim >= 16 on GPU; r is padded (masked) up to a power of two >= 16.
    return max(16, triton.next_power_of_2(r))


def _dy_rows(block_r: int) -> int:
    """The dy pass's row block (dB's reduction block): ``_DY_ROWS``, halved above a padded rank of
    64, where 256 rows of fp32 du accumulators spill even on 8 warps (ptxas: 500 B at r = 128). A
    function of r alone, so the summation order is the same on every rank, run and config."""
    return _DY_ROWS if block_r <= 64 else _DY_ROWS // 2


# TPLORA_AUTOTUNE=0 pins each list's first config, but at larger ranks: above a padded rank of
# 64 the first forward tile's (128x256) LoRA operands outgrow sm_90's shared memory (240 KiB at
# r = 128), so 128x128 on 8 warps; above 32, shrink_fwd's 32-row tile with 16-bit factors spills
# (ptxas 13.4: 4 B at r = 64), so 64 rows. {op: ((largest padded rank, config index), ...)};
# tests/test_compile_sm90.py checks the pinned configs at r = 16, 64 and 128.
_PINNED = {"linear_fwd": ((64, 0), (128, 2)), "shrink_fwd": ((32, 0), (128, 2))}


def _pinned(op: str, block_r: int) -> int:
    """Index in ``op``'s config list of the config ``TPLORA_AUTOTUNE=0`` launches at this padded rank."""
    steps = _PINNED.get(op)
    if steps is None:
        return 0
    return next((index for top, index in steps if block_r <= top), steps[-1][1])


def _rs(t: torch.Tensor, rpc: int) -> tuple[int, int, int]:
    """(chunk, row, col) strides of a T-row operand for the kernels' row addressing."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return rpc * t.stride(0), t.stride(0), t.stride(1)


def _row_strides(prefix: str, t: torch.Tensor, rpc: int, col: str) -> dict:
    sc, sm, sk = _rs(t, rpc)
    return {f"s_{prefix}c": sc, f"s_{prefix}m": sm, f"s_{prefix}{col}": sk}


def _dropout(drop, device: torch.device) -> dict:
    seed = drop.seed if drop.active else torch.zeros(1, dtype=torch.int64, device=device)
    row_thr = drop.row_thr is not None and drop.active
    return dict(p_seed=seed, p_rthr=drop.row_thr if row_thr else seed, row0=drop.row0, col0=drop.col0,
                inv_keep=drop.keep_scale, PERIOD=drop.row_thr.numel() if row_thr else 1, THR=drop.thr,
                HAS_DROPOUT=drop.active, PACKED=drop.col0 % 8 == 0, ROW_THR=row_thr)


@functools.cache
def _interpreter_works() -> Support:
    """Whether this triton's interpreter runs a loop with this numpy (probed once).

    triton 3.6 and 3.8's interpreter turn a loop bound into an int with ``int(array)``, which
    numpy >= 2.4 refuses for 1-element arrays (``only 0-dimensional arrays can be converted``);
    3.7.1 and 3.9 squeeze first. A version table would guess; the probe knows.
    """
    import numpy as np

    out = torch.zeros(1)
    try:
        _k._interpreter_probe_kernel[(1,)](out, 3)
    except TypeError as e:
        return Support(False, f"triton {triton.__version__}'s interpreter fails with numpy {np.__version__} ({e}); "
                              "install numpy<2.4, or triton 3.7.1 or >= 3.9")
    if out.item() != 3.0:
        return Support(False, f"triton {triton.__version__}'s interpreter computed a wrong loop sum ({out.item()})")
    return Support(True)


@register_backend
class TritonBackend(Backend):
    """The Triton kernels, compiled for CUDA (autotuned unless ``TPLORA_AUTOTUNE=0``)."""

    name = "triton"

    @classmethod
    def supports(cls, device: torch.device) -> Support:
        if device.type != "cuda":
            return Support(False, "needs CUDA tensors")
        if interpreter_active():
            return Support(False, "TRITON_INTERPRET=1 is set, so the kernels were defined for the interpreter")
        return Support(True)

    # -- per-backend launch details ----------------------------------------------------------
    def _kernel(self, op: str, R: int):
        """(callable, meta) for a launch at rank ``R``: the autotuner, or the raw kernel with the pinned config."""
        if os.environ.get("TPLORA_AUTOTUNE", "1") != "0":
            return _TUNED[op], {}
        raw, configs = _RAW[op]
        c = configs[_pinned(op, _block_r(R))]
        return raw, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}

    def _flags(self, dtype: torch.dtype) -> dict:
        # fp32 follows torch's own fp32 matmul setting, so fp32 here is as accurate as torch's fp32
        # (IEEE unless the user allowed TF32). 16-bit dots ignore it; "tf32" is Triton's default.
        ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
        return {"PRECISION": "ieee" if ieee else "tf32", "INTERP_BF16": False}

    # -- ops -----------------------------------------------------------------------------------
    def shrink_fwd(self, x, a, u, drop, x_out, rpc) -> None:
        T, K, R = u.numel() // u.shape[-1], x.shape[-1], a.shape[0]
        xo = x_out if x_out is not None else u  # an unused pointer when COPY_X is off
        fn, meta = self._kernel("shrink_fwd", R)
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]),)  # noqa: E731
        fn[grid](p_x=x, p_a=a, p_u=u, p_xo=xo, T=T, K=K, R=R, RPC=rpc, **_row_strides("x", x, rpc, "k"),
                 s_ar=a.stride(0), s_ak=a.stride(1), **_row_strides("u", u, rpc, "r"),
                 **_row_strides("xo", xo, rpc, "k"), **_dropout(drop, x.device), COPY_X=x_out is not None,
                 **self._flags(x.dtype), BLOCK_K=_RED[x.dtype], BLOCK_R=_block_r(R), **meta)

    def linear_fwd(self, x, w, u, b, bias, out, scale, rpc) -> None:
        T, N, K, R = out.numel() // out.shape[-1], w.shape[0], w.shape[1], b.shape[1]
        fn, meta = self._kernel("linear_fwd", R)
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        fn[grid](p_x=x, p_w=w, p_u=u, p_b=b, p_bias=bias if bias is not None else w, p_out=out,
                 T=T, N=N, K=K, R=R, RPC=rpc, **_row_strides("x", x, rpc, "k"), s_wn=w.stride(0), s_wk=w.stride(1),
                 **_row_strides("u", u, rpc, "r"), s_bn=b.stride(0), s_br=b.stride(1),
                 **_row_strides("o", out, rpc, "n"), s_bias=bias.stride(0) if bias is not None else 0,
                 scale=scale, HAS_BIAS=bias is not None, **self._flags(x.dtype), BLOCK_K=_RED[x.dtype],
                 BLOCK_R=_block_r(R), GROUP_M=_GROUP_M, **meta)

    def dy_bwd(self, dy, b, u, u_row0, du, scale, rpc):
        T, N, R = dy.numel() // dy.shape[-1], dy.shape[-1], b.shape[1]
        compute_db = u is not None
        # fp32 partials, summed below in a fixed order: dB's per row block that meets u's rows,
        # du's per column split.
        rows = _dy_rows(_block_r(R))
        n_part = (u_row0 + u.shape[0] - 1) // rows - u_row0 // rows + 1 if compute_db else 1
        db_part = torch.empty(n_part, N if compute_db else 1, R, dtype=torch.float32, device=dy.device)
        splits = triton.cdiv(N, _DY_COLS)
        du_part = torch.empty(splits if du is not None else 1, T if du is not None else 1, R, dtype=torch.float32,
                              device=dy.device)
        u_k = u if compute_db else b  # unused pointer when COMPUTE_DB is off
        fn, meta = self._kernel("dy_bwd", R)
        fn[(triton.cdiv(T, rows), splits)](
            p_dy=dy, p_b=b, p_u=u_k, p_dup=du_part, p_dbp=db_part, T=T, N=N, R=R, RPC=rpc, U_ROW0=u_row0,
            U_ROWS=u.shape[0] if compute_db else 0, N_PER_SPLIT=_DY_COLS, **_row_strides("dy", dy, rpc, "n"),
            s_bn=b.stride(0), s_br=b.stride(1), s_um=u_k.stride(0), s_ur=u_k.stride(1), s_dpt=du_part.stride(0),
            s_dpm=du_part.stride(1), s_dpr=du_part.stride(2), s_pt=db_part.stride(0), s_pn=db_part.stride(1),
            s_pr=db_part.stride(2), COMPUTE_DU=du is not None, COMPUTE_DB=compute_db, **self._flags(dy.dtype),
            BLOCK_M=rows, BLOCK_N=_RED[dy.dtype], BLOCK_R=_block_r(R), **meta)
        if du is not None:
            total = du_part[0] if splits == 1 else du_part.sum(0)
            du.copy_(total.mul_(scale).view(du.shape))
        if not compute_db:
            return None
        return (db_part[0] if n_part == 1 else db_part.sum(0)).mul_(scale)

    def linear_dx(self, dy, w, du, a, dx, drop, rpc) -> None:
        T, N, K, R = dx.numel() // dx.shape[-1], w.shape[0], w.shape[1], a.shape[0]
        fn, meta = self._kernel("linear_dx", R)
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"]),)  # noqa: E731
        fn[grid](p_dy=dy, p_w=w, p_du=du, p_a=a, p_dx=dx, T=T, N=N, K=K, R=R, RPC=rpc,
                 **_row_strides("dy", dy, rpc, "n"), s_wn=w.stride(0), s_wk=w.stride(1),
                 **_row_strides("du", du, rpc, "r"), s_ar=a.stride(0), s_ak=a.stride(1),
                 **_row_strides("dx", dx, rpc, "k"), **_dropout(drop, dy.device), **self._flags(dy.dtype),
                 BLOCK_N=_RED[dy.dtype], BLOCK_R=_block_r(R), GROUP_M=_GROUP_M, **meta)

    def shrink_bwd(self, du, x, drop, rpc):
        T, K, R = x.numel() // x.shape[-1], x.shape[-1], du.shape[-1]
        splits = triton.cdiv(T, _ROWS_PER_SPLIT)
        part = torch.empty(splits, R, K, dtype=torch.float32, device=x.device)
        fn, meta = self._kernel("shrink_bwd", R)
        grid = lambda m: (triton.cdiv(K, m["BLOCK_K"]), splits)  # noqa: E731
        fn[grid](p_du=du, p_x=x, p_dap=part, T=T, K=K, R=R, RPC=rpc, ROWS_PER_SPLIT=_ROWS_PER_SPLIT,
                 **_row_strides("du", du, rpc, "r"), **_row_strides("x", x, rpc, "k"), s_pt=part.stride(0),
                 s_pr=part.stride(1), s_pk=part.stride(2), **_dropout(drop, x.device), CHUNKED=rpc < T,
                 **self._flags(x.dtype), BLOCK_M=_ROW_RED, BLOCK_R=_block_r(R), **meta)
        return part[0] if splits == 1 else part.sum(0)


@register_backend
class InterpretBackend(TritonBackend):
    """The same kernels under Triton's interpreter, on CPU tensors (how CI runs them)."""

    name = "interpret"

    @classmethod
    def supports(cls, device: torch.device) -> Support:
        if not interpreter_active():
            return Support(False, "needs TRITON_INTERPRET=1 in the environment before triton is first imported")
        if device.type != "cpu":
            return Support(False, "runs on CPU tensors")
        return _interpreter_works()

    def _kernel(self, op: str, R: int):
        raw, configs = _RAW[op]
        return raw, {k: _INTERP_BLOCK for k in configs[0].kwargs}

    def _flags(self, dtype: torch.dtype) -> dict:
        # Triton's interpreter mis-emulates bf16 dots and casts (kernels docstring): fix it there only.
        return {**super()._flags(dtype), "INTERP_BF16": dtype == torch.bfloat16}
