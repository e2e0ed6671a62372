"""Adapter export/import in PEFT's on-disk format, and adapter-only Megatron sharded state dicts.

``save_adapter`` gathers each layer's TP shards into the full A ``[r, K]`` and B ``[N, r]``
and writes, on global rank 0, what ``PeftModel.save_pretrained`` writes for a dense model:
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` and
``adapter_config.json``. So ``PeftModel.from_pretrained(dense_model, path)`` loads it onto a
plain torch model whose ``nn.Linear`` layers carry the same module names. ``load_adapter`` reads
such a directory (ours or PEFT's) and keeps each rank's slice, for any TP size; it needs no
communication.

Module names are taken relative to the model passed in; a leading ``base_model.model.`` (a
``PeftModel``) is the prefix PEFT itself uses, so a PeftModel and the bare model it wraps give
the same keys. The model must not be pipeline-split: every TP group holds every adapted layer.

safetensors is imported on first use (it ships with peft and transformers).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as D
from .config import check_config, pattern_value
from .modules import _ParallelLoRA, lora_modules

__all__ = ["adapter_sharded_state_dict", "gather_full_factors", "global_module_names", "load_adapter", "lora_modules",
           "save_adapter", "write_adapter_files"]

PEFT_PREFIX = "base_model.model."
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


def _plain_name(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _key(name: str, which: str) -> str:
    plain = _plain_name(name)
    return f"{PEFT_PREFIX}{plain}.{which}.weight" if plain else f"{PEFT_PREFIX}{which}.weight"


def gather_full_factors(module: _ParallelLoRA, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
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
    if not isinstance(module, _ParallelLoRA):
        raise TypeError(f"module must be a ColumnParallelLoRA or RowParallelLoRA, got {type(module).__name__}")
    module._check_adapter(adapter_name)
    a, b = module.spec.layout.gather_factors(module.lora_A[adapter_name].weight.detach(),
                                             module.lora_B[adapter_name].weight.detach(), module.spec.group)
    return a.clone(), b.clone()


def _expert_containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """megatron's ``SequentialMLP``-like modules: ``local_experts`` of an expert-parallel group."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "local_experts", None), nn.ModuleList) and hasattr(m, "ep_group")]


def global_module_names(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """Module names that do not depend on the expert-parallel size.

    Under expert parallelism a rank holds ``local_experts.0 .. n-1``, which are the global experts
    ``ep_rank · n + i``. Adapter files name every expert by its global index, so a file written at
    EP = 2 loads at EP = 1 and back.

    Returns:
        ``({local name: global name}`` for every LoRA module of this rank, ``the global names of
        every LoRA module on every EP rank)``; non-expert modules keep their names.

    Example:
        >>> global_module_names(torch.nn.Linear(2, 2))
        ({}, set())
    """
    local = {n: n for n, _ in lora_modules(model)}
    everywhere = set(local)
    for prefix, container in _expert_containers(model):
        n_local = len(container.local_experts)
        ep_rank, ep_size = D.group_rank(container.ep_group), D.group_size(container.ep_group)
        head = f"{prefix}.local_experts." if prefix else "local_experts."
        for name in list(local):
            if not name.startswith(head):
                continue
            idx, _, rest = name[len(head):].partition(".")
            local[name] = f"{head}{ep_rank * n_local + int(idx)}.{rest}"
            everywhere.discard(name)
            everywhere.update(f"{head}{e}.{rest}" for e in range(ep_size * n_local))
    return local, everywhere


def _resolve_adapter(model: nn.Module, mods, adapter_name: str | None) -> str:
    if adapter_name is not None:
        missing = [n for n, m in mods if adapter_name not in m.lora_A]
        if missing:
            raise ValueError(f"adapter_name {adapter_name!r} is missing on layers {missing[:5]}")
        return adapter_name
    peft_active = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
    if isinstance(peft_active, str):
        return _resolve_adapter(model, mods, peft_active)
    active = {tuple(m.active_adapters) for _, m in mods}
    if len(active) != 1 or len(next(iter(active))) != 1:
        raise ValueError(f"adapter_name=None needs one active adapter on every layer, found {sorted(active)}"
                         "; pass adapter_name")
    return active.pop()[0]


def _config_dict(model: nn.Module, mods, adapter_name: str, config: Any, names: dict[str, str]) -> dict:
    """adapter_config.json content whose patterns reproduce every layer's r and alpha (by global name)."""
    if config is None:
        config = getattr(model, "peft_config", {}).get(adapter_name)
    opts = {_plain_name(names[n]): m.adapter_options(adapter_name) for n, m in mods}
    rs = {n: o.r for n, o in opts.items()}
    alphas = {n: o.lora_alpha for n, o in opts.items()}
    rslora = {o.use_rslora for o in opts.values()}
    if len(rslora) != 1:
        raise ValueError(f"adapter {adapter_name!r} mixes use_rslora=True and False across layers; PEFT's format "
                         "has one use_rslora per adapter")
    if config is not None and hasattr(config, "to_dict"):  # a PEFT LoraConfig
        out = config.to_dict()
        out = {k: (sorted(v) if isinstance(v, set) else v) for k, v in out.items()}
    else:
        out = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "bias": "none",
               "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
               "target_modules": sorted(rs),
               "r": Counter(rs.values()).most_common(1)[0][0],
               "lora_alpha": Counter(alphas.values()).most_common(1)[0][0],
               "lora_dropout": Counter(o.lora_dropout for o in opts.values()).most_common(1)[0][0]}
        if config is not None:
            out.update(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       init_lora_weights=config.init_lora_weights)
    out["use_rslora"] = rslora.pop()
    out["inference_mode"] = True
    for field, actual, default in (("rank_pattern", rs, out["r"]), ("alpha_pattern", alphas, out["lora_alpha"])):
        given = dict(out.get(field) or {})
        exact = {n: v for n, v in actual.items() if pattern_value(given, n, default) != v}
        out[field] = {**exact, **given}  # exact names first: PEFT takes the first matching key
    return out


def write_adapter_files(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, *,
                        group: dist.ProcessGroup | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` once, for every calling rank.

    Every rank of ``group`` calls it. The group's rank 0 writes; then every rank waits for its
    outcome (a broadcast, so this is also the barrier after the write), and an error on the writer
    (disk full, permissions, a bad tensor) is raised on every rank, not only on the writer. When it
    returns, every rank can read the files.

    Args:
        path: the output directory (created).
        tensors: ``{key: CPU tensor}``.
        config: the ``adapter_config.json`` content.
        group: the ranks that call it (default: every rank of the job).

    Raises:
        OSError: the write failed on the writer (the message says why), on every rank.

    Example:
        >>> # write_adapter_files("out/adapter", {"base_model.model.fc1.lora_A.weight": a, ...}, cfg)
    """
    from safetensors.torch import save_file

    distributed = dist.is_available() and dist.is_initialized()
    error = None
    if not distributed or dist.get_rank(group) == 0:
        try:
            os.makedirs(path, exist_ok=True)
            save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
            with open(os.path.join(path, CONFIG_NAME), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True, default=str)
        except Exception as e:  # reported to every rank below, then raised everywhere
            error = f"{type(e).__name__}: {e}"
    if distributed:
        outcome = [error]
        dist.broadcast_object_list(outcome, group_src=0, group=group)
        error = outcome[0]
    if error is not None:
        raise OSError(f"writing the adapter to {os.fspath(path)!r} failed on the writing rank: {error}")


def save_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None,
                 config: Any = None, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Write one adapter of a TP model in PEFT's format: full A and B, gathered, written on rank 0.

    Every rank of ``group`` (default: the whole job) must call it: each layer all-gathers its
    sharded factor over its TP group, and with data parallelism every replica gathers its own.
    Everything that can be wrong with the model or the adapter is checked on every rank before the
    first collective; the group's rank 0 then writes ``adapter_model.safetensors`` and
    ``adapter_config.json`` (``write_adapter_files``), and every rank returns only once the files
    exist, or raises the writer's error.

    Args:
        model: a model holding our LoRA modules (a ``PeftModel`` or a bare Megatron model).
        path: output directory (created).
        adapter_name: the adapter to save (default: the PeftModel's or the layers' active one).
        config: a PEFT ``LoraConfig`` or ``LoRAConfig`` to describe the adapter (default: the
            PeftModel's config for ``adapter_name``, else one derived from the layers). The
            written ``rank_pattern``/``alpha_pattern`` get exact-name entries wherever a layer's
            r or alpha differs from what the config would give it.
        group: the ranks that call it (default: every rank of the job); its rank 0 writes.

    Returns:
        ``{key: full tensor}`` exactly as written (on every rank), keys
        ``base_model.model.<module>.lora_A.weight`` ``[r, K]`` / ``.lora_B.weight`` ``[N, r]``.

    Raises:
        ValueError: no LoRA layers, an unknown or ambiguous adapter, or options PEFT's format cannot
            hold (every rank alike, before any collective). OSError: the write failed.

    Example:
        >>> # save_adapter(peft_model, "out/adapter")            # at TP=2, on both ranks
        >>> # dense = PeftModel.from_pretrained(dense_model, "out/adapter")
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model must contain ColumnParallelLoRA/RowParallelLoRA modules; found none")
    name = _resolve_adapter(model, mods, adapter_name)
    names, _ = global_module_names(model)
    cfg = _config_dict(model, mods, name, config, names)  # rank-symmetric: it may raise, before any collective
    tensors: dict[str, torch.Tensor] = {}
    for mod_name, m in mods:
        a, b = gather_full_factors(m, name)
        tensors[_key(names[mod_name], "lora_A")] = a.cpu().contiguous()
        tensors[_key(names[mod_name], "lora_B")] = b.cpu().contiguous()
    # Every EP rank holds other experts: each expert-parallel group shares its experts' factors.
    for prefix, container in _expert_containers(model):
        if D.group_size(container.ep_group) > 1:
            head = PEFT_PREFIX + _plain_name(f"{prefix}.local_experts." if prefix else "local_experts.")
            mine = {k: v for k, v in tensors.items() if k.startswith(head)}
            gathered = [None] * D.group_size(container.ep_group)
            dist.all_gather_object(gathered, mine, group=container.ep_group)
            for part in gathered:
                tensors.update(part)
    write_adapter_files(path, tensors, cfg, group=group)
    return tensors


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"path must be an adapter directory with {CONFIG_NAME}; {cfg_path} does not exist")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    check_config(SimpleNamespace(**cfg))
    st, bn = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        tensors = load_file(st)
    elif os.path.isfile(bn):
        tensors = torch.load(bn, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"path {path} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")
    return cfg, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
                 activate: bool = True, strict: bool = True) -> list[str]:
    """Load a PEFT-format LoRA adapter (full A and B) into a TP model, each rank keeping its slice.

    Works for any TP size: every rank reads the files and slices. No communication. An existing
    adapter of that name is replaced (new parameters). r comes from the tensors (checked against
    the config's ``r``/``rank_pattern``), alpha from ``lora_alpha``/``alpha_pattern``, and
    ``use_rslora``/``lora_dropout`` from the config.

    Args:
        model: a model holding our LoRA modules, named as when the adapter was saved.
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        adapter_name: name to load it under.
        activate: make it the active adapter of every layer.
        strict: every adapter tensor in the file must find a layer (and every layer its tensors).

    Returns:
        The dotted names of the layers loaded.

    Example:
        >>> # load_adapter(tp4_model, "out/adapter")   # saved at TP=2; runs at TP=4
    """
    cfg, tensors = _read(path)
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model must contain ColumnParallelLoRA/RowParallelLoRA modules; found none")
    # Check every layer first, then change the model: a bad file leaves the model untouched, and
    # since every rank reads the same file, every rank raises the same error.
    names, everywhere = global_module_names(model)
    used, plan, missing = set(), [], []
    for mod_name, m in mods:
        ka, kb = _key(names[mod_name], "lora_A"), _key(names[mod_name], "lora_B")
        if ka not in tensors or kb not in tensors:
            missing.append(ka if ka not in tensors else kb)
            continue
        a, b = tensors[ka], tensors[kb]
        plain = _plain_name(names[mod_name])
        r = a.shape[0] if a.dim() == 2 else -1
        want_r = pattern_value(cfg.get("rank_pattern"), plain, cfg.get("r", r))
        if r != want_r:
            raise ValueError(f"{ka}: rank {r} (shape {list(a.shape)}) disagrees with adapter_config.json "
                             f"(r/rank_pattern give {want_r})")
        want_a, want_b = (r, m.in_features), (m.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"{ka}/{kb}: the adapter does not fit layer {mod_name!r}: expected full A {list(want_a)} "
                             f"and B {list(want_b)}, got {list(a.shape)} and {list(b.shape)}")
        alpha = pattern_value(cfg.get("alpha_pattern"), plain, cfg.get("lora_alpha", r))
        plan.append((mod_name, m, r, alpha, a, b))
        used.update((ka, kb))
    # Another EP rank's experts are used there, not unused; and checked here too, so that a file
    # without some expert fails on every rank, not only on the one holding it.
    elsewhere = {_key(n, w) for n in everywhere for w in ("lora_A", "lora_B")}
    missing = sorted(set(missing) | {k for k in elsewhere - used if k not in tensors})
    unused = sorted(k for k in tensors if k not in used and k not in elsewhere)
    if strict and (missing or unused):
        raise ValueError(f"load_adapter(strict=True): {len(missing)} layer(s) without tensors in {path} "
                         f"(e.g. {missing[:3]}) and {len(unused)} tensor(s) without a layer (e.g. {unused[:3]}); "
                         "check module names, or pass strict=False")
    merged = [mod_name for mod_name, m, *_ in plan if adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged in {len(merged)} layer(s) (e.g. {merged[:3]}); "
                         "unmerge() before loading over it")
    loaded = []
    for mod_name, m, r, alpha, a, b in plan:
        m._create_adapter(adapter_name, r, lora_alpha=alpha, lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                          use_rslora=bool(cfg.get("use_rslora", False)))
        m.load_full_factors(adapter_name, a, b)
        if activate:
            m.set_adapter(adapter_name)
        loaded.append(mod_name)
    return loaded


def adapter_sharded_state_dict(model: nn.Module, prefix: str = "", metadata: dict | None = None) -> dict:
    """The adapters' ShardedTensors of every LoRA layer in ``model``, for megatron dist_checkpointing.

    Keys are ``model.state_dict()`` keys (so ``model.load_state_dict(loaded, strict=False)``
    takes the loaded dict); no base weights, which is the usual adapter-only checkpoint.

    Args:
        model: a model holding our LoRA modules.
        prefix: prepended to every key.
        metadata: Megatron's metadata dict (``"dp_cp_group"``), see ``sharded_state_dict``.

    Returns:
        ``{key: ShardedTensor}`` for every ``lora_A``/``lora_B`` factor.

    Example:
        >>> # dist_checkpointing.save(adapter_sharded_state_dict(model), ckpt_dir)       # TP=2
        >>> # sd = dist_checkpointing.load(adapter_sharded_state_dict(model4), ckpt_dir) # TP=4
        >>> # model4.load_state_dict(sd, strict=False)
    """
    out = {}
    for name, m in lora_modules(model):
        out.update(m.sharded_state_dict(f"{prefix}{name}." if name else prefix, metadata=metadata,
                                        include_base=False))
    return out
