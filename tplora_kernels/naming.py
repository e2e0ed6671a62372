"""The one naming rule: a LoRA layer's canonical name does not depend on the parallel layout.

Megatron names modules by their place on *this* rank: a pipeline stage holds
``decoder.layers.0 .. n-1`` whatever layers they are, a virtual-pipeline model is a list of
chunks each starting at ``decoder.layers.0``, and an expert-parallel rank holds
``local_experts.0 .. e-1``. Adapter files, Hugging Face names, adapter-only checkpoints and
``rank_pattern``/``alpha_pattern`` need one name per layer that is the same on every layout
(TP × PP × VPP × EP), or a file written at one layout loads into the wrong layers at another.
The canonical name replaces, in the module path:

* ``<block>.layers.<i>`` by the layer's **global** index: ``TransformerLayer.layer_number - 1``
  (Megatron's ``layer_number`` is 1-based and global on every stage and chunk; multi-token
  prediction layers carry their own global ``layer_number`` the same way);
* ``local_experts.<i>`` by the **global** expert index ``ep_rank · experts_per_rank + i``
  (the container's expert-parallel group);
* a leading ``base_model.model.`` (a ``PeftModel``) is dropped, as PEFT's own keys do.

Everything that names a layer goes through ``canonical_name``/``lora_sites``: ``apply_lora``'s
target and pattern matching, ``save_adapter``/``load_adapter``, the Hugging Face export and
import, the in-memory export and adapter-only dist checkpoints. A model may be one module or
Megatron's list of model chunks (virtual pipeline); ``as_chunks`` accepts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from . import distributed as D

__all__ = ["PEFT_PREFIX", "LoRASite", "as_chunks", "canonical_name", "layer_key", "lora_sites", "plain_name"]

PEFT_PREFIX = "base_model.model."


def plain_name(name: str) -> str:
    """``name`` without a leading ``base_model.model.`` (a PeftModel's prefix).

    Example:
        >>> plain_name("base_model.model.decoder.layers.0.mlp.linear_fc1")
        'decoder.layers.0.mlp.linear_fc1'
    """
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def as_chunks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """A model as Megatron's list of model chunks: a list (tuple, ModuleList) as it is, a module as ``[model]``.

    Args:
        model: one module, or the chunks of a virtual-pipeline model (in chunk order).

    Returns:
        The chunks.

    Raises:
        TypeError: anything else, or an empty list.

    Example:
        >>> len(as_chunks(nn.Linear(2, 2))), len(as_chunks([nn.Linear(2, 2), nn.Linear(2, 2)]))
        (1, 2)
    """
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    if not chunks or not all(isinstance(c, nn.Module) for c in chunks):
        raise TypeError(f"model must be an nn.Module or a non-empty list of model chunks (nn.Module), got "
                        f"{type(model).__name__}")
    return chunks


def _expert_offset(container: nn.Module) -> int | None:
    """The global index of ``container.local_experts[0]``, or None when ``container`` is no expert container."""
    experts = getattr(container, "local_experts", None)
    if not isinstance(experts, nn.ModuleList) or not hasattr(container, "ep_group"):
        return None
    return D.group_rank(container.ep_group) * len(experts)


def canonical_name(root: nn.Module, local_name: str) -> str:
    """The layout-independent name of the module at ``local_name`` in ``root`` (see the module docstring).

    Args:
        root: the model (or one model chunk) ``local_name`` is relative to.
        local_name: a dotted path as ``root.named_modules()`` gives it.

    Returns:
        The canonical dotted name (no ``base_model.model.`` prefix).

    Example:
        >>> canonical_name(nn.Sequential(nn.Linear(2, 2)), "0")
        '0'
    """
    parts = local_name.split(".") if local_name else []
    out: list[str] = []
    parent, node = None, root
    for i, part in enumerate(parts):
        child = node._modules.get(part) if isinstance(node, nn.Module) else None
        if child is None:
            raise ValueError(f"{local_name!r} is not a submodule path of {type(root).__name__} (no {part!r})")
        name = part
        if part.isdigit() and i > 0:
            if parts[i - 1] == "layers" and isinstance(getattr(child, "layer_number", None), int):
                name = str(child.layer_number - 1)
            elif parts[i - 1] == "local_experts" and parent is not None:
                offset = _expert_offset(parent)
                if offset is not None:
                    name = str(offset + int(part))
        out.append(name)
        parent, node = node, child
    return plain_name(".".join(out))


def layer_key(name: str) -> str:
    """The transformer layer a canonical name belongs to: the path up to ``layers.<i>`` (else the name).

    Layer-by-layer export yields one group per key; experts of a layer share its key.

    Example:
        >>> layer_key("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1"), layer_key("output_layer")
        ('decoder.layers.3', 'output_layer')
    """
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[:i + 2])
    return name


@dataclass(frozen=True, eq=False)
class LoRASite:
    """One LoRA layer of a (possibly chunked) model, under its canonical and its local name.

    Attributes:
        name: the canonical name (``canonical_name``), the same on every layout.
        local: the dotted name in its chunk, as ``chunk.named_modules()`` gives it.
        chunk: the index of its model chunk (0 without virtual pipelining).
        module: the ``LoRALayer``.
    """

    name: str
    local: str
    chunk: int
    module: nn.Module


def lora_sites(model: nn.Module | Sequence[nn.Module], layer_type: type | tuple[type, ...]) -> list[LoRASite]:
    """Every module of type ``layer_type`` in ``model`` (or its chunks), in chunk and module order.

    Args:
        model: a module or Megatron's list of model chunks.
        layer_type: the LoRA layer class(es) to find.

    Returns:
        One ``LoRASite`` per layer.

    Raises:
        ValueError: two layers with one canonical name (a model whose ``layer_number`` s repeat).

    Example:
        >>> lora_sites(nn.Linear(2, 2), nn.Linear)[0].name
        ''
    """
    sites, seen = [], {}
    for c, chunk in enumerate(as_chunks(model)):
        for local, module in chunk.named_modules():
            if not isinstance(module, layer_type):
                continue
            site = LoRASite(canonical_name(chunk, local), local, c, module)
            if site.name in seen:
                raise ValueError(f"two LoRA layers share the canonical name {site.name!r} (chunk {seen[site.name]} "
                                 f"and chunk {c}): their layer_number s must be the model's global layer indices")
            seen[site.name] = c
            sites.append(site)
    return sites
