"""LoRA options: the one place that says what a valid option is.

Everything above the kernels (functional API, modules, dispatch, PEFT integration, adapter files)
validates r, alpha, dropout, scale, seed and init through these functions, so a bad value gets
the same message wherever it enters. This module imports nothing else from the package.

The config is duck-typed: a PEFT ``LoraConfig`` and this module's ``LoRAConfig`` both work, so
nothing here imports peft.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "INITS",
    "LoRAConfig",
    "check_config",
    "check_dropout",
    "check_init",
    "check_rank",
    "check_scale",
    "layer_indexed_patterns",
    "layer_options",
    "pattern_value",
    "real_number",
]

INITS = (True, False, "gaussian")
# LoraConfig fields that change what a LoRA layer computes, which the fused kernels do not do.
# A truthy value means "requested". (name, what it is)
UNSUPPORTED_FIELDS = (
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
_FP32_MAX = float(torch.finfo(torch.float32).max)


def real_number(name: str, value: Any) -> float:
    """``value`` as a python float: ints, floats, numpy scalars and one-element tensors; never bool.

    Raises:
        TypeError: anything else, naming ``name`` and what was given.

    Example:
        >>> real_number("scale", 2)
        2.0
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _real_within(name: str, value: Any, ok, what: str) -> float:
    v = real_number(name, value)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return v


def check_scale(name: str, value: Any) -> float:
    """A LoRA scale or alpha: a real number whose magnitude fits fp32 (the kernels multiply in fp32).

    Example:
        >>> check_scale("lora_alpha", 16)
        16.0
    """
    return _real_within(name, value, lambda v: abs(v) <= _FP32_MAX,
                        f"finite and within fp32's range (|{name}| <= {_FP32_MAX:.3e})")


def check_rank(name: str, value: Any) -> int:
    """A LoRA rank: a positive int (numpy integers accepted; bool and floats refused).

    Example:
        >>> check_rank("r", 8)
        8
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_dropout(name: str, value: Any) -> float:
    """A dropout probability in ``[0, 1)``.

    Example:
        >>> check_dropout("lora_dropout", 0.1)
        0.1
    """
    return _real_within(name, value, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def check_init(value: Any) -> bool | str:
    """``init_lora_weights``: True, False or ``"gaussian"``.

    Example:
        >>> check_init("gaussian")
        'gaussian'
    """
    if not isinstance(value, (bool, str)) or value not in INITS:
        raise ValueError(f"init_lora_weights must be one of {INITS}, got {value!r}")
    return value


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
        use_dora: DoRA (weight-decomposed LoRA, ``tplora_kernels.dora``): a learned magnitude per
            output row scales the adapted weight's row norms.
        rank_pattern: ``{regex: r}`` overriding ``r`` for modules whose dotted name ends with a match.
        alpha_pattern: ``{regex: alpha}``, likewise.
        target_modules: for ``apply_lora``: module-name suffixes (list), a full-match regex (str),
            or None for every supported parallel linear.
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
    use_dora: bool = False
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
    """Raise naming every option of ``config`` that the fused modules cannot honour.

    Args:
        config: a PEFT ``LoraConfig`` or a ``LoRAConfig``.

    Raises:
        TypeError: not a LoRA config.
        ValueError: unsupported options, each named with what it is.

    Example:
        >>> check_config(LoRAConfig(init_lora_weights="gaussian"))
    """
    if config is None:
        raise TypeError("lora_config must be a peft LoraConfig or a tplora_kernels LoRAConfig, got None")
    if not hasattr(config, "r") or not hasattr(config, "lora_alpha"):
        raise TypeError(f"lora_config must be a peft LoraConfig or a tplora_kernels LoRAConfig (with r, lora_alpha, "
                        f"...), got {type(config).__name__}")
    bad = [f"{name}={getattr(config, name)!r} ({what})" for name, what in UNSUPPORTED_FIELDS
           if getattr(config, name, None)]
    init = getattr(config, "init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in INITS:
        bad.append(f"init_lora_weights={init!r} (only True, False and 'gaussian' are supported)")
    bias = getattr(config, "bias", "none")
    if bias != "none":
        bad.append(f"bias={bias!r} (the base layer stays frozen; use bias='none')")
    if bad:
        raise ValueError("tplora_kernels does not support these LoRA options: " + "; ".join(bad)
                         + ". Supported: r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights "
                         "(True/False/'gaussian'), rank_pattern, alpha_pattern.")


_INDEX = re.compile(r"(?:^|\.)\d+(?:\.|$)")


def layer_indexed_patterns(config: Any) -> list[str]:
    """The module-selection patterns of ``config`` that name a layer by its index (``layers.1.fc1``).

    PEFT matches its patterns against the module names of the model it is given, which in a
    pipeline-split model are each stage's local ones (stage 1's ``layers.0`` is global layer 2),
    so such a pattern means other layers on every stage but the first.

    Args:
        config: a PEFT ``LoraConfig`` or a ``LoRAConfig``.

    Returns:
        ``["<option> <pattern>", ...]``: ``rank_pattern``/``alpha_pattern`` keys, ``target_modules``
        and ``exclude_modules`` entries (or regexes) with a numeric path component, and
        ``layers_to_transform`` when set.

    Example:
        >>> layer_indexed_patterns(LoRAConfig(rank_pattern={"layers.1.fc1": 4, "fc2": 8}))
        ["rank_pattern 'layers.1.fc1'"]
    """
    found = []
    for option in ("target_modules", "exclude_modules", "rank_pattern", "alpha_pattern"):
        value = getattr(config, option, None)
        keys = [value] if isinstance(value, str) else list(value or [])
        found += [f"{option} {k!r}" for k in keys if isinstance(k, str) and _INDEX.search(k.replace("\\", ""))]
    if getattr(config, "layers_to_transform", None) is not None:
        found.append(f"layers_to_transform {config.layers_to_transform!r}")
    return found


def layer_options(config: Any, *, target_name: str | None = None, r: int | None = None,
                  lora_alpha: float | None = None) -> dict:
    """The adapter options one layer gets from ``config``, validated.

    Explicit ``r``/``lora_alpha`` (what PEFT passes after resolving its patterns) win; else the
    patterns are matched against ``target_name``; else the config's defaults apply.

    Args:
        config: a PEFT ``LoraConfig`` or a ``LoRAConfig`` (checked with ``check_config``).
        target_name: the module's dotted name in the model.
        r, lora_alpha: overrides.

    Returns:
        ``dict(r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights)``.

    Raises:
        ValueError / TypeError: an option is out of range (named, with the module name).

    Example:
        >>> layer_options(LoRAConfig(r=4, alpha_pattern={"qkv": 2}), target_name="attn.qkv")["lora_alpha"]
        2.0
    """
    check_config(config)
    if r is None:
        r = pattern_value(getattr(config, "rank_pattern", None), target_name, config.r)
    if lora_alpha is None:
        lora_alpha = pattern_value(getattr(config, "alpha_pattern", None), target_name, config.lora_alpha)
    where = f" (module {target_name!r})" if target_name else ""
    try:
        return dict(r=check_rank("r", r), lora_alpha=check_scale("lora_alpha", lora_alpha),
                    lora_dropout=check_dropout("lora_dropout", getattr(config, "lora_dropout", 0.0)),
                    use_rslora=bool(getattr(config, "use_rslora", False)),
                    use_dora=bool(getattr(config, "use_dora", False)),
                    init_lora_weights=check_init(getattr(config, "init_lora_weights", True)))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e}{where}") from None
