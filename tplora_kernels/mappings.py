"""Megatron's tensor-parallel mappings as autograd Functions, and the frozen base layer alone.

These are the stock collectives the base layer runs (``copy_to``/``reduce_from`` region,
sequence-parallel gather/reduce-scatter, column gather/scatter), written on top of
``distributed`` so they run on CPU/gloo too: megatron-core's own gather and SP paths call
``torch.cuda.current_device()``. The unfused reference builds PEFT's structure from them, and
the modules use ``base_parallel_linear`` when no adapter is active (disabled or merged).
"""

from __future__ import annotations

import torch

from . import distributed as D
from .mode import TPMode

__all__ = [
    "CopyToRegion",
    "GatherCols",
    "GatherRows",
    "ReduceFromRegion",
    "ReduceScatterRows",
    "ScatterCols",
    "base_parallel_linear",
]


class CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        # One copy: g may be the caller's own gradient tensor, which must not change.
        return D.all_reduce_(g.clone(memory_format=torch.contiguous_format), ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce, backward identity.

    Like Megatron's, it reduces its input in place: callers pass a fresh partial product (the
    base layer's ``x_i W_iᵀ``), so a copy would only add a T×N pass to the base's time.
    """

    @staticmethod
    def forward(ctx, x, group):
        if not x.is_contiguous():
            return D.all_reduce_(x.contiguous(), group)
        ctx.mark_dirty(x)
        return D.all_reduce_(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def _mirrored(name: str, forward, backward, doc: str) -> type[torch.autograd.Function]:
    """An autograd Function whose forward is one collective and whose backward is its mirror."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, g):
        return backward(g, ctx.group), None

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(fwd),
                                                     "backward": staticmethod(bwd), "__module__": __name__})


GatherRows = _mirrored("GatherRows", D.all_gather_rows, D.reduce_scatter_rows,
                       "Forward all-gather rows (dim 0), backward reduce-scatter rows (SP gather).")
ReduceScatterRows = _mirrored("ReduceScatterRows", D.reduce_scatter_rows, D.all_gather_rows,
                              "Forward reduce-scatter rows, backward all-gather rows (SP reduce-scatter).")


class GatherCols(torch.autograd.Function):
    """Forward all-gather the last dim, backward keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        return D.all_gather_cols(x, group)

    @staticmethod
    def backward(ctx, g):
        r = D.group_rank(ctx.group)
        return g[..., r * ctx.width:(r + 1) * ctx.width].contiguous(), None


class ScatterCols(torch.autograd.Function):
    """Forward keep this rank's slice of the last dim, backward all-gather it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        t, r = D.group_size(group), D.group_rank(group)
        w = x.shape[-1] // t
        return x[..., r * w:(r + 1) * w].contiguous()

    @staticmethod
    def backward(ctx, g):
        return D.all_gather_cols(g, ctx.group), None



def base_parallel_linear(x: torch.Tensor, weight: torch.Tensor, mode: TPMode, *,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen base layer alone, with Megatron's collectives: the floor LoRA is measured against.

    Args:
        x: as for ``column_parallel_lora`` / ``row_parallel_lora``.
        weight: the base shard (``[N/t, K]`` column, ``[N, K/t]`` row).
        mode: the layer's ``TPMode`` (an ``explicit_comm`` one runs no collective at all: an MoE
            expert layer, whose token dispatcher communicates).
        bias: added unless None.

    Returns:
        The base layer's output, in x's dtype.

    Example:
        >>> base_parallel_linear(torch.randn(3, 8), torch.randn(4, 8), TPMode.build("column")).shape
        torch.Size([3, 4])
    """
    group, world, sp = mode.group, mode.world, mode.sequence_parallel
    x2 = x.reshape(-1, x.shape[-1])
    if mode.explicit_comm:
        y = torch.nn.functional.linear(x2, weight, bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    if mode.kind == "column":
        X = GatherRows.apply(x2, group) if sp else CopyToRegion.apply(x2, group)
        y = torch.nn.functional.linear(X, weight, bias)
        if mode.gather_output:
            y = GatherCols.apply(y, group)
        lead = [x.shape[0] * (world if sp else 1), *x.shape[1:-1]]
    else:
        xi = x2 if mode.input_is_parallel else ScatterCols.apply(x2, group)
        z = xi @ weight.t()
        y = ReduceScatterRows.apply(z, group) if sp else ReduceFromRegion.apply(z, group)
        if bias is not None:
            y = y + bias
        lead = [x.shape[0] // (world if sp else 1), *x.shape[1:-1]]
    return y.view(*lead, y.shape[-1])
