"""What the LoRA modules need to know about a base layer, and the recognisers that tell them.

A ``BaseSpec`` is built once per wrapped layer by the first recogniser that accepts it. It holds
the layer's TP mode and layout (partition stride included), full sizes, group, mode flags, how to
reach its weight and bias, and nothing else; the modules never read a base layer's attributes
themselves. A base layer of another family (Transformer Engine, an expert GEMM, ...) plugs in by
registering a recogniser here; until then it is refused with a message listing what is supported.

megatron-core's ``ColumnParallelLinear`` and ``RowParallelLinear`` (subclasses included) are
registered below. Options of theirs that change the weight's meaning or the layer's
communication pattern are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layout import TPLayout, layout_for
from .mode import TPMode

__all__ = ["BaseSpec", "UnsupportedBase", "describe", "register_recogniser", "supported_bases"]


class UnsupportedBase(ValueError):
    """The base layer is of a supported type but uses an option these modules cannot reproduce."""


@dataclass(frozen=True, eq=False)
class BaseSpec:
    """A base parallel linear, as the LoRA modules see it.

    Attributes:
        mode: its tensor-parallel mode (``mode.TPMode``: kind, group, world, rank, SP, gather/split,
            explicit communication, output dtype), normalised for the group's size.
        layout: the TP layout of its tensors (with the weight's partition stride).
        in_features: K of the full layer. out_features: N of the full layer.
        skip_bias_add: return the bias instead of adding it.
        external_weight: the weight is passed at call time (a tied output layer), not owned.
        is_expert: an MoE expert's layer (its parameters are reduced over the expert-DP group).
        type_name: the base layer's class name, for messages.
    """

    mode: TPMode
    layout: TPLayout
    in_features: int
    out_features: int
    skip_bias_add: bool
    external_weight: bool
    is_expert: bool
    type_name: str

    def weight(self, base: nn.Module, override: torch.Tensor | None = None) -> torch.Tensor:
        """The local weight shard: the call-time ``override`` for an external weight, else the layer's."""
        if override is not None:
            return override
        if self.external_weight:
            raise ValueError(f"this {self.type_name} has no weight of its own (skip_weight_param_allocation=True); "
                             "pass weight= at call time, as its owner does")
        return base.weight


Recogniser = Callable[[nn.Module], "BaseSpec | None"]
_RECOGNISERS: list[tuple[str, Recogniser]] = []


def register_recogniser(description: str, fn: Recogniser) -> None:
    """Add a recogniser: ``fn(module)`` returns a ``BaseSpec``, None (not mine), or raises ``UnsupportedBase``.

    Args:
        description: what it recognises, for the "supported" list in error messages.
        fn: the recogniser. Later registrations are tried first.

    Example:
        >>> # register_recogniser("my TE linear", lambda m: spec_of(m) if isinstance(m, MyLinear) else None)
    """
    _RECOGNISERS.insert(0, (description, fn))


def supported_bases() -> list[str]:
    """Descriptions of every registered recogniser.

    Example:
        >>> any("ColumnParallelLinear" in s for s in supported_bases())
        True
    """
    return [d for d, _ in _RECOGNISERS]


def describe(module: nn.Module, kind: str | None = None) -> BaseSpec:
    """The ``BaseSpec`` of ``module``.

    Args:
        module: a base layer.
        kind: require this mode (``"column"``/``"row"``), e.g. for ``ColumnParallelLoRA``.

    Raises:
        TypeError: no recogniser accepts ``module`` (the message lists the supported types), or it
            is of the other kind.
        UnsupportedBase: it is supported but uses an option named in the message.

    Example:
        >>> describe(nn.Linear(2, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: cannot wrap Linear: supported base layers are megatron-core ColumnParallelLinear / ...
    """
    for _, fn in _RECOGNISERS:
        spec = fn(module)
        if spec is not None:
            if kind is not None and spec.mode.kind != kind:
                raise TypeError(f"expected a {kind}-parallel base layer, got {spec.type_name} "
                                f"({spec.mode.kind}-parallel)")
            return spec
    raise TypeError(f"cannot wrap {type(module).__name__}: supported base layers are "
                    + "; ".join(sorted(supported_bases())))


# ---------------------------------------------------------------------------------------------
# megatron-core
# ---------------------------------------------------------------------------------------------
def _megatron_kind(module: nn.Module) -> str | None:
    try:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return None
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


def _megatron_spec(module: nn.Module) -> BaseSpec | None:
    kind = _megatron_kind(module)
    if kind is None:
        return None
    name = type(module).__name__
    bad = []
    if getattr(module, "disable_grad_reduce", False):
        bad.append("disable_grad_reduce=True")
    if getattr(module, "gtp_remat_size", 1) > 1:
        bad.append(f"gtp_remat_size={module.gtp_remat_size} (generalized-TP weight rematerialisation: the weight is "
                   "a further shard)")
    weight = getattr(module, "weight", None)
    stride = int(getattr(weight, "partition_stride", 1)) if weight is not None else 1
    if kind == "row" and stride != 1:
        bad.append(f"partition_stride={stride} on a row-parallel weight (megatron splits its input contiguously)")
    if bad:
        raise UnsupportedBase(f"cannot wrap this {name}: it uses " + "; ".join(bad))
    # Megatron's expert layers leave their SP gather/reduce-scatter and dgrad all-reduce to the token
    # dispatcher, so an expert layer built under an SP config runs without SP of its own.
    explicit = bool(getattr(module, "explicit_expert_comm", False))
    mode = TPMode.build(kind, group=module.tp_group,
                        sequence_parallel=bool(getattr(module, "sequence_parallel", False)) and not explicit,
                        gather_output=bool(getattr(module, "gather_output", False)),
                        input_is_parallel=bool(getattr(module, "input_is_parallel", True)), explicit_comm=explicit,
                        output_dtype=getattr(module, "output_dtype", None))
    return BaseSpec(mode=mode, layout=layout_for(kind, stride), in_features=int(module.input_size),
                    out_features=int(module.output_size), skip_bias_add=bool(module.skip_bias_add),
                    external_weight=weight is None, is_expert=bool(getattr(module, "is_expert", False)),
                    type_name=name)


register_recogniser("megatron-core ColumnParallelLinear / RowParallelLinear (and subclasses)", _megatron_spec)
