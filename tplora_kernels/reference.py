"""Unfused references: the test oracle and the bench baseline, shipped so users can read the math.

* ``lora_dense``: the single-device math on full matrices, in whatever dtype it is given
  (the tests run it in fp64). Same mask function, so it is comparable element for element.
* ``dora_dense``: the same for DoRA (PEFT's formula, the weight norm a constant in backward):
  the tests' oracle of ``magnitude=`` calls and of the ``use_dora`` modules.
* ``column_parallel_lora_reference`` / ``row_parallel_lora_reference``: PEFT's
  ``LoraParallelLinear`` structure per rank, written in stock torch ops and Megatron-style
  autograd collectives: the base layer with its collectives, then a separate LoRA branch with
  materialised dropout, the input upcast to the LoRA weights' dtype (fp32 in PEFT), separate A and
  B matmuls, and the LoRA branch's own collective (all-reduce of du for column, of u for row).
  ``base_parallel_linear`` is the base layer alone (the bench's floor).

The collectives here are deliberately Megatron's mappings (``copy_to``, ``reduce_from``,
``gather/scatter``), not the fused buffers of ``autograd``.
"""

from __future__ import annotations

import torch

from .mappings import (
    CopyToRegion,
    GatherCols,
    GatherRows,
    ReduceFromRegion,
    ReduceScatterRows,
    ScatterCols,
    base_parallel_linear,
)
from .mask import dropout_threshold, keep_mask, keep_scale
from .mode import TPMode

__all__ = [
    "column_parallel_lora_reference",
    "dora_dense",
    "lora_dense",
    "materialised_dropout",
    "row_parallel_lora_reference",
]


def materialised_dropout(x: torch.Tensor, p: float, seed, row0: int, col0: int, kind: str) -> torch.Tensor:
    """Materialised dropout of 2-D ``x``: the package's Philox mask at global (row0, col0), or nn.Dropout's bernoulli.

    Args:
        x: [T, K].
        p: the drop probability (0: ``x`` itself).
        seed: the Philox seed (``kind="philox"``).
        row0, col0: the global offset of ``x``'s first row and column in the mask.
        kind: ``"philox"`` (the kernels' mask) or ``"bernoulli"`` (``nn.functional.dropout``).

    Returns:
        [T, K]: ``x`` with dropped entries zeroed and kept ones scaled.

    Example:
        >>> materialised_dropout(torch.ones(2, 3), 0.0, 0, 0, 0, "philox").sum().item()
        6.0
    """
    if p == 0:
        return x
    if kind == "bernoulli":
        return torch.nn.functional.dropout(x, p, training=True)
    thr = dropout_threshold(p)
    m = keep_mask(seed, row0, x.shape[0], col0, x.shape[1], thr, device=x.device)
    return x * m.to(x.dtype) * keep_scale(thr)


# ---------------------------------------------------------------------------------------------
# Dense single-device math
# ---------------------------------------------------------------------------------------------
def lora_dense(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
               bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
               seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + s·(x ⊙ M / (1-p)) Aᵀ Bᵀ + bias`` on full matrices, in x's dtype.

    Rows are x's leading dimensions flattened in order, so row ids are the global token ids that
    every TP layout maps back to; columns are the global feature ids.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``; lora_a: ``[r, K]``; lora_b: ``[N, r]``; bias: ``[N]`` or None.
        scale: LoRA scale s.
        dropout_p: dropout probability; the mask is ``mask.keep_mask(seed, ...)``.
        seed: dropout seed (required when dropout_p > 0).

    Returns:
        ``[..., N]``, differentiable with plain autograd.

    Example:
        >>> x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        >>> lora_dense(x, w, a, b, scale=0.5).shape
        torch.Size([3, 4])
    """
    x2 = x.reshape(-1, x.shape[-1])
    xd = materialised_dropout(x2, dropout_p, seed, 0, 0, "philox") if dropout_p else x2
    y = x2 @ weight.t() + scale * ((xd @ lora_a.to(x.dtype).t()) @ lora_b.to(x.dtype).t())
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def dora_dense(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               magnitude: torch.Tensor, *, bias: torch.Tensor | None = None, scale: float = 1.0,
               dropout_p: float = 0.0, seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """DoRA on full matrices, unfused, PEFT's formula (``peft.tuners.lora.dora.DoraLinearLayer``).

    With ``g = m / ‖W + s·B A‖`` (row norms over K, computed from detached W, A, B: a constant in
    backward, as in the paper's §4.3 and PEFT):

    * dropout off: ``y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias``;
    * dropout on (``x_d = x ⊙ M / (1-p)``, M the package's Philox mask ``mask.keep_mask``):
      ``y = x Wᵀ + bias + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ Bᵀ)``.

    Everything runs in plain torch autograd ops, unfused, in x's dtype (the factors are cast to
    it, as ``lora_dense`` does; ``g`` is computed in the promoted dtype of the magnitude and the
    norm, and the output cast back to x's dtype). The tests run it in fp64 as the oracle of every
    DoRA path: rows are x's leading dimensions flattened in order, columns the global features,
    so any TP layout's pieces map back to it.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]`` base weight; lora_a: ``[r, K]``; lora_b: ``[N, r]``; bias: ``[N]`` or None.
        magnitude: ``[N]`` DoRA magnitude m (PEFT's ``lora_magnitude_vector``).
        scale: LoRA scale s.
        dropout_p: dropout probability; the mask is ``mask.keep_mask(seed, ...)``.
        seed: dropout seed (required when dropout_p > 0).

    Returns:
        ``[..., N]`` in x's dtype, differentiable with plain autograd w.r.t. x, A, B and m (the
        norm is detached, so dA and dB lack the norm's terms, as in PEFT).

    Example:
        >>> x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        >>> m = torch.linalg.norm(w + 0.5 * b @ a, dim=1)   # PEFT's initial magnitude
        >>> y = dora_dense(x, w, a, b, m, scale=0.5)
        >>> y.shape, bool(torch.allclose(y, lora_dense(x, w, a, b, scale=0.5), atol=1e-5))
        (torch.Size([3, 4]), True)
    """
    x2 = x.reshape(-1, x.shape[-1])
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    with torch.no_grad():  # the norm is a constant in backward (PEFT: weight_norm.detach())
        norm = torch.linalg.norm(weight.detach() + scale * (b.detach() @ a.detach()), dim=1)
    g = magnitude / norm
    if dropout_p:
        xd = materialised_dropout(x2, dropout_p, seed, 0, 0, "philox")
        y = x2 @ weight.t() + (g - 1) * (xd @ weight.t()) + g * (scale * ((xd @ a.t()) @ b.t()))
    else:
        y = g * (x2 @ weight.t() + scale * ((x2 @ a.t()) @ b.t()))
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# PEFT's per-rank structure
# ---------------------------------------------------------------------------------------------
def column_parallel_lora_reference(x, weight, lora_a, lora_b, *, bias=None, scale=1.0, dropout_p=0.0, seed=None,
                                   sequence_parallel=False, gather_output=False, group=None,
                                   dropout="philox") -> torch.Tensor:
    """PEFT's column-parallel LoRA structure per rank; same arguments as ``column_parallel_lora``.

    lora_A is a replicated linear on the local input; lora_B is a column-parallel linear, whose
    input mapping adds LoRA's own collective (backward all-reduce of du, or under SP a forward
    all-gather of u and a backward reduce-scatter).

    Args:
        dropout: ``"philox"`` (the package's mask, comparable with the fused path) or
            ``"bernoulli"`` (nn.Dropout, what PEFT really runs).

    Returns:
        As ``column_parallel_lora``.

    Example:
        >>> x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        >>> column_parallel_lora_reference(x, w, a, b).shape
        torch.Size([3, 4])
    """
    mode = TPMode.build("column", group=group, sequence_parallel=sequence_parallel, gather_output=gather_output)
    y = base_parallel_linear(x, weight, mode, bias=bias)
    x2 = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
    row0 = mode.rank * x2.shape[0] if mode.sequence_parallel else 0
    u = materialised_dropout(x2, dropout_p, seed, row0, 0, dropout) @ lora_a.t()
    U = GatherRows.apply(u, group) if mode.sequence_parallel else CopyToRegion.apply(u, group)
    z = U @ lora_b.t()
    if mode.gather_output:
        z = GatherCols.apply(z, group)
    return (y + scale * z.view(y.shape)).to(x.dtype)


def row_parallel_lora_reference(x, weight, lora_a, lora_b, *, bias=None, scale=1.0, dropout_p=0.0, seed=None,
                                sequence_parallel=False, input_is_parallel=True, group=None,
                                dropout="philox") -> torch.Tensor:
    """PEFT's row-parallel LoRA structure per rank; same arguments as ``row_parallel_lora``.

    lora_A is a row-parallel linear, whose output reduction (all-reduce of u, or reduce-scatter
    under SP) is LoRA's own collective; lora_B is a replicated linear.

    Args:
        dropout: ``"philox"`` or ``"bernoulli"``, as for the column reference.

    Returns:
        As ``row_parallel_lora``.

    Example (with PEFT's nn.Dropout, as PEFT runs it):
        >>> y = row_parallel_lora_reference(torch.randn(2, 3, 8), torch.randn(4, 8), torch.randn(2, 8),
        ...                                 torch.randn(4, 2), dropout_p=0.1, dropout="bernoulli")
        >>> tuple(y.shape)
        (2, 3, 4)
    """
    mode = TPMode.build("row", group=group, sequence_parallel=sequence_parallel, input_is_parallel=input_is_parallel)
    y = base_parallel_linear(x, weight, mode, bias=bias)
    x2 = x.reshape(-1, x.shape[-1])
    xi = x2 if mode.input_is_parallel else ScatterCols.apply(x2, group)
    xi = xi.to(lora_a.dtype)
    u = materialised_dropout(xi, dropout_p, seed, 0, mode.rank * weight.shape[1], dropout) @ lora_a.t()
    U = ReduceScatterRows.apply(u, group) if mode.sequence_parallel else ReduceFromRegion.apply(u, group)
    z = U @ lora_b.t()
    return (y + scale * z.view(y.shape)).to(x.dtype)
