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
from typing import Any

import torch
from torch import nn

from .base import UnsupportedBase, describe
from .config import LoRAConfig, check_config, layer_options, pattern_value
from .modules import ColumnParallelLoRA, RowParallelLoRA, _ParallelLoRA, lora_modules, unwrap_base_layer

__all__ = ["LoRAConfig", "apply_lora", "check_config", "dispatch_megatron", "layer_options", "pattern_value",
           "unwrap_base_layer"]


def _is_peft_config(config: Any) -> bool:
    return any(c.__module__.split(".")[0] == "peft" for c in type(config).__mro__)


def _kind(module: nn.Module) -> str | None:
    """The TP mode of a supported base layer, None for a module no recogniser knows.

    A supported type with an unsupported option raises ``UnsupportedBase`` (a ValueError).
    """
    try:
        return describe(module).kind
    except UnsupportedBase:
        raise
    except TypeError:
        return None


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
    kind = _kind(base)
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


def apply_lora(model: nn.Module, config: Any, adapter_name: str = "default", *, freeze: bool = True) -> list[str]:
    """Wrap every targeted parallel linear of ``model`` in place, without PEFT: all or nothing.

    Every target is checked and every wrapper built before the model changes; if any of them
    fails, the model (its modules, ``requires_grad`` flags and torch's CPU generator state) is left
    as it was and the error names the module. A module that is already ours gets
    ``adapter_name`` added (``add_adapter``) instead, so calling this again with another name gives
    a module several adapters. A tied output layer (``skip_weight_param_allocation=True``, called
    with the embedding's weight) is wrapped too; it cannot be merged.

    Args:
        model: any module tree (e.g. a Megatron ``GPTModel``).
        config: a ``LoRAConfig`` (or PEFT ``LoraConfig``); ``target_modules`` selects modules by
            name suffix (list) or full-match regex (str); None selects every supported parallel linear.
        adapter_name: the adapter's name.
        freeze: freeze every parameter that is not a LoRA factor (PEFT's behaviour); False leaves
            the other parameters' ``requires_grad`` as they are (the base layers' weights are
            frozen either way).

    Returns:
        The dotted names of the adapted modules.

    Raises:
        ValueError / TypeError: a target cannot be adapted (named), or nothing matched.

    Example:
        >>> # names = apply_lora(gpt, LoRAConfig(r=16, lora_alpha=32,
        >>> #                    target_modules=["linear_qkv", "linear_proj"]))
    """
    check_config(config)
    targets = getattr(config, "target_modules", None)
    flags = {p: p.requires_grad for p in model.parameters()}
    rng = torch.get_rng_state()
    built: list[tuple[str, nn.Module]] = []  # new wrappers, attached only once all are built
    added: list[tuple[str, _ParallelLoRA, dict]] = []  # existing wrappers that get another adapter
    try:
        for name, module in list(model.named_modules()):
            if not name or not _matches(name, targets):
                continue
            if isinstance(module, _ParallelLoRA):
                if adapter_name in module.lora_A:
                    raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
                added.append((name, module, layer_options(config, target_name=name)))
                continue
            if any(isinstance(m, _ParallelLoRA) for m in _ancestors(model, name)):
                continue  # the base layer inside one of ours
            new = dispatch_megatron(module, adapter_name, config, target_name=name)
            if new is not None:
                built.append((name, new))
    except (ValueError, TypeError) as e:
        _restore(flags, rng)
        where = f" (module {name!r})" if name not in str(e) else ""
        raise type(e)(f"apply_lora changed nothing: {e}{where}") from e
    except BaseException:
        _restore(flags, rng)
        raise
    if not built and not added:
        raise ValueError(f"apply_lora: target_modules={targets!r} matched no supported parallel linear in the model")
    tied = [name for name, new in built if new.spec.external_weight]
    if tied and not freeze:
        _restore(flags, rng)
        raise ValueError(f"apply_lora changed nothing: {tied} use the embedding's weight (tied), which LoRA needs "
                         "frozen; pass freeze=True, or leave them out of target_modules")
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for _, module, opts in added:
        module.add_adapter(adapter_name, **opts)
    if freeze:
        lora = {id(p) for _, m in lora_modules(model) for d in (m.lora_A, m.lora_B) for p in d.parameters()}
        for p in model.parameters():
            if id(p) not in lora:
                p.requires_grad_(False)
        _inputs_require_grad_under_recompute(model)
    done = {n for n, _ in built} | {n for n, _, _ in added}
    return [n for n, _ in model.named_modules() if n in done]


def _inputs_require_grad_under_recompute(model: nn.Module) -> None:
    """Make a frozen embedding's output require grad when the model recomputes activations.

    megatron's activation recompute (``tensor_parallel.checkpoint``) is reentrant: a recomputed
    block whose input needs no gradient gives no gradient to anything inside it. Once the
    embedding is frozen its output needs none, so the LoRA factors of a fully recomputed model
    would get no gradient (backward even raises). PEFT's ``enable_input_require_grads`` is the same
    remedy. Only models configured for recompute get the hook.
    """
    config = getattr(model, "config", None)
    embedding = getattr(model, "embedding", None)
    if embedding is None or getattr(config, "recompute_granularity", None) is None:
        return
    if getattr(embedding, "_tplora_requires_grad_hook", None) is None:
        embedding._tplora_requires_grad_hook = embedding.register_forward_hook(
            lambda module, args, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)


def _restore(flags: dict, rng: torch.Tensor) -> None:
    for p, flag in flags.items():
        p.requires_grad_(flag)
    torch.set_rng_state(rng)


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
