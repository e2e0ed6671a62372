"""The modules follow Megatron's conventions: TP/SP attributes, main_grad, sharded_state_dict.

The LoRA factors carry the attributes Megatron's optimizer and grad sync read (also after PEFT's
fp32 upcast), accumulate into ``main_grad`` as under Megatron DDP, and checkpoint with
dist_checkpointing at one TP size and load at others; the Megatron example trains and is the
README's code.

megatron-core's dist_checkpointing (torch_dist strategy) runs here on CPU/gloo with two shims:
its writer calls ``torch.cuda.synchronize()`` and builds one flag tensor on
``torch.cuda.current_device()``. The test points those two at the CPU for the duration of the
task (``_cpu_dist_checkpointing``); the save/load code, the on-disk format and megatron's
access-pattern validation run unchanged. The ShardedTensor metadata is checked on its own as
well. Per-rank checks run on the ranks; the checkpoint's save-at-TP=2 / load-at-TP=1,4
comparison here.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch import nn

from tplora_kernels import (
    ColumnParallelLoRA,
    LoRAConfig,
    RowParallelLoRA,
    adapter_sharded_state_dict,
    apply_lora,
    gather_full_factors,
    sum_sequence_parallel_grads,
)
from tplora_kernels.testing import launch

from ..support.checks import assert_readme_shows_example, rel_err
from ..support.harness import run_example
from ..support.layers import H, K, ToyMLP, column, full_base, inputs, lora_pair, peft_config, row, split_rows

ROOT = Path(__file__).resolve().parents[2]

SHARDED_COL_B = {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1}
SHARDED_ROW_A = {"tensor_model_parallel": True, "partition_dim": 1, "partition_stride": 1}
_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def _attrs(p) -> dict:
    return {a: getattr(p, a) for a in _ATTRS if hasattr(p, a)}


def _assert_replicated(what: str, attrs: dict, sp: bool) -> None:
    assert not attrs.get("tensor_model_parallel"), f"{what} must be replicated: {attrs}"
    assert bool(attrs.get("sequence_parallel")) == sp, f"{what}: sequence_parallel must be {sp}: {attrs}"


def attributes_task(ctx, sp: bool) -> None:
    """Megatron's TP/SP attributes on the factors, after add_adapter too."""
    col = ColumnParallelLoRA(column(ctx.group, ctx.tp, K, H, sp=sp), r=4, lora_alpha=8)
    rw = RowParallelLoRA(row(ctx.group, ctx.tp, H, K, sp=sp), r=4, lora_alpha=8)
    col.add_adapter("b", 2)
    at = f"rank {ctx.rank} sp={sp}"
    for adapter in ("default", "b"):
        got = _attrs(col.lora_B[adapter].weight)
        assert got == SHARDED_COL_B, f"{at}: column B[{adapter}] attributes {got}, expected {SHARDED_COL_B}"
        _assert_replicated(f"{at}: column A[{adapter}]", _attrs(col.lora_A[adapter].weight), sp)
    got = _attrs(rw.lora_A["default"].weight)
    assert got == SHARDED_ROW_A, f"{at}: row A attributes {got}, expected {SHARDED_ROW_A}"
    _assert_replicated(f"{at}: row B", _attrs(rw.lora_B["default"].weight), sp)


def upcast_attributes_task(ctx) -> None:
    """PEFT up-casts bf16 adapters to fp32 by building new Parameters: attributes must survive."""
    from peft import get_peft_model

    model = ToyMLP(ctx.group, ctx.tp, sp=True, dtype=torch.bfloat16)
    pm = get_peft_model(model, peft_config(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    fc1, fc2 = pm.base_model.model.fc1, pm.base_model.model.fc2
    at = f"rank {ctx.rank} after PEFT's up-cast"
    dtypes = [f.weight.dtype for f in (fc1.lora_A["default"], fc1.lora_B["default"])]
    assert dtypes == [torch.float32, torch.float32], f"{at}: PEFT's up-cast did not run: {dtypes}"
    got = {n: _attrs(m.weight) for n, m in (("fc1 A", fc1.lora_A["default"]), ("fc1 B", fc1.lora_B["default"]),
                                            ("fc2 A", fc2.lora_A["default"]), ("fc2 B", fc2.lora_B["default"]))}
    assert got["fc1 B"] == SHARDED_COL_B, f"{at}: fc1 B {got['fc1 B']}"
    assert got["fc1 A"].get("sequence_parallel") is True, f"{at}: fc1 A {got['fc1 A']}"
    assert got["fc2 A"] == SHARDED_ROW_A, f"{at}: fc2 A {got['fc2 A']}"
    assert got["fc2 B"].get("sequence_parallel") is True, f"{at}: fc2 B {got['fc2 B']}"


def main_grad_task(ctx, sp: bool) -> None:
    """Megatron DDP's main_grad: the factor gradients accumulate there, not in .grad (over two steps)."""
    def build():
        col = ColumnParallelLoRA(column(ctx.group, ctx.tp, K, H, sp=sp), r=4, lora_alpha=8, lora_dropout=0.1,
                                 init_lora_weights=False, backend="torch")
        rw = RowParallelLoRA(row(ctx.group, ctx.tp, H, K, sp=sp), r=4, lora_alpha=8, lora_dropout=0.1,
                             init_lora_weights=False, backend="torch")
        return nn.ModuleList([col, rw])

    x_full = inputs((8, 2, K))
    x = split_rows(x_full, ctx.group) if sp else x_full

    def step(layers):
        torch.manual_seed(1000)  # the same dropout seeds in both runs
        h, _ = layers[0](x)
        y, _ = layers[1](torch.nn.functional.gelu(h))
        y.square().sum().backward()

    def fold(params):
        # What Megatron DDP's backward hook does: fold .grad in unless the layer already did.
        for p in params:
            if p.grad is not None and not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad)

    at = f"rank {ctx.rank} sp={sp}"
    ref = build()
    step(ref)
    step(ref)  # .grad accumulates over two steps
    sum_sequence_parallel_grads(ref.parameters(), ctx.group)
    ddp = build()
    params = [p for p in ddp.parameters() if p.requires_grad]
    assert len(params) == 4, f"{at}: expected 4 trainable factors, got {len(params)}"
    for p in params:
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
        p.grad_added_to_main_grad = False
    step(ddp)
    flags = [p.grad_added_to_main_grad for p in params]
    assert all(flags), f"{at}: grad_added_to_main_grad not set after backward: {flags}"
    fold(params)
    for p in params:
        p.grad = None
        p.grad_added_to_main_grad = False
    step(ddp)
    fold(params)
    assert all(p.grad is None or not p.grad.any() for p in params), f"{at}: .grad must be a zero placeholder"
    sum_sequence_parallel_grads(ddp.parameters(), ctx.group)
    for (n, p), q in zip(ddp.named_parameters(), ref.parameters()):
        if p.requires_grad:
            err = rel_err(p.main_grad, q.grad)
            assert err < 1e-5, f"{at} {n}: main_grad over 2 steps vs .grad: rel err {err:.2e}"


def _st(v) -> dict:
    return dict(key=v.key, global_shape=tuple(v.global_shape), global_offset=tuple(v.global_offset),
                axis_fragmentations=tuple(v.axis_fragmentations), replica_id=tuple(v.replica_id),
                local_shape=tuple(v.local_shape))


def sharded_metadata_task(ctx) -> None:
    """The ShardedTensor metadata of both layer kinds, with a prefix and a prepended offset."""
    r, rank, at = 4, ctx.rank, f"rank {ctx.rank}"
    col, rw = lora_pair(ctx.group, ctx.tp)
    sd = col.sharded_state_dict(prefix="column.", metadata={"dp_cp_group": None})
    assert sorted(sd) == ["column.base_layer._extra_state", "column.base_layer.bias", "column.base_layer.weight",
                          "column.lora_A.default.weight", "column.lora_B.default.weight"], f"{at}: {sorted(sd)}"
    meta = {k: _st(v) for k, v in sd.items() if hasattr(v, "axis_fragmentations")}
    assert meta["column.base_layer.weight"]["key"] == "column.weight", (
        f"{at}: the base keeps the unwrapped layer's key, got {meta['column.base_layer.weight']['key']!r}")
    a, b = meta["column.lora_A.default.weight"], meta["column.lora_B.default.weight"]
    assert (a["global_shape"], a["global_offset"], a["replica_id"]) == ((r, K), (0, 0), (0, rank, 0)), \
        f"{at} column A (replicated): {a}"
    assert (b["global_shape"], b["local_shape"], b["global_offset"], b["axis_fragmentations"],
            b["replica_id"]) == ((H, r), (H // 2, r), (rank * H // 2, 0), (2, 1), (0, 0, 0)), \
        f"{at} column B (rows sharded): {b}"
    meta = {k: _st(v) for k, v in rw.sharded_state_dict(prefix="row.", metadata={"dp_cp_group": None}).items()
            if hasattr(v, "axis_fragmentations")}
    a, b = meta["row.lora_A.default.weight"], meta["row.lora_B.default.weight"]
    assert (a["global_shape"], a["local_shape"], a["global_offset"], a["axis_fragmentations"]) == \
        ((r, H), (r, H // 2), (0, rank * H // 2), (1, 2)), f"{at} row A (cols sharded): {a}"
    assert (b["global_shape"], b["replica_id"]) == ((K, r), (0, rank, 0)), f"{at} row B: {b}"
    stacked = {name: {k: _st(v) for k, v in m.sharded_state_dict(prefix="layers.", sharded_offsets=((0, 1, 3),),
                                                                 include_base=False).items()}
               for name, m in (("column", col), ("row", rw))}
    for name, st in stacked.items():
        assert sorted(st) == ["layers.lora_A.default.weight", "layers.lora_B.default.weight"], \
            f"{at} {name}: include_base=False keeps only the factors: {sorted(st)}"
    sb = stacked["column"]["layers.lora_B.default.weight"]
    assert (sb["global_shape"], sb["global_offset"]) == ((3, H, r), (1, rank * H // 2, 0)), \
        f"{at}: a prepended (layer) offset must shift the axes: {sb}"


_GROUPS: dict = {}


def _layout(t: int):
    """(tp_group, dp_group) of this rank when the 4 ranks form 4/t TP groups of consecutive ranks."""
    if t not in _GROUPS:
        world, rank = dist.get_world_size(), dist.get_rank()
        tp = [dist.new_group(list(range(s, s + t))) for s in range(0, world, t)]
        dp = [dist.new_group(list(range(i, world, t))) for i in range(t)]
        _GROUPS[t] = (tp[rank // t], dp[rank % t])
    return _GROUPS[t]


@contextlib.contextmanager
def _cpu_dist_checkpointing():
    """megatron's torch_dist strategy calls torch.cuda.synchronize/current_device: point them at the CPU.

    Nothing else changes; the strategy's file format and its validation run as on GPUs.
    """
    sync, cur = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, cur


def dist_ckpt_task(rank: int, ckpt_dir: str) -> dict:
    """Save the adapted ToyMLP with dist_checkpointing at TP=2; load at TP=1 (all) and TP=4 (adapters).

    Runs on 4 fresh, non-daemonic ranks (``launch.spawn_world``): megatron's checkpoint writer
    starts processes of its own, which the pool's daemonic ranks may not do.
    """
    def build(t: int, seed: int):
        tp_group, dp_group = _layout(t)
        model = ToyMLP(tp_group, t)
        torch.manual_seed(seed)
        for mod in (model.fc1, model.fc2):
            mod.weight.data.normal_()
        apply_lora(model, LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, backend="torch"))
        torch.manual_seed(seed + 1)
        apply_lora(model, LoRAConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["fc2"]),
                   adapter_name="extra")
        return model, {"dp_cp_group": dp_group}

    def full(model) -> dict:
        out = {}
        for name in ("fc1", "fc2"):
            m = getattr(model, name)
            for adapter in m.lora_A:
                a, b = gather_full_factors(m, adapter)
                out[f"{name}.{adapter}.A"], out[f"{name}.{adapter}.B"] = a, b
            out[f"{name}.W"] = full_base(m)[0]
        return out

    def sharded(model, meta):
        sd = {}
        for name in ("fc1", "fc2"):
            sd.update(getattr(model, name).sharded_state_dict(f"{name}.", metadata=meta))
        return sd

    res = {}
    with _cpu_dist_checkpointing(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model2, meta2 = build(2, seed=100)
        res["saved"] = full(model2)
        dist_checkpointing.save(sharded(model2, meta2), ckpt_dir)
        dist.barrier()
        model1, meta1 = build(1, seed=200)
        res["before1"] = full(model1)
        model1.load_state_dict(dist_checkpointing.load(sharded(model1, meta1), ckpt_dir))
        res["tp1"] = full(model1)
        model4, meta4 = build(4, seed=300)
        res["before4"] = full(model4)
        loaded = dist_checkpointing.load(adapter_sharded_state_dict(model4, metadata=meta4), ckpt_dir)
        incompatible = model4.load_state_dict(loaded, strict=False)
        res["tp4"] = full(model4)
        res["tp4_unexpected"] = list(incompatible.unexpected_keys)
        res["tp4_loaded_keys"] = sorted(loaded)
    return res if rank == 0 else {}


def megatron_example_task(ctx, path: str, out_dir: str) -> None:
    """examples/megatron_example.py (SP on, no PEFT) trains at TP=2 (run by this rank)."""
    res = run_example(ctx, path, out_dir)
    at = f"rank {ctx.rank}"
    assert res["adapted"] == ["linear_fc1", "linear_fc2"], f"{at}: adapted {res['adapted']}"
    assert res["losses"][-1] < res["losses"][0], f"{at}: the adapter did not train: {res['losses']}"
    marked = [n for n in res["sp_marked"] if "lora_" in n]
    assert marked == ["linear_fc1.lora_A.default.weight", "linear_fc2.lora_B.default.weight"], \
        f"{at}: SP-marked factors {res['sp_marked']}"
    assert "linear_fc1.base_layer.weight" in res["sharded_keys"], f"{at}: sharded keys {res['sharded_keys']}"


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_factor_attributes(dist_pool, sp):
    """The factors carry Megatron's TP attributes (tensor_model_parallel, partition_dim/stride,
    sequence_parallel) as their base weight does, for a second adapter too.
    """
    dist_pool.run(attributes_task, 2, sp=sp)


def test_attributes_survive_peft_fp32_upcast(dist_pool):
    """get_peft_model re-creates bf16 adapter Parameters in fp32; the TP/SP attributes must stay."""
    dist_pool.run(upcast_attributes_task, 2)


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_weight_grads_accumulate_into_main_grad(dist_pool, sp):
    """As under Megatron DDP: main_grad gets the gradient, grad_added_to_main_grad is set, no double count."""
    dist_pool.run(main_grad_task, 2, sp=sp)


def test_sharded_state_dict_metadata(dist_pool):
    """sharded_state_dict gives each factor ShardedTensor metadata (key, global shape and offset,
    replica id) that shards as its base weight.
    """
    dist_pool.run(sharded_metadata_task, 2)


def test_dist_checkpointing_tp2_loads_at_tp1_and_tp4(tmp_path):
    """Save at TP=2 (DP=2); load everything at TP=1 (DP=4) and the adapters alone at TP=4."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    res = launch.spawn_world(dist_ckpt_task, 4, kwargs=dict(ckpt_dir=str(ckpt)), keep="rank0")[0]
    saved = res["saved"]
    factor_keys = [k for k in saved if not k.endswith(".W")]
    assert len(factor_keys) == 6, f"expected default on fc1/fc2 and 'extra' on fc2, got {factor_keys}"
    for layout in ("tp1", "tp4"):
        before = res["before" + layout[-1]]
        for k in factor_keys:
            assert not torch.equal(before[k], saved[k]), f"{layout} {k}: the fresh model must differ before loading"
            assert torch.equal(res[layout][k], saved[k]), f"{layout} {k}: loaded full factor differs from the saved"
    for k in ("fc1.W", "fc2.W"):
        assert torch.equal(res["tp1"][k], saved[k]), f"tp1 {k}: base weight under its unwrapped key"
        assert torch.equal(res["tp4"][k], res["before4"][k]), f"tp4 {k}: an adapter-only load leaves the base alone"
    assert res["tp4_unexpected"] == [], f"loaded keys must be model state-dict keys: {res['tp4_unexpected']}"


def test_megatron_example_runs_and_readme_shows_it(dist_pool, tmp_path):
    """examples/megatron_example.py (SP on, no PEFT) trains at TP=2; the README shows its code verbatim."""
    path = str(ROOT / "examples" / "megatron_example.py")
    dist_pool.run(megatron_example_task, 2, path=path, out_dir=str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file(), f"save_adapter wrote nothing in {tmp_path}"
    assert_readme_shows_example(path, ROOT / "README.md", "Use with Megatron")
