"""Functional API: ``column_parallel_lora`` and ``row_parallel_lora``.

These validate every argument *before* any collective, from what every rank sees alike
(shapes, dtypes, devices, options), so a bad call raises the same error on every rank and no rank
is left waiting in a collective. Then they flatten the leading dimensions into rows, resolve the
backend and the dropout seed once (``backends``, ``rng``), and call the autograd Functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import distributed as D
from .autograd import Plan, _ColumnParallelLoRAFn, _RowParallelLoRAFn
from .config import check_dropout, check_scale
from .mappings import base_parallel_linear
from .mask import dropout_threshold
from .multi import AdapterMix
from .ops.registry import Backend
from .ops.select import get_backend
from .rng import SeedLike, check_seed, draw_seed, resolve_seed

__all__ = ["column_parallel_lora", "draw_seed", "parallel_linear", "row_parallel_lora"]

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t, *, dims: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in _ACT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of float32, float16, bfloat16, got {out_dtype!r}")


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


def _explicit(explicit_comm, sequence_parallel, extra_collective: bool) -> bool:
    if explicit_comm and (sequence_parallel or extra_collective):
        raise ValueError("explicit_comm (an MoE expert layer whose token dispatcher communicates) excludes "
                         "sequence_parallel, gather_output and a non-parallel row input")
    return bool(explicit_comm)


def _column(x, weight, lora_a, lora_b, *, bias, scale, dropout_p, seed, sequence_parallel, gather_output, group,
            backend, out_dtype, explicit_comm=False, mix=None) -> tuple[torch.Tensor, Plan]:
    scale, thr = _validate(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    _check_out_dtype(out_dtype)
    K = weight.shape[1]
    _lead(x, K, "the layer's input size")
    if lora_a.shape[1] != K or lora_b.shape[0] != weight.shape[0]:
        raise ValueError(f"column-parallel LoRA expects lora_a [r, {K}] and lora_b [{weight.shape[0]}, r], "
                         f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    world, rank = D.group_size(group), D.group_rank(group)
    sp = bool(sequence_parallel) and world > 1
    explicit = _explicit(explicit_comm, sp, bool(gather_output) and world > 1)
    if sp and x.dim() < 2:
        raise ValueError(f"sequence_parallel needs x with a sequence dimension, got shape {tuple(x.shape)}")
    if mix is not None:
        _check_mix(mix, x, lora_a, scale, thr, world if sp else 1)
        thr = mix.max_thr
    T = x.numel() // K * (world if sp else 1)
    be = get_backend(x.device, backend, gemm=(x.dtype, lora_a.dtype, weight.shape[0], K, lora_a.shape[0], T, group))
    seed_t = resolve_seed(seed, x.device) if thr else None
    plan = Plan(group, world, rank, scale, thr, sp, be, gather_output=bool(gather_output) and world > 1,
                out_dtype=out_dtype, explicit_comm=explicit, mix=mix)
    lead = list(x.shape[:-1])
    if sp:
        lead[0] *= world
    y = _ColumnParallelLoRAFn.apply(x.reshape(-1, K), weight, bias, lora_a, lora_b, seed_t, plan)
    return y.view(*lead, y.shape[-1]), plan


def _row(x, weight, lora_a, lora_b, *, bias, scale, dropout_p, seed, sequence_parallel, input_is_parallel, group,
         backend, out_dtype, explicit_comm=False, mix=None) -> tuple[torch.Tensor, Plan]:
    scale, thr = _validate(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    _check_out_dtype(out_dtype)
    world, rank = D.group_size(group), D.group_rank(group)
    k = weight.shape[1]
    K = k if input_is_parallel else k * world
    _lead(x, K, "this rank's input slice" if input_is_parallel else "the full input size")
    if lora_a.shape[1] != k or lora_b.shape[0] != weight.shape[0]:
        raise ValueError(f"row-parallel LoRA expects lora_a [r, {k}] and lora_b [{weight.shape[0]}, r], "
                         f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    sp = bool(sequence_parallel) and world > 1
    explicit = _explicit(explicit_comm, sp, not input_is_parallel and world > 1)
    if explicit and bias is not None and world > 1:
        raise ValueError("explicit_comm: the output stays a partial sum, so the bias must be added after the "
                         "reduction (skip_bias_add=True, as megatron requires for expert layers)")
    if sp and (x.dim() < 2 or x.shape[0] % world):
        raise ValueError(f"sequence_parallel needs x's sequence dimension (dim 0) divisible by the TP size "
                         f"{world}, got x of shape {tuple(x.shape)}")
    if mix is not None:
        _check_mix(mix, x, lora_a, scale, thr, 1)
        thr = mix.max_thr
    T = x.numel() // K
    be = get_backend(x.device, backend, gemm=(x.dtype, lora_a.dtype, weight.shape[0], k, lora_a.shape[0], T, group))
    seed_t = resolve_seed(seed, x.device) if thr else None
    plan = Plan(group, world, rank, scale, thr, sp, be, input_is_parallel=bool(input_is_parallel) or world == 1,
                out_dtype=out_dtype, explicit_comm=explicit, mix=mix)
    lead = list(x.shape[:-1])
    if sp:
        lead[0] //= world
    y = _RowParallelLoRAFn.apply(x.reshape(-1, K), weight, bias, lora_a, lora_b, seed_t, plan)
    return y.view(*lead, y.shape[-1]), plan


def column_parallel_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                         seed: SeedLike = None, sequence_parallel: bool = False, gather_output: bool = False,
                         group: dist.ProcessGroup | None = None, backend: str | Backend | None = None,
                         out_dtype: torch.dtype | None = None, explicit_comm: bool = False,
                         mix: AdapterMix | None = None) -> torch.Tensor:
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
        out_dtype: the output's dtype (None: x's), as a base layer's ``output_dtype``.
        explicit_comm: the base layer does no TP communication (an MoE expert under expert TP,
            whose token dispatcher gathers x and reduces dX): dX stays a partial sum and du gets
            one all-reduce over ``group``.
        mix: several adapters in one batch (``multi.AdapterMix``, one adapter per sample of the
            batch dim of ``[s, b, K]``): ``lora_a`` ``[Σr, K]`` and ``lora_b`` ``[N/t, Σr]`` are the
            adapters' factors stacked in the mix's order; scale and dropout come from the mix.

    Returns:
        ``[S, ..., N/t]`` (``[S, ..., N]`` with gather_output), S = x.shape[0] · t under SP.

    Example:
        >>> x, w = torch.randn(4, 2, 32), torch.randn(16, 32)
        >>> a, b = torch.randn(8, 32), torch.zeros(16, 8)
        >>> column_parallel_lora(x, w, a, b, scale=2.0).shape
        torch.Size([4, 2, 16])
    """
    return _column(x, weight, lora_a, lora_b, bias=bias, scale=scale, dropout_p=dropout_p, seed=seed,
                   sequence_parallel=sequence_parallel, gather_output=gather_output, group=group, backend=backend,
                   out_dtype=out_dtype, explicit_comm=explicit_comm, mix=mix)[0]


def row_parallel_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                      seed: SeedLike = None, sequence_parallel: bool = False, input_is_parallel: bool = True,
                      group: dist.ProcessGroup | None = None, backend: str | Backend | None = None,
                      out_dtype: torch.dtype | None = None, explicit_comm: bool = False,
                      mix: AdapterMix | None = None) -> torch.Tensor:
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
        out_dtype: the output's dtype (None: x's); the reduction then runs in it.
        explicit_comm: the base layer does no TP communication (an MoE expert under expert TP,
            whose token dispatcher reduces the output): y stays a partial sum and u gets one
            all-reduce over ``group``.
        mix: several adapters in one batch, as ``column_parallel_lora`` (``lora_a`` ``[Σr, K/t]``,
            ``lora_b`` ``[N, Σr]``).

    Returns:
        ``[S, ..., N]``; under SP ``[S/t, ..., N]``.

    Example (one rank: the full input; with t ranks each passes its K/t slice of x, W and A):
        >>> y = row_parallel_lora(torch.randn(3, 2, 8), torch.randn(5, 8), torch.randn(2, 8), torch.zeros(5, 2),
        ...                       bias=torch.zeros(5), scale=0.5, dropout_p=0.1, seed=7)
        >>> tuple(y.shape)
        (3, 2, 5)
    """
    return _row(x, weight, lora_a, lora_b, bias=bias, scale=scale, dropout_p=dropout_p, seed=seed,
                sequence_parallel=sequence_parallel, input_is_parallel=input_is_parallel, group=group,
                backend=backend, out_dtype=out_dtype, explicit_comm=explicit_comm, mix=mix)[0]


def parallel_linear(x: torch.Tensor, weight: torch.Tensor, *, kind: str, bias: torch.Tensor | None = None,
                    sequence_parallel: bool = False, gather_output: bool = False, input_is_parallel: bool = True,
                    group: dist.ProcessGroup | None = None, out_dtype: torch.dtype | None = None,
                    explicit_comm: bool = False) -> torch.Tensor:
    """The frozen base layer alone (no adapter), with the base layer's own collectives.

    What the modules run while adapters are disabled or merged. Validated like the LoRA calls.

    Args:
        x, weight, bias, sequence_parallel, group: as ``column_parallel_lora`` / ``row_parallel_lora``.
        kind: ``"column"`` or ``"row"``.
        gather_output: column only. input_is_parallel: row only.
        out_dtype: the output's dtype (None: x's).
        explicit_comm: no collective (an MoE expert layer; its dispatcher communicates).

    Returns:
        The base layer's output, shaped as the LoRA call's.

    Example:
        >>> parallel_linear(torch.randn(4, 2, 32), torch.randn(16, 32), kind="column").shape
        torch.Size([4, 2, 16])
    """
    if kind not in ("column", "row"):
        raise ValueError(f"kind must be 'column' or 'row', got {kind!r}")
    _check_tensor("x", x)
    _check_tensor("weight", weight, dims=2)
    _check_out_dtype(out_dtype)
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} must match the base weight's dtype {weight.dtype}")
    world = D.group_size(group)
    k = weight.shape[1]
    K = k if kind == "column" or input_is_parallel else k * world
    _lead(x, K, "the layer's input size" if kind == "column"
          else "this rank's input slice" if input_is_parallel else "the full input size")
    if kind == "row" and sequence_parallel and world > 1 and (x.dim() < 2 or x.shape[0] % world):
        raise ValueError(f"sequence_parallel needs x's dim 0 divisible by the TP size {world}, "
                         f"got x of shape {tuple(x.shape)}")
    y = base_parallel_linear(x, weight, kind=kind, bias=bias, sequence_parallel=sequence_parallel,
                             gather_output=gather_output, input_is_parallel=input_is_parallel, group=group,
                             explicit_comm=explicit_comm)
    return y if out_dtype is None else y.to(out_dtype)
