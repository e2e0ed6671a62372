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
``distributed.sum_sequence_parallel_grads``) sums its per-rank partial gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import distributed as D
from ._backend import resolve_backend
from .functional import column_parallel_lora, parallel_linear, row_parallel_lora

__all__ = ["ColumnParallelLoRA", "LoRAFactor", "RowParallelLoRA", "init_full_factors"]

_INITS = (True, False, "gaussian")
# Megatron options whose communication pattern these modules do not reproduce.
_UNSUPPORTED_BASE_FLAGS = ("is_expert", "explicit_expert_comm", "disable_grad_reduce")


class LoRAFactor(nn.Module):
    """Holder of one LoRA factor, so state-dict keys read ``lora_A.<adapter>.weight`` as in PEFT.

    Args:
        weight: the (local shard of the) factor.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        # Keep the Parameter object itself: it carries Megatron's TP/SP attributes.
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)

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
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self._disabled = False
        self.last_backend: str | None = None
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora)
        self.active_adapter = adapter_name

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

    def update_layer(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False) -> None:
        """Create (or replace) adapter ``adapter_name``.

        Args:
            adapter_name: key in ``lora_A`` / ``lora_B``.
            r: rank (>= 1).
            lora_alpha: alpha (finite).
            lora_dropout: dropout probability in [0, 1).
            init_lora_weights: True, False or ``"gaussian"`` (see ``init_full_factors``).
            use_rslora: scale by alpha/sqrt(r) instead of alpha/r.
        """
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
        weight = self.base_layer.weight
        full_a, full_b = init_full_factors(r, self.in_features, self.out_features, init_lora_weights)
        a, b = self._shard(full_a, full_b)
        dtype = self.lora_dtype or weight.dtype
        pa = nn.Parameter(a.to(device=weight.device, dtype=dtype).contiguous())
        pb = nn.Parameter(b.to(device=weight.device, dtype=dtype).contiguous())
        self._mark(pa, pb)
        self.lora_A[adapter_name] = LoRAFactor(pa)
        self.lora_B[adapter_name] = LoRAFactor(pb)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(lora_alpha)
        self.scaling[adapter_name] = float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(lora_dropout)

    # -- adapters ----------------------------------------------------------------------------
    def _check_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; this layer has {sorted(self.lora_A)}")

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter names (at most one: the fused kernels apply one adapter per call)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make ``adapter_names`` (one name, or a one-element list) the active adapter."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"exactly one adapter can be active at a time, got {names}")
        self._check_adapter(names[0])
        self.active_adapter = names[0]
        for n in self.lora_A:
            flag = n == names[0]
            self.lora_A[n].weight.requires_grad_(flag)
            self.lora_B[n].weight.requires_grad_(flag)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (unmerging it first if merged)."""
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for d in (self.lora_A, self.lora_B):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            d.pop(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.lora_A), None)

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are disabled (forward runs the base layer alone)."""
        return self._disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (True) or disable (False) the adapters without touching their weights."""
        self._disabled = not enabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # -- merge -------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """This rank's ``s · (B A)`` shard, the same shape and dtype as the base weight. TP-local.

        Returns:
            column ``[N/t, K]`` (``s·B_i A``), row ``[N, K/t]`` (``s·B A_i``).
        """
        self._check_adapter(adapter)
        a = self.lora_A[adapter].weight.detach().float()
        b = self.lora_B[adapter].weight.detach().float()
        return (b @ a).mul_(self.scaling[adapter]).to(self.base_layer.weight.dtype)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapter's delta into the base weight shard, with no collective."""
        names = adapter_names or self.active_adapters
        for name in names:
            self._check_adapter(name)
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again is skipped", stacklevel=2)
                continue
            with torch.no_grad():
                self.base_layer.weight.add_(self.get_delta_weight(name))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again (exact up to rounding in the weight dtype)."""
        if not self.merged_adapters:
            warnings.warn("unmerge() called but no adapter is merged; nothing to do", stacklevel=2)
            return
        with torch.no_grad():
            while self.merged_adapters:
                self.base_layer.weight.sub_(self.get_delta_weight(self.merged_adapters.pop()))

    # -- forward -----------------------------------------------------------------------------
    def _lora_args(self, x: torch.Tensor) -> dict | None:
        if self._disabled or self.merged or self.active_adapter is None:
            return None
        name = self.active_adapter
        return dict(lora_a=self.lora_A[name].weight, lora_b=self.lora_B[name].weight, scale=self.scaling[name],
                    dropout_p=self.lora_dropout[name] if self.training else 0.0, backend=self.backend)

    def _split_bias(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return out, (self.base_layer.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"tp_size={self.tp_size}, sequence_parallel={self.sequence_parallel}, "
                f"adapters={ {n: self.r[n] for n in self.r} }, active={self.active_adapter!r}")


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
