"""The ``cublas`` backend: the frozen base GEMMs through torch (cuBLAS), the LoRA terms in Triton.

A Triton GEMM must come close to cuBLAS to win over "cuBLAS for the base GEMM plus the LoRA term
fed in as C with beta = 1"; this backend is that second path, so a measurement can choose
(``ops.select``). Per op:

* ``linear_fwd``: the LoRA kernel with an empty K loop writes ``s·u Bᵀ (+ bias)`` into ``out``,
  then ``out += x Wᵀ`` (``addmm_``, beta = 1) into the same, possibly row-chunked, buffer.
* ``linear_dx``: the dx kernel with an empty N loop writes ``(du A) ⊙ M / (1-p)`` into ``dx``,
  then ``dx += dy W``.
* ``shrink_fwd``, ``dy_bwd``, ``shrink_bwd``: the Triton kernels, unchanged (DoRA's ``col_scale``
  and ``dm`` included: they are fused into the dy pass).

DoRA's extras:

* ``linear_fwd`` with ``col_scale`` or ``out0``: the same two steps accumulate
  ``acc = x Wᵀ + s·u Bᵀ`` into ``out0`` (or into ``out`` and then copied to ``out0``, when
  ``out0``'s dtype is the narrower), then one elementwise pass writes ``out = g ⊙ acc + bias``
  (``addcmul`` in fp32, rounded once). With an active ``drop`` the whole op runs the fused Triton
  kernel instead, which masks x in registers: cuBLAS would need a dropped copy of x.
* ``linear_dx`` with ``col_scale``: ``g ⊙ dy`` is materialised in dy's dtype (one T x N pass,
  rounded once as the kernels round it) for ``dx += (g ⊙ dy) W``. With ``mask_all`` and an active
  ``drop`` the whole op runs the fused Triton kernel, which masks the sum in its epilogue.

No collective is added: the outputs land in the same buffers as the fused path's. On CPU the
Triton parts run under the interpreter and torch's CPU matmul stands in for cuBLAS, so the
algebra is tested where CI runs.
"""

from __future__ import annotations

import torch

from .kernels import interpreter_active
from .registry import Backend, Support, register_backend
from .torch_backend import row_chunks
from .triton_backend import InterpretBackend, TritonBackend

__all__ = ["CublasBackend"]


@register_backend
class CublasBackend(Backend):
    """torch GEMMs for the base weight, Triton kernels for everything LoRA."""

    name = "cublas"

    def __init__(self) -> None:
        self._compiled, self._interpreted = TritonBackend(), InterpretBackend()

    @classmethod
    def supports(cls, device: torch.device) -> Support:
        if device.type == "cuda" and not interpreter_active():
            return Support(True)
        if device.type == "cpu" and interpreter_active():
            return Support(True)
        return Support(False, "needs CUDA tensors (compiled kernels), or CPU tensors with TRITON_INTERPRET=1")

    def _triton(self, device: torch.device) -> TritonBackend:
        return self._interpreted if device.type == "cpu" else self._compiled

    def shrink_fwd(self, x, a, u, drop, x_out, rpc) -> None:
        self._triton(x.device).shrink_fwd(x, a, u, drop, x_out, rpc)

    def dy_bwd(self, dy, b, u, u_row0, du, scale, rpc, **dora):
        return self._triton(dy.device).dy_bwd(dy, b, u, u_row0, du, scale, rpc, **dora)

    def shrink_bwd(self, du, x, drop, rpc):
        return self._triton(x.device).shrink_bwd(du, x, drop, rpc)

    def linear_fwd(self, x, w, u, b, bias, out, scale, rpc, *, col_scale=None, out0=None, drop=None) -> None:
        triton_be = self._triton(x.device)
        if drop is not None and drop.active:
            triton_be.linear_fwd(x, w, u, b, bias, out, scale, rpc, col_scale=col_scale, out0=out0, drop=drop)
            return
        if col_scale is None and out0 is None:
            triton_be.linear_fwd(x[..., :0], w[:, :0], u, b, bias, out, scale, rpc)
            for xc, oc in zip(row_chunks(x, rpc), row_chunks(out, rpc)):
                _add_product(oc, xc, w.t())
            return
        # DoRA: acc (pre-scale, no bias) in the wider of out0 and out, then out = g ⊙ acc + bias.
        acc = out0 if out0 is not None and _bits(out0) >= _bits(out) else out
        triton_be.linear_fwd(x[..., :0], w[:, :0], u, b, None, acc, scale, rpc)
        accs, outs = row_chunks(acc, rpc), row_chunks(out, rpc)
        for xc, ac in zip(row_chunks(x, rpc), accs):
            _add_product(ac, xc, w.t())
        if out0 is not None and acc is out:
            for ac, o0c in zip(accs, row_chunks(out0, rpc)):
                o0c.copy_(ac)
        for ac, oc in zip(accs, outs):
            if col_scale is not None and bias is not None:
                torch.addcmul(bias, ac, col_scale, out=oc)
            elif col_scale is not None:
                torch.mul(ac, col_scale, out=oc)
            elif bias is not None:
                torch.add(ac, bias, out=oc)
            elif acc is not out:
                oc.copy_(ac)

    def linear_dx(self, dy, w, du, a, dx, drop, rpc, *, col_scale=None, mask_all=False) -> None:
        if mask_all and drop.active:
            self._triton(dy.device).linear_dx(dy, w, du, a, dx, drop, rpc, col_scale=col_scale, mask_all=True)
            return
        self._triton(dy.device).linear_dx(dy[..., :0], w[:0], du, a, dx, drop, rpc)
        for dc, xc in zip(row_chunks(dy, rpc), row_chunks(dx, rpc)):
            if col_scale is not None:
                dc = (dc.float() * col_scale).to(dc.dtype)
            _add_product(xc, dc, w)


def _bits(t: torch.Tensor) -> int:
    return torch.finfo(t.dtype).bits


def _add_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``c += a @ b`` with the product unrounded before the add, as the fused kernels accumulate.

    Same dtypes: one GEMM with beta = 1. An output wider than the operands (``output_dtype=fp32``
    with 16-bit activations): the product must not be rounded to the operands' dtype first, so it
    is taken in ``c``'s dtype (``out_dtype`` on CUDA where torch has it, else upcast operands,
    which 16-bit values reach exactly). A narrower output: the product in the operands' dtype,
    rounded once by the add.
    """
    if c.dtype == a.dtype:
        c.addmm_(a, b)
    elif torch.finfo(a.dtype).bits >= torch.finfo(c.dtype).bits:
        c.add_(torch.mm(a, b))
    else:
        if c.is_cuda:
            try:
                c.add_(torch.mm(a, b, out_dtype=c.dtype))
                return
            except (TypeError, RuntimeError, NotImplementedError):
                pass  # this torch has no mm with out_dtype: upcast below
        c.addmm_(a.to(c.dtype), b.to(c.dtype))
