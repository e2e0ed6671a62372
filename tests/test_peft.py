"""PEFT end to end (issue 3, item 2) and export/import in PEFT's format (item 6).

The oracle is PEFT itself: a dense twin of the TP model (same module names, nn.Linear, the
gathered full weights, fp64) under stock PEFT LoRA. At TP=2 on gloo, with dropout off.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from . import dispatch_cases as C

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"peft": str(root / "peft"), "bare": str(root / "bare")}


@pytest.fixture(scope="module")
def tp2(dist_pool, dirs):
    return dist_pool.run(C.peft_tp2_task, 2, out_dir=dirs["peft"], bare_dir=dirs["bare"])


def test_get_peft_model_builds_fused_modules(tp2):
    for rank, res in enumerate(tp2):
        assert res["types"] == ["PeftColumnParallelLoRA", "PeftRowParallelLoRA"], f"rank {rank}: {res['types']}"
        assert res["trainable"] == sorted(f"base_model.model.{n}.lora_{w}.default.weight"
                                          for n in ("fc1", "fc2") for w in "AB"), f"rank {rank}: {res['trainable']}"


def test_forward_backward_tp2_matches_dense_peft(tp2):
    """Output, dx and every factor gradient (gathered) equal the dense PEFT model's."""
    for rank, res in enumerate(tp2):
        assert res["backend"] is not None, f"rank {rank}: no backend recorded"
        assert _rel(res["y"], res["dense_y"]) < 1e-5, f"rank {rank}: output rel err {_rel(res['y'], res['dense_y'])}"
        assert _rel(res["dx"], res["dense_dx"]) < 1e-5, f"rank {rank}: dx rel err"
        for k, g in res["grads"].items():
            err = _rel(g, res["dense_grads"][k])
            assert err < 1e-5, f"rank {rank} d{k}: rel err {err:.2e} vs dense PEFT"


def test_peft_state_dict_keys_match_peft_layout(tp2):
    for rank, res in enumerate(tp2):
        assert res["state_keys"] == res["dense_keys"], f"rank {rank}: {res['state_keys']} vs {res['dense_keys']}"
        shapes = res["state_shapes"]
        # The TP state dict holds the local shards: B rows for the column layer, A cols for the row.
        assert shapes["base_model.model.fc1.lora_B.weight"] == (C.H // 2, 4), f"rank {rank}: {shapes}"
        assert shapes["base_model.model.fc2.lora_A.weight"] == (4, C.H // 2), f"rank {rank}: {shapes}"


def test_add_adapter_and_set_adapter(tp2):
    for rank, res in enumerate(tp2):
        assert _rel(res["y_default_again"], res["y"]) < 1e-6, f"rank {rank}: add_adapter changed the output"
        assert res["other_active"] == ["other", "other"], f"rank {rank}: set_adapter: {res['other_active']}"
        assert res["other_trainable"] == sorted(f"base_model.model.{n}.lora_{w}.other.weight"
                                                for n in ("fc1", "fc2") for w in "AB"), f"rank {rank}"
        assert _rel(res["y_other"], res["dense_y_other"]) < 1e-5, f"rank {rank}: 'other' output vs dense PEFT"
        assert _rel(res["y_other"], res["y"]) > 1e-3, f"rank {rank}: switching adapters must change the output"
        assert res["after_peft_delete"] == (["default", "other"], "default"), f"rank {rank}: PeftModel.delete_adapter"


def test_disable_adapter_context(tp2):
    for rank, res in enumerate(tp2):
        assert _rel(res["y_disabled"], res["dense_y_disabled"]) < 1e-5, f"rank {rank}: disabled vs dense base"
        assert _rel(res["y_after_disable"], res["y_other"]) < 1e-6, f"rank {rank}: adapter back after the context"


def test_merge_and_unload_gives_megatron_layers_with_the_same_output(tp2):
    for rank, res in enumerate(tp2):
        assert res["merge_adapter"][0] and res["merge_adapter"][1] < 1e-5, f"rank {rank}: merge_adapter()"
        assert not res["unmerge_adapter"][0] and res["unmerge_adapter"][1] < 1e-5, f"rank {rank}: unmerge_adapter()"
        assert res["merged_types"] == ["ColumnParallelLinear", "RowParallelLinear"], f"rank {rank}"
        assert res["merged_vs_active"] < 1e-5, f"rank {rank}: megatron forward of the merged model differs by " \
                                               f"{res['merged_vs_active']:.2e}"


def _dense_output(res, path: str) -> torch.Tensor:
    from peft import PeftModel

    dense = C.DenseMLP()
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            w, b = res["base_full"][n]
            getattr(dense, n).weight.copy_(w)
            getattr(dense, n).bias.copy_(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(dense, path)
    model.eval()
    with torch.no_grad():
        return model(C.inputs((6, 2, C.K), seed=9))


def test_save_adapter_loads_into_dense_torch_model_with_peft(tp2, dirs):
    """save_adapter at TP=2 -> PeftModel.from_pretrained(nn.Linear model) reproduces the TP output."""
    res = tp2[0]
    assert res["saved_keys"] == res["dense_keys"], f"file keys {res['saved_keys']}"
    y = _dense_output(res, dirs["peft"])
    assert _rel(y, res["y"]) < 1e-5, f"dense PEFT from our file vs TP=2 output: rel err {_rel(y, res['y']):.2e}"


def test_save_adapter_without_peft_writes_a_config_peft_reads(tp2, dirs):
    """A bare model (apply_lora, per-layer r/alpha, rsLoRA): the derived config reproduces every layer."""
    with open(f"{dirs['bare']}/adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True, cfg
    assert cfg["target_modules"] == ["fc1", "fc2"], cfg["target_modules"]
    y = _dense_output(tp2[0], dirs["bare"])
    assert _rel(y, tp2[0]["bare_y"]) < 1e-5, f"dense PEFT vs bare TP=2 output: rel err {_rel(y, tp2[0]['bare_y'])}"


@pytest.mark.parametrize("tp", [1, 4])
@pytest.mark.parametrize("peft_wrapped", [False, True], ids=["bare", "peft"])
def test_load_adapter_at_any_tp(dist_pool, tp2, dirs, tp, peft_wrapped):
    """load_adapter slices the full adapter for TP=1 and TP=4; the output equals TP=2's."""
    results = dist_pool.run(C.load_adapter_task, tp, path=dirs["peft"], base_full=tp2[0]["base_full"],
                            peft_wrapped=peft_wrapped)
    for rank, res in enumerate(results):
        assert res["active"] == "loaded" and res["r"] == [4, 4], f"tp={tp} rank {rank}: {res}"
        assert res["scaling"] == [2.0, 2.0], f"tp={tp} rank {rank}: scaling {res['scaling']}"
        err = _rel(res["y"], tp2[0]["y"])
        assert err < 1e-5, f"tp={tp} rank {rank} ({'peft' if peft_wrapped else 'bare'}): output vs TP=2 {err:.2e}"
    if not peft_wrapped:
        assert results[0]["names"] == ["fc1", "fc2"], results[0]["names"]


def test_load_adapter_refuses_mismatches(dist_pool, dirs):
    res = dist_pool.run(C.load_adapter_errors, 2, path=dirs["peft"])[0]
    assert res["names"] and "strict" in res["names"], f"mismatched names must raise: {res['names']!r}"
    assert res["lenient"] == [], "strict=False loads what matches (nothing here)"
    assert res["dora"] and "use_dora" in res["dora"], f"a DoRA file must be refused by name: {res['dora']!r}"


def test_peft_example_runs_and_readme_shows_it(dist_pool, tmp_path):
    """examples/peft_example.py trains, saves and merges at TP=2; the README shows its code verbatim."""
    path = str(ROOT / "examples" / "peft_example.py")
    for rank, res in enumerate(dist_pool.run(C.run_example, 2, path=path, out_dir=str(tmp_path))):
        assert res["losses"][-1] < res["losses"][0], f"rank {rank}: the adapter did not train: {res['losses']}"
        assert res["keys"] == sorted(f"base_model.model.{n}.lora_{w}.weight" for n in ("fc1", "fc2") for w in "AB")
        assert res["adapter_effect"] > 1e-3 and res["merge_err"] < 1e-5, f"rank {rank}: {res}"
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    blocks = C.readme_python_blocks([ROOT / "README.md"])
    assert C.readme_region(path) in blocks, "the README's 'Use with PEFT' code must be examples/peft_example.py's"
