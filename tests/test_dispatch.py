"""dispatch_megatron: PEFT's dispatcher contract for megatron-core parallel linears (issue 3, item 1)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tplora_kernels import LoRAConfig
from tplora_kernels.dispatch import check_config, layer_options, pattern_value

from . import dispatch_cases as C


def test_dispatch_returns_fused_modules_for_megatron_layers_only(dist_pool):
    """Column/Row (and subclasses) map to our modules, a LoRA layer is unwrapped, others get None."""
    res = dist_pool.run(C.dispatch_kinds, 2)[1]
    want = {
        "ours": ("ColumnParallelLoRA", "RowParallelLoRA"),
        "peft": ("PeftColumnParallelLoRA", "PeftRowParallelLoRA"),
    }
    for cfg, (col, row) in want.items():
        assert res[(cfg, "column")] == (col, True), f"{cfg} config, ColumnParallelLinear: {res[(cfg, 'column')]}"
        assert res[(cfg, "row")] == (row, True), f"{cfg} config, RowParallelLinear: {res[(cfg, 'row')]}"
        assert res[(cfg, "sub_column")] == (col, True), f"{cfg} config, subclass of ColumnParallelLinear"
        assert res[(cfg, "sub_row")] == (row, True), f"{cfg} config, subclass of RowParallelLinear"
        assert res[(cfg, "linear")] is None, f"{cfg} config: nn.Linear must be left to other dispatchers"
        assert res[(cfg, "sequential")] is None, f"{cfg} config: a container is not a target"
        assert res[(cfg, "wrapped")] == (col, True, ["second"]), (
            f"{cfg} config: a LoRA layer as target must be unwrapped to its Megatron base, got {res[(cfg, 'wrapped')]}")


@pytest.mark.parametrize("which", ["ours", "peft"])
def test_dispatch_honours_lora_options(dist_pool, which):
    """r, alpha, dropout, rsLoRA, the three inits and rank/alpha patterns by module name."""
    res = dist_pool.run(C.dispatch_options, 2, which=which)[1]
    # rank_pattern {"fc1": 2, r"layers\.1\..*": 6}, alpha_pattern {"fc2": 3}, defaults r=4 alpha=12
    want = {
        "layers.0.fc1": (2, 12.0, 6.0, 0.25),
        "layers.0.fc10": (4, 12.0, 3.0, 0.25),  # a suffix is not a match
        "layers.1.fc2": (6, 3.0, 0.5, 0.25),
        "fc2": (4, 3.0, 0.75, 0.25),
        None: (4, 12.0, 3.0, 0.25),  # no name: no pattern applies
    }
    for name, expected in want.items():
        assert res[("pattern", name)] == expected, f"{which}: (r, alpha, scaling, dropout) for {name!r}"
    assert res["explicit"] == (5, 10.0, 2.0), f"{which}: explicit r/lora_alpha must win over the patterns"
    assert res["rslora"] == pytest.approx(8 / math.sqrt(4)), f"{which}: use_rslora scales by alpha/sqrt(r)"
    for kind in ("column", "row"):
        for init in (True, False, "gaussian"):
            same_a, same_b, b_abs, _a_std = res[("init", init, kind)]
            assert same_a and same_b, f"{which} {kind} init={init!r}: factors are not the TP slices of the full init"
            assert (b_abs == 0) == (init is not False), f"{which} {kind} init={init!r}: B zero iff init is not False"
        gauss_std = res[("init", "gaussian", kind)][3]
        assert abs(gauss_std - 1 / 4) < 0.05, f"{which} {kind}: gaussian A std {gauss_std} != 1/r"


def test_dispatch_rejects_unsupported_options_by_name(dist_pool):
    res = dist_pool.run(C.dispatch_errors, 1)[0]
    for option in ("use_dora", "lora_bias", "init_lora_weights", "bias", "fan_in_fan_out"):
        assert res[option] is not None, f"{option}: dispatch_megatron accepted an unsupported option"
        assert option in res[option], f"{option}: the error must name the option, got {res[option]!r}"
    assert res["none"] is not None and "lora_config" in res["none"], f"missing config: {res['none']!r}"
    assert res["untouched"], "a refused dispatch must not freeze or change the target"


def test_config_checks_without_a_model():
    with pytest.raises(ValueError, match="use_dora"):
        check_config(SimpleNamespace(r=1, lora_alpha=1, use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights"):
        check_config(LoRAConfig(init_lora_weights="olora"))
    with pytest.raises(TypeError, match="lora_config"):
        check_config(object())
    assert layer_options(LoRAConfig(r=3, lora_alpha=6))["r"] == 3
    assert pattern_value({"a.b": 1}, "x.a.b", 0) == 1
    assert pattern_value({"a.b": 1}, "xa.b", 0) == 0


def test_register_rejects_unsupported_options_before_touching_a_model():
    from peft import LoraConfig

    import tplora_kernels.peft as tpeft

    with pytest.raises(ValueError, match="use_dora"):
        tpeft.register(LoraConfig(use_dora=True))
    with pytest.raises(TypeError, match="LoraConfig"):
        tpeft.register(LoRAConfig())
    cfg = tpeft.register(LoraConfig(r=2))
    assert {t.__name__ for t in cfg._custom_modules} == {"ColumnParallelLinear", "RowParallelLinear"}


def test_apply_lora_adapts_a_bare_megatron_model(dist_pool):
    res = dist_pool.run(C.apply_lora_task, 2)[0]
    assert res["names"] == ["fc1", "fc2"], f"targets adapted: {res['names']} (nn.Linear 'head' must be skipped)"
    assert res["types"] == ["ColumnParallelLoRA", "RowParallelLoRA", "Linear"], res["types"]
    assert res["again"] == ["fc1"] and res["fc1_adapters"] == ["b", "default"], "second apply_lora adds an adapter"
    assert res["fc1_active"] == "default", "adding an adapter must not change the active one"
    assert res["no_match"] and "matched no" in res["no_match"], res["no_match"]
    assert res["duplicate"] and "already exists" in res["duplicate"], res["duplicate"]
