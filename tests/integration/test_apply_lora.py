"""``tplora_kernels.apply_lora`` on a real megatron-core GPTModel: its contract beyond the math.

All-or-nothing wrapping, a tied output layer, freezing, loading a base checkpoint into the adapted
model, and Megatron's ``MLP.backward_dw()``. Each world (TP=1, TP=2) is spawned once for the module;
the tasks live in ``tests/support/gpt.py``.
"""

from __future__ import annotations

import pytest

from ..support import gpt as G
from ..support.checks import max_rel_err
from .test_gpt_model import GRAD_TOL, LOSS_TOL, WORLD_TIMEOUT_S


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, list[dict]]:
    root = tmp_path_factory.mktemp("apply_lora_worlds")
    tasks = {1: [("tied/nosp", "tied_task", dict(sp=False))],
             2: [("tied/nosp", "tied_task", dict(sp=False)), ("tied/sp", "tied_task", dict(sp=True)),
                 ("all_or_nothing", "all_or_nothing_task", {}), ("freeze", "freeze_task", {}),
                 ("state_dict", "state_dict_task", {}), ("backward_dw", "backward_dw_task", {})]}
    return {t: G.run_world(t, tasks[t], str(root / f"tp{t}"), timeout=WORLD_TIMEOUT_S) for t in (1, 2)}


def result(worlds, t: int, label: str, rank: int = 0):
    errors = [str(r[label]) for r in worlds[t] if isinstance(r.get(label), G.TaskError)]
    if errors:
        pytest.fail(f"tp={t} {label} raised:\n" + "\n".join(errors), pytrace=False)
    return worlds[t][rank][label]


@pytest.mark.parametrize("what, module", [("rank_pattern", "linear_fc2"), ("alpha_pattern", "linear_proj")])
def test_a_failing_target_leaves_the_model_unchanged(worlds, what, module):
    """One bad per-module value (r=0 for linear_fc2, alpha=nan for linear_proj): an error naming it, no change."""
    for rank in range(2):
        res = result(worlds, 2, "all_or_nothing", rank)[what]
        where = f"tp=2 rank {rank} bad {what}"
        assert res["error"] is not None, f"{where}: apply_lora accepted it"
        before, after = res["before"], res["after"]
        changed = sorted(n for n in set(before["types"]) | set(after["types"])
                         if before["types"].get(n) != after["types"].get(n))
        assert not changed, f"{where}: modules changed although apply_lora failed: {changed[:6]}"
        assert after["keys"] == before["keys"], f"{where}: state_dict keys changed: " \
            f"{sorted(set(after['keys']) ^ set(before['keys']))[:6]}"
        flipped = sorted(n for n, flag in before["requires_grad"].items() if after["requires_grad"].get(n) != flag)
        assert not flipped, f"{where}: requires_grad changed on {flipped[:6]}"
        assert module in res["error"], f"{where}: the error should name the failing module {module!r}: {res['error']}"


@pytest.mark.parametrize("sp", [False, True])
def test_tied_output_layer_is_wrapped_or_skipped_with_a_warning(worlds, sp):
    """share_embeddings_and_output_weights: the output layer is adapted (and TP-invariant) or skipped with a warning."""
    key = "tied/sp" if sp else "tied/nosp"
    got, ref = result(worlds, 2, key), result(worlds, 1, "tied/nosp")
    where = f"tp=2 {key}"
    kind = got["output_layer"]
    if "output_layer" in got["names"]:
        assert kind != "ColumnParallelLinear", f"{where}: output_layer listed as wrapped but still {kind}"
    else:
        assert kind == "ColumnParallelLinear", f"{where}: output_layer not listed but replaced by {kind}"
        assert any("output_layer" in w for w in got["warnings"]), \
            f"{where}: the tied output layer was skipped without a warning naming it: {got['warnings']}"
    assert len(got["names"]) >= 4 * G.LAYERS, f"{where}: only {got['names']} adapted"
    assert got["disabled_loss"] == got["base_loss"], \
        f"{where}: adapters off, loss {got['disabled_loss']:.8f} vs the un-adapted model's {got['base_loss']:.8f}"
    assert got["names"] == ref["names"], f"{where}: adapted {got['names']} but TP=1 adapted {ref['names']}"
    assert got["losses"][-1] < got["losses"][0], f"{where}: did not train: {got['losses']}"
    drift = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    assert drift <= LOSS_TOL, f"{where}: losses {got['losses']} vs TP=1 {ref['losses']} (rel {drift:.1e})"
    err, k = max_rel_err(got["grads0"], ref["grads0"])
    assert err <= GRAD_TOL, f"{where}: gradient of {k} differs from TP=1's by rel {err:.2e} > {GRAD_TOL:.0e}"


def test_freezing_default_and_freeze_false(worlds):
    """Default: only LoRA factors train. freeze=False: every other parameter keeps its requires_grad."""
    res = result(worlds, 2, "freeze")
    bad = sorted(n for n, flag in res["default"].items() if flag != (".lora_" in n))
    assert not bad, f"default apply_lora: requires_grad wrong on {bad[:6]} (LoRA factors only should train)"
    inside = tuple(f"{name}." for name in res["wrapped"])  # the adapted layers' own base weights are frozen anyway
    kept = res["kept"]
    lost = sorted(n for n, flag in res["before"].items() if not n.startswith(inside) and kept.get(n) != flag)
    assert not lost, f"freeze=False changed requires_grad of parameters outside the adapted layers: {lost[:6]}"
    assert not kept["embedding.word_embeddings.weight"], "freeze=False must keep a frozen embedding frozen"
    untrained = sorted(n for n, flag in kept.items() if ".lora_" in n and not flag)
    assert not untrained, f"freeze=False: LoRA factors must train: {untrained[:6]}"


def test_base_state_dict_loads_into_the_adapted_model(worlds):
    """A plain state_dict of the un-adapted model fills every base weight; only the LoRA keys are missing."""
    for rank in range(2):
        res = result(worlds, 2, "state_dict", rank)
        where = f"tp=2 rank {rank} gated"
        assert res["unexpected"] == [], f"{where}: unexpected keys {res['unexpected'][:6]}"
        odd = sorted(set(res["missing"]) ^ set(res["lora_keys"]))
        assert res["missing"] == res["lora_keys"], f"{where}: missing keys must be the LoRA factors; off by {odd[:6]}"
        lone = sorted(set(res["base_tensor_keys"]) - set(res["compared"]))
        assert res["compared"] == res["base_tensor_keys"], f"{where}: base tensors with no counterpart: {lone[:6]}"
        wrong = {k: d for k, d in res["diffs"].items() if d != 0.0}
        assert not wrong, f"{where}: base weights not loaded (max abs diff): {dict(list(wrong.items())[:4])}"


def test_mlp_backward_dw_runs_and_changes_nothing(worlds):
    """Megatron's MLP.backward_dw() (it calls linear_fc1/linear_fc2.backward_dw()) on adapted layers is a no-op."""
    for rank in range(2):
        res = result(worlds, 2, "backward_dw", rank)
        assert res["error"] is None, f"tp=2 rank {rank}: MLP.backward_dw() raised {res['error']}"
        assert res["lora_grads"] == 2 * 4 * G.LAYERS, f"tp=2 rank {rank}: {res['lora_grads']} LoRA gradients before"
        assert res["changed"] == [], f"tp=2 rank {rank}: backward_dw() changed {res['changed'][:6]}"
