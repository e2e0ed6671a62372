"""Rank-side tasks for the dispatch / PEFT / Megatron-convention / adapter tests.

Each task is a module-level ``fn(ctx, **kwargs)`` that the gloo pool runs on ranks
``0..ctx.tp-1`` (see harness.py); it returns plain tensors/dicts that the test checks. Inputs
are drawn from fixed seeds, so every rank builds the same full tensors and slices them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

import torch
import torch.distributed as dist
from torch import nn

from tplora_kernels import distributed as D

K, H = 16, 24  # model width and hidden size (both divisible by 4)


# -- building blocks ---------------------------------------------------------------------------
def mp_config(tp: int, sp: bool = False, dtype: torch.dtype = torch.float32):
    import megatron.core as mc

    return mc.ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                                  params_dtype=dtype)


def column(group, tp: int, k: int, n: int, *, sp: bool = False, cls=None, seed: int = 11, bias: bool = True,
           dtype: torch.dtype = torch.float32, gather_output: bool = False):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    torch.manual_seed(seed)
    return (cls or ColumnParallelLinear)(k, n, config=mp_config(tp, sp, dtype), init_method=nn.init.xavier_normal_,
                                         bias=bias, gather_output=gather_output, tp_group=group)


def row(group, tp: int, k: int, n: int, *, sp: bool = False, cls=None, seed: int = 12, bias: bool = True,
        dtype: torch.dtype = torch.float32):
    from megatron.core.tensor_parallel import RowParallelLinear

    torch.manual_seed(seed)
    return (cls or RowParallelLinear)(k, n, config=mp_config(tp, sp, dtype), init_method=nn.init.xavier_normal_,
                                      bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=group)


def _subclasses():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class SubColumn(ColumnParallelLinear):
        pass

    class SubRow(RowParallelLinear):
        pass

    return SubColumn, SubRow


class ToyMLP(nn.Module):
    """fc1: ColumnParallelLinear K->H, gelu, fc2: RowParallelLinear H->K (input_is_parallel)."""

    def __init__(self, group, tp: int, sp: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = column(group, tp, K, H, sp=sp, dtype=dtype)
        self.fc2 = row(group, tp, H, K, sp=sp, dtype=dtype)

    def forward(self, x):
        h, _ = self.fc1(x)
        y, _ = self.fc2(torch.nn.functional.gelu(h))
        return y


class DenseMLP(nn.Module):
    """The single-device twin of ``ToyMLP``: same module names, plain nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(K, H)
        self.fc2 = nn.Linear(H, K)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def full_base(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather a Megatron layer's full weight (and bias)."""
    base = getattr(layer, "base_layer", layer)
    w, b = base.weight.detach(), None if base.bias is None else base.bias.detach()
    if type(base).__name__.endswith("ColumnParallelLinear") or hasattr(base, "gather_output"):
        w = D.all_gather_rows(w, base.tp_group)
        b = None if b is None else D.all_gather_rows(b, base.tp_group)
    else:
        w = D.all_gather_cols(w, base.tp_group)
    return w.clone(), None if b is None else b.clone()


def load_full_base(layer, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Copy this rank's slice of a full base weight (and bias) into a Megatron layer."""
    base = getattr(layer, "base_layer", layer)
    t, i = D.group_size(base.tp_group), D.group_rank(base.tp_group)
    with torch.no_grad():
        if hasattr(base, "gather_output"):
            n = w.shape[0] // t
            base.weight.copy_(w[i * n:(i + 1) * n])
            if b is not None:
                base.bias.copy_(b[i * n:(i + 1) * n])
        else:
            k = w.shape[1] // t
            base.weight.copy_(w[:, i * k:(i + 1) * k])
            if b is not None:
                base.bias.copy_(b)


def dense_from(model: nn.Module) -> DenseMLP:
    """A DenseMLP carrying the full base weights of a (possibly adapted) ToyMLP."""
    dense = DenseMLP()
    for name in ("fc1", "fc2"):
        w, b = full_base(getattr(model, name))
        getattr(dense, name).weight.data.copy_(w)
        getattr(dense, name).bias.data.copy_(b)
    return dense


def inputs(shape, seed: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def local_cols(x: torch.Tensor, group) -> torch.Tensor:
    t, i = D.group_size(group), D.group_rank(group)
    w = x.shape[-1] // t
    return x[..., i * w:(i + 1) * w].contiguous()


def local_rows(x: torch.Tensor, group) -> torch.Tensor:
    t, i = D.group_size(group), D.group_rank(group)
    s = x.shape[0] // t
    return x[i * s:(i + 1) * s].contiguous()


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


def peft_config(**kw):
    from peft import LoraConfig

    import tplora_kernels.peft as tpeft

    backend = kw.pop("backend", None)
    return tpeft.register(LoraConfig(**kw), backend=backend)


# -- dispatch ----------------------------------------------------------------------------------
def dispatch_kinds(ctx) -> dict:
    """What dispatch_megatron returns for each kind of target, with either config type."""
    from peft import LoraConfig

    from tplora_kernels import LoRAConfig, dispatch_megatron

    sub_col, sub_row = _subclasses()
    out = {}
    for cfg_name, cfg in (("ours", LoRAConfig(r=2, lora_alpha=4)), ("peft", LoraConfig(r=2, lora_alpha=4))):
        targets = {
            "column": column(ctx.group, ctx.tp, K, H),
            "row": row(ctx.group, ctx.tp, H, K),
            "sub_column": column(ctx.group, ctx.tp, K, H, cls=sub_col),
            "sub_row": row(ctx.group, ctx.tp, H, K, cls=sub_row),
            "linear": nn.Linear(K, H),
            "sequential": nn.Sequential(nn.Linear(K, H)),
        }
        for name, target in targets.items():
            # PEFT's call style (config=) for the PEFT config, positional for ours.
            new = (dispatch_megatron(target, "default", config=cfg) if cfg_name == "peft"
                   else dispatch_megatron(target, "default", cfg))
            out[(cfg_name, name)] = None if new is None else (type(new).__name__, new.base_layer is target)
        # A target that is already a LoRA layer: its base layer is unwrapped.
        base = column(ctx.group, ctx.tp, K, H)
        wrapped = dispatch_megatron(base, "first", cfg)
        again = dispatch_megatron(wrapped, "second", cfg)
        out[(cfg_name, "wrapped")] = (type(again).__name__, again.base_layer is base, sorted(again.lora_A))
    return out


def dispatch_options(ctx, which: str) -> dict:
    """r, alpha, dropout, rsLoRA, init and the patterns as the built modules see them."""
    from peft import LoraConfig

    from tplora_kernels import LoRAConfig, dispatch_megatron
    from tplora_kernels.modules import init_full_factors

    make = LoraConfig if which == "peft" else LoRAConfig
    out = {}
    cfg = make(r=4, lora_alpha=12, lora_dropout=0.25, use_rslora=False, init_lora_weights=True,
               rank_pattern={"fc1": 2, r"layers\.1\..*": 6}, alpha_pattern={"fc2": 3})
    for name in ("layers.0.fc1", "layers.0.fc10", "layers.1.fc2", "fc2", None):
        target = column(ctx.group, ctx.tp, K, H)
        m = dispatch_megatron(target, "default", cfg, target_name=name)
        out[("pattern", name)] = (m.r["default"], m.lora_alpha["default"], m.scaling["default"],
                                  m.lora_dropout["default"])
    # Resolved values that PEFT passes explicitly win over the patterns.
    m = dispatch_megatron(column(ctx.group, ctx.tp, K, H), "default", cfg, target_name="layers.0.fc1", r=5,
                          lora_alpha=10)
    out["explicit"] = (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
    m = dispatch_megatron(column(ctx.group, ctx.tp, K, H), "default", make(r=4, lora_alpha=8, use_rslora=True))
    out["rslora"] = m.scaling["default"]
    # init: the module's factors are the TP slices of init_full_factors under the same seed.
    for init in (True, False, "gaussian"):
        for kind in ("column", "row"):
            target = column(ctx.group, ctx.tp, K, H) if kind == "column" else row(ctx.group, ctx.tp, H, K)
            torch.manual_seed(77)
            m = dispatch_megatron(target, "default", make(r=4, lora_alpha=8, init_lora_weights=init))
            torch.manual_seed(77)
            a, b = init_full_factors(4, m.in_features, m.out_features, init)
            a_i, b_i = m.spec.layout.shard_factors(a, b, m.tp_rank, m.tp_size)
            out[("init", init, kind)] = (torch.equal(m.lora_A["default"].weight, a_i),
                                         torch.equal(m.lora_B["default"].weight, b_i),
                                         float(b.abs().sum()), float(a.std()))
    return out


def dispatch_errors(ctx) -> dict:
    """The messages dispatch_megatron raises for options it cannot honour."""
    from peft import LoraConfig

    from tplora_kernels import dispatch_megatron

    cases = {
        "use_dora": dict(use_dora=True),
        "lora_bias": dict(lora_bias=True),
        "init_lora_weights": dict(init_lora_weights="pissa"),
        "bias": dict(bias="all"),
        "fan_in_fan_out": dict(fan_in_fan_out=True),
    }
    out = {}
    target = column(ctx.group, ctx.tp, K, H)
    for name, kw in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=2, **kw)
        try:
            dispatch_megatron(target, "default", cfg)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    try:
        dispatch_megatron(target, "default", None)
        out["none"] = None
    except TypeError as e:
        out["none"] = str(e)
    out["untouched"] = all(p.requires_grad for p in target.parameters())
    return out


def apply_lora_task(ctx) -> dict:
    """apply_lora on a bare Megatron model: targets, a second adapter, and errors."""
    from tplora_kernels import LoRAConfig, apply_lora

    model = ToyMLP(ctx.group, ctx.tp)
    model.head = nn.Linear(K, 2)
    names = apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "head"], backend="torch"))
    again = apply_lora(model, LoRAConfig(r=2, lora_alpha=2, target_modules=["fc1"]), adapter_name="b")
    out = {"names": names, "again": again, "types": [type(model.fc1).__name__, type(model.fc2).__name__,
                                                     type(model.head).__name__],
           "fc1_adapters": sorted(model.fc1.lora_A), "fc1_active": model.fc1.active_adapter}
    try:
        apply_lora(model, LoRAConfig(target_modules=["nothing"]))
        out["no_match"] = None
    except ValueError as e:
        out["no_match"] = str(e)
    try:
        apply_lora(model, LoRAConfig(target_modules=["fc1"]), adapter_name="b")
        out["duplicate"] = None
    except ValueError as e:
        out["duplicate"] = str(e)
    return out


# -- adapters and merge ------------------------------------------------------------------------
def _lora_delta_full(m, adapter: str, x_full: torch.Tensor) -> torch.Tensor:
    """s · (x A_fullᵀ) B_fullᵀ in fp64 on the full input, from gathered factors."""
    from tplora_kernels import gather_full_factors

    a, b = gather_full_factors(m, adapter)
    return m.scaling[adapter] * (x_full.double() @ a.double().t()) @ b.double().t()


def _layer_pair(ctx, dropout: float = 0.1):
    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA

    col = ColumnParallelLoRA(column(ctx.group, ctx.tp, K, H), r=4, lora_alpha=8, lora_dropout=dropout,
                             init_lora_weights=False, backend="torch")
    rw = RowParallelLoRA(row(ctx.group, ctx.tp, H, K), r=4, lora_alpha=8, lora_dropout=dropout,
                         init_lora_weights=False, backend="torch")
    return col, rw


def merge_task(ctx) -> dict:
    """merge/unmerge/get_delta_weight: TP-local, merged == unmerged forward, unmerge restores."""
    from tplora_kernels import gather_full_factors

    out = {}
    col, rw = _layer_pair(ctx)
    x_col = inputs((5, 2, K))
    x_row = local_cols(inputs((5, 2, H), seed=6), ctx.group)
    for name, m, x in (("column", col, x_col), ("row", rw, x_row)):
        m.eval()
        m.add_adapter("other", 3, lora_alpha=6, init_lora_weights=False)
        w0 = m.base_layer.weight.detach().clone()
        with torch.no_grad():
            y0, _ = m(x)
        a, b = gather_full_factors(m, "default")
        full_delta = m.scaling["default"] * (b.double() @ a.double())
        if m.kind == "column":
            n = full_delta.shape[0] // ctx.tp
            want = full_delta[ctx.rank * n:(ctx.rank + 1) * n]
        else:
            k = full_delta.shape[1] // ctx.tp
            want = full_delta[:, ctx.rank * k:(ctx.rank + 1) * k]
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
    from tplora_kernels import parallel_linear

    kw = dict(kind=m.kind, bias=m.base_layer.bias, sequence_parallel=m.sequence_parallel, group=m.tp_group)
    if m.kind == "row":
        kw["input_is_parallel"] = True
    with torch.no_grad():
        return parallel_linear(x, m.base_layer.weight, **kw)


def named_adapters_task(ctx) -> dict:
    """Several named adapters on one module: add, switch, disable, delete."""
    out = {}
    col, rw = _layer_pair(ctx, dropout=0.0)
    x_full = {"column": inputs((5, 2, K)), "row": inputs((5, 2, H), seed=6)}
    for name, m in (("column", col), ("row", rw)):
        xf = x_full[name]
        x = xf if name == "column" else local_cols(xf, ctx.group)
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
            if m.kind == "column":
                n = delta.shape[-1] // ctx.tp
                delta = delta[..., ctx.rank * n:(ctx.rank + 1) * n]
            return float((y.double() - (base.double() + delta)).abs().max())

        y, _ = m(x)
        res["default_err"] = err("default", y)
        m.set_adapter("b")
        y, _ = m(x)
        res["b_err"] = err("b", y)
        res["grads_follow_active"] = (m.lora_A["b"].weight.requires_grad, m.lora_A["default"].weight.requires_grad)
        for bad in (["default", "b"], "nope"):
            try:
                m.set_adapter(bad)
                res[f"bad_{bad}"] = None
            except ValueError as e:
                res[f"bad_{bad}"] = str(e)
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


# -- Megatron conventions ----------------------------------------------------------------------
_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


def _attrs(p) -> dict:
    return {a: getattr(p, a) for a in _ATTRS if hasattr(p, a)}


def attributes_task(ctx, sp: bool) -> dict:
    """Megatron's TP/SP attributes on the factors, after add_adapter too."""
    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA

    col = ColumnParallelLoRA(column(ctx.group, ctx.tp, K, H, sp=sp), r=4, lora_alpha=8)
    rw = RowParallelLoRA(row(ctx.group, ctx.tp, H, K, sp=sp), r=4, lora_alpha=8)
    col.add_adapter("b", 2)
    out = {}
    for name, m in (("column", col), ("row", rw)):
        for adapter in m.lora_A:
            out[(name, adapter, "A")] = _attrs(m.lora_A[adapter].weight)
            out[(name, adapter, "B")] = _attrs(m.lora_B[adapter].weight)
    return out


def upcast_attributes_task(ctx) -> dict:
    """PEFT up-casts bf16 adapters to fp32 by building new Parameters: attributes must survive."""
    from peft import get_peft_model

    model = ToyMLP(ctx.group, ctx.tp, sp=True, dtype=torch.bfloat16)
    pm = get_peft_model(model, peft_config(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    fc1, fc2 = pm.base_model.model.fc1, pm.base_model.model.fc2
    return {
        "dtypes": [str(f.weight.dtype) for f in (fc1.lora_A["default"], fc1.lora_B["default"])],
        "fc1_A": _attrs(fc1.lora_A["default"].weight), "fc1_B": _attrs(fc1.lora_B["default"].weight),
        "fc2_A": _attrs(fc2.lora_A["default"].weight), "fc2_B": _attrs(fc2.lora_B["default"].weight),
    }


def main_grad_task(ctx, sp: bool) -> dict:
    """Megatron DDP's main_grad: the factor gradients accumulate there, not in .grad."""
    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA, sum_sequence_parallel_grads

    def build():
        col = ColumnParallelLoRA(column(ctx.group, ctx.tp, K, H, sp=sp), r=4, lora_alpha=8, lora_dropout=0.1,
                                 init_lora_weights=False, backend="torch")
        rw = RowParallelLoRA(row(ctx.group, ctx.tp, H, K, sp=sp), r=4, lora_alpha=8, lora_dropout=0.1,
                             init_lora_weights=False, backend="torch")
        return nn.ModuleList([col, rw])

    x_full = inputs((8, 2, K))
    x = local_rows(x_full, ctx.group) if sp else x_full

    def step(layers):
        torch.manual_seed(1000)  # the same dropout seeds in both runs
        h, _ = layers[0](x)
        y, _ = layers[1](torch.nn.functional.gelu(h))
        y.square().sum().backward()

    ref = build()
    step(ref)
    step(ref)  # .grad accumulates over two steps
    sum_sequence_parallel_grads(ref.parameters(), ctx.group)
    ddp = build()
    params = [p for p in ddp.parameters() if p.requires_grad]
    for p in params:
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
        p.grad_added_to_main_grad = False
    step(ddp)
    flags_after_first = [p.grad_added_to_main_grad for p in params]
    for p in params:
        # What Megatron DDP's backward hook does: fold .grad in unless the layer already did.
        if p.grad is not None and not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
        p.grad = None
        p.grad_added_to_main_grad = False
    step(ddp)
    for p in params:
        if p.grad is not None and not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
    placeholders_zero = all(p.grad is None or not p.grad.any() for p in params)
    sum_sequence_parallel_grads(ddp.parameters(), ctx.group)
    errs = {}
    for (n, p), q in zip(ddp.named_parameters(), ref.parameters()):
        if p.requires_grad:
            errs[n] = float((p.main_grad - q.grad).abs().max() / q.grad.abs().max())
    return {"errs": errs, "flags_after_first": flags_after_first, "placeholders_zero": placeholders_zero,
            "n": len(params)}


def _st(v) -> dict:
    return dict(key=v.key, global_shape=tuple(v.global_shape), global_offset=tuple(v.global_offset),
                axis_fragmentations=tuple(v.axis_fragmentations), replica_id=tuple(v.replica_id),
                local_shape=tuple(v.local_shape))


def sharded_metadata_task(ctx) -> dict:
    """The ShardedTensor metadata of both layer kinds, with a prefix and a prepended offset."""
    col, rw = _layer_pair(ctx)
    out = {}
    for name, m in (("column", col), ("row", rw)):
        sd = m.sharded_state_dict(prefix=f"{name}.", metadata={"dp_cp_group": None})
        out[name] = {k: _st(v) for k, v in sd.items() if hasattr(v, "axis_fragmentations")}
        out[name + "_keys"] = sorted(sd)
        stacked = m.sharded_state_dict(prefix="layers.", sharded_offsets=((0, 1, 3),), include_base=False)
        out[name + "_stacked"] = {k: _st(v) for k, v in stacked.items()}
    return out


_GROUPS: dict = {}


def _layout(t: int):
    """(tp_group, dp_group) of this rank when the 4 ranks form 4/t TP groups of consecutive ranks."""
    if t not in _GROUPS:
        world, rank = dist.get_world_size(), dist.get_rank()
        tp = [dist.new_group(list(range(s, s + t))) for s in range(0, world, t)]
        dp = [dist.new_group(list(range(i, world, t))) for i in range(t)]
        _GROUPS[t] = (tp[rank // t], dp[rank % t])
    return _GROUPS[t]


@contextlib.contextmanager
def _cpu_dist_checkpointing():
    """megatron's torch_dist strategy calls torch.cuda.synchronize/current_device: point them at the CPU.

    Nothing else changes; the strategy's file format and its validation run as on GPUs.
    """
    sync, cur = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, cur


def dist_ckpt_task(rank: int, ckpt_dir: str) -> dict:
    """Save the adapted ToyMLP with dist_checkpointing at TP=2; load at TP=1 (all) and TP=4 (adapters).

    Runs on 4 fresh, non-daemonic ranks (``run_standalone``): megatron's checkpoint writer forks
    worker processes, which the pool's daemonic ranks may not do.
    """
    from megatron.core import dist_checkpointing

    from tplora_kernels import adapter_sharded_state_dict, apply_lora, gather_full_factors
    from tplora_kernels.dispatch import LoRAConfig

    def build(t: int, seed: int):
        tp_group, dp_group = _layout(t)
        model = ToyMLP(tp_group, t)
        torch.manual_seed(seed)
        for mod in (model.fc1, model.fc2):
            mod.weight.data.normal_()
        apply_lora(model, LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, backend="torch"))
        torch.manual_seed(seed + 1)
        apply_lora(model, LoRAConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["fc2"]),
                   adapter_name="extra")
        return model, {"dp_cp_group": dp_group}

    def full(model) -> dict:
        out = {}
        for name in ("fc1", "fc2"):
            m = getattr(model, name)
            for adapter in m.lora_A:
                a, b = gather_full_factors(m, adapter)
                out[f"{name}.{adapter}.A"], out[f"{name}.{adapter}.B"] = a, b
            out[f"{name}.W"] = full_base(m)[0]
        return out

    def sharded(model, meta):
        sd = {}
        for name in ("fc1", "fc2"):
            sd.update(getattr(model, name).sharded_state_dict(f"{name}.", metadata=meta))
        return sd

    res = {}
    with _cpu_dist_checkpointing(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model2, meta2 = build(2, seed=100)
        res["saved"] = full(model2)
        dist_checkpointing.save(sharded(model2, meta2), ckpt_dir)
        dist.barrier()
        model1, meta1 = build(1, seed=200)
        res["before1"] = full(model1)
        model1.load_state_dict(dist_checkpointing.load(sharded(model1, meta1), ckpt_dir))
        res["tp1"] = full(model1)
        model4, meta4 = build(4, seed=300)
        res["before4"] = full(model4)
        loaded = dist_checkpointing.load(adapter_sharded_state_dict(model4, metadata=meta4), ckpt_dir)
        incompatible = model4.load_state_dict(loaded, strict=False)
        res["tp4"] = full(model4)
        res["tp4_unexpected"] = list(incompatible.unexpected_keys)
        res["tp4_loaded_keys"] = sorted(loaded)
    return res if rank == 0 else {}


def _standalone_worker(rank: int, world: int, port: int, fn_name: str, out_path: str, kwargs: dict) -> None:
    import os
    from datetime import timedelta

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        res = globals()[fn_name](rank, **kwargs)
        if rank == 0:
            torch.save(res, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without interpreter teardown. Megatron's checkpoint writer can leave a
    # joinable C++ thread behind, whose destructor at exit aborts the process now and then
    # ("terminate called without an active exception"), after the work has finished.
    os._exit(0)


def run_standalone(fn, world: int, out_path: str, timeout: float = 240.0, **kwargs):
    """Run ``fn(rank, **kwargs)`` on ``world`` fresh gloo ranks (not the pool); return rank 0's result."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = mp.start_processes(_standalone_worker, args=(world, port, fn.__name__, out_path, kwargs), nprocs=world,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=2):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks within {timeout}s")
    return torch.load(out_path, weights_only=False)


# -- PEFT end to end ---------------------------------------------------------------------------
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

    from tplora_kernels import gather_full_factors, save_adapter

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
    from tplora_kernels import LoRAConfig, apply_lora

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


def load_adapter_task(ctx, path: str, base_full: dict, peft_wrapped: bool) -> dict:
    """load_adapter at this TP size, onto base weights sliced from the TP=2 model's."""
    from tplora_kernels import LoRAConfig, apply_lora, load_adapter

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
    return {"y": y, "names": names, "active": inner.fc1.active_adapter,
            "r": [inner.fc1.r["loaded"], inner.fc2.r["loaded"]],
            "scaling": [inner.fc1.scaling["loaded"], inner.fc2.scaling["loaded"]]}


def load_adapter_errors(ctx, path: str) -> dict:
    """load_adapter refuses a file whose names do not match, and a DoRA config."""
    import json
    import os
    import shutil

    from tplora_kernels import LoRAConfig, apply_lora, load_adapter

    model = nn.Module()
    model.other = column(ctx.group, ctx.tp, K, H)
    apply_lora(model, LoRAConfig(r=2))
    out = {}
    try:
        load_adapter(model, path)
        out["names"] = None
    except ValueError as e:
        out["names"] = str(e)
    out["lenient"] = load_adapter(model, path, strict=False)
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
    try:
        load_adapter(model, dora, strict=False)
        out["dora"] = None
    except ValueError as e:
        out["dora"] = str(e)
    return out


# -- examples ----------------------------------------------------------------------------------
def readme_region(example_path: str) -> str:
    """The code between an example's ``readme`` markers: what the README must show verbatim."""
    with open(example_path) as f:
        text = f.read()
    return text.split("# --8<-- [start:readme]\n")[1].split("# --8<-- [end:readme]\n")[0].strip("\n")


def readme_python_blocks(paths) -> list[str]:
    """Every ```python block of the README-like files among ``paths`` that exist."""
    import os
    import re

    blocks = []
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                blocks += [b.strip("\n") for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)]
    return blocks


def run_example(ctx, path: str, out_dir: str) -> dict:
    """Import an example file and run its main() on this rank's TP group."""
    spec = importlib.util.spec_from_file_location(f"example_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(tp_group=ctx.group, out_dir=out_dir)
