"""Megatron's DistributedDataParallel, its distributed optimizer and torch FSDP2 around LoRA, on CPU ranks.

The tasks run in one spawned world of 4 gloo ranks (``gpt.run_world``); each re-initialises
megatron's ``parallel_state`` for the layout it needs (TP2×DP2, TP4×DP1 or TP1×DP4) and trains
``gpt.build_gpt``'s model with ``gpt.adapt``'s adapter the way Megatron's training loop does:
``zero_grad_buffer``/``zero_grad``, forward, backward, ``finalize_model_grads``, ``step``. Every
data-parallel rank takes its contiguous slice of one fixed global batch (``global_batch``), so
the DP-mean loss is the loss of a single device fed the whole batch, which ``reference_task``
computes at TP1 with plain torch (no DDP, no megatron optimizer).

What a run records per step is what the forward of that step used: the DP-mean loss and the
largest difference between the data-parallel replicas of the LoRA factors (read right after the
forward, when Megatron's ``overlap_param_gather`` has had its chance to gather them).

CPU shims (``megatron_optimizer_on_cpu``, entered only around optimizer calls, on top of
``megatron_shims.megatron_on_cpu``). Each keeps megatron-core 0.16.1's GPU behaviour where its
optimizer code names CUDA, or assumes TE's/apex's FusedAdam, which a CPU build has neither of:

- ``device="cuda"`` (any factory call) -> the CPU: ``MixedPrecisionOptimizer`` allocates its
  ``_dummy_overflow_buf``/``_scale_one``/``found_inf`` on "cuda", meaning the device the model
  runs on; here that is the CPU.
- ``Tensor.type()`` of a CPU tensor -> its CUDA name (``torch.FloatTensor`` ->
  ``torch.cuda.FloatTensor``): ``DistributedOptimizer`` and ``Float16OptimizerWithFloat16Params``
  sort parameters by that string and refuse any other (``TypeError``); the dtype part, which is
  what they sort on, is unchanged.
- ``Tensor.cuda()`` -> the tensor itself: the ``fully_reshardable`` checkpoint format moves its
  all-gather buffers to "the device" with it; here that is where they already are.
- Adam's step count on checkpoint load. Without TE/apex megatron falls back to torch's AdamW,
  which keeps a ``step`` tensor in each parameter's state, where FusedAdam keeps it in the param
  group. ``DistributedOptimizer.load_state_dict`` sets it from the checkpoint's param groups,
  but as one tensor object shared by every parameter (AdamW then advances it once per parameter
  per step: measured, the resumed loss drifted 1e-3), and ``_set_main_param_and_optimizer_states``
  then copies every state key from the checkpoint's parameter state, which has no ``step``
  (``fully_reshardable``: ``KeyError: 'step'``) or the fresh optimizer's (``dp_reshardable``).
  The shim leaves ``step`` out of that copy and gives each parameter its own copy of the loaded
  value: FusedAdam's behaviour, one count per step.

Two more things the resume does, by megatron's own means: a fresh optimizer gets its state from
``_init_optimizer_states_with_dummy_values`` (a zero-gradient step that moves no parameter;
``DistributedOptimizer.state_dict`` asserts that torch's AdamW has a step count), and the load
runs under ``torch.no_grad``: with fp32 parameters the distributed optimizer's main parameters
are views of them, and ``dp_reshardable`` copies into those views outside ``no_grad``.

One shim for ``dist_checkpointing``'s writer (``synchronous_writer``): it takes its results
queue from a multiprocessing Manager started with "spawn", a fresh interpreter that re-imports
the test's main module (seconds per rank on 2 cores) and outlives the save. A synchronous save
(``async_sharded_save=False``, the default used here) puts into that queue and reads it back in
the saving process itself, so an in-process queue carries the same results; the writer still
forks its worker processes, which it joins.

Nothing else changes: collectives, bucketing, sharding and the optimizer math are megatron's.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from . import gpt as G

GLOBAL_BATCH = 4  # samples; DP ranks take contiguous slices (DP 1, 2 and 4 all divide it)
STEPS = 3  # optimizer steps per run; STEPS + 1 forwards (the last one checks the last update)
LR_ADAM = 1e-2
LR_SGD = 0.1
SGD_MOMENTUM = 0.9  # megatron's default
BUCKET = 2000  # DDP bucket size in elements: the TP2 adapter (~10k local elements) gets 5 buckets
SAVE_AFTER = 2  # the checkpointing run saves after this many steps; the resumed runs go on from there
MIXED_NAMES = ("code", "default", "__base__", "code")  # one adapter per global sample
FORMATS = ("fully_reshardable", "dp_reshardable")


# -- the CPU shims ------------------------------------------------------------------------------
def _cpu_device(device):
    if isinstance(device, (str, int, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaMeansTheCpu(TorchFunctionMode):
    """megatron's optimizers' explicit CUDA, read as the device the model runs on (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu_device(kwargs["device"])}
        return func(*args, **kwargs)


def _set_states_but_step(original):
    """``_set_main_param_and_optimizer_states`` without ``step``, each parameter keeping its own (module docstring)."""

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, {k: v for k, v in tensors.items() if k != "step"})
        finally:
            if step is not None:
                state["step"] = step.detach().clone()

    return set_states


@contextlib.contextmanager
def megatron_optimizer_on_cpu():
    """The shim of the module docstring, for the block (optimizer construction, steps, checkpoints)."""
    from unittest import mock

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    with _CudaMeansTheCpu(), mock.patch.object(DistributedOptimizer, "_set_main_param_and_optimizer_states",
                                               _set_states_but_step(original)):
        yield


@contextlib.contextmanager
def synchronous_writer():
    """dist_checkpointing's results queue in this process, for synchronous saves (module docstring)."""
    import queue
    from unittest import mock

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with mock.patch.object(filesystem_async, "_results_queue", queue.Queue()):
        yield


# -- runs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training configuration."""

    distributed_optimizer: bool = True
    overlap_param_gather: bool = False
    overlap_grad_reduce: bool = False
    optimizer: str = "adam"
    recompute: str | None = None
    bias: bool = True
    mixed: bool = False  # two adapters trained at once in mixed batches (MIXED_NAMES)
    merge: bool = False  # after the last step: merge (the first read of the new factors), unmerge
    save: str | None = None  # checkpoint root: save after SAVE_AFTER steps in every FORMATS

    @property
    def label(self) -> str:
        parts = ["distopt" if self.distributed_optimizer else "plain", self.optimizer]
        if self.overlap_param_gather:
            parts.append("overlap_param_gather")
        if self.overlap_grad_reduce:
            parts.append("overlap_grad_reduce")
        if self.recompute:
            parts.append(f"recompute={self.recompute}")
        if not self.bias:
            parts.append("nobias")
        if self.mixed:
            parts.append("mixed")
        if self.merge:
            parts.append("merge")
        if self.save:
            parts.append("ckpt")
        return "/".join(parts)

    @property
    def reference(self) -> str:
        """The key of the single-device run this one must equal (``reference_task``)."""
        return reference_key(self.optimizer, self.bias, self.mixed)


def reference_key(optimizer: str, bias: bool = True, mixed: bool = False) -> str:
    return "/".join([optimizer] + ([] if bias else ["nobias"]) + (["mixed"] if mixed else []))


REFERENCES = (reference_key("adam"), reference_key("sgd"), reference_key("adam", bias=False),
              reference_key("adam", mixed=True))


def _layout(tp: int) -> None:
    """Re-initialise megatron's parallel_state in the running world: TP = tp, DP = world / tp."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def global_batch() -> dict:
    """A fixed batch of GLOBAL_BATCH samples (``gpt.batch``'s recipe, more samples)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, G.VOCAB, (GLOBAL_BATCH, G.SEQ), generator=g)
    labels = torch.randint(0, G.VOCAB, (GLOBAL_BATCH, G.SEQ), generator=g)
    return dict(input_ids=ids, position_ids=torch.arange(G.SEQ).expand(GLOBAL_BATCH, G.SEQ), labels=labels,
                attention_mask=torch.triu(torch.ones(G.SEQ, G.SEQ, dtype=torch.bool), diagonal=1)[None, None])


def _dp() -> tuple[int, int, object]:
    from megatron.core import parallel_state

    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def local_batch(rank: int, world: int) -> tuple[dict, list[str]]:
    """Data-parallel rank ``rank``'s contiguous slice of the global batch, and its samples' adapters."""
    n = GLOBAL_BATCH // world
    cut = slice(rank * n, (rank + 1) * n)
    data = {k: v if k == "attention_mask" else v[cut] for k, v in global_batch().items()}
    return data, list(MIXED_NAMES[cut])


def build(run: Run, *, lora_seed: int = G.SEED + 1):
    """The gated GPT (SP when TP > 1) with the default adapter, and a second one for mixed runs."""
    import tplora_kernels

    case = G.Case(sp=True, gated=True, bias=run.bias)
    model = G.adapt(G.build_gpt(sp=True, gated=True, recompute=run.recompute, bias=run.bias), case,
                    lora_seed=lora_seed)
    if run.mixed:
        torch.manual_seed(lora_seed + 1)  # the second adapter's full factors, alike at every TP size
        for _, m in _lora_layers(model):
            m.add_adapter("code", 4, lora_alpha=8, init_lora_weights=False)
            m.set_adapter(["default", "code"])
        tplora_kernels.set_batch_adapters(model, None)
    return model


def _lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(dotted name, module) of every LoRA layer of ``model``."""
    import tplora_kernels

    return tplora_kernels.lora_modules(model)


def lora_named(model) -> dict[str, torch.nn.Parameter]:
    """Every LoRA factor of ``model`` by parameter name."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def full_factors(model) -> dict[str, torch.Tensor]:
    """Every adapter's factors as full tensors (gathered over TP by the base weight's rule, ``gpt``)."""
    group = G.tp_group()
    out = {}
    for name, m in _lora_layers(model):
        which, dim, stride = G.sharded_factor(m)
        for adapter in m.lora_A:
            for f, holder in (("A", m.lora_A[adapter]), ("B", m.lora_B[adapter])):
                x = holder.weight
                out[f"{name}.{adapter}.{f}"] = G.gather_by_rule(x, dim, stride, group) if f == which else \
                    x.detach().clone()
    return out


def replica_divergence(model) -> float:
    """max |factor - the same factor on another data-parallel replica|, over every LoRA element."""
    _, world, group = _dp()
    flat = torch.cat([p.detach().reshape(-1) for p in lora_named(model).values()])
    if world == 1:
        return 0.0
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=group)
    return max(float((p - flat).abs().max()) for p in parts)


def _dp_mean(loss: torch.Tensor) -> float:
    _, world, group = _dp()
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value, group=group)
    return float(value) / world


# -- single-device reference ----------------------------------------------------------------------
def _reference(key: str) -> dict:
    optimizer, bias, mixed = key.split("/")[0], "nobias" not in key, "mixed" in key
    import tplora_kernels

    model = build(Run(optimizer=optimizer, bias=bias, mixed=mixed))
    params = list(lora_named(model).values())
    opt = (torch.optim.AdamW(params, lr=LR_ADAM, weight_decay=0.0) if optimizer == "adam"
           else torch.optim.SGD(params, lr=LR_SGD, momentum=SGD_MOMENTUM))
    data, names = local_batch(0, 1)
    if mixed:
        tplora_kernels.set_batch_adapters(model, names)
    out = dict(losses=[])
    G.seed_rng()
    for step in range(STEPS + 1):
        opt.zero_grad(set_to_none=True)
        loss = G.lm_loss(model, data)
        out["losses"].append(float(loss))
        if step == STEPS:
            break
        loss.backward()
        opt.step()
    out["final"] = full_factors(model)
    return out


def reference_task() -> dict:
    """TP1, no DDP: rank ``i`` trains ``REFERENCES[i]`` alone on the whole global batch (4 ranks, 4 references)."""
    _layout(1)
    key = REFERENCES[dist.get_rank() % len(REFERENCES)]
    return {key: _reference(key)}


# -- Megatron DDP + optimizer ---------------------------------------------------------------------
def _megatron(model, run: Run):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=run.distributed_optimizer,
                                               overlap_param_gather=run.overlap_param_gather,
                                               overlap_grad_reduce=run.overlap_grad_reduce, bucket_size=BUCKET)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    # lr stays constant (no scheduler); clip_grad=0: torch's optimizers in the reference do not clip.
    config = OptimizerConfig(optimizer=run.optimizer, lr=LR_ADAM if run.optimizer == "adam" else LR_SGD,
                             weight_decay=0.0, sgd_momentum=SGD_MOMENTUM, clip_grad=0.0, params_dtype=torch.float32,
                             use_distributed_optimizer=run.distributed_optimizer)
    with megatron_optimizer_on_cpu():
        opt = get_megatron_optimizer(config, [ddp])
    return ddp, opt


def _optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _bookkeeping(model, ddp, opt) -> dict:
    """Which parameters sit in DDP's grad buffers and in the optimizer, and how many elements."""
    names = {p: n for n, p in model.named_parameters()}
    in_buffers = sorted(names[p] for p in ddp.param_to_bucket_group)
    in_optimizer, owned = set(), 0
    sharded = any(hasattr(o, "model_fp32_groups") for o in _optimizers(opt))
    for o in _optimizers(opt):
        if hasattr(o, "model_fp32_groups"):  # the distributed optimizer: params whose shard this rank updates
            for group in o.model_fp32_groups + o.model_float16_groups:
                in_optimizer.update(names[p] for p in group)
            owned += sum(p.numel() for group in o.shard_fp32_groups + o.shard_float16_groups for p in group)
        else:
            for group in o.optimizer.param_groups:
                in_optimizer.update(names[p] for p in group["params"])
                owned += sum(p.numel() for p in group["params"])
    _, world, group = _dp()
    total = torch.tensor([owned], dtype=torch.int64)
    if world > 1 and sharded:  # each element of the distributed optimizer's state lives on one DP rank
        dist.all_reduce(total, group=group)
    return dict(in_buffers=in_buffers, in_optimizer=sorted(in_optimizer), optimizer_elements=int(total),
                buffer_elements=sum(b.numel_unpadded for b in ddp.buffers + ddp.expert_parallel_buffers),
                lora=sorted(lora_named(model)), lora_elements=sum(p.numel() for p in lora_named(model).values()),
                buckets=len(ddp.bucket_groups))


def _train(model, ddp, opt, run: Run, first_step: int, out: dict) -> None:
    """Megatron's loop from ``first_step`` to STEPS (the last forward without backward)."""
    from megatron.core.distributed import finalize_model_grads

    import tplora_kernels

    rank, world, _ = _dp()
    data, names = local_batch(rank, world)
    if run.mixed:
        tplora_kernels.set_batch_adapters(model, names)
    for step in range(first_step, STEPS + 1):
        if run.save and step == SAVE_AFTER:
            save(model, ddp, opt, run)
        if run.merge and step == STEPS:
            out["merged_loss"] = _merged_loss(model, ddp, data)
        ddp.zero_grad_buffer()
        with megatron_optimizer_on_cpu():
            opt.zero_grad()
        loss = G.lm_loss(ddp, data)
        out["losses"].append(_dp_mean(loss))
        out["replicas"].append(replica_divergence(model))
        if step == STEPS:
            break
        loss.backward()
        finalize_model_grads([ddp])
        with megatron_optimizer_on_cpu():
            opt.step()
    out["final"] = full_factors(model)


def _merged_loss(model, ddp, data) -> float:
    """Merge every layer's adapter (its first read since the last step), the loss, then unmerge."""
    layers = [m for _, m in _lora_layers(model)]
    with torch.no_grad():
        for m in layers:
            m.merge()
        loss = _dp_mean(G.lm_loss(ddp, data))
        for m in layers:
            m.unmerge()
    return loss


def train_task(run: dict, tp: int = 2) -> dict:
    """Train ``run`` at TP = tp (DP = 4 / tp) with megatron's DDP and optimizer."""
    run = Run(**run)
    _layout(tp)
    model = build(run)
    ddp, opt = _megatron(model, run)
    out = dict(losses=[], replicas=[], **_bookkeeping(model, ddp, opt))
    G.seed_rng()
    _train(model, ddp, opt, run, 0, out)
    return out


# -- optimizer checkpoints ----------------------------------------------------------------------------
def _state(model, opt, fmt: str, *, loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    with megatron_optimizer_on_cpu():
        opt_sd = opt.sharded_state_dict(model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": fmt})
    return {"model": model_sd, "optimizer": opt_sd}


def save(model, ddp, opt, run: Run) -> None:
    """Save model and optimizer state in every FORMATS, as Megatron's save_checkpoint does.

    Under ``overlap_param_gather`` the parameters are only gathered by the next forward, so
    megatron's training loop syncs them first (``disable_forward_pre_hook(param_sync=True)``) and
    re-enables the hooks after; so does this.
    """
    from megatron.core import dist_checkpointing

    if run.overlap_param_gather:
        ddp.disable_forward_pre_hook(param_sync=True)
    for fmt in FORMATS:
        path = os.path.join(run.save, fmt)
        os.makedirs(path, exist_ok=True)
        with synchronous_writer():
            dist_checkpointing.save(_state(model, opt, fmt, loading=False), path)
        dist.barrier()
    if run.overlap_param_gather:
        ddp.enable_forward_pre_hook()


def resume_task(run: dict, fmt: str, tp: int) -> dict:
    """Load what ``save`` wrote in format ``fmt`` at TP = tp into a model with other factors; train on.

    Returns the losses and replica divergence of steps SAVE_AFTER..STEPS, and the final factors.
    """
    from megatron.core import dist_checkpointing

    saved = Run(**run)
    run = replace(saved, save=None)
    _layout(tp)
    model = build(run, lora_seed=G.SEED + 11)  # other factors: the checkpoint must bring them
    ddp, opt = _megatron(model, run)
    out = dict(losses=[], replicas=[], before=full_factors(model))
    for o in _optimizers(opt):  # the state torch's AdamW lacks until its first step (module docstring)
        o._init_optimizer_states_with_dummy_values()
    loaded = dist_checkpointing.load(_state(model, opt, fmt, loading=True), os.path.join(saved.save, fmt))
    with torch.no_grad(), megatron_optimizer_on_cpu():
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
    G.seed_rng()
    _train(model, ddp, opt, run, SAVE_AFTER, out)
    return out


# -- torch FSDP2 ----------------------------------------------------------------------------------------
FSDP2_UNITS = ("block", "lora_layer", "holder")


def fsdp2_task(unit: str, reshard_after_forward: bool = True) -> dict:
    """TP1, FSDP2 over the 4 ranks (DP4): ``fully_shard`` on each ``unit`` and on the root; AdamW.

    ``unit``: ``"block"`` (each TransformerLayer), ``"lora_layer"`` (each of our LoRA layers) or
    ``"holder"`` (each ``LoRAFactor``, the finest grain, where calling the holder matters).
    ``reshard_after_forward`` applies to the units. The model has no linear biases: a layer that
    skips its bias add (megatron's ``linear_proj``/``linear_fc2``) returns its bias Parameter
    itself, and a unit that reshards it after its forward frees it before the bias add reads it
    (a segfault on CPU with megatron's own ``RowParallelLinear`` as the unit, no LoRA involved).

    Returns:
        ``dict(losses, final)`` as ``reference_task`` (compared with its ``adam/nobias``), or
        ``dict(error=...)`` if the forward raised (the same on every rank).
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tplora_kernels import ColumnParallelLoRA, RowParallelLoRA
    from tplora_kernels.adapters import LoRAFactor

    _layout(1)
    model = build(Run(bias=False))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kinds = {"block": TransformerLayer, "lora_layer": (ColumnParallelLoRA, RowParallelLoRA), "holder": LoRAFactor}
    units = [m for m in model.modules() if isinstance(m, kinds[unit])]
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR_ADAM, weight_decay=0.0)
    data, _ = local_batch(dist.get_rank(), dist.get_world_size())
    out = dict(losses=[], units=len(units))
    G.seed_rng()
    try:
        for step in range(STEPS + 1):
            opt.zero_grad(set_to_none=True)
            loss = G.lm_loss(model, data)
            value = loss.detach().clone()
            dist.all_reduce(value)
            out["losses"].append(float(value) / dist.get_world_size())
            if step == STEPS:
                break
            loss.backward()
            opt.step()
    except ValueError as e:  # raised alike on every rank, before the fused kernel ran
        return dict(error=str(e), units=len(units))
    # The sharded parameters' full values (a collective per factor, in the same order on every rank).
    full = {n: t.full_tensor() for n, t in model.state_dict().items() if ".lora_A." in n or ".lora_B." in n}
    out["final"] = {_factor_key(n): t for n, t in full.items()}
    return out


def _factor_key(name: str) -> str:
    """``decoder.layers.0.mlp.linear_fc1.lora_B.default.weight`` -> ``full_factors``'s ``...linear_fc1.default.B``."""
    head, which, adapter, _ = name.rsplit(".", 3)
    return f"{head}.{adapter}.{which[-1]}"


# -- every read goes through the holder's call ------------------------------------------------------
def _poison(holders) -> None:
    with torch.no_grad():
        for h in holders:
            h.weight.fill_(float("nan"))


def _restoring(model) -> tuple[list, list]:
    """A forward pre-hook on every LoRAFactor that writes its true value back, as a gather would.

    Returns the holders and the hook handles. Between calls the factors can then be NaN
    (``_poison``): only a read that went through the holder's call sees the true value.
    """
    from tplora_kernels.adapters import LoRAFactor

    holders = [m for m in model.modules() if isinstance(m, LoRAFactor)]
    true = {h: h.weight.detach().clone() for h in holders}

    def restore(module, args):
        with torch.no_grad():
            module.weight.copy_(true[module])

    return holders, [h.register_forward_pre_hook(restore) for h in holders]


def _loss_and_grads(model, data, *, poison_before_backward=()) -> tuple[float, dict]:
    for p in model.parameters():
        p.grad = None
    G.seed_rng()
    loss = G.lm_loss(model, data)
    _poison(poison_before_backward)  # a recomputed forward must call these holders again
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in lora_named(model).items() if p.grad is not None}


def _diff(a: dict | torch.Tensor | float, b) -> float:
    if isinstance(a, dict):
        if sorted(a) != sorted(b):
            return float("inf")
        return max((_diff(a[k], b[k]) for k in a), default=0.0)
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def holder_call_task() -> dict:
    """TP2 with SP: each path's result with every factor NaN until its holder is called, against the plain run.

    Paths: forward+backward; full and selective recompute (the factors of the recomputed layers
    are poisoned again between forward and backward, so the recompute must call their holders);
    a mixed batch of two adapters; ``get_delta_weight``, ``merge`` and ``unmerge``.

    Returns:
        ``{path: max |difference|}`` (0.0 when every read went through the call; NaN otherwise).
    """
    import tplora_kernels

    _layout(2)
    data, names = local_batch(0, 2)
    out = {}
    for path, run in (("forward+backward", Run()), ("recompute=full", Run(recompute="full")),
                      ("recompute=selective", Run(recompute="selective", bias=False)), ("mixed", Run(mixed=True))):
        model = build(run)
        if run.mixed:
            tplora_kernels.set_batch_adapters(model, names)
        want = _loss_and_grads(model, data)
        holders, handles = _restoring(model)
        again = [h for h in holders if run.recompute == "full" or (run.recompute and ".mlp." in _name(model, h))]
        _poison(holders)
        got = _loss_and_grads(model, data, poison_before_backward=again)
        out[path] = max(_diff(got[0], want[0]), _diff(got[1], want[1]))
        for h in handles:
            h.remove()
    layers = [m for _, m in _lora_layers(build(Run()))]
    want = {}
    for m in layers:
        want[m] = dict(delta=m.get_delta_weight("default"), base=m.base_layer.weight.detach().clone())
        m.merge()
        want[m]["merged"] = m.base_layer.weight.detach().clone()
        m.unmerge()
        want[m]["unmerged"] = m.base_layer.weight.detach().clone()
    for m in layers:
        with torch.no_grad():
            m.base_layer.weight.copy_(want[m]["base"])
    holders, _ = _restoring(torch.nn.ModuleList(layers))
    for what in ("get_delta_weight", "merge", "unmerge"):
        diffs = []
        for m in layers:
            _poison(holders)
            if what == "get_delta_weight":
                diffs.append(_diff(m.get_delta_weight("default"), want[m]["delta"]))
            elif what == "merge":
                m.merge()
                diffs.append(_diff(m.base_layer.weight.detach(), want[m]["merged"]))
            else:
                m.unmerge()
                diffs.append(_diff(m.base_layer.weight.detach(), want[m]["unmerged"]))
        out[what] = max(diffs)
    return out


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
