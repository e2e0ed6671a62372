"""DoRA (``use_dora=True``) in a real megatron-core ``GPTModel`` and on the Hugging Face Llama twin.

Tasks run on every rank of one 4-rank ``gpt.run_world`` world per test file and switch the TP size
with ``llama.tensor_parallel`` (megatron's process groups are rebuilt only when it changes). Work
that needs only one TP group (training a configuration, which the data-parallel replicas would
merely repeat) runs on the first one (global ranks ``0..t-1``); the replicas return ``SKIPPED`` at
once and wait at the next collective, so a TP=1 task costs one rank's time, not four.

The oracle is the one of ``tests/support/gpt.py``: every tensor is gathered by the *base weight's*
own layout rule. DoRA's magnitude ``m [N]`` splits as B's rows: along dim 0 with the weight's
partition stride for a column-parallel layer, replicated for a row-parallel one.

What DoRA's gradient is. The forward is ``y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b`` with
``g = m / ‖W + s·B A‖``, and the norm is a *constant* in backward (the paper's §4.3, and PEFT's
``weight_norm.detach()``). So autograd's gradient in A and B is not the derivative of the loss:
it is the derivative of the loss with the norm held at its current value. ``finite_difference``
measures both: with ``freeze_norm`` every DoRA layer's norm is pinned to its value at the point
(``LoRALayer.dora_inputs`` returns the parts cached there), which is the function whose gradient
DoRA defines; without it the norm follows the perturbed factors (the model's plain loss). The
magnitude does not enter the norm, so its derivative is the plain loss's either way.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear

import tplora_kernels
from tplora_kernels.adapter_io.collect import full_factors
from tplora_kernels.testing.numerics import abs_err, rel_err

from . import gpt as G
from . import llama as L

SKIPPED = "skipped: a data-parallel replica of the TP group that ran the task"
RANK, ALPHA = 8, 16
MAG_SPREAD = 0.2  # magnitudes start at ‖W + s·B A‖ ⊙ (1 ± 0.2·N(0,1)): g != 1 from the first step


def working(t: int) -> bool:
    """This rank belongs to the first TP group of size ``t`` (the one that runs single-group tasks)."""
    return dist.get_rank() < t


# -- the oracle's layout rule, with magnitudes ---------------------------------------------------
def rules(m) -> dict[str, tuple[int, int] | None]:
    """``{"A"|"B"|"m": (dim, stride) if TP-sharded else None}``, read from the base weight (Megatron's rule)."""
    w = m.base_layer.weight
    shard = (w.partition_dim, getattr(w, "partition_stride", 1))
    if isinstance(m.base_layer, ColumnParallelLinear):
        return {"A": None, "B": shard, "m": shard}  # B and m split along N, as the weight's rows
    return {"A": shard, "B": None, "m": None}


def holders(m, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """A layer's ``{"A", "B", "m"}`` parameters of ``adapter``; an AssertionError if it is not a DoRA adapter."""
    if adapter not in m.lora_magnitude_vector:
        raise AssertionError(f"{type(m).__name__}: adapter {adapter!r} has no DoRA magnitude (lora_magnitude_vector "
                             f"holds {sorted(m.lora_magnitude_vector)}; use_dora={m.use_dora.get(adapter)})")
    return {"A": m.lora_A[adapter].weight, "B": m.lora_B[adapter].weight, "m": m.lora_magnitude_vector[adapter].weight}


def params(model) -> dict[str, torch.nn.Parameter]:
    """``{"<layer>.A|B|m": parameter}`` of every DoRA layer (names without PEFT's prefix)."""
    return {f"{name}.{k}": p for name, m in G.lora_layers(model) for k, p in holders(m).items()}


def _gather(x: torch.Tensor, rule: tuple[int, int] | None) -> torch.Tensor:
    if rule is None:
        return x.detach().clone()
    if x.dim() == 1:  # a magnitude: gathered as a column of B
        return G.gather_by_rule(x[:, None], 0, rule[1], G.tp_group())[:, 0]
    return G.gather_by_rule(x, rule[0], rule[1], G.tp_group())


def _slice(full: torch.Tensor, rule: tuple[int, int] | None) -> torch.Tensor:
    if rule is None:
        return full
    t, rank = dist.get_world_size(G.tp_group()), dist.get_rank(G.tp_group())
    if full.dim() == 1:
        return G.slice_by_rule(full[:, None], 0, rule[1], t, rank)[:, 0]
    return G.slice_by_rule(full, rule[0], rule[1], t, rank)


def tensors(model, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """Every factor and magnitude (or its gradient) as a full tensor, gathered by the base weight's rule."""
    out = {}
    for name, m in G.lora_layers(model):
        rule = rules(m)
        for k, p in holders(m).items():
            x = p.grad if grad else p
            if x is None:
                raise AssertionError(f"{name}.{k}: no gradient after backward")
            out[f"{name}.{k}"] = _gather(x, rule[k])
    return out


def layout_report(model) -> dict:
    """The library's Megatron attributes on each magnitude, beside the rule, and its gather against the rule's."""
    out = {}
    for name, m in G.lora_layers(model):
        p, rule = m.lora_magnitude_vector["default"].weight, rules(m)["m"]
        lib = full_factors(m, "default").magnitude
        out[name] = dict(rule=rule, sharded=bool(getattr(p, "tensor_model_parallel", False)),
                         attrs=(getattr(p, "partition_dim", None), getattr(p, "partition_stride", None)),
                         sequence_parallel=bool(getattr(p, "sequence_parallel", False)),
                         library_gather_diff=abs_err(lib, _gather(p, rule)))
    return out


# -- the GPTModel suite ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One DoRA training configuration of ``test_dora_gpt`` (gated MLP, every linear targeted)."""

    tp: int
    sp: bool = False
    dropout: float = 0.0
    via: str = "apply_lora"  # or "peft": tplora_kernels.peft.register + get_peft_model
    backend: str | None = "torch"  # None: automatic (the Triton kernels, under the interpreter on CPU)
    fd: bool = True
    fd_plain: bool = False  # also the finite difference of the plain loss (the norm following the factors)

    @property
    def label(self) -> str:
        parts = [f"tp{self.tp}", "sp" if self.sp else "nosp", f"p{self.dropout:g}"]
        if self.via != "apply_lora":
            parts.append(self.via)
        if self.backend != "torch":
            parts.append(f"backend={self.backend}")
        return "/".join(parts)

    def reference(self) -> Case:
        """The TP=1 configuration this one is compared with."""
        return Case(tp=1, dropout=self.dropout)


def set_magnitudes(model, seed: int = G.SEED + 31) -> None:
    """Every magnitude to ``‖W + s·B A‖ ⊙ (1 + MAG_SPREAD·N(0, 1))``, computed in fp64 from the full tensors.

    The same values at every TP size (the full base weights and factors are), so the models start
    bit-identical; and g != 1, so the magnitude acts from the first step.
    """
    g = torch.Generator().manual_seed(seed)
    for _, m in G.lora_layers(model):
        holders(m)  # a DoRA adapter, or an AssertionError that says so
        rule, opts = rules(m), m.adapter_options("default")
        w = G.full_param(m.base_layer.weight, G.tp_group()).double()
        a = _gather(m.lora_A["default"].weight, rule["A"]).double()
        b = _gather(m.lora_B["default"].weight, rule["B"]).double()
        full = (w + opts.scaling * b @ a).norm(dim=1) * (1 + MAG_SPREAD * torch.randn(w.shape[0], generator=g,
                                                                                      dtype=torch.float64))
        with torch.no_grad():
            m.lora_magnitude_vector["default"].weight.copy_(_slice(full.float(), rule["m"]))


def adapt(model, case: Case):
    """DoRA on every linear (apply_lora or PEFT's registration), factors drawn alike at every TP size."""
    torch.manual_seed(G.SEED + 1)
    kw = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=case.dropout, init_lora_weights=False,
              target_modules=list(G.TARGETS), use_dora=True)
    if case.via == "apply_lora":
        tplora_kernels.apply_lora(model, tplora_kernels.LoRAConfig(backend=case.backend, **kw))
    elif case.via == "peft":
        import peft

        import tplora_kernels.peft as tpeft

        model = peft.get_peft_model(model, tpeft.register(peft.LoraConfig(**kw), backend=case.backend))
    else:
        raise ValueError(f"via must be 'apply_lora' or 'peft', got {case.via!r}")
    set_magnitudes(model)
    return model


@contextlib.contextmanager
def frozen_norms(model):
    """Every DoRA layer's norm pinned to its value now (see the module docstring), for the block."""
    layers = [m for _, m in G.lora_layers(model)]
    for m in layers:
        a, b = m.factors("default")
        _, parts = m.dora_inputs("default", m.base_layer.weight, a, b)

        def pinned(name, weight, lora_a, lora_b, m=m, parts=parts):
            return m.lora_magnitude_vector[name](), parts

        m.dora_inputs = pinned
    try:
        yield
    finally:
        for m in layers:
            del m.dora_inputs


def _directions(model, keys: list[str], direction_seed: int) -> dict[str, torch.Tensor]:
    """This rank's slice of one fixed full direction per tensor (drawn in a fixed order), scaled to its norm."""
    g = torch.Generator().manual_seed(direction_seed)
    fulls = tensors(model)
    out = {}
    for name, m in G.lora_layers(model):
        rule = rules(m)
        for k in ("A", "B", "m"):
            key = f"{name}.{k}"
            v = torch.randn(fulls[key].shape, generator=g)
            if key in keys:
                out[key] = _slice(v * (fulls[key].norm() / v.norm()), rule[k])
    return out


FD_EPS = 1e-3


def finite_difference(model, which: tuple[str, ...], *, freeze_norm: bool, seed: int = G.SEED + 7,
                      eps: float = FD_EPS, directions: int = G.FD_DIRECTIONS) -> dict:
    """Autograd vs a 4-point finite difference of the model's loss along fixed directions (``gpt.finite_difference``).

    ``which``: the kinds of tensor moved (``"A"``, ``"B"``, ``"m"``). ``freeze_norm``: the loss with
    every DoRA norm pinned at the point (the function DoRA's gradient is the derivative of), else
    the plain loss. The error is ``|a - n| / |n|`` over the vector of ``directions`` derivatives.

    ``eps`` is 1e-3 of each tensor's norm, not ``gpt.FD_EPS``'s 1e-2: after three SGD steps at lr
    0.5 layer 0's q/k adapter outweighs its base (‖s·B A‖ = 33 against ‖W‖ = 11) and the attention
    logits are quadratic in it, so at 1e-2 the stencil's truncation error alone reached 0.47 along
    one direction of B (the same at TP 1, 2 and 4: 0.32 for that B alone, 3e-5..8e-4 for every other
    B), falling as eps⁴ (4.4e-3 at 3e-3, 4e-5 at 1e-3). At 1e-3 every configuration measured
    <= 5.1e-4, the fp32 loss's rounding.
    """
    ps = params(model)
    keys = [k for k in ps if k.rsplit(".", 1)[1] in which]
    sharded = {f"{name}.{k}" for name, m in G.lora_layers(model) for k, r in rules(m).items() if r is not None}
    for p in ps.values():
        p.grad = None
    G.seed_rng(seed)
    G.lm_loss(model).backward()
    G.sum_sp_grads(model)
    grads = {k: ps[k].grad.double() for k in keys}
    original = {k: ps[k].detach().clone() for k in keys}

    def loss_at(direction: dict, step: float) -> float:
        with torch.no_grad():
            for k, v in direction.items():
                ps[k].copy_(original[k] + step * v)
            G.seed_rng(seed)
            value = float(G.lm_loss(model))
            for k in direction:
                ps[k].copy_(original[k])
        return value

    analytic, numeric = [], []
    with frozen_norms(model) if freeze_norm else contextlib.nullcontext():
        for d in range(directions):
            direction = _directions(model, keys, 99 + d)
            local = torch.zeros(2, dtype=torch.float64)  # [sharded part, replicated part]
            for k, v in direction.items():
                local[0 if k in sharded else 1] += (grads[k] * v.double()).sum()
            if dist.get_world_size(G.tp_group()) > 1:
                dist.all_reduce(local[:1], group=G.tp_group())
            analytic.append(float(local.sum()))
            numeric.append((8 * (loss_at(direction, eps) - loss_at(direction, -eps))
                            - (loss_at(direction, 2 * eps) - loss_at(direction, -2 * eps))) / (12 * eps))
    for p in ps.values():
        p.grad = None
    a, n = torch.tensor(analytic, dtype=torch.float64), torch.tensor(numeric, dtype=torch.float64)
    return dict(analytic=analytic, numeric=numeric, rel_err=rel_err(a, n, norm="l2"))


def train_task(case: dict) -> dict | str:
    """Train one configuration ``G.STEPS`` SGD steps (A, B and m); losses, step-0 gradients, final tensors, FD."""
    case = Case(**case)
    with L.tensor_parallel(case.tp):
        if not working(case.tp):
            return SKIPPED
        model = adapt(G.build_gpt(sp=case.sp, gated=True), case)
        ps = params(model)
        opt = torch.optim.SGD(list(ps.values()), lr=G.LR)
        out = dict(init=tensors(model), layout=layout_report(model), losses=[],
                   trainable=sorted(n for n, p in model.named_parameters() if p.requires_grad),
                   dora=sorted(n for n, m in G.lora_layers(model) if m.adapter_options("default").use_dora))
        model.train()
        G.seed_rng()
        for step in range(G.STEPS):
            opt.zero_grad(set_to_none=True)
            loss = G.lm_loss(model)
            loss.backward()
            G.sum_sp_grads(model)
            if step == 0:
                out["grads0"] = tensors(model, grad=True)
            opt.step()
            out["losses"].append(float(loss))
        out["final"] = tensors(model)
        out["backends"] = sorted({str(m.last_backend) for _, m in G.lora_layers(model)})
        if case.fd:
            out["fd_all"] = finite_difference(model, ("A", "B", "m"), freeze_norm=True)
            out["fd_m"] = finite_difference(model, ("m",), freeze_norm=False)
        if case.fd_plain:
            out["fd_plain"] = finite_difference(model, ("A", "B"), freeze_norm=False)
        return out


GPT_CASES = [Case(tp=1, dropout=0.0, fd_plain=True), Case(tp=1, dropout=0.1),
             Case(tp=2, sp=True, dropout=0.0), Case(tp=2, sp=True, dropout=0.1),
             Case(tp=2, sp=True, dropout=0.1, via="peft", fd=False),
             Case(tp=2, sp=True, dropout=0.1, backend=None, fd=False),
             Case(tp=4, dropout=0.0), Case(tp=4, dropout=0.1)]


def apply_lora_flags_task() -> dict | str:
    """``requires_grad`` of every DoRA parameter right after ``apply_lora(..., use_dora=True)`` (TP=1)."""
    with L.tensor_parallel(1):
        if not working(1):
            return SKIPPED
        model = G.build_gpt(gated=True)
        torch.manual_seed(G.SEED + 1)
        tplora_kernels.apply_lora(model, tplora_kernels.LoRAConfig(r=RANK, lora_alpha=ALPHA, use_dora=True,
                                                                   target_modules=list(G.TARGETS), backend="torch"))
        return {n: p.requires_grad for n, p in params(model).items()}


def gpt_tasks(cases: list[Case] = GPT_CASES) -> list[tuple[str, str, dict]]:
    """The world's tasks, TP 4 first (the world starts there), then 2, then 1: two switches."""
    ordered = sorted(cases, key=lambda c: -c.tp)
    tasks = [(c.label, "tests.support.dora:train_task", dict(case=asdict(c))) for c in ordered]
    return [*tasks, ("apply_lora_flags", "tests.support.dora:apply_lora_flags_task", {})]


def drift(got: list[float], want: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(got, want)]


def gpt_report(ranks: list[dict], cases: list[Case] = GPT_CASES) -> str:
    """A table: per configuration the loss drift per step against TP=1, gradient/final errors, FD errors."""
    res, plain = ranks[0], []
    lines = [f"{'config':26s} {'loss drift per step':26s} {'grad0':>8s} {'final':>8s} {'m final':>8s} "
             f"{'FD A,B,m':>9s} {'FD m':>8s}"]
    for c in cases:
        got = res.get(c.label)
        if not isinstance(got, dict):
            lines.append(f"{c.label:26s} {got}")
            continue
        want = res[c.reference().label]
        d = " ".join(f"{x:.1e}" for x in drift(got["losses"], want["losses"]))
        mags = {k: v for k, v in got["final"].items() if k.endswith(".m")}
        fd = [f"{got[k]['rel_err']:.1e}" if k in got else "-" for k in ("fd_all", "fd_m")]
        lines.append(f"{c.label:26s} {d:26s} {G.max_rel(got['grads0'], want['grads0'])[0]:8.1e} "
                     f"{G.max_rel(got['final'], want['final'])[0]:8.1e} "
                     f"{G.max_rel(mags, {k: want['final'][k] for k in mags})[0]:8.1e} {fd[0]:>9s} {fd[1]:>8s}")
        if "fd_plain" in got:
            plain.append(f"{c.label}: {got['fd_plain']['rel_err']:.1e}")
    lines.append("autograd in A, B vs the plain loss's derivative (the norm following A, B): " + ", ".join(plain))
    return "\n".join(lines)


# -- Hugging Face: the Llama twin (tests/support/llama.py) -------------------------------------------
ARCH = "llama"
# PEFT's side: q/k/v and gate/up with their own r and alpha (the import combines them into one LoRA).
HF_PATTERNS = dict(rank_pattern={"k_proj": 2, "v_proj": 6, "up_proj": 3, "model.layers.1.self_attn.o_proj": 5},
                   alpha_pattern={"v_proj": 3, "gate_proj": 20})
# Megatron's side: layers of different r and alpha, so the export folds scales into B.
MEGATRON_PATTERNS = dict(rank_pattern={"linear_proj": 4, "linear_fc2": 6},
                         alpha_pattern={"linear_fc2": 9, "layers.1.self_attention.linear_qkv": 5})


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean token loss of HF logits ``[b, s, V]``, as ``gpt.lm_loss`` takes Megatron's (no shift, fp64 mean)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             reduction="none").double().mean()


def hf_forward(model) -> torch.Tensor:
    data = G.batch()
    return model(input_ids=data["input_ids"], position_ids=data["position_ids"]).logits


def peft_dora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """``{HF module name: PEFT LoRA layer}`` of a PeftModel (DoRA layers hold ``lora_magnitude_vector``)."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if hasattr(m, "lora_magnitude_vector") and "default" in getattr(m, "lora_A", {})}


def magnitude_offsets(peft_model) -> dict[str, float]:
    """Per PEFT DoRA layer, max |m - ‖W + s·B A‖| / max |m|: how far the magnitude is from its init (PEFT's)."""
    out = {}
    with torch.no_grad():
        for name, m in peft_dora_layers(peft_model).items():
            w = m.get_base_layer().weight
            norm = (w + m.get_delta_weight("default")).norm(dim=1)
            mag = m.lora_magnitude_vector["default"].weight
            out[name] = float((mag - norm).abs().max() / mag.abs().max())
    return out


def _train_peft(full: dict[str, torch.Tensor], path: str) -> dict:
    """PEFT DoRA on the HF twin with these base weights: a few SGD steps (A, B and m), then save_pretrained."""
    from peft import LoraConfig, get_peft_model

    hf = L.hf_model(ARCH, full)
    torch.manual_seed(G.SEED + 41)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(L.HF_TARGETS),
                                       init_lora_weights=False, use_dora=True, **HF_PATTERNS))
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=G.LR)
    pm.train()
    losses = []
    for _ in range(G.STEPS):
        opt.zero_grad(set_to_none=True)
        loss = token_loss(hf_forward(pm), G.batch()["labels"])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    pm.eval()
    pm.save_pretrained(path)
    return dict(losses=losses, offsets=magnitude_offsets(pm), trainable=trainable)


def peft_train_task(path: str) -> dict | str:
    """Global rank 0 trains and saves a PEFT DoRA adapter on the HF twin of the Megatron twin's base weights.

    Every rank builds the Megatron twin (its base weights gathered over its TP group); the others
    wait at a barrier until the adapter is written.
    """
    with L.tensor_parallel(2):
        full = L.base_weights(L.build_megatron(ARCH))
        try:
            return _train_peft(full, path) if dist.get_rank() == 0 else SKIPPED
        finally:
            dist.barrier()  # also when rank 0 raised: every rank then meets the next task's collectives


def import_task(path: str, tp: int, merge: bool = False) -> dict:
    """The PEFT-trained HF DoRA adapter loaded into the Megatron twin at TP = ``tp`` (``load_hf_adapter``).

    ``merge``: then ``merge_adapters`` (logits and the merged base weights), and ``unmerge_adapters``.
    """
    with L.tensor_parallel(tp):
        model = L.build_megatron(ARCH)
        out = dict(base=L.base_weights(model), base_logits=G.full_logits(model))
        L.adapt(model)  # the layers (a plain LoRA "default"); the file's DoRA adapter comes in as "hf"
        out["loaded"] = tplora_kernels.load_hf_adapter(model, path, arch=ARCH, adapter_name="hf")
        out["layers"] = len(tplora_kernels.lora_modules(model))
        out["dora"] = sorted(n for n, m in tplora_kernels.lora_modules(model) if m.adapter_options("hf").use_dora)
        out["logits"] = G.full_logits(model)
        if merge:
            out["merged_layers"] = tplora_kernels.merge_adapters(model)
            out["merged_logits"] = G.full_logits(model)
            out["merged_base"] = L.base_weights(model)
            tplora_kernels.unmerge_adapters(model)
            out["unmerged_logits"] = G.full_logits(model)
            out["unmerged_base"] = L.base_weights(model)
        return out


def _dora_twin(lora_seed: int, magnitude_seed: int):
    """The Megatron twin with a DoRA adapter on every linear (layers of different r and alpha; dropout 0.1)."""
    model = L.build_megatron(ARCH)
    L.adapt(model, seed=lora_seed, use_dora=True, lora_dropout=0.1, **MEGATRON_PATTERNS)
    for _, m in G.lora_layers(model):  # apply_lora freezes them (test_dora_gpt: the apply_lora bug)
        m.lora_magnitude_vector["default"].weight.requires_grad_(True)
    set_magnitudes(model, magnitude_seed)
    return model


def export_task(root: str, tp: int) -> dict:
    """Train a DoRA adapter on the twin at TP = ``tp`` and write it three ways: HF names, PEFT files, dist checkpoint.

    Every rank calls it (the writers are collective). Also the gradients at the exported point
    with dropout off, for PEFT's own backward on the HF side.
    """
    with L.tensor_parallel(tp):
        model = _dora_twin(G.SEED + 1, G.SEED + 31)
        ps = params(model)
        opt = torch.optim.SGD(list(ps.values()), lr=G.LR)
        start = tensors(model)
        G.seed_rng()
        model.train()
        losses = []
        for _ in range(G.STEPS):
            opt.zero_grad(set_to_none=True)
            loss = G.lm_loss(model)
            loss.backward()
            G.sum_sp_grads(model)
            opt.step()
            losses.append(float(loss))
        tplora_kernels.export_hf_adapter(model, os.path.join(root, "hf"), arch=ARCH)
        tplora_kernels.save_adapter(model, os.path.join(root, "peft"))
        tplora_kernels.save_adapter_checkpoint(model, os.path.join(root, "dcp"))
        out = dict(losses=losses, start=start, tensors=tensors(model), logits=G.full_logits(model),
                   base=L.base_weights(model),
                   scales={n: m.adapter_options("default").scaling for n, m in G.lora_layers(model)})
        model.eval()
        for p in ps.values():
            p.grad = None
        G.lm_loss(model).backward()
        out["grads"] = tensors(model, grad=True)
        return out


def roundtrip_task(root: str, fmt: str, tp: int) -> dict:
    """What ``export_task`` wrote in format ``fmt`` (hf, peft, dcp), loaded at TP = ``tp`` over another DoRA adapter."""
    with L.tensor_parallel(tp):
        model = _dora_twin(G.SEED + 61, G.SEED + 62)
        before = tensors(model)
        path = os.path.join(root, fmt)
        if fmt == "hf":
            tplora_kernels.load_hf_adapter(model, path, arch=ARCH)
        elif fmt == "peft":
            tplora_kernels.load_adapter(model, path)
        elif fmt == "dcp":
            tplora_kernels.load_adapter_checkpoint(model, path)
        else:
            raise ValueError(f"fmt must be hf, peft or dcp, got {fmt!r}")
        scales = {n: m.adapter_options("default").scaling for n, m in G.lora_layers(model)}
        return dict(before=before, tensors=tensors(model), scales=scales, logits=G.full_logits(model))


# -- PEFT-format files between our TP modules and a dense PEFT model (tests/integration/test_peft.py) ----
TOY_R, TOY_ALPHA = 4, 8


def _toy_peft(group, tp: int, ours: str) -> dict:
    """The TP-2 half of ``toy_task``: PEFT's registration, forward/backward, save_adapter, PEFT's merges."""
    from peft import get_peft_model

    from .layers import K, ToyMLP, full_base, inputs, peft_config

    out: dict = {}
    torch.manual_seed(G.SEED + 51)
    pm = get_peft_model(ToyMLP(group, tp), peft_config(r=TOY_R, lora_alpha=TOY_ALPHA, init_lora_weights=False,
                                                       use_dora=True, target_modules=["fc1", "fc2"],
                                                       backend="torch"))
    set_magnitudes(pm, G.SEED + 52)
    inner = pm.base_model.model
    out["types"] = [type(inner.fc1).__name__, type(inner.fc2).__name__]
    out["trainable"] = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    x = inputs((6, 2, K), seed=9).requires_grad_(True)
    y = pm(x)
    y.square().sum().backward()
    out.update(y=y.detach(), dx=x.grad.clone(), grads=tensors(pm, grad=True), tensors=tensors(pm),
               base_full={n: full_base(getattr(inner, n)) for n in ("fc1", "fc2")})
    tplora_kernels.save_adapter(pm, ours, group=group)
    with torch.no_grad():
        pm.merge_adapter()
        out["merge_adapter"] = (inner.fc1.merged and inner.fc2.merged, pm(x))
        pm.unmerge_adapter()
        out["unmerge_adapter"] = (inner.fc1.merged or inner.fc2.merged, pm(x),
                                  {n: full_base(getattr(inner, n)) for n in ("fc1", "fc2")})
        merged = pm.merge_and_unload()
        out["unloaded_types"] = [type(merged.fc1).__name__, type(merged.fc2).__name__]
        out["unloaded"] = (merged(x), {n: full_base(getattr(merged, n)) for n in ("fc1", "fc2")})
    return out


def toy_task(ours: str, dense: str, tp: int) -> dict:
    """DoRA through PEFT's registration on the toy Megatron MLP (fc1 column, fc2 row) at TP = ``tp``.

    At TP 2, on the first TP group: forward and backward, ``save_adapter`` (to ``ours``), PEFT's
    ``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload``. At every TP, on every rank:
    ``load_adapter`` of ``ours`` and of ``dense`` (stock PEFT's DoRA adapter of the dense twin)
    into a fresh model; its outputs.
    """
    from .layers import K, ToyMLP, full_base, inputs

    with L.tensor_parallel(tp):
        group = G.tp_group()
        out: dict = {}
        # A failure of one part is raised at the end, so that every rank still makes the same
        # collectives in the same order (the loads are collective over the job) and the world lives on.
        failure = None
        if tp == 2 and working(tp):  # the replicas would repeat it (and import peft) for nothing
            try:
                out.update(_toy_peft(group, tp, ours))
            except Exception as e:
                failure = e
        if tp == 2:
            dist.barrier()  # the file is written before any rank reads it
        x = inputs((6, 2, K), seed=9)
        for name, path in (("ours", ours), ("dense", dense)):
            model = ToyMLP(group, tp)
            tplora_kernels.apply_lora(model, tplora_kernels.LoRAConfig(r=2, target_modules=["fc1", "fc2"],
                                                                       backend="torch"))
            try:  # the loaders refuse on every rank alike, before any transfer
                tplora_kernels.load_adapter(model, path, adapter_name="loaded")
            except (OSError, ValueError) as e:
                failure = failure or e
                continue
            with torch.no_grad():
                out[f"y_{name}"] = model(x)
            out[f"dora_{name}"] = [model.fc1.adapter_options("loaded").use_dora,
                                   model.fc2.adapter_options("loaded").use_dora]
        if failure is not None:
            raise failure
        if "base_full" not in out:
            out["base_full"] = {n: full_base(getattr(model, n)) for n in ("fc1", "fc2")}
        return out


def dense_dora_adapter(path: str) -> None:
    """Stock PEFT's DoRA adapter of the dense toy MLP (magnitudes moved off their init), saved with save_pretrained.

    The dense model's own base weights only set the magnitudes' init, which is then scaled: the file
    is loaded onto other base weights (the toy Megatron MLP's) on both sides.
    """
    from peft import LoraConfig, get_peft_model

    from .layers import DenseMLP

    torch.manual_seed(G.SEED + 53)
    pm = get_peft_model(DenseMLP(), LoraConfig(r=TOY_R, lora_alpha=TOY_ALPHA, init_lora_weights=False, use_dora=True,
                                               target_modules=["fc1", "fc2"]))
    g = torch.Generator().manual_seed(G.SEED + 54)
    with torch.no_grad():
        for m in peft_dora_layers(pm).values():
            mag = m.lora_magnitude_vector["default"].weight
            mag.mul_(1 + MAG_SPREAD * torch.randn(mag.shape, generator=g))
    pm.save_pretrained(path)


def dense_peft(base_full: dict, path: str, *, dtype: torch.dtype = torch.float32, trainable: bool = False):
    """The dense toy MLP with these full base weights and the PEFT adapter at ``path`` (stock PEFT)."""
    from peft import PeftModel

    from .layers import DenseMLP

    dense = DenseMLP()
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            w, b = base_full[n]
            getattr(dense, n).weight.copy_(w)
            getattr(dense, n).bias.copy_(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(dense, path, is_trainable=trainable)
    return model.to(dtype)
