"""megatron-core layers for the rank functions: builders, a toy MLP and its dense twin, full weights.

Every builder seeds torch's default generator first, as Megatron seeds it alike on every TP
rank, so each rank holds its shard of the same full layer. Full tensors are gathered (and
shards cut) with ``tplora_kernels.layout``'s rule.
"""

from __future__ import annotations

import megatron.core as mc
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA
from tplora_kernels import distributed as D
from tplora_kernels.layout import layout_for

from .problems import SEQUENCE, features

__all__ = ["DenseMLP", "H", "K", "ToyMLP", "column", "dense_from", "full_base", "inputs", "load_full_base",
           "lora_pair", "mp_config", "peft_config", "row", "split_cols", "split_rows"]

K, H = 16, 24  # the toy MLP's width and hidden size (both divisible by 4)


def mp_config(tp: int, sp: bool = False, dtype: torch.dtype = torch.float32):
    return mc.ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                                  params_dtype=dtype)


def column(group, tp: int, k: int, n: int, *, sp: bool = False, cls=None, seed: int | None = 11, bias: bool = True,
           dtype: torch.dtype = torch.float32, gather_output: bool = False, skip_bias_add: bool = False,
           init=nn.init.xavier_normal_):
    """A megatron ``ColumnParallelLinear`` k -> n on ``group`` (``cls``: a subclass); ``seed=None`` leaves the RNG."""
    if seed is not None:
        torch.manual_seed(seed)
    return (cls or ColumnParallelLinear)(k, n, config=mp_config(tp, sp, dtype), init_method=init, bias=bias,
                                         gather_output=gather_output, skip_bias_add=skip_bias_add, tp_group=group)


def row(group, tp: int, k: int, n: int, *, sp: bool = False, cls=None, seed: int | None = 12, bias: bool = True,
        dtype: torch.dtype = torch.float32, input_is_parallel: bool = True, skip_bias_add: bool = False,
        init=nn.init.xavier_normal_):
    """A megatron ``RowParallelLinear`` k -> n on ``group`` (``cls``: a subclass); ``seed=None`` leaves the RNG."""
    if seed is not None:
        torch.manual_seed(seed)
    return (cls or RowParallelLinear)(k, n, config=mp_config(tp, sp, dtype), init_method=init, bias=bias,
                                      input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add,
                                      tp_group=group)


class ToyMLP(nn.Module):
    """fc1: ColumnParallelLinear K->H, gelu, fc2: RowParallelLinear H->K (input_is_parallel)."""

    def __init__(self, group, tp: int, sp: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = column(group, tp, K, H, sp=sp, dtype=dtype)
        self.fc2 = row(group, tp, H, K, sp=sp, dtype=dtype)

    def forward(self, x):
        h, _ = self.fc1(x)
        y, _ = self.fc2(torch.nn.functional.gelu(h))
        return y


class DenseMLP(nn.Module):
    """The single-device twin of ``ToyMLP``: same module names, plain nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(K, H)
        self.fc2 = nn.Linear(H, K)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def lora_pair(group, tp: int, dropout: float = 0.1):
    """A ColumnParallelLoRA K->H and a RowParallelLoRA H->K (r=4, alpha=8, B non-zero, torch backend)."""
    col = ColumnParallelLoRA(column(group, tp, K, H), r=4, lora_alpha=8, lora_dropout=dropout,
                             init_lora_weights=False, backend="torch")
    rw = RowParallelLoRA(row(group, tp, H, K), r=4, lora_alpha=8, lora_dropout=dropout,
                         init_lora_weights=False, backend="torch")
    return col, rw


def _base_and_layout(layer):
    base = getattr(layer, "base_layer", layer)
    return base, layout_for("column" if isinstance(base, ColumnParallelLinear) else "row")


def full_base(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Megatron layer's (or our wrapper's base's) full weight and bias, gathered over its TP group."""
    base, lay = _base_and_layout(layer)
    w = lay.weight.gather(base.weight.detach(), base.tp_group)
    b = None if base.bias is None else features(lay.y).gather(base.bias.detach(), base.tp_group)
    return w.clone(), None if b is None else b.clone()


def load_full_base(layer, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Copy this rank's shard of a full base weight (and bias) into a Megatron layer."""
    base, lay = _base_and_layout(layer)
    t, i = D.group_size(base.tp_group), D.group_rank(base.tp_group)
    with torch.no_grad():
        base.weight.copy_(lay.weight.shard(w, i, t))
        if b is not None:
            base.bias.copy_(features(lay.y).shard(b, i, t))


def dense_from(model: nn.Module) -> DenseMLP:
    """A DenseMLP carrying the full base weights of a (possibly adapted) ToyMLP."""
    dense = DenseMLP()
    for name in ("fc1", "fc2"):
        w, b = full_base(getattr(model, name))
        getattr(dense, name).weight.data.copy_(w)
        getattr(dense, name).bias.data.copy_(b)
    return dense


def inputs(shape, seed: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same random tensor on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def split_cols(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's features of a full activation (a row layer's parallel input)."""
    return features(layout_for("row").x).shard(x, D.group_rank(group), D.group_size(group)).contiguous()


def split_rows(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's block of the sequence (dim 0), as sequence parallelism splits it."""
    return SEQUENCE.shard(x, D.group_rank(group), D.group_size(group)).contiguous()


def peft_config(**kw):
    """A PEFT ``LoraConfig`` registered with our dispatcher (``backend=`` passed to ``register``)."""
    from peft import LoraConfig  # local: peft is optional, and costs seconds wherever it is imported

    import tplora_kernels.peft as tpeft

    backend = kw.pop("backend", None)
    return tpeft.register(LoraConfig(**kw), backend=backend)
