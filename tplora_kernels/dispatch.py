"""``dispatch_megatron``: PEFT's dispatcher contract for megatron-core parallel linears.

PEFT builds a LoRA layer by asking each dispatcher ``dispatcher(target, adapter_name,
config=lora_config, **kwargs)`` in turn and keeping the first non-None answer; kwargs carry the
rank and alpha PEFT already resolved from ``rank_pattern``/``alpha_pattern`` and the module's
dotted name (``target_name``). ``dispatch_megatron`` answers that call for megatron-core
``ColumnParallelLinear``/``RowParallelLinear`` (subclasses included) with our fused module, and
None for anything else. Called directly, without PEFT, it resolves the patterns itself from
``target_name``.

The config is duck-typed, so this module does not import peft: a PEFT ``LoraConfig`` and our
small ``LoRAConfig`` both work. Given a PEFT config, the answer is the PEFT-aware subclass from
``tplora_kernels.peft`` (imported only then), so PEFT's model-level helpers see a LoraLayer.
Options the fused kernels cannot honour (DoRA, a LoRA bias, non-identity inits, ...) raise a
ValueError that names them, before any module is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .modules import ColumnParallelLoRA, RowParallelLoRA, _ParallelLoRA

__all__ = ["LoRAConfig", "apply_lora", "check_config", "dispatch_megatron", "layer_options", "pattern_value",
           "unwrap_base_layer"]

_INITS = (True, False, "gaussian")
# LoraConfig fields that change what a LoRA layer computes, which the fused kernels do not do.
# A truthy value means "requested". (name, what it is)
_UNSUPPORTED_FIELDS = (
    ("use_dora", "DoRA"),
    ("lora_bias", "a trainable LoRA bias"),
    ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ("use_qalora", "QALoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
    ("kasa_config", "KaSA"),
    ("layer_replication", "layer replication"),
)


@dataclass
class LoRAConfig:
    """The LoRA options ``dispatch_megatron``/``apply_lora`` understand, for use without PEFT.

    Field names and defaults follow PEFT's ``LoraConfig``, so either can be passed.

    Args:
        r: default rank.
        lora_alpha: default alpha (s = alpha/r, or alpha/sqrt(r) with ``use_rslora``).
        lora_dropout: dropout on the LoRA input in training mode.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True (B = 0, A kaiming-uniform), False (both random) or ``"gaussian"``.
        rank_pattern: ``{regex: r}`` overriding ``r`` for modules whose dotted name ends with a match.
        alpha_pattern: ``{regex: alpha}``, likewise.
        target_modules: for ``apply_lora``: module-name suffixes (list), a full-match regex (str),
            or None for every Column/RowParallelLinear.
        backend: kernel backend of the built modules (None: ``TPLORA_BACKEND`` or automatic).
        lora_dtype: LoRA parameter dtype (None: the base weight's).

    Example:
        >>> cfg = LoRAConfig(r=16, lora_alpha=32, rank_pattern={"linear_fc1": 8})
        >>> layer_options(cfg, target_name="decoder.layers.0.mlp.linear_fc1")["r"]
        8
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    backend: str | None = None
    lora_dtype: torch.dtype | None = None


def pattern_value(patterns: dict | None, name: str | None, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key ``k`` with ``name`` matching ``(.*\\.)?(k)$``.

    Args:
        patterns: ``{regex: value}`` (None or empty: no override).
        name: the module's dotted name (None: no override).
        default: the value without a match.

    Returns:
        The matched value, else ``default``.

    Example:
        >>> pattern_value({"fc1": 4}, "layers.0.fc1", 8), pattern_value({"fc1": 4}, "layers.0.fc10", 8)
        (4, 8)
    """
    if not patterns or name is None:
        return default
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_config(config: Any) -> None:
    """Raise ValueError naming every option of ``config`` that the fused modules cannot honour.

    Args:
        config: a PEFT ``LoraConfig`` or a ``LoRAConfig``.

    Example:
        >>> check_config(LoRAConfig(init_lora_weights="gaussian"))
    """
    if config is None:
        raise TypeError("lora_config must be a peft LoraConfig or a tplora_kernels LoRAConfig, got None")
    if not hasattr(config, "r") or not hasattr(config, "lora_alpha"):
        raise TypeError(f"lora_config must be a peft LoraConfig or a tplora_kernels LoRAConfig (with r, lora_alpha, "
                        f"...), got {type(config).__name__}")
    bad = [f"{name}={getattr(config, name)!r} ({what})" for name, what in _UNSUPPORTED_FIELDS
           if getattr(config, name, None)]
    init = getattr(config, "init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _INITS:
        bad.append(f"init_lora_weights={init!r} (only True, False and 'gaussian' are supported)")
    bias = getattr(config, "bias", "none")
    if bias != "none":
        bad.append(f"bias={bias!r} (the base layer stays frozen; use bias='none')")
    if bad:
        raise ValueError("tplora_kernels does not support these LoRA options: " + "; ".join(bad)
                         + ". Supported: r, lora_alpha, lora_dropout, use_rslora, init_lora_weights "
                         "(True/False/'gaussian'), rank_pattern, alpha_pattern.")


def layer_options(config: Any, *, target_name: str | None = None, r: int | None = None,
                  lora_alpha: float | None = None) -> dict:
    """The module keyword arguments one layer gets from ``config``.

    Explicit ``r``/``lora_alpha`` (what PEFT passes after resolving its patterns) win; else the
    patterns are matched against ``target_name``; else the config's defaults apply.

    Args:
        config: a PEFT ``LoraConfig`` or a ``LoRAConfig`` (checked with ``check_config``).
        target_name: the module's dotted name in the model.
        r, lora_alpha: overrides.

    Returns:
        ``dict(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)``.

    Example:
        >>> layer_options(LoRAConfig(r=4, alpha_pattern={"qkv": 2}), target_name="attn.qkv")["lora_alpha"]
        2
    """
    check_config(config)
    if r is None:
        r = pattern_value(getattr(config, "rank_pattern", None), target_name, config.r)
    if lora_alpha is None:
        lora_alpha = pattern_value(getattr(config, "alpha_pattern", None), target_name, config.lora_alpha)
    return dict(r=r, lora_alpha=lora_alpha, lora_dropout=getattr(config, "lora_dropout", 0.0),
                use_rslora=bool(getattr(config, "use_rslora", False)),
                init_lora_weights=getattr(config, "init_lora_weights", True))


def _is_peft_config(config: Any) -> bool:
    return any(c.__module__.split(".")[0] == "peft" for c in type(config).__mro__)


def _megatron_kind(module: nn.Module) -> str | None:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


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


def dispatch_megatron(target: nn.Module, adapter_name: str, lora_config: Any = None, **kwargs: Any) -> nn.Module | None:
    """Build our fused LoRA module for a megatron-core parallel linear; None for anything else.

    PEFT's dispatcher signature: PEFT calls ``dispatch_megatron(target, adapter_name,
    config=lora_config, r=..., lora_alpha=..., target_name=..., ...)``; ``config=`` is accepted as
    an alias of ``lora_config``. Unknown kwargs (PEFT passes several) are ignored.

    Args:
        target: the module to adapt: a ``ColumnParallelLinear``/``RowParallelLinear`` (or
            subclass), or a LoRA layer wrapping one (its ``base_layer`` is unwrapped).
        adapter_name: the first adapter's name.
        lora_config: a PEFT ``LoraConfig`` (the answer is then PEFT-aware) or a ``LoRAConfig``.
        **kwargs: optional ``target_name`` (the module's dotted name, for rank/alpha patterns),
            ``r``/``lora_alpha`` (already resolved values), ``backend``, ``lora_dtype``.

    Returns:
        ``ColumnParallelLoRA``/``RowParallelLoRA`` (PEFT-aware subclasses for a PEFT config)
        around the unwrapped base layer, or None when the base is not a megatron parallel linear.

    Raises:
        ValueError: the config asks for an option the fused modules cannot honour (named).
        TypeError: ``lora_config`` is missing or not a LoRA config.

    Example:
        >>> # lin = megatron.core.tensor_parallel.ColumnParallelLinear(...)
        >>> # layer = dispatch_megatron(lin, "default", LoRAConfig(r=16, lora_alpha=32))
        >>> # y, bias = layer(x)
    """
    alias = kwargs.pop("config", None)
    if lora_config is not None and alias is not None and alias is not lora_config:
        raise TypeError("pass the LoRA config once, as lora_config or as config=, not two different ones")
    config = lora_config if lora_config is not None else alias
    base = unwrap_base_layer(target)
    kind = _megatron_kind(base)
    if kind is None:
        return None
    if _is_peft_config(config):
        from .peft import PeftColumnParallelLoRA, PeftRowParallelLoRA

        cls = PeftColumnParallelLoRA if kind == "column" else PeftRowParallelLoRA
        return cls(base, adapter_name, config=config, **kwargs)
    opts = layer_options(config, target_name=kwargs.get("target_name"), r=kwargs.get("r"),
                         lora_alpha=kwargs.get("lora_alpha"))
    cls = ColumnParallelLoRA if kind == "column" else RowParallelLoRA
    return cls(base, adapter_name=adapter_name, backend=kwargs.get("backend", getattr(config, "backend", None)),
               lora_dtype=kwargs.get("lora_dtype", getattr(config, "lora_dtype", None)), **opts)


def _matches(name: str, targets: str | Iterable[str] | None) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, config: Any, adapter_name: str = "default") -> list[str]:
    """Wrap every targeted megatron parallel linear of ``model`` in place, without PEFT.

    A module that is already ours gets ``adapter_name`` added (``add_adapter``) instead, so
    calling this again with another name gives a module several adapters. Base weights are
    frozen; nothing else in ``model`` changes.

    Args:
        model: any module tree (e.g. a Megatron ``GPTModel``).
        config: a ``LoRAConfig`` (or PEFT ``LoraConfig``); ``target_modules`` selects modules by
            name suffix (list) or full-match regex (str); None selects every parallel linear.
        adapter_name: the adapter's name.

    Returns:
        The dotted names of the adapted modules.

    Example:
        >>> # names = apply_lora(gpt, LoRAConfig(r=16, lora_alpha=32,
        >>> #                    target_modules=["linear_qkv", "linear_proj"]))
    """
    check_config(config)
    targets = getattr(config, "target_modules", None)
    done = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, _ParallelLoRA):
            module.add_adapter(adapter_name, **layer_options(config, target_name=name))
            done.append(name)
            continue
        if any(isinstance(m, _ParallelLoRA) for m in _ancestors(model, name)):
            continue  # the base layer inside one of ours
        new = dispatch_megatron(module, adapter_name, config, target_name=name)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        done.append(name)
    if not done:
        raise ValueError(f"apply_lora: target_modules={targets!r} matched no ColumnParallelLinear/RowParallelLinear "
                         "in the model")
    return done


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
