"""dispatch_megatron keeps PEFT's dispatcher contract for megatron-core parallel linears.

Column/row parallel linears (and subclasses) become our fused modules, anything else is left to
other dispatchers; every LoRA option (r, alpha, dropout, rsLoRA, the three inits, rank/alpha
patterns by module name) reaches the module; options it cannot honour are refused by name
without touching the target; apply_lora adapts a bare Megatron model.

Every rank function asserts on its rank (both ranks of a TP=2 group must build the same modules).
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from tplora_kernels import LoRAConfig, apply_lora, dispatch_megatron
from tplora_kernels.adapters import init_full_factors
from tplora_kernels.config import check_config, layer_options, pattern_value

from ..support.checks import assert_raises
from ..support.layers import H, K, ToyMLP, column, row


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def _subclasses():
    class SubColumn(ColumnParallelLinear):
        pass

    class SubRow(RowParallelLinear):
        pass

    return SubColumn, SubRow


def dispatch_kinds_task(ctx) -> None:
    """Column/Row (and subclasses) map to our modules, a LoRA layer is unwrapped, others get None."""
    from peft import LoraConfig

    sub_col, sub_row = _subclasses()
    want = {"ours": ("ColumnParallelLoRA", "RowParallelLoRA"),
            "peft": ("PeftColumnParallelLoRA", "PeftRowParallelLoRA")}
    for cfg_name, cfg in (("ours", LoRAConfig(r=2, lora_alpha=4)), ("peft", LoraConfig(r=2, lora_alpha=4))):
        col, rw = want[cfg_name]
        targets = {
            "ColumnParallelLinear": (column(ctx.group, ctx.tp, K, H), col),
            "RowParallelLinear": (row(ctx.group, ctx.tp, H, K), rw),
            "a subclass of ColumnParallelLinear": (column(ctx.group, ctx.tp, K, H, cls=sub_col), col),
            "a subclass of RowParallelLinear": (row(ctx.group, ctx.tp, H, K, cls=sub_row), rw),
            "nn.Linear (left to other dispatchers)": (nn.Linear(K, H), None),
            "a container (not a target)": (nn.Sequential(nn.Linear(K, H)), None),
        }
        for name, (target, want_type) in targets.items():
            # PEFT's call style (config=) for the PEFT config, positional for ours.
            new = (dispatch_megatron(target, "default", config=cfg) if cfg_name == "peft"
                   else dispatch_megatron(target, "default", cfg))
            got = None if new is None else (type(new).__name__, new.base_layer is target)
            expected = None if want_type is None else (want_type, True)
            assert got == expected, f"rank {ctx.rank} {cfg_name} config, {name}: got {got}, expected {expected}"
        # A target that is already a LoRA layer: its base layer is unwrapped.
        base = column(ctx.group, ctx.tp, K, H)
        again = dispatch_megatron(dispatch_megatron(base, "first", cfg), "second", cfg)
        got = (type(again).__name__, again.base_layer is base, sorted(again.lora_A))
        assert got == (col, True, ["second"]), (
            f"rank {ctx.rank} {cfg_name} config: a LoRA layer as target must be unwrapped to its Megatron base, "
            f"got {got}")


def dispatch_options_task(ctx, which: str) -> None:
    """r, alpha, dropout, rsLoRA, init and the patterns as the built modules see them."""
    from peft import LoraConfig

    at = f"rank {ctx.rank} {which}"
    make = LoraConfig if which == "peft" else LoRAConfig
    cfg = make(r=4, lora_alpha=12, lora_dropout=0.25, use_rslora=False, init_lora_weights=True,
               rank_pattern={"fc1": 2, r"layers\.1\..*": 6}, alpha_pattern={"fc2": 3})
    want = {  # (r, alpha, scaling, dropout); defaults r=4 alpha=12
        "layers.0.fc1": (2, 12.0, 6.0, 0.25),
        "layers.0.fc10": (4, 12.0, 3.0, 0.25),  # a suffix is not a match
        "layers.1.fc2": (6, 3.0, 0.5, 0.25),
        "fc2": (4, 3.0, 0.75, 0.25),
        None: (4, 12.0, 3.0, 0.25),  # no name: no pattern applies
    }
    for name, expected in want.items():
        m = dispatch_megatron(column(ctx.group, ctx.tp, K, H), "default", cfg, target_name=name)
        got = (m.r["default"], m.lora_alpha["default"], m.scaling["default"], m.lora_dropout["default"])
        assert got == expected, f"{at}: (r, alpha, scaling, dropout) for {name!r}: {got}, expected {expected}"
    # Resolved values that PEFT passes explicitly win over the patterns.
    m = dispatch_megatron(column(ctx.group, ctx.tp, K, H), "default", cfg, target_name="layers.0.fc1", r=5,
                          lora_alpha=10)
    got = (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
    assert got == (5, 10.0, 2.0), f"{at}: explicit r/lora_alpha must win over the patterns, got {got}"
    m = dispatch_megatron(column(ctx.group, ctx.tp, K, H), "default", make(r=4, lora_alpha=8, use_rslora=True))
    assert m.scaling["default"] == pytest.approx(8 / math.sqrt(4)), (
        f"{at}: use_rslora scales by alpha/sqrt(r), got {m.scaling['default']}")
    # init: the module's factors are the TP shards of init_full_factors under the same seed.
    for kind in ("column", "row"):
        for init in (True, False, "gaussian"):
            target = column(ctx.group, ctx.tp, K, H) if kind == "column" else row(ctx.group, ctx.tp, H, K)
            torch.manual_seed(77)
            m = dispatch_megatron(target, "default", make(r=4, lora_alpha=8, init_lora_weights=init))
            torch.manual_seed(77)
            a, b = init_full_factors(4, m.in_features, m.out_features, init)
            a_i, b_i = m.spec.layout.shard_factors(a, b, m.tp_rank, m.tp_size)
            same = (torch.equal(m.lora_A["default"].weight, a_i), torch.equal(m.lora_B["default"].weight, b_i))
            assert all(same), f"{at} {kind} init={init!r}: (A, B) equal to the shards of the full init: {same}"
            b_abs = float(b.abs().sum())
            assert (b_abs == 0) == (init is not False), f"{at} {kind} init={init!r}: B zero iff init is not False"
            if init == "gaussian":
                assert abs(float(a.std()) - 1 / 4) < 0.05, f"{at} {kind}: gaussian A std {float(a.std())} != 1/r"


def dispatch_errors_task(ctx) -> None:
    """dispatch_megatron refuses options it cannot honour, by name, and leaves the target alone."""
    from peft import LoraConfig

    cases = {
        "layer_replication": dict(layer_replication=[(0, 1)]),
        "lora_bias": dict(lora_bias=True),
        "init_lora_weights": dict(init_lora_weights="pissa"),
        "bias": dict(bias="all"),
        "fan_in_fan_out": dict(fan_in_fan_out=True),
    }
    target = column(ctx.group, ctx.tp, K, H)
    for option, kw in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=2, **kw)
        assert_raises(f"rank {ctx.rank}: dispatch_megatron with {option}", ValueError, [option], dispatch_megatron,
                      target, "default", cfg)
    assert_raises(f"rank {ctx.rank}: dispatch_megatron without a config", TypeError, ["lora_config"],
                  dispatch_megatron, target, "default", None)
    assert all(p.requires_grad for p in target.parameters()), "a refused dispatch must not freeze or change the target"


def apply_lora_task(ctx) -> None:
    """apply_lora on a bare Megatron model: targets, a second adapter, and errors."""
    at = f"rank {ctx.rank}"
    model = ToyMLP(ctx.group, ctx.tp)
    model.head = nn.Linear(K, 2)
    names = apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "head"], backend="torch"))
    assert names == ["fc1", "fc2"], f"{at}: targets adapted: {names} (nn.Linear 'head' must be skipped)"
    types = [type(model.fc1).__name__, type(model.fc2).__name__, type(model.head).__name__]
    assert types == ["ColumnParallelLoRA", "RowParallelLoRA", "Linear"], f"{at}: {types}"
    again = apply_lora(model, LoRAConfig(r=2, lora_alpha=2, target_modules=["fc1"]), adapter_name="b")
    assert again == ["fc1"] and sorted(model.fc1.lora_A) == ["b", "default"], (
        f"{at}: a second apply_lora adds an adapter: {again}, {sorted(model.fc1.lora_A)}")
    assert model.fc1.active_adapter == "default", f"{at}: adding an adapter changed the active one"
    assert_raises(f"{at}: apply_lora matching nothing", ValueError, ["matched no"], apply_lora, model,
                  LoRAConfig(target_modules=["nothing"]))
    assert_raises(f"{at}: apply_lora with an existing adapter name", ValueError, ["already exists"], apply_lora,
                  model, LoRAConfig(target_modules=["fc1"]), adapter_name="b")


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
def test_dispatch_returns_fused_modules_for_megatron_layers_only(dist_pool):
    """Column/row parallel linears and their subclasses become our modules (a LoRA layer is
    unwrapped first); anything else is left to other dispatchers.
    """
    dist_pool.run(dispatch_kinds_task, 2)


@pytest.mark.parametrize("which", ["ours", "peft"])
def test_dispatch_honours_lora_options(dist_pool, which):
    """r, alpha, dropout, rsLoRA, the three inits and rank/alpha patterns by module name."""
    dist_pool.run(dispatch_options_task, 2, which=which)


def test_dispatch_rejects_unsupported_options_by_name(dist_pool):
    """dispatch_megatron refuses options it cannot honour (layer replication, LoRA bias, other inits,
    bias, fan_in_fan_out) by name and leaves the target unchanged. (DoRA is supported: its tests are
    tests/modules/test_dora_modules.py and tests/integration/test_dora_*.py.)
    """
    dist_pool.run(dispatch_errors_task, 1)


def test_config_checks_without_a_model():
    """The option checks and pattern matching work on a config alone, before any model exists."""
    with pytest.raises(ValueError, match="use_qalora"):
        check_config(SimpleNamespace(r=1, lora_alpha=1, use_qalora=True))
    check_config(SimpleNamespace(r=1, lora_alpha=1, use_dora=True))  # DoRA is supported
    with pytest.raises(ValueError, match="init_lora_weights"):
        check_config(LoRAConfig(init_lora_weights="olora"))
    with pytest.raises(TypeError, match="lora_config"):
        check_config(object())
    assert layer_options(LoRAConfig(r=3, lora_alpha=6))["r"] == 3, "layer_options lost r"
    assert pattern_value({"a.b": 1}, "x.a.b", 0) == 1, "a dotted suffix must match a pattern"
    assert pattern_value({"a.b": 1}, "xa.b", 0) == 0, "a partial name must not match a pattern"


def test_register_rejects_unsupported_options_before_touching_a_model():
    """register refuses unsupported options and non-PEFT configs, and registers exactly Megatron's
    two parallel linears.
    """
    from peft import LoraConfig

    import tplora_kernels.peft as tpeft

    with pytest.raises(ValueError, match="lora_bias"):
        tpeft.register(LoraConfig(lora_bias=True))
    assert tpeft.register(LoraConfig(use_dora=True)).use_dora, "register must accept DoRA"
    with pytest.raises(TypeError, match="LoraConfig"):
        tpeft.register(LoRAConfig())
    cfg = tpeft.register(LoraConfig(r=2))
    names = {t.__name__ for t in cfg._custom_modules}
    assert names == {"ColumnParallelLinear", "RowParallelLinear"}, f"registered custom modules: {names}"


def test_apply_lora_adapts_a_bare_megatron_model(dist_pool):
    """apply_lora wraps the targeted parallel linears (not nn.Linear), adds a second adapter without
    changing the active one, and refuses no match or a taken name.
    """
    dist_pool.run(apply_lora_task, 2)
