"""Adapters of one layer: their options, factors, initialisation, registry and merging.

``AdapterOptions`` is one adapter's hyper-parameters (one value, not five dicts kept in step).
``AdapterMixin`` gives a LoRA layer PEFT's LoraLayer vocabulary (``add_adapter``/``update_layer``,
``set_adapter``, ``delete_adapter``, ``enable_adapters``, ``merge``/``unmerge``/
``get_delta_weight``) over that registry, so ``tplora_kernels.peft`` only has to add PEFT's base
class. PEFT reads ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout`` and ``use_rslora`` as
``{adapter: value}`` dicts; here they are views of the registry (writes go through).

Factors are created on every rank from the **full** A ``[r, K]`` and B ``[N, r]``, drawn from
one generator state and sliced by the layer's ``TPLayout``, so the model at TP=4 is the model at
TP=1 and A's spread does not grow with the TP size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from . import distributed as D
from .config import check_dropout, check_init, check_rank, check_scale
from .dora import BLOCK_ROWS, DoRANorm, NormCache, row_norms

__all__ = ["AdapterMixin", "AdapterOptions", "LoRAFactor", "init_full_factors"]

# Attributes Megatron reads from a parameter (TP layout, SP gradient sum, DDP grouping).
MEGATRON_PARAM_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
                        "allreduce")


@dataclass(frozen=True)
class AdapterOptions:
    """One adapter's options.

    Attributes:
        r: rank. lora_alpha: alpha. lora_dropout: dropout probability. use_rslora: scale by
        alpha/sqrt(r) instead of alpha/r. scaling: the LoRA scale s (derived unless set).
        use_dora: DoRA: a magnitude per output row (``tplora_kernels.dora``).

    Example:
        >>> AdapterOptions.build(r=8, lora_alpha=16).scaling
        2.0
    """

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    scaling: float
    use_dora: bool = False

    @classmethod
    def build(cls, r: int, lora_alpha: float = 1.0, lora_dropout: float = 0.0, use_rslora: bool = False,
              use_dora: bool = False) -> AdapterOptions:
        """Validated options; ``scaling`` from alpha and r."""
        r = check_rank("r", r)
        alpha = check_scale("lora_alpha", lora_alpha)
        return cls(r, alpha, check_dropout("lora_dropout", lora_dropout), bool(use_rslora),
                   alpha / (math.sqrt(r) if use_rslora else r), bool(use_dora))


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
            for attr in MEGATRON_PARAM_ATTRS:
                if hasattr(old, attr) and not hasattr(value, attr):
                    setattr(value, attr, getattr(old, attr))
        super().__setattr__(name, value)

    def forward(self) -> torch.Tensor:
        """The factor itself (no copy). Read it by calling the holder, ``lora_A[name]()``.

        Hooks that fill a parameter just before its owner module runs (Megatron DDP's
        ``overlap_param_gather`` forward pre-hooks, FSDP's unshard, offloading) fire only when
        the owner is called, so every read of a factor goes through this call. No copy, no
        kernel, no host sync.

        Returns:
            ``weight``: the Parameter object itself, so Megatron's ``main_grad`` and TP/SP
            attributes come with it.
        """
        return self.weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


def init_full_factors(r: int, in_features: int, out_features: int,
                      init: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the **full** A ``[r, K]`` and B ``[N, r]`` on CPU from torch's default generator.

    Every TP rank draws the full matrices (Megatron seeds the CPU generator alike on all TP ranks;
    the layers then take group rank 0's) and keeps its slice, so the model at TP=4 is the model at
    TP=1.

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


class _OptionView(MutableMapping):
    """``{adapter: options.<field>}`` over the registry: what PEFT reads (and ``set_scale`` writes)."""

    def __init__(self, options: dict[str, AdapterOptions], field: str) -> None:
        self._options, self._field = options, field

    def __getitem__(self, name: str):
        return getattr(self._options[name], self._field)

    def __setitem__(self, name: str, value) -> None:
        self._options[name] = replace(self._options[name], **{self._field: value})

    def __delitem__(self, name: str) -> None:
        # The adapter itself is removed by delete_adapter(); PEFT's generic clean-up may come after.
        self._options.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def __repr__(self) -> str:
        return repr(dict(self))


class AdapterMixin:
    """The adapter registry and merging of a LoRA layer (PEFT's LoraLayer vocabulary).

    The host module (a ``torch.nn.Module`` after this mixin in its bases) provides ``self.spec`` (a
    ``base.BaseSpec``), ``self.base_layer`` and ``self.lora_dtype``; ``__init__`` sets up the empty
    registry.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        # DoRA's magnitudes, PEFT's name: lora_magnitude_vector.<adapter>.weight, [N_local] (split as B's rows).
        self.lora_magnitude_vector = nn.ModuleDict()
        self._norms: NormCache | None = None  # made on first use: the host sets self.spec after this
        self._dora_merged: dict[str, torch.Tensor] = {}  # the row scale each merged DoRA adapter applied
        self._options: dict[str, AdapterOptions] = {}
        self._active: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    # PEFT's per-adapter dicts, as views of the registry.
    r = property(lambda self: _OptionView(self._options, "r"))
    lora_alpha = property(lambda self: _OptionView(self._options, "lora_alpha"))
    scaling = property(lambda self: _OptionView(self._options, "scaling"))
    lora_dropout = property(lambda self: _OptionView(self._options, "lora_dropout"))
    use_rslora = property(lambda self: _OptionView(self._options, "use_rslora"))
    use_dora = property(lambda self: _OptionView(self._options, "use_dora"))

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter of this layer, in creation order."""
        return list(self._options)

    def adapter_options(self, name: str) -> AdapterOptions:
        """The options of adapter ``name``."""
        self._check_adapter(name)
        return self._options[name]

    # -- construction ------------------------------------------------------------------------
    def draw_adapter(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False) -> None:
        """Create (or replace) adapter ``adapter_name`` with newly drawn factors: the one path that communicates.

        Every rank draws the full factors (``init_full_factors``), then the TP group's rank 0's draw
        is broadcast (one broadcast of A and B), so a replicated factor is one tensor on every rank
        even if the ranks' generators were seeded apart; each rank keeps its slice. Every rank of
        the group must call it, layer by layer in the same order. ``add_adapter`` and
        ``update_layer`` (PEFT's name) are its faces; ``register_adapter`` takes given factors with
        no communication. A DoRA adapter's magnitude starts as ``‖W + s·B A‖`` (PEFT's), whose row
        norms a row-parallel layer sums over its TP group (one all-reduce of N values).

        Args: as ``update_layer``.

        Example:
            >>> # layer.draw_adapter("fresh", 8, lora_alpha=16)
        """
        options = AdapterOptions.build(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        init = check_init(init_lora_weights)
        self._check_replaceable(adapter_name, options)
        full_a, full_b = init_full_factors(options.r, self.spec.in_features, self.spec.out_features, init)
        like = self._factor_like()
        if like.device.type != "meta":
            # A replicated factor must be one tensor on every TP rank (its gradient is the same on
            # each, so ranks that start apart never meet): group rank 0's draw wins, in case a
            # rank's CPU generator was not seeded alike. Every rank builds its layers in order.
            full_a, full_b = full_a.to(like.device), full_b.to(like.device)
            D.broadcast_from_first_((full_a, full_b), self.spec.mode.group)
        self._install(adapter_name, options, full_a, full_b, None)

    def _check_replaceable(self, adapter_name: str, options: AdapterOptions) -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before replacing it")
        if options.use_dora:
            bad = [why for cond, why in (
                (self.spec.mode.explicit_comm or self.spec.is_expert, "an MoE expert layer (its outputs stay partial "
                                                                      "sums until the token dispatcher reduces them)"),
                (self.spec.external_weight, "a layer whose weight is passed at call time (a tied output layer)"))
                if cond]
            if bad:
                raise ValueError(f"use_dora=True is not supported on {bad[0]}: {self.spec.type_name}")

    def _install(self, adapter_name: str, options: AdapterOptions, full_a: torch.Tensor, full_b: torch.Tensor,
                 full_m: torch.Tensor | None) -> None:
        """Keep this rank's slices of the full factors (and DoRA magnitude) as adapter ``adapter_name``.

        No communication, except a new DoRA magnitude (``full_m`` None) of a row-parallel layer,
        whose norms are summed over the TP group.
        """
        like = self._factor_like()
        a, b = self.spec.layout.shard_factors(full_a, full_b, self.spec.mode.rank, self.spec.mode.world)
        dtype = self.lora_dtype or like.dtype
        # copy=True: a parameter never aliases the caller's tensor (a loaded file's, a shared A).
        pa = nn.Parameter(a.to(device=like.device, dtype=dtype, copy=True).contiguous())
        pb = nn.Parameter(b.to(device=like.device, dtype=dtype, copy=True).contiguous())
        for which, p in (("lora_A", pa), ("lora_B", pb)):
            self.spec.layout.mark(p, which, sequence_parallel=self.spec.mode.sequence_parallel,
                                  allreduce=not self.spec.is_expert)
        trainable = (not self._active or adapter_name in self._active) and not self._disable_adapters
        pa.requires_grad_(trainable)
        pb.requires_grad_(trainable)
        self.lora_A[adapter_name] = LoRAFactor(pa)
        self.lora_B[adapter_name] = LoRAFactor(pb)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if options.use_dora:
            if full_m is None:
                local_m = row_norms(self.base_layer.weight, pa.detach(), pb.detach(), options.scaling, self.spec.mode)
            else:
                local_m = self.spec.layout.lora_b.shard(full_m.reshape(-1, 1), self.spec.mode.rank,
                                                        self.spec.mode.world).reshape(-1)
            pm = nn.Parameter(local_m.to(device=like.device, dtype=dtype, copy=True))
            # The magnitude splits as B's rows: sharded with the weight's stride (column), or
            # replicated, its gradient a per-rank partial under SP (row).
            self.spec.layout.mark(pm, "lora_B", sequence_parallel=self.spec.mode.sequence_parallel)
            pm.requires_grad_(trainable)
            self.lora_magnitude_vector[adapter_name] = LoRAFactor(pm)
        self._options[adapter_name] = options
        self.norm_cache().clear(adapter_name)

    def register_adapter(self, adapter_name: str, full_a: torch.Tensor, full_b: torch.Tensor, *,
                         lora_alpha: float = 1.0, lora_dropout: float = 0.0, use_rslora: bool = False,
                         magnitude: torch.Tensor | None = None, use_dora: bool | None = None) -> None:
        """Create (or replace) adapter ``adapter_name`` from the **full** factors: local, no communication.

        Every rank of the layer's TP group passes the same full ``A [r, K]`` and ``B [N, r]`` and
        keeps its slice (the layer's layout, partition stride included). This is what the adapter
        loaders use; ``add_adapter``/``update_layer`` draw new factors instead.

        Args:
            adapter_name: the adapter's name (an existing one is replaced; it must not be merged).
            full_a: ``[r, K]``. full_b: ``[N, r]`` (any float dtype and device; copied and cast to
                the layer's LoRA dtype and device).
            lora_alpha: alpha (s = alpha/r, or alpha/sqrt(r) with ``use_rslora``).
            lora_dropout: dropout probability in [0, 1).
            use_rslora: rank-stabilised scaling.
            magnitude: DoRA's full ``[N]`` magnitude (PEFT's ``lora_magnitude_vector``); given, the
                adapter is a DoRA adapter.
            use_dora: a DoRA adapter without a given magnitude: it starts as ``‖W + s·B A‖`` (for a
                row-parallel layer that sums N values over the TP group). Default: ``magnitude is not None``.

        Raises:
            ValueError: shapes that do not fit the layer, bad options, or a merged adapter.

        Example:
            >>> # a, b = init_full_factors(8, layer.in_features, layer.out_features, False)
            >>> # layer.register_adapter("loaded", a, b, lora_alpha=16)
        """
        r = full_a.shape[0] if full_a.dim() == 2 else -1
        want_a, want_b = (r, self.spec.in_features), (self.spec.out_features, r)
        if tuple(full_a.shape) != want_a or tuple(full_b.shape) != want_b:
            raise ValueError(f"full_a/full_b must be [r, K]={list(want_a)} and [N, r]={list(want_b)} for this "
                             f"{self.spec.type_name}, got {list(full_a.shape)} and {list(full_b.shape)}")
        dora = magnitude is not None if use_dora is None else bool(use_dora)
        if magnitude is not None and (not dora or tuple(magnitude.shape) != (self.spec.out_features,)):
            raise ValueError(f"magnitude must be the full [N]={[self.spec.out_features]} DoRA magnitude of a "
                             f"use_dora adapter, got {list(magnitude.shape)} with use_dora={use_dora}")
        options = AdapterOptions.build(r, lora_alpha, lora_dropout, use_rslora, dora)
        self._check_replaceable(adapter_name, options)
        self._install(adapter_name, options, full_a.detach(), full_b.detach(),
                      None if magnitude is None else magnitude.detach())

    def norm_cache(self) -> NormCache:
        """This layer's cache of DoRA norm parts (``dora.NormCache``)."""
        if self._norms is None:
            self._norms = NormCache(self.spec.mode)
        return self._norms

    def dora_inputs(self, name: str, weight: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor) -> tuple[torch.Tensor, DoRANorm]:
        """Adapter ``name``'s magnitude (read through its holder) and this call's norm parts (cached)."""
        magnitude = self.lora_magnitude_vector[name]()
        return magnitude, self.norm_cache().parts(name, weight, lora_a, lora_b, self._options[name].scaling)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s local A and B for compute, each read by calling its holder.

        Never ``.weight``: the owner's forward pre-hook is where Megatron DDP's param all-gather,
        FSDP2's unshard and offloading run (``LoRAFactor.forward``).

        Raises:
            ValueError: a factor whose memory was freed as its holder returned it (FSDP2's
                ``fully_shard`` on a ``LoRAFactor`` with ``reshard_after_forward=True``).
        """
        out = []
        for which, holders in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            w = holders[name]()
            # FSDP2 reshards in the holder's post-forward hook, before the fused kernel reads A
            # and B together: the storage is gone by now. A size check is host metadata only.
            if w.numel() and w.untyped_storage().nbytes() == 0:
                raise ValueError(f"{which}[{name!r}] was freed as soon as its holder returned it: fully_shard() on a "
                                 "LoRAFactor needs reshard_after_forward=False (the fused kernel reads A and B after "
                                 "both holders ran); or shard the LoRA layer or an enclosing block instead")
            out.append(w)
        return out[0], out[1]

    def _factor_like(self) -> torch.Tensor:
        """A tensor whose device and dtype new factors take (the base weight, or any base parameter)."""
        w = getattr(self.base_layer, "weight", None)
        if w is not None:
            return w
        return next(iter(self.base_layer.parameters()), torch.empty(0))

    def update_layer(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False) -> None:
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
            use_dora: DoRA (``tplora_kernels.dora``): the magnitude starts at ``‖W + s·B A‖``.

        Example:
            >>> # layer.update_layer("default", 16, lora_alpha=32)   # re-initialise "default" at r=16
        """
        self.draw_adapter(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora)

    def add_adapter(self, adapter_name: str, r: int, *, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                    init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False) -> None:
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
        self.draw_adapter(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora)

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
        r = self._options[adapter_name].r
        want_a, want_b = (r, self.spec.in_features), (self.spec.out_features, r)
        if tuple(full_a.shape) != want_a or tuple(full_b.shape) != want_b:
            raise ValueError(f"full_a/full_b must be [r, K]={list(want_a)} and [N, r]={list(want_b)} for adapter "
                             f"{adapter_name!r}, got {list(full_a.shape)} and {list(full_b.shape)}")
        a, b = self.spec.layout.shard_factors(full_a, full_b, self.spec.mode.rank, self.spec.mode.world)
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(a)
            self.lora_B[adapter_name].weight.copy_(b)

    # -- registry ------------------------------------------------------------------------------
    def _check_adapter(self, name: str) -> None:
        if name not in self._options:
            raise ValueError(f"unknown adapter {name!r}; this layer has {sorted(self._options)}")

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name; a list when several are active (PEFT's convention); None if none."""
        if len(self._active) == 1:
            return self._active[0]
        return list(self._active) or None

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter names. One drives a plain forward; several train together in mixed batches."""
        return list(self._active)

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` (one name, or several) the active adapters.

        Their factors become trainable (unless ``inference_mode``); every other adapter is frozen.
        A plain forward applies the one active adapter; with several active, each sample must name
        its adapter (``multi``: ``set_batch_adapters`` or ``adapter_names=``). A merged adapter is
        unmerged first, as PEFT's model-level ``set_adapter`` does.

        Args:
            adapter_names: the adapter(s) to activate.
            inference_mode: keep the activated adapters frozen.

        Example:
            >>> # layer.set_adapter("math"); layer.set_adapter(["math", "code"])
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"adapter_names must name one or more distinct adapters, got {names}")
        for name in names:
            self._check_adapter(name)
        if self.merged and names != self._active:
            warnings.warn(f"set_adapter({names!r}) on a merged layer: unmerging {self.merged_adapters} first",
                          stacklevel=2)
            self.unmerge()
        self._active = names
        for n in self.lora_A:
            flag = n in names and not inference_mode
            for holders in self._holder_dicts():
                if n in holders:
                    holders[n].weight.requires_grad_(flag)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (unmerging first if merged).

        Deleting the (last) active adapter activates the first remaining one in sorted order, the
        same on every layer (PEFT's rule), or none if it was the last.

        Args:
            adapter_name: an adapter of this layer (ValueError otherwise, naming the known ones).

        Example:
            >>> # layer.delete_adapter("old")   # layer.lora_A no longer has "old"
        """
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for holders in self._holder_dicts():
            if adapter_name in holders:
                del holders[adapter_name]
        del self._options[adapter_name]
        self.norm_cache().clear(adapter_name)
        if adapter_name in self._active:
            self._active = [n for n in self._active if n != adapter_name]
            if not self._active and self._options:
                self.set_adapter(sorted(self._options)[0])

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
            if self._active:
                self.set_adapter(self._active)
        else:
            for d in self._holder_dicts():
                for f in d.values():
                    f.weight.requires_grad_(False)
            self._disable_adapters = True

    def _holder_dicts(self) -> tuple[nn.ModuleDict, ...]:
        """Every per-adapter parameter holder dict: the factors, and DoRA's magnitudes."""
        return self.lora_A, self.lora_B, self.lora_magnitude_vector

    # -- merge -------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """True while at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """This rank's ``s · (B A)`` shard, the same shape and dtype as the base weight. TP-local.

        The local factors are the layout's slices, so the product is exactly the local slice of
        the full ``s · B A`` (a gated fc1's ``[gate_i; up_i]`` rows included).

        Returns:
            column ``[N/t, K]`` (``s·B_i A``), row ``[N, K/t]`` (``s·B A_i``).

        Example:
            >>> # layer.base_layer.weight + layer.get_delta_weight("default")  # the merged shard
        """
        self._check_adapter(adapter)
        a, b = (f.detach().float() for f in self.factors(adapter))
        return (b @ a).mul_(self._options[adapter].scaling).to(self._factor_like().dtype)

    def _mergeable_weight(self) -> torch.Tensor:
        if self.spec.external_weight:
            raise ValueError(f"cannot merge into this {self.spec.type_name}: its weight is passed at call time "
                             "(tied to the embedding), and merging would change the embedding too")
        return self.base_layer.weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' deltas into the base weight shard. TP-local.

        A DoRA adapter's merge is PEFT's: ``W ← m/‖W + s·B A‖ ⊙ (W + s·B A)`` row by row (a
        row-parallel layer sums the norms over its TP group, so every rank of it must call this).

        Args:
            safe_merge: check the merged weight for inf/NaN before writing it (raises ValueError).
            adapter_names: adapters to merge (default: the active one).

        Example:
            >>> # layer.merge(); y, _ = layer(x)   # base-only kernel, same output
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_adapter(name)
        weight = self._mergeable_weight() if names else None
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again is skipped", stacklevel=2)
                continue
            if self._options[name].use_dora:
                self._merge_dora(name, weight, safe_merge)
                self.merged_adapters.append(name)
                continue
            delta = self.get_delta_weight(name)
            with torch.no_grad():
                if safe_merge:
                    merged = weight + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"safe_merge: merging adapter {name!r} gives a non-finite weight on TP "
                                         f"rank {self.spec.mode.rank}; the adapter is broken")
                    weight.copy_(merged)
                else:
                    weight.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta again (exact up to rounding in the weight dtype). TP-local.

        Warns and changes nothing if no adapter is merged.

        Example:
            >>> # layer.merge(); layer.unmerge()   # base weight back (to rounding), adapters active
        """
        if not self.merged_adapters:
            warnings.warn("unmerge() called but no adapter is merged; nothing to do", stacklevel=2)
            return
        weight = self._mergeable_weight()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self._dora_merged:
                    self._unmerge_dora(name, weight)
                else:
                    weight.sub_(self.get_delta_weight(name))

    def _merge_dora(self, name: str, weight: torch.Tensor, safe_merge: bool) -> None:
        """``W ← g ⊙ (W + s·B A)``, g = m/‖W + s·B A‖, in row blocks of fp32 (g is kept for unmerge)."""
        a, b = (f.detach() for f in self.factors(name))
        scale = self._options[name].scaling
        g = self.lora_magnitude_vector[name]().detach().float() / row_norms(weight, a, b, scale, self.spec.mode)
        with torch.no_grad():
            def block(i: int) -> torch.Tensor:
                w = weight[i:i + BLOCK_ROWS].float() + scale * (b[i:i + BLOCK_ROWS].float() @ a.float())
                return w * g[i:i + BLOCK_ROWS, None]

            starts = range(0, weight.shape[0], BLOCK_ROWS)
            if safe_merge and not all(torch.isfinite(block(i)).all() for i in starts):
                raise ValueError(f"safe_merge: merging DoRA adapter {name!r} gives a non-finite weight on TP rank "
                                 f"{self.spec.mode.rank}; the adapter is broken")
            for i in starts:
                weight[i:i + BLOCK_ROWS] = block(i).to(weight.dtype)
        self._dora_merged[name] = g

    def _unmerge_dora(self, name: str, weight: torch.Tensor) -> None:
        """``W ← W/g − s·B A`` with the g its merge applied (PEFT's unmerge)."""
        g = self._dora_merged.pop(name)
        a, b = (f.detach() for f in self.factors(name))
        scale = self._options[name].scaling
        for i in range(0, weight.shape[0], BLOCK_ROWS):
            rows = weight[i:i + BLOCK_ROWS].float() / g[i:i + BLOCK_ROWS, None]
            rows -= scale * (b[i:i + BLOCK_ROWS].float() @ a.float())
            weight[i:i + BLOCK_ROWS] = rows.to(weight.dtype)


# PEFT iterates these names when it cleans up an adapter; keep them the fields' names.
OPTION_FIELDS = tuple(f.name for f in fields(AdapterOptions))
