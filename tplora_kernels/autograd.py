"""Autograd Functions: the per-mode algebra, with the collectives made explicit.

Notation per rank: t = TP size, i = rank, T rows (tokens), K in, N out, r the LoRA rank; ``W_i``
the base weight shard, ``A`` ``[r, K]`` and ``B`` ``[N, r]`` the full factors, ``M`` the dropout
keep-mask, ``drop(x) = x ⊙ M / (1-p)``, s the LoRA scale.

Column-parallel base (``W_i`` is ``[N/t, K]``; A replicated, ``B_i`` rows of B):
  forward   ``u = drop(X) Aᵀ``; ``y_i = X W_iᵀ + s·u B_iᵀ``. SP: X = all-gather of the x_i rows, and
            u's rows are computed by their owner and gathered with them (``[x_i | u_i]``).
  backward  ``du_i = s·dy_i B_i`` and ``dX_i = dy_i W_i + (du_i A) ⊙ M/(1-p)`` are partial sums
            and ``dX_i`` is linear in ``du_i``, so the base's one dgrad collective, r columns wider,
            finishes both (all-reduce, or reduce-scatter under SP). ``dB_i = s·dy_iᵀ u`` is exact
            locally; ``dA = duᵀ drop(X)`` too, except under SP where each rank uses its own rows
            (a partial sum that ``finalize_model_grads`` completes: A is marked
            ``sequence_parallel``).
Row-parallel base (``W_i`` is ``[N, K/t]``; ``A_i`` columns of A, B replicated):
  forward   ``u_i = drop(x_i) A_iᵀ`` (mask at the global column offset) and
            ``z_i = x_i W_iᵀ + s·u_i Bᵀ`` are partial sums: one collective over ``[z_i | u_i]``
            (all-reduce, or reduce-scatter under SP) yields y and u. Bias after the reduction.
  backward  SP: dY = all-gather of the dy rows (the base needs it anyway). ``du = s·dY B``,
            ``dx_i = dY W_i + (du A_i) ⊙ M_i/(1-p)`` and ``dA_i = duᵀ drop(x_i)`` are local;
            ``dB = s·dYᵀ u`` too, except under SP (own rows: B is marked ``sequence_parallel``).

=================  ==========================================  =====================================
mode               forward                                     backward
=================  ==========================================  =====================================
column, SP off     none (+ all-gather cols if gather_output)   all-reduce ``[dX | du]``
column, SP on      all-gather rows of ``[x | u]`` (+ gather)   reduce-scatter rows of ``[dX | du]``
row, SP off        all-reduce ``[z | u]``                      none (+ all-gather cols of dx if
                                                               not input_is_parallel)
row, SP on         reduce-scatter rows of ``[z | u]``          all-gather rows of dy (+ as above)
=================  ==========================================  =====================================

LoRA adds no collective to any mode. The ``[a | b]`` buffers are ``distributed.RowChunkedBuffer``s:
the kernels write both operands straight into the one buffer the base collective reduces or
gathers. Saved for backward: the layer input (local under SP), u (T×r) and the seed; no mask, no
dropped or fp32 copy of x. Where a frozen base has no collective for LoRA to ride on (a layer
whose input needs no gradient, an MoE expert under expert TP), LoRA runs its own on T×r; the
README's "Modes and collectives" lists every such case, in one place.

DoRA (``magnitude`` given; ``tplora_kernels.dora``) scales each output column by
``g = m/‖W + s·B A‖``: in the GEMM's epilogue for a column layer (its norm is local), after the
reduction for a row layer, whose partial norms ride in the same ``[z | u]`` collective (N more
values per block). Backward applies g on dy's load and forms ``dm = Σ_t dy ⊙ y0 / ‖·‖`` from the
saved pre-scale output y0 (one output-sized tensor). With dropout it is PEFT's form, which needs
the GEMM twice (once on x, once on the dropped x), in both directions.

u is kept in x's dtype, except with fp16 activations and fp32 factors, where it is kept in fp32
(fp16's range is too small for it, and PEFT computes it in fp32); it then computes the output in
fp32 and travels in fp16 only inside a row-parallel ``[z | u]`` reduction (used for dB only).
Column SP then gathers x alone and computes u from the gathered rows.

Autocast does not change what these Functions compute: they run with autocast off, in x's dtype
with fp32 accumulation, on every backend alike. Weight gradients arrive in fp32. If the parameter
has ``main_grad`` (Megatron DDP) they are added there, ``grad_added_to_main_grad`` is set, and
autograd gets a zero placeholder so DDP's hooks still fire, as Megatron's own linear layers do.
The Functions are once-differentiable: a backward run with ``create_graph=True`` (double
backward, gradient penalties) raises instead of returning a gradient that silently lacks the
terms through the layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import distributed as D
from .mask import DropoutSpec
from .mode import TPMode
from .multi import AdapterMix
from .ops import launch as L
from .ops.registry import Backend
from .ops.torch_backend import row_chunks

__all__ = ["ColumnParallelLoRAFn", "Plan", "RowParallelLoRAFn", "lora_act_dtype"]


def lora_act_dtype(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> torch.dtype:
    """The dtype u is kept in: x's, except fp32 for fp16 activations with fp32 factors (range)."""
    return torch.float32 if x_dtype == torch.float16 and lora_dtype == torch.float32 else x_dtype


@dataclass(frozen=True)
class Plan:
    """Everything about one call that is not a tensor.

    Attributes:
        mode: the layer's tensor-parallel mode (``mode.TPMode``: kind, group, SP, gather/split,
            explicit communication, output dtype).
        scale: LoRA scale s.
        thr: dropout threshold (``mask.dropout_threshold(p)``); 0 = no dropout.
        backend: the backend object that runs the ops.
        mix: several adapters in one batch (``multi.AdapterMix``): the factors are stacked, u and
            du are gated per row, and each row's dropout uses its adapter's threshold (``scale``
            is then 1 and ``thr`` the largest threshold).
    """

    mode: TPMode
    scale: float
    thr: int
    backend: Backend
    mix: AdapterMix | None = None

    def dropout(self, seed: torch.Tensor | None) -> DropoutSpec:
        """The call's dropout, positioned at the full input's element (0, 0)."""
        if self.mix is None or not self.thr:
            return DropoutSpec(seed, self.thr)
        return DropoutSpec(seed, self.thr, row_thr=self.mix.row_thr(seed.device))

    def gate(self, t: torch.Tensor, row0: int) -> None:
        """Gate u or du per row for a mixed batch (see ``multi``); nothing for one adapter."""
        if self.mix is not None:
            self.mix.apply_gate(t, row0)


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


def _unpack(ctx) -> tuple[Plan, Backend, tuple, tuple[bool, bool, bool]]:
    """A backward's plan, backend, saved tensors and whether dx, dA and dB are needed."""
    need = ctx.needs_input_grad
    return ctx.plan, ctx.plan.backend, ctx.saved_tensors, (need[0], need[3], need[4])


def _fresh(view: torch.Tensor) -> torch.Tensor:
    """A tensor on ``view``'s memory that autograd does not know as a view.

    The outputs live in a collective buffer next to u. A view of that buffer returned from a
    custom Function could not be modified in place (``y.add_(1)``, in-place dropout), while the
    base layer's own output can; this alias can, at no copy.
    """
    return view.new_empty(0).set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def _first_order(backward):
    """Refuse a backward that builds a graph (``create_graph=True``); otherwise run it without grad.

    The kernels compute gradients without recording how they depend on x, the factors or dy, so a
    second derivative through this layer would miss those terms silently. ``once_differentiable``
    refuses only when dy itself requires grad, which misses ``grad(y.sum(), x, create_graph=True)``
    followed by a penalty on that gradient. Autograd runs a backward with grad enabled exactly
    when ``create_graph=True``, so that is what is refused.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("tplora_kernels' LoRA layers are once-differentiable: this backward runs with "
                               "create_graph=True (double backward, a gradient penalty), and the gradient it builds "
                               "would lack every term through the LoRA layer. Run it without create_graph, or use "
                               "tplora_kernels.reference's unfused layer for higher-order gradients")
        return backward(ctx, *grads)

    return wrapper


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# -- DoRA (see tplora_kernels.dora): y = g ⊙ (x Wᵀ + s·u Bᵀ) + b, g = m / ‖W + s·B A‖ ------------
def _dora_scale(magnitude: torch.Tensor, norm_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/‖·‖, g = m/‖·‖)`` in fp32, the norm a constant (detached). A zero row norm gives inf, as in PEFT."""
    inv = norm_sq.detach().float().clamp_min(0).rsqrt()
    return inv, _gain(magnitude, inv)


def _gain(magnitude: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``g = m · (1/‖·‖)`` in fp32: the one expression forward and backward use, so both get the same bits."""
    return magnitude.detach().float() * inv


def _saved_dora(ctx, saved: tuple) -> tuple:
    """``(magnitude, y0, g, 1/‖·‖, need_dm)`` from what a DoRA forward saved after LoRA's six tensors.

    g is recomputed as forward computed it (``_gain``), bit for bit, so one [N] vector fewer is
    saved. All None (need_dm False) without DoRA.
    """
    if len(saved) <= 6:
        return None, None, None, None, False
    magnitude, y0, inv = saved[6:]
    return magnitude, y0, _gain(magnitude, inv), inv, ctx.needs_input_grad[6]


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` on a 2-D or row-chunked ``out`` (DoRA's unmasked ``dy W`` under dropout)."""
    rpc = out.shape[1] if out.dim() == 3 else max(out.shape[0], 1)
    for oc, ac in zip(row_chunks(out, rpc), row_chunks(a, rpc)):
        oc.add_(ac @ b)


def _dora_dx(dy, weight, du, lora_a, drop, out, g, be) -> torch.Tensor:
    """dx of a DoRA layer into ``out``: ``(g⊙dy) W + (du A) ⊙ M'``; with dropout ``dy W + M' ⊙ [((g−1)⊙dy) W + du A]``.

    ``M' = M / (1-p)``; without DoRA (``g`` None) the LoRA dx.
    """
    if g is None:
        return L.lora_linear_dx(dy, weight, du, lora_a, drop=drop, out=out, backend=be)
    if not drop.active:
        return L.lora_linear_dx(dy, weight, du, lora_a, drop=drop, out=out, col_scale=g, backend=be)
    # PEFT's DoRA with dropout: the base GEMM sees x, the scaled part x ⊙ M'. Two GEMMs over N.
    out = L.lora_linear_dx(dy, weight, du, lora_a, drop=drop, out=out, col_scale=g - 1, mask_all=True, backend=be)
    _add_product(out, dy, weight)
    return out


class ColumnParallelLoRAFn(torch.autograd.Function):
    """Column-parallel base: W_i [N/t, K], A [r, K] replicated, B_i [N/t, r]. x: [T or T/t, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seed, magnitude, norm, plan: Plan):
        be, drop = plan.backend, plan.dropout(seed)
        u_dtype = lora_act_dtype(x.dtype, lora_a.dtype)
        with _no_autocast(x.device):
            if plan.mode.sequence_parallel and u_dtype == x.dtype:
                # [x_i | u_i] rides in the base's all-gather: u's rows are computed once, by their owner.
                T_i, K, R = x.shape[0], x.shape[1], lora_a.shape[0]
                packed = torch.empty(T_i, K + R, dtype=x.dtype, device=x.device)  # row j = [x_j | u_j]
                L.lora_shrink_fwd(x, lora_a, drop=drop.shifted(rows=plan.mode.rank * T_i), out=packed[:, K:],
                                  x_out=packed[:, :K], backend=be)
                plan.gate(packed[:, K:], plan.mode.rank * T_i)
                X, u = D.all_gather_rows(packed, plan.mode.group).split([K, R], dim=1)
                u_saved = u.clone()  # compact: saving the view would pin the gathered x
            else:
                X = D.all_gather_rows(x, plan.mode.group) if plan.mode.sequence_parallel else x
                u = torch.empty(X.shape[0], lora_a.shape[0], dtype=u_dtype, device=x.device)
                u = u_saved = L.lora_shrink_fwd(X, lora_a, drop=drop, out=u, backend=be)
                plan.gate(u, 0)
            y = torch.empty(X.shape[0], weight.shape[0], dtype=plan.mode.output_dtype or x.dtype, device=x.device)
            dora: tuple = ()
            if magnitude is None:
                L.lora_linear_fwd(X, weight, u, lora_b, scale=plan.scale, bias=bias, out=y, backend=be)
            else:
                # DoRA: the column norm is local (whole rows); g scales the GEMM's output columns in
                # its epilogue, and the pre-scale output y0 is saved for dm.
                inv, g = _dora_scale(magnitude, norm.weight_sq + norm.lora_sq)
                y0 = torch.empty_like(y)
                if not drop.active:
                    L.lora_linear_fwd(X, weight, u, lora_b, scale=plan.scale, bias=bias, out=y, col_scale=g,
                                      out0=y0, backend=be)
                else:  # PEFT's form: [x Wᵀ + s·u Bᵀ] + (g-1) ⊙ [drop(x) Wᵀ + s·u Bᵀ] + b, y0 the dropped one
                    L.lora_linear_fwd(X, weight, u, lora_b, scale=plan.scale, bias=bias, out=y, backend=be)
                    y.add_(L.lora_linear_fwd(X, weight, u, lora_b, scale=plan.scale, col_scale=g - 1, out0=y0,
                                             drop=drop, backend=be))
                dora = (magnitude, y0, inv)  # g = m·inv again in backward: one [N] vector fewer saved
            if plan.mode.gather_output:
                y = D.all_gather_cols(y, plan.mode.group)
        ctx.plan = plan
        ctx.save_for_backward(x, weight, lora_a, lora_b, u_saved, seed, *dora)
        return y

    @staticmethod
    @_first_order
    def backward(ctx, dy):
        plan, be, saved, (need_dx, need_da, need_db) = _unpack(ctx)
        x, weight, lora_a, lora_b, u, seed = saved[:6]
        magnitude, y0, g, inv, need_dm = _saved_dora(ctx, saved)
        drop = plan.dropout(seed)
        if plan.mode.gather_output:
            n = weight.shape[0]
            dy = dy[:, plan.mode.rank * n:(plan.mode.rank + 1) * n]
        dy = dy.to(x.dtype)
        T, K, R = dy.shape[0], weight.shape[1], lora_a.shape[0]
        dx = da = db = None
        dm = torch.empty(weight.shape[0], dtype=torch.float32, device=dy.device) if need_dm else None
        dora = dict(col_scale=g, y0=y0 if need_dm else None, dm_out=dm) if magnitude is not None else {}
        with _no_autocast(dy.device), be.backward_scope():
            if need_dx or need_da:
                chunks = plan.mode.world if plan.mode.sequence_parallel else 1
                widths = ([K] if need_dx else []) + ([R] if need_da else [])
                buf = D.RowChunkedBuffer(T, widths, chunks, dy.dtype, dy.device)
                du_view = buf.views[-1] if need_da else None
                du, db = L.lora_dy_bwd(dy, lora_b, u if need_db else None, scale=plan.scale, du_out=du_view,
                                       backend=be, **dora)
                plan.gate(du, 0)
                if need_dx:
                    # dX_i and du_i are partial sums over ranks, and dX_i is linear in du_i, so the
                    # base's one dgrad collective (r columns wider) finishes both.
                    _dora_dx(dy, weight, du, lora_a, drop, buf.views[0], g, be)
                if plan.mode.sequence_parallel:
                    parts = buf.split(D.reduce_scatter_rows(buf.flat, plan.mode.group))
                else:
                    # An expert's dX stays partial (the dispatcher reduces it): reduce du alone.
                    if not plan.mode.explicit_comm:
                        D.all_reduce_(buf.flat, plan.mode.group)
                    elif need_da:
                        D.all_reduce_(buf.views[-1], plan.mode.group)
                    parts = buf.split(buf.flat)
                if need_dx:
                    dx = parts[0]
                if need_da:
                    row0 = plan.mode.rank * x.shape[0] if plan.mode.sequence_parallel else 0
                    da = L.lora_shrink_bwd(parts[-1], x, drop=drop.shifted(rows=row0), rank=R, backend=be)
            elif need_db or need_dm:
                _, db = L.lora_dy_bwd(dy, lora_b, u if need_db else None, scale=plan.scale, compute_du=False,
                                      backend=be, **dora)
        if dm is not None:
            dm.mul_(inv)  # y = m/‖·‖ ⊙ y0 with the norm a constant: dm = Σ_t dy ⊙ y0 / ‖·‖
        return (dx, None, None, _deliver(lora_a, da), _deliver(lora_b, db), None,
                _deliver(magnitude, dm) if magnitude is not None else None, None, None)


class RowParallelLoRAFn(torch.autograd.Function):
    """Row-parallel base: W_i [N, K/t], A_i [r, K/t], B [N, r] replicated. x: [T, K/t] or [T, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seed, magnitude, norm, plan: Plan):
        be = plan.backend
        k = weight.shape[1]
        # A slice of the full x is copied, as the base layer's own scatter does: saving the view
        # would keep all of x alive until backward.
        x_i = x if plan.mode.input_is_parallel else x[:, plan.mode.rank * k:(plan.mode.rank + 1) * k].contiguous()
        T, N, R = x_i.shape[0], weight.shape[0], lora_a.shape[0]
        # u_i is a partial sum over ranks (the mask at the global column offset); z_i = x_i W_iᵀ +
        # s·u_i Bᵀ is too. One collective over [z | u] yields y and u. DoRA adds, in the same
        # collective, the partial LoRA part of the row norms (N values per block: the weight part
        # is already summed, see tplora_kernels.dora) and, with dropout, the dropped product.
        drop = plan.dropout(seed).shifted(cols=plan.mode.rank * k)
        dora_drop = magnitude is not None and drop.active
        chunks = plan.mode.world if plan.mode.sequence_parallel else 1
        widths = (N, N, R) if dora_drop else (N, R)
        buf = D.RowChunkedBuffer(T, widths, chunks, plan.mode.output_dtype or x.dtype, x.device,
                                 extra=N if magnitude is not None else 0)
        with _no_autocast(x.device):
            if buf.flat.dtype in (lora_act_dtype(x.dtype, lora_a.dtype), torch.float32):
                u_i = L.lora_shrink_fwd(x_i, lora_a, drop=drop, out=buf.views[-1], backend=be)
                plan.gate(u_i, 0)
            else:  # kept wider than the buffer: compute z from it, and carry a copy for the reduction
                u_i = L.lora_shrink_fwd(x_i, lora_a, drop=drop,
                                        out=torch.empty(T, R, dtype=torch.float32, device=x.device), backend=be)
                plan.gate(u_i, 0)
                buf.views[-1].copy_(u_i.view(buf.views[-1].shape))
            L.lora_linear_fwd(x_i, weight, u_i, lora_b, scale=plan.scale, out=buf.views[0], backend=be)
            if dora_drop:
                L.lora_linear_fwd(x_i, weight, u_i, lora_b, scale=plan.scale, out=buf.views[1], drop=drop, backend=be)
            if magnitude is not None:
                buf.extras.copy_(norm.lora_sq.to(buf.flat.dtype).expand_as(buf.extras))
            if plan.mode.sequence_parallel:
                parts = buf.split(D.reduce_scatter_rows(buf.flat, plan.mode.group))
            else:
                # An expert's z stays partial (the dispatcher reduces it): reduce u alone.
                D.all_reduce_(buf.views[-1] if plan.mode.explicit_comm else buf.flat, plan.mode.group)
                parts = buf.split(buf.flat)
            y, u = parts[0], parts[len(widths) - 1]
            dora: tuple = ()
            if magnitude is None:
                if bias is not None:
                    y.add_(bias)
                y = _fresh(y)
            else:
                inv, g = _dora_scale(magnitude, norm.weight_sq + parts[-1].float())
                if dora_drop:  # PEFT's form: z + (g - 1) ⊙ z_dropped + b, and dm reads the dropped one
                    y0 = parts[1].clone()  # compact: the buffer also holds z
                    out = torch.addcmul(y.float(), y0.float(), g - 1)
                else:  # g ⊙ z + b; z is the buffer's first operand, saved as y0 without a copy
                    y0 = y
                    out = y.float() * g
                if bias is not None:
                    out.add_(bias)
                y = out.to(buf.flat.dtype)
                dora = (magnitude, y0, inv)
        ctx.plan = plan
        # u is cloned so that saving it does not pin the whole [z | u] buffer (the output), unless
        # y0 pins that buffer already (DoRA without dropout): then u's view costs nothing more.
        pinned = magnitude is not None and not dora_drop
        ctx.save_for_backward(x_i, weight, lora_a, lora_b, u if pinned else u.clone(), seed, *dora)
        return y

    @staticmethod
    @_first_order
    def backward(ctx, dy):
        plan, be, saved, (need_dx, need_da, need_db) = _unpack(ctx)
        x_i, weight, lora_a, lora_b, u, seed = saved[:6]
        magnitude, y0, g, inv, need_dm = _saved_dora(ctx, saved)
        dy = dy.to(x_i.dtype)
        dY = D.all_gather_rows(dy, plan.mode.group) if plan.mode.sequence_parallel else dy
        drop = plan.dropout(seed).shifted(cols=plan.mode.rank * weight.shape[1])
        u_row0 = plan.mode.rank * dy.shape[0] if plan.mode.sequence_parallel else 0
        dx = da = None
        # dm: this rank's rows under SP (its partial sum; the magnitude is marked sequence_parallel).
        dm = torch.empty(weight.shape[0], dtype=torch.float32, device=dy.device) if need_dm else None
        dora = dict(col_scale=g, y0=y0 if need_dm else None, dm_out=dm) if magnitude is not None else {}
        with _no_autocast(dy.device), be.backward_scope():
            du, db = L.lora_dy_bwd(dY, lora_b, u if need_db else None, scale=plan.scale, u_row0=u_row0,
                                   compute_du=need_dx or need_da, backend=be, **dora)
            if du is not None:
                plan.gate(du, 0)
            if need_dx:
                dx = _dora_dx(dY, weight, du, lora_a, drop, None, g, be)
                if not plan.mode.input_is_parallel:
                    dx = D.all_gather_cols(dx, plan.mode.group)
            if need_da:
                da = L.lora_shrink_bwd(du, x_i, drop=drop, rank=lora_a.shape[0], backend=be)
        if dm is not None:
            dm.mul_(inv)
        return (dx, None, None, _deliver(lora_a, da), _deliver(lora_b, db), None,
                _deliver(magnitude, dm) if magnitude is not None else None, None, None)
