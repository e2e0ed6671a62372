"""Adapter-only Megatron dist checkpoints, with Megatron's own layer offsets, checked on every rank.

``adapter_sharded_state_dict`` is the adapter part of the model's own
``sharded_state_dict()``: a ``GPTModel`` stacks its layers along a leading axis and gives each
pipeline stage and virtual-pipeline chunk its global layer offset (and each expert-parallel rank
its expert offset), so taking the adapter entries *from* that dict gives them exactly the offsets
Megatron gives the base weights. A checkpoint saved at one (TP, PP, VPP, EP) then loads at any
other. A module without ``sharded_state_dict`` (a plain container of Megatron layers) falls back
to the layers' own entries, which carry no pipeline offsets (such a model is not pipeline-split).

``dist_checkpointing.save`` validates the shards on rank 0 only; a bad sharding (two stages
claiming one layer) raises there and leaves the other ranks waiting in its next collective.
``save_adapter_checkpoint`` and ``load_adapter_checkpoint`` check the shards first, in one
all-gather every rank reaches, so a refused save or load raises on every rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from ..modules import LoRALayer
from ..naming import PEFT_PREFIX, as_chunks, lora_sites
from .collect import Scope, agree, touch_factors

__all__ = ["adapter_sharded_state_dict", "load_adapter_checkpoint", "save_adapter_checkpoint"]

_ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")


def _is_adapter_key(key: str) -> bool:
    return any(p in key for p in _ADAPTER_PARTS)


def _root(chunk: nn.Module) -> tuple[nn.Module, str]:
    """The Megatron module under a PeftModel, and the state-dict prefix PEFT adds."""
    inner = getattr(getattr(chunk, "base_model", None), "model", None)
    if hasattr(chunk, "peft_config") and isinstance(inner, nn.Module):
        return inner, PEFT_PREFIX
    return chunk, ""


def _chunk_sharded(chunk: nn.Module, prefix: str, metadata: dict | None) -> dict:
    root, peft = _root(chunk)
    if hasattr(root, "sharded_state_dict") and not isinstance(root, LoRALayer):
        full = root.sharded_state_dict(prefix=prefix, metadata=metadata)
        return {peft + k: v for k, v in full.items() if _is_adapter_key(k)}
    out = {}
    for site in lora_sites(root, LoRALayer):
        pre = f"{prefix}{site.local}." if site.local else prefix
        out.update({peft + k: v for k, v in site.module.sharded_state_dict(pre, metadata=metadata,
                                                                            include_base=False).items()})
    return out


def adapter_sharded_state_dict(model: nn.Module | Sequence[nn.Module], prefix: str = "",
                               metadata: dict | None = None) -> dict:
    """The adapters' ShardedTensors of a model (or its chunks), for megatron dist_checkpointing.

    Args:
        model: a model holding our LoRA layers (a PeftModel too), or Megatron's list of model
            chunks (virtual pipeline).
        prefix: prepended to every key (as Megatron's ``sharded_state_dict(prefix)``).
        metadata: Megatron's metadata dict (``"dp_cp_group"``, ``"non_homogeneous_layers"``, ...).

    Returns:
        For one module, ``{state-dict key: ShardedTensor | factory}`` of every ``lora_A``/``lora_B``
        factor (keys as ``model.state_dict()``, so ``model.load_state_dict(loaded, strict=False)``
        takes what ``dist_checkpointing.load`` returns). For a list of chunks, Megatron's layout:
        ``{"model0": {...}, "model1": {...}}`` (``"model"`` for a one-chunk list).

    Example:
        >>> # dist_checkpointing.save(adapter_sharded_state_dict(chunks), ckpt_dir)       # TP2 PP2 VPP2
        >>> # sd = dist_checkpointing.load(adapter_sharded_state_dict(model), ckpt_dir)   # TP1 PP1
    """
    if not isinstance(model, (list, tuple, nn.ModuleList)):
        return _chunk_sharded(model, prefix, metadata)
    chunks = as_chunks(model)
    if len(chunks) == 1:
        return {"model": _chunk_sharded(chunks[0], prefix, metadata)}
    return {f"model{i}": _chunk_sharded(c, prefix, metadata) for i, c in enumerate(chunks)}


def _shards(sharded: dict) -> list[tuple[str, tuple, tuple, tuple, bool]]:
    """``(key, global shape, global offset, local shape, main replica)`` of every ShardedTensor in ``sharded``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    apply_factories(sharded)
    out = []
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensor):
            out.append((v.key, tuple(v.global_shape), tuple(v.global_offset), tuple(v.local_shape),
                        bool(is_main_replica(v.replica_id))))
    return out


def _coverage_errors(shards: list[tuple[str, tuple, tuple, tuple, bool]]) -> list[str]:
    """Keys whose main-replica shards do not tile their global tensor exactly once."""
    by_key: dict[str, list] = {}
    for key, gshape, offset, lshape, main in shards:
        by_key.setdefault(key, []).append((gshape, offset, lshape, main))
    errors = []
    for key, entries in sorted(by_key.items()):
        shapes = {g for g, *_ in entries}
        if len(shapes) > 1:
            errors.append(f"{key}: ranks disagree on its global shape {sorted(shapes)}")
            continue
        mains = [(o, ls) for _, o, ls, m in entries if m]
        offsets = [o for o, _ in mains]
        covered = sum(math.prod(ls) for _, ls in mains)
        if len(set(offsets)) != len(offsets):
            errors.append(f"{key}: {len(offsets) - len(set(offsets))} shard(s) claimed twice (e.g. two pipeline "
                          "stages saving one layer)")
        elif covered != math.prod(next(iter(shapes))):
            errors.append(f"{key}: the shards cover {covered} of {math.prod(next(iter(shapes)))} elements")
    return errors


def save_adapter_checkpoint(model: nn.Module | Sequence[nn.Module], path: str | os.PathLike, *,
                            metadata: dict | None = None, group: dist.ProcessGroup | None = None,
                            **save_kw: Any) -> None:
    """Save the adapters alone as a megatron dist checkpoint, after checking the shards on every rank.

    Every rank of the job calls it (``dist_checkpointing.save`` is collective). One all-gather of
    every rank's shard descriptions checks that each adapter tensor is covered exactly once; a
    bad sharding raises the same ValueError on every rank, before anything is written.

    Args:
        model: a model holding our LoRA layers, or its list of model chunks.
        path: the checkpoint directory (created).
        metadata: Megatron's sharded-state-dict metadata.
        group: the ranks that call it (default: the whole job, as dist_checkpointing needs).
        **save_kw: passed to ``megatron.core.dist_checkpointing.save``.

    Example:
        >>> # save_adapter_checkpoint(chunks, "ckpt/adapter")          # TP2 x PP2, every rank
        >>> # load_adapter_checkpoint(tp1_model, "ckpt/adapter")       # TP1 x PP1
    """
    from megatron.core import dist_checkpointing

    scope = Scope.of(group)
    touch_factors(lora_sites(model, LoRALayer))  # the parameters saved are the updated ones (see touch_factors)
    shards = agree(scope, lambda: _shards(adapter_sharded_state_dict(model, metadata=metadata)),
                   "save_adapter_checkpoint")
    flat = [s for rank in shards for s in rank]
    if not flat:
        raise ValueError("save_adapter_checkpoint: model must contain ColumnParallelLoRA/RowParallelLoRA modules; "
                         "found none")
    errors = _coverage_errors(flat)
    if errors:
        raise ValueError(f"save_adapter_checkpoint refused on every rank: {len(errors)} adapter tensor(s) are not "
                         "sharded exactly once over the job: " + "; ".join(errors[:5]))
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(adapter_sharded_state_dict(model, metadata=metadata), os.fspath(path), **save_kw)


def load_adapter_checkpoint(model: nn.Module | Sequence[nn.Module], path: str | os.PathLike, *,
                            metadata: dict | None = None, strict: bool = True,
                            group: dist.ProcessGroup | None = None) -> list[str]:
    """Load an adapter-only (or full-model) megatron dist checkpoint into the model's adapters.

    Every rank of the job calls it. Each rank checks that the checkpoint holds every adapter
    tensor it needs, with its global shape; with ``strict``, also that every adapter tensor of the
    checkpoint is needed by some rank (a layer or adapter the model lacks). The outcome is shared
    in one all-gather, so a refused load raises on every rank before ``dist_checkpointing.load``.

    Args:
        model: a model holding our LoRA layers (with the adapters to fill already created), or
            its list of model chunks.
        path: the checkpoint directory.
        metadata: Megatron's sharded-state-dict metadata.
        strict: refuse adapter tensors in the checkpoint that no layer of the model takes.
        group: the ranks that call it (default: the whole job).

    Returns:
        The state-dict keys loaded on this rank (of each chunk, in chunk order).

    Raises:
        ValueError: missing tensors, shape mismatches or (strict) extra tensors, on every rank.
    """
    from megatron.core import dist_checkpointing

    scope = Scope.of(group)
    chunks = as_chunks(model)

    def local() -> tuple[set[str], list[str], set[str]]:
        have = dist_checkpointing.load_tensors_metadata(os.fspath(path))
        shards = _shards(adapter_sharded_state_dict(model, metadata=metadata))
        errors = [f"{k}: not in the checkpoint" if k not in have else
                  f"{k}: global shape {list(g)} here, {list(have[k].global_shape)} in the checkpoint"
                  for k, g, *_ in shards if k not in have or tuple(have[k].global_shape) != g]
        if errors:
            raise ValueError(f"{len(errors)} adapter tensor(s) do not match: " + "; ".join(sorted(set(errors))[:5]))
        return {k for k, *_ in shards}, [], {k for k in have if _is_adapter_key(k)}

    reports = agree(scope, local, "load_adapter_checkpoint")
    needed = set().union(*(r[0] for r in reports))
    extra = sorted(set().union(*(r[2] for r in reports)) - needed)
    if strict and extra:
        raise ValueError(f"load_adapter_checkpoint(strict=True) refused on every rank: {len(extra)} adapter "
                         f"tensor(s) in {os.fspath(path)} belong to no LoRA layer of the model: {extra[:5]}")
    loaded = dist_checkpointing.load(adapter_sharded_state_dict(model, metadata=metadata), os.fspath(path))
    parts = [loaded] if not isinstance(model, (list, tuple, nn.ModuleList)) else (
        [loaded["model"]] if len(chunks) == 1 else [loaded[f"model{i}"] for i in range(len(chunks))])
    keys = []
    for chunk, sd in zip(chunks, parts):
        result = chunk.load_state_dict(sd, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"load_adapter_checkpoint: keys the model does not have: {result.unexpected_keys[:5]}")
        keys += sorted(sd)
    return keys
