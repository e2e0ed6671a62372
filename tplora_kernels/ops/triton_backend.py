"""The ``triton`` and ``interpret`` backends: the kernels of ``ops.kernels``, launched.

The launch configurations (tables, pinned choices, reduction blocks) live in ``ops.configs``;
this module turns operands into kernel arguments and grids.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..mask import NO_DROPOUT
from . import configs as C
from .kernels import KERNELS, interpreter_active
from .registry import Backend, Support, register_backend

__all__ = ["InterpretBackend", "TritonBackend", "probe_interpreter"]

def _prune_fwd(configs, nargs, **kwargs):
    """The forward's configs that fit DoRA's flags and dropout in the registers (``configs.fits``)."""
    dora, dropout = kwargs["COL_SCALE"] or kwargs["OUT0"], kwargs["HAS_DROPOUT"]
    return [c for c in configs if C.fits("linear_fwd", c, dora=dora, dropout=dropout)]


_PRUNE = {"linear_fwd": {"early_config_prune": _prune_fwd}}
_TUNED = {op: triton.autotune(C.CONFIGS[op], key=C.AUTOTUNE_KEYS[op], prune_configs_by=_PRUNE.get(op))(kernel)
          for op, kernel in KERNELS.items()}


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


@triton.jit
def _interpreter_probe_kernel(p_out, n):
    """Sums 1 over a runtime-bounded loop: the one construct numpy >= 2.4 breaks in some interpreters."""
    acc = tl.zeros([1], dtype=tl.float32)
    for _ in range(0, n):
        acc += 1.0
    tl.store(p_out + tl.arange(0, 1), acc)


def probe_interpreter(kernel=None) -> Support:
    """Whether this triton's interpreter runs a loop with this numpy (the ``interpret`` backend probes once).

    triton 3.6 and 3.8's interpreter turn a loop bound into an int with ``int(array)``, which
    numpy >= 2.4 refuses for 1-element arrays (``only 0-dimensional arrays can be converted``);
    3.7.1 and 3.9 squeeze first. A version table would guess; the probe knows.

    Args:
        kernel: the probe to launch as ``kernel[(1,)](out, 3)`` (default: a loop summing 1 three times).

    Returns:
        ``Support``: falsy with the reason (and the fix) when the interpreter fails.
    """
    import numpy as np

    out = torch.zeros(1)
    try:
        (kernel or _interpreter_probe_kernel)[(1,)](out, 3)
    except TypeError as e:
        return Support(False, f"triton {triton.__version__}'s interpreter fails with numpy {np.__version__} ({e}); "
                              "install numpy<2.4, or triton 3.7.1 or >= 3.9")
    if out.item() != 3.0:
        return Support(False, f"triton {triton.__version__}'s interpreter computed a wrong loop sum ({out.item()})")
    return Support(True)


@functools.cache
def _interpreter_works() -> Support:
    return probe_interpreter()


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
    def _kernel(self, op: str, R: int, **variant):
        """(callable, meta) for a launch at rank ``R``: the autotuner, or the raw kernel with the pinned
        config (``variant``: the forward's ``dora`` and ``dropout``, see ``configs.fits``)."""
        if os.environ.get("TPLORA_AUTOTUNE", "1") != "0":
            return _TUNED[op], {}
        c = C.CONFIGS[op][C.pinned(op, C.block_r(R), **variant)]
        return KERNELS[op], {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}

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
                 **self._flags(x.dtype), BLOCK_K=C.RED[x.dtype], BLOCK_R=C.block_r(R), **meta)

    def linear_fwd(self, x, w, u, b, bias, out, scale, rpc, *, col_scale=None, out0=None, drop=None) -> None:
        T, N, K, R = out.numel() // out.shape[-1], w.shape[0], w.shape[1], b.shape[1]
        drop = NO_DROPOUT if drop is None else drop
        o0 = out0 if out0 is not None else out  # unused pointers when their flag is off
        fn, meta = self._kernel("linear_fwd", R, dora=col_scale is not None or out0 is not None, dropout=drop.active)
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        fn[grid](p_x=x, p_w=w, p_u=u, p_b=b, p_bias=bias if bias is not None else w, p_out=out,
                 p_g=col_scale if col_scale is not None else w, p_out0=o0,
                 T=T, N=N, K=K, R=R, RPC=rpc, **_row_strides("x", x, rpc, "k"), s_wn=w.stride(0), s_wk=w.stride(1),
                 **_row_strides("u", u, rpc, "r"), s_bn=b.stride(0), s_br=b.stride(1),
                 **_row_strides("o", out, rpc, "n"), **_row_strides("o0", o0, rpc, "n"),
                 s_bias=bias.stride(0) if bias is not None else 0,
                 s_g=col_scale.stride(0) if col_scale is not None else 0,
                 # The kernel seeds its accumulator with scale·u Bᵀ and multiplies it by 1/(1-p) with
                 # the dropped product after the K loop: s·(1-p) here makes that s·u Bᵀ again.
                 scale=scale / drop.keep_scale if drop.active else scale, **_dropout(drop, x.device),
                 HAS_BIAS=bias is not None, COL_SCALE=col_scale is not None, OUT0=out0 is not None,
                 **self._flags(x.dtype), BLOCK_K=C.RED[x.dtype], BLOCK_R=C.block_r(R), GROUP_M=C.GROUP_M, **meta)

    def dy_bwd(self, dy, b, u, u_row0, du, scale, rpc, *, col_scale=None, y0=None, dm_out=None):
        T, N, R = dy.numel() // dy.shape[-1], dy.shape[-1], b.shape[1]
        compute_db, compute_dm = u is not None, dm_out is not None
        # fp32 partials, summed below in a fixed order: dB's and dm's per row block that meets u's
        # (and y0's) rows, du's per column split.
        rows = C.dy_rows(C.block_r(R))
        n_rows = u.shape[0] if compute_db else y0.shape[0] if compute_dm else 0
        n_part = (u_row0 + n_rows - 1) // rows - u_row0 // rows + 1 if n_rows else 1
        db_part = torch.empty(n_part if compute_db else 1, N if compute_db else 1, R, dtype=torch.float32,
                              device=dy.device)
        dm_part = torch.empty(n_part if compute_dm else 1, N if compute_dm else 1, dtype=torch.float32,
                              device=dy.device)
        splits = triton.cdiv(N, C.DY_COLS)
        du_part = torch.empty(splits if du is not None else 1, T if du is not None else 1, R, dtype=torch.float32,
                              device=dy.device)
        u_k = u if compute_db else b  # unused pointers when their flag is off
        y0_k = y0 if compute_dm else dy
        fn, meta = self._kernel("dy_bwd", R)
        fn[(triton.cdiv(T, rows), splits)](
            p_dy=dy, p_b=b, p_u=u_k, p_dup=du_part, p_dbp=db_part, p_g=col_scale if col_scale is not None else b,
            p_y0=y0_k, p_dmp=dm_part, T=T, N=N, R=R, RPC=rpc, U_ROW0=u_row0, U_ROWS=n_rows, N_PER_SPLIT=C.DY_COLS,
            **_row_strides("dy", dy, rpc, "n"), s_bn=b.stride(0), s_br=b.stride(1), s_um=u_k.stride(0),
            s_ur=u_k.stride(1), s_dpt=du_part.stride(0), s_dpm=du_part.stride(1), s_dpr=du_part.stride(2),
            s_pt=db_part.stride(0), s_pn=db_part.stride(1), s_pr=db_part.stride(2),
            s_g=col_scale.stride(0) if col_scale is not None else 0, s_y0m=y0_k.stride(-2), s_y0n=y0_k.stride(-1),
            s_qt=dm_part.stride(0), s_qn=dm_part.stride(1), COMPUTE_DU=du is not None, COMPUTE_DB=compute_db,
            COL_SCALE=col_scale is not None, COMPUTE_DM=compute_dm, **self._flags(dy.dtype),
            BLOCK_M=rows, BLOCK_N=C.RED[dy.dtype], BLOCK_R=C.block_r(R), **meta)
        if du is not None:
            total = du_part[0] if splits == 1 else du_part.sum(0)
            du.copy_(total.mul_(scale).view(du.shape))
        if compute_dm:
            dm_out.copy_(dm_part[0] if n_part == 1 else dm_part.sum(0))
        if not compute_db:
            return None
        return (db_part[0] if n_part == 1 else db_part.sum(0)).mul_(scale)

    def linear_dx(self, dy, w, du, a, dx, drop, rpc, *, col_scale=None, mask_all=False) -> None:
        T, N, K, R = dx.numel() // dx.shape[-1], w.shape[0], w.shape[1], a.shape[0]
        fn, meta = self._kernel("linear_dx", R)
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"]),)  # noqa: E731
        fn[grid](p_dy=dy, p_w=w, p_du=du, p_a=a, p_dx=dx, p_g=col_scale if col_scale is not None else w,
                 T=T, N=N, K=K, R=R, RPC=rpc,
                 **_row_strides("dy", dy, rpc, "n"), s_wn=w.stride(0), s_wk=w.stride(1),
                 **_row_strides("du", du, rpc, "r"), s_ar=a.stride(0), s_ak=a.stride(1),
                 **_row_strides("dx", dx, rpc, "k"), s_g=col_scale.stride(0) if col_scale is not None else 0,
                 **_dropout(drop, dy.device), COL_SCALE=col_scale is not None, MASK_ALL=mask_all and drop.active,
                 **self._flags(dy.dtype), BLOCK_N=C.RED[dy.dtype], BLOCK_R=C.block_r(R), GROUP_M=C.GROUP_M, **meta)

    def shrink_bwd(self, du, x, drop, rpc):
        T, K, R = x.numel() // x.shape[-1], x.shape[-1], du.shape[-1]
        splits = triton.cdiv(T, C.ROWS_PER_SPLIT)
        part = torch.empty(splits, R, K, dtype=torch.float32, device=x.device)
        fn, meta = self._kernel("shrink_bwd", R)
        grid = lambda m: (triton.cdiv(K, m["BLOCK_K"]), splits)  # noqa: E731
        fn[grid](p_du=du, p_x=x, p_dap=part, T=T, K=K, R=R, RPC=rpc, ROWS_PER_SPLIT=C.ROWS_PER_SPLIT,
                 **_row_strides("du", du, rpc, "r"), **_row_strides("x", x, rpc, "k"), s_pt=part.stride(0),
                 s_pr=part.stride(1), s_pk=part.stride(2), **_dropout(drop, x.device), CHUNKED=rpc < T,
                 **self._flags(x.dtype), BLOCK_M=C.ROW_RED, BLOCK_R=C.block_r(R), **meta)
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

    def _kernel(self, op: str, R: int, **variant):
        return KERNELS[op], {k: C.INTERP_BLOCK for k in C.CONFIGS[op][0].kwargs}

    def _flags(self, dtype: torch.dtype) -> dict:
        # Triton's interpreter mis-emulates bf16 dots and casts (kernels docstring): fix it there only.
        return {**super()._flags(dtype), "INTERP_BF16": dtype == torch.bfloat16}
