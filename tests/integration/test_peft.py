"""PEFT end to end on a TP model equals stock PEFT on its dense twin; adapters move in PEFT's format.

Through ``get_peft_model``: forward and backward, the state-dict keys, add/set/disable adapters,
merging and ``merge_and_unload``; ``save_adapter``/``load_adapter`` write and read PEFT's files
(loadable by PEFT itself, refused by name when they do not fit); the PEFT example runs and is the
README's code.

The oracle is PEFT itself: a dense twin of the TP model (same module names, nn.Linear, the
gathered full weights, fp64) under stock PEFT LoRA. At TP=2 on gloo, with dropout off.
``peft_tp2_task`` runs once (a module-scoped fixture) and feeds several tests, which assert per
rank here; the other rank functions assert on their ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tplora_kernels import LoRAConfig, apply_lora, gather_full_factors, load_adapter, save_adapter

from ..support.checks import assert_raises, assert_readme_shows_example, rel_err
from ..support.harness import run_example
from ..support.layers import DenseMLP, H, K, ToyMLP, column, dense_from, full_base, inputs, load_full_base, peft_config

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def _grads(pm, adapter: str = "default") -> dict:
    out = {}
    for name in ("fc1", "fc2"):
        m = getattr(pm.base_model.model, name)
        ga = m.lora_A[adapter].weight.grad
        gb = m.lora_B[adapter].weight.grad
        ga, gb = m.spec.layout.gather_factors(ga, gb, m.tp_group)
        out[f"{name}.A"], out[f"{name}.B"] = ga.clone(), gb.clone()
    return out


def peft_tp2_task(ctx, out_dir: str, bare_dir: str) -> dict:
    """get_peft_model on a TP Megatron model: everything PEFT users do, checked against dense PEFT."""
    from peft import get_peft_model, get_peft_model_state_dict

    res: dict = {}
    model = ToyMLP(ctx.group, ctx.tp)
    dense_base = dense_from(model)
    cfg = peft_config(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["fc1", "fc2"])
    pm = get_peft_model(model, cfg)
    res["types"] = [type(pm.base_model.model.fc1).__name__, type(pm.base_model.model.fc2).__name__]
    res["backend"] = None
    x = inputs((6, 2, K), seed=9).requires_grad_(True)
    y = pm(x)
    res["backend"] = pm.base_model.model.fc1.last_backend
    (y.square().sum()).backward()
    res["y"], res["dx"], res["grads"] = y.detach(), x.grad.clone(), _grads(pm)
    res["full"] = {f"{n}.{w}": t for n in ("fc1", "fc2")
                   for w, t in zip("AB", gather_full_factors(getattr(pm.base_model.model, n), "default"))}
    res["base_full"] = {n: full_base(getattr(pm.base_model.model, n)) for n in ("fc1", "fc2")}
    sd = get_peft_model_state_dict(pm)
    res["state_keys"] = sorted(sd)
    res["state_shapes"] = {k: tuple(v.shape) for k, v in sd.items()}
    res["trainable"] = sorted(n for n, p in pm.named_parameters() if p.requires_grad)

    # Dense PEFT twin, same full weights: the oracle for output and gradients.
    dense = get_peft_model(dense_base, _plain_peft_config(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    _copy_full_into_dense(dense, res["full"], "default")
    xd = inputs((6, 2, K), seed=9).double().requires_grad_(True)
    dense.double()
    yd = dense(xd)
    yd.square().sum().backward()
    res["dense_keys"] = sorted(get_peft_model_state_dict(dense))
    res["dense_y"], res["dense_dx"] = yd.detach().float(), xd.grad.float()
    res["dense_grads"] = {f"{n}.{w}": getattr(getattr(dense.base_model.model, n), f"lora_{w}")["default"]
                          .weight.grad.float() for n in ("fc1", "fc2") for w in "AB"}

    # A second adapter through PEFT's add_adapter, then set_adapter.
    cfg2 = peft_config(r=2, lora_alpha=6, init_lora_weights=False, target_modules=["fc1", "fc2"])
    pm.add_adapter("other", cfg2)
    with torch.no_grad():
        res["y_default_again"] = pm(x)
        pm.set_adapter("other")
        res["y_other"] = pm(x)
        res["other_active"] = [pm.base_model.model.fc1.active_adapter, pm.base_model.model.fc2.active_adapter]
        res["other_trainable"] = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
        full_other = {f"{n}.{w}": t for n in ("fc1", "fc2")
                      for w, t in zip("AB", gather_full_factors(getattr(pm.base_model.model, n), "other"))}
        dense.add_adapter("other", _plain_peft_config(r=2, lora_alpha=6, target_modules=["fc1", "fc2"]))
        dense.double()
        _copy_full_into_dense(dense, full_other, "other")
        dense.set_adapter("other")
        res["dense_y_other"] = dense(xd.detach()).float()
        with pm.disable_adapter():
            res["y_disabled"] = pm(x)
        with dense.disable_adapter():
            res["dense_y_disabled"] = dense(xd.detach()).float()
        res["y_after_disable"] = pm(x)
        pm.set_adapter("default")
        pm.add_adapter("doomed", peft_config(r=2, target_modules=["fc1", "fc2"]))
        pm.delete_adapter("doomed")
        res["after_peft_delete"] = (sorted(pm.base_model.model.fc1.lora_A), pm.base_model.model.fc2.active_adapter)

    # Export in PEFT's format (full A and B), then merge and unload to plain Megatron layers.
    saved = save_adapter(pm, out_dir, group=ctx.group)
    res["saved_keys"] = sorted(saved)
    with torch.no_grad():
        y_active = pm(x)
        pm.merge_adapter()
        res["merge_adapter"] = (pm.base_model.model.fc1.merged, float((pm(x) - y_active).abs().max()))
        pm.unmerge_adapter()
        res["unmerge_adapter"] = (pm.base_model.model.fc1.merged, float((pm(x) - y_active).abs().max()))
        merged = pm.merge_and_unload()
        res["merged_types"] = [type(merged.fc1).__name__, type(merged.fc2).__name__]
        res["merged_vs_active"] = float((merged(x) - y_active).abs().max())  # megatron's own forward

    # A bare Megatron model adapted without PEFT, with per-layer ranks: the derived config.

    bare = ToyMLP(ctx.group, ctx.tp)
    apply_lora(bare, LoRAConfig(r=4, lora_alpha=8, rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3},
                                init_lora_weights=False, use_rslora=True, backend="torch"))
    save_adapter(bare, bare_dir, group=ctx.group)
    with torch.no_grad():
        res["bare_y"] = bare(x)
    return res


def _plain_peft_config(**kw):
    from peft import LoraConfig

    return LoraConfig(**kw)


def _copy_full_into_dense(dense, full: dict, adapter: str) -> None:
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            layer = getattr(dense.base_model.model, n)
            layer.lora_A[adapter].weight.copy_(full[f"{n}.A"])
            layer.lora_B[adapter].weight.copy_(full[f"{n}.B"])


def load_adapter_task(ctx, path: str, base_full: dict, peft_wrapped: bool, want_y: torch.Tensor) -> None:
    """load_adapter at this TP size, onto base weights cut from the TP=2 model's: the output must be TP=2's."""
    model = ToyMLP(ctx.group, ctx.tp)
    for n in ("fc1", "fc2"):
        load_full_base(getattr(model, n), *base_full[n])
    if peft_wrapped:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(r=8, target_modules=["fc1", "fc2"], backend="torch"))
        load_adapter(model, path, adapter_name="loaded")
        names = None
    else:
        apply_lora(model, LoRAConfig(r=8, backend="torch"))
        names = load_adapter(model, path, adapter_name="loaded")
    inner = model.base_model.model if peft_wrapped else model
    with torch.no_grad():
        y = model(inputs((6, 2, K), seed=9))
    at = f"tp={ctx.tp} rank {ctx.rank} ({'peft' if peft_wrapped else 'bare'})"
    ranks = [inner.fc1.r["loaded"], inner.fc2.r["loaded"]]
    assert inner.fc1.active_adapter == "loaded" and ranks == [4, 4], (
        f"{at}: active {inner.fc1.active_adapter!r}, r {ranks}; expected 'loaded' with the file's r=4")
    scaling = [inner.fc1.scaling["loaded"], inner.fc2.scaling["loaded"]]
    assert scaling == [2.0, 2.0], f"{at}: scaling {scaling}, expected the file's alpha/r = 2"
    err = rel_err(y, want_y)
    assert err < 1e-5, f"{at}: output vs TP=2 rel err {err:.2e}"
    if not peft_wrapped:
        assert names == ["fc1", "fc2"], f"{at}: load_adapter returned {names}"


def load_adapter_errors_task(ctx, path: str) -> None:
    """load_adapter refuses a file whose names do not match, and a DoRA config without magnitudes."""
    at = f"rank {ctx.rank}"
    model = nn.Module()
    model.other = column(ctx.group, ctx.tp, K, H)
    apply_lora(model, LoRAConfig(r=2))
    # A file none of whose layers is the model's is a naming mismatch, not a partial adapter: refused
    # strict or not (a lenient load that loads nothing would train from scratch without a word).
    for strict in (True, False):
        assert_raises(f"{at}: load_adapter(strict={strict}) of a file for other module names", ValueError,
                      ["none of the model's 1 LoRA layers", "fc1.lora_A"], load_adapter, model, path, strict=strict)
    dora = path + "_dora"
    if ctx.rank == 0:
        shutil.copytree(path, dora, dirs_exist_ok=True)
        with open(os.path.join(dora, "adapter_config.json")) as f:
            cfg = json.load(f)
        cfg["use_dora"] = True
        with open(os.path.join(dora, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    if ctx.tp > 1:
        dist.barrier(group=ctx.group)
    # A model whose fc1 is the file's: the magnitude is missing for a layer that matches.
    matching = nn.Module()
    matching.fc1 = column(ctx.group, ctx.tp, K, H)
    apply_lora(matching, LoRAConfig(r=2))
    assert_raises(f"{at}: load_adapter of a DoRA config whose file has no magnitudes", ValueError,
                  ["use_dora", "lora_magnitude_vector"], load_adapter, matching, dora, strict=False)


class _Blocks(nn.Module):
    """Two ToyMLP blocks (``layers.0.fc1`` ...), for rank patterns that tell blocks apart."""

    def __init__(self, make) -> None:
        super().__init__()
        self.layers = nn.ModuleList([make(), make()])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


PATTERN = {"layers.1.fc1": 4, "fc1": 2}  # PEFT applies the first match: layers.1.fc1 gets 4, layers.0.fc1 2


def rank_pattern_task(ctx, path: str) -> dict:
    """save_adapter keeps rank_pattern's order (PEFT applies the first match); loading it back counts collectives."""
    torch.manual_seed(3)
    model = _Blocks(lambda: ToyMLP(ctx.group, ctx.tp))
    config = LoRAConfig(r=8, lora_alpha=8, rank_pattern=dict(PATTERN), init_lora_weights=False, backend="torch")
    apply_lora(model, config)
    save_adapter(model, path, config=config, group=ctx.group)
    with open(os.path.join(path, "adapter_config.json")) as f:
        written = json.load(f)["rank_pattern"]
    fresh = _Blocks(lambda: ToyMLP(ctx.group, ctx.tp))
    apply_lora(fresh, LoRAConfig(r=1, backend="torch"))
    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapper

    names = ("all_gather_object", "broadcast_object_list", "broadcast", "all_reduce", "all_gather",
             "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv")
    saved = {n: getattr(dist, n) for n in names}
    try:
        for n in names:
            setattr(dist, n, counted(n, saved[n]))
        load_adapter(fresh, path, adapter_name="loaded")
    finally:
        for n in names:
            setattr(dist, n, saved[n])
    ranks = {f"layers.{i}.{n}": getattr(fresh.layers[i], n).r["loaded"] for i in (0, 1) for n in ("fc1", "fc2")}
    with torch.no_grad():
        x = inputs((6, 2, K), seed=4)
        same = rel_err(fresh(x), model(x))
    return dict(written=list(written.items()), ranks=ranks, calls=calls, same=same)


def test_rank_pattern_order_survives_save_and_load(dist_pool, tmp_path):
    """A rank_pattern whose order matters loads back here and in PEFT; loading runs one small all-gather only.

    ``adapter_config.json`` once sorted its keys, so ``{"layers.1.fc1": 4, "fc1": 2}`` came back as
    ``{"fc1": 2, ...}``: PEFT then gave layers.1.fc1 rank 2 and failed on the r=4 tensors, and so did
    ``load_adapter``. Loading also drew each adapter through the path that broadcasts over TP (two
    wasted collectives per layer) before overwriting it.
    """
    from peft import PeftModel

    path = str(tmp_path / "pattern")
    res = dist_pool.run(rank_pattern_task, 2, path=path)
    for rank, r in enumerate(res):
        assert r["written"][:2] == list(PATTERN.items()), f"rank {rank}: rank_pattern written as {r['written']}"
        assert r["ranks"] == {"layers.0.fc1": 2, "layers.0.fc2": 8, "layers.1.fc1": 4, "layers.1.fc2": 8}, (
            f"rank {rank}: loaded ranks {r['ranks']}")
        assert r["same"] < 1e-6, f"rank {rank}: the loaded model's output differs by {r['same']:.2e}"
        assert r["calls"] == {"all_gather_object": 1}, (
            f"rank {rank}: load_adapter ran collectives {r['calls']}; one all-gather (the agreement) expected")
    dense = PeftModel.from_pretrained(_Blocks(DenseMLP), path)  # raises on a size mismatch
    got = {f"layers.{i}.{n}": getattr(dense.base_model.model.layers[i], n).r["default"] for i in (0, 1)
           for n in ("fc1", "fc2")}
    assert got == res[0]["ranks"], f"PEFT read ranks {got} from our file, the TP model has {res[0]['ranks']}"


def stage_patterns_task(ctx, pp: int) -> dict:
    """get_peft_model on two blocks whose Megatron layers say ``pipeline_model_parallel_size=pp``.

    The config object is the one a stage of a pipeline-split model shares with its layers; only
    the field our refusal reads is set (no pipeline groups are needed to build the layers).
    """
    from peft import get_peft_model

    out = {}
    for name, kw in (("indexed", dict(rank_pattern=dict(PATTERN))), ("suffixes", dict(rank_pattern={"fc1": 2})),
                     ("indexed_targets", dict(target_modules=r".*layers\.1\.fc1"))):
        model = _Blocks(lambda: ToyMLP(ctx.group, ctx.tp))
        for layer in (model.layers[0].fc1, model.layers[1].fc1, model.layers[0].fc2, model.layers[1].fc2):
            layer.config.pipeline_model_parallel_size = pp
        kw.setdefault("target_modules", ["fc1", "fc2"])
        try:
            get_peft_model(model, peft_config(r=8, lora_alpha=8, **kw))
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


@pytest.mark.parametrize("pp", [1, 2])
def test_peft_refuses_layer_indexed_patterns_on_a_pipeline_stage(dist_pool, pp):
    """PEFT matches patterns against a stage's local names: at PP > 1 a pattern naming a layer by index is
    refused on every rank (it would pick other layers on later stages); suffixes, and PP = 1, build."""
    results = dist_pool.run(stage_patterns_task, 2, pp=pp)
    for rank, got in enumerate(results):
        assert got["suffixes"] is None, f"rank {rank} pp={pp}: suffix-only patterns refused: {got['suffixes']}"
        for name, words in (("indexed", ["rank_pattern 'layers.1.fc1'", "pipeline_model_parallel_size=2",
                                         "apply_lora"]),
                            ("indexed_targets", ["target_modules", "pipeline_model_parallel_size=2"])):
            if pp == 1:
                assert got[name] is None, f"rank {rank} pp=1: {name} refused: {got[name]}"
            else:
                missing = [w for w in words if w not in (got[name] or "")]
                assert not missing, f"rank {rank} pp=2: {name}: expected a ValueError naming {words}, got {got[name]!r}"


def peft_example_task(ctx, path: str, out_dir: str) -> None:
    """examples/peft_example.py trains, saves and merges at TP=2 (run by this rank)."""
    res = run_example(ctx, path, out_dir)
    at = f"rank {ctx.rank}"
    assert res["losses"][-1] < res["losses"][0], f"{at}: the adapter did not train: {res['losses']}"
    want = sorted(f"base_model.model.{n}.lora_{w}.weight" for n in ("fc1", "fc2") for w in "AB")
    assert res["keys"] == want, f"{at}: saved keys {res['keys']}, expected {want}"
    assert res["adapter_effect"] > 1e-3 and res["merge_err"] < 1e-5, (
        f"{at}: adapter effect {res['adapter_effect']:.2e} (must be > 1e-3), merged vs unmerged "
        f"{res['merge_err']:.2e} (must be < 1e-5)")


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"peft": str(root / "peft"), "bare": str(root / "bare")}


@pytest.fixture(scope="module")
def tp2(dist_pool, dirs):
    return dist_pool.run(peft_tp2_task, 2, out_dir=dirs["peft"], bare_dir=dirs["bare"])


def test_get_peft_model_builds_fused_modules(tp2):
    """get_peft_model on a Megatron model builds our fused modules for both parallel linears."""
    for rank, res in enumerate(tp2):
        assert res["types"] == ["PeftColumnParallelLoRA", "PeftRowParallelLoRA"], f"rank {rank}: {res['types']}"
        assert res["trainable"] == sorted(f"base_model.model.{n}.lora_{w}.default.weight"
                                          for n in ("fc1", "fc2") for w in "AB"), f"rank {rank}: {res['trainable']}"


def test_forward_backward_tp2_matches_dense_peft(tp2):
    """Output, dx and every factor gradient (gathered) equal the dense PEFT model's."""
    for rank, res in enumerate(tp2):
        assert res["backend"] is not None, f"rank {rank}: no backend recorded"
        err = rel_err(res["y"], res["dense_y"])
        assert err < 1e-5, f"rank {rank}: output rel err {err}"
        assert rel_err(res["dx"], res["dense_dx"]) < 1e-5, f"rank {rank}: dx rel err"
        for k, g in res["grads"].items():
            err = rel_err(g, res["dense_grads"][k])
            assert err < 1e-5, f"rank {rank} d{k}: rel err {err:.2e} vs dense PEFT"


def test_peft_state_dict_keys_match_peft_layout(tp2):
    """get_peft_model_state_dict gives the keys PEFT gives for the dense twin."""
    for rank, res in enumerate(tp2):
        assert res["state_keys"] == res["dense_keys"], f"rank {rank}: {res['state_keys']} vs {res['dense_keys']}"
        shapes = res["state_shapes"]
        # The TP state dict holds the local shards: B rows for the column layer, A cols for the row.
        assert shapes["base_model.model.fc1.lora_B.weight"] == (H // 2, 4), f"rank {rank}: {shapes}"
        assert shapes["base_model.model.fc2.lora_A.weight"] == (4, H // 2), f"rank {rank}: {shapes}"


def test_add_adapter_and_set_adapter(tp2):
    """PEFT's add_adapter and set_adapter switch what the TP model computes, as on the dense twin."""
    for rank, res in enumerate(tp2):
        assert rel_err(res["y_default_again"], res["y"]) < 1e-6, f"rank {rank}: add_adapter changed the output"
        assert res["other_active"] == ["other", "other"], f"rank {rank}: set_adapter: {res['other_active']}"
        assert res["other_trainable"] == sorted(f"base_model.model.{n}.lora_{w}.other.weight"
                                                for n in ("fc1", "fc2") for w in "AB"), f"rank {rank}"
        assert rel_err(res["y_other"], res["dense_y_other"]) < 1e-5, f"rank {rank}: 'other' output vs dense PEFT"
        assert rel_err(res["y_other"], res["y"]) > 1e-3, f"rank {rank}: switching adapters must change the output"
        assert res["after_peft_delete"] == (["default", "other"], "default"), f"rank {rank}: PeftModel.delete_adapter"


def test_disable_adapter_context(tp2):
    """Inside PEFT's disable_adapter the TP model computes the base alone."""
    for rank, res in enumerate(tp2):
        assert rel_err(res["y_disabled"], res["dense_y_disabled"]) < 1e-5, f"rank {rank}: disabled vs dense base"
        assert rel_err(res["y_after_disable"], res["y_other"]) < 1e-6, f"rank {rank}: adapter back after the context"


def test_merge_and_unload_gives_megatron_layers_with_the_same_output(tp2):
    for rank, res in enumerate(tp2):
        assert res["merge_adapter"][0] and res["merge_adapter"][1] < 1e-5, f"rank {rank}: merge_adapter()"
        assert not res["unmerge_adapter"][0] and res["unmerge_adapter"][1] < 1e-5, f"rank {rank}: unmerge_adapter()"
        assert res["merged_types"] == ["ColumnParallelLinear", "RowParallelLinear"], f"rank {rank}"
        assert res["merged_vs_active"] < 1e-5, f"rank {rank}: megatron forward of the merged model differs by " \
                                               f"{res['merged_vs_active']:.2e}"


def _dense_output(res, path: str) -> torch.Tensor:
    from peft import PeftModel

    dense = DenseMLP()
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
        return model(inputs((6, 2, K), seed=9))


def test_save_adapter_loads_into_dense_torch_model_with_peft(tp2, dirs):
    """save_adapter at TP=2 -> PeftModel.from_pretrained(nn.Linear model) reproduces the TP output."""
    res = tp2[0]
    assert res["saved_keys"] == res["dense_keys"], f"file keys {res['saved_keys']}"
    y = _dense_output(res, dirs["peft"])
    assert rel_err(y, res["y"]) < 1e-5, f"dense PEFT from our file vs TP=2 output: rel err {rel_err(y, res['y']):.2e}"


def test_save_adapter_without_peft_writes_a_config_peft_reads(tp2, dirs):
    """A bare model (apply_lora, per-layer r/alpha, rsLoRA): the derived config reproduces every layer."""
    with open(f"{dirs['bare']}/adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True, cfg
    assert cfg["target_modules"] == ["fc1", "fc2"], cfg["target_modules"]
    y = _dense_output(tp2[0], dirs["bare"])
    err = rel_err(y, tp2[0]["bare_y"])
    assert err < 1e-5, f"dense PEFT vs bare TP=2 output: rel err {err}"


@pytest.mark.parametrize("tp", [1, 4])
@pytest.mark.parametrize("peft_wrapped", [False, True], ids=["bare", "peft"])
def test_load_adapter_at_any_tp(dist_pool, tp2, dirs, tp, peft_wrapped):
    """load_adapter cuts the full adapter for TP=1 and TP=4; the output equals TP=2's."""
    dist_pool.run(load_adapter_task, tp, path=dirs["peft"], base_full=tp2[0]["base_full"], peft_wrapped=peft_wrapped,
                  want_y=tp2[0]["y"])


def test_load_adapter_refuses_mismatches(dist_pool, dirs):
    """load_adapter refuses, by name, files whose adapters do not fit the model."""
    dist_pool.run(load_adapter_errors_task, 2, path=dirs["peft"])


def test_peft_example_runs_and_readme_shows_it(dist_pool, tmp_path):
    """examples/peft_example.py trains, saves and merges at TP=2; the README shows its code verbatim."""
    path = str(ROOT / "examples" / "peft_example.py")
    dist_pool.run(peft_example_task, 2, path=path, out_dir=str(tmp_path))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / name).is_file(), f"the example wrote no {name} in {tmp_path}"
    assert_readme_shows_example(path, ROOT / "README.md", "Use with PEFT")
