"""Functional API: ``column_parallel_lora`` and ``row_parallel_lora``.

These validate every argument *before* any collective, from what every rank sees alike
(shapes, dtypes, devices, options), so a bad call raises the same error on every rank and no rank
is left waiting in a collective. Then they flatten the leading dimensions into rows, resolve the
backend and the dropout seed once (``backends``, ``rng``), and call the autograd Functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .autograd import ColumnParallelLoRAFn, Plan, RowParallelLoRAFn
from .config import check_dropout, check_scale
from .dora import DoRANorm
from .mappings import base_parallel_linear
from .mask import dropout_threshold
from .mode import TPMode
from .multi import AdapterMix
from .ops.registry import Backend
from .ops.select import get_backend
from .rng import SeedLike, check_seed, resolve_seed

__all__ = ["LoRAOutput", "column_parallel_lora", "parallel_linear", "parallel_lora", "row_parallel_lora"]

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t, *, dims: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _validate(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> tuple[float, int]:
    """Checks shared by both modes; returns (scale, dropout threshold)."""
    _check_tensor("x", x)
    _check_tensor("weight", weight, dims=2)
    _check_tensor("lora_a", lora_a, dims=2)
    _check_tensor("lora_b", lora_b, dims=2)
    if bias is not None:
        _check_tensor("bias", bias, dims=1)
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have a hidden dimension, got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x dtype {x.dtype} must match the base weight's dtype {weight.dtype} "
                        "(mixed activation/weight dtypes are not supported; cast x first)")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    devices = {n: t.device for n, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a),
                                         ("lora_b", lora_b)) if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"x, the base weights and the LoRA weights must share one device, got {devices}")
    if lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[0] < 1:
        raise ValueError(f"LoRA rank mismatch: lora_a is {tuple(lora_a.shape)} ([r, K]) and lora_b is "
                         f"{tuple(lora_b.shape)} ([N, r]); r must be >= 1 and agree")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("the base weight and bias must be frozen (requires_grad=False): LoRA computes no "
                         "base weight gradient")
    scale = check_scale("scale", scale)
    thr = dropout_threshold(check_dropout("dropout_p", dropout_p))
    check_seed(seed)
    return scale, thr


def _check_mix(mix, x: torch.Tensor, lora_a: torch.Tensor, scale: float, thr: int, rows_scale: int) -> None:
    """A mixed batch's checks: stacked rank, one adapter per sample, options carried by the mix."""
    if not isinstance(mix, AdapterMix):
        raise TypeError(f"mix must be a multi.AdapterMix or None, got {type(mix).__name__}")
    if lora_a.shape[0] != mix.rank:
        raise ValueError(f"mix: the stacked factors have rank {lora_a.shape[0]} but the mix's adapters sum to "
                         f"{mix.rank}")
    if scale != 1.0 or thr:
        raise ValueError("mix: each adapter's scale and dropout come from the mix; leave scale=1 and dropout_p=0")
    samples = x.shape[1] if x.dim() >= 3 else x.shape[0] * rows_scale
    if x.dim() < 2 or mix.period != samples:
        raise ValueError(f"mix: x must be [s, b, K] (or [b, K], one row per sample) with one adapter per sample; "
                         f"got x of shape {tuple(x.shape)} and {mix.period} sample adapters")


def _lead(x: torch.Tensor, K: int, what: str) -> None:
    if x.shape[-1] != K:
        raise ValueError(f"x's hidden size must be {what} {K}, got x of shape {tuple(x.shape)}")
    if K == 0:
        raise ValueError(f"the layer's input size must be >= 1, got x of shape {tuple(x.shape)}")


def _in_features(mode: TPMode, weight: torch.Tensor) -> tuple[int, str]:
    """The width x must have (and what it is): the weight's K, or the full K of a non-parallel row input."""
    k = weight.shape[1]
    if mode.kind == "column":
        return k, "the layer's input size"
    if mode.input_is_parallel:
        return k, "this rank's input slice"
    return k * mode.world, "the full input size"


def _check_mode(mode: TPMode, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Mode-dependent checks (every rank sees the same): returns K, the width of x's rows."""
    if not isinstance(mode, TPMode):
        raise TypeError(f"mode must be a tplora_kernels.TPMode, got {type(mode).__name__}")
    K, what = _in_features(mode, weight)
    _lead(x, K, what)
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if mode.sequence_parallel and x.dim() < 2:
        raise ValueError(f"sequence_parallel needs x with a sequence dimension, got shape {tuple(x.shape)}")
    if mode.kind == "row" and mode.sequence_parallel and x.shape[0] % mode.world:
        raise ValueError(f"sequence_parallel needs x's sequence dimension (dim 0) divisible by the TP size "
                         f"{mode.world}, got x of shape {tuple(x.shape)}")
    if mode.kind == "row" and mode.explicit_comm and bias is not None and mode.world > 1:
        raise ValueError("explicit_comm: the output stays a partial sum, so the bias must be added after the "
                         "reduction (skip_bias_add=True, as megatron requires for expert layers)")
    return K


class LoRAOutput(NamedTuple):
    """What ``parallel_lora`` returns: the output, and the name of the backend that ran."""

    output: torch.Tensor
    backend: str


def _check_dora(magnitude, norm, weight: torch.Tensor, mode: TPMode, mix) -> None:
    """DoRA's inputs: both or neither; ``[N_local]`` magnitude and fp32 norm parts; not with a mix or an expert."""
    if magnitude is None and norm is None:
        return
    if magnitude is None or norm is None:
        raise TypeError("DoRA needs both magnitude= and norm= (tplora_kernels.dora.norm_parts), or neither")
    if not isinstance(norm, DoRANorm):
        raise TypeError(f"norm must be a tplora_kernels.dora.DoRANorm, got {type(norm).__name__}")
    _check_tensor("magnitude", magnitude, dims=1)
    n = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("norm.weight_sq", norm.weight_sq), ("norm.lora_sq", norm.lora_sq)):
        if t.shape != (n,) or t.device != weight.device or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float [{n}] tensor on {weight.device} (one value per output row of "
                             f"this rank's weight), got {t.dtype} {tuple(t.shape)} on {t.device}")
    if mix is not None:
        raise ValueError("DoRA cannot run several adapters in one batch (mix=): each adapter's norm scales the "
                         "whole output row")
    if mode.explicit_comm:
        raise ValueError("DoRA is not supported on MoE expert layers (explicit_comm): their outputs stay partial "
                         "sums, which the row norm's scale cannot be applied to")


def parallel_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mode: TPMode,
                  *, bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                  seed: SeedLike = None, backend: str | Backend | None = None,
                  mix: AdapterMix | None = None, magnitude: torch.Tensor | None = None,
                  norm: DoRANorm | None = None) -> LoRAOutput:
    """LoRA on a parallel linear of either kind: the one entry the modules and both wrappers use.

    ``column_parallel_lora``/``row_parallel_lora`` document each kind's math and shapes; this takes
    the layer's ``TPMode`` instead of its flags, and also says which backend ran.

    Args:
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend, mix: as
            ``column_parallel_lora`` (column) or ``row_parallel_lora`` (row).
        mode: the layer's ``TPMode``.
        magnitude: DoRA's ``[N_local]`` magnitude m (sharded like B's rows for a column layer,
            replicated for a row layer); with ``norm``, the call computes DoRA's
            ``m/‖W + s·B A‖ ⊙ (x Wᵀ + s·u Bᵀ) + b`` (PEFT's form with dropout; ``tplora_kernels.dora``).
        norm: the ``DoRANorm`` of this call's weights (``dora.norm_parts``), detached.

    Returns:
        ``LoRAOutput(output, backend name)``.

    Example:
        >>> y, ran = parallel_lora(torch.randn(4, 2, 32), torch.randn(16, 32), torch.randn(8, 32),
        ...                        torch.zeros(16, 8), TPMode.build("column"), scale=2.0, backend="torch")
        >>> tuple(y.shape), ran
        ((4, 2, 16), 'torch')
    """
    scale, thr = _validate(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    K = _check_mode(mode, x, weight, bias)
    _check_dora(magnitude, norm, weight, mode, mix)
    k = weight.shape[1]
    want_a, want_b = (k, weight.shape[0])
    if lora_a.shape[1] != want_a or lora_b.shape[0] != want_b:
        raise ValueError(f"{mode.kind}-parallel LoRA expects lora_a [r, {want_a}] and lora_b [{want_b}, r], "
                         f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    rows_scale = mode.world if mode.kind == "column" and mode.sequence_parallel else 1
    if mix is not None:
        _check_mix(mix, x, lora_a, scale, thr, rows_scale)
        thr = mix.max_thr
    T = x.numel() // K * rows_scale
    be = get_backend(x.device, backend, gemm=(x.dtype, lora_a.dtype, weight.shape[0], k, lora_a.shape[0], T,
                                              mode.group))
    seed_t = resolve_seed(seed, x.device) if thr else None
    plan = Plan(mode, scale, thr, be, mix=mix)
    lead = list(x.shape[:-1])
    if mode.sequence_parallel:
        lead[0] = lead[0] * mode.world if mode.kind == "column" else lead[0] // mode.world
    fn = ColumnParallelLoRAFn if mode.kind == "column" else RowParallelLoRAFn
    y = fn.apply(x.reshape(-1, K), weight, bias, lora_a, lora_b, seed_t, magnitude, norm, plan)
    return LoRAOutput(y.view(*lead, y.shape[-1]), be.name)


def column_parallel_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                         seed: SeedLike = None, sequence_parallel: bool = False, gather_output: bool = False,
                         group: dist.ProcessGroup | None = None, backend: str | Backend | None = None,
                         output_dtype: torch.dtype | None = None, explicit_comm: bool = False,
                         mix: AdapterMix | None = None, magnitude: torch.Tensor | None = None,
                         norm: DoRANorm | None = None) -> torch.Tensor:
    """LoRA on a column-parallel linear: ``y_i = X W_iᵀ + s·(drop(X) Aᵀ) B_iᵀ (+ bias_i)``.

    Adds no collective to the base layer's: SP gathers x's rows in forward (the base needs it)
    and backward reduces ``[dX | du]`` in the base's one dgrad collective.

    Args:
        x: ``[..., K]`` input; under SP the local ``[S/t, ..., K]`` (dim 0 is the sequence).
        weight: ``[N/t, K]`` frozen base weight shard, x's dtype.
        lora_a: ``[r, K]`` LoRA A, replicated (fp32 or x's dtype).
        lora_b: ``[N/t, r]`` LoRA B shard (fp32 or x's dtype).
        bias: optional ``[N/t]`` frozen bias shard (added in the kernel epilogue).
        scale: s = alpha/r (or alpha/sqrt(r)); a real number within fp32's range.
        dropout_p: LoRA dropout probability in [0, 1) (pass 0 in eval mode).
        seed: dropout seed (``rng.resolve_seed``); None draws one by ``tplora_kernels.rng``'s rule,
            identical on every TP rank.
        sequence_parallel: x holds this rank's slice of dim 0.
        gather_output: all-gather the output columns to ``[..., N]``.
        group: the base layer's tensor-parallel group.
        backend: a ``Backend`` or ``"triton"``, ``"cublas"``, ``"interpret"``, ``"torch"``, ``"auto"``,
            None (``TPLORA_BACKEND`` / auto).
        output_dtype: the output's dtype (None: x's), as a base layer's ``output_dtype``.
        explicit_comm: the base layer does no TP communication (an MoE expert under expert TP,
            whose token dispatcher gathers x and reduces dX): dX stays a partial sum and du gets
            one all-reduce over ``group``.
        mix: several adapters in one batch (``multi.AdapterMix``, one adapter per sample of the
            batch dim of ``[s, b, K]``): ``lora_a`` ``[Σr, K]`` and ``lora_b`` ``[N/t, Σr]`` are the
            adapters' factors stacked in the mix's order; scale and dropout come from the mix.
        magnitude, norm: DoRA (``parallel_lora``): the ``[N/t]`` magnitude shard and the norm parts.

    Returns:
        ``[S, ..., N/t]`` (``[S, ..., N]`` with gather_output), S = x.shape[0] · t under SP.

    Example:
        >>> x, w = torch.randn(4, 2, 32), torch.randn(16, 32)
        >>> a, b = torch.randn(8, 32), torch.zeros(16, 8)
        >>> column_parallel_lora(x, w, a, b, scale=2.0).shape
        torch.Size([4, 2, 16])
    """
    mode = TPMode.build("column", group=group, sequence_parallel=sequence_parallel, gather_output=gather_output,
                        explicit_comm=explicit_comm, output_dtype=output_dtype)
    return parallel_lora(x, weight, lora_a, lora_b, mode, bias=bias, scale=scale, dropout_p=dropout_p, seed=seed,
                         backend=backend, mix=mix, magnitude=magnitude, norm=norm).output


def row_parallel_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                      seed: SeedLike = None, sequence_parallel: bool = False, input_is_parallel: bool = True,
                      group: dist.ProcessGroup | None = None, backend: str | Backend | None = None,
                      output_dtype: torch.dtype | None = None, explicit_comm: bool = False,
                      mix: AdapterMix | None = None, magnitude: torch.Tensor | None = None,
                      norm: DoRANorm | None = None) -> torch.Tensor:
    """LoRA on a row-parallel linear: ``y = Σ_i [x_i W_iᵀ + s·(drop(x_i) A_iᵀ) Bᵀ] (+ bias)``.

    Adds no collective: one all-reduce (SP off) or reduce-scatter (SP on) of ``[z_i | u_i]``
    yields both the output and u. Bias is added after the reduction.

    Args:
        x: ``[S, ..., K/t]`` (input_is_parallel) or ``[S, ..., K]`` (split here, no communication).
        weight: ``[N, K/t]`` frozen base weight shard, x's dtype.
        lora_a: ``[r, K/t]`` LoRA A shard (fp32 or x's dtype).
        lora_b: ``[N, r]`` LoRA B, replicated (fp32 or x's dtype).
        bias: optional ``[N]`` frozen bias, added once after the reduction.
        scale: s = alpha/r (or alpha/sqrt(r)); a real number within fp32's range.
        dropout_p: LoRA dropout probability in [0, 1) (pass 0 in eval mode).
        seed: dropout seed; None draws one by ``tplora_kernels.rng``'s rule.
        sequence_parallel: reduce-scatter the output along dim 0 (S must divide by t).
        input_is_parallel: x is already this rank's K/t slice.
        group: the base layer's tensor-parallel group.
        backend: as ``column_parallel_lora``.
        output_dtype: the output's dtype (None: x's); the reduction then runs in it.
        explicit_comm: the base layer does no TP communication (an MoE expert under expert TP,
            whose token dispatcher reduces the output): y stays a partial sum and u gets one
            all-reduce over ``group``.
        mix: several adapters in one batch, as ``column_parallel_lora`` (``lora_a`` ``[Σr, K/t]``,
            ``lora_b`` ``[N, Σr]``).
        magnitude, norm: DoRA (``parallel_lora``): the replicated ``[N]`` magnitude and this rank's
            norm parts (``weight_sq`` summed, ``lora_sq`` partial).

    Returns:
        ``[S, ..., N]``; under SP ``[S/t, ..., N]``.

    Example (one rank: the full input; with t ranks each passes its K/t slice of x, W and A):
        >>> y = row_parallel_lora(torch.randn(3, 2, 8), torch.randn(5, 8), torch.randn(2, 8), torch.zeros(5, 2),
        ...                       bias=torch.zeros(5), scale=0.5, dropout_p=0.1, seed=7)
        >>> tuple(y.shape)
        (3, 2, 5)
    """
    mode = TPMode.build("row", group=group, sequence_parallel=sequence_parallel, input_is_parallel=input_is_parallel,
                        explicit_comm=explicit_comm, output_dtype=output_dtype)
    return parallel_lora(x, weight, lora_a, lora_b, mode, bias=bias, scale=scale, dropout_p=dropout_p, seed=seed,
                         backend=backend, mix=mix, magnitude=magnitude, norm=norm).output


def parallel_linear(x: torch.Tensor, weight: torch.Tensor, mode: TPMode | None = None, *, kind: str | None = None,
                    bias: torch.Tensor | None = None, sequence_parallel: bool = False, gather_output: bool = False,
                    input_is_parallel: bool = True, group: dist.ProcessGroup | None = None,
                    output_dtype: torch.dtype | None = None, explicit_comm: bool = False) -> torch.Tensor:
    """The frozen base layer alone (no adapter), with the base layer's own collectives.

    What the modules run while adapters are disabled or merged. Validated like the LoRA calls.

    Args:
        x, weight, bias: as ``column_parallel_lora`` / ``row_parallel_lora``.
        mode: the layer's ``TPMode``; or, instead, ``kind`` (``"column"``/``"row"``) and the flags
            ``sequence_parallel``, ``gather_output`` (column), ``input_is_parallel`` (row),
            ``group``, ``output_dtype``, ``explicit_comm`` (no collective: an MoE expert layer).

    Returns:
        The base layer's output, shaped as the LoRA call's.

    Example:
        >>> parallel_linear(torch.randn(4, 2, 32), torch.randn(16, 32), kind="column").shape
        torch.Size([4, 2, 16])
    """
    if mode is None:
        if kind is None:
            raise TypeError("parallel_linear needs mode= or kind=")
        mode = TPMode.build(kind, group=group, sequence_parallel=sequence_parallel, gather_output=gather_output,
                            input_is_parallel=input_is_parallel, explicit_comm=explicit_comm,
                            output_dtype=output_dtype)
    _check_tensor("x", x)
    _check_tensor("weight", weight, dims=2)
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} must match the base weight's dtype {weight.dtype}")
    _check_mode(mode, x, weight, bias)
    y = base_parallel_linear(x, weight, mode, bias=bias)
    return y if mode.output_dtype is None else y.to(mode.output_dtype)
