"""How each tensor of a LoRA layer is split over the tensor-parallel group: the one shard rule.

Megatron splits a parallel linear's weight along one dimension, optionally with a stride
(``partition_stride``): the dimension is cut into ``t · stride`` equal chunks and rank ``i`` holds
chunks ``i, i + t, i + 2t, ...``, concatenated. A gated MLP's ``linear_fc1`` (SwiGLU) has
stride 2, so each rank holds ``[gate_i; up_i]``. The LoRA factor on the sharded side must follow
the same rule, or the adapter means something different at every TP size.

``Split`` is that rule for one tensor; ``TPLayout`` names the split of every tensor of a mode:

==========  ================  =============  ==============  ==============  ===============
mode        x ``[T, K]``      W ``[N, K]``   A ``[r, K]``    B ``[N, r]``    y ``[T, N]``
==========  ================  =============  ==============  ==============  ===============
column      replicated        dim 0, stride  replicated      dim 0, stride   dim 1, stride
row         dim 1, stride     dim 1, stride  dim 1, stride   replicated      replicated
==========  ================  =============  ==============  ==============  ===============

(Sequence parallelism splits the rows of x (column) or y (row) on top; that is the autograd
layer's business, not a weight layout.) Everything that slices or joins a factor goes through
here: initialisation, merging, adapter files, dist-checkpointing, the bench and the tests. To add
a TP mode, add a ``TPLayout`` constructor here and its algebra in ``autograd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import distributed as D

__all__ = ["FACTORS", "Split", "TPLayout", "column_layout", "layout_for", "row_layout"]

FACTORS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class Split:
    """One tensor's split: along ``dim`` in ``world · stride`` chunks (Megatron's rule), or replicated.

    Attributes:
        dim: the split dimension, or None for a replicated tensor.
        stride: Megatron's ``partition_stride`` (1: one contiguous block per rank).

    Example:
        >>> s = Split(0, stride=2)
        >>> full = torch.arange(8)
        >>> s.shard(full, rank=1, world=2)
        tensor([2, 3, 6, 7])
        >>> torch.equal(s.join([s.shard(full, r, 2) for r in range(2)]), full)
        True
    """

    dim: int | None = None
    stride: int = 1

    @property
    def sharded(self) -> bool:
        """True when the tensor is split (not replicated)."""
        return self.dim is not None

    def local_size(self, full_size: int, world: int) -> int:
        """Size of this rank's piece of a dimension of ``full_size``; ValueError if it does not divide."""
        if not self.sharded:
            return full_size
        if full_size % (world * self.stride):
            raise ValueError(f"a dimension of size {full_size} split over {world} ranks with stride {self.stride} "
                             f"must be divisible by {world * self.stride}")
        return full_size // world

    def shard(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """This rank's piece of ``full`` (a view when the piece is contiguous in ``full``)."""
        if not self.sharded or world == 1:
            return full
        self.local_size(full.shape[self.dim], world)
        mine = full.chunk(world * self.stride, dim=self.dim)[rank::world]
        return mine[0] if len(mine) == 1 else torch.cat(mine, dim=self.dim)

    def join(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order (the inverse of ``shard``)."""
        world = len(shards)
        if not self.sharded or world == 1:
            return shards[0]
        pieces = [s.chunk(self.stride, dim=self.dim) for s in shards]
        return torch.cat([pieces[i][j] for j in range(self.stride) for i in range(world)], dim=self.dim)

    def gather(self, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The full tensor on every rank of ``group``: one all-gather, then ``join``."""
        world = D.group_size(group)
        if not self.sharded or world == 1:
            return local
        moved = local.movedim(self.dim, 0)
        stacked = D.all_gather_rows(moved, group).chunk(world, dim=0)
        return self.join([s.movedim(0, self.dim) for s in stacked])

    def chunk_offsets(self, rank: int, world: int) -> list[tuple[int, int]]:
        """``(global chunk index, chunks along dim)`` of each of this rank's ``stride`` pieces."""
        return [(j * world + rank, world * self.stride) for j in range(self.stride)]


@dataclass(frozen=True)
class TPLayout:
    """The split of every tensor of one TP mode (see the module table).

    Attributes:
        kind: ``"column"`` or ``"row"``.
        x, weight, lora_a, lora_b, y: ``Split`` of the 2-D input ``[T, K]``, base weight ``[N, K]``,
            LoRA A ``[r, K]``, LoRA B ``[N, r]`` and output ``[T, N]``.

    Example:
        >>> column_layout(stride=2).lora_b
        Split(dim=0, stride=2)
    """

    kind: str
    x: Split
    weight: Split
    lora_a: Split
    lora_b: Split
    y: Split

    def factor(self, which: str) -> Split:
        """The split of ``"lora_A"`` or ``"lora_B"``."""
        if which not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {which!r}")
        return self.lora_a if which == "lora_A" else self.lora_b

    def shard_factors(self, full_a: torch.Tensor, full_b: torch.Tensor, rank: int,
                      world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(A, B)`` from the full ``A [r, K]`` and ``B [N, r]``."""
        return self.lora_a.shard(full_a, rank, world), self.lora_b.shard(full_b, rank, world)

    def gather_factors(self, a: torch.Tensor, b: torch.Tensor,
                       group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(A [r, K], B [N, r])`` on every rank of ``group`` (one all-gather for the sharded one)."""
        return self.lora_a.gather(a, group), self.lora_b.gather(b, group)

    def mark(self, param: torch.Tensor, which: str, *, sequence_parallel: bool, allreduce: bool = True) -> None:
        """Set the Megatron attributes that ``which``'s split implies on ``param``.

        A sharded factor carries ``tensor_model_parallel``/``partition_dim``/``partition_stride``
        as the base weight does. Under sequence parallelism the replicated factor's gradient is a
        per-rank partial sum, so it carries ``sequence_parallel = True`` and Megatron's
        ``finalize_model_grads`` sums it over TP, as for LayerNorm weights. ``allreduce=False``
        marks an expert parameter (DDP reduces it over the expert-data-parallel group).
        """
        split = self.factor(which)
        param.tensor_model_parallel = split.sharded
        if split.sharded:
            param.partition_dim, param.partition_stride = split.dim, split.stride
        elif sequence_parallel:
            param.sequence_parallel = True
        if not allreduce:
            param.allreduce = False

    def sharded_tensor(self, tensor: torch.Tensor, split: Split, key: str, *, prepend_offsets: tuple = (),
                       tp_group: dist.ProcessGroup | None, dp_cp_group: dist.ProcessGroup | None,
                       singleton_local_shards: bool = False):
        """megatron dist_checkpointing entry for ``tensor`` split as ``split``.

        Replicated: a TP replica. Stride 1: sharded along ``split.dim``. Stride 2 along dim 0 (a
        gated fc1): megatron's own ``apply_swiglu_sharded_factory``, so the checkpoint is laid out
        exactly as megatron lays out ``linear_fc1.weight``. Other strides: a factory that saves
        each of the rank's ``stride`` pieces at its global chunk, the same scheme generalised.
        """
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        groups = dict(tp_group=tp_group, dp_cp_group=dp_cp_group)
        if not split.sharded:
            return make_sharded_tensor_for_checkpoint(tensor, key, prepend_offsets=prepend_offsets, **groups)
        sh = make_tp_sharded_tensor_for_checkpoint(tensor, key, tp_axis=split.dim, prepend_offsets=prepend_offsets,
                                                   **groups)
        if split.stride == 1:
            return sh
        if split.stride == 2 and split.dim == 0:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            return apply_swiglu_sharded_factory(sh, prepend_offsets, singleton_local_shards)
        if singleton_local_shards:
            raise ValueError(f"{key}: singleton_local_shards is supported for strides 1 and 2, not {split.stride}")
        return _strided_factory(sh, split, prepend_offsets, D.group_rank(tp_group), D.group_size(tp_group))


def _strided_factory(sh, split: Split, prepend_offsets: tuple, rank: int, world: int):
    """A ShardedTensorFactory saving a stride-s shard as its s global chunks (load: concatenate)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    axis = split.dim + len(prepend_offsets)

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        pieces = t.chunk(split.stride, dim=split.dim)
        return [ShardedTensor.from_rank_offsets(key, p, *prepend_offsets, (axis, idx, n), replica_id=replica_id,
                                                prepend_axis_num=len(prepend_offsets))
                for p, (idx, n) in zip(pieces, split.chunk_offsets(rank, world))]

    def merge(pieces):
        with torch.no_grad():
            return torch.cat(pieces, dim=split.dim)

    return ShardedTensorFactory(sh.key, sh.data, build, merge, sh.replica_id, flattened_range=sh.flattened_range)


def column_layout(stride: int = 1) -> TPLayout:
    """Column-parallel: W and B split along N (with the base's stride); x and A replicated."""
    return TPLayout("column", x=Split(), weight=Split(0, stride), lora_a=Split(), lora_b=Split(0, stride),
                    y=Split(1, stride))


def row_layout(stride: int = 1) -> TPLayout:
    """Row-parallel: x, W and A split along K (with the base's stride); B and y replicated."""
    return TPLayout("row", x=Split(1, stride), weight=Split(1, stride), lora_a=Split(1, stride), lora_b=Split(),
                    y=Split())


def layout_for(kind: str, stride: int = 1) -> TPLayout:
    """The layout of ``kind`` (``"column"``/``"row"``) with the base weight's partition stride.

    Example:
        >>> layout_for("row").lora_a
        Split(dim=1, stride=1)
    """
    if kind == "column":
        return column_layout(stride)
    if kind == "row":
        return row_layout(stride)
    raise ValueError(f"kind must be 'column' or 'row', got {kind!r}")
