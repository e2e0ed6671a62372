"""A tiny megatron-core MoE ``GPTModel`` (``SequentialMLP`` experts) with LoRA on its experts, in gloo worlds.

Tasks run in a ``gpt.run_world`` world (``"tests.support.moe:<name>"``) and each names its
parallel layout ``Par(tp, etp, ep)``: attention TP, expert TP and expert parallelism. One world
of 2 ranks serves every layout: ``set_parallel`` rebuilds megatron's parallel state when a task
needs another one (the ranks left over are data-parallel replicas).

What the model relies on (megatron-core 0.16.1, CPU, gloo):

- the ``allgather`` token dispatcher, the only one that runs on CPU (``alltoall`` builds a
  ``torch.cuda.Stream`` in its constructor); it gathers the tokens of the TP x EP ranks into every
  expert and reduce-scatters the experts' partial outputs back, so experts at expert TP 2 (or
  spread over EP 2) see exactly the tokens of the model at TP 1;
- sequence parallelism whenever TP > 1: megatron's ``MoELayer`` refuses to train MoE with TP
  and without SP;
- one fixed micro-batch on every rank (``gpt.batch``), no auxiliary loss, no token drop.

Megatron initialises experts on CPU from one generator in module order, and under EP a rank
builds only its own experts, so base weights (and every draw after them) differ from EP=1's. An
EP comparison therefore first loads the EP=1 model's full tensors into the EP model by global
expert index (``load_full``). Expert TP needs no such help: its model is TP=1's (checked).

The oracle never asks the library how a tensor is laid out or which experts a rank holds: a
parameter is gathered with its *base weight's* ``partition_dim``/``partition_stride`` over the
expert-TP group for an expert (``.local_experts.`` in its name) and the TP group otherwise
(``gpt.gather_by_rule``), and local expert ``i`` of EP rank ``k`` is global expert ``k*n + i``
(megatron's ``SequentialMLP`` rule).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zlib
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from safetensors.torch import load_file, save_file

import tplora_kernels
from tplora_kernels.testing.numerics import max_rel_err, rel_err

from . import gpt as G

EXPERTS, TOPK = 4, 2
LAYERS, HIDDEN, FFN = 2, 32, 64
LORA_SEED = G.SEED + 1
FD_LAYER, FD_EXPERT = LAYERS - 1, 3  # the last layer (its routing does not move with its experts); EP rank 1's
_LOCAL = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class Par:
    """A parallel layout: attention TP, expert TP, expert parallelism (on a 2-rank world)."""

    tp: int = 1
    etp: int = 1
    ep: int = 1

    @property
    def label(self) -> str:
        return f"tp{self.tp}-etp{self.etp}-ep{self.ep}"


@dataclass(frozen=True)
class MoECase:
    """What one configuration trains. ``fixed_seeds``: each layer's dropout seed is fixed by its global name.

    The library draws a seed per call from the tracker's 'data-parallel-rng' state, so a rank's
    k-th LoRA call gets the k-th seed; under EP a rank calls only its own experts, so from the
    first expert on the seeds (and masks) differ from EP=1's, as megatron's own draws do. Fixed
    seeds by global name give the EP model EP=1's masks, which is what lets dropout be compared.
    """

    gated: bool = False
    dropout: float = 0.0
    fixed_seeds: bool = False
    backend: str | None = "torch"  # None: automatic (Triton's interpreter under the test session)

    def reference(self) -> MoECase:
        """The reference layout's configuration this one is compared with (the torch backend's)."""
        return replace(self, backend="torch")

    @property
    def label(self) -> str:
        return (f"{'gated' if self.gated else 'plain'}/p{self.dropout:g}" + ("/fixed-seeds" if self.fixed_seeds else "")
                + ("" if self.backend == "torch" else f"/backend={self.backend}"))


REF = Par()


# -- parallel state and groups ------------------------------------------------------------------
def set_parallel(par: Par) -> None:
    """Megatron's parallel state for ``par`` (rebuilt only when it changes), and its seeds."""
    now = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size(),
           ps.get_expert_model_parallel_world_size())
    if now != (par.tp, par.etp, par.ep):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(par.tp, expert_model_parallel_size=par.ep, expert_tensor_parallel_size=par.etp)
    G.seed_rng()


def is_expert(name: str) -> bool:
    return ".local_experts." in name


def group_of(name: str):
    """The group a parameter of module ``name`` is sharded over: expert TP for experts, else TP."""
    return ps.get_expert_tensor_parallel_group() if is_expert(name) else G.tp_group()


def _ep():
    return ps.get_expert_model_parallel_group()


def global_name(name: str) -> str:
    """``name`` with its local expert index made global (EP rank k holds experts k*n .. k*n + n-1)."""
    ep = _ep()
    n_local = EXPERTS // dist.get_world_size(ep)
    return _LOCAL.sub(lambda m: f".local_experts.{dist.get_rank(ep) * n_local + int(m.group(1))}.", name)


def with_all_experts(tensors: dict) -> dict:
    """``tensors`` (global names) completed with the experts every other EP rank holds."""
    ep = _ep()
    if dist.get_world_size(ep) == 1:
        return tensors
    parts = [None] * dist.get_world_size(ep)
    dist.all_gather_object(parts, {k: v for k, v in tensors.items() if is_expert(k)}, group=ep)
    out = dict(tensors)
    for part in parts:
        out.update(part)
    return out


# -- model ----------------------------------------------------------------------------------------
def build_moe(*, gated: bool = False, seed: int = G.SEED):
    """GPTModel (local spec, fp32) with 4 SequentialMLP experts, top-2, at the current parallel state."""
    t = ps.get_tensor_model_parallel_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=G.HEADS, ffn_hidden_size=FFN,
            num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=FFN, moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
            tensor_model_parallel_size=t, sequence_parallel=t > 1, use_cpu_initialization=True,
            params_dtype=torch.float32, attention_dropout=0.0, hidden_dropout=0.0, gated_linear_unit=gated,
            activation_func=torch.nn.functional.silu if gated else torch.nn.functional.gelu,
            bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
            bias_dropout_fusion=False, apply_rope_fusion=False, init_method_std=G.INIT_STD, add_bias_linear=False)
        torch.manual_seed(seed)
        spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
        return GPTModel(config, spec, vocab_size=G.VOCAB, max_sequence_length=G.SEQ)


def adapt(model, case: MoECase, *, lora_seed: int = LORA_SEED):
    """LoRA (random A and B) on attention and on every expert's linear_fc1/linear_fc2."""
    torch.manual_seed(lora_seed)
    tplora_kernels.apply_lora(model, G.lora_config(G.Case(dropout=case.dropout, backend=case.backend)))
    if case.fixed_seeds:
        for name, m in G.lora_layers(model):
            m.seed = zlib.crc32(global_name(name).encode())
    return model


# -- full tensors, by the oracle's rule -----------------------------------------------------------
def _split(p: torch.Tensor) -> tuple[int, int] | None:
    """(dim, stride) of a TP-sharded megatron parameter, None when replicated."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    return p.partition_dim, getattr(p, "partition_stride", 1)


def _factor_splits(m) -> dict[str, tuple[int, int] | None]:
    """{"A"/"B": split}: the factor on the base weight's sharded side takes the base weight's split."""
    which, dim, stride = G.sharded_factor(m)
    return {f: (dim, stride) if f == which else None for f in ("A", "B")}


def _factors(model) -> list[tuple[str, str, torch.nn.Parameter, tuple[int, int] | None, object]]:
    """(global key "<layer>.A|B", local layer name, parameter, split, group) of every factor."""
    out = []
    for name, m in G.lora_layers(model):
        splits = _factor_splits(m)
        for f, holder in (("A", m.lora_A["default"]), ("B", m.lora_B["default"])):
            out.append((f"{global_name(name)}.{f}", name, holder.weight, splits[f], group_of(name)))
    return out


def _gather(x: torch.Tensor, split, group, what: str) -> torch.Tensor:
    """The full tensor of a shard; a replicated one must be the same on every rank of its group."""
    if split is not None:
        return G.gather_by_rule(x, split[0], split[1], group)
    if dist.get_world_size(group) > 1:
        copies = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(copies, x.detach().contiguous(), group=group)
        spread = max(float((c - copies[0]).abs().max()) for c in copies)
        if spread:
            raise AssertionError(f"{what}: replicated over its group, yet its copies differ by up to {spread:.2e}")
    return x.detach().clone()


def factors_full(model, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """Every LoRA factor (or its gradient) as a full tensor, keyed by global layer name + ".A"/".B"."""
    out = {}
    for key, _, p, split, group in _factors(model):
        x = p.grad if grad else p
        if x is None:
            raise AssertionError(f"{key}: no gradient after backward")
        out[key] = _gather(x, split, group, f"{key}{' gradient' if grad else ''}")
    return with_all_experts(out)


def base_full(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter as a full tensor, names as in the un-adapted model, experts global."""
    out = {}
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            name = n.replace(".base_layer", "")
            out[global_name(name)] = _gather(p, _split(p), group_of(name), name)
    return with_all_experts(out)


def load_full(model, base: dict | None, factors: dict | None) -> None:
    """Give ``model`` the full base weights and/or factors of another layout, sliced by the oracle's rule."""
    def put(p, full, split, group):
        if split is not None:
            full = G.slice_by_rule(full, split[0], split[1], dist.get_world_size(group), dist.get_rank(group))
        p.copy_(full)

    with torch.no_grad():
        if base is not None:
            for n, p in model.named_parameters():
                if ".lora_" not in n:
                    name = n.replace(".base_layer", "")
                    put(p, base[global_name(name)], _split(p), group_of(name))
        if factors is not None:
            for key, _, p, split, group in _factors(model):
                put(p, factors[key], split, group)


def factor_flags(model) -> dict[str, dict]:
    """Megatron's DDP attributes of every factor and of its base weight."""
    out = {}
    for key, name, p, _, _ in _factors(model):
        base = dict(G.lora_layers(model))[name].base_layer.weight
        out[key] = dict(allreduce=getattr(p, "allreduce", None), base_allreduce=getattr(base, "allreduce", None),
                        sequence_parallel=getattr(p, "sequence_parallel", False))
    return out


# -- finite differences of one expert's factors -----------------------------------------------------
FD_SETS = {  # which of expert FD_EXPERT's factors move together (layer FD_LAYER)
    "fd_expert": ("linear_fc1.A", "linear_fc1.B", "linear_fc2.A", "linear_fc2.B"),
    "fd_fc1_B": ("linear_fc1.B",),  # column-sharded over expert TP; stride 2 when gated
    "fd_fc2_A": ("linear_fc2.A",),  # row-sharded over expert TP
}


def expert_fd(model, *, seed: int = G.SEED + 7, eps: float = G.FD_EPS,
              directions: int = G.FD_DIRECTIONS) -> dict[str, dict | None]:
    """Autograd vs a 4-point finite difference of the model's loss, moving factors of expert ``FD_EXPERT``.

    For each of ``FD_SETS``: the ranks that hold the expert (its expert-TP group) move their
    slices of one fixed full direction per factor (a private generator, scaled to the factor's
    norm); every rank evaluates the loss (the dispatcher's collectives need them all). The
    directional derivative is the sum of the holders' parts of a sharded factor, and a replicated
    factor's counted once. ``gpt.finite_difference`` explains the stencil, eps and the error
    taken over several directions.

    Returns:
        ``{set: dict(keys, analytic, numeric, rel_err)}`` on the expert's holders, ``{set: None}`` elsewhere.
    """
    prefix = f"decoder.layers.{FD_LAYER}.mlp.experts.local_experts.{FD_EXPERT}."
    params = [p for _, _, p, _, _ in _factors(model)]
    for p in params:
        p.grad = None
    G.seed_rng(seed)
    G.lm_loss(model).backward()
    G.sum_sp_grads(model)
    out = {}
    for set_name, suffixes in FD_SETS.items():
        mine = [(key, p, split, group) for key, _, p, split, group in _factors(model)
                if key in {prefix + s for s in suffixes}]
        out[set_name] = _fd_along(model, mine, seed, eps, directions)
    for p in params:
        p.grad = None
    return out


def _fd_along(model, mine: list, seed: int, eps: float, directions: int) -> dict | None:
    grads = [p.grad.double() for _, p, _, _ in mine]
    original = [p.detach().clone() for _, p, _, _ in mine]
    fulls = [_gather(p, split, group, key) for key, p, split, group in mine]

    def loss_at(direction: list, step: float) -> float:
        with torch.no_grad():
            for (_, p, _, _), o, v in zip(mine, original, direction):
                p.copy_(o + step * v)
            G.seed_rng(seed)
            value = float(G.lm_loss(model))
            for (_, p, _, _), o in zip(mine, original):
                p.copy_(o)
        return value

    analytic, numeric = [], []
    for d in range(directions):
        g = torch.Generator().manual_seed(99 + d)
        direction, part = [], torch.zeros((), dtype=torch.float64)
        for (_, _, split, group), full, grad in zip(mine, fulls, grads):
            v = torch.randn(full.shape, generator=g)
            v *= full.norm() / v.norm()
            if split is not None:
                v = G.slice_by_rule(v, split[0], split[1], dist.get_world_size(group), dist.get_rank(group))
            direction.append(v)
            if split is not None or dist.get_rank(group) == 0:
                part += (grad * v.double()).sum()
        if mine and dist.get_world_size(mine[0][3]) > 1:
            dist.all_reduce(part, group=mine[0][3])
        analytic.append(float(part))
        numeric.append((8 * (loss_at(direction, eps) - loss_at(direction, -eps))
                        - (loss_at(direction, 2 * eps) - loss_at(direction, -2 * eps))) / (12 * eps))
    if not mine:
        return None
    a, n = torch.tensor(analytic, dtype=torch.float64), torch.tensor(numeric, dtype=torch.float64)
    return dict(keys=[k for k, _, _, _ in mine], analytic=analytic, numeric=numeric,
                rel_err=rel_err(a, n, norm="l2"))


# -- tasks ----------------------------------------------------------------------------------------------
def _ref_path(root: str, gated: bool) -> str:
    return os.path.join(root, f"ref_{'gated' if gated else 'plain'}.pt")


def _save_rank0(obj, path: str) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)
    dist.barrier()


def train_task(par: dict, case: dict, root: str, load: bool = False, steps: int = G.STEPS, fd: bool = True) -> dict:
    """Train one configuration ``steps`` SGD steps on its factors; losses, gradients, factors, FD.

    At the reference layout the full base weights and initial factors are written to ``root``;
    ``load`` gives this model those (EP comparisons) before training.
    """
    par, case = Par(**par), MoECase(**case)
    set_parallel(par)
    model = adapt(build_moe(gated=case.gated), case)
    if load:
        ref = torch.load(_ref_path(root, case.gated), weights_only=False)
        load_full(model, ref["base"], ref["init"])
    out = dict(base=base_full(model), init=factors_full(model), flags=factor_flags(model), losses=[])
    if par == REF:
        _save_rank0(dict(base=out["base"], init=out["init"]), _ref_path(root, case.gated))
    opt = torch.optim.SGD([p for _, _, p, _, _ in _factors(model)], lr=G.LR)
    model.train()
    G.seed_rng()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = G.lm_loss(model)
        loss.backward()
        G.sum_sp_grads(model)
        if step == 0:
            out["grads0"] = factors_full(model, grad=True)
        opt.step()
        out["losses"].append(float(loss))
    out["final"] = factors_full(model)
    out["backends"] = sorted({str(m.last_backend) for _, m in G.lora_layers(model)})
    if fd:
        out.update(expert_fd(model))
    return out


# -- checkpoints: saved at one layout, loaded at another ---------------------------------------------
CKPT_CASE = MoECase(gated=True)  # gated: an expert fc1's lora_B needs the SwiGLU layout


def _state(model) -> dict:
    return dict(logits=G.full_logits(model), factors=factors_full(model), base=base_full(model))


def check_sharding(model) -> None:
    """megatron's sharding validation of ``model.sharded_state_dict()``, its verdict raised on every rank.

    megatron validates on global rank 0 alone: a bad sharding raises there while the other ranks
    go on into the save's next collective and wait for the process group to time out, which
    leaves the world's later tasks out of step. Here every rank learns the verdict.
    """
    error = None
    try:
        save_preprocess(model.sharded_state_dict(), validate_access_integrity=True)
    except Exception as e:  # raised on every rank below
        error = f"{type(e).__name__}: {e}"
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, error)
    bad = [f"rank {r}: {v[:1500]}" for r, v in enumerate(verdicts) if v]
    if bad:
        raise AssertionError("megatron's sharding validation failed: " + "; ".join(bad))


def ckpt_save_task(par: dict, path: str) -> dict:
    """Train the gated adapter one step, then write it with save_adapter and dist_checkpointing.

    Also writes ``state.pt`` (rank 0): the saver's logits and full tensors by the oracle's rule,
    which the loaders compare with and take their base weights from.
    """
    set_parallel(Par(**par))
    model = adapt(build_moe(gated=True), CKPT_CASE)
    G.lm_loss(model).backward()
    G.sum_sp_grads(model)
    with torch.no_grad():
        for _, _, p, _, _ in _factors(model):
            p.sub_(p.grad, alpha=G.LR)
    written = tplora_kernels.save_adapter(model, os.path.join(path, "peft"))
    os.makedirs(os.path.join(path, "dist"), exist_ok=True)
    check_sharding(model)
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(path, "dist"))
    state = _state(model)
    _save_rank0(state, os.path.join(path, "state.pt"))
    return dict(state=state, returned_keys=sorted(written))


def ckpt_load_task(par: dict, path: str) -> dict:
    """Load what ``ckpt_save_task`` wrote into fresh models at ``par`` whose adapters (and bases) differ.

    save_adapter's file holds no base weights: that model first gets the saver's base (its full
    tensors, by the oracle's rule). dist_checkpointing's holds both.
    """
    set_parallel(Par(**par))
    saved = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    out = {}
    model = adapt(build_moe(gated=True), CKPT_CASE, lora_seed=LORA_SEED + 10)
    load_full(model, saved["base"], None)
    out["peft_before"] = _state(model)
    tplora_kernels.load_adapter(model, os.path.join(path, "peft"))
    out["peft"] = _state(model)
    for _, m in G.lora_layers(model):
        m.merge()
    out["merged_logits"] = G.full_logits(model)
    model = adapt(build_moe(gated=True, seed=G.SEED + 20), CKPT_CASE, lora_seed=LORA_SEED + 21)
    out["dist_before"] = _state(model)
    check_sharding(model)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(path, "dist"))
    model.load_state_dict(loaded)
    out["dist"] = _state(model)
    dist.barrier()
    return out


def missing_expert_task(par: dict, path: str, drop_expert: int) -> dict:
    """load_adapter at ``par`` from a copy of ``path``'s adapter without global expert ``drop_expert``.

    Every rank must refuse it alike, also the EP ranks that do not hold that expert.
    """
    set_parallel(Par(**par))
    src, dst = os.path.join(path, "peft"), os.path.join(path, f"peft_without_expert{drop_expert}")
    if dist.get_rank() == 0:
        shutil.copytree(src, dst, dirs_exist_ok=True)
        file = os.path.join(dst, "adapter_model.safetensors")
        tensors = load_file(file)
        save_file({k: v for k, v in tensors.items() if f".local_experts.{drop_expert}." not in k}, file)
    dist.barrier()
    model = adapt(build_moe(gated=True), CKPT_CASE, lora_seed=LORA_SEED + 30)
    try:
        tplora_kernels.load_adapter(model, dst)
    except ValueError as e:
        return dict(error=str(e))
    return dict(error=None)


# -- the world's tasks, and a report of its numbers ------------------------------------------------
CASES = [MoECase(gated=g, dropout=p) for g in (False, True) for p in (0.0, 0.1)]
FIXED = [MoECase(gated=g, dropout=0.1, fixed_seeds=True) for g in (False, True)]
ETP2, EP2 = Par(tp=2, etp=2), Par(tp=2, ep=2)
KERNELS = MoECase(gated=True, dropout=0.1, backend=None)  # at ETP2, against the torch backend's reference
# TP 1 beside expert TP 2 / EP 2: the dispatcher gathers both data-parallel replicas' tokens into each expert.
DP_PARS = (Par(etp=2), Par(ep=2))
DP_CASES = [MoECase(gated=g) for g in (False, True)]
CKPT_PARS = (REF, ETP2, EP2)


def train_label(par: Par, case: MoECase) -> str:
    return f"train/{par.label}/{case.label}"


def train_tasks(pars: list[Par], cases: list[MoECase], root: str, **kw) -> list[tuple[str, str, dict]]:
    return [(train_label(p, c), "tests.support.moe:train_task", dict(par=asdict(p), case=asdict(c), root=root, **kw))
            for p in pars for c in cases]


def ckpt_dir(root: str, par: Par) -> str:
    return os.path.join(root, "ckpt", par.label)


def world_tasks(root: str) -> list[tuple[str, str, dict]]:
    """Every task of the suite's one 2-rank world, grouped by layout (a layout change rebuilds the groups)."""
    tasks = train_tasks([REF], CASES + FIXED, root)  # first: writes the reference tensors the EP tasks load
    tasks += train_tasks([ETP2], CASES, root)
    tasks += train_tasks([ETP2], [KERNELS], root, fd=False)
    tasks += train_tasks([EP2], CASES + FIXED, root, load=True)
    tasks += train_tasks(DP_PARS[:1], DP_CASES, root, steps=1, fd=False)
    tasks += train_tasks(DP_PARS[1:], DP_CASES, root, load=True, steps=1, fd=False)
    tasks += [(f"save/{p.label}", "tests.support.moe:ckpt_save_task", dict(par=asdict(p), path=ckpt_dir(root, p)))
              for p in CKPT_PARS]
    tasks += [(f"load/{s.label}/{q.label}", "tests.support.moe:ckpt_load_task",
               dict(par=asdict(q), path=ckpt_dir(root, s))) for q in reversed(CKPT_PARS) for s in CKPT_PARS if s != q]
    tasks += [(f"missing_expert/{EP2.label}", "tests.support.moe:missing_expert_task",
               dict(par=asdict(EP2), path=ckpt_dir(root, REF), drop_expert=3))]
    return tasks


def fd_result(ranks: list[dict], label: str, which: str) -> dict | None:
    """The FD result of ``label`` from a rank that holds the FD expert."""
    return next((r[label][which] for r in ranks if isinstance(r.get(label), dict) and r[label].get(which)), None)


def report(ranks: list[dict]) -> str:
    """Per configuration: loss drift per step vs TP=1, step-0 gradient and trained factor error, FD errors."""
    r0 = ranks[0]
    head = f"{'config':40s} {'loss drift per step':28s} {'grad0':>8s} {'final':>8s} " + \
        " ".join(f"{k:>9s}" for k in FD_SETS)
    lines = [head]
    for label, got in r0.items():
        if not label.startswith("train/"):
            continue
        if isinstance(got, G.TaskError):
            lines.append(f"{label}: {got.message}")
            continue
        want = r0.get(f"train/{REF.label}/{label.split('/', 2)[2].split('/backend=')[0]}")
        drift = " ".join(f"{abs(a - b) / abs(b):.1e}" for a, b in zip(got["losses"], want["losses"]))
        fds = [fd_result(ranks, label, k) for k in FD_SETS]
        lines.append(f"{label[6:]:40s} {drift:28s} {max_rel_err(got['grads0'], want['grads0'])[0]:8.1e} "
                     f"{max_rel_err(got['final'], want['final'])[0]:8.1e} "
                     + " ".join(f"{f['rel_err']:9.1e}" if f else f"{'-':>9s}" for f in fds))
    return "\n".join(lines)
