"""``ColumnParallelLoRA`` and ``RowParallelLoRA``: thin modules around megatron-core layers.

A module reads its mode (sequence_parallel, gather_output / input_is_parallel, skip_bias_add,
tp_group) from the wrapped base layer, freezes the base, owns the LoRA factors in PEFT's layout
(``lora_A[adapter].weight``, ``lora_B[adapter].weight``) and calls the functional API. It never
calls the base layer's forward: megatron-core's gather and SP paths need CUDA.

Shard layout (the full A is ``[r, K]``, the full B ``[N, r]``):

==========  =========================  =========================
base        lora_A[adapter].weight     lora_B[adapter].weight
==========  =========================  =========================
column      ``[r, K]`` replicated      ``[N/t, r]`` rows of B
row         ``[r, K/t]`` cols of A     ``[N, r]`` replicated
==========  =========================  =========================

Sharded factors carry Megatron's ``tensor_model_parallel``/``partition_dim``/
``partition_stride``; under sequence parallelism the replicated factor carries
``sequence_parallel = True`` so that ``finalize_model_grads`` (or
``distributed.sum_sequence_parallel_grads``) sums its per-rank partial gradient. Those
attributes survive a re-assignment of the factor (``LoRAFactor.weight = new``), which PEFT does
when it up-casts adapters to fp32.

Adapters follow PEFT's LoraLayer vocabulary (``add_adapter``/``update_layer``, ``set_adapter``,
``delete_adapter``, ``enable_adapters``, ``merge``/``unmerge``/``get_delta_weight``), so that
``tplora_kernels.peft`` only has to add PEFT's base class. The fused kernels apply one adapter
per call, so at most one adapter is active.

``sharded_state_dict`` follows megatron-core's dist_checkpointing convention. The base layer's
keys stay those of the unwrapped Megatron layer (``{prefix}weight``, ``{prefix}bias``), so a
checkpoint of the base model loads into the adapted one unchanged; the factors add
``{prefix}lora_A.<adapter>.weight`` and ``{prefix}lora_B.<adapter>.weight``, sharded like the
layer's weight on the side that is sharded and marked as TP replicas on the other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from . import distributed as D
from ._backend import resolve_backend
from .functional import column_parallel_lora, parallel_linear, row_parallel_lora

__all__ = ["ColumnParallelLoRA", "LoRAFactor", "RowParallelLoRA", "init_full_factors"]

# Attributes Megatron reads from a parameter (TP layout, SP gradient sum, DDP grouping).
_MEGATRON_PARAM_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
                         "allreduce")

_INITS = (True, False, "gaussian")
# Megatron options whose communication pattern these modules do not reproduce.
_UNSUPPORTED_BASE_FLAGS = ("is_expert", "explicit_expert_comm", "disable_grad_reduce")


class LoRAFactor(nn.Module):
    """Holder of one LoRA factor, so state-dict keys read ``lora_A.<adapter>.weight`` as in PEFT.

    Re-assigning ``weight`` (PEFT's fp32 up-cast does) carries Megatron's parameter attributes
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``, ``sequence_parallel``,
    ``allreduce``) over to the new Parameter.

    Args:
        weight: the (local shard of the) factor, ``[r, K]``/``[r, K/t]`` for A, ``[N, r]``/``[N/t, r]`` for B.

    Example:
        >>> f = LoRAFactor(torch.zeros(2, 4))
        >>> f.weight.tensor_model_parallel = True
        >>> f.weight = torch.nn.Parameter(torch.zeros(2, 4, dtype=torch.float64))
        >>> f.weight.tensor_model_parallel
        True
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        # Keep the Parameter object itself: it carries Megatron's TP/SP attributes.
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)

    def __setattr__(self, name: str, value) -> None:
        # A re-assigned factor (PEFT's fp32 up-cast builds a new Parameter) keeps Megatron's
        # TP/SP attributes: losing them would silently break grad reduction and checkpoints.
        old = self.__dict__.get("_parameters", {}).get("weight") if name == "weight" else None
        if old is not None and isinstance(value, torch.Tensor) and value is not old:
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=old.requires_grad)
            for attr in _MEGATRON_PARAM_ATTRS:
                if hasattr(old, attr) and not hasattr(value, attr):
                    setattr(value, attr, getattr(old, attr))
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


def init_full_factors(r: int, in_features: int, out_features: int,
                      init: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the **full** A ``[r, K]`` and B ``[N, r]`` on CPU from torch's default generator.

    Every TP rank draws the same full matrices (Megatron seeds the CPU generator alike on all TP
    ranks) and keeps its slice, so the model at TP=4 is the model at TP=1, and A's spread does
    not grow with the TP size.

    Args:
        r: LoRA rank.
        in_features: K of the full layer.
        out_features: N of the full layer.
        init: True (kaiming-uniform A as nn.Linear, B = 0), ``"gaussian"`` (A ~ N(0, 1/r²) as
            PEFT, B = 0) or False (both kaiming-uniform: a non-identity adapter, for tests).

    Returns:
        ``(A [r, K], B [N, r])`` in fp32 on CPU.

    Example:
        >>> a, b = init_full_factors(4, 16, 8, True)
        >>> a.shape, b.shape, bool(b.abs().sum() == 0)
        (torch.Size([4, 16]), torch.Size([8, 4]), True)
    """
    a = torch.empty(r, in_features)
    b = torch.zeros(out_features, r)
    if init == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return a, b


class _ParallelLoRA(nn.Module):
    """Shared adapter bookkeeping of the two modules (PEFT's LoraLayer vocabulary)."""

    kind: str = ""
    _base_types: tuple[str, ...] = ()
    # Which dimension of each factor is sharded over TP (None: replicated).
    lora_shard_dims: ClassVar[dict[str, int | None]] = {}

    def __init__(self, base_layer: nn.Module, *, r: int, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, adapter_name: str = "default",
                 lora_dtype: torch.dtype | None = None, backend: str | None = None) -> None:
        super().__init__()
        self._check_base(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.tp_group = base_layer.tp_group
        self.tp_size = D.group_size(self.tp_group)
        self.tp_rank = D.group_rank(self.tp_group)
        self.sequence_parallel = bool(getattr(base_layer, "sequence_parallel", False)) and self.tp_size > 1
        self.skip_bias_add = bool(base_layer.skip_bias_add)
        self.in_features = base_layer.input_size
        self.out_features = base_layer.output_size
        self.backend = backend
        self.lora_dtype = lora_dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.last_backend: str | None = None
        self._create_adapter(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             init_lora_weights=init_lora_weights, use_rslora=use_rslora)
        self.set_adapter(adapter_name)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def _check_base(cls, base_layer: nn.Module) -> None:
        names = {t.__name__ for t in type(base_layer).__mro__}
        if not names & set(cls._base_types):
            raise TypeError(f"{cls.__name__} wraps a megatron-core {' or '.join(cls._base_types)}, "
                            f"got {type(base_layer).__name__}")
        bad = [f for f in _UNSUPPORTED_BASE_FLAGS if getattr(base_layer, f, False)]
        if bad:
            raise ValueError(f"{cls.__name__} does not support base layers with {', '.join(bad)}=True")
        if getattr(base_layer, "weight", None) is None:
            raise ValueError(f"{cls.__name__} needs a base layer that owns its weight "
                             "(skip_weight_param_allocation=True is not supported)")

    def _shard(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _mark(self, a: nn.Parameter, b: nn.Parameter) -> None:
        raise NotImplementedError

    def _create_adapter(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                        init_lora_weights: bool | str = True, use_rslora: bool = False) -> None:
        # The one place that builds an adapter. ``update_layer`` and ``add_adapter`` are its
        # public faces; the PEFT subclass overrides ``update_layer`` with PEFT's signature.
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not (
                math.isfinite(lora_dropout) and 0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in _INITS or not isinstance(init_lora_weights, (bool, str)):
            raise ValueError(f"init_lora_weights must be one of {_INITS}, got {init_lora_weights!r}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before replacing it")
        weight = self.base_layer.weight
        full_a, full_b = init_full_factors(r, self.in_features, self.out_features, init_lora_weights)
        a, b = self._shard(full_a, full_b)
        dtype = self.lora_dtype or weight.dtype
        pa = nn.Parameter(a.to(device=weight.device, dtype=dtype).contiguous())
        pb = nn.Parameter(b.to(device=weight.device, dtype=dtype).contiguous())
        self._mark(pa, pb)
        trainable = self._active_adapter in (None, adapter_name) and not self._disable_adapters
        pa.requires_grad_(trainable)
        pb.requires_grad_(trainable)
        self.lora_A[adapter_name] = LoRAFactor(pa)
        self.lora_B[adapter_name] = LoRAFactor(pb)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(lora_alpha)
        self.scaling[adapter_name] = float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = bool(use_rslora)

    def update_layer(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False) -> None:
        """Create (or replace) adapter ``adapter_name``; the active adapter does not change.

        The full factors are drawn from torch's default CPU generator and sliced, so the result
        does not depend on the TP size. A new adapter that is not the active one is frozen.

        Args:
            adapter_name: key in ``lora_A`` / ``lora_B``.
            r: rank (>= 1).
            lora_alpha: alpha (finite).
            lora_dropout: dropout probability in [0, 1).
            init_lora_weights: True, False or ``"gaussian"`` (see ``init_full_factors``).
            use_rslora: scale by alpha/sqrt(r) instead of alpha/r.

        Example:
            >>> # layer.update_layer("default", 16, lora_alpha=32)   # re-initialise "default" at r=16
        """
        self._create_adapter(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             init_lora_weights=init_lora_weights, use_rslora=use_rslora)

    def add_adapter(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                    init_lora_weights: bool | str = True, use_rslora: bool = False) -> None:
        """Add a new named adapter beside the existing ones (it stays inactive and frozen).

        Args: as ``update_layer``.

        Raises:
            ValueError: ``adapter_name`` already exists (use ``update_layer`` to replace it).

        Example:
            >>> # layer.add_adapter("math", 8, lora_alpha=16); layer.set_adapter("math")
        """
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter_name {adapter_name!r} already exists on this layer "
                             f"({sorted(self.lora_A)}); use update_layer() to replace it")
        self._create_adapter(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             init_lora_weights=init_lora_weights, use_rslora=use_rslora)

    def load_full_factors(self, adapter_name: str, full_a: torch.Tensor, full_b: torch.Tensor) -> None:
        """Copy this rank's slices of the **full** A ``[r, K]`` and B ``[N, r]`` into ``adapter_name``.

        No communication: every rank passes the same full tensors and keeps its own slice.

        Args:
            adapter_name: an existing adapter whose rank equals ``full_a.shape[0]``.
            full_a: ``[r, K]``. full_b: ``[N, r]`` (any float dtype/device; copied and cast).

        Example:
            >>> # a, b = init_full_factors(8, layer.in_features, layer.out_features, False)
            >>> # layer.load_full_factors("default", a, b)
        """
        self._check_adapter(adapter_name)
        r = self.r[adapter_name]
        want_a, want_b = (r, self.in_features), (self.out_features, r)
        if tuple(full_a.shape) != want_a or tuple(full_b.shape) != want_b:
            raise ValueError(f"full_a/full_b must be [r, K]={list(want_a)} and [N, r]={list(want_b)} for adapter "
                             f"{adapter_name!r}, got {list(full_a.shape)} and {list(full_b.shape)}")
        a, b = self._shard(full_a, full_b)
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(a)
            self.lora_B[adapter_name].weight.copy_(b)

    # -- adapters ----------------------------------------------------------------------------
    def _check_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; this layer has {sorted(self.lora_A)}")

    @property
    def active_adapter(self) -> str | None:
        """The active adapter's name (None once every adapter is deleted)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter names (at most one: the fused kernels apply one adapter per call)."""
        return [] if self._active_adapter is None else [self._active_adapter]

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` (one name, or a one-element list) the active adapter.

        Its factors become trainable (unless ``inference_mode``); every other adapter is frozen.
        A merged adapter is unmerged first, as PEFT's model-level ``set_adapter`` does.

        Args:
            adapter_names: the adapter to activate.
            inference_mode: keep the activated adapter frozen.

        Example:
            >>> # layer.set_adapter("math")
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"adapter_names must name exactly one adapter (the fused kernels apply one at a "
                             f"time), got {names}")
        self._check_adapter(names[0])
        if self.merged and names[0] != self._active_adapter:
            warnings.warn(f"set_adapter({names[0]!r}) on a merged layer: unmerging {self.merged_adapters} first",
                          stacklevel=2)
            self.unmerge()
        self._active_adapter = names[0]
        for n in self.lora_A:
            flag = n == names[0] and not inference_mode
            self.lora_A[n].weight.requires_grad_(flag)
            self.lora_B[n].weight.requires_grad_(flag)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (unmerging first if merged).

        Deleting the active adapter activates the first remaining one in sorted order, the same
        on every layer (PEFT's rule), or none if it was the last.
        """
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for d in (self.lora_A, self.lora_B):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora):
            d.pop(adapter_name)
        if self._active_adapter == adapter_name:
            self._active_adapter = None
            if self.lora_A:
                self.set_adapter(sorted(self.lora_A)[0])

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are disabled (forward runs the base layer alone)."""
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (True) or disable (False) the adapters without touching their values.

        As in PEFT, disabling freezes every factor and enabling makes the active one trainable
        again.

        Example:
            >>> # layer.enable_adapters(False); y_base, _ = layer(x); layer.enable_adapters(True)
        """
        if enabled:
            self._disable_adapters = False
            if self._active_adapter is not None:
                self.set_adapter(self._active_adapter)
        else:
            for d in (self.lora_A, self.lora_B):
                for f in d.values():
                    f.weight.requires_grad_(False)
            self._disable_adapters = True

    @property
    def merged(self) -> bool:
        """True while at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    # -- merge -------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """This rank's ``s · (B A)`` shard, the same shape and dtype as the base weight. TP-local.

        Returns:
            column ``[N/t, K]`` (``s·B_i A``), row ``[N, K/t]`` (``s·B A_i``).

        Example:
            >>> # layer.base_layer.weight + layer.get_delta_weight("default")  # the merged shard
        """
        self._check_adapter(adapter)
        a = self.lora_A[adapter].weight.detach().float()
        b = self.lora_B[adapter].weight.detach().float()
        return (b @ a).mul_(self.scaling[adapter]).to(self.base_layer.weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' deltas into the base weight shard. TP-local.

        Args:
            safe_merge: check the merged weight for inf/NaN before writing it (raises ValueError).
            adapter_names: adapters to merge (default: the active one).

        Example:
            >>> # layer.merge(); y, _ = layer(x)   # base-only kernel, same output
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_adapter(name)
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again is skipped", stacklevel=2)
                continue
            delta = self.get_delta_weight(name)
            with torch.no_grad():
                if safe_merge:
                    merged = self.base_layer.weight + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"safe_merge: merging adapter {name!r} gives a non-finite weight on TP "
                                         f"rank {self.tp_rank}; the adapter is broken")
                    self.base_layer.weight.copy_(merged)
                else:
                    self.base_layer.weight.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again (exact up to rounding in the weight dtype). TP-local."""
        if not self.merged_adapters:
            warnings.warn("unmerge() called but no adapter is merged; nothing to do", stacklevel=2)
            return
        with torch.no_grad():
            while self.merged_adapters:
                self.base_layer.weight.sub_(self.get_delta_weight(self.merged_adapters.pop()))

    # -- checkpointing -----------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None,
                           *, include_base: bool = True) -> dict:
        """megatron-core dist_checkpointing view of this layer: the base layer's, plus every factor.

        Dict keys are this module's ``state_dict`` keys, so ``load_state_dict`` takes what
        ``dist_checkpointing.load`` returns. The base layer's ShardedTensors keep the unwrapped
        layer's checkpoint keys (``{prefix}weight``), so a checkpoint of the base model loads into
        the adapted one. A sharded factor is split over TP along its ``partition_dim`` (as the
        layer's weight); a replicated one is a TP replica (``replica_id = (0, tp_rank, dp_rank)``).
        So an adapter saved at one TP size loads at any other.

        Args:
            prefix: key prefix (Megatron passes ``"<module path>."``).
            sharded_offsets: offsets prepended by enclosing modules (e.g. stacked layers).
            metadata: Megatron's metadata dict. Its ``"dp_cp_group"`` picks the main replica;
                without one, megatron's parallel_state is used when initialised, else there are
                taken to be no data-parallel replicas.
            include_base: also return the base layer's entries (False: adapters only).

        Returns:
            ``{state-dict key: ShardedTensor | ShardedObject}``: ``{prefix}base_layer.weight``
            (checkpoint key ``{prefix}weight``), the bias likewise, and
            ``{prefix}lora_A.<adapter>.weight`` (global shape ``[r, K]``) and
            ``{prefix}lora_B.<adapter>.weight`` (``[N, r]``) for every adapter.

        Example:
            >>> # from megatron.core import dist_checkpointing
            >>> # dist_checkpointing.save(layer.sharded_state_dict(), ckpt_dir)          # at one TP size
            >>> # sd = dist_checkpointing.load(layer.sharded_state_dict(), ckpt_dir)     # at another
            >>> # layer.load_state_dict(sd)
        """
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        meta = dict(metadata or {})
        if meta.get("dp_cp_group") is None:
            meta["dp_cp_group"] = _default_dp_cp_group()
        dp = meta["dp_cp_group"]
        out = {}
        if include_base:
            base = self.base_layer.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=meta)
            out.update({f"{prefix}base_layer.{k[len(prefix):]}": v for k, v in base.items()})
        for which, factors in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            axis = self.lora_shard_dims[which]
            for name, factor in factors.items():
                key = f"{prefix}{which}.{name}.weight"
                if axis is None:
                    out[key] = make_sharded_tensor_for_checkpoint(factor.weight, key, prepend_offsets=sharded_offsets,
                                                                  tp_group=self.tp_group, dp_cp_group=dp)
                else:
                    out[key] = make_tp_sharded_tensor_for_checkpoint(factor.weight, key, tp_axis=axis,
                                                                     prepend_offsets=sharded_offsets,
                                                                     tp_group=self.tp_group, dp_cp_group=dp)
        return out

    # -- forward -----------------------------------------------------------------------------
    def _lora_args(self, x: torch.Tensor) -> dict | None:
        if self._disable_adapters or self.merged or self._active_adapter is None:
            return None
        name = self._active_adapter
        return dict(lora_a=self.lora_A[name].weight, lora_b=self.lora_B[name].weight, scale=self.scaling[name],
                    dropout_p=self.lora_dropout[name] if self.training else 0.0, backend=self.backend)

    def _split_bias(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return out, (self.base_layer.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"tp_size={self.tp_size}, sequence_parallel={self.sequence_parallel}, "
                f"adapters={ {n: self.r[n] for n in self.r} }, active={self._active_adapter!r}")


def _default_dp_cp_group():
    """Megatron's data(+context)-parallel group when parallel_state is initialised, else None."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


class ColumnParallelLoRA(_ParallelLoRA):
    """LoRA around a megatron-core ``ColumnParallelLinear``, fused, adding no collective.

    Args:
        base_layer: the ``ColumnParallelLinear`` (or subclass); its parameters get frozen.
        r: LoRA rank.
        lora_alpha: scale numerator (s = alpha/r, or alpha/sqrt(r) with ``use_rslora``).
        lora_dropout: dropout on the LoRA input in training mode, generated in-kernel.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True, False or ``"gaussian"``.
        adapter_name: the first adapter's name.
        lora_dtype: LoRA parameter dtype (default: the base weight's).
        backend: kernel backend (default: ``TPLORA_BACKEND`` or automatic).

    Shapes:
        ``forward(x)``: x ``[s, b, K]`` (``[s/t, b, K]`` under SP; any leading dims) ->
        ``(y [s, b, N/t] (or [s, b, N] when gathering), bias or None)``, as the base layer.

    Example:
        >>> # inside an initialised TP group, with `lin` a megatron ColumnParallelLinear:
        >>> # layer = ColumnParallelLoRA(lin, r=16, lora_alpha=32, lora_dropout=0.1)
        >>> # y, bias = layer(x)
    """

    kind = "column"
    _base_types = ("ColumnParallelLinear",)
    lora_shard_dims: ClassVar[dict[str, int | None]] = {"lora_A": None, "lora_B": 0}

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.gather_output = bool(base_layer.gather_output)

    def _shard(self, a, b):
        n = self.out_features // self.tp_size
        return a, b[self.tp_rank * n:(self.tp_rank + 1) * n]

    def _mark(self, a, b):
        b.tensor_model_parallel, b.partition_dim, b.partition_stride = True, 0, 1
        a.tensor_model_parallel = False
        if self.sequence_parallel:
            a.sequence_parallel = True

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args: x ``[s, b, K]``; weight: unsupported (must be None); runtime_gather_output: override.

        Returns: ``(output, bias)`` exactly as ``ColumnParallelLinear.forward``.
        """
        if weight is not None:
            raise ValueError("ColumnParallelLoRA.forward does not take a weight override; pass weight=None")
        gather = self.gather_output if runtime_gather_output is None else bool(runtime_gather_output)
        base = self.base_layer
        bias = None if self.skip_bias_add else base.bias
        lora = self._lora_args(x)
        common = dict(bias=bias, sequence_parallel=self.sequence_parallel, gather_output=gather, group=self.tp_group)
        if lora is None:
            self.last_backend = "torch"
            out = parallel_linear(x, base.weight, kind="column", **common)
        else:
            out = column_parallel_lora(x, base.weight, **lora, **common)
            self.last_backend = resolve_backend(x.device, self.backend)
        return self._split_bias(out)


class RowParallelLoRA(_ParallelLoRA):
    """LoRA around a megatron-core ``RowParallelLinear``, fused, adding no collective.

    Args: as ``ColumnParallelLoRA``.

    Shapes:
        ``forward(x)``: x ``[s, b, K/t]`` (input_is_parallel) or ``[s, b, K]`` ->
        ``(y [s, b, N] (``[s/t, b, N]`` under SP), bias or None)``, as the base layer.

    Example:
        >>> # layer = RowParallelLoRA(row_linear, r=16, lora_alpha=32)
        >>> # y, bias = layer(x)
    """

    kind = "row"
    _base_types = ("RowParallelLinear",)
    lora_shard_dims: ClassVar[dict[str, int | None]] = {"lora_A": 1, "lora_B": None}

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__(base_layer, **kwargs)
        self.input_is_parallel = bool(base_layer.input_is_parallel)

    def _shard(self, a, b):
        k = self.in_features // self.tp_size
        return a[:, self.tp_rank * k:(self.tp_rank + 1) * k], b

    def _mark(self, a, b):
        a.tensor_model_parallel, a.partition_dim, a.partition_stride = True, 1, 1
        b.tensor_model_parallel = False
        if self.sequence_parallel:
            b.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args: x ``[s, b, K/t]`` or ``[s, b, K]``. Returns ``(output, bias)`` as ``RowParallelLinear``."""
        base = self.base_layer
        bias = None if self.skip_bias_add else base.bias
        lora = self._lora_args(x)
        common = dict(bias=bias, sequence_parallel=self.sequence_parallel, input_is_parallel=self.input_is_parallel,
                      group=self.tp_group)
        if lora is None:
            self.last_backend = "torch"
            out = parallel_linear(x, base.weight, kind="row", **common)
        else:
            out = row_parallel_lora(x, base.weight, **lora, **common)
            self.last_backend = resolve_backend(x.device, self.backend)
        return self._split_bias(out)
