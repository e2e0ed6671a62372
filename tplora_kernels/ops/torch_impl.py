"""The ``torch`` backend: the five kernels' math in torch ops, for CPU without the interpreter.

Same signatures and the same semantics as the Triton kernels (``ops.launch`` calls one or the
other after validating), including row-chunked outputs and the Philox mask of
``tplora_kernels.mask``. The LoRA terms accumulate in fp32 like the kernels; the base GEMMs use
torch's own matmul in the activation dtype. Nothing here is saved between calls.
"""

from __future__ import annotations

import torch

from ..mask import keep_mask

__all__ = ["dy_bwd", "linear_dx", "linear_fwd", "shrink_bwd", "shrink_fwd"]


def _chunks(t: torch.Tensor, rpc: int) -> list[torch.Tensor]:
    """2-D row blocks of a T-row operand: the chunks of a 3-D buffer view, or row slices."""
    if t.dim() == 3:
        return list(t.unbind(0))
    return [t[i:i + rpc] for i in range(0, t.shape[0], rpc)] or [t]


def _keep(keep, seed, thr: int, row0: int, col0: int, rows: slice, shape, device) -> torch.Tensor:
    """The keep-mask of one row chunk: a slice of a shared precomputed mask, or generated."""
    if keep is not None:
        return keep[rows]
    return keep_mask(seed, row0 + rows.start, shape[0], col0, shape[1], thr, device=device)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # A multiply, not where(): NaN/Inf in dropped elements propagate as through nn.Dropout.
    return x * keep.to(x.dtype)


def shrink_fwd(x, a, u, seed, thr, inv_keep, row0, col0, rpc):
    """``u = drop(x) Aᵀ`` into ``u`` (may be row-chunked)."""
    xs, us = _chunks(x, rpc), _chunks(u, rpc)
    for i, (xc, uc) in enumerate(zip(xs, us)):
        rows = slice(i * rpc, i * rpc + xc.shape[0])
        xd = _masked(xc, _keep(None, seed, thr, row0, col0, rows, xc.shape, xc.device)) if thr else xc
        acc = torch.mm(xd.float(), a.float().t())
        if thr:
            acc.mul_(inv_keep)
        uc.copy_(acc)


def linear_fwd(x, w, u, b, bias, out, scale, rpc):
    """``out = x Wᵀ + s·u Bᵀ (+ bias)`` into ``out`` (may be row-chunked).

    fp32 works in place on ``out``; fp16/bf16 accumulate in fp32 and round once, as the kernel does.
    """
    low = x.dtype != torch.float32
    wt = w.t().float() if low else w.t()
    bt = b.t().float() if low else b.t().to(x.dtype)
    for xc, uc, oc in zip(_chunks(x, rpc), _chunks(u, rpc), _chunks(out, rpc)):
        if low:
            acc = torch.mm(xc.float(), wt).addmm_(uc.float(), bt, alpha=scale)
            if bias is not None:
                acc.add_(bias.float())
            oc.copy_(acc)
            continue
        if oc.is_contiguous():
            torch.mm(xc, wt, out=oc)
        else:
            oc.copy_(torch.mm(xc, wt))
        oc.addmm_(uc.to(x.dtype), bt, alpha=scale)
        if bias is not None:
            oc.add_(bias)


def dy_bwd(dy, b, u, du, scale, u_row0, rpc):
    """``du = s·dy B`` into ``du`` (if given); returns fp32 ``dB = s·dy[rows of u]ᵀ u`` (if u given)."""
    dyc = _chunks(dy, rpc)
    if du is not None:
        bf = b.float()
        for dc, duc in zip(dyc, _chunks(du, rpc)):
            duc.copy_(torch.mm(dc.float(), bf).mul_(scale))
    if u is None:
        return None
    dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
    rows = dy2[u_row0:u_row0 + u.shape[0]]
    return torch.mm(rows.float().t(), u.float()).mul_(scale)


def linear_dx(dy, w, du, a, dx, seed, thr, inv_keep, row0, col0, rpc, keep=None):
    """``dx = dy W + (du A) ⊙ M / (1-p)`` into ``dx`` (may be row-chunked); ``keep``: shared mask."""
    af = a.float()
    for i, (dc, duc, xc) in enumerate(zip(_chunks(dy, rpc), _chunks(du, rpc), _chunks(dx, rpc))):
        # 1/(1-p) scales du (T×r), not the T×K product.
        lora = torch.mm(duc.float() * inv_keep if thr else duc.float(), af)
        if thr:
            rows = slice(i * rpc, i * rpc + lora.shape[0])
            lora.mul_(_keep(keep, seed, thr, row0, col0, rows, lora.shape, lora.device))
        if xc.is_contiguous() and dc.dtype == torch.float32:
            torch.mm(dc, w, out=xc)
            xc.add_(lora)
        else:  # fp16/bf16: accumulate in fp32, round once
            xc.copy_(torch.mm(dc.float(), w.float()).add_(lora))


def shrink_bwd(du, x, seed, thr, inv_keep, row0, col0, rpc, keep=None):
    """Returns fp32 ``dA = duᵀ drop(x)``; ``keep``: shared mask."""
    acc = None
    for i, (duc, xc) in enumerate(zip(_chunks(du, rpc), _chunks(x, rpc))):
        rows = slice(i * rpc, i * rpc + xc.shape[0])
        xd = _masked(xc, _keep(keep, seed, thr, row0, col0, rows, xc.shape, xc.device)) if thr else xc
        part = torch.mm(duc.float().t(), xd.float())
        acc = part if acc is None else acc.add_(part)
    if thr:
        acc.mul_(inv_keep)
    return acc
