"""PEFT's adapter format: keys, ``adapter_config.json`` and the files, with no model in sight.

``PeftModel.save_pretrained`` writes, for a dense model, ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ``[r, K]`` / ``.lora_B.weight`` ``[N, r]`` and
``adapter_config.json``. Here ``<module>`` is the canonical name (``tplora_kernels.naming``), so a
file means the same at every parallel layout and loads onto a dense model whose ``nn.Linear``
modules carry those names.

``adapter_config.json`` keeps the key order it is given: PEFT applies the *first* pattern of
``rank_pattern``/``alpha_pattern`` that matches a module, so their order is part of their meaning.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from ..adapters import AdapterOptions
from ..config import check_config, pattern_value
from ..naming import PEFT_PREFIX, plain_name

__all__ = ["BIN_NAME", "CONFIG_NAME", "SAFETENSORS_NAME", "config_dict", "key", "magnitude_key", "read_files",
           "write_files"]

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


def key(name: str, which: str) -> str:
    """PEFT's state-dict key of factor ``which`` (``"lora_A"``/``"lora_B"``) of module ``name``.

    Example:
        >>> key("decoder.layers.2.mlp.linear_fc1", "lora_A")
        'base_model.model.decoder.layers.2.mlp.linear_fc1.lora_A.weight'
    """
    plain = plain_name(name)
    return f"{PEFT_PREFIX}{plain}.{which}.weight" if plain else f"{PEFT_PREFIX}{which}.weight"


def magnitude_key(name: str) -> str:
    """PEFT's key of DoRA's magnitude of module ``name`` (no ``.weight``: PEFT keeps its old key).

    Example:
        >>> magnitude_key("decoder.layers.0.mlp.linear_fc2")
        'base_model.model.decoder.layers.0.mlp.linear_fc2.lora_magnitude_vector'
    """
    plain = plain_name(name)
    return f"{PEFT_PREFIX}{plain}.lora_magnitude_vector" if plain else f"{PEFT_PREFIX}lora_magnitude_vector"


def config_dict(options: Mapping[str, AdapterOptions], config: Any = None) -> dict:
    """``adapter_config.json`` whose patterns reproduce every layer's r and alpha, by canonical name.

    Args:
        options: ``{canonical name: AdapterOptions}`` of every layer of the whole model.
        config: a PEFT ``LoraConfig`` or ``LoRAConfig`` to start from (None: derived from ``options``).

    Returns:
        The config dict, ``rank_pattern``/``alpha_pattern`` with exact names first (PEFT takes the
        first matching key), then the given patterns in their order.

    Raises:
        ValueError: the layers mix ``use_rslora`` values (PEFT's format has one per adapter).
    """
    rs = {n: o.r for n, o in options.items()}
    alphas = {n: o.lora_alpha for n, o in options.items()}
    rslora = {o.use_rslora for o in options.values()}
    dora = {o.use_dora for o in options.values()}
    for field, values in (("use_rslora", rslora), ("use_dora", dora)):
        if len(values) != 1:
            raise ValueError(f"the adapter mixes {field}=True and False across layers; PEFT's format has one "
                             f"{field} per adapter")
    if config is not None and hasattr(config, "to_dict"):  # a PEFT LoraConfig
        out = config.to_dict()
        out = {k: (sorted(v) if isinstance(v, set) else v) for k, v in out.items()}
    else:
        out = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "bias": "none",
               "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
               "target_modules": sorted(rs),
               "r": Counter(rs.values()).most_common(1)[0][0],
               "lora_alpha": Counter(alphas.values()).most_common(1)[0][0],
               "lora_dropout": Counter(o.lora_dropout for o in options.values()).most_common(1)[0][0]}
        if config is not None:
            out.update(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       init_lora_weights=config.init_lora_weights,
                       rank_pattern=dict(getattr(config, "rank_pattern", None) or {}),
                       alpha_pattern=dict(getattr(config, "alpha_pattern", None) or {}))
    out["use_rslora"] = rslora.pop()
    out["use_dora"] = dora.pop()
    out["inference_mode"] = True
    for field, actual, default in (("rank_pattern", rs, out["r"]), ("alpha_pattern", alphas, out["lora_alpha"])):
        given = dict(out.get(field) or {})
        exact = {n: v for n, v in actual.items() if pattern_value(given, n, default) != v}
        out[field] = {**exact, **given}
    return out


def write_files(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | None, config: dict | None, *,
                group: dist.ProcessGroup | None, writer: bool) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` on the writer; every rank of ``group`` waits.

    Every rank of ``group`` calls it. The writer writes; then every rank takes the outcome in a
    broadcast from the writer (so this is also the barrier after the write), and an error on the
    writer (disk full, permissions, a bad tensor) is raised on every rank. When it returns, every
    rank can read the files.

    Args:
        path: the output directory (created).
        tensors: ``{key: CPU tensor}`` (the writer's; ignored elsewhere).
        config: the ``adapter_config.json`` content (the writer's).
        group: the ranks that call it.
        writer: this rank writes (exactly one rank of ``group`` passes True: its group rank 0).

    Raises:
        OSError: the write failed on the writer (the message says why), on every rank.
    """
    from safetensors.torch import save_file

    error = None
    if writer:
        try:
            os.makedirs(path, exist_ok=True)
            save_file(dict(tensors), os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
            with open(os.path.join(path, CONFIG_NAME), "w") as f:
                json.dump(config, f, indent=2, default=str)  # key order kept: patterns are ordered
        except Exception as e:  # reported to every rank below, then raised everywhere
            error = f"{type(e).__name__}: {e}"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        error = outcome[0]
    if error is not None:
        raise OSError(f"writing the adapter to {os.fspath(path)!r} failed on the writing rank: {error}")


def read_files(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json, {key: tensor})`` of a PEFT adapter directory (safetensors or ``.bin``).

    Raises:
        ValueError: not an adapter directory, not a LoRA adapter, or LoRA options the fused layers
            cannot honour (named).
    """
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

        return cfg, load_file(st)
    if os.path.isfile(bn):
        return cfg, torch.load(bn, map_location="cpu", weights_only=True)
    raise ValueError(f"path {path} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")
