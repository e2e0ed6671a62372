"""Adapter export and import at any parallel layout: PEFT files, Hugging Face names, and in memory.

Every function here takes a model or Megatron's list of model chunks, names layers by the one
rule of ``tplora_kernels.naming`` (global layer and expert indices), and follows the two steps
of ``collect``: one agreement all-gather that every rank reaches first (so a refused call raises
the same error on every rank and leaves none waiting), then the transfers. So a file written at
TP2 × PP4 × VPP2 holds every layer under the names a PP=1 model has, and loads into any layout.

=============================  ====================================================================
function                       what
=============================  ====================================================================
``save_adapter``               PEFT files (``adapter_model.safetensors`` + ``adapter_config.json``)
``load_adapter``               PEFT files into the model; each rank keeps its layers' slices
``export_hf_adapter``          a PEFT adapter of the Hugging Face model of the same architecture
``load_hf_adapter``            a Hugging Face PEFT adapter into the model
``adapter_state_dict``         the adapter in memory, PEFT or HF names, on one rank or every rank
``iter_adapter_state_dict``    the same, one transformer layer at a time (bounded memory)
``load_adapter_state_dict``    the in-memory inverse of ``adapter_state_dict``
``gather_full_factors``        one layer's full A and B (an all-gather over its TP group)
=============================  ====================================================================

The in-memory export is what a reinforcement-learning trainer pushes to an inference engine after
every step: no disk, no merge, tensors bit-identical to what the file export writes (the file
export is this function plus a write).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..adapters import AdapterOptions
from ..config import check_config, pattern_value
from ..modules import LoRALayer
from ..naming import LoRASite, as_chunks, lora_sites, plain_name
from . import hf_format as H
from . import peft_format as P
from .collect import FullFactors, Scope, agree, check_complete, full_factors, iter_full_factors, layer_order, peers_of

__all__ = ["AdapterStream", "adapter_state_dict", "export_hf_adapter", "gather_full_factors",
           "iter_adapter_state_dict", "load_adapter", "load_adapter_state_dict", "load_hf_adapter", "save_adapter"]

FORMATS = ("peft", "hf")
Model = nn.Module | Sequence[nn.Module]


def gather_full_factors(module: LoRALayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The full A ``[r, K]`` and B ``[N, r]`` of one layer's adapter, on every rank of its TP group.

    One all-gather over the layer's TP group (for the one sharded factor), so every rank of the
    group must call it, in the same order. The shards are joined by the layer's layout, so a
    gated fc1's B comes back in the full weight's row order ``[B_gate; B_up]``.

    Args:
        module: a ``ColumnParallelLoRA``/``RowParallelLoRA``.
        adapter_name: one of its adapters.

    Returns:
        ``(A [r, K], B [N, r])``, detached copies in the factors' dtype and device.

    Example:
        >>> # a, b = gather_full_factors(model.fc1, "default")
    """
    if not isinstance(module, LoRALayer):
        raise TypeError(f"module must be a ColumnParallelLoRA or RowParallelLoRA, got {type(module).__name__}")
    module.adapter_options(adapter_name)
    full = full_factors(module, adapter_name)
    return full.a, full.b


# -- the agreement step ------------------------------------------------------------------------
def _sites(model: Model) -> list[LoRASite]:
    return lora_sites(model, LoRALayer)


def _scope(group: dist.ProcessGroup | None, sites: Sequence[LoRASite], *, writes: bool) -> Scope:
    """The calling ranks: ``group``; by default the whole job, except for a read without Megatron's parallel
    state, where it is the layers' own TP group (the only ranks such a model spans)."""
    if group is not None or writes or not (dist.is_available() and dist.is_initialized()):
        return Scope.of(group)
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return Scope.of(None)
    except ImportError:
        pass
    groups = {id(s.module.spec.mode.group): s.module.spec.mode.group for s in sites}
    return Scope.of(next(iter(groups.values())) if len(groups) == 1 else None)


def _adapter_of(chunks: list[nn.Module], sites: Sequence[LoRASite], adapter_name: str | None) -> str:
    """The adapter a save/export means: the named one, else the PeftModel's or the layers' one active adapter."""
    if adapter_name is not None:
        missing = [s.name for s in sites if adapter_name not in s.module.lora_A]
        if missing:
            raise ValueError(f"adapter_name {adapter_name!r} is missing on layers {missing[:5]}")
        return adapter_name
    peft_active = {c.active_adapter for c in chunks if hasattr(c, "peft_config")}
    if len(peft_active) == 1 and isinstance(next(iter(peft_active)), str):
        return _adapter_of(chunks, sites, peft_active.pop())
    active = {tuple(s.module.active_adapters) for s in sites}
    if len(active) != 1 or len(next(iter(active))) != 1:
        raise ValueError(f"adapter_name=None needs one active adapter on every layer, found {sorted(active)}"
                         "; pass adapter_name")
    return active.pop()[0]


@dataclass(frozen=True)
class _Report:
    adapter: str | None
    infos: dict[str, H.LayerInfo]
    peers: set[int]


def _agree_on_adapter(model: Model, adapter_name: str | None, group: dist.ProcessGroup | None,
                      what: str) -> tuple[Scope, list[LoRASite], str, dict[str, H.LayerInfo], dict[str, list[int]]]:
    """Every rank's layers and options for a save/export, checked alike on every rank."""
    chunks = as_chunks(model)
    sites = _sites(chunks)
    scope = _scope(group, sites, writes=True)

    def local() -> _Report:
        if not sites:
            return _Report(None, {}, peers_of(sites))
        name = _adapter_of(chunks, sites, adapter_name)
        infos = {s.name: H.LayerInfo(s.module.adapter_options(name), s.module.in_features, s.module.out_features)
                 for s in sites}
        return _Report(name, infos, peers_of(sites))

    reports = agree(scope, local, what)
    check_complete(scope, [r.peers for r in reports], what)
    held = [r for r in reports if r.infos]
    if not held:
        raise ValueError(f"{what}: model must contain ColumnParallelLoRA/RowParallelLoRA modules; found none")
    names = {r.adapter for r in held}
    if len(names) != 1:
        raise ValueError(f"{what}: the ranks mean different adapters ({sorted(names)}); pass adapter_name")
    infos: dict[str, H.LayerInfo] = {}
    holders: dict[str, list[int]] = {}
    for rank, r in zip(scope.ranks, reports):
        for n, info in r.infos.items():
            if infos.setdefault(n, info) != info:
                raise ValueError(f"{what}: layer {n} differs between ranks ({infos[n]} vs {info}): replicas of "
                                 "one layer must hold the same adapter")
            holders.setdefault(n, []).append(rank)
    return scope, sites, names.pop(), infos, holders


# -- export --------------------------------------------------------------------------------------
class AdapterStream:
    """One adapter leaving the model layer by layer: PEFT or HF keys, its config known up front.

    Built by ``iter_adapter_state_dict`` (every check has run, on every rank, when it returns).
    Iterating it runs the transfers, so **every rank of the group must iterate it to the end**;
    on the receiving rank(s) it yields ``(layer key, {key: tensor})`` in global layer order
    (``decoder.layers.0``, ..., then ``output_layer``), elsewhere it yields nothing.

    Attributes:
        config: the ``adapter_config.json`` content (a dict), on every rank.
        adapter_name: the adapter being exported.
        layers: the layer keys, in the order they come.
    """

    def __init__(self, scope: Scope, sites: list[LoRASite], adapter: str, holders: dict[str, list[int]],
                 config: dict, convert, dst: int | None) -> None:
        self._scope, self._sites, self._holders, self._convert, self._dst = scope, sites, holders, convert, dst
        self.adapter_name, self.config = adapter, config
        self.layers = layer_order(list(holders))
        self._used = False

    @property
    def receives(self) -> bool:
        """This rank gets the tensors (the destination, or every rank with ``dst=None``)."""
        return self._dst is None or self._scope.rank == self._dst

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        if self._used:
            raise RuntimeError("an AdapterStream can be iterated once (its transfers are collectives)")
        self._used = True
        for layer, factors in iter_full_factors(self._scope, self._sites, self._holders, self.adapter_name,
                                                dst=self._dst):
            yield layer, self._convert(factors)


def _peft_tensors(factors: dict[str, FullFactors]) -> dict[str, torch.Tensor]:
    out = {}
    for name, full in factors.items():
        out[P.key(name, "lora_A")], out[P.key(name, "lora_B")] = full.a, full.b
        if full.magnitude is not None:
            out[P.magnitude_key(name)] = full.magnitude
    return out


def iter_adapter_state_dict(model: Model, *, format: str = "peft", arch: str | None = None,
                            moe_format: str = "fused", adapter_name: str | None = None, config: Any = None,
                            dst: int | None = 0, group: dist.ProcessGroup | None = None) -> AdapterStream:
    """The adapter in memory, one transformer layer at a time, gathered across TP, PP, VPP and EP.

    Every rank of ``group`` calls it and iterates the result to the end. Each layer's sharded
    factor is all-gathered over its TP group by one data-parallel replica only, and its owner
    sends it to ``dst`` (or broadcasts it to every rank with ``dst=None``), so memory holds one
    layer at a time. The tensors are those ``save_adapter`` (``format="peft"``) or
    ``export_hf_adapter`` (``"hf"``) writes, bit for bit, on the CPU.

    Args:
        model: a model holding our LoRA layers (a PeftModel too), or its list of model chunks.
        format: ``"peft"`` (canonical Megatron names, PEFT keys) or ``"hf"`` (Hugging Face names).
        arch: for ``"hf"``: ``"llama"``, ``"qwen2"`` or ``"mixtral"``.
        moe_format: for ``"hf"`` Mixtral experts: ``"fused"`` or ``"per_expert"``.
        adapter_name: the adapter (default: the PeftModel's or the layers' active one).
        config: for ``"peft"``: a LoraConfig/LoRAConfig to describe the adapter (see ``save_adapter``).
        dst: the rank of ``group`` that receives the tensors, or None for every rank.
        group: the ranks that call it (default: the whole job).

    Returns:
        An ``AdapterStream``: ``.config`` (the ``adapter_config.json`` dict) and, iterated,
        ``(layer key, {key: tensor})`` pairs on the receiving rank(s).

    Raises:
        ValueError / TypeError: bad arguments, no LoRA layers, an unknown or ambiguous adapter, a
            layer with no HF counterpart, a group that lacks part of the model (on every rank).

    Example:
        >>> # stream = tplora_kernels.iter_adapter_state_dict(model_chunks, format="hf", arch="llama", dst=0)
        >>> # for layer, tensors in stream:          # every rank iterates; rank 0 gets the tensors
        >>> #     engine.update_lora(layer, tensors)  # e.g. push to an inference engine each step
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "hf":
        H.check_arch(arch, moe_format)
    what = "export_hf_adapter" if format == "hf" else "save_adapter"
    scope, sites, adapter, infos, holders = _agree_on_adapter(model, adapter_name, group, what)
    if dst is not None and not (isinstance(dst, int) and 0 <= dst < len(scope.ranks)):
        raise ValueError(f"dst must be None or a rank of group (0..{len(scope.ranks) - 1}), got {dst!r}")
    if format == "hf":
        plan = H.HFExport(infos, H.heads_of(as_chunks(model), [s.module for s in sites]), arch=arch,
                          moe_format=moe_format)
        return AdapterStream(scope, sites, adapter, holders, plan.config, plan.tensors, dst)
    cfg_src = config if config is not None else next(
        (c.peft_config.get(adapter) for c in as_chunks(model) if hasattr(c, "peft_config")), None)
    cfg = P.config_dict({n: i.options for n, i in infos.items()}, cfg_src)
    return AdapterStream(scope, sites, adapter, holders, cfg, _peft_tensors, dst)


def adapter_state_dict(model: Model, *, format: str = "peft", arch: str | None = None, moe_format: str = "fused",
                       adapter_name: str | None = None, config: Any = None, dst: int | None = 0,
                       group: dist.ProcessGroup | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The whole adapter in memory (no file I/O): ``iter_adapter_state_dict`` collected into one dict.

    Args: as ``iter_adapter_state_dict``.

    Returns:
        ``(tensors, config)`` on the receiving rank(s): ``{key: CPU tensor}`` exactly as the file
        export writes it and the ``adapter_config.json`` dict; None on the other ranks.

    Example:
        >>> # got = adapter_state_dict(model, format="hf", arch="llama", dst=None)   # every rank
        >>> # tensors, config = got
    """
    stream = iter_adapter_state_dict(model, format=format, arch=arch, moe_format=moe_format,
                                     adapter_name=adapter_name, config=config, dst=dst, group=group)
    tensors: dict[str, torch.Tensor] = {}
    for _, layer in stream:
        tensors.update(layer)
    return (tensors, stream.config) if stream.receives else None


def _write(model: Model, path: str | os.PathLike, group: dist.ProcessGroup | None, **kw) -> dict[str, torch.Tensor]:
    stream = iter_adapter_state_dict(model, dst=0, group=group, **kw)
    tensors: dict[str, torch.Tensor] = {}
    for _, layer in stream:
        tensors.update(layer)
    P.write_files(path, tensors, stream.config, group=stream._scope.group, writer=stream._scope.rank == 0)
    return tensors


def save_adapter(model: Model, path: str | os.PathLike, *, adapter_name: str | None = None, config: Any = None,
                 group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Write one adapter of a parallel model in PEFT's format: full A and B of every layer, one file.

    Every rank of ``group`` (default: the whole job) calls it. Layers are gathered across TP,
    pipeline stages, virtual-pipeline chunks and expert-parallel ranks to the group's rank 0, which
    writes ``adapter_model.safetensors`` and ``adapter_config.json`` with every layer under its
    canonical (global) name; every rank returns once the files exist, or raises the writer's error.
    Everything that can be wrong (no LoRA layers, an unknown or ambiguous adapter, options PEFT's
    format cannot hold, a group that lacks part of the model) raises on every rank before any
    transfer.

    Args:
        model: a model holding our LoRA layers (a ``PeftModel`` too), or its list of model chunks.
        path: output directory (created).
        adapter_name: the adapter to save (default: the PeftModel's or the layers' active one).
        config: a PEFT ``LoraConfig`` or ``LoRAConfig`` to describe the adapter (default: the
            PeftModel's config for ``adapter_name``, else one derived from the layers). The written
            ``rank_pattern``/``alpha_pattern`` get exact-name entries first wherever a layer's r or
            alpha differs from what the config gives it, then the config's own patterns in order.
        group: the ranks that call it (default: the whole job); its rank 0 writes.

    Returns:
        ``{key: full tensor}`` as written, on the group's rank 0 (empty elsewhere); keys
        ``base_model.model.<canonical name>.lora_A.weight`` ``[r, K]`` / ``.lora_B.weight`` ``[N, r]``.

    Raises:
        ValueError: see above (every rank alike, before any collective). OSError: the write failed.

    Example:
        >>> # save_adapter(model_chunks, "out/adapter")      # on every rank, any TP/PP/VPP/EP layout
        >>> # dense = PeftModel.from_pretrained(dense_model, "out/adapter")
    """
    return _write(model, path, group, format="peft", adapter_name=adapter_name, config=config)


def export_hf_adapter(model: Model, path: str | os.PathLike, *, arch: str, adapter_name: str | None = None,
                      moe_format: str = "fused", group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Write a parallel model's adapter as a PEFT adapter of the Hugging Face model of the same architecture.

    Every rank of ``group`` (default: the whole job) calls it; layers are gathered across TP, PP,
    VPP and EP to the group's rank 0, which writes ``adapter_model.safetensors`` and
    ``adapter_config.json``. ``PeftModel.from_pretrained(hf_model, path)`` then computes what the
    Megatron model computes (``hf_format`` has the mapping, the scale rule and the Mixtral formats).

    Args:
        model: a megatron-core ``GPTModel`` (or a PeftModel of one), or its list of model chunks;
            ``model.config`` is its ``TransformerConfig``.
        path: output directory (created).
        arch: ``"llama"``, ``"qwen2"`` or ``"mixtral"``.
        adapter_name: the adapter to export (default: the active one).
        moe_format: Mixtral experts as ``"fused"`` transformers-5 parameter targets or as
            ``"per_expert"`` transformers-4 modules (``w1``/``w3``/``w2``).
        group: the ranks that call it; its rank 0 writes.

    Returns:
        ``{key: tensor}`` as written, on the group's rank 0 (empty elsewhere): ``base_model.model.<HF
        module>.lora_A.weight`` ``[r, K]`` and ``.lora_B.weight`` ``[N_block, r]`` (fp32).

    Raises:
        ValueError / TypeError: a bad argument, no LoRA layers, a layer with no HF counterpart, a
            model config that does not describe the layers (every rank alike). OSError: the write.

    Example:
        >>> # export_hf_adapter(gpt_chunks, "out/hf_adapter", arch="llama")   # every rank, any layout
        >>> # PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(...), "out/hf_adapter")
    """
    return _write(model, path, group, format="hf", arch=arch, moe_format=moe_format, adapter_name=adapter_name)


# -- import --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LoadReport:
    names: list[str]
    used: set[str]
    missing: list[str]
    merged: list[str]


def _layers_of(keys: Sequence[str], format: str) -> list[str]:
    """The module names that file keys belong to (``...lora_A.weight`` -> the module)."""
    out = set()
    for k in keys:
        mod = plain_name(k)
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector.weight",
                       ".lora_magnitude_vector"):
            if mod.endswith(suffix):
                mod = mod[:-len(suffix)]
                break
        out.add(mod)
    return sorted(out)


def load_adapter_state_dict(model: Model, tensors: dict[str, torch.Tensor], config: dict, *, format: str = "peft",
                            arch: str | None = None, adapter_name: str = "default", activate: bool = True,
                            strict: bool = True, group: dist.ProcessGroup | None = None,
                            where: str = "the state dict") -> list[str]:
    """Load an adapter given in memory (PEFT or HF keys) into a parallel model; each rank keeps its slices.

    The inverse of ``adapter_state_dict``. Every rank of ``group`` passes the same tensors and
    config; each picks its own layers by canonical (global) name and keeps its TP slices, with no
    transfer of tensors. One small all-gather of what each rank found makes every check hold on
    every rank: a file without some layer, or with layers the model lacks, is refused everywhere
    before the model changes. An existing adapter ``adapter_name`` is replaced.

    Args:
        model: a model holding our LoRA layers (a PeftModel too), or its list of model chunks.
        tensors: ``{key: full tensor}``.
        config: the ``adapter_config.json`` dict (r, lora_alpha, patterns, lora_dropout, use_rslora).
        format: ``"peft"`` (canonical names) or ``"hf"`` (Hugging Face names; needs ``arch``).
        arch: for ``"hf"``.
        adapter_name: the name to load it under.
        activate: make it every layer's active adapter.
        strict: every LoRA layer of the model must find its tensors, and every tensor a layer.
            ``strict=False`` loads the layers both have and leaves the others as they are. A source
            none of whose layers is the model's is refused either way (a naming mismatch).
        group: the ranks that call it (default: the whole job when megatron's parallel_state is
            initialised, else the layers' tensor-parallel group).
        where: names the source in messages.

    Returns:
        The canonical names of this rank's layers that were loaded.

    Raises:
        ValueError / TypeError: the adapter does not fit the model (shapes, ranks against
            ``rank_pattern``, unsupported options; under ``strict``, layers on one side only,
            named by global name and counted), on every rank, before the model changes.

    Example:
        >>> # tensors, config = adapter_state_dict(trained, dst=None)
        >>> # load_adapter_state_dict(other_layout_model, tensors, config)
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "hf":
        H.check_arch(arch)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type must be LORA, got {config.get('peft_type')!r}")
    check_config(SimpleNamespace(**config))
    chunks = as_chunks(model)
    sites = _sites(chunks)
    scope = _scope(group, sites, writes=False)
    what = "load_hf_adapter" if format == "hf" else "load_adapter"
    plan: list[tuple[LoRASite, AdapterOptions, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    dropout = float(config.get("lora_dropout", 0.0))
    rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))

    def local() -> _LoadReport:
        used, missing = set(), []
        reader = H.Reader(where, config, tensors, H.heads_of(chunks, [s.module for s in sites])) if (
            format == "hf" and sites) else None
        for s in sites:
            m = s.module
            if format == "hf":
                found = reader.layer(s.name, arch, m.in_features, m.out_features)
                if not found:
                    missing.append(s.name)
                    continue
                r, alpha, a, b, mag = H.combine(found, m.out_features, rslora)
            else:
                ka, kb = P.key(s.name, "lora_A"), P.key(s.name, "lora_B")
                if ka not in tensors or kb not in tensors:
                    missing.append(s.name)
                    continue
                a, b = tensors[ka], tensors[kb]
                r = a.shape[0] if a.dim() == 2 else -1
                want_r = pattern_value(config.get("rank_pattern"), s.name, config.get("r", r))
                if r != want_r:
                    raise ValueError(f"{where}: {ka} has rank {r} (shape {list(a.shape)}), but adapter_config's "
                                     f"r/rank_pattern give {want_r}")
                if tuple(a.shape) != (r, m.in_features) or tuple(b.shape) != (m.out_features, r):
                    raise ValueError(f"{where}: {ka}/{kb} do not fit layer {s.name}: expected full A "
                                     f"{[r, m.in_features]} and B {[m.out_features, r]}, got {list(a.shape)} and "
                                     f"{list(b.shape)}")
                alpha = pattern_value(config.get("alpha_pattern"), s.name, config.get("lora_alpha", r))
                used.update((ka, kb))
                mag = None
                if use_dora:
                    km = P.magnitude_key(s.name)
                    if km not in tensors:
                        raise ValueError(f"{where}: use_dora is set but {km} is missing")
                    mag = tensors[km]
                    if tuple(mag.shape) != (m.out_features,):
                        raise ValueError(f"{where}: {km} must be [{m.out_features}], got {list(mag.shape)}")
                    used.add(km)
            plan.append((s, AdapterOptions.build(r, alpha, dropout, rslora, use_dora), a, b, mag))
        if reader is not None:
            used |= reader.used
        merged = [s.name for s in sites if adapter_name in s.module.merged_adapters]
        return _LoadReport([s.name for s in sites], used, missing, merged)

    reports = agree(scope, local, what)
    everywhere = sorted({n for r in reports for n in r.names})
    if not everywhere:
        raise ValueError(f"{what}: model must contain ColumnParallelLoRA/RowParallelLoRA modules; found none")
    merged = sorted({n for r in reports for n in r.merged})
    if merged:
        raise ValueError(f"{what}: adapter {adapter_name!r} is merged in {len(merged)} layer(s) (e.g. {merged[:3]}); "
                         "unmerge() before loading over it")
    missing = sorted({n for r in reports for n in r.missing})
    used = set().union(*(r.used for r in reports))
    extra = _layers_of([k for k in tensors if k not in used], format)
    if len(missing) == len(everywhere):
        raise ValueError(f"{what}: none of the model's {len(everywhere)} LoRA layers found its tensors in {where}"
                         f"{f' under arch={arch!r}' if arch else ''} (it holds e.g. {sorted(tensors)[:2]})")
    if strict and (missing or extra):
        parts = []
        if missing:
            parts.append(f"{len(missing)} LoRA layer(s) of the model have no tensors there: {missing[:8]}"
                         + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"{len(extra)} layer(s) there are not LoRA layers of the model: {extra[:8]}"
                         + (" ..." if len(extra) > 8 else ""))
        raise ValueError(f"{what}(strict=True): {where} and the model hold different layers (global names, "
                         f"the same at every parallel layout): " + "; ".join(parts))
    for s, opts, a, b, mag in plan:
        s.module.register_adapter(adapter_name, a, b, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                                  use_rslora=opts.use_rslora, magnitude=mag, use_dora=opts.use_dora)
        if activate:
            s.module.set_adapter(adapter_name)
    return [s.name for s, *_ in plan]


def load_adapter(model: Model, path: str | os.PathLike, *, adapter_name: str = "default", activate: bool = True,
                 strict: bool = True, group: dist.ProcessGroup | None = None) -> list[str]:
    """Load a PEFT-format LoRA adapter (full A and B, ours or PEFT's) into a model of any parallel layout.

    Every rank reads the files and keeps its own layers' slices, picked by canonical (global)
    name, so a file saved at one TP × PP × VPP × EP layout loads at any other (see
    ``load_adapter_state_dict`` for the checks, all raised on every rank before the model changes).
    r comes from the tensors (checked against ``r``/``rank_pattern``), alpha from
    ``lora_alpha``/``alpha_pattern``, and ``use_rslora``/``lora_dropout`` from the config.

    Args:
        model: a model holding our LoRA layers, or its list of model chunks.
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        adapter_name: name to load it under (an existing one is replaced).
        activate: make it the active adapter of every layer.
        strict: every tensor of the file must find a layer, and every layer its tensors.
        group: as ``load_adapter_state_dict``.

    Returns:
        The canonical names of this rank's layers that were loaded.

    Example:
        >>> # load_adapter(tp4_pp2_chunks, "out/adapter")   # saved at TP=2, PP=1
    """
    cfg, tensors = P.read_files(path)
    return load_adapter_state_dict(model, tensors, cfg, adapter_name=adapter_name, activate=activate, strict=strict,
                                   group=group, where=os.fspath(path))


def load_hf_adapter(model: Model, path: str | os.PathLike, *, arch: str, adapter_name: str = "default",
                    activate: bool = True, strict: bool = True, group: dist.ProcessGroup | None = None) -> list[str]:
    """Load a Hugging Face PEFT adapter of ``arch`` into a Megatron model of any parallel layout.

    Every rank reads the files and keeps its layers' slices. The adapter may give q, k and v
    (gate and up) their own A, r and alpha: each Megatron layer gets one LoRA whose product
    reproduces every block (``hf_format``). Checks as ``load_adapter_state_dict``.

    Args:
        model: a megatron-core ``GPTModel`` (or a PeftModel of one), or its list of model chunks,
            whose targeted layers hold our LoRA layers (``apply_lora`` with matching ``target_modules``).
        path: a PEFT adapter directory of the HF model: module targets, and for Mixtral experts
            either PEFT's fused ``target_parameters`` or transformers 4's ``w1``/``w3``/``w2`` modules.
        arch: ``"llama"``, ``"qwen2"`` or ``"mixtral"``.
        adapter_name: the name to load it under.
        activate: make it every layer's active adapter.
        strict: every LoRA layer must find its tensors, and every tensor a layer.
        group: as ``load_adapter_state_dict``.

    Returns:
        The canonical names of this rank's layers that were loaded.

    Example:
        >>> # apply_lora(gpt, LoRAConfig(r=1, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
        >>> # load_hf_adapter(gpt, "hf_lora_dir", arch="llama")    # on every rank, any layout
    """
    H.check_arch(arch)
    cfg, tensors = P.read_files(path)
    return load_adapter_state_dict(model, tensors, cfg, format="hf", arch=arch, adapter_name=adapter_name,
                                   activate=activate, strict=strict, group=group, where=os.fspath(path))
