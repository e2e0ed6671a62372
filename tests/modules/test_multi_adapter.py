"""Several adapters trained at once in one batch (tplora_kernels.multi), against each adapter alone.

The oracle runs every adapter separately through the single-adapter path, on the whole batch with
the same seed (so the same global rows get the same mask) and with the output gradient kept only
on that adapter's samples; a sample assigned no adapter gets the base layer alone. The mixed call
must give the same output rows, the same dx and the same gradient of every adapter's factors.
Rank functions assert on their rank; the properties run at TP 1, 2 and 4 with SP on and off.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tplora_kernels import (
    ColumnParallelLoRA,
    RowParallelLoRA,
    column_parallel_lora,
    lora_modules,
    parallel_linear,
    row_parallel_lora,
    set_batch_adapters,
)
from tplora_kernels.layout import layout_for
from tplora_kernels.mask import dropout_threshold
from tplora_kernels.multi import build_mix

from ..support.checks import rel_err
from ..support.harness import RemoteError
from ..support.layers import column, row

FNS = {"column": column_parallel_lora, "row": row_parallel_lora}
TOL = 1e-5  # fp32: the mixed and the separate runs differ only in summation order


def _problem(kind: str, rank: int, t: int, *, ranks, S: int, b: int, K: int, N: int, seed: int):
    """Full fp32 tensors from one seed (alike on every rank), and this rank's shards via the layout."""
    g = torch.Generator().manual_seed(seed)
    full = {"x": torch.randn(S, b, K, generator=g), "W": torch.randn(N, K, generator=g) / K ** 0.5,
            "dy": torch.randn(S, b, N, generator=g)}
    full["A"] = [torch.randn(r, K, generator=g) / K ** 0.5 for r in ranks]
    full["B"] = [torch.randn(N, r, generator=g) / r ** 0.5 for r in ranks]
    lay = layout_for(kind)
    shard = {"W": lay.weight.shard(full["W"], rank, t),
             "A": [lay.lora_a.shard(a, rank, t) for a in full["A"]],
             "B": [lay.lora_b.shard(b_, rank, t) for b_ in full["B"]]}
    return full, shard


def _local_x(kind: str, x: torch.Tensor, dy: torch.Tensor, rank: int, t: int, sp: bool):
    """This rank's input and output gradient: column SP splits x's rows, row SP dy's; row splits x's K."""
    if kind == "column":
        x_i = x.chunk(t, dim=0)[rank] if sp else x
        dy_i = dy[..., rank * (dy.shape[-1] // t):(rank + 1) * (dy.shape[-1] // t)]
        return x_i, dy_i
    k = x.shape[-1] // t
    return x[..., rank * k:(rank + 1) * k], (dy.chunk(t, dim=0)[rank] if sp else dy)


def _grad_run(fn, x, w, a, b, dy, **kw):
    """One forward + backward; returns (y, dx, dA, dB) with A and B as leaves."""
    x = x.clone().requires_grad_(True)
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = fn(x, w, a, b, **kw)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


def mixed_vs_separate(ctx, kind: str, sp: bool, ranks: list[int], assign: list[int], alphas: list[float],
                      ps: list[float], seed: int, backend: str) -> dict:
    """On one rank: the mixed call against every adapter alone; asserts here, returns the errors."""
    t, rank = ctx.tp, ctx.rank
    S, b, K, N = 4 * t, len(assign), 8 * t, 6 * t
    full, shard = _problem(kind, rank, t, ranks=ranks, S=S, b=b, K=K, N=N, seed=seed)
    x_i, dy_i = _local_x(kind, full["x"], full["dy"], rank, t, sp)
    common = dict(sequence_parallel=sp, group=ctx.group, backend=backend)
    scales = [al / r for al, r in zip(alphas, ranks)]
    drop_seed = 1000 + seed
    mix = build_mix(assign, ranks=ranks, scales=scales, thrs=[dropout_threshold(p) for p in ps], device="cpu")
    a_all, b_all = torch.cat(shard["A"], dim=0), torch.cat(shard["B"], dim=1)
    y, dx, da_all, db_all = _grad_run(FNS[kind], x_i, shard["W"], a_all, b_all, dy_i, seed=drop_seed, mix=mix,
                                      **common)
    # The separate runs: each adapter on the whole batch, its samples' output rows and gradient only
    # (y is [S or S/t, b, N or N/t]: sample j is y[:, j]).
    want_y = parallel_linear(x_i, shard["W"], kind=kind, **{k: v for k, v in common.items() if k != "backend"})
    want_dx = torch.zeros_like(x_i)
    errs = {}
    for a_idx in range(len(ranks)):
        samples = [j for j, s in enumerate(assign) if s == a_idx]
        keep = torch.zeros(1, b, 1)
        keep[:, samples] = 1.0
        ya, dxa, daa, dba = _grad_run(FNS[kind], x_i, shard["W"], shard["A"][a_idx], shard["B"][a_idx],
                                      dy_i * keep, scale=scales[a_idx], dropout_p=ps[a_idx], seed=drop_seed,
                                      **common)
        want_y[:, samples] = ya[:, samples]
        want_dx += dxa
        lo, hi = mix.offsets[a_idx], mix.offsets[a_idx + 1]
        errs[f"dA[{a_idx}]"] = rel_err(da_all[lo:hi], daa)
        errs[f"dB[{a_idx}]"] = rel_err(db_all[:, lo:hi], dba)
    # Samples with no adapter contribute dy W to dx, through the base layer alone.
    none = [j for j, s in enumerate(assign) if s < 0]
    if none:
        keep = torch.zeros(1, b, 1)
        keep[:, none] = 1.0
        xb = x_i.clone().requires_grad_(True)
        parallel_linear(xb, shard["W"], kind=kind, **{k: v for k, v in common.items() if k != "backend"}).backward(
            dy_i * keep)
        want_dx += xb.grad
    errs["y"] = rel_err(y, want_y)
    errs["dx"] = rel_err(dx, want_dx)
    for name, e in errs.items():
        assert e <= TOL, f"{name} rank {rank} tp={t} sp={sp} {kind}: mixed vs separate rel err {e:.2e} > {TOL:.0e}"
    return errs


ADAPTERS = st.integers(1, 3).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 5), min_size=n, max_size=n),                        # ranks
    st.lists(st.integers(-1, n - 1), min_size=2, max_size=5),                   # sample -> adapter
    st.lists(st.sampled_from([1.0, 4.0, 16.0]), min_size=n, max_size=n),        # alphas
    st.lists(st.sampled_from([0.0, 0.1, 0.5]), min_size=n, max_size=n)))        # dropouts


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize(("tp", "sp"), [(1, False), (2, False), (2, True), (4, True)],
                         ids=["tp1", "tp2", "tp2-sp", "tp4-sp"])
@settings(max_examples=4)
@given(adapters=ADAPTERS, seed=st.integers(0, 2**20))
@example(adapters=([4, 2, 3], [2, 0, 2, -1], [16.0, 1.0, 4.0], [0.1, 0.0, 0.5]), seed=3)  # adapter 1 has no sample
def test_mixed_batch_equals_each_adapter_alone(dist_pool, kernel_backend, kind, tp, sp, adapters, seed):
    """A mixed batch gives each sample its adapter's output, dx and factor gradients, as that
    adapter alone would, at TP 1/2/4 with SP on and off.
    """
    ranks, assign, alphas, ps = adapters
    backend = "interpret" if kernel_backend == "interpret" and tp == 2 else "torch"
    dist_pool.run(mixed_vs_separate, tp, kind=kind, sp=sp, ranks=list(ranks), assign=list(assign),
                  alphas=list(alphas), ps=list(ps), seed=seed, backend=backend)


def test_mix_validation_names_what_is_wrong():
    """A mix that does not fit the call (the factors' rank, one adapter per sample, an explicit scale)
    or its own lists is refused with what is wrong."""
    x, w = torch.randn(4, 3, 16), torch.randn(8, 16)
    a, b = torch.randn(5, 16), torch.randn(8, 5)
    mix = build_mix([0, 1, 1], ranks=[2, 3], scales=[1.0, 1.0], thrs=[0, 0], device="cpu")
    with pytest.raises(ValueError, match="rank 4 but the mix's adapters sum to 5"):
        column_parallel_lora(x, w, a[:4], b[:, :4], mix=mix, backend="torch")
    with pytest.raises(ValueError, match="one adapter per sample"):
        column_parallel_lora(torch.randn(4, 2, 16), w, a, b, mix=mix, backend="torch")
    with pytest.raises(ValueError, match="come from the mix"):
        column_parallel_lora(x, w, a, b, mix=mix, scale=2.0, backend="torch")
    with pytest.raises(ValueError, match="one entry per adapter"):
        build_mix([0], ranks=[2, 3], scales=[1.0], thrs=[0, 0], device="cpu")


# ---------------------------------------------------------------------------------------------
# Modules: set_batch_adapters on megatron layers, PEFT's adapter_names=, validation on every rank
# ---------------------------------------------------------------------------------------------
NAMES = ("math", "code", "chat")


def _model(group, tp: int, sp: bool):
    """fc1 (column) -> gelu -> fc2 (row) with three adapters of different r, alpha and dropout."""
    torch.manual_seed(5)
    fc1 = column(group, tp, 16, 24, sp=sp, seed=None, init=torch.nn.init.normal_)
    fc2 = row(group, tp, 24, 16, sp=sp, seed=None, init=torch.nn.init.normal_)
    model = torch.nn.Module()
    model.fc1 = ColumnParallelLoRA(fc1, r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                                   adapter_name=NAMES[0], backend="torch")
    model.fc2 = RowParallelLoRA(fc2, r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                                adapter_name=NAMES[0], backend="torch")
    for m in (model.fc1, model.fc2):
        m.add_adapter(NAMES[1], 2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False)
        m.add_adapter(NAMES[2], 3, lora_alpha=3, lora_dropout=0.3, init_lora_weights=False)
        m.seed = 4242  # the same masks in the mixed and the separate runs
    return model


def _forward(model, x):
    h, _ = model.fc1(x)
    y, _ = model.fc2(torch.nn.functional.gelu(h))
    return y


def modules_mixed_vs_separate(ctx, sp: bool, assign: list[str]):
    t, rank = ctx.tp, ctx.rank
    S, b = 4 * t, len(assign)
    g = torch.Generator().manual_seed(9)
    x_full, dy_full = torch.randn(S, b, 16, generator=g), torch.randn(S, b, 16, generator=g)
    x = x_full.chunk(t, dim=0)[rank] if sp else x_full
    dy = dy_full.chunk(t, dim=0)[rank] if sp else dy_full
    mixed = _model(ctx.group, t, sp)
    for _, m in lora_modules(mixed):
        m.set_adapter(list(NAMES))
    set_batch_adapters(mixed, assign)
    y = _forward(mixed, x)
    y.backward(dy)
    errs = {}
    want_y = torch.zeros_like(y)
    for name in (*NAMES, "__base__"):
        rows = [j for j, a in enumerate(assign) if a == name]
        alone = _model(ctx.group, t, sp)
        for _, m in lora_modules(alone):
            if name == "__base__":
                m.enable_adapters(False)
            else:
                m.set_adapter(name)
        keep = torch.zeros(1, b, 1)
        keep[:, rows] = 1.0
        ya = _forward(alone, x)
        want_y[:, rows] = ya.detach()[:, rows]
        if name == "__base__":
            continue
        (ya * keep).backward(dy)
        for lname in ("fc1", "fc2"):
            for which in ("lora_A", "lora_B"):
                got = getattr(getattr(mixed, lname), which)[name].weight.grad
                want = getattr(getattr(alone, lname), which)[name].weight.grad
                if rows:
                    errs[f"{lname}.{which}[{name}]"] = rel_err(got, want)
                else:  # not in the batch: not stacked, so no gradient at all (or an exact zero)
                    errs[f"{lname}.{which}[{name}]"] = 0.0 if got is None else got.abs().max().item()
    errs["y"] = rel_err(y, want_y)
    for k, e in errs.items():
        assert e <= TOL, f"{k} rank {rank} tp={t} sp={sp}: mixed batch vs the adapter alone: {e:.2e} > {TOL:.0e}"
    return errs


@pytest.mark.parametrize(("tp", "sp"), [(1, False), (2, True), (4, True)], ids=["tp1", "tp2-sp", "tp4-sp"])
def test_modules_train_every_adapter_of_a_mixed_batch(dist_pool, tp, sp):
    """set_batch_adapters on the modules trains every adapter of a mixed batch as if each ran alone on its samples."""
    assign = ["math", "chat", "__base__", "math", "chat"]  # "code" has no sample: its gradient is zero
    for rank, errs in enumerate(dist_pool.run(modules_mixed_vs_separate, tp, sp=sp, assign=assign)):
        assert errs["fc1.lora_A[code]"] == 0.0, f"rank {rank}: an adapter without samples got a gradient"


def bad_names(ctx, case: str):
    model = _model(ctx.group, ctx.tp, False)
    x = torch.randn(4, 3, 16)
    if case == "unknown":
        set_batch_adapters(model, ["math", "typo", "code"])
    elif case == "length":
        model.fc1.set_adapter(list(NAMES))
        set_batch_adapters(model, ["math", "code"])
        _forward(model, x)
    elif case == "several_active":
        model.fc1.set_adapter(["math", "code"])
        _forward(model, x)
    return "no error"


@pytest.mark.parametrize(("case", "words"), [("unknown", "typo"), ("length", "one adapter per sample"),
                                               ("several_active", "name one per sample")])
def test_bad_adapter_names_raise_on_every_rank(dist_pool, case, words):
    """Unknown or malformed per-sample adapter names raise on every rank alike."""
    results = dist_pool.run(bad_names, 2, raise_errors=False, case=case)
    for rank, r in enumerate(results):
        assert isinstance(r, RemoteError) and r.type_name in ("ValueError", "TypeError"), \
            f"{case}: rank {rank} did not raise: {r}"
        assert words in r.message, f"{case}: rank {rank}: {r.message}"


def peft_adapter_names(ctx):
    """PEFT's own mixed-batch API, ``model(x, adapter_names=[...])`` (PEFT allows it in eval mode)."""
    from peft import LoraConfig, get_peft_model

    import tplora_kernels.peft as tpeft

    model = _model(ctx.group, ctx.tp, False)
    inner = torch.nn.Module()
    inner.fc1, inner.fc2 = model.fc1.base_layer, model.fc2.base_layer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = inner.fc1, inner.fc2

        def forward(self, x):
            h, _ = self.fc1(x)
            y, _ = self.fc2(torch.nn.functional.gelu(h))
            return y

    cfg = lambda r, a: tpeft.register(LoraConfig(r=r, lora_alpha=a, init_lora_weights=False,  # noqa: E731
                                                 target_modules=["fc1", "fc2"]), backend="torch")
    torch.manual_seed(1)
    pm = get_peft_model(Net(), cfg(4, 8), adapter_name="math")
    pm.add_adapter("code", cfg(2, 4))
    pm.eval()
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2))
    names = ["code", "__base__", "math"]
    with torch.no_grad():
        mixed = pm(x, adapter_names=names)
        want = torch.empty_like(mixed)
        for j, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    want[:, j] = pm(x)[:, j]
            else:
                pm.set_adapter(name)
                want[:, j] = pm(x)[:, j]
    err = rel_err(mixed, want)
    assert err <= TOL, f"rank {ctx.rank}: PEFT adapter_names= vs one adapter at a time: rel err {err:.2e}"
    return err


def test_peft_adapter_names_drive_the_mixed_batch(dist_pool):
    """PEFT's adapter_names=[...] runs the mixed batch through our modules, each sample on its adapter."""
    dist_pool.run(peft_adapter_names, 2)
