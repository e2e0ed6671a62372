"""The shard rule (tplora_kernels.layout), proven against megatron's own weight initialisation.

Megatron's ``_initialize_affine_weight_cpu`` is the definition of how a strided weight is split:
a layer built with ``keep_master_weight_for_test=True`` keeps the full weight it sliced, so the
rule is checked on megatron's output, not on a restatement of it.
"""

from __future__ import annotations

from unittest import mock

import megatron.core as mc
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel import layers as mlayers

from tplora_kernels.layout import Split, column_layout, layout_for, row_layout


@given(world=st.sampled_from([1, 2, 4]), stride=st.integers(1, 4), per=st.integers(1, 3), cols=st.integers(1, 5),
       dim=st.sampled_from([0, 1]))
@example(world=2, stride=2, per=1, cols=1, dim=0)
def test_shard_and_join_are_inverse(world, stride, per, cols, dim):
    """Joining every rank's shard gives back the full tensor, for any stride and size."""
    n = world * stride * per
    full = torch.arange(n * cols, dtype=torch.float64).view(n, cols)
    if dim == 1:
        full = full.t().contiguous()
    split = Split(dim, stride)
    shards = [split.shard(full, r, world) for r in range(world)]
    assert all(s.shape[dim] == n // world for s in shards), f"shard sizes {[tuple(s.shape) for s in shards]}"
    assert torch.equal(split.join(shards), full), f"join(shard) != full for world={world} stride={stride} dim={dim}"
    assert torch.equal(torch.cat(shards, dim).sort(dim).values, full.sort(dim).values), "every element exactly once"


def test_stride_gives_each_rank_its_piece_of_every_block():
    full = torch.arange(8)  # [gate0 gate1 | up0 up1] at TP=2, two rows each
    assert Split(0, 2).shard(full, 0, 2).tolist() == [0, 1, 4, 5]
    assert Split(0, 2).shard(full, 1, 2).tolist() == [2, 3, 6, 7]
    assert Split(0, 1).shard(full, 1, 2).tolist() == [4, 5, 6, 7]


def test_indivisible_sizes_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="divisible by 4"):
        Split(0, 2).shard(torch.zeros(6, 1), 0, 2)


def test_replicated_split_is_the_identity():
    """A replicated split hands every rank the full tensor itself."""
    full = torch.randn(3, 5)
    assert Split().shard(full, 1, 4) is full and Split().join([full, full]) is full


def test_layout_tables():
    """The column and row layouts split weight, factors, x and y along the dims and strides Megatron uses."""
    col, row = column_layout(2), row_layout()
    assert (col.weight, col.lora_a, col.lora_b, col.y) == (Split(0, 2), Split(), Split(0, 2), Split(1, 2))
    assert (row.x, row.weight, row.lora_a, row.lora_b) == (Split(1), Split(1), Split(1), Split())
    assert layout_for("column", 2) == col
    with pytest.raises(ValueError, match="kind"):
        layout_for("diagonal")


def _megatron_shard(kind: str, stride: int, world: int, rank: int, n: int, k: int):
    """(master weight, this rank's shard) exactly as megatron-core 0.16.1 initialises them on CPU."""
    cfg = mc.ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                                 params_dtype=torch.float32)
    torch.manual_seed(0)
    patches = [mock.patch.object(mlayers, "get_pg_rank", lambda group=None: rank),
               mock.patch.object(mlayers, "get_pg_size", lambda group=None: world),
               mock.patch.object(mlayers, "get_tensor_model_parallel_rank", lambda: rank),
               mock.patch.object(mlayers, "get_tensor_model_parallel_world_size", lambda: world)]
    for p in patches:
        p.start()
    try:
        cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
        extra = dict(gather_output=False) if kind == "column" else dict(input_is_parallel=True, skip_bias_add=False)
        lin = cls(k, n, config=cfg, init_method=torch.nn.init.normal_, bias=False, stride=stride,
                  keep_master_weight_for_test=True, tp_group=object(), **extra)
    finally:
        for p in patches:
            p.stop()
    return lin.master_weight, lin.weight.detach()


@pytest.mark.parametrize(("kind", "stride"), [("column", 1), ("column", 2), ("column", 3), ("row", 1)])
@pytest.mark.parametrize("world", [2, 4])
def test_split_matches_megatrons_own_initialisation(kind, stride, world):
    layout = layout_for(kind, stride)
    for rank in range(world):
        master, shard = _megatron_shard(kind, stride, world, rank, n=world * stride * 2, k=world * 3)
        assert int(getattr(shard, "partition_stride", stride)) == stride
        got = layout.weight.shard(master, rank, world)
        assert torch.equal(got, shard), f"{kind} stride={stride} tp={world} rank {rank}: our slice != megatron's"
