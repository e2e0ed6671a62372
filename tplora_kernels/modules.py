"""``ColumnParallelLoRA`` and ``RowParallelLoRA``: thin modules around megatron-core layers.

A module describes its base layer once (``base.describe``: mode, layout, sizes, group, flags),
freezes it, owns the LoRA factors in PEFT's layout (``lora_A[adapter].weight``,
``lora_B[adapter].weight``; ``adapters``) and calls the functional API. It never calls the base
layer's forward: megatron-core's gather and SP paths need CUDA.

Factors shard as the base weight shards (``layout``), partition stride included:

==========  =========================  ==================================
base        lora_A[adapter].weight     lora_B[adapter].weight
==========  =========================  ==================================
column      ``[r, K]`` replicated      ``[N/t, r]``, rows split as W's
row         ``[r, K/t]`` cols of A     ``[N, r]`` replicated
==========  =========================  ==================================

A gated MLP's ``linear_fc1`` (stride 2) gives each rank ``[B_gate_i; B_up_i]``, as its weight
``[W_gate_i; W_up_i]``. Sharded factors carry Megatron's ``tensor_model_parallel``/
``partition_dim``/``partition_stride``; under sequence parallelism the replicated factor carries
``sequence_parallel = True`` so that ``finalize_model_grads`` (or
``distributed.sum_sequence_parallel_grads``) sums its per-rank partial gradient.

Checkpoints: ``state_dict()`` keys are ``<prefix>base_layer.weight`` and
``<prefix>lora_A.<adapter>.weight`` (PEFT's), and a state dict of the *unwrapped* base model
(``<prefix>weight``) loads too. ``sharded_state_dict`` keeps the base layer's checkpoint keys
(``<prefix>weight``), so a base-model dist-checkpoint loads into the adapted model, and adds the
factors with their full shapes, split as the layout says (a gated fc1's weight and lora_B with
megatron's SwiGLU treatment), so a checkpoint saved at one TP size loads at any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapters import AdapterMixin
from .base import describe
from .functional import parallel_linear, parallel_lora
from .mask import dropout_threshold
from .mode import TPMode
from .multi import BASE, build_mix
from .naming import lora_sites
from .rng import SeedLike, check_seed

__all__ = ["ColumnParallelLoRA", "LoRALayer", "RowParallelLoRA", "lora_modules",
           "set_batch_adapters", "unwrap_base_layer"]


class LoRALayer(AdapterMixin, nn.Module):
    """The shared body of the two modules: construction, checkpointing and the one forward."""

    kind: str = ""

    def __init__(self, base_layer: nn.Module, *, r: int, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, adapter_name: str = "default",
                 lora_dtype: torch.dtype | None = None, backend: str | None = None, seed: SeedLike = None,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.spec = describe(base_layer, self.kind)
        check_seed(seed)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.backend = backend
        self.lora_dtype = lora_dtype
        self.seed = seed
        self.last_backend: str | None = None
        # One adapter name per sample for the mixed batches to come (set_batch_adapters), or None.
        self.batch_adapters: list[str] | None = None
        self.draw_adapter(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora)
        self.set_adapter(adapter_name)
        # A state dict of the unwrapped base layer (``<prefix>weight``) loads into this module.
        self._register_load_state_dict_pre_hook(self._base_keys_hook)

    # Read-only views of the description, under the names the modules have always had.
    tp_group = property(lambda self: self.spec.mode.group)
    tp_size = property(lambda self: self.spec.mode.world)
    tp_rank = property(lambda self: self.spec.mode.rank)
    sequence_parallel = property(lambda self: self.spec.mode.sequence_parallel)
    skip_bias_add = property(lambda self: self.spec.skip_bias_add)
    in_features = property(lambda self: self.spec.in_features)
    out_features = property(lambda self: self.spec.out_features)

    # -- checkpointing -----------------------------------------------------------------------
    def _base_keys_hook(self, state_dict: dict, prefix: str, *args: Any) -> None:
        own = {k for k in self.base_layer.state_dict(keep_vars=True)}
        for k in own:
            plain, wrapped = f"{prefix}{k}", f"{prefix}base_layer.{k}"
            if plain in state_dict and wrapped not in state_dict:
                state_dict[wrapped] = state_dict.pop(plain)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None,
                           *, include_base: bool = True) -> dict:
        """megatron-core dist_checkpointing view of this layer: the base layer's, plus every factor.

        Dict keys are this module's ``state_dict`` keys, so ``load_state_dict`` takes what
        ``dist_checkpointing.load`` returns. The base layer's ShardedTensors keep the unwrapped
        layer's checkpoint keys (``{prefix}weight``); with a strided weight (a gated fc1) they get
        megatron's SwiGLU factory, as ``MLP.sharded_state_dict`` gives ``linear_fc1.weight``
        (it does not see this module's keys). Factors are split as the layout says (a TP replica
        when replicated), so an adapter saved at one TP size loads at any other.

        Args:
            prefix: key prefix (Megatron passes ``"<module path>."``).
            sharded_offsets: offsets prepended by enclosing modules (e.g. stacked layers).
            metadata: Megatron's metadata dict. Its ``"dp_cp_group"`` picks the main replica;
                without one, megatron's parallel_state is used when initialised, else there are
                taken to be no data-parallel replicas.
            include_base: also return the base layer's entries (False: adapters only).

        Returns:
            ``{state-dict key: ShardedTensor | ShardedTensorFactory | ShardedObject}``:
            ``{prefix}base_layer.weight`` (checkpoint key ``{prefix}weight``), the bias likewise, and
            ``{prefix}lora_A.<adapter>.weight`` (global shape ``[r, K]``) and
            ``{prefix}lora_B.<adapter>.weight`` (``[N, r]``) for every adapter.

        Example:
            >>> # from megatron.core import dist_checkpointing
            >>> # dist_checkpointing.save(layer.sharded_state_dict(), ckpt_dir)          # at one TP size
            >>> # sd = dist_checkpointing.load(layer.sharded_state_dict(), ckpt_dir)     # at another
            >>> # layer.load_state_dict(sd)
        """
        meta = dict(metadata or {})
        if meta.get("dp_cp_group") is None:
            meta["dp_cp_group"] = _default_dp_cp_group()
        layout = self.spec.layout
        groups = dict(tp_group=self.spec.mode.group, dp_cp_group=meta["dp_cp_group"],
                      prepend_offsets=sharded_offsets)
        out = {}
        if include_base:
            base = self.base_layer.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=meta)
            strided = layout.weight.stride > 1  # column only: the base recogniser refuses strided rows
            for k, v in base.items():
                name = k[len(prefix):]
                if strided and name in ("weight", "bias"):
                    # The bias [N/t] is split along N exactly as the weight's rows.
                    v = layout.sharded_tensor(getattr(self.base_layer, name), layout.weight, v.key,
                                              singleton_local_shards=meta.get("singleton_local_shards", False),
                                              **groups)
                out[f"{prefix}base_layer.{name}"] = v
        # The DoRA magnitude is split as B's rows (its split's dim 0 is N).
        for which, split in (("lora_A", layout.lora_a), ("lora_B", layout.lora_b),
                             ("lora_magnitude_vector", layout.lora_b)):
            for name, factor in getattr(self, which).items():
                key = f"{prefix}{which}.{name}.weight"
                out[key] = layout.sharded_tensor(factor.weight, split, key,
                                                 singleton_local_shards=meta.get("singleton_local_shards", False),
                                                 **groups)
        return out

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient hook (``MLP.backward_dw()`` calls it): nothing to do.

        The base is frozen, so there is no base weight gradient to delay, and the factors'
        gradients are computed in the layer's own backward.
        """

    # -- forward -----------------------------------------------------------------------------
    def _lora_call(self, x: torch.Tensor, names: Sequence[str] | None, weight: torch.Tensor) -> dict | None:
        """The factors, scale, dropout and mix of this call, or None for the base layer alone.

        With ``names`` (one adapter name per sample, ``multi.BASE`` for none) the adapters they use,
        and when training every trainable active adapter, are stacked in registry order into one
        mixed call; without, the one active adapter runs.
        Everything is checked here, before any collective, from what every rank sees alike.
        """
        if self.disable_adapters:
            return None
        if names is None:
            if not self.active_adapters or self.merged:
                return None
            if len(self.active_adapters) > 1:
                raise ValueError(f"adapters {self.active_adapters} are all active: name one per sample "
                                 "(tplora_kernels.set_batch_adapters, or adapter_names=), or activate one")
            # Factors are read by calling their holders (_factors), never as ``.weight``: Megatron
            # DDP's param all-gather, FSDP2's unshard and offloading act in the holder's pre-forward.
            name = self.active_adapters[0]
            opt = self.adapter_options(name)
            a, b = self.factors(name)
            call = dict(lora_a=a, lora_b=b, scale=opt.scaling, dropout_p=opt.lora_dropout if self.training else 0.0)
            if opt.use_dora:
                call["magnitude"], call["norm"] = self.dora_inputs(name, weight, a, b)
            return call
        if self.merged:
            raise ValueError(f"a mixed batch cannot run on a merged layer (merged: {self.merged_adapters}); unmerge()")
        names = list(names)
        batch = x.shape[1] if x.dim() >= 3 else x.shape[0]
        if len(names) != batch:
            raise ValueError(f"adapter_names must name one adapter per sample: {batch} samples (x of shape "
                             f"{tuple(x.shape)}, samples along dim {1 if x.dim() >= 3 else 0}), got {len(names)} names")
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of str, got {names!r}")
        # Every adapter's holders are called, in registry order, whatever this batch names: under
        # Megatron's overlap_param_gather (or FSDP2 on the holders) a call can start a collective
        # over the data-parallel ranks, whose batches name different adapters.
        factors = {n: self.factors(n) for n in self.adapter_names}
        # PEFT's rule: a sample whose adapter this layer does not have gets the base layer here
        # (adapters may target different layers); set_batch_adapters checks the names model-wide.
        # A trainable active adapter joins even with no sample here (its rows all gated off): its
        # factors then get a zero gradient on this rank, as on the ranks whose samples use it, and
        # Megatron's overlap_grad_reduce does not wait for a bucket that one rank never fills.
        named = set(names)
        trainable = {n for n in self.active_adapters if torch.is_grad_enabled() and self.lora_A[n].weight.requires_grad}
        used = [n for n in self.adapter_names if n in named or n in trainable]
        if not used:
            return None
        opts = [self.adapter_options(n) for n in used]
        dora = [n for n, o in zip(used, opts) if o.use_dora]
        if dora:
            raise ValueError(f"DoRA adapters {dora} cannot run in a mixed batch (one adapter per sample): each DoRA "
                             "adapter's magnitude scales whole output rows; run them one at a time")
        thrs = [dropout_threshold(o.lora_dropout) if self.training else 0 for o in opts]
        mix = build_mix([used.index(n) if n in used else -1 for n in names], ranks=[o.r for o in opts],
                        scales=[o.scaling for o in opts], thrs=thrs, device=x.device)
        return dict(lora_a=torch.cat([factors[n][0] for n in used], dim=0),
                    lora_b=torch.cat([factors[n][1] for n in used], dim=1), scale=1.0, dropout_p=0.0, mix=mix)

    def _forward(self, x: torch.Tensor, weight: torch.Tensor | None, mode: TPMode,
                 adapter_names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        spec, base = self.spec, self.base_layer
        w = spec.weight(base, weight)
        bias = None if spec.skip_bias_add else base.bias
        lora = self._lora_call(x, adapter_names if adapter_names is not None else self.batch_adapters, w)
        if lora is None:
            self.last_backend = "base"
            out = parallel_linear(x, w, mode, bias=bias)
        else:
            out, self.last_backend = parallel_lora(x, w, mode=mode, bias=bias, seed=self.seed, backend=self.backend,
                                                   **lora)
        return out, (base.bias if spec.skip_bias_add else None)

    def extra_repr(self) -> str:
        ranks = {n: self.adapter_options(n).r for n in self.adapter_names}
        return (f"tp_size={self.spec.mode.world}, sequence_parallel={self.spec.mode.sequence_parallel}, "
                f"stride={self.spec.layout.weight.stride}, adapters={ranks}, active={self.active_adapter!r}")


def lora_modules(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, LoRALayer]]:
    """Every ``ColumnParallelLoRA``/``RowParallelLoRA`` in ``model`` (or its chunks), in chunk and module order.

    Args:
        model: any module (itself included), or Megatron's list of model chunks.

    Returns:
        ``[(canonical name, module), ...]``: names by ``tplora_kernels.naming``'s rule (global layer
        and expert indices, no ``base_model.model.`` prefix), the same at every parallel layout.

    Example:
        >>> lora_modules(torch.nn.Linear(2, 2))
        []
    """
    return [(s.name, s.module) for s in lora_sites(model, LoRALayer)]


def unwrap_base_layer(target: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a LoRA wrapper (ours or PEFT's), or ``target`` itself.

    Args:
        target: any module.

    Returns:
        The wrapped base module (followed through nested wrappers), else ``target``.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> unwrap_base_layer(lin) is lin
        True
    """
    while hasattr(target, "base_layer") and isinstance(target.base_layer, nn.Module):
        target = target.base_layer
    return target


def set_batch_adapters(model: nn.Module | Sequence[nn.Module], adapter_names: Sequence[str] | None) -> None:
    """Name each sample's adapter for the forward passes to come (a mixed batch), or stop (None).

    Every LoRA layer of ``model`` then runs the batch with each sample's own adapter
    (``"__base__"``: the base layer alone), all of them in one fused call (see ``multi``). The
    setting stays until changed, so activation recompute in backward sees it too. To train several
    adapters this way, make them active first (``layer.set_adapter([...])``, or
    ``peft_model.base_model.set_adapter([...])``) so that their factors get gradients.

    Args:
        model: a model holding our LoRA modules (a PeftModel too), or its list of model chunks.
        adapter_names: one name per sample (the batch dim of megatron's ``[s, b, h]``), or None.

    Raises:
        ValueError: a name no LoRA layer of ``model`` has (checked on every rank alike).

    Example:
        >>> # set_batch_adapters(gpt, ["math", "code", "math", "__base__"]); loss = gpt(...); ...
    """
    mods = lora_modules(model)
    if adapter_names is not None:
        adapter_names = list(adapter_names)
        if not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of str, got {adapter_names!r}")
        known = {n for _, m in mods for n in m.adapter_names}
        unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}: the model's LoRA layers have {sorted(known)}")
    for _, m in mods:
        m.batch_adapters = adapter_names


def _default_dp_cp_group():
    """Megatron's data(+context)-parallel group when parallel_state is initialised, else None."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


_MODULE_ARGS = """
    Args:
        base_layer: the megatron-core layer (or subclass); its parameters get frozen.
        r: LoRA rank (keyword-only, required).
        lora_alpha: scale numerator (s = alpha/r, or alpha/sqrt(r) with ``use_rslora``).
        lora_dropout: dropout on the LoRA input in training mode, generated in-kernel.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True, False or ``"gaussian"``.
        adapter_name: the first adapter's name.
        lora_dtype: LoRA parameter dtype (default: the base weight's).
        backend: kernel backend (default: ``TPLORA_BACKEND`` or automatic; see ``ops.select``).
        seed: the dropout seed for users who manage it (``rng.resolve_seed``: an int, an int64
            tensor updated in place, or a callable); None (default) draws one per call by
            ``tplora_kernels.rng``'s rule, identical on every TP rank.
        use_dora: DoRA (``tplora_kernels.dora``): a magnitude per output row, PEFT's
            ``lora_magnitude_vector``, starting at ``‖W + s·B A‖``.
"""


class ColumnParallelLoRA(LoRALayer):
    __doc__ = f"""LoRA around a megatron-core ``ColumnParallelLinear``, fused, adding no collective.
{_MODULE_ARGS}
    Shapes:
        ``forward(x)``: x ``[s, b, K]`` (``[s/t, b, K]`` under SP; any leading dims) ->
        ``(y [s, b, N/t] (or [s, b, N] when gathering), bias or None)``, as the base layer.

    Example:
        >>> # inside an initialised TP group, with `lin` a megatron ColumnParallelLinear:
        >>> # layer = ColumnParallelLoRA(lin, r=16, lora_alpha=32, lora_dropout=0.1)
        >>> # y, bias = layer(x)
    """

    kind = "column"

    @property
    def gather_output(self) -> bool:
        """The base layer's ``gather_output`` (False at TP=1)."""
        return self.spec.mode.gather_output

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None,
                adapter_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ColumnParallelLinear.forward``'s contract.

        Args:
            x: ``[s, b, K]`` (``[s/t, b, K]`` under SP).
            weight: the weight for a layer that owns none (a tied output layer), else None.
            runtime_gather_output: overrides ``gather_output`` for this call.
            adapter_names: one adapter name per sample (``"__base__"``: none) for a mixed batch
                (PEFT's ``adapter_names=``); default ``self.batch_adapters``, else the active adapter.

        Returns:
            ``(output, bias)`` exactly as ``ColumnParallelLinear.forward``.
        """
        mode = self.spec.mode
        if runtime_gather_output is not None and bool(runtime_gather_output) != mode.gather_output:
            mode = mode.with_gather(bool(runtime_gather_output))
        return self._forward(x, weight, mode, adapter_names)


class RowParallelLoRA(LoRALayer):
    __doc__ = f"""LoRA around a megatron-core ``RowParallelLinear``, fused, adding no collective.
{_MODULE_ARGS}
    Shapes:
        ``forward(x)``: x ``[s, b, K/t]`` (input_is_parallel) or ``[s, b, K]`` ->
        ``(y [s, b, N] (``[s/t, b, N]`` under SP), bias or None)``, as the base layer.

    Example:
        >>> # layer = RowParallelLoRA(row_linear, r=16, lora_alpha=32)
        >>> # y, bias = layer(x)
    """

    kind = "row"

    @property
    def input_is_parallel(self) -> bool:
        """The base layer's ``input_is_parallel`` (True at TP=1)."""
        return self.spec.mode.input_is_parallel

    def forward(self, x: torch.Tensor,
                adapter_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``RowParallelLinear.forward``'s contract.

        Args:
            x: ``[s, b, K/t]`` or ``[s, b, K]`` (when the base's input is not parallel).
            adapter_names: as ``ColumnParallelLoRA.forward``.

        Returns:
            ``(output, bias)`` as ``RowParallelLinear``.
        """
        return self._forward(x, None, self.spec.mode, adapter_names)
