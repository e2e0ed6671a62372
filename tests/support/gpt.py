"""A tiny megatron-core ``GPTModel`` (local spec) trained with LoRA in real gloo worlds.

The test process calls ``run_world(t, tasks, tmp)``: it spawns a fresh world of ``t`` gloo ranks
(``tplora_kernels.testing.launch.spawn_world``), each initialises megatron's ``parallel_state``
with TP = t, installs the CPU shims (``megatron_shims.megatron_on_cpu``) and runs every task in
order; each rank's ``{label: result}`` comes back to the test process. A task is the name of a function
in this module (or ``"package.module:function"``), called as ``fn(**kwargs)`` on every rank; an
exception becomes a ``TaskError`` result for that label (so one broken configuration does not
hide the others).

The oracle never asks the library how a tensor is laid out: ``gather_by_rule``/``slice_by_rule``
implement Megatron's own rule (a dim of size n split into t·stride chunks, rank i holding chunks
i, i+t, ...), proven on the base weights (``base_task``), and a LoRA factor is gathered with its
*base weight's* ``partition_dim``/``partition_stride``, since it must shard as that weight does.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig

import tplora_kernels
from tplora_kernels.testing import launch
from tplora_kernels.testing.megatron_cpu import megatron_on_cpu
from tplora_kernels.testing.numerics import abs_err, max_rel_err, rel_err

SEED = 1234  # base weights, LoRA factors and Megatron's RNG tracker
LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ, MBS = 2, 64, 4, 128, 128, 16, 2
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ALPHA = 16
INIT_STD = 0.1  # sharper than megatron's 0.02, so the loss moves enough for fp32 finite differences
STEPS = 3
LR = 0.5
FD_EPS = 1e-2  # finite-difference step, relative to each factor's norm (see finite_difference)
FD_DIRECTIONS = 3  # fixed random directions per check (see finite_difference)
FD_FACTOR = "decoder.layers.0.mlp.linear_fc1.B"  # the single-factor FD check: stride-2 B of a gated fc1


@dataclass(frozen=True)
class Case:
    """One configuration of the suite (what every rank of a world trains)."""

    sp: bool = False
    gated: bool = False
    dropout: float = 0.0
    backend: str | None = "torch"  # None: automatic (the interpreter under the test session)
    recompute: str | None = None  # None, "full" (uniform, 1 layer) or "selective" (core_attn + mlp)
    via: str = "apply_lora"  # or "peft"
    bias: bool = True  # linear biases (see extra_cases for why one case drops them)
    steps: int = STEPS
    fd: bool = True

    @property
    def label(self) -> str:
        parts = ["sp" if self.sp else "nosp", "gated" if self.gated else "plain", f"p{self.dropout:g}"]
        if self.backend != "torch":
            parts.append(f"backend={self.backend}")
        if self.recompute:
            parts.append(f"recompute={self.recompute}")
        if self.via != "apply_lora":
            parts.append(self.via)
        if not self.bias:
            parts.append("nobias")
        return "/".join(parts)

    def reference(self) -> Case:
        """The TP=1 configuration this one is compared with (same model, same dropout)."""
        return Case(gated=self.gated, dropout=self.dropout)


@dataclass
class TaskError:
    """An exception a task raised on a rank."""

    rank: int
    message: str
    traceback: str = field(repr=False)

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.message}\n{self.traceback}"


# -- Megatron's TP layout rule (the oracle) ----------------------------------------------------
def _chunks(n: int, t: int, stride: int, what: str) -> int:
    if n % (t * stride):
        raise ValueError(f"{what}: size {n} does not split into {t}x{stride} chunks")
    return n // (t * stride)


def slice_by_rule(full: torch.Tensor, dim: int, stride: int, t: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full``: chunks rank, rank+t, ... of t·stride along ``dim``."""
    c = _chunks(full.shape[dim], t, stride, "slice_by_rule")
    return torch.cat([full.narrow(dim, (j * t + rank) * c, c) for j in range(stride)], dim=dim)


def gather_by_rule(shard: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    """The full tensor from every rank's ``slice_by_rule`` shard (all ranks of ``group`` call it)."""
    t = dist.get_world_size(group)
    if t == 1:
        return shard.detach().clone()
    parts = [torch.empty_like(shard) for _ in range(t)]
    dist.all_gather(parts, shard.detach().contiguous(), group=group)
    c = _chunks(shard.shape[dim], 1, stride, "gather_by_rule")
    ordered = [parts[i].narrow(dim, j * c, c) for j in range(stride) for i in range(t)]
    return torch.cat(ordered, dim=dim)


def full_param(p: torch.Tensor, group) -> torch.Tensor:
    """A megatron parameter, gathered by its own TP attributes (for base weights)."""
    if not getattr(p, "tensor_model_parallel", False):
        return p.detach().clone()
    return gather_by_rule(p, p.partition_dim, getattr(p, "partition_stride", 1), group)


# -- model, data, loss -------------------------------------------------------------------------
def build_gpt(*, sp: bool = False, gated: bool = False, recompute: str | None = None, tied: bool = False,
              bias: bool = True, seed: int = SEED):
    """GPTModel (local spec, fp32, no attention/hidden dropout) with base weights from ``seed``.

    ``use_cpu_initialization`` builds every full weight from the CPU generator and keeps this
    rank's slice, so the base model is the same at every TP size.
    """
    t = parallel_state.get_tensor_model_parallel_world_size()
    extra = {}
    if recompute == "full":
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        extra = dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
    elif recompute is not None:
        raise ValueError(f"recompute must be None, 'full' or 'selective', got {recompute!r}")
    act = torch.nn.functional.silu if gated else torch.nn.functional.gelu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
            tensor_model_parallel_size=t, sequence_parallel=sp and t > 1, use_cpu_initialization=True,
            params_dtype=torch.float32, attention_dropout=0.0, hidden_dropout=0.0, gated_linear_unit=gated,
            activation_func=act, bias_activation_fusion=False, masked_softmax_fusion=False,
            gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
            init_method_std=INIT_STD, add_bias_linear=bias, **extra)
        torch.manual_seed(seed)
        return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                        share_embeddings_and_output_weights=tied)


def batch() -> dict:
    """A fixed micro-batch: tokens, positions, an explicit causal mask (True = masked), labels."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    return dict(input_ids=ids, position_ids=torch.arange(SEQ).expand(MBS, SEQ), labels=labels,
                attention_mask=torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None])


def lm_loss(model, data: dict | None = None) -> torch.Tensor:
    """Mean token loss (megatron's vocab-parallel cross entropy: the full loss on every TP rank).

    The mean is taken in fp64: rounding the mean to fp32 alone would cost half an ulp of ~4.8
    (2.4e-7), the floor of every finite difference taken on it.
    """
    return model(**(data or batch())).double().mean()


def train_steps(model, opt, steps: int, out: dict) -> None:
    """``steps`` SGD steps on ``lm_loss`` from a seeded RNG: each loss into ``out["losses"]``, the
    first step's factor gradients (SP-summed) into ``out["grads0"]``."""
    seed_rng()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model)
        loss.backward()
        sum_sp_grads(model)
        if step == 0:
            out["grads0"] = factor_tensors(model, grad=True)
        opt.step()
        out["losses"].append(float(loss))


def seed_rng(seed: int = SEED) -> None:
    """Megatron's seeding: default generator and tracker states, so every evaluation draws alike."""
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


# -- adapters ----------------------------------------------------------------------------------
def lora_config(case: Case, **overrides):
    kw = dict(r=8, lora_alpha=ALPHA, lora_dropout=case.dropout, init_lora_weights=False, target_modules=list(TARGETS),
              backend=case.backend)
    kw.update(overrides)
    return tplora_kernels.LoRAConfig(**kw)


def adapt(model, case: Case, *, lora_seed: int = SEED + 1):
    """Add the adapter (apply_lora or PEFT); returns the model to train (a PeftModel for PEFT)."""
    torch.manual_seed(lora_seed)  # the full factors, drawn alike at every TP size
    if case.via == "apply_lora":
        tplora_kernels.apply_lora(model, lora_config(case))
        return model
    if case.via == "peft":
        # Local: peft (and the transformers it imports) would cost every rank of every world seconds.
        import peft

        import tplora_kernels.peft as tpeft

        cfg = tpeft.register(peft.LoraConfig(r=8, lora_alpha=ALPHA, lora_dropout=case.dropout,
                                             init_lora_weights=False, target_modules=list(TARGETS)),
                             backend=case.backend)
        return peft.get_peft_model(model, cfg)
    raise ValueError(f"via must be 'apply_lora' or 'peft', got {case.via!r}")


def lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(local dotted name, module) of every LoRA layer, names without PEFT's prefix.

    The names are the model's own (``named_modules``: local layer and expert indices), not the
    library's canonical ones (``tplora_kernels.lora_modules``): the oracles here map them to global
    indices by their own rule, so the library's naming is checked, not assumed.
    """
    return [(name.removeprefix("base_model.model."), m) for name, m in model.named_modules()
            if isinstance(m, tplora_kernels.LoRALayer)]


def sharded_factor(m) -> tuple[str, int, int]:
    """(which factor is TP-sharded, its dim, its stride), read from the base weight (the oracle)."""
    w = m.base_layer.weight
    which = "B" if isinstance(m.base_layer, ColumnParallelLinear) else "A"
    if w is None:
        # A tied output layer: its weight is the word embedding's, passed at call time, and
        # VocabParallelEmbedding shards that weight's rows (dim 0, stride 1).
        return which, 0, 1
    return which, w.partition_dim, getattr(w, "partition_stride", 1)


def factor_tensors(model, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """Every LoRA factor (or its gradient) as a full tensor, gathered by the base weight's rule."""
    group = tp_group()
    out = {}
    for name, m in lora_layers(model):
        which, dim, stride = sharded_factor(m)
        for f, holder in (("A", m.lora_A["default"]), ("B", m.lora_B["default"])):
            x = holder.weight.grad if grad else holder.weight
            if x is None:
                raise AssertionError(f"{name}.{f}: no gradient after backward")
            out[f"{name}.{f}"] = gather_by_rule(x, dim, stride, group) if f == which else x.detach().clone()
    return out


def layout_report(model) -> dict:
    """How the library lays out each sharded factor, beside the base weight's (Megatron's) rule.

    ``gather_full_factors_diff`` compares the library's own gather with ``gather_by_rule``.
    """
    out = {}
    for name, m in lora_layers(model):
        which, dim, stride = sharded_factor(m)
        p = (m.lora_B if which == "B" else m.lora_A)["default"].weight
        lib = tplora_kernels.gather_full_factors(m, "default")[1 if which == "B" else 0]
        ours = gather_by_rule(p, dim, stride, tp_group())
        out[name] = dict(which=which, base_dim=dim, base_stride=stride, dim=getattr(p, "partition_dim", None),
                         stride=getattr(p, "partition_stride", None),
                         gather_full_factors_diff=abs_err(lib, ours))
    return out


def sum_sp_grads(model) -> None:
    tplora_kernels.sum_sequence_parallel_grads(model.parameters(), tp_group())


# -- finite differences ------------------------------------------------------------------------
def _directions(model, direction_seed: int) -> dict[str, torch.Tensor]:
    """This rank's slice of one fixed full direction per factor, scaled to the factor's norm.

    The full direction is drawn from a private generator in a fixed order, so it is the same at
    every TP size; the sharded factor's slice is cut by Megatron's rule.
    """
    g = torch.Generator().manual_seed(direction_seed)
    t, rank = dist.get_world_size(tp_group()), dist.get_rank(tp_group())
    fulls = factor_tensors(model)
    out = {}
    for name, m in lora_layers(model):
        which, dim, stride = sharded_factor(m)
        for f in ("A", "B"):
            key = f"{name}.{f}"
            v = torch.randn(fulls[key].shape, generator=g)
            v *= fulls[key].norm() / v.norm()
            out[key] = slice_by_rule(v, dim, stride, t, rank) if f == which else v
    return out


def _params_by_key(model) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, m in lora_layers(model):
        out[f"{name}.A"], out[f"{name}.B"] = m.lora_A["default"].weight, m.lora_B["default"].weight
    return out


def finite_difference(model, names: list[str] | None, *, seed: int = SEED + 7, eps: float = FD_EPS,
                      directions: int = FD_DIRECTIONS) -> dict:
    """Autograd vs finite differences of the model's loss along fixed random directions of the factors.

    ``names``: the factors to move (None: every factor). The 4-point central stencil (error
    O(eps^4)) at eps = 1e-2 of each factor's norm keeps truncation and the fp32 rounding of the
    loss near 1e-4; 2-point differences could not get below ~1e-3. One direction alone can be
    nearly orthogonal to the gradient, where the relative error of that one derivative is all
    rounding (measured up to 8e-3 at TP=1 over 12 directions), so the error is taken over
    ``directions`` of them at once: ``|a - n| / |n|`` of the vectors of derivatives. Megatron's
    RNG is re-seeded before each evaluation, so every one uses the same dropout masks.

    Returns:
        ``dict(analytic=[...], numeric=[...], rel_err=float)``.
    """
    params = _params_by_key(model)
    keys = [k for k in params if names is None or k in names]
    group = tp_group()
    for p in params.values():
        p.grad = None
    seed_rng(seed)
    lm_loss(model).backward()
    sum_sp_grads(model)
    grads = {k: params[k].grad.double() for k in keys}
    sharded = {f"{name}.{sharded_factor(m)[0]}" for name, m in lora_layers(model)}
    original = {k: params[k].detach().clone() for k in keys}

    def loss_at(direction: dict, step: float) -> float:
        with torch.no_grad():
            for k, v in direction.items():
                params[k].copy_(original[k] + step * v)
            seed_rng(seed)
            value = float(lm_loss(model))
            for k in direction:
                params[k].copy_(original[k])
        return value

    analytic, numeric = [], []
    for d in range(directions):
        direction = {k: v for k, v in _directions(model, 99 + d).items() if k in keys}
        local = torch.zeros(2, dtype=torch.float64)  # [sharded part, replicated part]
        for k, v in direction.items():
            local[0 if k in sharded else 1] += (grads[k] * v.double()).sum()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(local[:1], group=group)  # a shard's dot product is one rank's part of the sum
        analytic.append(float(local.sum()))
        numeric.append((8 * (loss_at(direction, eps) - loss_at(direction, -eps))
                        - (loss_at(direction, 2 * eps) - loss_at(direction, -2 * eps))) / (12 * eps))
    for p in params.values():
        p.grad = None
    a, n = torch.tensor(analytic, dtype=torch.float64), torch.tensor(numeric, dtype=torch.float64)
    return dict(analytic=analytic, numeric=numeric, rel_err=rel_err(a, n, norm="l2"))


# -- tasks (run on every rank of a world) ------------------------------------------------------
def base_task() -> dict:
    """Base model only: full base weights (gathered by rule) and base losses, for every model/SP."""
    t = dist.get_world_size(tp_group())
    out = {}
    for gated in (False, True):
        for sp in ((False, True) if t > 1 else (False,)):
            model = build_gpt(sp=sp, gated=gated)
            seed_rng()
            loss = float(lm_loss(model))
            weights = {n: full_param(p, tp_group()) for n, p in model.named_parameters()} if not sp else None
            out[f"{'sp' if sp else 'nosp'}/{'gated' if gated else 'plain'}"] = dict(loss=loss, weights=weights)
    return out


def shim_task() -> dict:
    """Facts about the CPU shims that the suite relies on, measured on this rank."""
    rank = dist.get_rank(tp_group())

    def first_draws(seed: int, n: int = 2) -> list[float]:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, generator=g).tolist()

    seed_rng()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    out = dict(tracker=type(tracker).__name__, initialized=tracker.is_initialized(),
               names=sorted(tracker.get_states()), device=str(torch.cuda.current_device()))
    # megatron's seeds; expert rank 0 and expert-TP rank = TP rank (expert TP defaults to TP)
    expected = {"data-parallel-rng": SEED, "model-parallel-rng": SEED + 2718 + rank,
                "expert-parallel-rng": SEED + 1024 + 100 * 0 + rank}
    out["states_match_seeds"] = {n: torch.equal(tracker.get_states()[n], torch.Generator().manual_seed(s).get_state())
                                 for n, s in expected.items()}
    out["default_is_seed"] = torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(SEED).get_state())
    outside = torch.get_rng_state()
    with tracker.fork():
        mp_first = torch.rand(1).item()
        with tracker.fork("data-parallel-rng"):
            dp_first = torch.rand(1).item()
        mp_second = torch.rand(1).item()
    out["fork_draws"] = dict(mp=[mp_first, mp_second], dp=dp_first, expected_mp=first_draws(SEED + 2718 + rank),
                             expected_dp=first_draws(SEED)[0])
    out["default_untouched_by_fork"] = torch.equal(outside, torch.get_rng_state())

    # CheckpointFunction: the recompute must see the forward's generator (a dropout mask here).
    x = torch.randn(64, 8, requires_grad=True)
    with tracker.fork():
        y = tensor_parallel.checkpoint(lambda v: torch.nn.functional.dropout(v, 0.5), False, x)
    y.sum().backward()
    out["recompute_mask_matches"] = torch.equal(x.grad != 0, y.detach() != 0)

    if dist.get_world_size(tp_group()) > 1:
        marks = {n: getattr(p, "sequence_parallel", False) for n, p in build_gpt(sp=True).named_parameters()
                 if "layernorm" in n}
        out["sp_norm_marks"] = marks
    return out


def train_task(case: dict) -> dict:
    """Train one configuration for ``case.steps`` SGD steps; gradients, factors, FD, layout."""
    case = Case(**case)
    model = adapt(build_gpt(sp=case.sp, gated=case.gated, recompute=case.recompute, bias=case.bias), case)
    # The factors only: what trains is then the same whatever apply_lora leaves trainable (tested apart).
    params = list(_params_by_key(model).values())
    opt = torch.optim.SGD(params, lr=LR)
    out = dict(init=factor_tensors(model), layout=layout_report(model), losses=[],
               trainable=sum(p.requires_grad for p in model.parameters()))
    model.train()
    train_steps(model, opt, case.steps, out)
    out["final"] = factor_tensors(model)
    out["backends"] = sorted({str(m.last_backend) for _, m in lora_layers(model)})
    if case.fd:
        out["fd_all"] = finite_difference(model, None)
        out["fd_one"] = finite_difference(model, [FD_FACTOR])
    return out


# -- checkpoints: saved at one TP size, loaded at others -------------------------------------
CKPT_CASE = Case(gated=True)


def full_logits(model) -> torch.Tensor:
    """Eval-mode logits ``[b, s, V]`` on the fixed batch, gathered over the vocabulary."""
    data = {k: v for k, v in batch().items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        out = model(**data, runtime_gather_output=True)
    model.train()
    return out


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter as a full tensor (own TP attributes), names as in the unwrapped model."""
    return {n.replace(".base_layer", ""): full_param(p, tp_group()) for n, p in model.named_parameters()
            if ".lora_" not in n}


def _model_state(model) -> dict:
    return dict(logits=full_logits(model), factors=factor_tensors(model), base=base_weights(model))


def save_task(path: str) -> dict:
    """Train the gated model's adapter one step, then save it with save_adapter and with dist_checkpointing."""
    model = adapt(build_gpt(gated=True), CKPT_CASE)
    seed_rng()
    lm_loss(model).backward()
    with torch.no_grad():  # the factors only: the base stays the one every TP size builds
        for p in _params_by_key(model).values():
            p.sub_(p.grad, alpha=LR)
    tplora_kernels.save_adapter(model, os.path.join(path, "peft"))
    os.makedirs(os.path.join(path, "dist"), exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(path, "dist"))
    dist.barrier()
    return _model_state(model)


def load_task(path: str, sp: bool) -> dict:
    """Load what ``save_task`` wrote into fresh models whose adapters (and, for dist, base) differ."""
    out = {}
    model = adapt(build_gpt(gated=True, sp=sp), CKPT_CASE, lora_seed=SEED + 11)
    out["peft_before"] = factor_tensors(model)
    tplora_kernels.load_adapter(model, os.path.join(path, "peft"))
    out["peft"] = _model_state(model)
    model = adapt(build_gpt(gated=True, sp=sp, seed=SEED + 21), CKPT_CASE, lora_seed=SEED + 22)
    out["dist_before"] = _model_state(model)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(path, "dist"))
    model.load_state_dict(loaded)
    out["dist"] = _model_state(model)
    return out


# -- apply_lora contract -----------------------------------------------------------------------
def _snapshot(model) -> dict:
    return dict(types={n: type(m).__name__ for n, m in model.named_modules()},
                keys=sorted(model.state_dict()),
                requires_grad={n: p.requires_grad for n, p in model.named_parameters()})


def all_or_nothing_task() -> dict:
    """apply_lora with one bad per-module value: the error, and whether the model changed."""
    out = {}
    bad = {"rank_pattern": dict(rank_pattern={"linear_fc2": 0}),
           "alpha_pattern": dict(alpha_pattern={"linear_proj": float("nan")})}
    for what, kw in bad.items():
        model = build_gpt()
        before = _snapshot(model)
        try:
            tplora_kernels.apply_lora(model, lora_config(Case(), **kw))
            error = None
        except (ValueError, TypeError) as e:
            error = f"{type(e).__name__}: {e}"
        out[what] = dict(error=error, before=before, after=_snapshot(model))
    return out


def tied_task(sp: bool = False) -> dict:
    """GPTModel with a tied output layer, every parallel linear targeted; trains if wrapped."""
    model = build_gpt(tied=True, sp=sp)
    seed_rng()
    base_loss = float(lm_loss(model))
    torch.manual_seed(SEED + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = tplora_kernels.apply_lora(model, lora_config(Case(dropout=0.1), target_modules=None))
    out = dict(names=names, warnings=[str(w.message) for w in caught],
               output_layer=type(model.output_layer).__name__, losses=[], base_loss=base_loss)
    for _, m in lora_layers(model):  # adapters off: the tied weight must still be the embedding's
        m.enable_adapters(False)
    seed_rng()
    out["disabled_loss"] = float(lm_loss(model))
    for _, m in lora_layers(model):
        m.enable_adapters(True)
    # lr/5: the output layer's adapter acts on the logits directly; at lr 0.5 the third loss rose above the first.
    opt = torch.optim.SGD(list(_params_by_key(model).values()), lr=LR / 5)
    train_steps(model, opt, STEPS, out)
    return out


def freeze_task() -> dict:
    """requires_grad of every parameter after apply_lora, by default and with freeze=False."""
    model = build_gpt()
    tplora_kernels.apply_lora(model, lora_config(Case()))
    default = {n: p.requires_grad for n, p in model.named_parameters()}
    model = build_gpt()
    model.embedding.word_embeddings.weight.requires_grad_(False)  # a flag freeze=False must keep
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapped = tplora_kernels.apply_lora(model, lora_config(Case()), freeze=False)
    kept = {n: p.requires_grad for n, p in model.named_parameters()}
    return dict(default=default, before=before, kept=kept, wrapped=wrapped)


def state_dict_task() -> dict:
    """A plain state_dict of the un-adapted base model, loaded into an adapted model of other weights."""
    base_sd = build_gpt(gated=True).state_dict()
    model = build_gpt(gated=True, seed=SEED + 5)
    tplora_kernels.apply_lora(model, lora_config(Case(gated=True)))
    result = model.load_state_dict(base_sd, strict=False)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    diffs = {k: float((v - base_sd[k.replace(".base_layer", "")]).abs().max()) for k, v in tensors.items()
             if ".lora_" not in k and k.replace(".base_layer", "") in base_sd}
    return dict(missing=sorted(result.missing_keys), unexpected=sorted(result.unexpected_keys),
                lora_keys=sorted(k for k in model.state_dict() if ".lora_" in k), diffs=diffs,
                base_tensor_keys=sorted(k for k, v in base_sd.items() if isinstance(v, torch.Tensor)),
                compared=sorted(k.replace(".base_layer", "") for k in diffs))


def backward_dw_task() -> dict:
    """Megatron's MLP.backward_dw() on adapted layers after a backward: runs, changes nothing."""
    model = adapt(build_gpt(gated=True), Case(gated=True, dropout=0.1))
    seed_rng()
    lm_loss(model).backward()
    before = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    error = None
    try:
        for layer in model.decoder.layers:
            layer.mlp.backward_dw()
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    changed = []
    for n, p in model.named_parameters():
        value, grad = before[n]
        same_grad = (grad is None and p.grad is None) or (
            grad is not None and p.grad is not None and torch.equal(grad, p.grad))
        if not torch.equal(value, p.detach()) or not same_grad:
            changed.append(n)
    return dict(error=error, changed=changed, lora_grads=sum(1 for n, (_, g) in before.items()
                                                              if ".lora_" in n and g is not None))


# -- worlds ------------------------------------------------------------------------------------
PG_TIMEOUT_S = 120


def _task_fn(name: str):
    """A task by name: a function of this module, or ``"package.module:function"`` elsewhere."""
    if ":" not in name:
        return globals()[name]
    module, _, fn = name.partition(":")
    return getattr(importlib.import_module(module), fn)


def _run_tasks(rank: int, tasks: list) -> dict:
    """One rank of a ``run_world`` world: megatron's parallel state at TP = world, then every task in order."""
    results: dict = {}
    with megatron_on_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_state.initialize_model_parallel(dist.get_world_size())
        for label, fn_name, kwargs in tasks:
            start = time.monotonic()
            launch.note(label)  # names the task a hang is in
            try:
                results[label] = _task_fn(fn_name)(**kwargs)
            except Exception as e:
                results[label] = TaskError(rank, f"{label}: {type(e).__name__}: {e}", traceback.format_exc())
            results.setdefault("_seconds", {})[label] = time.monotonic() - start
        parallel_state.destroy_model_parallel()
    return results


def run_world(t: int, tasks: list[tuple[str, str, dict]], out_dir: str, timeout: float = 240.0,
              pg_timeout_s: float = PG_TIMEOUT_S) -> list[dict]:
    """Spawn ``t`` gloo ranks with TP = t, run ``tasks`` (label, function name, kwargs) on each.

    Returns one ``{label: result | TaskError}`` per rank. Every rank, and what it started, is gone
    once this returns or raises; a timeout names the task each rank had reached. ``pg_timeout_s``:
    how long a rank may wait in a collective (longer where some ranks idle while others work).
    """
    return launch.spawn_world(_run_tasks, t, args=(tasks,), timeout=timeout, pg_timeout_s=pg_timeout_s,
                              workdir=out_dir, name=f"TP={t} world")


def cases_for(t: int) -> list[Case]:
    """The main grid at TP = t: SP off/on (on only for t > 1) x plain/gated x dropout 0/0.1."""
    return [Case(sp=sp, gated=gated, dropout=p) for sp in ((False, True) if t > 1 else (False,))
            for gated in (False, True) for p in (0.0, 0.1)]


HARD = Case(sp=True, gated=True, dropout=0.1)


def extra_cases(t: int) -> list[Case]:
    """Recompute, PEFT and the kernels (interpreter): on TP=2, SP on, gated, dropout 0.1.

    Selective recompute of "mlp" runs on a model without linear biases, beside its own reference:
    megatron-core 0.16.1's ``CheckpointFunction`` returns fc2's bias Parameter itself (fc2 skips
    the bias add), and autograd then gives that leaf Parameter the checkpoint's grad_fn, so every
    later recompute chains into the earlier ones until the stack overflows (measured without
    LoRA too, on CPU; nothing of ours is involved).
    """
    if t != 2:
        return []
    fast = dict(fd=False)
    return [replace(HARD, recompute="full", **fast), replace(HARD, bias=False, **fast),
            replace(HARD, bias=False, recompute="selective", **fast), replace(HARD, via="peft", **fast),
            replace(HARD, backend=None, **fast)]


def train_tasks(cases: list[Case]) -> list[tuple[str, str, dict]]:
    return [(c.label, "train_task", dict(case=asdict(c))) for c in cases]


max_rel = max_rel_err  # the largest relative error over two dicts of tensors, and its key (suites call G.max_rel)


def report(worlds: dict[int, list[dict]]) -> str:
    """A table of every configuration against TP=1: loss drift per step, gradient/factor error, FD error."""
    ref = worlds[1][0]
    lines = [f"{'config':44s} {'loss drift per step':28s} {'grad0':>8s} {'final':>8s} {'FD all':>8s} {'FD fc1.B':>8s}"]
    for t in sorted(worlds):
        for label, got in worlds[t][0].items():
            if not isinstance(got, dict) or "losses" not in got or "grads0" not in got:
                if isinstance(got, TaskError):
                    lines.append(f"tp{t} {label}: {got.message}")
                continue
            case = Case(**_case_from_label(label))
            want = ref.get(case.reference().label)
            drift = " ".join(f"{abs(a - b) / abs(b):.1e}" for a, b in zip(got["losses"], want["losses"]))
            fd = [f"{got[k]['rel_err']:.1e}" if k in got else "-" for k in ("fd_all", "fd_one")]
            lines.append(f"{f'tp{t} {label}':44s} {drift:28s} {max_rel_err(got['grads0'], want['grads0'])[0]:8.1e} "
                         f"{max_rel_err(got['final'], want['final'])[0]:8.1e} {fd[0]:>8s} {fd[1]:>8s}")
    return "\n".join(lines)


def _case_from_label(label: str) -> dict:
    parts = label.split("/")
    return dict(sp=parts[0] == "sp", gated=parts[1] == "gated", dropout=float(parts[2][1:]))
