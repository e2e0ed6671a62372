"""Merging and several named adapters per module, at TP=2 on gloo.

Merging is TP-local (no collective), keeps the output and unmerges to the exact base weight;
safe_merge refuses a non-finite adapter. Named adapters can be added, switched, disabled and
deleted, the output always the active adapter's; replicated factors agree across TP ranks even
when the ranks' generators do not.

One rank run per topic (``merge_task``, ``named_adapters_task``) feeds the several tests below
through a module-scoped fixture; the rank functions measure, the tests assert per rank.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.distributed as dist

from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA, gather_full_factors, parallel_linear
from tplora_kernels.layout import layout_for

from ..support.layers import H, K, column, inputs, lora_pair, row, split_cols
from ..support.problems import features


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_collectives():
    """Make every torch.distributed collective raise, to prove a block is TP-local."""
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier",
             "reduce", "gather", "scatter", "send", "recv", "all_to_all_single")
    saved = {n: getattr(dist, n) for n in names}

    def refuse(*args, **kwargs):
        raise RuntimeError("a collective ran inside a block that must be TP-local")

    try:
        for n in names:
            setattr(dist, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def _lora_delta_full(m, adapter: str, x_full: torch.Tensor) -> torch.Tensor:
    """s · (x A_fullᵀ) B_fullᵀ in fp64 on the full input, from gathered factors."""
    a, b = gather_full_factors(m, adapter)
    return m.scaling[adapter] * (x_full.double() @ a.double().t()) @ b.double().t()


def merge_task(ctx) -> dict:
    """merge/unmerge/get_delta_weight: TP-local, merged == unmerged forward, unmerge restores."""
    out = {}
    col, rw = lora_pair(ctx.group, ctx.tp)
    x_col = inputs((5, 2, K))
    x_row = split_cols(inputs((5, 2, H), seed=6), ctx.group)
    for name, m, x in (("column", col, x_col), ("row", rw, x_row)):
        m.eval()
        m.add_adapter("other", 3, lora_alpha=6, init_lora_weights=False)
        w0 = m.base_layer.weight.detach().clone()
        with torch.no_grad():
            y0, _ = m(x)
        a, b = gather_full_factors(m, "default")
        full_delta = m.scaling["default"] * (b.double() @ a.double())
        want = layout_for(m.kind).weight.shard(full_delta, ctx.rank, ctx.tp)
        with no_collectives():
            delta = m.get_delta_weight("default")
            m.merge()
            merged_flag = m.merged
            w_merged = m.base_layer.weight.detach().clone()
        with torch.no_grad():
            y1, _ = m(x)
        backend_merged = m.last_backend
        with no_collectives(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.merge()  # already merged: skipped with a warning
            m.unmerge()
        w1 = m.base_layer.weight.detach().clone()
        with torch.no_grad():
            y2, _ = m(x)
        # Merging a named, non-active adapter.
        with no_collectives():
            m.merge(adapter_names=["other"])
            other_ok = torch.allclose(m.base_layer.weight, w0 + m.get_delta_weight("other"), atol=1e-6)
            m.unmerge()
        # safe_merge refuses a broken adapter and leaves the weight alone.
        with torch.no_grad():
            m.lora_B["other"].weight[0, 0] = float("nan")
        try:
            m.merge(safe_merge=True, adapter_names=["other"])
            safe = None
        except ValueError as e:
            safe = str(e)
        out[name] = dict(
            delta_shape=tuple(delta.shape), weight_shape=tuple(w0.shape),
            delta_err=float((delta.double() - want).abs().max()),
            merged_weight_err=float((w_merged.double() - (w0.double() + want)).abs().max()),
            merged=merged_flag, backend_merged=backend_merged,
            merged_vs_unmerged=float((y1 - y0).abs().max()), y_scale=float(y0.abs().max()),
            lora_contribution=float((y0 - _base_out(m, x)).abs().max()),
            restore_err=float((w1 - w0).abs().max()), after_unmerge=float((y2 - y0).abs().max()),
            double_merge_warned=any("already merged" in str(w.message) for w in caught),
            other_ok=other_ok, safe_merge=safe, safe_weight_ok=bool(torch.isfinite(m.base_layer.weight).all()),
        )
    return out


def _base_out(m, x) -> torch.Tensor:
    kw = dict(kind=m.kind, bias=m.base_layer.bias, sequence_parallel=m.sequence_parallel, group=m.tp_group)
    if m.kind == "row":
        kw["input_is_parallel"] = True
    with torch.no_grad():
        return parallel_linear(x, m.base_layer.weight, **kw)


def _error_of(fn, *args) -> str | None:
    """The message of the ValueError ``fn(*args)`` raises, or None."""
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return None


def named_adapters_task(ctx) -> dict:
    """Several named adapters on one module: add, switch, disable, delete."""
    out = {}
    col, rw = lora_pair(ctx.group, ctx.tp, dropout=0.0)
    x_full = {"column": inputs((5, 2, K)), "row": inputs((5, 2, H), seed=6)}
    for name, m in (("column", col), ("row", rw)):
        xf = x_full[name]
        x = xf if name == "column" else split_cols(xf, ctx.group)
        base = _base_out(m, x)
        m.add_adapter("b", 2, lora_alpha=6, init_lora_weights=False)
        res: dict = {"adapters": sorted(m.lora_A), "active": m.active_adapter}
        res["b_frozen"] = not m.lora_A["b"].weight.requires_grad and not m.lora_B["b"].weight.requires_grad
        try:
            m.add_adapter("b", 2)
            res["dup"] = None
        except ValueError as e:
            res["dup"] = str(e)

        def err(active: str, y: torch.Tensor, m=m, xf=xf, base=base) -> float:
            delta = _lora_delta_full(m, active, xf)
            delta = features(layout_for(m.kind).y).shard(delta, ctx.rank, ctx.tp)
            return float((y.double() - (base.double() + delta)).abs().max())

        y, _ = m(x)
        res["default_err"] = err("default", y)
        m.set_adapter("b")
        y, _ = m(x)
        res["b_err"] = err("b", y)
        res["grads_follow_active"] = (m.lora_A["b"].weight.requires_grad, m.lora_A["default"].weight.requires_grad)
        # Several active adapters serve a mixed batch (``multi``): a plain forward must not pick one.
        m.set_adapter(["default", "b"])
        res["both_trainable"] = (m.lora_A["default"].weight.requires_grad, m.lora_A["b"].weight.requires_grad)
        res["plain_forward_with_both"] = _error_of(m, x)
        for key, bad in (("bad_dup", ["b", "b"]), ("bad_nope", "nope")):
            res[key] = _error_of(m.set_adapter, bad)
        m.set_adapter("b")
        m.enable_adapters(False)
        y, _ = m(x)
        res["disabled_err"] = float((y - base).abs().max())
        res["disabled_flag"] = m.disable_adapters
        res["disabled_frozen"] = not any(p.requires_grad for p in m.parameters())
        m.enable_adapters(True)
        y, _ = m(x)
        res["reenabled_err"] = err("b", y)
        res["reenabled_trainable"] = m.lora_A["b"].weight.requires_grad
        m.delete_adapter("b")
        res["after_delete"] = (sorted(m.lora_A), m.active_adapter, sorted(m.r))
        y, _ = m(x)
        res["after_delete_err"] = err("default", y)
        try:
            m.delete_adapter("b")
            res["delete_unknown"] = None
        except ValueError as e:
            res["delete_unknown"] = str(e)
        m.delete_adapter("default")
        y, _ = m(x)
        res["none_left"] = (m.active_adapter, float((y - base).abs().max()))
        out[name] = res
    return out


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
KINDS = ("column", "row")


@pytest.fixture(scope="module")
def merge_results(dist_pool):
    return dist_pool.run(merge_task, 2)


@pytest.fixture(scope="module")
def adapter_results(dist_pool):
    return dist_pool.run(named_adapters_task, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_get_delta_weight_is_this_ranks_shard_of_s_BA(merge_results, kind):
    """get_delta_weight is this rank's shard of s·B·A, shaped as its weight."""
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
    """unmerge restores the base weight and the output."""
    for rank, res in enumerate(merge_results):
        r = res[kind]
        assert r["restore_err"] < 1e-6, f"{kind} rank {rank}: unmerge left weight err {r['restore_err']:.2e}"
        assert r["after_unmerge"] < 1e-5, f"{kind} rank {rank}: output after unmerge err {r['after_unmerge']:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_non_finite(merge_results, kind):
    """safe_merge refuses a non-finite adapter and leaves the weight finite."""
    for rank, res in enumerate(merge_results):
        r = res[kind]
        assert r["safe_merge"] and "non-finite" in r["safe_merge"], f"{kind} rank {rank}: {r['safe_merge']!r}"
        assert r["safe_weight_ok"], f"{kind} rank {rank}: a refused safe_merge must leave the weight finite"


@pytest.mark.parametrize("kind", KINDS)
def test_add_and_set_adapter(adapter_results, kind):
    """add_adapter adds a frozen adapter, refuses a taken name; set_adapter switches the output and
    the trainable factors, several active adapters are refused for a plain forward.
    """
    for rank, res in enumerate(adapter_results):
        r = res[kind]
        assert r["adapters"] == ["b", "default"] and r["active"] == "default", f"{kind} rank {rank}: add_adapter"
        assert r["b_frozen"], f"{kind} rank {rank}: a new inactive adapter must be frozen"
        assert r["dup"] and "already exists" in r["dup"], f"{kind} rank {rank}: duplicate add_adapter: {r['dup']!r}"
        assert r["default_err"] < 1e-5, f"{kind} rank {rank}: 'default' output err {r['default_err']:.2e}"
        assert r["b_err"] < 1e-5, f"{kind} rank {rank}: after set_adapter('b') output err {r['b_err']:.2e}"
        assert r["grads_follow_active"] == (True, False), f"{kind} rank {rank}: requires_grad follows the active one"
        assert r["both_trainable"] == (True, True), f"{kind} rank {rank}: set_adapter([a, b]) trains both"
        msg = r["plain_forward_with_both"]
        assert msg and "all active" in msg, (
            f"{kind} rank {rank}: a plain forward with two active adapters must be refused by name: {msg!r}")
        assert r["bad_dup"] and "distinct" in r["bad_dup"], f"{kind} rank {rank}: a repeated name: {r['bad_dup']!r}"
        assert r["bad_nope"] and "unknown adapter" in r["bad_nope"], (
            f"{kind} rank {rank}: unknown adapter: {r['bad_nope']!r}")


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_state_runs_the_base_alone(adapter_results, kind):
    """Disabled adapters give the base output with every factor frozen; re-enabling restores the adapter."""
    for rank, res in enumerate(adapter_results):
        r = res[kind]
        assert r["disabled_flag"], f"{kind} rank {rank}: disable_adapters flag"
        assert r["disabled_err"] < 1e-6, f"{kind} rank {rank}: disabled output vs base: {r['disabled_err']:.2e}"
        assert r["disabled_frozen"], f"{kind} rank {rank}: disabled adapters must be frozen"
        assert r["reenabled_err"] < 1e-5 and r["reenabled_trainable"], f"{kind} rank {rank}: re-enable"


@pytest.mark.parametrize("kind", KINDS)
def test_delete_adapter(adapter_results, kind):
    """delete_adapter removes an adapter (the next becomes active), refuses an unknown name, and
    with none left the base runs alone.
    """
    for rank, res in enumerate(adapter_results):
        r = res[kind]
        adapters, active, ranks = r["after_delete"]
        assert adapters == ["default"] and ranks == ["default"], f"{kind} rank {rank}: state after delete"
        assert active == "default", f"{kind} rank {rank}: deleting the active adapter activates the next one"
        assert r["after_delete_err"] < 1e-5, f"{kind} rank {rank}: output after delete {r['after_delete_err']:.2e}"
        assert r["delete_unknown"] and "unknown adapter" in r["delete_unknown"], f"{kind} rank {rank}"
        active, err = r["none_left"]
        assert active is None and err < 1e-6, f"{kind} rank {rank}: no adapter left -> base output ({err:.2e})"


def unseeded_init_task(ctx) -> dict:
    """Each rank's CPU generator seeded apart: the replicated factors must still be one tensor."""
    bases = column(ctx.group, ctx.tp, K, H), row(ctx.group, ctx.tp, H, K)  # these seed the generator
    torch.manual_seed(1000 + ctx.rank)
    col = ColumnParallelLoRA(bases[0], r=4, init_lora_weights=False, backend="torch")
    rw = RowParallelLoRA(bases[1], r=4, init_lora_weights=False, backend="torch")
    out = {}
    for name, t in (("column lora_A", col.lora_A["default"].weight), ("row lora_B", rw.lora_B["default"].weight)):
        got = [torch.empty_like(t) for _ in range(ctx.tp)]
        dist.all_gather(got, t.detach().contiguous(), group=ctx.group)
        out[name] = max((g - got[0]).abs().max().item() for g in got)
    return out


def test_replicated_factors_agree_when_generators_do_not(dist_pool):
    """A replicated factor is one tensor on every TP rank even when the ranks' generators were seeded apart."""
    for rank, res in enumerate(dist_pool.run(unseeded_init_task, 2)):
        for name, diff in res.items():
            assert diff == 0.0, f"rank {rank}: {name} differs across TP ranks by {diff:.3e} (ranks seeded apart)"
