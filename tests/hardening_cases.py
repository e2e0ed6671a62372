"""Rank-side tasks for tests/test_hardening.py (module-level so the gloo pool can pickle them)."""

from __future__ import annotations

import warnings

import torch

from tplora_kernels import column_parallel_lora, row_parallel_lora
from tplora_kernels.reference import column_parallel_lora_reference, row_parallel_lora_reference


def shards(kind: str, rank: int, t: int, K: int, N: int, r: int, seed: int = 0, dtype=torch.float32,
           input_is_parallel: bool = True):
    """Full matrices from one seed (identical on every rank) and this rank's shards, as a dict."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    if kind == "column":
        n = N // t
        sl = slice(rank * n, (rank + 1) * n)
        w, a, b, bb = W[sl], A, B[sl], bias[sl]
    else:
        k = K // t
        sl = slice(rank * k, (rank + 1) * k)
        w, a, b, bb = W[:, sl], A[:, sl], B, bias
    cast = {"weight": w.to(dtype), "lora_a": a.float(), "lora_b": b.float(), "bias": bb.to(dtype)}
    return cast


def _call(kind, x, p, *, fused=True, sp=False, opt=False, group=None, backend="torch", seed=7, scale=0.5):
    mode = {"gather_output": opt} if kind == "column" else {"input_is_parallel": opt}
    fn = {("column", True): column_parallel_lora, ("row", True): row_parallel_lora,
          ("column", False): column_parallel_lora_reference, ("row", False): row_parallel_lora_reference}[kind, fused]
    extra = {"backend": backend} if fused else {}
    return fn(x, p["weight"], p["lora_a"], p["lora_b"], bias=p["bias"], scale=scale, dropout_p=0.25, seed=seed,
              sequence_parallel=sp, group=group, **mode, **extra)


def bad_call(ctx, case: str, kind: str = "column"):
    """Make one invalid call; every rank must raise before any collective."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 16, 8, 4
    p = shards(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    x = torch.randn(4, 2, k_in)
    kw = {"group": ctx.group, "backend": "torch"}
    fn = column_parallel_lora if kind == "column" else row_parallel_lora
    args = dict(bias=p["bias"], scale=0.5, dropout_p=0.1, seed=3, sequence_parallel=True)
    if case == "hidden":
        x = torch.randn(4, 2, k_in + 1)
    elif case == "seq_not_divisible":
        x = torch.randn(3, 2, k_in)
    elif case == "int_dtype":
        x = torch.ones(4, 2, k_in, dtype=torch.int32)
    elif case == "dtype_mismatch":
        x = x.half()
    elif case == "device":
        x = torch.empty(4, 2, k_in, device="meta")
    elif case == "rank_zero":
        p["lora_a"], p["lora_b"] = p["lora_a"][:0], p["lora_b"][:, :0]
    elif case == "dropout":
        args["dropout_p"] = 1.0
    elif case == "scale":
        args["scale"] = float("nan")
    elif case == "frozen":
        p["weight"].requires_grad_(True)
    else:
        raise AssertionError(f"unknown case {case}")
    fn(x, p["weight"], p["lora_a"], p["lora_b"], **args, **kw)
    return "no error"


def bad_module(ctx, case: str):
    """Module-level misuse: every rank must raise (or warn) the same, before any collective."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from tplora_kernels import ColumnParallelLoRA

    cfg = ModelParallelConfig(tensor_model_parallel_size=ctx.tp, use_cpu_initialization=True)
    base = ColumnParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.xavier_normal_, bias=True,
                                gather_output=False, tp_group=ctx.group)
    if case == "not_megatron":
        ColumnParallelLoRA(torch.nn.Linear(16, 8), r=4)
    elif case == "explicit_expert_comm":
        base.is_expert = base.explicit_expert_comm = True
        ColumnParallelLoRA(base, r=4)
    elif case == "r_zero":
        ColumnParallelLoRA(base, r=0)
    elif case == "dropout":
        ColumnParallelLoRA(base, r=4, lora_dropout=1.5)
    elif case == "alpha":
        ColumnParallelLoRA(base, r=4, lora_alpha=float("inf"))
    elif case == "adapter":
        ColumnParallelLoRA(base, r=4).set_adapter("nope")
    elif case in ("merge_twice", "unmerge_unmerged"):
        layer = ColumnParallelLoRA(base, r=4, init_lora_weights=False)
        before = base.weight.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if case == "merge_twice":
                layer.merge()
                merged = base.weight.detach().clone()
                layer.merge()
                ok = torch.equal(base.weight, merged) and not torch.equal(merged, before)
            else:
                layer.unmerge()
                ok = torch.equal(base.weight, before)
        return {"warned": [str(w.message) for w in caught], "weight_intact": ok}
    else:
        raise AssertionError(f"unknown case {case}")
    return "no error"


def odd_inputs(ctx, kind: str, case: str, backend: str):
    """Fused vs the unfused reference (same mask) on odd but valid inputs; returns errors and NaN maps."""
    t, rank = ctx.tp, ctx.rank
    K, N, r, S, Bt = {"odd": (60, 36, 5, 6, 3), "r1": (16, 8, 1, 4, 2), "r128": (32, 16, 128, 4, 2)}.get(
        case, (16, 8, 4, 4, 2))
    p = shards(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    g = torch.Generator().manual_seed(11)
    if case == "noncontig":
        # Every other column of a NaN-filled buffer: a kernel that ignores strides reads NaN.
        buf = torch.full((S, Bt, 2 * k_in), float("nan"))
        buf[..., ::2] = torch.randn(S, Bt, k_in, generator=g)
        x = buf[..., ::2]
    elif case == "transposed":
        buf = torch.full((k_in, 2 * S * Bt), float("nan"))
        buf[:, ::2] = torch.randn(k_in, S * Bt, generator=g)
        x = buf[:, ::2].t()  # [T, K] with strides (2, 2T)
    else:
        x = torch.randn(S, Bt, k_in, generator=g)
    if case == "nan":
        x[1, 0, 3] = float("nan")
        x[2, 1, 5] = float("inf")
    out = {}
    for fused in (True, False):
        xx = x.detach().clone().requires_grad_(True) if case not in ("noncontig", "transposed") else \
            x.detach().requires_grad_(True)
        q = {n: v.detach().clone().requires_grad_(n.startswith("lora")) for n, v in p.items()}
        y = _call(kind, xx, q, fused=fused, opt=True, group=ctx.group, backend=backend)
        g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        y.backward(g_out)
        out[fused] = {"y": y.detach(), "dx": xx.grad, "dA": q["lora_a"].grad, "dB": q["lora_b"].grad}
    res = {}
    for name in ("y", "dx", "dA", "dB"):
        a, b = out[True][name].double(), out[False][name].double()
        same_nan = bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)))
        fin = torch.isfinite(b)
        scale = b[fin].abs().max().item() if fin.any() else 1.0
        err = ((a - b)[fin].abs().max().item() / max(scale, 1e-30)) if fin.any() else 0.0
        res[name] = {"err": err, "same_nonfinite": same_nan, "n_nonfinite": int((~fin).sum())}
    return res


def rerun_bits(ctx, kind: str, backend: str, sp: bool):
    """Two runs with the same seed: outputs and grads must be bit-identical."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 32, 16, 4
    p = shards(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    runs = []
    for _ in range(2):
        x = torch.randn(4, 2, k_in, generator=torch.Generator().manual_seed(9), requires_grad=True)
        q = {n: v.detach().clone().requires_grad_(n.startswith("lora")) for n, v in p.items()}
        y = _call(kind, x, q, sp=sp, opt=True, group=ctx.group, backend=backend)
        y.backward(torch.ones_like(y))
        runs.append([y.detach(), x.grad, q["lora_a"].grad, q["lora_b"].grad])
    return [bool(torch.equal(a, b)) for a, b in zip(*runs)]


def recompute(ctx, kind: str, how: str, backend: str):
    """Activation recompute (dropout on, seed drawn from the default generator) vs no recompute."""
    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA  # noqa: F401 - import check only

    t, rank = ctx.tp, ctx.rank
    K, N, r = 32, 16, 4
    p = shards(kind, rank, t, K, N, r)
    k_in = K if kind == "column" else K // t
    fn = column_parallel_lora if kind == "column" else row_parallel_lora

    def layer(x, a, b):
        # seed=None: drawn from torch's default generator on x's device, as the modules do.
        return fn(x, p["weight"], a, b, bias=p["bias"], scale=0.5, dropout_p=0.3, group=ctx.group, backend=backend)

    grads = []
    for mode in ("plain", how):
        torch.manual_seed(1234)
        x = torch.randn(4, 2, k_in, requires_grad=True)
        a = p["lora_a"].detach().clone().requires_grad_(True)
        b = p["lora_b"].detach().clone().requires_grad_(True)
        if mode == "plain":
            y = layer(x, a, b)
        elif mode == "torch":
            import torch.utils.checkpoint as ckpt

            y = ckpt.checkpoint(layer, x, a, b, use_reentrant=False)
        else:
            from unittest import mock

            from megatron.core.tensor_parallel import random as mrandom

            # Megatron's checkpoint also saves/restores the CUDA RNG; there is no CUDA here, so
            # those two calls are stubbed. The CPU RNG restore (where our seed is drawn) is real.
            with mock.patch.object(mrandom, "_get_cuda_rng_state", lambda *a, **k: None), \
                    mock.patch.object(mrandom, "_set_cuda_rng_state", lambda *a, **k: None):
                y = mrandom.checkpoint(layer, False, x, a, b)
                torch.manual_seed(999)  # disturb the generator between forward and recompute
                y.backward(torch.ones_like(y))
        if mode != "megatron":
            torch.manual_seed(999)
            y.backward(torch.ones_like(y))
        grads.append([y.detach(), x.grad, a.grad, b.grad])
    return [bool(torch.equal(u, v)) for u, v in zip(*grads)]


def empty_tokens(ctx, kind: str, sp: bool, opt: bool, backend: str):
    """T = 0: empty output of the right shape, zero LoRA grads, no crash, in every mode."""
    t, rank = ctx.tp, ctx.rank
    K, N, r = 16, 8, 4
    p = shards(kind, rank, t, K, N, r)
    k_in = K if (kind == "column" or not opt) else K // t
    x = torch.zeros(0, 2, k_in, requires_grad=True)
    q = {n: v.detach().clone().requires_grad_(n.startswith("lora")) for n, v in p.items()}
    y = _call(kind, x, q, sp=sp, opt=opt, group=ctx.group, backend=backend)
    y.sum().backward()
    return {"y": tuple(y.shape), "dx": tuple(x.grad.shape), "dA": float(q["lora_a"].grad.abs().sum()),
            "dB": float(q["lora_b"].grad.abs().sum())}


def bad_adapter_file(ctx, path: str):
    """load_adapter of a file whose shapes do not fit: same error on every rank, model untouched."""
    import json
    import os

    import torch.distributed as dist
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from safetensors.torch import save_file

    from tplora_kernels import ColumnParallelLoRA, load_adapter

    cfg = ModelParallelConfig(tensor_model_parallel_size=ctx.tp, use_cpu_initialization=True)
    model = torch.nn.Module()
    model.fc1 = ColumnParallelLoRA(ColumnParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.xavier_normal_,
                                                        bias=False, gather_output=False, tp_group=ctx.group), r=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    if ctx.rank == 0:  # full A must be [4, 16]; this one is [4, 12]
        os.makedirs(path, exist_ok=True)
        save_file({"base_model.model.fc1.lora_A.weight": torch.zeros(4, 12),
                   "base_model.model.fc1.lora_B.weight": torch.zeros(8, 4)},
                  os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc1"]}, f)
    dist.barrier(group=ctx.group)
    try:
        load_adapter(model, path, adapter_name="other")
        err = None
    except ValueError as e:
        err = str(e)
    after = {k: v for k, v in model.state_dict().items() if "lora" in k}
    untouched = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return {"error": err, "untouched": untouched, "adapters": sorted(model.fc1.lora_A)}
