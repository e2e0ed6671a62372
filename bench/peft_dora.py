"""PEFT's DoRA structure per rank, unfused: the bench's ``peft_dora`` contender and the DoRA tests' torch run.

PEFT (0.22) does not run DoRA on a tensor-parallel layer: its ``LoraParallelLinear`` refuses
``use_dora`` ("does not support DoRA yet"). What a user gets by running PEFT's DoRA math on each
rank's shard is written here, in stock torch ops and Megatron's autograd collectives
(``tplora_kernels.mappings``), on top of the unfused LoRA structure of
``tplora_kernels.reference`` (PEFT's ``LoraParallelLinear``), following PEFT's
``peft.tuners.lora.dora.DoraLinearLayer.forward`` and ``lora.layer.Linear.forward`` step by step
(read to understand, not copied):

1. the base layer's output ``result = base(x)`` with its own collectives (bias included);
2. x cast to the LoRA weights' dtype (fp32 in PEFT), then dropout (``nn.Dropout``, or the
   package's Philox mask to compare element by element);
3. ``lora_weight = B A`` **materialised** (``[N/t, K]`` or ``[N, K/t]``) and the row norms
   ``‖W + s·lora_weight‖`` taken from it in every forward, in that dtype, detached;
4. the LoRA branch ``s·(x_d Aᵀ) Bᵀ`` with LoRA's own collective (as the LoRA reference);
5. ``base_result``: without dropout ``result − bias``; with dropout a second base GEMM on the
   dropped x, ``x_d Wᵀ``;
6. ``y = result + (g − 1) ⊙ base_result + g ⊙ s·lora``, ``g = m / norm``, cast back to x's dtype.

What tensor parallelism adds to PEFT's per-rank math, so that the result is the layer's DoRA:

* row-parallel: a rank's ``W_i + s·B A_i`` is a K-slice, so its squared row norms are partial:
  one all-reduce of N values in **every** forward; with dropout, ``x_d_i W_iᵀ`` is a partial
  sum too: the base layer's reduction again (all-reduce, or reduce-scatter under SP, whose
  backward all-gathers dy).
* column-parallel: norms are local. With dropout the second base GEMM needs the whole dropped
  input: ``x_d`` goes through Megatron's input mapping (forward identity and backward
  all-reduce of its dx part; under SP an all-gather of its rows, backward reduce-scatter).
* ``gather_output``: y is gathered once, at the end.

The fused path (``tplora_kernels``) needs none of those collectives (``tplora_kernels.dora``).
"""

from __future__ import annotations

import torch

from tplora_kernels import distributed as D
from tplora_kernels.mappings import (
    CopyToRegion,
    GatherCols,
    GatherRows,
    ReduceFromRegion,
    ReduceScatterRows,
    ScatterCols,
    base_parallel_linear,
)
from tplora_kernels.mode import TPMode
from tplora_kernels.reference import materialised_dropout

__all__ = ["column_parallel_dora_peft", "row_parallel_dora_peft"]


def _combine(result: torch.Tensor, base_result: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor,
             norm: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """PEFT's ``result + (g − 1)·base_result + g·s·lora`` with ``g = m / norm`` (norm detached)."""
    g = (magnitude / norm.detach()).view(1, -1)
    return (result + ((g - 1) * base_result + g * lora * scale)).to(out_dtype)


def column_parallel_dora_peft(x, weight, lora_a, lora_b, magnitude, *, bias=None, scale=1.0, dropout_p=0.0,
                              seed=None, sequence_parallel=False, gather_output=False, group=None,
                              dropout="philox") -> torch.Tensor:
    """PEFT's DoRA math per rank of a column-parallel layer (see the module docstring).

    Args:
        x: ``[..., K]`` (under SP this rank's ``[S/t, ..., K]``).
        weight: ``[N/t, K]``; lora_a: ``[r, K]``; lora_b: ``[N/t, r]``; magnitude: ``[N/t]`` (its
            dtype is PEFT's, the LoRA weights'); bias: ``[N/t]`` or None.
        scale, dropout_p, seed, sequence_parallel, gather_output, group: as ``column_parallel_lora``.
        dropout: ``"philox"`` (the package's mask, comparable with the fused path) or ``"bernoulli"``.

    Returns:
        As ``column_parallel_lora``, in x's dtype.

    Example:
        >>> x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        >>> column_parallel_dora_peft(x, w, a, b, torch.ones(4)).shape
        torch.Size([3, 4])
    """
    mode = TPMode.build("column", group=group, sequence_parallel=sequence_parallel)
    result = base_parallel_linear(x, weight, mode, bias=bias)
    result = result.reshape(-1, result.shape[-1])
    ld = lora_a.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(ld)
    row0 = mode.rank * x2.shape[0] if mode.sequence_parallel else 0
    xd = materialised_dropout(x2, dropout_p, seed, row0, 0, dropout)
    u = xd @ lora_a.t()
    lora = (GatherRows.apply(u, group) if mode.sequence_parallel else CopyToRegion.apply(u, group)) @ lora_b.t()
    w = weight.to(ld)
    with torch.no_grad():  # PEFT: lora_weight = B A materialised, the norm detached
        norm = torch.linalg.norm(w + scale * (lora_b.detach() @ lora_a.detach()), dim=1)
    if dropout_p:
        xd_all = GatherRows.apply(xd, group) if mode.sequence_parallel else CopyToRegion.apply(xd, group)
        base_result = xd_all @ w.t()
    else:
        base_result = result if bias is None else result - bias
    y = _combine(result, base_result, lora, magnitude, norm, scale, x.dtype)
    if gather_output and mode.world > 1:
        y = GatherCols.apply(y, group)
    lead = [x.shape[0] * (mode.world if mode.sequence_parallel else 1), *x.shape[1:-1]]
    return y.view(*lead, y.shape[-1])


def row_parallel_dora_peft(x, weight, lora_a, lora_b, magnitude, *, bias=None, scale=1.0, dropout_p=0.0, seed=None,
                           sequence_parallel=False, input_is_parallel=True, group=None,
                           dropout="philox") -> torch.Tensor:
    """PEFT's DoRA math per rank of a row-parallel layer (see the module docstring).

    Args:
        x: ``[S, ..., K/t]`` (input_is_parallel) or ``[S, ..., K]``.
        weight: ``[N, K/t]``; lora_a: ``[r, K/t]``; lora_b: ``[N, r]``; magnitude: ``[N]``
            (replicated; under SP its gradient is this rank's partial sum, as the fused path's);
            bias: ``[N]`` or None.
        scale, dropout_p, seed, sequence_parallel, input_is_parallel, group: as ``row_parallel_lora``.
        dropout: ``"philox"`` or ``"bernoulli"``, as for the column layer.

    Returns:
        As ``row_parallel_lora``, in x's dtype.

    Example:
        >>> x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        >>> row_parallel_dora_peft(x, w, a, b, torch.ones(4), dropout_p=0.1, dropout="bernoulli").shape
        torch.Size([3, 4])
    """
    mode = TPMode.build("row", group=group, sequence_parallel=sequence_parallel, input_is_parallel=input_is_parallel)
    result = base_parallel_linear(x, weight, mode, bias=bias)
    lead = result.shape[:-1]
    result = result.reshape(-1, result.shape[-1])
    ld = lora_a.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xi = (x2 if mode.input_is_parallel else ScatterCols.apply(x2, group)).to(ld)
    xd = materialised_dropout(xi, dropout_p, seed, 0, mode.rank * weight.shape[1], dropout)

    def reduce(partial):
        return ReduceScatterRows.apply(partial, group) if mode.sequence_parallel else ReduceFromRegion.apply(
            partial, group)

    lora = reduce(xd @ lora_a.t()) @ lora_b.t()
    w = weight.to(ld)
    with torch.no_grad():  # the rank's squared norms are partial over K: summed in every forward
        sq = (w + scale * (lora_b.detach() @ lora_a.detach())).square().sum(1)
        if mode.world > 1:
            D.all_reduce_(sq, group)
        norm = sq.sqrt()
    if dropout_p:
        base_result = reduce(xd @ w.t())
    else:
        base_result = result if bias is None else result - bias
    y = _combine(result, base_result, lora, magnitude, norm, scale, x.dtype)
    return y.view(*lead, y.shape[-1])
