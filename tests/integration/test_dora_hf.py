"""DoRA adapters between Megatron and Hugging Face PEFT (0.22): files, logits, gradients and merges.

One 4-rank gloo world (``tests/support/dora.py``) runs every Megatron side, switching between TP 2,
4 and 1 (``llama.tensor_parallel``); this process builds the Hugging Face side with stock PEFT
(``PeftModel.from_pretrained``, ``merge_and_unload``), never the library.

- Import: a DoRA adapter trained with PEFT on the HF Llama twin of the Megatron twin's base weights
  (q/k/v and gate/up with their own r and alpha, 3 SGD steps on A, B and the magnitude), saved
  with ``save_pretrained``, loaded with ``load_hf_adapter`` at TP 2 and 4: Megatron's logits equal
  HF + PEFT's.
- Export: a DoRA adapter trained at TP 2 (layers of different r and alpha, dropout 0.1), exported
  with ``export_hf_adapter``, loaded by ``PeftModel.from_pretrained``: equal logits, and PEFT's own
  backward on it gives Megatron's gradients (A summed over q/k/v and gate/up, B and m by rows).
- PEFT files: DoRA through ``tplora_kernels.peft.register`` on the toy Megatron MLP (fc1 column,
  fc2 row) at TP 2, saved with ``save_adapter`` and loaded by stock PEFT onto the dense twin (same
  output, same gradients); stock PEFT's dense DoRA adapter loaded with ``load_adapter`` at TP 1, 2, 4.
- Round trips: the TP-2 export loaded back at TP 4 from HF names, PEFT files and the adapter-only
  dist checkpoint (``save_adapter_checkpoint``/``load_adapter_checkpoint``), and at TP 1 from the
  dist checkpoint.
- Merge: ``merge_adapters`` on the twin (TP 2) and PEFT's ``merge_and_unload`` on the toy MLP (TP 2)
  give the unmerged logits; the merged weights equal PEFT's own merge on the HF / dense side.

Tolerances (fp32, as ``test_hf``/``test_peft``; ``test_report`` prints every measured value):

- ``BASE_TOL`` 2e-6 for the base models (measured <= 7.1e-7).
- ``LOGITS_TOL`` 1e-5, max |diff| / max |logit|, HF against Megatron and merged against unmerged
  (measured <= 1.6e-6; an HF export without the magnitude 0.56, loaders that drop it 0.44..1.02, a
  dist checkpoint without it 0.45, a merge that takes the norm of W alone 0.97).
- ``GRAD_TOL`` 1e-4 for Megatron's gradients against PEFT's own backward (measured <= 1.5e-6; 0.89
  with dm left without its 1/‖·‖).
- ``WEIGHT_TOL`` 1e-5 for merged weights against PEFT's merge and unmerged against the base
  (measured <= 4.9e-7).
- ``TOY_TOL`` 1e-5 for the toy MLP against dense fp64 PEFT, as test_peft (measured <= 2.9e-7).
- ``PRODUCT_TOL`` 1e-6 for s·B·A after an HF round trip, which folds scales into B (measured 3.6e-8).
- ``EFFECT_MIN`` 1e-2: the magnitude must move the logits by at least this (against the same adapter
  with m reset to ‖W + s·B A‖, PEFT's init; measured 0.44..1.02), so that an adapter loaded or
  exported without its magnitude fails the logits checks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ..support import dora as D
from ..support import gpt as G
from ..support import llama as L
from ..support.checks import max_rel_err, rel_err

BASE_TOL = 2e-6
LOGITS_TOL = 1e-5
GRAD_TOL = 1e-4
WEIGHT_TOL = 1e-5
TOY_TOL = 1e-5
EFFECT_MIN = 1e-2
PRODUCT_TOL = 1e-6
WORLD = 4
WORLD_TIMEOUT_S = 600.0
PG_TIMEOUT_S = 300.0

IMPORT_TPS = (2, 4)
MEASURED: dict[str, float] = {}  # the largest error each check saw, for test_report (filled as the tests run)
ROUNDTRIPS = [("hf", 4), ("peft", 4), ("dcp", 4), ("dcp", 1)]
TOY_TPS = (2, 4, 1)


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory) -> dict:
    """The dense PEFT adapter written here, then one 4-rank world: TP 2 (train, write), TP 4 and TP 1 (load)."""
    root = tmp_path_factory.mktemp("dora_hf")
    paths = {k: str(root / k) for k in ("peft_hf", "export", "toy_ours", "toy_dense")}
    D.dense_dora_adapter(paths["toy_dense"])
    tasks = [("peft_train", "tests.support.dora:peft_train_task", dict(path=paths["peft_hf"]))]
    tasks += [(f"import/tp{t}", "tests.support.dora:import_task", dict(path=paths["peft_hf"], tp=t, merge=t == 2))
              for t in IMPORT_TPS]
    tasks.append(("export", "tests.support.dora:export_task", dict(root=paths["export"], tp=2)))
    tasks += [(f"roundtrip/{fmt}/tp{t}", "tests.support.dora:roundtrip_task", dict(root=paths["export"], fmt=fmt, tp=t))
              for fmt, t in ROUNDTRIPS]
    tasks += [(f"toy/tp{t}", "tests.support.dora:toy_task",
               dict(ours=paths["toy_ours"], dense=paths["toy_dense"], tp=t)) for t in TOY_TPS]
    order = {2: 0, 4: 1, 1: 2}  # the writers (TP 2) first; one switch per TP size
    tasks.sort(key=lambda task: (order[task[2].get("tp", 2)], task[0] not in ("peft_train", "export", "toy/tp2")))
    ranks = G.run_world(WORLD, tasks, str(root / "world"), timeout=WORLD_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)
    return dict(root=root, paths=paths, ranks=ranks)


def _measured(what: str, err: float) -> float:
    MEASURED[what] = max(err, MEASURED.get(what, 0.0))
    return err


def result(world: dict, label: str) -> dict:
    """Global rank 0's result of a task; every rank's error fails the test."""
    errors = [str(r[label]) for r in world["ranks"] if isinstance(r.get(label), G.TaskError)]
    if errors:
        pytest.fail(f"{label} raised:\n" + "\n".join(errors), pytrace=False)
    got = world["ranks"][0][label]
    assert isinstance(got, dict), f"{label}: rank 0 returned {got!r}"
    return got


def _peft_model(base: dict, path: str, *, trainable: bool = False):
    from peft import PeftModel

    model = PeftModel.from_pretrained(L.hf_model(D.ARCH, base), path, is_trainable=trainable)
    return model.eval()


def _without_magnitude(model) -> None:
    """Every magnitude back to ‖W + s·B A‖ (PEFT's init): the adapter as a loader that ignored m would leave it."""
    with torch.no_grad():
        for m in D.peft_dora_layers(model).values():
            w = m.get_base_layer().weight
            m.lora_magnitude_vector["default"].weight.copy_((w + m.get_delta_weight("default")).norm(dim=1))


def _effect(model, want: torch.Tensor) -> float:
    _without_magnitude(model)
    return rel_err(L.hf_logits(model), want)


def _row(rows: dict, name: str, fn) -> None:
    """``rows[name] = fn()``, or the reason it could not be computed (a task's error fails that row alone)."""
    try:
        rows[name] = fn()
    except (Exception, pytest.fail.Exception) as e:
        rows[name] = dict(error=f"{type(e).__name__}: {e}")


def _import_rows(hf_world, t: int) -> tuple[dict, dict]:
    got = result(hf_world, f"import/tp{t}")
    base = dict(rel=rel_err(got["base_logits"], L.hf_logits(L.hf_model(D.ARCH, got["base"]))), tol=BASE_TOL)
    peft_model = _peft_model(got["base"], hf_world["paths"]["peft_hf"])
    want = L.hf_logits(peft_model)
    return base, dict(rel=rel_err(got["logits"], want), tol=LOGITS_TOL, effect=_effect(peft_model, want))


def _export_row(hf_world) -> dict:
    exp = result(hf_world, "export")
    peft_model = _peft_model(exp["base"], os.path.join(hf_world["paths"]["export"], "hf"))
    want = L.hf_logits(peft_model)
    return dict(rel=rel_err(want, exp["logits"]), tol=LOGITS_TOL, effect=_effect(peft_model, want))


@pytest.fixture(scope="module")
def numbers(hf_world) -> dict[str, dict]:
    """Every logits comparison, the HF side computed once: {row: dict(rel, tol, effect?) or dict(error)}."""
    rows: dict[str, dict] = {}
    for t in IMPORT_TPS:
        pair: dict = {}
        _row(pair, "both", lambda t=t: _import_rows(hf_world, t))
        base, imported = pair["both"] if "error" not in pair["both"] else (pair["both"], pair["both"])
        rows[f"base tp{t}"], rows[f"import tp{t}"] = base, imported
    _row(rows, "export tp2", lambda: _export_row(hf_world))
    for fmt, t in ROUNDTRIPS:
        _row(rows, f"roundtrip {fmt} tp2->tp{t}", lambda fmt=fmt, t=t: dict(
            rel=rel_err(result(hf_world, f"roundtrip/{fmt}/tp{t}")["logits"], result(hf_world, "export")["logits"]),
            tol=LOGITS_TOL))
    return rows


def _check(numbers: dict, prefix: str) -> None:
    picked = {k: v for k, v in numbers.items() if k.startswith(prefix)}
    assert picked, f"no comparison starts with {prefix!r}"
    for row, n in picked.items():
        if "error" in n:
            pytest.fail(f"{row}: {n['error']}", pytrace=False)
        assert n["rel"] <= n["tol"], f"{row}: logits differ by rel {n['rel']:.2e} > {n['tol']:.0e}"
        if "effect" in n:
            assert n["effect"] >= EFFECT_MIN, \
                f"{row}: the magnitude moves the logits by only rel {n['effect']:.2e} (m reset to ‖W + s·B A‖); it " \
                f"must be >= {EFFECT_MIN:.0e} for the comparison to see a lost magnitude"


# -- import ---------------------------------------------------------------------------------------
def test_peft_trained_a_dora_adapter(hf_world):
    """PEFT trained A, B and the magnitudes, and the magnitudes left their init (‖W + s·B A‖)."""
    got = result(hf_world, "peft_train")
    mags = [n for n in got["trainable"] if "lora_magnitude_vector" in n]
    assert len(mags) == len(L.HF_TARGETS) * G.LAYERS, f"PEFT trains {len(mags)} magnitudes: {mags[:3]}"
    assert got["losses"][-1] < got["losses"][0], f"PEFT's training did not lower the loss: {got['losses']}"
    low = {n: v for n, v in got["offsets"].items() if v < EFFECT_MIN}
    assert not low, f"magnitudes still at their init after training (max |m - ‖W+sBA‖| / max |m|): {low}"
    with open(os.path.join(hf_world["paths"]["peft_hf"], "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is True, "PEFT's adapter_config.json must say use_dora: true"


def test_base_models_agree(numbers):
    _check(numbers, "base ")


@pytest.mark.parametrize("t", IMPORT_TPS)
def test_import_from_peft(numbers, hf_world, t):
    """PEFT's trained DoRA adapter loaded with load_hf_adapter at TP = t: Megatron's logits == HF + PEFT's."""
    _check(numbers, f"import tp{t}")
    got = result(hf_world, f"import/tp{t}")
    assert len(got["loaded"]) == got["layers"] == len(got["dora"]), \
        f"import tp{t}: loaded {len(got['loaded'])} layers, {len(got['dora'])} as DoRA, of {got['layers']}"


# -- export ---------------------------------------------------------------------------------------
def test_export_loads_into_peft(numbers, hf_world):
    """export_hf_adapter at TP 2 -> PeftModel.from_pretrained: HF's logits equal the trained model's."""
    _check(numbers, "export tp2")
    path = os.path.join(hf_world["paths"]["export"], "hf")
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    keys = set(load_file(os.path.join(path, "adapter_model.safetensors")))
    theirs = set(load_file(os.path.join(hf_world["paths"]["peft_hf"], "adapter_model.safetensors")))
    assert cfg["use_dora"] is True and keys == theirs, \
        f"export: use_dora {cfg['use_dora']}; keys differ from PEFT's own DoRA file: {sorted(keys ^ theirs)[:6]}"


def _megatron_grads_from_peft(peft_model, exp: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """PEFT's gradients of the HF twin mapped onto Megatron's tensors: A summed over the blocks that share it,
    B and m by rows (Megatron's q/k/v grouping, gate/up halves), B scaled back from the file's folded scale."""
    from peft.utils.other import get_pattern_key

    layers = D.peft_dora_layers(peft_model)
    out: dict[str, torch.Tensor] = {}
    for name, scale in exp["scales"].items():
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        h = f"model.layers.{i}."
        blocks = {"self_attention.linear_qkv": [h + f"self_attn.{p}_proj" for p in "qkv"],
                  "self_attention.linear_proj": [h + "self_attn.o_proj"],
                  "mlp.linear_fc1": [h + "mlp.gate_proj", h + "mlp.up_proj"],
                  "mlp.linear_fc2": [h + "mlp.down_proj"]}[rest]
        a, bs, ms = 0, [], []
        for target in blocks:
            m = layers[target]
            r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), target), cfg["r"])
            alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), target), cfg["lora_alpha"])
            fold = scale / (alpha / r)  # the file's B is Megatron's rows times this
            a = a + m.lora_A["default"].weight.grad
            bs.append(m.lora_B["default"].weight.grad * fold)
            ms.append(m.lora_magnitude_vector["default"].weight.grad)
        if rest == "self_attention.linear_qkv":  # back to Megatron's grouped rows [g: q.. k v]
            bs = [_qkv_rows(*bs)]
            ms = [_qkv_rows(*ms)]
        out[f"{name}.A"], out[f"{name}.B"], out[f"{name}.m"] = a, torch.cat(bs), torch.cat(ms)
    return out


def _qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverse of ``llama.split_qkv``: HF's q, k, v rows into Megatron's grouped ``[g: q.. k v]``."""
    per, hd = G.HEADS // L.GROUPS, L.HEAD_DIM
    tail = q.shape[1:]
    return torch.cat([q.reshape(L.GROUPS, per, hd, *tail), k.reshape(L.GROUPS, 1, hd, *tail),
                      v.reshape(L.GROUPS, 1, hd, *tail)], dim=1).reshape(-1, *tail)


def test_export_gradients_are_peft_gradients(hf_world):
    """PEFT's own backward on the exported adapter gives Megatron's TP-2 gradients (dropout off, norm detached)."""
    exp = result(hf_world, "export")
    path = os.path.join(hf_world["paths"]["export"], "hf")
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    model = _peft_model(exp["base"], path, trainable=True)
    D.token_loss(D.hf_forward(model), G.batch()["labels"]).backward()
    want = _megatron_grads_from_peft(model, exp, cfg)
    assert sorted(want) == sorted(exp["grads"]), f"export: layers {sorted(set(want) ^ set(exp['grads']))[:4]}"
    for kind in ("A", "B", "m"):
        part = {k: v for k, v in exp["grads"].items() if k.endswith("." + kind)}
        err, key = max_rel_err(part, {k: want[k] for k in part})
        _measured(f"export tp2: gradient of {kind} vs PEFT's", err)
        assert err <= GRAD_TOL, f"export: Megatron's gradient of {key} differs from PEFT's by rel {err:.2e} > " \
                                f"{GRAD_TOL:.0e}"


# -- round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,t", ROUNDTRIPS, ids=[f"{f}-tp{t}" for f, t in ROUNDTRIPS])
def test_export_then_import_at_another_tp(numbers, hf_world, fmt, t):
    """The TP-2 adapter loaded at TP = t: the same logits; PEFT files and dist checkpoints give the same tensors,
    HF names the same s·B·A and magnitudes (the export folds scales into B)."""
    _check(numbers, f"roundtrip {fmt} tp2->tp{t}")
    exp, got = result(hf_world, "export"), result(hf_world, f"roundtrip/{fmt}/tp{t}")
    where = f"roundtrip {fmt} tp2->tp{t}"
    for key, w in exp["tensors"].items():
        assert not torch.equal(got["before"][key], w), f"{where} {key}: the fresh model must differ before loading"
    if fmt != "hf":
        for key, w in exp["tensors"].items():
            assert torch.equal(got["tensors"][key], w), \
                f"{where} {key}: loaded differs from saved by {(got['tensors'][key] - w).abs().max():.2e}"
        return
    for name, scale in exp["scales"].items():
        m_err = _measured("roundtrip hf: magnitude", rel_err(got["tensors"][f"{name}.m"], exp["tensors"][f"{name}.m"]))
        assert m_err == 0.0, f"{where} {name}: magnitude differs from the exported one by rel {m_err:.2e}"
        prod = {x: s * t_[f"{name}.B"].double() @ t_[f"{name}.A"].double()
                for x, s, t_ in (("got", got["scales"][name], got["tensors"]), ("exp", scale, exp["tensors"]))}
        err = _measured("roundtrip hf: s*B*A", rel_err(prod["got"], prod["exp"]))
        assert err <= PRODUCT_TOL, f"{where} {name}: s*B*A differs from the exported layer's by rel {err:.2e}"


# -- merge ------------------------------------------------------------------------------------------
def test_merge_adapters_matches_unmerged_and_peft_merge(hf_world):
    """merge_adapters at TP 2 (qkv/fc1 column, proj/fc2 row): the unmerged logits, PEFT's merged weights; unmerge."""
    got = result(hf_world, "import/tp2")
    assert sorted(got["merged_layers"]) == sorted(got["dora"]), f"merged {got['merged_layers']}"
    err = _measured("merge_adapters tp2: logits vs unmerged", rel_err(got["merged_logits"], got["logits"]))
    assert err <= LOGITS_TOL, f"merge_adapters: merged logits differ from unmerged by rel {err:.2e} > {LOGITS_TOL:.0e}"
    merged = _peft_model(got["base"], hf_world["paths"]["peft_hf"]).merge_and_unload().state_dict()
    ours = L.hf_state_dict(got["merged_base"], D.ARCH)
    targets = [k for k in ours if any(f".{t}.weight" in k for t in L.HF_TARGETS)]
    assert len(targets) == len(L.HF_TARGETS) * G.LAYERS, f"merged targets {targets}"
    for key in targets:
        err = _measured("merge_adapters tp2: weights vs PEFT's merge", rel_err(ours[key], merged[key]))
        assert err <= WEIGHT_TOL, f"merge_adapters: merged {key} differs from PEFT's merge_and_unload by rel " \
                                  f"{err:.2e} > {WEIGHT_TOL:.0e}"
    base = L.hf_state_dict(got["base"], D.ARCH)
    moved = min(rel_err(ours[k], base[k]) for k in targets)
    assert moved > 1e-3, f"merge_adapters changed a target weight by only rel {moved:.1e}"
    err, key = max_rel_err(got["unmerged_base"], got["base"])
    _measured("unmerge_adapters tp2: base weights", err)
    assert err <= WEIGHT_TOL, f"unmerge_adapters: base weight {key} back to rel {err:.2e} > {WEIGHT_TOL:.0e}"
    err = _measured("unmerge_adapters tp2: logits", rel_err(got["unmerged_logits"], got["logits"]))
    assert err <= LOGITS_TOL, f"unmerge_adapters: logits differ from before the merge by rel {err:.2e}"


# -- PEFT-format files and PEFT's own API on the toy MLP ------------------------------------------
@pytest.fixture(scope="module")
def toy(hf_world) -> dict:
    """The TP-2 toy results and dense fp64 stock PEFT on the same base with the file we saved."""
    got = result(hf_world, "toy/tp2")
    dense = D.dense_peft(got["base_full"], hf_world["paths"]["toy_ours"], dtype=torch.float64, trainable=True)
    from ..support.layers import K, inputs

    x = inputs((6, 2, K), seed=9).double().requires_grad_(True)
    y = dense(x)
    y.square().sum().backward()
    grads = {}
    for name, m in D.peft_dora_layers(dense).items():
        grads[f"{name}.A"] = m.lora_A["default"].weight.grad
        grads[f"{name}.B"] = m.lora_B["default"].weight.grad
        grads[f"{name}.m"] = m.lora_magnitude_vector["default"].weight.grad
    with torch.no_grad():
        merged = dense.merge_and_unload()
        weights = {n: (getattr(merged, n).weight.detach(), getattr(merged, n).bias.detach()) for n in ("fc1", "fc2")}
    return dict(got=got, y=y.detach(), dx=x.grad, grads=grads, merged=weights)


def test_peft_registration_builds_dora_modules(toy):
    got = toy["got"]
    assert got["types"] == ["PeftColumnParallelLoRA", "PeftRowParallelLoRA"], f"PEFT built {got['types']}"
    want = sorted(f"base_model.model.{n}.{w}.default.weight" for n in ("fc1", "fc2")
                  for w in ("lora_A", "lora_B", "lora_magnitude_vector"))
    assert got["trainable"] == want, f"PEFT's trainable parameters {got['trainable']}, expected {want}"


def test_save_adapter_loads_into_dense_peft(toy):
    """save_adapter at TP 2 -> stock PEFT on the dense twin: the same output, dx and gradients (A, B, m)."""
    got = toy["got"]
    for what, ours, theirs in (("output", got["y"], toy["y"]), ("dx", got["dx"], toy["dx"])):
        err = _measured(f"toy tp2: {what} vs dense PEFT", rel_err(ours, theirs))
        assert err <= TOY_TOL, f"toy tp2 {what}: ours vs dense PEFT (fp64) rel {err:.2e} > {TOY_TOL:.0e}"
    assert sorted(got["grads"]) == sorted(toy["grads"]), f"toy: gradients of {sorted(got['grads'])}"
    err, key = max_rel_err(got["grads"], toy["grads"])
    _measured("toy tp2: gradients (A, B, m) vs dense PEFT", err)
    assert err <= TOY_TOL, f"toy tp2: gradient of {key} vs dense PEFT (fp64) rel {err:.2e} > {TOY_TOL:.0e}"


def test_peft_merge_and_unload_on_tp_model(toy):
    """PEFT's merge_adapter/unmerge_adapter/merge_and_unload at TP 2: the same output; PEFT's dense merge's weights."""
    got = toy["got"]
    merged_flag, y = got["merge_adapter"]
    err = _measured("toy tp2: merge_adapter output", rel_err(y, got["y"]))
    assert merged_flag and err <= TOY_TOL, f"merge_adapter: merged={merged_flag}, output differs from the unmerged " \
                                           f"by rel {err:.2e} > {TOY_TOL:.0e}"
    merged_flag, y, base = got["unmerge_adapter"]
    err = _measured("toy tp2: unmerge_adapter output", rel_err(y, got["y"]))
    assert not merged_flag and err <= TOY_TOL, f"unmerge_adapter: merged={merged_flag}, output differs from before " \
                                               f"the merge by rel {err:.2e} > {TOY_TOL:.0e}"
    for n in ("fc1", "fc2"):
        err = rel_err(base[n][0], got["base_full"][n][0])
        assert err <= WEIGHT_TOL, f"unmerge_adapter: {n}.weight back to rel {err:.2e}"
    assert got["unloaded_types"] == ["ColumnParallelLinear", "RowParallelLinear"], f"{got['unloaded_types']}"
    y, weights = got["unloaded"]
    err = _measured("toy tp2: merge_and_unload output", rel_err(y, got["y"]))
    assert err <= TOY_TOL, f"merge_and_unload: Megatron's forward of the merged layers differs by rel {err:.2e}"
    for n in ("fc1", "fc2"):
        for i, part in enumerate(("weight", "bias")):
            err = _measured("toy tp2: merge_and_unload weights vs PEFT's", rel_err(weights[n][i], toy["merged"][n][i]))
            assert err <= WEIGHT_TOL, f"merge_and_unload: {n}.{part} vs PEFT's dense merge rel {err:.2e}"


@pytest.mark.parametrize("t", TOY_TPS)
def test_peft_files_load_at_any_tp(hf_world, toy, t):
    """load_adapter at TP = t: stock PEFT's dense DoRA file gives dense PEFT's output; ours gives TP 2's."""
    got = result(hf_world, f"toy/tp{t}")
    assert got["dora_ours"] == got["dora_dense"] == [True, True], f"toy tp{t}: loaded as DoRA {got['dora_dense']}"
    want = D.dense_peft(got["base_full"], hf_world["paths"]["toy_dense"]).eval()
    from ..support.layers import K, inputs

    with torch.no_grad():
        y = want(inputs((6, 2, K), seed=9))
        undone = want
        _without_magnitude(undone)
        effect = rel_err(undone(inputs((6, 2, K), seed=9)), y)
    err = _measured("toy: stock PEFT file loaded at tp 1/2/4", rel_err(got["y_dense"], y))
    assert err <= TOY_TOL, f"toy tp{t}: stock PEFT's DoRA file loaded here vs dense PEFT rel {err:.2e} > {TOY_TOL:.0e}"
    assert effect >= EFFECT_MIN, f"toy: the dense file's magnitudes move the output by only rel {effect:.2e}"
    err = _measured("toy: our tp2 file loaded at tp 1/2/4", rel_err(got["y_ours"], toy["got"]["y"]))
    assert err <= TOY_TOL, f"toy tp{t}: our TP-2 file loaded here vs the TP-2 output rel {err:.2e} > {TOY_TOL:.0e}"


def test_report(numbers, capsys):
    """Every logits comparison HF vs Megatron, then the largest error of each other check run before (printed)."""
    lines = [f"{'comparison':28s} {'max|diff|/max|logit|':>22s} {'magnitude effect':>17s}"]
    for row, n in numbers.items():
        if "error" in n:
            lines.append(f"{row:28s} {n['error'][:200]}")
            continue
        effect = f"{n['effect']:.2e}" if "effect" in n else "-"
        lines.append(f"{row:28s} {n['rel']:22.2e} {effect:>17s}")
    lines += [f"{what:52s} {err:.2e}" for what, err in MEASURED.items()]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
