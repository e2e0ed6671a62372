"""Launch wrappers: check shapes and dtypes, allocate, launch (the order of Triton tutorial 03).

One function per op. Each validates its operands, allocates what the caller did not pass, and
hands them to a backend object (``ops.registry``, chosen by ``ops.select``), which runs the Triton
kernels or their torch twins. No collectives here: those live in the autograd layer, which hands these
wrappers views into its collective buffers.

T-row operands (one row per token) may be plain 2-D tensors ``[T, W]`` with any strides, or
row-chunked 3-D views ``[C, T/C, W]`` of a collective buffer (see ``kernels``).
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
                    backend: Backend | str | None = None) -> torch.Tensor:
    """``out = x Wᵀ + s·u Bᵀ (+ bias)``: the base GEMM with the LoRA up-projection as one more step.

    Args:
        x: ``[T, K]`` activations (any strides) or a row-chunked view.
        weight: ``[N, K]`` base weight shard, x's dtype.
        u: ``[T, r]`` from ``lora_shrink_fwd`` (any strides, or row-chunked; fp32 or x's dtype).
        lora_b: ``[N, r]`` LoRA B (fp32 or a 16-bit dtype).
        scale: the LoRA scale s (alpha/r, or alpha/sqrt(r) for rsLoRA).
        bias: optional ``[N]``, added in the epilogue.
        out: optional ``[T, N]`` destination (any strides, or row-chunked); default x's dtype.
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``[T, N]`` (``out`` when given).

    Example:
        >>> x, w, u, b = torch.randn(8, 32), torch.randn(16, 32), torch.randn(8, 4), torch.randn(16, 4)
        >>> lora_linear_fwd(x, w, u, b, scale=2.0).shape
        torch.Size([8, 16])
    """
    T, _, N, R = _check_gemm("x", x, weight, 1, "lora_b", lora_b, 0)
    _check_out("u", u, T, R)
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    device = _check_same_device(x=x, weight=weight, u=u, lora_b=lora_b, bias=bias, out=out)
    if out is None:
        out = _new_rows(T, N, x)
    _check_out("out", out, T, N)
    if T == 0 or N == 0:
        return out
    _backend(backend, device).linear_fwd(x, weight, u, lora_b, bias, out, float(scale), _rpc(T, x, u, out))
    return out


def lora_dy_bwd(dy: torch.Tensor, lora_b: torch.Tensor, u: torch.Tensor | None, *, scale: float,
                u_row0: int = 0, du_out: torch.Tensor | None = None, compute_du: bool = True,
                backend: Backend | str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``du = s·dy B`` and ``dB = s·dyᵀ u`` from one read of ``dy``.

    Args:
        dy: ``[T, N]`` output gradient (any strides, or row-chunked).
        lora_b: ``[N, r]``.
        u: ``[U, r]`` saved LoRA activation holding rows ``[u_row0, u_row0 + U)`` of dy's rows
            (all of them unless sequence-parallel row mode keeps only its own); None skips dB.
        scale: the LoRA scale s.
        u_row0: first dy row that ``u`` covers.
        du_out: optional ``[T, r]`` destination for du (row-chunked allowed); default dy's dtype.
        compute_du: False skips du (returns None for it).
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``(du [T, r] or None, dB [N, r] in fp32 or None)``.

    Example:
        >>> dy, b, u = torch.randn(8, 16), torch.randn(16, 4), torch.randn(8, 4)
        >>> du, db = lora_dy_bwd(dy, b, u, scale=0.5)
        >>> du.shape, db.shape
        (torch.Size([8, 4]), torch.Size([16, 4]))
    """
    _check_float("dy", dy)
    T, N = _rows_of("dy", dy), dy.shape[-1]
    _check_weight("lora_b", lora_b, (N, None))
    R = lora_b.shape[1]
    if u is not None:
        _check_weight("u", u, (None, R))
        if not 0 <= u_row0 <= u_row0 + u.shape[0] <= T:
            raise ValueError(f"u must cover rows [u_row0, u_row0+U) of {T}, got {tuple(u.shape)} at u_row0={u_row0}")
    device = _check_same_device(dy=dy, lora_b=lora_b, u=u, du_out=du_out)
    du = None
    if compute_du:
        du = du_out if du_out is not None else _new_rows(T, R, dy)
        _check_out("du_out", du, T, R)
    if u is None and du is None:
        return None, None
    want_db = u is not None
    if u is not None and u.shape[0] == 0:
        u = None  # no rows of dy meet u here: dB is zero
    db = None
    if T > 0 and R > 0 and (u is not None or du is not None):
        db = _backend(backend, device).dy_bwd(dy, lora_b, u, u_row0, du, float(scale), _rpc(T, dy, du))
    if want_db and db is None:
        db = torch.zeros(N, R, dtype=torch.float32, device=device)
    return du, db


def lora_linear_dx(dy: torch.Tensor, weight: torch.Tensor, du: torch.Tensor, lora_a: torch.Tensor, *,
                   drop: DropoutSpec = NO_DROPOUT, out: torch.Tensor | None = None,
                   backend: Backend | str | None = None) -> torch.Tensor:
    """``dx = dy W + (du A) ⊙ M / (1-p)``, with the dropout mask regenerated in-kernel.

    Args:
        dy: ``[T, N]`` output gradient (any strides, or row-chunked).
        weight: ``[N, K]`` base weight shard, dy's dtype.
        du: ``[T, r]`` (already scaled by s; any strides, or row-chunked).
        lora_a: ``[r, K]``.
        drop: the forward's dropout (same mask).
        out: optional ``[T, K]`` destination (any strides, or row-chunked); default dy's dtype.
        backend: a ``Backend``, a registered name, or None (``TPLORA_BACKEND``, else the automatic
            choice of ``ops.select``).

    Returns:
        ``dx``, ``[T, K]`` (``out`` when given).

    Example:
        >>> dy, w, du, a = torch.randn(8, 16), torch.randn(16, 32), torch.randn(8, 4), torch.randn(4, 32)
        >>> lora_linear_dx(dy, w, du, a).shape
        torch.Size([8, 32])
    """
    T, _, K, R = _check_gemm("dy", dy, weight, 0, "lora_a", lora_a, 1)
    _check_out("du", du, T, R)
    device = _check_same_device(dy=dy, weight=weight, du=du, lora_a=lora_a, out=out)
    _check_drop(drop, device)
    if out is None:
        out = _new_rows(T, K, dy)
    _check_out("out", out, T, K)
    if T == 0 or K == 0:
        return out
    _backend(backend, device).linear_dx(dy, weight, du, lora_a, out, drop, _rpc(T, dy, du, out))
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
