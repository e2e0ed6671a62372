"""Launch wrappers: check shapes and dtypes, allocate, launch (the order of Triton tutorial 03).

One function per op. Each validates its operands, allocates what the caller did not pass, and
hands them to a backend object (``ops.registry``, chosen by ``ops.select``), which runs the Triton
kernels or their torch twins. No collectives here: those live in the autograd layer, which hands these
wrappers views into its collective buffers.

T-row operands (one row per token) may be plain 2-D tensors ``[T, W]`` with any strides, or
row-chunked 3-D views ``[C, T/C, W]`` of a collective buffer (see ``kernels``).

DoRA (weight-decomposed LoRA, ``g = m / ||W + s·B·A||`` per output column, a constant in the
backward) adds keyword arguments to ``lora_linear_fwd`` (``col_scale``, ``out0``, ``drop``),
``lora_dy_bwd`` (``col_scale``, ``y0``, ``dm_out``) and ``lora_linear_dx`` (``col_scale``,
``mask_all``). Left at their defaults, each op computes what it did without them, bit for bit;
the backend receives only the ones given, so a backend written before them still runs plain calls.
"""

from __future__ import annotations

import torch

from ..mask import NO_DROPOUT, DropoutSpec
from .registry import Backend
from .select import get_backend

__all__ = ["lora_dy_bwd", "lora_linear_dx", "lora_linear_fwd", "lora_shrink_bwd", "lora_shrink_fwd"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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


def _check_rows(name: str, t: torch.Tensor, T: int, width: int, dtype: torch.dtype | None = None) -> None:
    if _rows_of(name, t) != T or t.shape[-1] != width:
        raise ValueError(f"{name} must hold {T} rows of width {width}, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_out(name: str, t: torch.Tensor, T: int, width: int) -> None:
    _check_float(name, t)
    _check_rows(name, t, T, width)


def _check_weight(name: str, t: torch.Tensor, shape: tuple[int | None, int | None]) -> None:
    _check_float(name, t)
    if t.dim() != 2 or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("·" if w is None else str(w) for w in shape)
        raise ValueError(f"{name} must be [{want}], got {tuple(t.shape)}")


def _check_gemm(row_name: str, rows: torch.Tensor, weight: torch.Tensor, shared: int, lora_name: str,
                lora: torch.Tensor, lora_dim: int) -> tuple[int, int, int, int]:
    """Checks of a base GEMM with its LoRA step: ``rows [T, W]`` meets ``weight`` along its dim
    ``shared``; the LoRA factor meets the weight's other dim along its dim ``lora_dim``.

    Returns ``(T, W, the weight's other size, r)``."""
    _check_float(row_name, rows)
    T, W = _rows_of(row_name, rows), rows.shape[-1]
    _check_weight("weight", weight, (W, None) if shared == 0 else (None, W))
    if weight.dtype != rows.dtype:
        raise TypeError(f"weight must have {row_name}'s dtype {rows.dtype}, got {weight.dtype}")
    other = weight.shape[1 - shared]
    _check_weight(lora_name, lora, (other, None) if lora_dim == 0 else (None, other))
    return T, W, other, lora.shape[1 - lora_dim]


def _check_same_device(**ts: torch.Tensor | None) -> torch.device:
    devs = {n: t.device for n, t in ts.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")
    return next(iter(devs.values()))


def _check_drop(drop: DropoutSpec, device: torch.device) -> None:
    if not isinstance(drop, DropoutSpec):
        raise TypeError(f"drop must be a mask.DropoutSpec, got {type(drop).__name__}")
    if drop.active and drop.seed.device != device:
        raise ValueError(f"the dropout seed must be on the operands' device {device}, got {drop.seed.device}")


def _check_col_scale(g: torch.Tensor | None, N: int) -> None:
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"col_scale must be a torch.Tensor, got {type(g).__name__}")
    if g.dtype != torch.float32:
        raise TypeError(f"col_scale must be float32 (one fp32 factor per output column), got {g.dtype}")
    if g.dim() != 1 or g.shape[0] != N:
        raise ValueError(f"col_scale must be [{N}] (one factor per output column), got shape {tuple(g.shape)}")


def _check_dm(y0: torch.Tensor | None, dm_out: torch.Tensor | None, u: torch.Tensor | None, u_row0: int, T: int,
              N: int) -> None:
    """``y0`` holds rows ``[u_row0, u_row0 + Y)`` of dy's rows (those of ``u`` when given); ``dm_out`` is fp32 [N]."""
    if (y0 is None) != (dm_out is None):
        given = "y0" if dm_out is None else "dm_out"
        raise ValueError(f"y0 and dm_out go together (dm_out receives Σ_t dy·y0), got {given} alone")
    if y0 is None:
        return
    _check_float("y0", y0)
    if y0.dim() != 2 or y0.shape[1] != N:
        raise ValueError(f"y0 must be [Y, {N}] (the saved pre-scale output, 2-D like u), got shape {tuple(y0.shape)}")
    if u is not None and y0.shape[0] != u.shape[0]:
        raise ValueError(f"y0 must hold u's rows of dy, [u_row0, u_row0+{u.shape[0]}), got {y0.shape[0]} rows")
    if not 0 <= u_row0 <= u_row0 + y0.shape[0] <= T:
        raise ValueError(f"y0 must cover rows [u_row0, u_row0+Y) of {T}, got {tuple(y0.shape)} at u_row0={u_row0}")
    if not isinstance(dm_out, torch.Tensor):
        raise TypeError(f"dm_out must be a torch.Tensor, got {type(dm_out).__name__}")
    if dm_out.dtype != torch.float32:
        raise TypeError(f"dm_out must be float32, got {dm_out.dtype}")
    if dm_out.shape != (N,):
        raise ValueError(f"dm_out must be [{N}], got shape {tuple(dm_out.shape)}")


def _given(**kw) -> dict:
    """The DoRA arguments that are set: a backend sees only those (plain calls stay plain)."""
    return {k: v for k, v in kw.items() if v is not None}


def _new_rows(T: int, width: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(T, width, dtype=dtype or like.dtype, device=like.device)


def _backend(backend: Backend | str | None, device: torch.device) -> Backend:
    return get_backend(device, backend)


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------
def lora_shrink_fwd(x: torch.Tensor, lora_a: torch.Tensor, *, drop: DropoutSpec = NO_DROPOUT,
                    out: torch.Tensor | None = None, x_out: torch.Tensor | None = None,
                    backend: Backend | str | None = None) -> torch.Tensor:
    """``u = drop(x) Aᵀ``: the LoRA down-projection with dropout generated in-kernel.

    Args:
        x: ``[T, K]`` activations (any strides) or a row-chunked ``[C, T/C, K]`` view.
        lora_a: ``[r, K]`` LoRA A (fp32 or a 16-bit dtype).
        drop: the dropout (seed on x's device, threshold, global row/column of ``x[0, 0]``).
        out: optional ``[T, r]`` (or row-chunked) destination; default x's dtype.
        x_out: optional ``[T, K]`` destination that also receives a copy of (undropped) x, written
            from the same single read (packs ``[x | u]`` for a collective), x's dtype.
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``u``, ``[T, r]`` (``out`` when given).

    Example:
        >>> x, a = torch.randn(8, 32), torch.randn(4, 32)
        >>> lora_shrink_fwd(x, a).shape
        torch.Size([8, 4])
    """
    _check_float("x", x)
    T, K = _rows_of("x", x), x.shape[-1]
    _check_weight("lora_a", lora_a, (None, K))
    R = lora_a.shape[0]
    device = _check_same_device(x=x, lora_a=lora_a, out=out, x_out=x_out)
    _check_drop(drop, device)
    if out is None:
        out = _new_rows(T, R, x)
    _check_out("out", out, T, R)
    if x_out is not None:
        _check_rows("x_out", x_out, T, K, x.dtype)
    if T == 0 or R == 0:
        return out
    _backend(backend, device).shrink_fwd(x, lora_a, out, drop, x_out, _rpc(T, x, out, x_out))
    return out


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, *,
                    scale: float, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    col_scale: torch.Tensor | None = None, out0: torch.Tensor | None = None,
                    drop: DropoutSpec = NO_DROPOUT, backend: Backend | str | None = None) -> torch.Tensor:
    """``out = x Wᵀ + s·u Bᵀ (+ bias)``: the base GEMM with the LoRA up-projection as one more step.

    With DoRA's arguments: ``acc = drop(x) Wᵀ + s·u Bᵀ`` in fp32 (only the base product sees the
    dropout and its 1/(1-p)); ``out0 <- acc``; ``out = col_scale ⊙ acc (+ bias)``.

    Args:
        x: ``[T, K]`` activations (any strides) or a row-chunked view.
        weight: ``[N, K]`` base weight shard, x's dtype.
        u: ``[T, r]`` from ``lora_shrink_fwd`` (any strides, or row-chunked; fp32 or x's dtype).
        lora_b: ``[N, r]`` LoRA B (fp32 or a 16-bit dtype).
        scale: the LoRA scale s (alpha/r, or alpha/sqrt(r) for rsLoRA).
        bias: optional ``[N]``, added in the epilogue (after ``col_scale``).
        out: optional ``[T, N]`` destination (any strides, or row-chunked); default x's dtype.
        col_scale: optional fp32 ``[N]``, DoRA's ``g``: multiplies each output column before the bias.
        out0: optional ``[T, N]`` destination (any strides, or row-chunked, its own dtype) for the
            pre-scale ``acc`` without bias (DoRA's ``y0`` for the magnitude's gradient).
        drop: dropout of x in the base product only, positioned at ``x[0, 0]``: the same mask as
            ``lora_shrink_fwd``'s with the same spec.
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``[T, N]`` (``out`` when given).

    Example:
        >>> x, w, u, b = torch.randn(8, 32), torch.randn(16, 32), torch.randn(8, 4), torch.randn(16, 4)
        >>> lora_linear_fwd(x, w, u, b, scale=2.0).shape
        torch.Size([8, 16])
        >>> g, y0 = torch.rand(16) + 0.5, torch.empty(8, 16)
        >>> y = lora_linear_fwd(x, w, u, b, scale=2.0, col_scale=g, out0=y0)
        >>> torch.allclose(y, g * y0)
        True
    """
    T, _, N, R = _check_gemm("x", x, weight, 1, "lora_b", lora_b, 0)
    _check_out("u", u, T, R)
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    _check_col_scale(col_scale, N)
    if out0 is not None:
        _check_out("out0", out0, T, N)
    device = _check_same_device(x=x, weight=weight, u=u, lora_b=lora_b, bias=bias, out=out, col_scale=col_scale,
                                out0=out0)
    _check_drop(drop, device)
    if out is None:
        out = _new_rows(T, N, x)
    _check_out("out", out, T, N)
    if T == 0 or N == 0:
        return out
    dora = _given(col_scale=col_scale, out0=out0, drop=drop if drop.active else None)
    _backend(backend, device).linear_fwd(x, weight, u, lora_b, bias, out, float(scale), _rpc(T, x, u, out, out0),
                                         **dora)
    return out


def lora_dy_bwd(dy: torch.Tensor, lora_b: torch.Tensor, u: torch.Tensor | None, *, scale: float,
                u_row0: int = 0, du_out: torch.Tensor | None = None, compute_du: bool = True,
                col_scale: torch.Tensor | None = None, y0: torch.Tensor | None = None,
                dm_out: torch.Tensor | None = None,
                backend: Backend | str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``du = s·dy B`` and ``dB = s·dyᵀ u`` from one read of ``dy``.

    With DoRA's arguments: ``g ⊙ dy`` replaces dy in both (``col_scale``), and ``dm_out[n] =
    Σ_t dy[t, n]·y0[t, n]`` over y0's rows (raw dy) comes from the same read.

    Args:
        dy: ``[T, N]`` output gradient (any strides, or row-chunked).
        lora_b: ``[N, r]``.
        u: ``[U, r]`` saved LoRA activation holding rows ``[u_row0, u_row0 + U)`` of dy's rows
            (all of them unless sequence-parallel row mode keeps only its own); None skips dB.
        scale: the LoRA scale s.
        u_row0: first dy row that ``u`` covers.
        du_out: optional ``[T, r]`` destination for du (row-chunked allowed); default dy's dtype.
        compute_du: False skips du (returns None for it).
        col_scale: optional fp32 ``[N]``, DoRA's ``g``: ``du = s·(g ⊙ dy) B``, ``dB = s·(g ⊙ dy)ᵀ u``.
        y0: optional ``[Y, N]`` saved pre-scale output (any strides, its own dtype) holding rows
            ``[u_row0, u_row0 + Y)`` of dy's rows, like ``u`` (the same rows when u is given).
        dm_out: fp32 ``[N]``, given with ``y0``: receives (is overwritten with) ``Σ_t dy ⊙ y0``
            over y0's rows, in a fixed summation order. Computed with or without u and du.
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``(du [T, r] or None, dB [N, r] in fp32 or None)``.

    Example:
        >>> dy, b, u = torch.randn(8, 16), torch.randn(16, 4), torch.randn(8, 4)
        >>> du, db = lora_dy_bwd(dy, b, u, scale=0.5)
        >>> du.shape, db.shape
        (torch.Size([8, 4]), torch.Size([16, 4]))
        >>> y0, dm = torch.randn(4, 16), torch.empty(16)
        >>> _ = lora_dy_bwd(dy, b, None, scale=0.5, compute_du=False, u_row0=2, y0=y0, dm_out=dm)
        >>> torch.allclose(dm, (dy[2:6] * y0).sum(0))
        True
    """
    _check_float("dy", dy)
    T, N = _rows_of("dy", dy), dy.shape[-1]
    _check_weight("lora_b", lora_b, (N, None))
    R = lora_b.shape[1]
    if u is not None:
        _check_weight("u", u, (None, R))
        if not 0 <= u_row0 <= u_row0 + u.shape[0] <= T:
            raise ValueError(f"u must cover rows [u_row0, u_row0+U) of {T}, got {tuple(u.shape)} at u_row0={u_row0}")
    _check_col_scale(col_scale, N)
    _check_dm(y0, dm_out, u, u_row0, T, N)
    device = _check_same_device(dy=dy, lora_b=lora_b, u=u, du_out=du_out, col_scale=col_scale, y0=y0,
                                dm_out=dm_out)
    du = None
    if compute_du:
        du = du_out if du_out is not None else _new_rows(T, R, dy)
        _check_out("du_out", du, T, R)
    if u is None and du is None and dm_out is None:
        return None, None
    want_db = u is not None
    if u is not None and u.shape[0] == 0:
        u = None  # no rows of dy meet u here: dB is zero
    if y0 is not None and y0.shape[0] == 0:
        dm_out.zero_()  # nor y0: dm is zero
        y0 = dm_out = None
    db = None
    lora = R > 0 and (u is not None or du is not None)
    if T > 0 and (lora or dm_out is not None):
        dora = _given(col_scale=col_scale, y0=y0, dm_out=dm_out)
        db = _backend(backend, device).dy_bwd(dy, lora_b, u if R > 0 else None, u_row0, du if R > 0 else None,
                                              float(scale), _rpc(T, dy, du), **dora)
    if want_db and db is None:
        db = torch.zeros(N, R, dtype=torch.float32, device=device)
    return du, db


def lora_linear_dx(dy: torch.Tensor, weight: torch.Tensor, du: torch.Tensor, lora_a: torch.Tensor, *,
                   drop: DropoutSpec = NO_DROPOUT, out: torch.Tensor | None = None,
                   col_scale: torch.Tensor | None = None, mask_all: bool = False,
                   backend: Backend | str | None = None) -> torch.Tensor:
    """``dx = dy W + (du A) ⊙ M / (1-p)``, with the dropout mask regenerated in-kernel.

    With DoRA's arguments: ``(g ⊙ dy) W`` replaces ``dy W`` (``col_scale``), and ``mask_all``
    gives ``dx = [(g ⊙ dy) W + du A] ⊙ M / (1-p)``, the whole sum masked.

    Args:
        dy: ``[T, N]`` output gradient (any strides, or row-chunked).
        weight: ``[N, K]`` base weight shard, dy's dtype.
        du: ``[T, r]`` (already scaled by s; any strides, or row-chunked).
        lora_a: ``[r, K]``.
        drop: the forward's dropout (same mask).
        out: optional ``[T, K]`` destination (any strides, or row-chunked); default dy's dtype.
        col_scale: optional fp32 ``[N]``, DoRA's ``g``, applied to dy for the base product only.
        mask_all: mask (and rescale) the whole sum, not only ``du A`` (no effect without dropout).
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``dx``, ``[T, K]`` (``out`` when given).

    Example:
        >>> dy, w, du, a = torch.randn(8, 16), torch.randn(16, 32), torch.randn(8, 4), torch.randn(4, 32)
        >>> lora_linear_dx(dy, w, du, a).shape
        torch.Size([8, 32])
        >>> g = torch.rand(16) + 0.5
        >>> torch.allclose(lora_linear_dx(dy, w, du, a, col_scale=g), (g * dy) @ w + du @ a, atol=1e-5)
        True
    """
    T, N, K, R = _check_gemm("dy", dy, weight, 0, "lora_a", lora_a, 1)
    _check_out("du", du, T, R)
    _check_col_scale(col_scale, N)
    if not isinstance(mask_all, bool):
        raise TypeError(f"mask_all must be a bool, got {type(mask_all).__name__}")
    device = _check_same_device(dy=dy, weight=weight, du=du, lora_a=lora_a, out=out, col_scale=col_scale)
    _check_drop(drop, device)
    if out is None:
        out = _new_rows(T, K, dy)
    _check_out("out", out, T, K)
    if T == 0 or K == 0:
        return out
    dora = _given(col_scale=col_scale, mask_all=True if mask_all and drop.active else None)
    _backend(backend, device).linear_dx(dy, weight, du, lora_a, out, drop, _rpc(T, dy, du, out), **dora)
    return out


def lora_shrink_bwd(du: torch.Tensor, x: torch.Tensor, *, drop: DropoutSpec = NO_DROPOUT, rank: int | None = None,
                    backend: Backend | str | None = None) -> torch.Tensor:
    """``dA = duᵀ drop(x)``, with the forward's mask regenerated from one read of x.

    Args:
        du: ``[T, r]`` (any strides, or row-chunked).
        x: ``[T, K]`` the saved layer input (any strides, or row-chunked).
        drop: the forward's dropout, positioned at ``x[0, 0]``.
        rank: the LoRA rank r that ``du`` must have (None: any width).
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``dA``, ``[r, K]`` in fp32 (the caller casts, or accumulates into ``main_grad``).

    Example:
        >>> du, x = torch.randn(8, 4), torch.randn(8, 32)
        >>> lora_shrink_bwd(du, x, rank=4).shape
        torch.Size([4, 32])
    """
    _check_float("du", du)
    _check_float("x", x)
    T, K = _rows_of("x", x), x.shape[-1]
    R = du.shape[-1] if rank is None else rank
    _check_rows("du", du, T, R)
    device = _check_same_device(du=du, x=x)
    _check_drop(drop, device)
    if T == 0 or R == 0 or K == 0:
        return torch.zeros(R, K, dtype=torch.float32, device=device)
    return _backend(backend, device).shrink_bwd(du, x, drop, _rpc(T, du, x))
