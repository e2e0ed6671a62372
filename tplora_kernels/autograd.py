"""Autograd Functions: the per-mode algebra of DESIGN §2, with the collectives made explicit.

LoRA adds no collective to any mode. It rides on the base layer's own:

=================  ==========================================  =====================================
mode               forward                                     backward
=================  ==========================================  =====================================
column, SP off     none (+ all-gather cols if gather_output)   all-reduce ``[dX | du]``
column, SP on      all-gather rows of ``[x | u]`` (+ gather)     reduce-scatter rows of ``[dX | du]``
row, SP off        all-reduce ``[z | u]``                      none (+ all-gather cols of dx if
                                                               not input_is_parallel)
row, SP on         reduce-scatter rows of ``[z | u]``          all-gather rows of dy (+ as above)
=================  ==========================================  =====================================

The ``[a | b]`` buffers are ``distributed.RowChunkedBuffer``s: the kernels write both operands
into the one buffer the base collective reduces or gathers, r columns wider than the base's own.
Under column SP each rank computes u for its own rows only (one read of x_i, which the same
kernel copies into the gather buffer), so no rank repeats another's shrink or mask work. Saved
for backward: the layer input (local under SP), u (T×r) and the seed; no mask, no dropped or
fp32 copy of x. One exception, documented: a column layer whose input needs no gradient has no
base dgrad collective to ride on, so du (T×r) gets an all-reduce of its own.

Weight gradients arrive in fp32 from the kernels. If the parameter has ``main_grad`` (Megatron
DDP) they are added there, ``grad_added_to_main_grad`` is set, and autograd gets a zero
placeholder so DDP's hooks still fire, as Megatron's own linear layers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import distributed as D
from .ops import launch as L

__all__ = ["Plan", "_ColumnParallelLoRAFn", "_RowParallelLoRAFn"]


@dataclass(frozen=True)
class Plan:
    """Everything about one call that is not a tensor.

    Attributes:
        group: the base layer's tensor-parallel process group (None: default group / TP=1).
        world: TP size t.
        rank: this rank in ``group``.
        scale: LoRA scale s.
        thr: dropout threshold (``mask.dropout_threshold(p)``); 0 = no dropout.
        sequence_parallel: SP on (already False when world == 1).
        gather_output: column only: all-gather the output columns.
        input_is_parallel: row only: x is already split along K.
        backend: resolved backend name.
    """

    group: dist.ProcessGroup | None
    world: int
    rank: int
    scale: float
    thr: int
    sequence_parallel: bool
    gather_output: bool = False
    input_is_parallel: bool = True
    backend: str = "torch"


def _deliver(param: torch.Tensor, g32: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient to hand autograd for LoRA factor ``param``, honouring Megatron's main_grad."""
    if g32 is None:
        return None
    main = getattr(param, "main_grad", None)
    if main is None:
        return g32.to(param.dtype)
    main.add_(g32)
    if hasattr(param, "grad_added_to_main_grad"):
        param.grad_added_to_main_grad = True
    return torch.zeros_like(param)


class _ColumnParallelLoRAFn(torch.autograd.Function):
    """Column-parallel base: W_i [N/t, K], A [r, K] replicated, B_i [N/t, r]. x: [T or T/t, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seed, plan: Plan):
        if plan.sequence_parallel:
            # [x_i | u_i] rides in the base's all-gather: u's rows are computed once, by their owner.
            T_i, K, R = x.shape[0], x.shape[1], lora_a.shape[0]
            packed = torch.empty(T_i, K + R, dtype=x.dtype, device=x.device)  # row j = [x_j | u_j]
            L.lora_shrink_fwd(x, lora_a, seed=seed, thr=plan.thr, row0=plan.rank * T_i, out=packed[:, K:],
                              x_out=packed[:, :K], backend=plan.backend)
            X, u = D.all_gather_rows(packed, plan.group).split([K, R], dim=1)
            u_saved = u.clone()  # compact: saving the view would pin the gathered x
        else:
            X = x
            u = u_saved = L.lora_shrink_fwd(X, lora_a, seed=seed, thr=plan.thr, backend=plan.backend)
        y = L.lora_linear_fwd(X, weight, u, lora_b, scale=plan.scale, bias=bias, backend=plan.backend)
        if plan.gather_output:
            y = D.all_gather_cols(y, plan.group)
        ctx.plan = plan
        ctx.save_for_backward(x, weight, lora_a, lora_b, u_saved, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        plan: Plan = ctx.plan
        x, weight, lora_a, lora_b, u, seed = ctx.saved_tensors
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if plan.gather_output and plan.world > 1:
            n = weight.shape[0]
            dy = dy[:, plan.rank * n:(plan.rank + 1) * n]
        T, K, R = dy.shape[0], weight.shape[1], lora_a.shape[0]
        dx = da = db = None
        if need_dx or need_da:
            chunks = plan.world if plan.sequence_parallel else 1
            widths = ([K] if need_dx else []) + ([R] if need_da else [])
            buf = D.RowChunkedBuffer(T, widths, chunks, dy.dtype, dy.device)
            du_view = buf.views[-1] if need_da else None
            du, db = L.lora_dy_bwd(dy, lora_b, u if need_db else None, scale=plan.scale, du_out=du_view,
                                   backend=plan.backend)
            keep = L.shared_keep(plan.backend, seed, plan.thr, 0, T, 0, K, dy.device) if need_dx and need_da \
                else None
            if need_dx:
                # dX_i and du_i are partial sums over ranks, and dX_i is linear in du_i, so the
                # base's one dgrad collective (r columns wider) finishes both.
                L.lora_linear_dx(dy, weight, du, lora_a, seed=seed, thr=plan.thr, out=buf.views[0], keep=keep,
                                 backend=plan.backend)
            if plan.sequence_parallel:
                parts = buf.split(D.reduce_scatter_rows(buf.flat, plan.group))
            else:
                parts = buf.split(D.all_reduce_(buf.flat, plan.group))
            if need_dx:
                dx = parts[0]
            if need_da:
                row0 = plan.rank * x.shape[0] if plan.sequence_parallel else 0
                keep_i = keep[row0:row0 + x.shape[0]] if keep is not None else None
                da = L.lora_shrink_bwd(parts[-1], x, seed=seed, thr=plan.thr, row0=row0, keep=keep_i,
                                       backend=plan.backend)
        elif need_db:
            _, db = L.lora_dy_bwd(dy, lora_b, u, scale=plan.scale, compute_du=False, backend=plan.backend)
        return dx, None, None, _deliver(lora_a, da), _deliver(lora_b, db), None, None


class _RowParallelLoRAFn(torch.autograd.Function):
    """Row-parallel base: W_i [N, K/t], A_i [r, K/t], B [N, r] replicated. x: [T, K/t] or [T, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seed, plan: Plan):
        k = weight.shape[1]
        x_i = x if plan.input_is_parallel else x[:, plan.rank * k:(plan.rank + 1) * k]
        T, N, R = x_i.shape[0], weight.shape[0], lora_a.shape[0]
        chunks = plan.world if plan.sequence_parallel else 1
        buf = D.RowChunkedBuffer(T, (N, R), chunks, x.dtype, x.device)
        col0 = plan.rank * k
        # u_i is a partial sum over ranks (global column offset for the mask); z_i = x_i W_iᵀ +
        # s·u_i Bᵀ is too. One collective over [z | u] yields y and u.
        L.lora_shrink_fwd(x_i, lora_a, seed=seed, thr=plan.thr, col0=col0, out=buf.views[1], backend=plan.backend)
        L.lora_linear_fwd(x_i, weight, buf.views[1], lora_b, scale=plan.scale, out=buf.views[0],
                          backend=plan.backend)
        if plan.sequence_parallel:
            y, u = buf.split(D.reduce_scatter_rows(buf.flat, plan.group))
        else:
            y, u = buf.split(D.all_reduce_(buf.flat, plan.group))
        if bias is not None:
            y.add_(bias)
        ctx.plan = plan
        # u is cloned so that saving it does not pin the whole [z | u] buffer (the output).
        ctx.save_for_backward(x_i, weight, lora_a, lora_b, u.clone(), seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        plan: Plan = ctx.plan
        x_i, weight, lora_a, lora_b, u, seed = ctx.saved_tensors
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dY = D.all_gather_rows(dy, plan.group) if plan.sequence_parallel else dy
        col0 = plan.rank * weight.shape[1]
        u_row0 = plan.rank * dy.shape[0] if plan.sequence_parallel else 0
        du, db = L.lora_dy_bwd(dY, lora_b, u if need_db else None, scale=plan.scale, u_row0=u_row0,
                               compute_du=need_dx or need_da, backend=plan.backend)
        dx = da = None
        keep = L.shared_keep(plan.backend, seed, plan.thr, 0, x_i.shape[0], col0, x_i.shape[1], dy.device) \
            if need_dx and need_da else None
        if need_dx:
            dx = L.lora_linear_dx(dY, weight, du, lora_a, seed=seed, thr=plan.thr, col0=col0, keep=keep,
                                  backend=plan.backend)
            if not plan.input_is_parallel:
                dx = D.all_gather_cols(dx, plan.group)
        if need_da:
            da = L.lora_shrink_bwd(du, x_i, seed=seed, thr=plan.thr, col0=col0, keep=keep, backend=plan.backend)
        return dx, None, None, _deliver(lora_a, da), _deliver(lora_b, db), None, None
