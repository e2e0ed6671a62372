"""PEFT integration: one call makes ``get_peft_model`` build our fused modules for Megatron layers.

::

    from peft import LoraConfig, get_peft_model
    import tplora_kernels.peft

    config = tplora_kernels.peft.register(LoraConfig(r=16, lora_alpha=32, target_modules=["fc1", "fc2"]))
    model = get_peft_model(megatron_model, config)

``register`` uses PEFT's custom-module mechanism (``LoraConfig._register_custom_module``): PEFT
asks its custom dispatcher first, so every targeted ``ColumnParallelLinear``/``RowParallelLinear``
(subclasses included) becomes a ``PeftColumnParallelLoRA``/``PeftRowParallelLoRA``, while other
targets (plain ``nn.Linear`` ...) keep PEFT's own layers. PEFT 0.21.2's built-in Megatron path is
never reached for them (it does not run on that release).

The two classes are our modules with PEFT's ``LoraLayer`` added as a base class, because PEFT's
model-level helpers (``set_adapter``, ``disable_adapter()``, ``merge_and_unload()``,
``get_peft_model_state_dict``, ``add_adapter``) find layers by ``isinstance`` and call PEFT's layer
API. LoraLayer's own ``__init__`` is not run; our module keeps its state, and the few PEFT
attributes those helpers read are set here. This file is the only place that imports peft; it
needs peft >= 0.17 (the release that carries ``_register_custom_module``), tested with 0.21.2.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from .adapters import OPTION_FIELDS
from .config import check_config, layer_indexed_patterns, layer_options
from .modules import ColumnParallelLoRA, RowParallelLoRA, unwrap_base_layer

__all__ = ["PeftColumnParallelLoRA", "PeftRowParallelLoRA", "register"]



def _refuse_stage_local_patterns(base: nn.Module, config: Any) -> None:
    """Raise where PEFT's patterns name layers by index in a pipeline-split model (the same on every rank).

    PEFT matched them against this stage's local module names before calling us, so on every
    stage but the first they picked other layers than the user meant; ``apply_lora`` matches the
    global names instead.
    """
    pp = getattr(getattr(base, "config", None), "pipeline_model_parallel_size", 1) or 1
    found = layer_indexed_patterns(config) if pp > 1 else []
    if found:
        raise ValueError(f"LoraConfig {', '.join(found)} names layers by index, but at pipeline_model_parallel_size="
                         f"{pp} PEFT matches patterns against each stage's local module names (stage 1's layers.0 is "
                         "a later global layer): use tplora_kernels.apply_lora, which matches global names, or "
                         "patterns without layer indices")


class _PeftLoRAMixin:
    """PEFT's LoraLayer contract on top of ``LoRALayer``; first in the MRO of both classes."""

    # PEFT's generic layer helpers iterate these names (DoRA's magnitudes included; no embedding adapters).
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names: tuple[str, ...] = OPTION_FIELDS

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", config: Any = None,
                 **kwargs: Any) -> None:
        if config is None:
            raise TypeError(f"{type(self).__name__} needs config=<peft LoraConfig>")
        _refuse_stage_local_patterns(unwrap_base_layer(base_layer), config)
        target_name = kwargs.pop("target_name", None)
        opts = layer_options(config, target_name=target_name, r=kwargs.pop("r", None),
                             lora_alpha=kwargs.pop("lora_alpha", None))
        defaults = getattr(config, "_tplora_options", {})
        backend = kwargs.pop("backend", defaults.get("backend"))
        lora_dtype = kwargs.pop("lora_dtype", defaults.get("lora_dtype"))
        # Whatever else PEFT passes (it adds keywords between releases) means nothing here.
        super().__init__(unwrap_base_layer(base_layer), adapter_name=adapter_name, backend=backend,
                         lora_dtype=lora_dtype, **opts)
        # Attributes PEFT's LoraLayer.__init__ would set and its helpers read.
        self.kwargs: dict = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_variant: dict = {}
        self._caches: dict = {}
        self.ephemeral_gpu_offload = False
        self.cast_input_dtype_enabled = True
        # PEFT's mixed-batch check (``model(x, adapter_names=[...])``) lists embedding adapters too.
        self.lora_embedding_A = nn.ModuleDict()
        self.lora_embedding_B = nn.ModuleDict()

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float | None = None, config: Any = None,
                     **kwargs: Any) -> None:
        """PEFT's signature: what ``PeftModel.add_adapter`` calls on an existing layer.

        Args:
            adapter_name: the adapter to create (or replace).
            r: its rank (PEFT resolved ``rank_pattern`` already).
            lora_alpha: its alpha (likewise).
            config: the adapter's ``LoraConfig`` (dropout, rsLoRA, init; checked for unsupported
                options).
            **kwargs: ``target_name`` and other PEFT keywords (ignored).

        Example:
            >>> # peft_model.add_adapter("other", tplora_kernels.peft.register(LoraConfig(r=4)))
        """
        if config is None:
            raise TypeError("update_layer needs config=<peft LoraConfig>")
        _refuse_stage_local_patterns(self.base_layer, config)
        opts = layer_options(config, target_name=kwargs.get("target_name"), r=r, lora_alpha=lora_alpha)
        self.draw_adapter(adapter_name, **opts)
        if getattr(config, "inference_mode", False) and adapter_name == self.active_adapter:
            self.set_adapter(adapter_name, inference_mode=True)


class PeftColumnParallelLoRA(_PeftLoRAMixin, ColumnParallelLoRA, LoraLayer):
    """``ColumnParallelLoRA`` that PEFT recognises as a LoraLayer.

    Args:
        base_layer: a ``ColumnParallelLinear`` (or a LoRA layer wrapping one).
        adapter_name: the first adapter.
        config: the PEFT ``LoraConfig``.
        **kwargs: what PEFT passes (``r``, ``lora_alpha``, ``target_name``, ...), plus optional
            ``backend``/``lora_dtype``.

    Shapes: as ``ColumnParallelLoRA``.

    Example:
        >>> # built by get_peft_model after tplora_kernels.peft.register(config)
    """


class PeftRowParallelLoRA(_PeftLoRAMixin, RowParallelLoRA, LoraLayer):
    """``RowParallelLoRA`` that PEFT recognises as a LoraLayer. Args: as ``PeftColumnParallelLoRA``."""


def register(lora_config: peft.LoraConfig, *, backend: str | None = None,
             lora_dtype: torch.dtype | None = None) -> peft.LoraConfig:
    """Make ``get_peft_model(model, lora_config)`` use our fused modules for Megatron layers.

    Registers ``ColumnParallelLinear -> PeftColumnParallelLoRA`` and ``RowParallelLinear ->
    PeftRowParallelLoRA`` through PEFT's custom-module mechanism (subclasses match too). Register
    every config you pass to PEFT (``get_peft_model`` and ``add_adapter``). The options checked
    here are the ones the fused kernels honour; anything else raises now, before a model is
    touched.

    Args:
        lora_config: a PEFT ``LoraConfig`` (modified in place and returned).
        backend: kernel backend for the built modules (None: ``TPLORA_BACKEND`` or automatic).
        lora_dtype: LoRA parameter dtype (None: the base weight's; PEFT then up-casts bf16/fp16
            adapters to fp32 unless ``autocast_adapter_dtype=False``).

    Returns:
        ``lora_config``.

    Raises:
        TypeError: ``lora_config`` is not a PEFT LoraConfig.
        ValueError: it asks for options the fused modules do not support (named in the message);
            later, when ``get_peft_model`` builds a layer of a pipeline-split model
            (``pipeline_model_parallel_size > 1``), a pattern that names layers by index (PEFT
            would match it against each stage's local names).

    Example:
        >>> from peft import LoraConfig
        >>> cfg = register(LoraConfig(r=8, lora_alpha=16, target_modules=["linear_fc1"]))
        >>> sorted(t.__name__ for t in cfg._custom_modules)
        ['ColumnParallelLinear', 'RowParallelLinear']
    """
    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    check_config(lora_config)
    lora_config._register_custom_module({ColumnParallelLinear: PeftColumnParallelLoRA,
                                         RowParallelLinear: PeftRowParallelLoRA})
    lora_config._tplora_options = {"backend": backend, "lora_dtype": lora_dtype}
    return lora_config
