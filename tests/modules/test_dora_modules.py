"""DoRA through the modules (``use_dora=True``): the math, the initial magnitude, the norm cache, merging,
refusals and checkpoints, on real megatron-core layers at TP 1, 2 and 4.

* Forward and backward of ``ColumnParallelLoRA`` / ``RowParallelLoRA`` with a DoRA adapter equal
  ``reference.dora_dense`` in fp64 on the gathered full layer (y, dx, dA, dB, dm), SP off and on,
  with dropout (the module's fixed seed), fp32 bar.
* A new DoRA adapter's magnitude is PEFT's ``‖W + s·B A‖`` (B = 0 and B ≠ 0).
* The cached norm (``dora.NormCache``) is never stale: after each event that changes a weight, the
  module's output equals a fresh computation (the functional call with uncached
  ``dora.norm_parts`` on the current tensors) and the fp64 formula within the fp32 bar, while
  the output the norm from before the event would give differs by more than 1000 times that bar
  (so a stale cache shows).
* Merge/unmerge: merged output equals unmerged, the merged weight is PEFT's
  ``m/‖W + s·B A‖ ⊙ (W + s·B A)`` of the full layer (a row layer's norms summed over TP), and
  unmerge restores W.
* Refusals (every rank alike, before any collective, naming the option): DoRA on an MoE expert
  layer, on a tied output layer, in a mixed batch.
* ``state_dict`` holds ``lora_magnitude_vector.<name>.weight``; ``sharded_state_dict`` shards it as
  B's rows (column: with the weight's stride, a gated fc1's stride 2 included; row: a TP replica).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import nn

from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA
from tplora_kernels.distributed import sum_sequence_parallel_grads
from tplora_kernels.dora import norm_parts
from tplora_kernels.functional import parallel_lora
from tplora_kernels.reference import dora_dense

from ..parallel.test_dora_equivalence import GRADS, dora_shard
from ..support import layers
from ..support.checks import FP32_BAR, assert_within, rel_err
from ..support.harness import cpu_kernel_backend
from .test_failure_modes import _assert_symmetric_error

S, BT, K, N, R = 8, 2, 16, 24, 4
ALPHA = 6.0
SCALE = ALPHA / R
NO_HANG_S = 60.0


# ---------------------------------------------------------------------------------------------
# On the ranks
# ---------------------------------------------------------------------------------------------
def build(ctx, kind: str, *, sp: bool = False, opt: bool | None = None, dora: bool = True, init=False, p: float = 0.0,
          backend: str = "torch", seed: int | None = 1234, base_seed: int = 11):
    """A DoRA (or LoRA) module around a megatron layer K -> N (column) or N -> K (row) on ``ctx.group``.

    ``opt``: the other input/output form, gather_output (column) or a full input (row; not under SP).
    """
    if kind == "column":
        base = layers.column(ctx.group, ctx.tp, K, N, sp=sp, seed=base_seed,
                             gather_output=bool(opt) and not sp)
        wrap = ColumnParallelLoRA
    else:
        base = layers.row(ctx.group, ctx.tp, N, K, sp=sp, seed=base_seed, input_is_parallel=not (opt and not sp))
        wrap = RowParallelLoRA
    with torch.no_grad():
        base.bias.normal_()
    torch.manual_seed(5)
    return wrap(base, r=R, lora_alpha=ALPHA, lora_dropout=p, init_lora_weights=init, use_dora=dora,
                backend=backend, seed=seed)


def full(ctx, layer, name: str = "default") -> dict[str, torch.Tensor]:
    """The layer's full W, bias, A, B and magnitude (gathered over TP by the layer's layout, stride included), fp64."""
    lay, base = layer.spec.layout, layer.base_layer

    def rows(v):  # a vector split as the output rows (B's rows): the bias, the magnitude
        return lay.lora_b.gather(v.detach().reshape(-1, 1), ctx.group).reshape(-1)

    a, b = (f.detach() for f in layer.factors(name))
    A, B = lay.gather_factors(a, b, ctx.group)
    got = dict(W=lay.weight.gather(base.weight.detach(), ctx.group), bias=rows(base.bias), A=A, B=B,
               m=rows(layer.lora_magnitude_vector[name].weight))
    return {k: v.double() for k, v in got.items()}


def spread_magnitude(layer, name: str = "default") -> None:
    """Move the magnitude away from its initial value (g in [0.75, 1.25], the same on every rank)."""
    m = layer.lora_magnitude_vector[name].weight
    g = torch.Generator().manual_seed(99)
    scale = 0.75 + 0.5 * torch.rand(layer.spec.out_features, generator=g)
    mine = layer.spec.layout.lora_b.shard(scale.reshape(-1, 1), layer.spec.mode.rank, layer.spec.mode.world)
    with torch.no_grad():
        m.mul_(mine.reshape(-1))


def module_equivalence_task(ctx, *, kind: str, sp: bool, opt: bool, p: float, backend: str) -> None:
    """Forward + backward of a DoRA module vs ``dora_dense`` in fp64 on the gathered layer, on this rank."""
    layer = build(ctx, kind, sp=sp, opt=opt, p=p, backend=backend)
    spread_magnitude(layer)
    f = full(ctx, layer)
    sp_on = sp and ctx.tp > 1
    k_in, n_out = (K, N) if kind == "column" else (N, K)
    g = torch.Generator().manual_seed(7)
    prob = dict(x=torch.randn(S, BT, k_in, generator=g, dtype=torch.float64), W=f["W"], A=f["A"], B=f["B"],
                bias=f["bias"], m=f["m"], dy=torch.randn(S, BT, n_out, generator=g, dtype=torch.float64))
    gathered = layer.spec.mode.gather_output if kind == "column" else not layer.spec.mode.input_is_parallel
    loc = dora_shard(kind, prob, ctx.rank, ctx.tp, sp_on, gathered if kind == "column" else not gathered)
    x = loc["x"].float().clone().requires_grad_()
    layer.train()
    y, _ = layer(x)
    y.backward(loc["dy"].float())
    sum_sequence_parallel_grads(layer.parameters(), ctx.group)
    xe, ae, be, me = (prob[n].clone().requires_grad_() for n in ("x", "A", "B", "m"))
    ye = dora_dense(xe, prob["W"], ae, be, me, bias=prob["bias"], scale=SCALE, dropout_p=p, seed=1234)
    ye.backward(prob["dy"])
    exact = dict(y=ye.detach(), dx=xe.grad, dA=ae.grad, dB=be.grad, dm=me.grad)
    a, b = layer.factors("default")
    got = dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad, dm=layer.lora_magnitude_vector["default"].weight.grad)
    at = f"rank {ctx.rank} {kind} tp={ctx.tp} sp={sp} {'gathered' if gathered else 'parallel'} p={p}"
    for n in GRADS:
        assert_within(f"{n} {at} vs dora_dense fp64 on the gathered layer", rel_err(got[n], loc[n](exact[n])))


def init_magnitude_task(ctx, *, kind: str, init) -> None:
    """A new DoRA adapter's magnitude is ‖W + s·B A‖ of the full layer (PEFT's initialisation)."""
    layer = build(ctx, kind, init=init)
    f = full(ctx, layer)
    want = torch.linalg.norm(f["W"] + SCALE * f["B"] @ f["A"], dim=1)
    at = f"rank {ctx.rank} {kind} tp={ctx.tp} init_lora_weights={init}"
    b_zero = bool((f["B"] == 0).all())
    assert b_zero == (init is True), f"{at}: B is {'zero' if b_zero else 'non-zero'}"
    assert_within(f"{at}: magnitude vs ||W + s.B A||", rel_err(f["m"], want))
    # The adapter adds a second one the same way.
    torch.manual_seed(8)
    layer.add_adapter("two", 2, lora_alpha=3.0, init_lora_weights=init, use_dora=True)
    f2 = full(ctx, layer, "two")
    want2 = torch.linalg.norm(f2["W"] + 1.5 * f2["B"] @ f2["A"], dim=1)
    assert_within(f"{at}: add_adapter's magnitude vs ||W + s.B A||", rel_err(f2["m"], want2))


class Probe:
    """After each event: the module's output vs a fresh computation, the fp64 formula, and the stale norm."""

    def __init__(self, ctx, layer, kind: str) -> None:
        self.ctx, self.layer, self.kind = ctx, layer, kind
        k_in, n_out = (K, N) if kind == "column" else (N, K)
        g = torch.Generator().manual_seed(21)
        prob = {**full(ctx, layer), "x": torch.randn(S, BT, k_in, generator=g, dtype=torch.float64),
                "dy": torch.zeros(S, BT, n_out, dtype=torch.float64)}
        mode = layer.spec.mode
        loc = dora_shard(kind, prob, ctx.rank, ctx.tp, mode.sequence_parallel, kind == "row")
        self.x_full, self.x, self.piece = prob["x"], loc["x"].float(), loc["y"]
        self.seen: list[str] = []
        self.stale = None  # the norm parts of the last check (what a stale cache would hold)

    def _fresh(self, name: str):
        layer = self.layer
        a, b = (f.detach() for f in layer.factors(name))
        w = layer.base_layer.weight.detach()
        scale = layer.adapter_options(name).scaling
        norm = norm_parts(w, a, b, scale, layer.spec.mode)

        def run(nm):
            with torch.no_grad():
                return parallel_lora(self.x, w, a, b, layer.spec.mode, bias=layer.base_layer.bias, scale=scale,
                                     magnitude=layer.lora_magnitude_vector[name].weight.detach(), norm=nm,
                                     backend=layer.backend).output

        return run, norm

    def check(self, event: str, *, changed: bool = True) -> None:
        """The module's eval output equals a fresh computation and the fp64 formula (fp32 bar); if the event
        changed a weight, the norm from before it gives an output 1000 bars away (the check can see staleness)."""
        layer, at = self.layer, f"rank {self.ctx.rank} {self.kind} tp={self.ctx.tp} after {event}"
        name = layer.active_adapter
        layer.eval()
        with torch.no_grad():
            y, _ = layer(self.x)
        run, norm = self._fresh(name)
        fresh = run(norm)
        assert_within(f"{at}: the module's output vs a fresh computation (a stale norm cache?)", rel_err(y, fresh))
        f = full(self.ctx, layer, name)
        exact = dora_dense(self.x_full, f["W"], f["A"], f["B"], f["m"], bias=f["bias"],
                           scale=layer.adapter_options(name).scaling)
        assert_within(f"{at}: output vs dora_dense fp64", rel_err(y, self.piece(exact)))
        if changed and self.stale is not None:
            gap = rel_err(run(self.stale), fresh)
            assert gap > 1e3 * FP32_BAR, (f"{at}: the norm from before the event gives nearly the same output "
                                          f"(rel {gap:.1e}): this event would not show a stale cache")
        self.stale = norm
        self.seen.append(event)


def _step(layer, x, opt) -> None:
    """One training step; SP's per-rank partial gradients summed first, as Megatron's finalize does."""
    layer.train()
    y, _ = layer(x)
    y.square().mean().backward()
    sum_sequence_parallel_grads(layer.parameters(), layer.spec.mode.group)
    opt.step()
    opt.zero_grad()


def staleness_task(ctx, *, kind: str, sp: bool) -> list[str]:
    """Every event that changes a weight of a DoRA layer, each followed by ``Probe.check``.

    Returns:
        The events checked, in order.
    """
    layer = build(ctx, kind, sp=sp)
    spread_magnitude(layer)
    probe = Probe(ctx, layer, kind)
    probe.check("creation", changed=False)
    a_, b_ = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m_ = layer.lora_magnitude_vector["default"].weight
    params = [a_, b_, m_]
    _step(layer, probe.x, torch.optim.SGD(params, lr=0.5))
    probe.check("a torch.optim.SGD step")
    _step(layer, probe.x, torch.optim.Adam(params, lr=0.05))
    probe.check("a torch.optim.Adam step")
    with torch.no_grad():
        a_.mul_(1.3)
        b_.add_(0.2)
    probe.check("an in-place update under torch.no_grad")
    # Megatron's distributed optimizer writes the stepped values through .data (no version counter sees it).
    main = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(main, lr=0.1)
    for q in main:
        q.grad = torch.ones_like(q)
    b_.data.copy_(b_.detach() * 1.5)
    opt.step()
    probe.check("param.data.copy_ then an optimizer step")
    opt.step()
    a_.data.copy_(main[0].detach().mul(1.2))
    probe.check("an optimizer step then param.data.copy_ (Megatron's order)")
    full_a = torch.randn(R, K if kind == "column" else N, generator=torch.Generator().manual_seed(31))
    full_b = torch.randn(N if kind == "column" else K, R, generator=torch.Generator().manual_seed(32)) * 0.3
    full_m = torch.rand(layer.spec.out_features, generator=torch.Generator().manual_seed(33)) + 1.0
    layer.register_adapter("default", full_a, full_b, lora_alpha=ALPHA, magnitude=full_m)
    probe.check("register_adapter (new factors and magnitude)")
    sd = layer.state_dict()
    sd["lora_A.default.weight"] = sd["lora_A.default.weight"] * 0.5
    sd["lora_B.default.weight"] = sd["lora_B.default.weight"] * 3.0 + 0.1
    layer.load_state_dict(sd)
    probe.check("load_state_dict of the adapter")
    layer.merge()
    layer.unmerge()
    probe.check("merge then unmerge", changed=False)
    torch.manual_seed(40)
    layer.add_adapter("other", R, lora_alpha=ALPHA, init_lora_weights=False, use_dora=True)
    layer.set_adapter("other")
    probe.stale = None
    probe.check("set_adapter to a second DoRA adapter", changed=False)
    layer.set_adapter("default")
    probe.check("set_adapter back to the first", changed=False)
    sd = layer.state_dict()
    sd["base_layer.weight"] = sd["base_layer.weight"] * 1.7 + 0.1
    layer.load_state_dict(sd)
    probe.check("a checkpoint load of the base weight (load_state_dict)")
    with torch.no_grad():
        layer.base_layer.weight.copy_(layer.base_layer.weight.flip(0))
    probe.check("copy_ into the base weight")
    return probe.seen


def base_data_write_task(ctx, *, kind: str) -> str | None:
    """The base weight rewritten through ``.data`` (no version counter sees it), then an optimizer step.

    Returns:
        None, or the failed check's message (returned, not raised: a raising rank restarts the pool).
    """
    layer = build(ctx, kind)
    spread_magnitude(layer)
    probe = Probe(ctx, layer, kind)
    probe.check("creation", changed=False)
    layer.base_layer.weight.data.copy_(layer.base_layer.weight.detach() * 1.7 + 0.1)
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()
    try:
        probe.check("base_layer.weight.data.copy_ then an optimizer step")
    except AssertionError as e:
        return str(e)
    return None


def merge_task(ctx, *, kind: str) -> None:
    """Merged output equals unmerged; the merged weight is PEFT's DoRA merge of the full layer; unmerge restores W."""
    layer = build(ctx, kind)
    spread_magnitude(layer)
    at = f"rank {ctx.rank} {kind} tp={ctx.tp}"
    x_full = layers.inputs((S, BT, K if kind == "column" else N), seed=22)
    x = x_full if kind == "column" else layers.split_cols(x_full, ctx.group)
    layer.eval()
    with torch.no_grad():
        y0, _ = layer(x)
    f = full(ctx, layer)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and layer.last_backend != "base", f"{at}: merge() did not merge"
    with torch.no_grad():
        y1, _ = layer(x)
    assert layer.last_backend == "base", f"{at}: a merged layer ran {layer.last_backend}, not the base layer"
    assert_within(f"{at}: merged output vs unmerged", rel_err(y1, y0))
    dense = f["W"] + SCALE * f["B"] @ f["A"]
    want = (f["m"] / torch.linalg.norm(dense, dim=1))[:, None] * dense
    merged_full = layer.spec.layout.weight.gather(layer.base_layer.weight.detach(), ctx.group)
    assert_within(f"{at}: merged full weight vs m/||W + s.B A|| (W + s.B A)", rel_err(merged_full, want))
    layer.unmerge()
    assert_within(f"{at}: unmerge restores W", rel_err(layer.base_layer.weight, w0))
    with torch.no_grad():
        y2, _ = layer(x)
    assert_within(f"{at}: output after unmerge vs before merge", rel_err(y2, y0))


def refusal_task(ctx, *, case: str) -> str:
    """One DoRA misuse; every rank must raise before any collective."""
    if case == "expert":
        torch.manual_seed(1)
        base = ColumnParallelLinear(K, N, config=layers.mp_config(ctx.tp), init_method=nn.init.xavier_normal_,
                                    bias=False, gather_output=False, is_expert=True, tp_group=ctx.group)
        ColumnParallelLoRA(base, r=R, use_dora=True)
    elif case == "tied":
        torch.manual_seed(1)
        base = ColumnParallelLinear(K, N, config=layers.mp_config(ctx.tp), init_method=nn.init.xavier_normal_,
                                    bias=False, gather_output=False, skip_weight_param_allocation=True,
                                    tp_group=ctx.group)
        ColumnParallelLoRA(base, r=R, use_dora=True)
    elif case == "mixed":
        layer = build(ctx, "column", dora=False)
        torch.manual_seed(2)
        layer.add_adapter("dora", R, lora_alpha=ALPHA, init_lora_weights=False, use_dora=True)
        layer(torch.randn(S, 2, K), adapter_names=["default", "dora"])
    else:
        raise AssertionError(f"unknown case {case}")
    return "no error"


def state_dict_task(ctx) -> dict:
    """The magnitude's state-dict key and its ShardedTensor metadata beside B's, for a plain and a gated fc1."""
    col, rw = build(ctx, "column"), build(ctx, "row")
    torch.manual_seed(1)
    gated_base = ColumnParallelLinear(K, 2 * N, config=layers.mp_config(ctx.tp), init_method=nn.init.xavier_normal_,
                                      bias=True, gather_output=False, stride=2, tp_group=ctx.group)
    torch.manual_seed(5)
    gated = ColumnParallelLoRA(gated_base, r=R, lora_alpha=ALPHA, init_lora_weights=False, use_dora=True,
                               backend="torch")
    out = {}
    for name, layer in (("column", col), ("row", rw), ("gated", gated)):
        keys = sorted(layer.state_dict())
        assert "lora_magnitude_vector.default.weight" in keys, f"rank {ctx.rank} {name}: state_dict keys {keys}"
        sd = layer.sharded_state_dict(prefix="m.", metadata={"dp_cp_group": None})
        pieces = {}
        for which in ("lora_B", "lora_magnitude_vector"):
            v = sd[f"m.{which}.default.weight"]
            if hasattr(v, "build_fn"):  # a strided split: the factory's pieces
                sts = v.build_fn(v.key, v.data, v.replica_id, None)
            else:
                sts = [v]
            pieces[which] = [dict(key=s.key, shape=s.global_shape[0], offset=s.global_offset[0],
                                  frag=s.axis_fragmentations[0], local=s.local_shape[0], replica=tuple(s.replica_id))
                             for s in sts]
        out[name] = pieces
        stride = layer.spec.layout.weight.stride
        m_attrs = {a: getattr(layer.lora_magnitude_vector["default"].weight, a, None)
                   for a in ("tensor_model_parallel", "partition_dim", "partition_stride")}
        out[name]["attrs"] = m_attrs
        out[name]["stride"] = stride
    # the gated magnitude is [m_gate_i; m_up_i], as the weight's rows [W_gate_i; W_up_i]
    f = full(ctx, gated)
    want = torch.linalg.norm(f["W"] + SCALE * f["B"] @ f["A"], dim=1)
    assert_within(f"rank {ctx.rank} gated fc1: gathered magnitude vs ||W + s.B A|| of the full layer",
                  rel_err(f["m"], want))
    return out


# ---------------------------------------------------------------------------------------------
# In the test process
# ---------------------------------------------------------------------------------------------
EQUIV = [(1, False, False, 0.1), (2, False, True, 0.0), (2, True, False, 0.1), (4, False, False, 0.0),
         (4, True, False, 0.1)]


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize(("tp", "sp", "opt", "p"), EQUIV,
                         ids=[f"tp{t}-sp_{'on' if s else 'off'}-{'gathered' if o else 'parallel'}-p{p:g}"
                              for t, s, o, p in EQUIV])
def test_dora_module_equals_fp64_formula(dist_pool, kernel_backend, kind, tp, sp, opt, p):
    """A DoRA module's y, dx, dA, dB and dm equal PEFT's formula in fp64 on the gathered layer (dm summed over
    TP under SP for a row layer; a column layer's dm is its shard). ``opt``: gather_output / a full row input."""
    dist_pool.run(module_equivalence_task, tp, kind=kind, sp=sp, opt=opt, p=p,
                  backend=cpu_kernel_backend(kernel_backend))


@pytest.mark.parametrize("init", [True, False], ids=["B_zero", "B_nonzero"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_initial_magnitude_is_the_weight_norm(dist_pool, kind, init):
    """PEFT's init: m = ‖W + s·B A‖ over the full rows (a row layer sums its K-slices' norms), at TP 2."""
    dist_pool.run(init_magnitude_task, 2, kind=kind, init=init)


@pytest.mark.parametrize(("kind", "tp", "sp"), [("column", 2, True), ("row", 2, False), ("row", 1, False)])
def test_cached_norm_is_never_stale(dist_pool, kind, tp, sp):
    """After optimizer steps (SGD, Adam), in-place updates, .data writes with an optimizer step, register_adapter,
    load_state_dict, merge/unmerge, set_adapter and base-weight loads, the output equals a fresh computation."""
    events = dist_pool.run(staleness_task, tp, kind=kind, sp=sp)[0]
    assert len(events) == 13, f"{kind} tp={tp}: checked {len(events)} events: {events}"


@pytest.mark.parametrize("kind", ["column", "row"])
def test_base_weight_data_write_is_seen(dist_pool, kind):
    """The base weight rewritten through .data, then an optimizer step: the next output must use the new norm."""
    failures = [f for f in dist_pool.run(base_data_write_task, 2, kind=kind) if f]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_merge_unmerge_exact(dist_pool, kind):
    """At TP 2 (every rank merges; a row layer sums norms over TP): merged output equals unmerged, the merged
    weight is PEFT's DoRA merge of the full layer, and unmerge restores W."""
    dist_pool.run(merge_task, 2, kind=kind)


REFUSALS = [("expert", "ValueError", ["use_dora=True", "MoE expert layer", "ColumnParallelLinear"]),
            ("tied", "ValueError", ["use_dora=True", "tied output layer", "weight is passed at call time"]),
            ("mixed", "ValueError", ["DoRA adapters ['dora']", "mixed batch"])]


@pytest.mark.parametrize(("case", "exc", "words"), REFUSALS, ids=[c for c, _, _ in REFUSALS])
def test_dora_refusals_on_every_rank(dist_pool, case, exc, words):
    """DoRA where it cannot run raises the same error on every rank, naming the option, before any collective."""
    res = dist_pool.run(refusal_task, 2, timeout=NO_HANG_S, raise_errors=False, case=case)
    _assert_symmetric_error(res, exc, words, f"DoRA {case} tp=2")


def test_magnitude_in_state_dicts(dist_pool):
    """``lora_magnitude_vector.default.weight`` is in the state dict, and ``sharded_state_dict`` shards it as B's
    rows: a column layer's by TP with the weight's stride (a gated fc1: 2 pieces per rank), a row layer's a
    TP replica."""
    tp = 2
    results = dist_pool.run(state_dict_task, tp)
    for rank, res in enumerate(results):
        for name, got in res.items():
            at = f"rank {rank} {name}"
            b, m = got["lora_B"], got["lora_magnitude_vector"]
            assert [(p["shape"], p["offset"], p["frag"], p["local"], p["replica"]) for p in m] == \
                   [(p["shape"], p["offset"], p["frag"], p["local"], p["replica"]) for p in b], \
                f"{at}: the magnitude's pieces {m} are not B's rows {b}"
            assert all(p["key"] == "m.lora_magnitude_vector.default.weight" for p in m), f"{at}: keys {m}"
            n_full = 2 * N if name == "gated" else N if name == "column" else K
            assert all(p["shape"] == n_full for p in m), f"{at}: global shape {m}, expected {n_full}"
            if name == "row":
                assert got["attrs"]["tensor_model_parallel"] is False and all(p["replica"][1] == rank for p in m), \
                    f"{at}: a row layer's magnitude must be a TP replica: {m} {got['attrs']}"
                continue
            stride = 2 if name == "gated" else 1
            want_attrs = {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": stride}
            assert got["attrs"] == want_attrs and got["stride"] == stride, \
                f"{at}: magnitude attributes {got['attrs']}, expected {want_attrs}"
            chunk = n_full // (tp * stride)
            want_offsets = [(j * tp + rank) * chunk for j in range(stride)]
            assert [p["offset"] for p in m] == want_offsets and all(p["local"] == chunk for p in m), \
                f"{at}: magnitude pieces at {[(p['offset'], p['local']) for p in m]}, expected offsets " \
                f"{want_offsets} of {chunk} rows"
