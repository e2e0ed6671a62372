"""Pipeline-parallel megatron-core ``GPTModel`` s trained through Megatron's own schedules, on gloo ranks.

One 4-rank world (``gpt.run_world``) serves every layout: each task switches megatron's parallel
state to its ``Layout`` (TP × PP × VPP × EP; the ranks left over are data-parallel replicas),
builds this rank's model chunks, and trains or evaluates them with ``get_forward_backward_func()``
(no pipelining, 1F1B, or the interleaved schedule for VPP) and its point-to-point transfers.

Layout independence is built in, not assumed: every base parameter and every LoRA factor is a
full tensor drawn from a generator seeded by its *canonical* name (global layer and expert
index, ``tplora_kernels.naming``), sliced by Megatron's TP rule (``gpt.slice_by_rule``), so the
model is the same function at every layout before anything is compared.

The schedules run under ``tplora_kernels.testing.megatron_cpu.megatron_on_cpu`` (which every rank of
``gpt.run_world`` enters), like the rest of the model.
"""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.distributed as dist

from . import gpt as G

LAYERS, HIDDEN, HEADS, GROUPS, FFN, VOCAB, SEQ, MBS, MICRO = 4, 64, 4, 2, 128, 128, 16, 2, 2
EXPERTS = 4
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
RANK, ALPHA = 8, 16
STEPS, LR = 3, 0.2
INIT_STD, NORM_SPREAD = 0.1, 0.2


@dataclass(frozen=True)
class Layout:
    """One parallel layout of the 4-rank world (DP = 4 / (tp · pp), expert DP = DP · tp / ep)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    sp: bool = False
    moe: bool = False

    @property
    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp:
            parts.append(f"vpp{self.vpp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.sp:
            parts.append("sp")
        if self.moe:
            parts.append("moe")
        return "-".join(parts)


# -- layout and model ----------------------------------------------------------------------------
def set_layout(layout: Layout) -> None:
    """Megatron's parallel state for ``layout`` (rebuilt only when it changes), seeded alike everywhere."""
    from megatron.core import parallel_state as ps

    want = (layout.tp, layout.pp, layout.vpp, layout.ep)
    have = getattr(set_layout, "current", None)
    if have != want:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                     virtual_pipeline_model_parallel_size=layout.vpp,
                                     expert_model_parallel_size=layout.ep)
        set_layout.current = want
    G.seed_rng()


def _config(layout: Layout):
    from megatron.core.transformer import TransformerConfig

    extra = {}
    if layout.moe:
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16.1 reads it without TE; None = no TE
            moe_utils.te_general_gemm = None
        extra = dict(num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=FFN,
                     moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                     moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(
            num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
            ffn_hidden_size=FFN, normalization="RMSNorm", gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False,
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp, expert_model_parallel_size=layout.ep,
            sequence_parallel=layout.sp and layout.tp > 1, pipeline_dtype=torch.float32,
            use_cpu_initialization=True, params_dtype=torch.float32, attention_dropout=0.0, hidden_dropout=0.0,
            bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
            bias_dropout_fusion=False, apply_rope_fusion=False, init_method_std=INIT_STD, **extra)


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _shard(full: torch.Tensor, p: torch.Tensor, group) -> torch.Tensor:
    """This rank's piece of ``full`` by the parameter's own TP attributes (Megatron's rule)."""
    if not getattr(p, "tensor_model_parallel", False):
        return full
    return G.slice_by_rule(full, p.partition_dim, getattr(p, "partition_stride", 1), dist.get_world_size(group),
                           dist.get_rank(group))


def _tp_group_of(name: str):
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_group() if ".local_experts." in name else ps.get_tensor_model_parallel_group()


def build_chunks(layout: Layout, *, seed: int = G.SEED) -> list:
    """This rank's model chunks at ``layout``, every base weight drawn by its canonical name from ``seed``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from tplora_kernels.naming import canonical_name

    config = _config(layout)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS if layout.moe else None, normalization="RMSNorm")
    chunks = []
    for vp in range(layout.vpp or 1):
        vp_stage = vp if layout.vpp else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chunk = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                             pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                             post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                             vp_stage=vp_stage)
        with torch.no_grad():
            for pname, p in chunk.named_parameters():
                module, _, leaf = pname.rpartition(".")
                name = f"{canonical_name(chunk, module)}.{leaf}"
                group = _tp_group_of(name)
                t = dist.get_world_size(group) if getattr(p, "tensor_model_parallel", False) else 1
                shape = list(p.shape)
                if t > 1:
                    shape[p.partition_dim] *= t
                g = _generator(name, seed)
                if "layernorm" in name:
                    full = 1 + NORM_SPREAD * (2 * torch.rand(shape, generator=g) - 1)
                else:
                    full = INIT_STD * torch.randn(shape, generator=g)
                p.copy_(_shard(full, p, group))
        chunks.append(chunk)
    return chunks


def adapt(chunks: list, *, seed: int, dropout: float = 0.0) -> list[str]:
    """LoRA on every target (apply_lora over the chunks), factors drawn by canonical name from ``seed``."""
    import tplora_kernels

    names = tplora_kernels.apply_lora(chunks, tplora_kernels.LoRAConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(TARGETS), backend="torch"))
    for name, m in tplora_kernels.lora_modules(chunks):
        g = _generator(name + ".lora", seed)
        a = 0.1 * torch.randn(RANK, m.in_features, generator=g)
        b = 0.1 * torch.randn(m.out_features, RANK, generator=g)
        m.register_adapter("default", a, b, lora_alpha=ALPHA, lora_dropout=dropout)
    return names


def lora_params(chunks: list) -> list[torch.nn.Parameter]:
    return [p for c in chunks for n, p in c.named_parameters() if ".lora_" in n and p.requires_grad]


# -- data and the schedule -------------------------------------------------------------------------
def microbatches() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (MICRO * MBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MICRO * MBS, SEQ), generator=g)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    pos = torch.arange(SEQ).expand(MBS, SEQ)
    return [dict(input_ids=ids[i * MBS:(i + 1) * MBS], labels=labels[i * MBS:(i + 1) * MBS], position_ids=pos,
                 attention_mask=mask) for i in range(MICRO)]


def _run_schedule(chunks: list, *, forward_only: bool, logits: bool = False) -> list:
    """One pass of every micro-batch through Megatron's schedule; the last stage's per-micro-batch outputs."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output, non_loss_data: bool = False):
        if non_loss_data:
            return output.detach().clone()
        loss = output.double().mean()  # fp64 mean: see gpt.lm_loss
        return loss, {"loss": loss.detach().clone()}  # clone: the schedule scales ``loss`` in place

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        kw = dict(runtime_gather_output=True) if logits else dict(labels=mb["labels"])
        out = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], **kw)
        return out, partial(loss_func)

    iters = [iter(microbatches()) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=MICRO, seq_length=SEQ,
        micro_batch_size=MBS, forward_only=forward_only, collect_non_loss_data=logits)


def _from_last_stage(value):
    """``value`` as the last pipeline stage of global rank 0's pipeline has it, on every rank."""
    from megatron.core import parallel_state as ps

    src = ps.get_pipeline_model_parallel_last_rank()  # global rank of my pipeline's last stage
    box = [value if dist.get_rank() == src else None]
    # Every pipeline's last stage holds the same value; take global rank 0's pipeline's.
    roots = [None] * dist.get_world_size()
    dist.all_gather_object(roots, src)
    dist.broadcast_object_list(box, src=roots[0])
    return box[0]


def reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """What Megatron's DDP does to gradients, without DDP: the SP sum over TP, then the data-parallel mean.

    Dense factors are averaged over the data-parallel group. An expert's tokens come from every
    rank of its expert-parallel group, so DDP sums expert gradients over the expert-data-parallel
    group and scales them by 1 / (data-parallel size), as it does the dense ones.
    """
    from megatron.core import parallel_state as ps

    import tplora_kernels

    tplora_kernels.sum_sequence_parallel_grads(params, ps.get_tensor_model_parallel_group())
    dp = ps.get_data_parallel_world_size()
    for p in params:
        expert = not getattr(p, "allreduce", True)
        group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
        dist.all_reduce(p.grad, group=group)
        p.grad /= dp


def train(chunks: list, steps: int = STEPS) -> list[float]:
    """``steps`` SGD steps through the schedule; each step's mean loss (from the last stage)."""
    params = lora_params(chunks)
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = _run_schedule(chunks, forward_only=False)
        reduce_grads(params)
        opt.step()
        mine = float(sum(o["loss"] for o in out) / MICRO) if out else None
        losses.append(_from_last_stage(mine))
    return losses


def logits(chunks: list) -> torch.Tensor:
    """Eval logits ``[MICRO · MBS, SEQ, VOCAB]`` (full vocabulary), on every rank."""
    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = _run_schedule(chunks, forward_only=True, logits=True)
    for c in chunks:
        c.train()
    mine = torch.cat([o.transpose(0, 1) if o.shape[0] == SEQ else o for o in out]) if out else None
    return _from_last_stage(mine)


def factors(chunks: list) -> dict[str, torch.Tensor]:
    """The trained adapter as full tensors by PEFT key (canonical names), on every rank."""
    import tplora_kernels

    tensors, _ = tplora_kernels.adapter_state_dict(chunks, dst=None)
    return tensors


# -- tasks ---------------------------------------------------------------------------------------------
def _dirs(root: str, label: str) -> dict[str, str]:
    return {fmt: os.path.join(root, label, fmt) for fmt in ("peft", "hf", "dcp")}


def _outcome(fn) -> str | None:
    try:
        fn()
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def train_task(layout: dict, root: str, sources: list[str] = ()) -> dict:
    """At ``layout``: train, save every format, then load what earlier layouts saved and evaluate."""
    import tplora_kernels

    lay = Layout(**layout)
    set_layout(lay)
    out: dict = {}
    chunks = build_chunks(lay)
    out["names"] = adapt(chunks, seed=G.SEED + 1)
    out["losses"] = train(chunks)
    out["factors"] = factors(chunks)
    out["logits"] = logits(chunks)
    dirs = _dirs(root, lay.label)
    tplora_kernels.save_adapter(chunks, dirs["peft"])
    out["hf"] = tplora_kernels.export_hf_adapter(chunks, dirs["hf"], arch="mixtral" if lay.moe else "llama")
    out["hf_memory"] = tplora_kernels.adapter_state_dict(chunks, format="hf", arch="mixtral" if lay.moe else "llama",
                                                        dst=0)
    # Layer by layer to global rank 1 (a destination other than the writer): rank 1 gets one layer per item.
    stream = tplora_kernels.iter_adapter_state_dict(chunks, dst=1)
    out["stream"] = [(layer, sorted(t)) for layer, t in stream]
    out["stream_config"] = stream.config
    out["memory_elsewhere"] = tplora_kernels.adapter_state_dict(chunks, dst=1)
    tplora_kernels.save_adapter_checkpoint(chunks, dirs["dcp"])
    dist.barrier()
    out["loaded"] = load_sources(lay, root, sources)
    return out


def load_sources(lay: Layout, root: str, sources: list[str]) -> dict:
    """Fresh models at ``lay`` (other base seed for nothing, other factors), each source loaded in each format."""
    import tplora_kernels

    out = {}
    for src in sources:
        dirs = _dirs(root, src)
        for fmt in ("peft", "hf", "dcp"):
            chunks = build_chunks(lay)
            adapt(chunks, seed=G.SEED + 99)  # other factors: the load must replace every one
            if fmt == "peft":
                tplora_kernels.load_adapter(chunks, dirs["peft"])
            elif fmt == "hf":
                tplora_kernels.load_hf_adapter(chunks, dirs["hf"], arch="mixtral" if lay.moe else "llama")
            else:
                tplora_kernels.load_adapter_checkpoint(chunks, dirs["dcp"])
            out[f"{src}/{fmt}"] = logits(chunks)
    return out


def refusals_task(layout: dict, root: str) -> dict:
    """Calls that must be refused on every rank of a pipeline-split model, each with its message (or None)."""
    import json

    from megatron.core import parallel_state as ps

    import tplora_kernels

    lay = Layout(**layout)
    set_layout(lay)
    chunks = build_chunks(lay)
    adapt(chunks, seed=G.SEED + 1)
    out = {}
    full = os.path.join(root, "refusals", "full")
    tplora_kernels.save_adapter(chunks, full)
    # A file without one layer (the last stage's): strict refuses, naming it by its global name.
    tensors, cfg = tplora_kernels.adapter_state_dict(chunks, dst=None)
    partial_dir = os.path.join(root, "refusals", "partial")
    drop = f"decoder.layers.{LAYERS - 1}.mlp.linear_fc2"
    kept = {k: v for k, v in tensors.items() if drop not in k}
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        os.makedirs(partial_dir, exist_ok=True)
        save_file(kept, os.path.join(partial_dir, "adapter_model.safetensors"))
        with open(os.path.join(partial_dir, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    dist.barrier()
    out["missing_layer"] = _outcome(lambda: tplora_kernels.load_adapter(chunks, partial_dir))
    # A group that holds one pipeline stage only: the file would lack the other stage's layers.
    stage = ps.get_pipeline_model_parallel_rank()
    groups = [dist.new_group([r for r in range(dist.get_world_size()) if _stage_of(r, lay) == s])
              for s in range(lay.pp)]
    out["stage_group"] = _outcome(lambda: tplora_kernels.save_adapter(chunks, os.path.join(root, "refusals", "x"),
                                                                      group=groups[stage]))
    # An adapter of another rank in an adapter-only checkpoint.
    other = build_chunks(lay)
    tplora_kernels.apply_lora(other, tplora_kernels.LoRAConfig(r=RANK * 2, lora_alpha=ALPHA,
                                                               target_modules=list(TARGETS), backend="torch"))
    ckpt = os.path.join(root, "refusals", "dcp")
    tplora_kernels.save_adapter_checkpoint(chunks, ckpt)
    out["dcp_shape"] = _outcome(lambda: tplora_kernels.load_adapter_checkpoint(other, ckpt))
    out["rank"] = dist.get_rank()
    return out


def seeds_task(layout: dict) -> dict:
    """Dropout seeds drawn with every stage seeded alike: as drawn, and with the stage salt switched off."""
    from megatron.core import parallel_state as ps

    from tplora_kernels import rng

    lay = Layout(**layout)
    set_layout(lay)
    out = dict(stage=ps.get_pipeline_model_parallel_rank(), tp_rank=ps.get_tensor_model_parallel_rank())
    G.seed_rng()
    out["salted"] = [int(rng.draw_seed("cpu")) for _ in range(3)]
    G.seed_rng()
    with mock.patch.object(rng, "_stage_salt", lambda: 0):
        out["unsalted"] = [int(rng.draw_seed("cpu")) for _ in range(3)]
    return out


def _stage_of(global_rank: int, lay: Layout) -> int:
    """Pipeline stage of a global rank in megatron's default order (tp fastest, then dp, then pp)."""
    return global_rank // (dist.get_world_size() // lay.pp)


def layouts_tasks(root: str, layouts: list[Layout], extra: list[Layout] = ()) -> list[tuple[str, str, dict]]:
    """Train at each layout in order, each loading what the earlier ones saved; ``extra`` only loads."""
    tasks, done = [], []
    for lay in layouts:
        tasks.append((lay.label, "tests.support.pipeline:train_task",
                      dict(layout=asdict(lay), root=root, sources=list(done))))
        done.append(lay.label)
    for lay in extra:
        tasks.append((f"load@{lay.label}", "tests.support.pipeline:load_task",
                      dict(layout=asdict(lay), root=root, sources=list(done))))
    return tasks


def load_task(layout: dict, root: str, sources: list[str]) -> dict:
    lay = Layout(**layout)
    set_layout(lay)
    return dict(loaded=load_sources(lay, root, sources))
