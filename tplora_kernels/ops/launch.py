"""Launch wrappers: check shapes and dtypes, allocate, launch (the order of Triton tutorial 03).

One function per kernel. Each runs the Triton kernel (``triton`` and ``interpret`` backends) or
its torch twin in ``torch_impl`` (``torch`` backend). No collectives here: those live in the
autograd layer, which hands these wrappers views into its collective buffers.

T-row operands (one row per token) may be plain 2-D tensors ``[T, W]`` with any strides, or
row-chunked 3-D views ``[C, T/C, W]`` of a collective buffer (see ``kernels``).
"""

from __future__ import annotations

import os

import torch
import triton

from ..mask import keep_mask, keep_scale
from . import kernels as _k
from . import torch_impl as _t

__all__ = ["lora_dy_bwd", "lora_linear_dx", "lora_linear_fwd", "lora_shrink_bwd", "lora_shrink_fwd", "shared_keep"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, *_LOW_PRECISION)

# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------
# Reduction blocks are fixed per dtype (bytes per tile row stay ~128 B); autotune only varies
# the other tiles, warps and stages, so every config gives the same bits (kernels docstring).
_RED = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
# dy-pass and shrink-grad reduce over rows in blocks of this many tokens.
_ROW_RED = 64
# Shrink-grad splits T across programs so that K/BLOCK_K programs do not idle most SMs; the split
# depends only on T, so the summation order is the same on every rank and every run.
_ROWS_PER_SPLIT = 1024
# Interpreter tiles: large, because the interpreter pays per program and per loop step, not per
# element; still small enough that the tests' odd sizes (63, 60, 15) exercise every mask.
_INTERP_BLOCK = 64

def _cfgs(tiles: list[dict], warps=(4, 8), stages=(3, 4)) -> list[triton.Config]:
    return [triton.Config(t, num_warps=w, num_stages=s) for t in tiles for w in warps for s in stages]


# Hopper habits: 128x128 tiles, grouped order, 3-4 stages. Keyed on model dims, never on T.
_LINEAR_CONFIGS = _cfgs([{"BLOCK_M": 128, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 256},
                         {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 64}])
_DX_CONFIGS = _cfgs([{"BLOCK_M": 128, "BLOCK_K": 128}, {"BLOCK_M": 128, "BLOCK_K": 256},
                     {"BLOCK_M": 64, "BLOCK_K": 128}, {"BLOCK_M": 128, "BLOCK_K": 64}])
# BLOCK_M=32 keeps >= 2 programs per SM at T=8192 for this memory-bound pass.
_SHRINK_CONFIGS = _cfgs([{"BLOCK_M": 32}, {"BLOCK_M": 64}, {"BLOCK_M": 128}], warps=(4,))
_SHRINK_BWD_CONFIGS = _cfgs([{"BLOCK_K": 64}, {"BLOCK_K": 128}], warps=(4,))
_DY_CONFIGS = _cfgs([{}], warps=(4, 8))

_tuned = {
    "linear_fwd": triton.autotune(_LINEAR_CONFIGS, key=["N", "K", "R"])(_k._lora_linear_fwd_kernel),
    "linear_dx": triton.autotune(_DX_CONFIGS, key=["N", "K", "R"])(_k._lora_linear_dx_kernel),
    "shrink_fwd": triton.autotune(_SHRINK_CONFIGS, key=["K", "R"])(_k._lora_shrink_fwd_kernel),
    "shrink_bwd": triton.autotune(_SHRINK_BWD_CONFIGS, key=["K", "R"])(_k._lora_shrink_bwd_kernel),
    "dy_bwd": triton.autotune(_DY_CONFIGS, key=["N", "R"])(_k._lora_dy_bwd_kernel),
}


def _autotune_enabled() -> bool:
    # TPLORA_AUTOTUNE=0 pins the first config of each list (no timing, no warm-up launches).
    return os.environ.get("TPLORA_AUTOTUNE", "1") != "0"


def _kernel(name: str, raw, backend: str, configs: list[triton.Config]):
    """(callable, meta) for a launch: the autotuner on CUDA, else the raw kernel and a fixed config."""
    if backend == "triton" and _autotune_enabled():
        return _tuned[name], {}
    if backend == "triton":
        c = configs[0]
        return raw, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    tiles = {k: _INTERP_BLOCK for k in configs[0].kwargs}
    return raw, tiles


def _precision(dtype: torch.dtype, backend: str) -> str:
    # fp32 follows torch's own fp32 matmul setting, so fp32 here is as accurate as torch's fp32
    # (IEEE unless the user allowed TF32). 16-bit dots ignore it; "tf32" is Triton's default.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _interp_bf16(dtype: torch.dtype, backend: str) -> bool:
    # Triton's interpreter mis-emulates bf16 dots and casts (kernels docstring): fix it there only.
    return backend == "interpret" and dtype == torch.bfloat16


def _block_r(r: int) -> int:
    # tl.dot needs every dim >= 16 on GPU; r is padded (masked) up to a power of two >= 16.
    return max(16, triton.next_power_of_2(r))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _rows_of(name: str, t: torch.Tensor) -> int:
    if t.dim() == 2:
        return t.shape[0]
    if t.dim() == 3:
        return t.shape[0] * t.shape[1]
    raise ValueError(f"{name} must be [T, W] or a row-chunked [C, T/C, W] view, got shape {tuple(t.shape)}")


def _rpc(T: int, *ts: torch.Tensor | None) -> int:
    """Rows per chunk shared by all row-chunked operands (T when none is chunked)."""
    rpcs = {t.shape[1] for t in ts if t is not None and t.dim() == 3}
    if len(rpcs) > 1:
        raise ValueError(f"row-chunked operands disagree on rows per chunk: {sorted(rpcs)}")
    return rpcs.pop() if rpcs else max(T, 1)


def _rs(t: torch.Tensor, rpc: int) -> tuple[int, int, int]:
    """(chunk, row, col) strides of a T-row operand for the kernels' row addressing."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return rpc * t.stride(0), t.stride(0), t.stride(1)


def _check_rows(name: str, t: torch.Tensor, T: int, width: int, dtype: torch.dtype | None = None) -> None:
    if _rows_of(name, t) != T or t.shape[-1] != width:
        raise ValueError(f"{name} must hold {T} rows of width {width}, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_same_device(**ts: torch.Tensor | None) -> torch.device:
    devs = {n: t.device for n, t in ts.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")
    return next(iter(devs.values()))


def _check_keep(keep: torch.Tensor | None, T: int, K: int) -> torch.Tensor | None:
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (T, K)):
        raise ValueError(f"keep must be a [{T}, {K}] bool mask, got {tuple(keep.shape)} {keep.dtype}")
    return keep


def _new_rows(T: int, width: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(T, width, dtype=dtype or like.dtype, device=like.device)


def _dropout_args(seed: torch.Tensor | None, thr: int, device: torch.device):
    if not 0 <= thr < 65536:
        raise ValueError(f"thr must be in [0, 65536), got {thr}")
    if thr and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device):
        raise ValueError(f"seed must be a one-element int64 tensor on {device} when dropout is on, got {seed!r}")
    dummy = seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=device)
    return dummy, keep_scale(thr)


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------
def lora_shrink_fwd(x: torch.Tensor, lora_a: torch.Tensor, *, seed: torch.Tensor | None = None, thr: int = 0,
                    row0: int = 0, col0: int = 0, out: torch.Tensor | None = None,
                    x_out: torch.Tensor | None = None, backend: str = "torch") -> torch.Tensor:
    """``u = drop(x) Aᵀ``: the LoRA down-projection with dropout generated in-kernel.

    Args:
        x: ``[T, K]`` activations (any strides) or a row-chunked ``[C, T/C, K]`` view.
        lora_a: ``[r, K]`` LoRA A (fp32 or x's dtype).
        seed: one-element int64 tensor on x's device; required when ``thr > 0``.
        thr: ``mask.dropout_threshold(p)``; 0 disables dropout (no mask work at all).
        row0, col0: global row and column of ``x[0, 0]``, so the mask is TP-invariant.
        out: optional ``[T, r]`` (or row-chunked) destination in x's dtype.
        x_out: optional ``[T, K]`` destination that also receives a copy of (undropped) x, written
            from the same single read (packs ``[x | u]`` for a collective).
        backend: ``"triton"``, ``"interpret"`` or ``"torch"``.

    Returns:
        ``u``, ``[T, r]`` in x's dtype (``out`` when given).

    Example:
        >>> x, a = torch.randn(8, 32), torch.randn(4, 32)
        >>> lora_shrink_fwd(x, a).shape
        torch.Size([8, 4])
    """
    _check_float("x", x)
    _check_float("lora_a", lora_a)
    T, K = _rows_of("x", x), x.shape[-1]
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(f"lora_a must be [r, {K}], got {tuple(lora_a.shape)}")
    R = lora_a.shape[0]
    device = _check_same_device(x=x, lora_a=lora_a, out=out)
    seed_t, inv_keep = _dropout_args(seed, thr, device)
    if out is None:
        out = _new_rows(T, R, x)
    _check_rows("out", out, T, R, x.dtype)
    if x_out is not None:
        _check_same_device(x=x, x_out=x_out)
        _check_rows("x_out", x_out, T, K, x.dtype)
    if T == 0 or R == 0:
        return out
    rpc = _rpc(T, x, out, x_out)
    if backend == "torch":
        if x_out is not None:
            x_out.copy_(x if x_out.dim() == 2 else x.reshape(x_out.shape))
        _t.shrink_fwd(x, lora_a, out, seed_t, thr, inv_keep, row0, col0, rpc)
        return out
    xo = x_out if x_out is not None else out  # an unused pointer when COPY_X is off
    fn, meta = _kernel("shrink_fwd", _k._lora_shrink_fwd_kernel, backend, _SHRINK_CONFIGS)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]),)  # noqa: E731
    fn[grid](x, lora_a, out, seed_t, xo, T, K, R, rpc, *_rs(x, rpc), *lora_a.stride(), *_rs(out, rpc),
             *_rs(xo, rpc), row0, col0, inv_keep, THR=thr, HAS_DROPOUT=thr > 0, PACKED=col0 % 8 == 0,
             COPY_X=x_out is not None,
             INTERP_BF16=_interp_bf16(x.dtype, backend),
             PRECISION=_precision(x.dtype, backend), BLOCK_K=_RED[x.dtype], BLOCK_R=_block_r(R), **meta)
    return out


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, *,
                    scale: float, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    backend: str = "torch") -> torch.Tensor:
    """``out = x Wᵀ + s·u Bᵀ (+ bias)``: the base GEMM with the LoRA up-projection as one more step.

    Args:
        x: ``[T, K]`` activations (any strides) or a row-chunked view.
        weight: ``[N, K]`` base weight shard, x's dtype.
        u: ``[T, r]`` from ``lora_shrink_fwd`` (any strides, or row-chunked).
        lora_b: ``[N, r]`` LoRA B (fp32 or x's dtype).
        scale: the LoRA scale s (alpha/r, or alpha/sqrt(r) for rsLoRA).
        bias: optional ``[N]``, added in the epilogue.
        out: optional ``[T, N]`` destination (any strides, or row-chunked), x's dtype.
        backend: ``"triton"``, ``"interpret"`` or ``"torch"``.

    Returns:
        ``[T, N]`` in x's dtype (``out`` when given).

    Example:
        >>> x, w, u, b = torch.randn(8, 32), torch.randn(16, 32), torch.randn(8, 4), torch.randn(16, 4)
        >>> lora_linear_fwd(x, w, u, b, scale=2.0).shape
        torch.Size([8, 16])
    """
    for n, t in (("x", x), ("weight", weight), ("u", u), ("lora_b", lora_b)):
        _check_float(n, t)
    T, K = _rows_of("x", x), x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [N, {K}] in {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    N = weight.shape[0]
    if lora_b.dim() != 2 or lora_b.shape[0] != N:
        raise ValueError(f"lora_b must be [{N}, r], got {tuple(lora_b.shape)}")
    R = lora_b.shape[1]
    _check_rows("u", u, T, R, x.dtype)
    if bias is not None and (bias.shape != (N,)):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    _check_same_device(x=x, weight=weight, u=u, lora_b=lora_b, bias=bias, out=out)
    if out is None:
        out = _new_rows(T, N, x)
    _check_rows("out", out, T, N, x.dtype)
    if T == 0 or N == 0:
        return out
    rpc = _rpc(T, x, u, out)
    if backend == "torch":
        _t.linear_fwd(x, weight, u, lora_b, bias, out, scale, rpc)
        return out
    fn, meta = _kernel("linear_fwd", _k._lora_linear_fwd_kernel, backend, _LINEAR_CONFIGS)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    fn[grid](x, weight, u, lora_b, bias if bias is not None else weight, out, T, N, K, R, rpc,
             *_rs(x, rpc), *weight.stride(), *_rs(u, rpc), *lora_b.stride(), *_rs(out, rpc),
             bias.stride(0) if bias is not None else 0, float(scale),
             HAS_BIAS=bias is not None, INTERP_BF16=_interp_bf16(x.dtype, backend),
             PRECISION=_precision(x.dtype, backend), BLOCK_K=_RED[x.dtype], BLOCK_R=_block_r(R), GROUP_M=8, **meta)
    return out


def lora_dy_bwd(dy: torch.Tensor, lora_b: torch.Tensor, u: torch.Tensor | None, *, scale: float,
                u_row0: int = 0, du_out: torch.Tensor | None = None, compute_du: bool = True,
                backend: str = "torch") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``du = s·dy B`` and ``dB = s·dyᵀ u`` from one read of ``dy``.

    Args:
        dy: ``[T, N]`` output gradient (any strides, or row-chunked).
        lora_b: ``[N, r]``.
        u: ``[U, r]`` saved LoRA activation holding rows ``[u_row0, u_row0 + U)`` of dy's rows
            (all of them unless sequence-parallel row mode keeps only its own); None skips dB.
        scale: the LoRA scale s.
        u_row0: first dy row that ``u`` covers.
        du_out: optional ``[T, r]`` destination for du (row-chunked allowed), dy's dtype.
        compute_du: False skips du (returns None for it).
        backend: ``"triton"``, ``"interpret"`` or ``"torch"``.

    Returns:
        ``(du [T, r] in dy's dtype or None, dB [N, r] in fp32 or None)``.

    Example:
        >>> dy, b, u = torch.randn(8, 16), torch.randn(16, 4), torch.randn(8, 4)
        >>> du, db = lora_dy_bwd(dy, b, u, scale=0.5)
        >>> du.shape, db.shape
        (torch.Size([8, 4]), torch.Size([16, 4]))
    """
    _check_float("dy", dy)
    _check_float("lora_b", lora_b)
    T, N = _rows_of("dy", dy), dy.shape[-1]
    if lora_b.dim() != 2 or lora_b.shape[0] != N:
        raise ValueError(f"lora_b must be [{N}, r], got {tuple(lora_b.shape)}")
    R = lora_b.shape[1]
    if u is not None:
        _check_float("u", u)
        if u.dim() != 2 or u.shape[1] != R or not 0 <= u_row0 <= u_row0 + u.shape[0] <= T:
            raise ValueError(f"u must be [U, {R}] covering rows [u_row0, u_row0+U) of {T}, "
                             f"got {tuple(u.shape)} at u_row0={u_row0}")
    _check_same_device(dy=dy, lora_b=lora_b, u=u, du_out=du_out)
    du = None
    if compute_du:
        du = du_out if du_out is not None else _new_rows(T, R, dy)
        _check_rows("du_out", du, T, R, dy.dtype)
    if u is None and du is None:
        return None, None
    if T == 0 or R == 0 or (u is not None and u.shape[0] == 0 and du is None):
        db = torch.zeros(N, R, dtype=torch.float32, device=dy.device) if u is not None else None
        return du, db
    rpc = _rpc(T, dy, du)
    if backend == "torch":
        db = _t.dy_bwd(dy, lora_b, u, du, scale, u_row0, rpc)
        return du, db
    compute_db = u is not None and u.shape[0] > 0
    # One fp32 partial of dB per row block that meets u's rows; summed below in a fixed order.
    n_part = (u_row0 + u.shape[0] - 1) // _ROW_RED - u_row0 // _ROW_RED + 1 if compute_db else 1
    part = torch.empty(n_part, N if compute_db else 1, R, dtype=torch.float32, device=dy.device)
    du_k = du if du is not None else dy  # unused pointer when COMPUTE_DU is off
    u_k = u if compute_db else lora_b  # unused pointer when COMPUTE_DB is off
    fn, meta = _kernel("dy_bwd", _k._lora_dy_bwd_kernel, backend, _DY_CONFIGS)
    fn[(triton.cdiv(T, _ROW_RED),)](
        dy, lora_b, u_k, du_k, part, T, N, R, rpc, u_row0, u.shape[0] if compute_db else 0,
        *_rs(dy, rpc), *lora_b.stride(), 0, *u_k.stride(), *_rs(du_k, rpc), *part.stride(), float(scale),
        COMPUTE_DU=du is not None, COMPUTE_DB=compute_db, INTERP_BF16=_interp_bf16(dy.dtype, backend),
        PRECISION=_precision(dy.dtype, backend), BLOCK_M=_ROW_RED, BLOCK_N=_RED[dy.dtype],
        BLOCK_R=_block_r(R), **meta)
    db = None
    if u is not None:
        db = part.sum(0).mul_(scale) if compute_db else torch.zeros(N, R, dtype=torch.float32, device=dy.device)
    return du, db


def lora_linear_dx(dy: torch.Tensor, weight: torch.Tensor, du: torch.Tensor, lora_a: torch.Tensor, *,
                   seed: torch.Tensor | None = None, thr: int = 0, row0: int = 0, col0: int = 0,
                   out: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                   backend: str = "torch") -> torch.Tensor:
    """``dx = dy W + (du A) ⊙ M / (1-p)``, with the dropout mask regenerated in the epilogue.

    Args:
        dy: ``[T, N]`` output gradient (any strides, or row-chunked).
        weight: ``[N, K]`` base weight shard, dy's dtype.
        du: ``[T, r]`` (already scaled by s; any strides, or row-chunked).
        lora_a: ``[r, K]``.
        seed, thr, row0, col0: the forward's dropout arguments (same mask).
        out: optional ``[T, K]`` destination (any strides, or row-chunked), dy's dtype.
        keep: optional ``mask.keep_mask(seed, row0, T, col0, K, thr)``, ``[T, K]`` bool, so the
            torch backend can share one mask between this call and ``lora_shrink_bwd``. The
            Triton backends ignore it: they regenerate the mask in registers.
        backend: ``"triton"``, ``"interpret"`` or ``"torch"``.

    Returns:
        ``dx``, ``[T, K]`` in dy's dtype (``out`` when given).

    Example:
        >>> dy, w, du, a = torch.randn(8, 16), torch.randn(16, 32), torch.randn(8, 4), torch.randn(4, 32)
        >>> lora_linear_dx(dy, w, du, a).shape
        torch.Size([8, 32])
    """
    for n, t in (("dy", dy), ("weight", weight), ("du", du), ("lora_a", lora_a)):
        _check_float(n, t)
    T, N = _rows_of("dy", dy), dy.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != N or weight.dtype != dy.dtype:
        raise ValueError(f"weight must be [{N}, K] in {dy.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    K = weight.shape[1]
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(f"lora_a must be [r, {K}], got {tuple(lora_a.shape)}")
    R = lora_a.shape[0]
    _check_rows("du", du, T, R)
    device = _check_same_device(dy=dy, weight=weight, du=du, lora_a=lora_a, out=out)
    seed_t, inv_keep = _dropout_args(seed, thr, device)
    if out is None:
        out = _new_rows(T, K, dy)
    _check_rows("out", out, T, K, dy.dtype)
    if T == 0 or K == 0:
        return out
    rpc = _rpc(T, dy, du, out)
    if backend == "torch":
        _t.linear_dx(dy, weight, du, lora_a, out, seed_t, thr, inv_keep, row0, col0, rpc, _check_keep(keep, T, K))
        return out
    fn, meta = _kernel("linear_dx", _k._lora_linear_dx_kernel, backend, _DX_CONFIGS)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"]),)  # noqa: E731
    fn[grid](dy, weight, du, lora_a, out, seed_t, T, N, K, R, rpc, *_rs(dy, rpc), *weight.stride(),
             *_rs(du, rpc), *lora_a.stride(), *_rs(out, rpc), row0, col0, inv_keep, THR=thr,
             HAS_DROPOUT=thr > 0, PACKED=col0 % 8 == 0, INTERP_BF16=_interp_bf16(dy.dtype, backend),
             PRECISION=_precision(dy.dtype, backend), BLOCK_N=_RED[dy.dtype], BLOCK_R=_block_r(R), GROUP_M=8, **meta)
    return out


def shared_keep(backend: str, seed: torch.Tensor | None, thr: int, row0: int, rows: int, col0: int, cols: int,
                device: torch.device) -> torch.Tensor | None:
    """A keep-mask to share between ``lora_linear_dx`` and ``lora_shrink_bwd``, where it pays.

    The torch backend would otherwise generate the same Philox mask twice in one backward; the
    Triton kernels regenerate it in registers at no memory cost, so for them this is None.

    Returns:
        ``[rows, cols]`` bool mask (torch backend, dropout on), else None.

    Example:
        >>> shared_keep("triton", None, 0, 0, 4, 0, 8, torch.device("cpu")) is None
        True
    """
    if backend != "torch" or thr == 0:
        return None
    return keep_mask(seed, row0, rows, col0, cols, thr, device=device)


def lora_shrink_bwd(du: torch.Tensor, x: torch.Tensor, *, seed: torch.Tensor | None = None, thr: int = 0,
                    row0: int = 0, col0: int = 0, keep: torch.Tensor | None = None,
                    backend: str = "torch") -> torch.Tensor:
    """``dA = duᵀ drop(x)``, with the forward's mask regenerated from one read of x.

    Args:
        du: ``[T, r]`` (any strides, or row-chunked).
        x: ``[T, K]`` the saved layer input (any strides, or row-chunked).
        seed, thr, row0, col0: the forward's dropout arguments.
        keep: optional precomputed ``[T, K]`` bool mask for these rows (see ``lora_linear_dx``).
        backend: ``"triton"``, ``"interpret"`` or ``"torch"``.

    Returns:
        ``dA``, ``[r, K]`` in fp32 (the caller casts, or accumulates into ``main_grad``).

    Example:
        >>> du, x = torch.randn(8, 4), torch.randn(8, 32)
        >>> lora_shrink_bwd(du, x).shape
        torch.Size([4, 32])
    """
    _check_float("du", du)
    _check_float("x", x)
    T, K = _rows_of("x", x), x.shape[-1]
    R = du.shape[-1]
    _check_rows("du", du, T, R)
    device = _check_same_device(du=du, x=x)
    seed_t, inv_keep = _dropout_args(seed, thr, device)
    if T == 0 or R == 0 or K == 0:
        return torch.zeros(R, K, dtype=torch.float32, device=device)
    rpc = _rpc(T, du, x)
    if backend == "torch":
        return _t.shrink_bwd(du, x, seed_t, thr, inv_keep, row0, col0, rpc, _check_keep(keep, T, K))
    splits = triton.cdiv(T, _ROWS_PER_SPLIT)
    part = torch.empty(splits, R, K, dtype=torch.float32, device=device)
    fn, meta = _kernel("shrink_bwd", _k._lora_shrink_bwd_kernel, backend, _SHRINK_BWD_CONFIGS)
    grid = lambda m: (triton.cdiv(K, m["BLOCK_K"]), splits)  # noqa: E731
    fn[grid](du, x, part, seed_t, T, K, R, rpc, _ROWS_PER_SPLIT, *_rs(du, rpc), *_rs(x, rpc), *part.stride(),
             row0, col0, inv_keep, THR=thr, HAS_DROPOUT=thr > 0, PACKED=col0 % 8 == 0,
             INTERP_BF16=_interp_bf16(x.dtype, backend),
             PRECISION=_precision(x.dtype, backend), BLOCK_M=_ROW_RED, BLOCK_R=_block_r(R), **meta)
    return part[0] if splits == 1 else part.sum(0)
