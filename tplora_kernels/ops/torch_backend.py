"""The ``torch`` backend: the five kernels' math in torch ops, for CPU without the interpreter.

Same semantics as the Triton kernels (``ops.launch`` calls one or the other after validating),
including row-chunked outputs and the Philox mask of ``tplora_kernels.mask``. The LoRA terms
accumulate in fp32 like the kernels; the base GEMMs use torch's own matmul in the activation
dtype (fp16/bf16 accumulate in fp32 and round once, as the kernels do).

Generating the Philox mask in torch costs far more than the kernels' in-register version, and a
backward needs the same mask twice (``linear_dx`` and ``shrink_bwd``). So inside
``backward_scope()`` the backend keeps the masks it generated and serves any block of them again;
leaving the scope drops them, so nothing outlives one layer's backward.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ..mask import DropoutSpec
from .registry import Backend, Support, register_backend

__all__ = ["TorchBackend", "row_chunks"]


def row_chunks(t: torch.Tensor, rpc: int) -> list[torch.Tensor]:
    """2-D row blocks of a T-row operand: the chunks of a 3-D buffer view, or row slices of ``rpc`` rows."""
    if t.dim() == 3:
        return list(t.unbind(0))
    return [t[i:i + rpc] for i in range(0, t.shape[0], rpc)] or [t]


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # A multiply, not where(): NaN/Inf in dropped elements propagate as through nn.Dropout.
    return x * keep.to(x.dtype)


class _MaskCache(threading.local):
    """Masks generated inside one ``backward_scope``: (seed, thr, row0, col0, rows, cols) -> bool mask."""

    def __init__(self) -> None:
        self.depth = 0
        self.masks: list[tuple[DropoutSpec, int, int, torch.Tensor]] = []


@register_backend
class TorchBackend(Backend):
    """The kernels' math in torch ops (any device; the tests' and the CPU bench's fused path)."""

    name = "torch"

    def __init__(self) -> None:
        self._cache = _MaskCache()

    @classmethod
    def supports(cls, device: torch.device) -> Support:
        return Support(True)

    @contextlib.contextmanager
    def backward_scope(self):
        self._cache.depth += 1
        try:
            yield
        finally:
            self._cache.depth -= 1
            if not self._cache.depth:
                self._cache.masks.clear()

    def _keep(self, drop: DropoutSpec, rows: int, cols: int, device) -> torch.Tensor:
        """The keep-mask of the block at ``drop``'s origin: served from the scope's masks when they cover it."""
        if self._cache.depth:
            for spec, n_rows, n_cols, mask in self._cache.masks:
                if (spec.seed is drop.seed and spec.thr == drop.thr and spec.row0 <= drop.row0
                        and drop.row0 + rows <= spec.row0 + n_rows and spec.col0 <= drop.col0
                        and drop.col0 + cols <= spec.col0 + n_cols):
                    r, c = drop.row0 - spec.row0, drop.col0 - spec.col0
                    return mask[r:r + rows, c:c + cols]
        mask = drop.keep(rows, cols, device)
        if self._cache.depth:
            self._cache.masks.append((drop, rows, cols, mask))
        return mask

    def _full_keep(self, drop: DropoutSpec, x: torch.Tensor, rpc: int) -> torch.Tensor | None:
        """One mask for all of a T-row operand's rows (so a scope can reuse it), or None without dropout."""
        if not drop.active:
            return None
        return self._keep(drop, x.numel() // x.shape[-1], x.shape[-1], x.device)

    def shrink_fwd(self, x, a, u, drop, x_out, rpc) -> None:
        if x_out is not None:
            x_out.copy_(x if x_out.dim() == 2 else x.reshape(x_out.shape))
        keep = self._full_keep(drop, x, rpc)
        for i, (xc, uc) in enumerate(zip(row_chunks(x, rpc), row_chunks(u, rpc))):
            xd = _masked(xc, keep[i * rpc:i * rpc + xc.shape[0]]) if keep is not None else xc
            acc = torch.mm(xd.float(), a.float().t())
            if drop.active:
                acc.mul_(drop.keep_scale)
            uc.copy_(acc)

    def linear_fwd(self, x, w, u, b, bias, out, scale, rpc, *, col_scale=None, out0=None, drop=None) -> None:
        if col_scale is not None or out0 is not None or (drop is not None and drop.active):
            self._dora_fwd(x, w, u, b, bias, out, scale, rpc, col_scale, out0, drop)
            return
        low = x.dtype != torch.float32 or out.dtype != torch.float32
        wt = w.t().float() if low else w.t()
        bt = b.t().float()
        for xc, uc, oc in zip(row_chunks(x, rpc), row_chunks(u, rpc), row_chunks(out, rpc)):
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
            oc.addmm_(uc.float(), bt, alpha=scale)
            if bias is not None:
                oc.add_(bias)

    def _dora_fwd(self, x, w, u, b, bias, out, scale, rpc, col_scale, out0, drop) -> None:
        """``linear_fwd`` with DoRA's extras: all in fp32, rounded once into each output."""
        keep = self._full_keep(drop, x, rpc) if drop is not None else None
        wt, bt = w.t().float(), b.t().float()
        o0s = row_chunks(out0, rpc) if out0 is not None else None
        for i, (xc, uc, oc) in enumerate(zip(row_chunks(x, rpc), row_chunks(u, rpc), row_chunks(out, rpc))):
            if keep is not None:  # drop(x) Wᵀ rescaled, then the LoRA term as is
                acc = torch.mm(_masked(xc, keep[i * rpc:i * rpc + xc.shape[0]]).float(), wt).mul_(drop.keep_scale)
            else:
                acc = torch.mm(xc.float(), wt)
            acc.addmm_(uc.float(), bt, alpha=scale)
            if o0s is not None:
                o0s[i].copy_(acc)
            if col_scale is not None:
                acc.mul_(col_scale)
            if bias is not None:
                acc.add_(bias.float())
            oc.copy_(acc)

    def dy_bwd(self, dy, b, u, u_row0, du, scale, rpc, *, col_scale=None, y0=None, dm_out=None):
        dyc = row_chunks(dy, rpc)
        # g ⊙ dy in fp32 (the kernels fold g into B for du, rounded to dy's dtype, and scale dB's fp32 sums).
        gdy = (lambda t: t.float() * col_scale) if col_scale is not None else (lambda t: t.float())
        if du is not None:
            bf = b.float()
            for dc, duc in zip(dyc, row_chunks(du, rpc)):
                duc.copy_(torch.mm(gdy(dc), bf).mul_(scale))
        if u is None and dm_out is None:
            return None
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        if dm_out is not None:
            rows = dy2[u_row0:u_row0 + y0.shape[0]]
            torch.sum(rows.float() * y0.float(), dim=0, out=dm_out)
        if u is None:
            return None
        rows = dy2[u_row0:u_row0 + u.shape[0]]
        return torch.mm(gdy(rows).t(), u.float()).mul_(scale)

    def linear_dx(self, dy, w, du, a, dx, drop, rpc, *, col_scale=None, mask_all=False) -> None:
        if col_scale is not None or (mask_all and drop.active):
            self._dora_dx(dy, w, du, a, dx, drop, rpc, col_scale, mask_all and drop.active)
            return
        af = a.float()
        keep = self._full_keep(drop, dx, rpc)
        for i, (dc, duc, xc) in enumerate(zip(row_chunks(dy, rpc), row_chunks(du, rpc), row_chunks(dx, rpc))):
            # 1/(1-p) scales du (T×r), not the T×K product.
            lora = torch.mm(duc.float() * drop.keep_scale if drop.active else duc.float(), af)
            if keep is not None:
                lora.mul_(keep[i * rpc:i * rpc + lora.shape[0]])
            if xc.is_contiguous() and dc.dtype == torch.float32 and xc.dtype == torch.float32:
                torch.mm(dc, w, out=xc)
                xc.add_(lora)
            else:  # fp16/bf16: accumulate in fp32, round once
                xc.copy_(torch.mm(dc.float(), w.float()).add_(lora))

    def _dora_dx(self, dy, w, du, a, dx, drop, rpc, col_scale, mask_all) -> None:
        """``linear_dx`` with DoRA's extras: ``(g ⊙ dy) W + du A``, masked in part or whole, in fp32."""
        af, wf = a.float(), w.float()
        keep = self._full_keep(drop, dx, rpc)
        for i, (dc, duc, xc) in enumerate(zip(row_chunks(dy, rpc), row_chunks(du, rpc), row_chunks(dx, rpc))):
            lora = torch.mm(duc.float(), af)
            base = torch.mm(dc.float() * col_scale if col_scale is not None else dc.float(), wf)
            if keep is None:
                xc.copy_(base.add_(lora))
                continue
            scaled = keep[i * rpc:i * rpc + xc.shape[0]].float().mul_(drop.keep_scale)
            xc.copy_(base.add_(lora).mul_(scaled) if mask_all else base.add_(lora.mul_(scaled)))

    def shrink_bwd(self, du, x, drop, rpc):
        keep = self._full_keep(drop, x, rpc)
        acc = None
        for i, (duc, xc) in enumerate(zip(row_chunks(du, rpc), row_chunks(x, rpc))):
            xd = _masked(xc, keep[i * rpc:i * rpc + xc.shape[0]]) if keep is not None else xc
            part = torch.mm(duc.float().t(), xd.float())
            acc = part if acc is None else acc.add_(part)
        if drop.active:
            acc.mul_(drop.keep_scale)
        return acc
