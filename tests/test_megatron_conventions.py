"""Megatron conventions (issue 3, item 3): TP/SP attributes, main_grad, sharded_state_dict.

megatron-core's dist_checkpointing (torch_dist strategy) runs here on CPU/gloo with two shims:
its writer calls ``torch.cuda.synchronize()`` and builds one flag tensor on
``torch.cuda.current_device()``. The test points those two at the CPU for the duration of the
task (``dispatch_cases._cpu_dist_checkpointing``); the save/load code, the on-disk format and
megatron's access-pattern validation run unchanged. The ShardedTensor metadata is checked on its
own as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from . import dispatch_cases as C

ROOT = Path(__file__).resolve().parents[1]

SHARDED_COL_B = {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1}
SHARDED_ROW_A = {"tensor_model_parallel": True, "partition_dim": 1, "partition_stride": 1}


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_factor_attributes(dist_pool, sp):
    for rank, res in enumerate(dist_pool.run(C.attributes_task, 2, sp=sp)):
        for adapter in ("default", "b"):
            assert res[("column", adapter, "B")] == SHARDED_COL_B, f"rank {rank} column B[{adapter}] sp={sp}"
            col_a = res[("column", adapter, "A")]
            assert not col_a.get("tensor_model_parallel"), f"rank {rank} column A[{adapter}] is replicated"
            assert bool(col_a.get("sequence_parallel")) == sp, f"rank {rank} column A[{adapter}] sp={sp}: {col_a}"
        assert res[("row", "default", "A")] == SHARDED_ROW_A, f"rank {rank} row A sp={sp}"
        row_b = res[("row", "default", "B")]
        assert not row_b.get("tensor_model_parallel"), f"rank {rank} row B is replicated"
        assert bool(row_b.get("sequence_parallel")) == sp, f"rank {rank} row B sp={sp}: {row_b}"


def test_attributes_survive_peft_fp32_upcast(dist_pool):
    """get_peft_model re-creates bf16 adapter Parameters in fp32; the TP/SP attributes must stay."""
    for rank, res in enumerate(dist_pool.run(C.upcast_attributes_task, 2)):
        assert res["dtypes"] == ["torch.float32", "torch.float32"], f"rank {rank}: PEFT up-cast did not run"
        assert res["fc1_B"] == SHARDED_COL_B, f"rank {rank} fc1 B after up-cast: {res['fc1_B']}"
        assert res["fc1_A"].get("sequence_parallel") is True, f"rank {rank} fc1 A after up-cast: {res['fc1_A']}"
        assert res["fc2_A"] == SHARDED_ROW_A, f"rank {rank} fc2 A after up-cast: {res['fc2_A']}"
        assert res["fc2_B"].get("sequence_parallel") is True, f"rank {rank} fc2 B after up-cast: {res['fc2_B']}"


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_weight_grads_accumulate_into_main_grad(dist_pool, sp):
    """As under Megatron DDP: main_grad gets the gradient, grad_added_to_main_grad is set, no double count."""
    for rank, res in enumerate(dist_pool.run(C.main_grad_task, 2, sp=sp)):
        assert res["n"] == 4, f"rank {rank}: expected 4 trainable factors, got {res['n']}"
        assert all(res["flags_after_first"]), f"rank {rank} sp={sp}: grad_added_to_main_grad not set"
        assert res["placeholders_zero"], f"rank {rank} sp={sp}: .grad must be a zero placeholder"
        for name, err in res["errs"].items():
            assert err < 1e-5, f"rank {rank} sp={sp} {name}: main_grad over 2 steps vs .grad: rel err {err:.2e}"


def test_sharded_state_dict_metadata(dist_pool):
    r, K, H = 4, C.K, C.H
    for rank, res in enumerate(dist_pool.run(C.sharded_metadata_task, 2)):
        col, row = res["column"], res["row"]
        assert res["column_keys"] == ["column.base_layer._extra_state", "column.base_layer.bias",
                                      "column.base_layer.weight", "column.lora_A.default.weight",
                                      "column.lora_B.default.weight"], res["column_keys"]
        assert col["column.base_layer.weight"]["key"] == "column.weight", "base keeps the unwrapped layer's key"
        a, b = col["column.lora_A.default.weight"], col["column.lora_B.default.weight"]
        assert (a["global_shape"], a["global_offset"], a["replica_id"]) == ((r, K), (0, 0), (0, rank, 0)), \
            f"rank {rank} column A (replicated): {a}"
        assert (b["global_shape"], b["local_shape"], b["global_offset"], b["axis_fragmentations"],
                b["replica_id"]) == ((H, r), (H // 2, r), (rank * H // 2, 0), (2, 1), (0, 0, 0)), \
            f"rank {rank} column B (rows sharded): {b}"
        a, b = row["row.lora_A.default.weight"], row["row.lora_B.default.weight"]
        assert (a["global_shape"], a["local_shape"], a["global_offset"], a["axis_fragmentations"]) == \
            ((r, H), (r, H // 2), (0, rank * H // 2), (1, 2)), f"rank {rank} row A (cols sharded): {a}"
        assert (b["global_shape"], b["replica_id"]) == ((K, r), (0, rank, 0)), f"rank {rank} row B: {b}"
        stacked = res["column_stacked"]
        assert sorted(stacked) == ["layers.lora_A.default.weight", "layers.lora_B.default.weight"], \
            "include_base=False keeps only the factors"
        sb = stacked["layers.lora_B.default.weight"]
        assert (sb["global_shape"], sb["global_offset"]) == ((3, H, r), (1, rank * H // 2, 0)), \
            f"rank {rank}: a prepended (layer) offset must shift the axes: {sb}"


def test_dist_checkpointing_tp2_loads_at_tp1_and_tp4(tmp_path):
    """Save at TP=2 (DP=2); load everything at TP=1 (DP=4) and the adapters alone at TP=4."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    res = C.run_standalone(C.dist_ckpt_task, 4, str(tmp_path / "result.pt"), ckpt_dir=str(ckpt))
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
    for rank, res in enumerate(dist_pool.run(C.run_example, 2, path=path, out_dir=str(tmp_path))):
        assert res["adapted"] == ["linear_fc1", "linear_fc2"], f"rank {rank}: {res['adapted']}"
        assert res["losses"][-1] < res["losses"][0], f"rank {rank}: the adapter did not train: {res['losses']}"
        assert [n for n in res["sp_marked"] if "lora_" in n] == ["linear_fc1.lora_A.default.weight",
                                                                 "linear_fc2.lora_B.default.weight"], \
            f"rank {rank}: SP-marked factors {res['sp_marked']}"
        assert "linear_fc1.base_layer.weight" in res["sharded_keys"], res["sharded_keys"]
    assert (tmp_path / "adapter_model.safetensors").is_file(), "save_adapter wrote nothing"
    blocks = C.readme_python_blocks([ROOT / "README.md"])
    assert C.readme_region(path) in blocks, "the README's 'Use with Megatron' code must be the example's"
