"""Pipeline-parallel GPTModels: training through Megatron's own schedules, and every adapter path by global layer.

One 4-rank gloo world (``tests/support/pipeline.py``) trains the same Llama-style GPTModel with
LoRA at TP1×PP1 (the reference), TP1×PP2 (1F1B), TP2×PP2 with sequence parallelism, PP2 with
two virtual stages per rank (the interleaved schedule) and, with MoE, PP2 × EP2; each layout
saves its adapter as PEFT files, as a Hugging Face adapter and as an adapter-only dist checkpoint,
and loads what the layouts before it saved into fresh models with other factors. A last TP1×PP1
model loads every layout's files. What is proven:

* training at every layout equals PP=1: the same losses and the same trained factors;
* the in-memory export (``adapter_state_dict``) and the files name every layer by its global
  index: a file from any layout holds every layer, and the HF export is bit-identical to the
  in-memory HF export;
* every round trip (PP2 → PP1, PP1 → PP2, TP2×PP2 → TP1×PP1 and back, VPP, EP) gives the source
  model's logits;
* refused calls (a file without a layer, a group without a pipeline stage, a checkpoint of another
  rank) raise on every rank, naming the layer by its global name, and nothing hangs.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import gpt as G
from tests.support import pipeline as PL
from tplora_kernels.testing.numerics import rel_err

REFERENCE = PL.Layout()
TRAINED = [REFERENCE, PL.Layout(pp=2), PL.Layout(tp=2, pp=2, sp=True), PL.Layout(pp=2, vpp=2)]
MOE = [PL.Layout(moe=True), PL.Layout(pp=2, ep=2, moe=True)]
FP32 = 1e-5  # fp32 results computed in another order (TP partial sums, schedule): relative


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Rank 0's results of every task (every task's every rank is checked for errors)."""
    root = str(tmp_path_factory.mktemp("pipeline"))
    tasks = PL.layouts_tasks(root, TRAINED, extra=[REFERENCE])
    tasks += PL.layouts_tasks(root + "/moe", MOE)
    tasks.append(("refusals", "tests.support.pipeline:refusals_task", dict(layout={"pp": 2}, root=root)))
    tasks.append(("seeds", "tests.support.pipeline:seeds_task", dict(layout={"tp": 2, "pp": 2})))
    ranks = G.run_world(4, tasks, root, timeout=900)
    errors = [str(v) for r in ranks for v in r.values() if isinstance(v, G.TaskError)]
    assert not errors, "\n".join(errors)
    return ranks


@pytest.mark.parametrize("layout", TRAINED[1:] + MOE[1:], ids=lambda lay: lay.label)
def test_training_equals_pp1(worlds, layout):
    got = worlds[0][layout.label]
    ref = worlds[0][(MOE[0] if layout.moe else REFERENCE).label]
    drift = [abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"])]
    assert max(drift) <= FP32, f"{layout.label}: loss drift per step {drift} against PP=1"
    assert sorted(got["factors"]) == sorted(ref["factors"]), (
        f"{layout.label}: the adapter's layers differ from PP=1's: only here "
        f"{sorted(set(got['factors']) - set(ref['factors']))[:4]}, only at PP=1 "
        f"{sorted(set(ref['factors']) - set(got['factors']))[:4]}")
    worst = max((rel_err(got["factors"][k], ref["factors"][k]), k) for k in ref["factors"])
    assert worst[0] <= FP32, f"{layout.label}: trained factor {worst[1]} differs from PP=1's by {worst[0]:.2e}"
    assert rel_err(got["logits"], ref["logits"]) <= FP32, f"{layout.label}: logits after training differ from PP=1's"


@pytest.mark.parametrize("layout", TRAINED + MOE, ids=lambda lay: lay.label)
def test_exports_hold_every_layer_by_global_name(worlds, layout):
    got = worlds[0][layout.label]
    layers = sorted({k.split(".")[4] for k in got["factors"] if k.startswith("base_model.model.decoder.layers.")},
                    key=int)
    assert layers == [str(i) for i in range(PL.LAYERS)], f"{layout.label}: the PEFT export holds layers {layers}"
    hf_layers = sorted({k.split(".")[4] for k in got["hf"]}, key=int)
    assert hf_layers == [str(i) for i in range(PL.LAYERS)], f"{layout.label}: the HF export holds layers {hf_layers}"
    tensors, config = got["hf_memory"]
    assert sorted(tensors) == sorted(got["hf"]), f"{layout.label}: in-memory and file HF exports differ in keys"
    unequal = [k for k in tensors if not torch.equal(tensors[k], got["hf"][k])]
    assert not unequal, f"{layout.label}: in-memory HF tensors are not bit-identical to the file's: {unequal[:3]}"
    assert config["r"] == PL.RANK, f"{layout.label}: the in-memory config says r={config['r']}"


@pytest.mark.parametrize("layout", TRAINED + MOE, ids=lambda lay: lay.label)
def test_layer_by_layer_export_reaches_only_its_destination(worlds, layout):
    stream = worlds[1][layout.label]["stream"]
    layers = [layer for layer, _ in stream]
    assert layers == [f"decoder.layers.{i}" for i in range(PL.LAYERS)], (
        f"{layout.label}: rank 1 got layers {layers}, one per item in global order expected")
    for layer, keys in stream:
        strays = [k for k in keys if not k.startswith(f"base_model.model.{layer}.")]
        assert not strays, f"{layout.label}: the item for {layer} holds other layers' tensors {strays[:3]}"
    got = sorted(k for _, keys in stream for k in keys)
    assert got == sorted(worlds[0][layout.label]["factors"]), f"{layout.label}: the stream and the dict differ"
    assert not worlds[0][layout.label]["stream"], f"{layout.label}: rank 0 is not the destination but got layers"
    assert worlds[0][layout.label]["memory_elsewhere"] is None, f"{layout.label}: rank 0 got the dst=1 export"
    assert worlds[1][layout.label]["stream_config"] == worlds[0][layout.label]["stream_config"], (
        f"{layout.label}: ranks disagree on the config")


def test_seeds_differ_across_stages_seeded_alike(worlds):
    by_rank = [r["seeds"] for r in worlds]
    for key in ("salted", "unsalted"):
        for stage in (0, 1):
            tp = [r[key] for r in by_rank if r["stage"] == stage]
            assert all(t == tp[0] for t in tp), f"{key}: the TP ranks of stage {stage} drew different seeds {tp}"
    stage0 = next(r for r in by_rank if r["stage"] == 0)
    stage1 = next(r for r in by_rank if r["stage"] == 1)
    # Without the salt, stage 1 would draw stage 0's seeds: layer L+2 would reuse layer L's masks.
    assert stage0["unsalted"] == stage1["unsalted"], "the control: stages seeded alike draw alike without the salt"
    assert not set(stage0["salted"]) & set(stage1["salted"]), (
        f"stages seeded alike share dropout seeds: {stage0['salted']} and {stage1['salted']}")


def _round_trips(worlds) -> list[tuple[str, str, str]]:
    out = []
    for label, got in worlds[0].items():
        for key in (got.get("loaded", {}) if isinstance(got, dict) else {}):
            src, fmt = key.split("/")
            out.append((label, src, fmt))
    return out


def test_round_trips_cover_every_direction(worlds):
    trips = {(dst, src) for dst, src, _ in _round_trips(worlds)}
    want = {("tp1-pp2", "tp1-pp1"), ("load@tp1-pp1", "tp1-pp2"), ("load@tp1-pp1", "tp2-pp2-sp"),
            ("tp2-pp2-sp", "tp1-pp1"), ("load@tp1-pp1", "tp1-pp2-vpp2"), ("tp1-pp2-vpp2", "tp2-pp2-sp"),
            ("tp1-pp2-ep2-moe", "tp1-pp1-moe")}
    assert want <= trips, f"missing round trips (destination, source): {sorted(want - trips)}"


@pytest.mark.parametrize("fmt", ["peft", "hf", "dcp"])
def test_round_trips_give_the_source_logits(worlds, fmt):
    bad = []
    for dst, src, f in _round_trips(worlds):
        if f != fmt:
            continue
        got = worlds[0][dst]["loaded"][f"{src}/{fmt}"]
        want = worlds[0][src]["logits"]
        err = rel_err(got, want)
        if not err <= FP32:
            bad.append(f"{src} -> {dst}: {err:.2e}")
    assert not bad, f"{fmt} round trips whose logits differ from the source model's: {bad}"


def test_refusals_raise_on_every_rank(worlds):
    per_rank = [r["refusals"] for r in worlds]
    for what, needle in (("missing_layer", f"decoder.layers.{PL.LAYERS - 1}.mlp.linear_fc2"),
                         ("stage_group", "group= must hold every rank"),
                         ("dcp_shape", "global shape")):
        msgs = [r[what] for r in per_rank]
        assert all(m is not None for m in msgs), f"{what}: refused on ranks {[i for i, m in enumerate(msgs) if m]} only"
        assert all(needle in m for m in msgs), f"{what}: the message does not name {needle!r}: {msgs[0]}"
    assert "strict=False" not in per_rank[0]["missing_layer"], (
        f"a layout-independent mismatch must not advise strict=False: {per_rank[0]['missing_layer']}")
    assert "1 LoRA layer(s)" in per_rank[0]["missing_layer"], f"miscounted: {per_rank[0]['missing_layer']}"


def test_report(worlds, capsys):
    """Per layout: training drift against PP=1 (losses, trained factors, logits); per round trip: the logits'
    relative error against the source model (printed; the tests above hold the bars)."""
    rows = []
    for layout in TRAINED[1:] + MOE[1:]:
        got, ref = worlds[0][layout.label], worlds[0][(MOE[0] if layout.moe else REFERENCE).label]
        drift = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
        factors = max(rel_err(got["factors"][k], ref["factors"][k]) for k in ref["factors"])
        rows.append(f"train {layout.label:<28} loss drift {drift:.1e}  factors {factors:.1e}  "
                    f"logits {rel_err(got['logits'], ref['logits']):.1e}")
    for dst, src, fmt in sorted(_round_trips(worlds)):
        err = rel_err(worlds[0][dst]["loaded"][f"{src}/{fmt}"], worlds[0][src]["logits"])
        rows.append(f"{fmt:<5} {src:>18} -> {dst:<18} logits {err:.1e}")
    assert rows
    with capsys.disabled():
        print("\n" + "\n".join(rows))
