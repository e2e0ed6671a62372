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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .base import UnsupportedBase, describe
from .config import check_config, layer_options
from .modules import ColumnParallelLoRA, LoRALayer, RowParallelLoRA, unwrap_base_layer
from .naming import as_chunks, canonical_name, lora_sites

__all__ = ["apply_lora", "dispatch_megatron", "merge_adapters", "unmerge_adapters"]


def _is_peft_config(config: Any) -> bool:
    return any(c.__module__.split(".")[0] == "peft" for c in type(config).__mro__)


def _kind(module: nn.Module) -> str | None:
    """The TP mode of a supported base layer, None for a module no recogniser knows.

    A supported type with an unsupported option raises ``UnsupportedBase`` (a ValueError).
    """
    try:
        return describe(module).mode.kind
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


def apply_lora(model: nn.Module | Sequence[nn.Module], config: Any, adapter_name: str = "default", *,
               freeze: bool = True) -> list[str]:
    """Wrap every targeted parallel linear of ``model`` in place, without PEFT: all or nothing.

    Modules are selected and their ``rank_pattern``/``alpha_pattern`` resolved by their canonical
    name (``tplora_kernels.naming``: global layer and expert indices), so a config means the same
    layers at every TP × PP × VPP × EP layout. Every target is checked and every wrapper built
    before the model changes; if any of them fails, the model (its modules, ``requires_grad`` flags
    and torch's CPU generator state) is left as it was and the error names the module. A module that
    is already ours gets ``adapter_name`` added (``add_adapter``) instead, so calling this again with
    another name gives a module several adapters. A tied output layer
    (``skip_weight_param_allocation=True``, called with the embedding's weight) is wrapped too; it
    cannot be merged.

    Args:
        model: any module tree (e.g. a Megatron ``GPTModel``), or Megatron's list of model chunks.
        config: a ``LoRAConfig`` (or PEFT ``LoraConfig``); ``target_modules`` selects modules by
            canonical-name suffix (list) or full-match regex (str); None selects every supported
            parallel linear.
        adapter_name: the adapter's name.
        freeze: freeze every parameter that is not a LoRA factor or DoRA magnitude (PEFT's behaviour); False leaves
            the other parameters' ``requires_grad`` as they are (the base layers' weights are
            frozen either way).

    Returns:
        The canonical names of the adapted modules, in chunk and module order.

    Raises:
        ValueError / TypeError: a target cannot be adapted (named), or nothing matched.

    Example:
        >>> # names = apply_lora(gpt_chunks, LoRAConfig(r=16, lora_alpha=32,
        >>> #                    target_modules=["linear_qkv", "linear_proj"]))
    """
    check_config(config)
    chunks = as_chunks(model)
    targets = getattr(config, "target_modules", None)
    flags = {p: p.requires_grad for c in chunks for p in c.parameters()}
    rng = torch.get_rng_state()
    built: list[tuple[nn.Module, str, str, nn.Module]] = []  # new wrappers, attached only once all are built
    added: list[tuple[str, LoRALayer, dict]] = []  # existing wrappers that get another adapter
    name = ""
    try:
        for chunk in chunks:
            for local, module in list(chunk.named_modules()):
                if not local:
                    continue
                name = canonical_name(chunk, local)
                if not _matches(name, targets):
                    continue
                if isinstance(module, LoRALayer):
                    if adapter_name in module.lora_A:
                        raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
                    added.append((name, module, layer_options(config, target_name=name)))
                    continue
                if any(isinstance(m, LoRALayer) for m in _ancestors(chunk, local)):
                    continue  # the base layer inside one of ours
                new = dispatch_megatron(module, adapter_name, config, target_name=name)
                if new is not None:
                    built.append((chunk, local, name, new))
    except (ValueError, TypeError) as e:
        _restore(flags, rng)
        where = f" (module {name!r})" if name not in str(e) else ""
        raise type(e)(f"apply_lora changed nothing: {e}{where}") from e
    except BaseException:
        _restore(flags, rng)
        raise
    if not built and not added:
        raise ValueError(f"apply_lora: target_modules={targets!r} matched no supported parallel linear in the model")
    tied = [name for _, _, name, new in built if new.spec.external_weight]
    if tied and not freeze:
        _restore(flags, rng)
        raise ValueError(f"apply_lora changed nothing: {tied} use the embedding's weight (tied), which LoRA needs "
                         "frozen; pass freeze=True, or leave them out of target_modules")
    for chunk, local, _, new in built:
        parent_name, _, child = local.rpartition(".")
        setattr(chunk.get_submodule(parent_name) if parent_name else chunk, child, new)
    for _, module, opts in added:
        module.add_adapter(adapter_name, **opts)
    if freeze:
        # The adapter's own tensors stay trainable: its factors and (DoRA) its magnitudes, as PEFT's.
        lora = {id(p) for s in lora_sites(chunks, LoRALayer)
                for d in (s.module.lora_A, s.module.lora_B, s.module.lora_magnitude_vector) for p in d.parameters()}
        for chunk in chunks:
            for p in chunk.parameters():
                if id(p) not in lora:
                    p.requires_grad_(False)
            _inputs_require_grad_under_recompute(chunk)
    done = {n for _, _, n, _ in built} | {n for n, _, _ in added}
    return [s.name for s in lora_sites(chunks, LoRALayer) if s.name in done]


def merge_adapters(model: nn.Module | Sequence[nn.Module], adapter_names: list[str] | None = None, *,
                   safe_merge: bool = False) -> list[str]:
    """Fold adapters into the base weights of every LoRA layer of a model (or its chunks). TP-local.

    Each rank adds its own shard of ``s · B A`` to its own base weight shard, so no communication
    is needed at any layout. Layers whose weight is passed at call time (a tied output layer) are
    skipped, since merging would change the shared embedding.

    Args:
        model: a model holding our LoRA layers, or its list of model chunks.
        adapter_names: adapters to merge (default: each layer's active ones).
        safe_merge: check every merged weight for inf/NaN before writing it.

    Returns:
        The canonical names of the layers merged.

    Example:
        >>> # merge_adapters(chunks); logits = forward(chunks); unmerge_adapters(chunks)
    """
    done = []
    for s in lora_sites(model, LoRALayer):
        if s.module.spec.external_weight:
            continue
        s.module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        done.append(s.name)
    return done


def unmerge_adapters(model: nn.Module | Sequence[nn.Module]) -> list[str]:
    """Undo ``merge_adapters`` on every LoRA layer that has merged adapters. TP-local.

    Returns:
        The canonical names of the layers unmerged.

    Example:
        >>> # unmerge_adapters(chunks)
    """
    done = []
    for s in lora_sites(model, LoRALayer):
        if s.module.merged:
            s.module.unmerge()
            done.append(s.name)
    return done


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
