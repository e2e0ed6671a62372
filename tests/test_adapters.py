"""Merge (item 4) and several named adapters per module (item 5), at TP=2 on gloo."""

from __future__ import annotations

import pytest

from . import dispatch_cases as C

KINDS = ("column", "row")


@pytest.fixture(scope="module")
def merge_results(dist_pool):
    return dist_pool.run(C.merge_task, 2)


@pytest.fixture(scope="module")
def adapter_results(dist_pool):
    return dist_pool.run(C.named_adapters_task, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_get_delta_weight_is_this_ranks_shard_of_s_BA(merge_results, kind):
    for rank, res in enumerate(merge_results):
        r = res[kind]
        assert r["delta_shape"] == r["weight_shape"], f"{kind} rank {rank}: delta {r['delta_shape']} vs weight"
        assert r["delta_err"] < 1e-6, f"{kind} rank {rank}: delta vs slice of full s·B·A: err {r['delta_err']:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_tp_local_and_keeps_the_output(merge_results, kind):
    """merge() ran under a guard that fails any collective; merged forward == unmerged forward."""
    for rank, res in enumerate(merge_results):
        r = res[kind]
        assert r["merged"], f"{kind} rank {rank}: merged flag"
        assert r["merged_weight_err"] < 1e-6, f"{kind} rank {rank}: merged weight err {r['merged_weight_err']:.2e}"
        assert r["lora_contribution"] > 1e-2, f"{kind} rank {rank}: the adapter must change the output to test merge"
        tol = 1e-5 * max(1.0, r["y_scale"])
        assert r["merged_vs_unmerged"] < tol, f"{kind} rank {rank}: merged vs unmerged {r['merged_vs_unmerged']:.2e}"
        assert r["backend_merged"] == "base", f"{kind} rank {rank}: merged forward must run the base path only"
        assert r["double_merge_warned"], f"{kind} rank {rank}: merging twice must warn and skip"
        assert r["other_ok"], f"{kind} rank {rank}: merge(adapter_names=['other']) adds that adapter's delta"


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_restores_base_weight_and_output(merge_results, kind):
    for rank, res in enumerate(merge_results):
        r = res[kind]
        assert r["restore_err"] < 1e-6, f"{kind} rank {rank}: unmerge left weight err {r['restore_err']:.2e}"
        assert r["after_unmerge"] < 1e-5, f"{kind} rank {rank}: output after unmerge err {r['after_unmerge']:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_non_finite(merge_results, kind):
    for rank, res in enumerate(merge_results):
        r = res[kind]
        assert r["safe_merge"] and "non-finite" in r["safe_merge"], f"{kind} rank {rank}: {r['safe_merge']!r}"
        assert r["safe_weight_ok"], f"{kind} rank {rank}: a refused safe_merge must leave the weight finite"


@pytest.mark.parametrize("kind", KINDS)
def test_add_and_set_adapter(adapter_results, kind):
    for rank, res in enumerate(adapter_results):
        r = res[kind]
        assert r["adapters"] == ["b", "default"] and r["active"] == "default", f"{kind} rank {rank}: add_adapter"
        assert r["b_frozen"], f"{kind} rank {rank}: a new inactive adapter must be frozen"
        assert r["dup"] and "already exists" in r["dup"], f"{kind} rank {rank}: duplicate add_adapter: {r['dup']!r}"
        assert r["default_err"] < 1e-5, f"{kind} rank {rank}: 'default' output err {r['default_err']:.2e}"
        assert r["b_err"] < 1e-5, f"{kind} rank {rank}: after set_adapter('b') output err {r['b_err']:.2e}"
        assert r["grads_follow_active"] == (True, False), f"{kind} rank {rank}: requires_grad follows the active one"
        assert "exactly one" in r["bad_['default', 'b']"], f"{kind} rank {rank}: two active adapters must be refused"
        assert "unknown adapter" in r["bad_nope"], f"{kind} rank {rank}: unknown adapter: {r['bad_nope']!r}"


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_state_runs_the_base_alone(adapter_results, kind):
    for rank, res in enumerate(adapter_results):
        r = res[kind]
        assert r["disabled_flag"], f"{kind} rank {rank}: disable_adapters flag"
        assert r["disabled_err"] < 1e-6, f"{kind} rank {rank}: disabled output vs base: {r['disabled_err']:.2e}"
        assert r["disabled_frozen"], f"{kind} rank {rank}: disabled adapters must be frozen"
        assert r["reenabled_err"] < 1e-5 and r["reenabled_trainable"], f"{kind} rank {rank}: re-enable"


@pytest.mark.parametrize("kind", KINDS)
def test_delete_adapter(adapter_results, kind):
    for rank, res in enumerate(adapter_results):
        r = res[kind]
        adapters, active, ranks = r["after_delete"]
        assert adapters == ["default"] and ranks == ["default"], f"{kind} rank {rank}: state after delete"
        assert active == "default", f"{kind} rank {rank}: deleting the active adapter activates the next one"
        assert r["after_delete_err"] < 1e-5, f"{kind} rank {rank}: output after delete {r['after_delete_err']:.2e}"
        assert r["delete_unknown"] and "unknown adapter" in r["delete_unknown"], f"{kind} rank {rank}"
        active, err = r["none_left"]
        assert active is None and err < 1e-6, f"{kind} rank {rank}: no adapter left -> base output ({err:.2e})"
