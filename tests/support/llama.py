"""Tiny Llama-, Qwen2- and Mixtral-like models in megatron-core and in transformers, with the same weights.

Megatron side: a ``GPTModel`` (local spec) shaped like the Hugging Face architecture: RMSNorm,
SwiGLU, RoPE (``rotary_interleaved=False``, HF's ``rotate_half``), grouped-query attention, no
linear biases (Qwen2: q/k/v biases), no dropout; Mixtral: a top-2 softmax router over
``SequentialMLP`` experts. ``hf_state_dict`` converts its full base weights into the HF model's
state dict by Megatron's own layout (written here, independently of ``tplora_kernels.adapter_io``), so
the base models agree before any adapter is involved (checked by the tests).

What the comparison relies on (megatron-core 0.16.1, transformers 5.24.0, on CPU):

- Megatron ignores ``position_ids`` under RoPE (it rotates by 0..s-1), so HF gets arange positions.
- The causal mask Megatron would build itself lives on "cuda": ``gpt.batch`` passes a boolean
  ``[1, 1, s, s]`` mask, True = masked.
- Norm weights are drawn around 1 (1 +- 0.2) and the linear weights with std 0.1: with all-ones
  norms or tiny weights a misplaced norm, a wrong RoPE or a swapped head would hide.

Tasks (run on every rank of a ``gpt.run_world`` world; ``"tests.support.llama:<name>"``) may
switch the world's TP (and EP) size with ``tensor_parallel(t, ep)``: the 4 ranks then hold 4/t
data-parallel replicas, so one world serves TP 1, 2 and 4.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe import moe_utils

import tplora_kernels
from tplora_kernels.naming import canonical_name

from . import gpt as G

ARCHS = ("llama", "qwen2", "mixtral")
GROUPS = 2  # query groups (KV heads) for the 4 query heads
HEAD_DIM = G.HIDDEN // G.HEADS
EXPERTS, TOPK = 4, 2
EPS = 1e-5
ROPE_THETA = 10000.0
NORM_SPREAD = 0.2
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- Megatron ----------------------------------------------------------------------------------
def build_megatron(arch: str = "llama", *, tied: bool = False, seed: int = G.SEED):
    """The Megatron twin of ``arch`` at the current TP size (SP on for MoE under TP > 1, as Megatron wants)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    t = parallel_state.get_tensor_model_parallel_world_size()
    moe = arch == "mixtral"
    extra = {}
    if moe:
        # megatron-core 0.16.1 reads the name te_general_gemm that it only defines when Transformer
        # Engine imports; None is what it means by "no TE" (the router then uses torch.mm).
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        extra = dict(num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=G.FFN,
                     moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                     moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, sequence_parallel=t > 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=G.LAYERS, hidden_size=G.HIDDEN, num_attention_heads=G.HEADS, num_query_groups=GROUPS,
            ffn_hidden_size=G.FFN, normalization="RMSNorm", layernorm_epsilon=EPS, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=arch == "qwen2",
            tensor_model_parallel_size=t, use_cpu_initialization=True, params_dtype=torch.float32,
            attention_dropout=0.0, hidden_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
            gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
            init_method_std=G.INIT_STD, **extra)
        torch.manual_seed(seed)
        spec = get_gpt_layer_local_spec(num_experts=EXPERTS if moe else None, normalization="RMSNorm")
        model = GPTModel(config, spec, vocab_size=G.VOCAB, max_sequence_length=G.SEQ, position_embedding_type="rope",
                         rotary_base=ROPE_THETA, share_embeddings_and_output_weights=tied)
    # Norm weights are replicated on every rank: one private generator draws them alike everywhere.
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + NORM_SPREAD * (2 * torch.rand(p.shape, generator=g) - 1))
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases: megatron initialises them to zero
                p.copy_(G.slice_by_rule(0.1 * torch.randn(_full_shape(p), generator=g), 0, 1,
                                        dist.get_world_size(G.tp_group()), dist.get_rank(G.tp_group())))
    return model


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    t = dist.get_world_size(G.tp_group()) if getattr(p, "tensor_model_parallel", False) else 1
    return (p.shape[0] * t, *p.shape[1:])


@contextlib.contextmanager
def tensor_parallel(t: int, ep: int = 1):
    """Megatron's parallel state with TP = t and expert parallelism ``ep`` for the block.

    The ranks left over are data-parallel replicas. The state stays for the next task: building
    megatron's process groups is most of a small task's cost, so the tests order their tasks by size.
    """
    if (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size()) != (t, ep):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(t, expert_model_parallel_size=ep)
    G.seed_rng()  # the RNG tracker's states depend on the TP rank; every task starts from the same ones
    yield


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every base parameter as a full tensor, names as in the un-adapted model (experts by global index)."""
    out = {n.replace(".base_layer", ""): G.full_param(p, _group_of(n)) for n, p in model.named_parameters()
           if ".lora_" not in n}
    return _all_experts(out)


def _group_of(name: str):
    return parallel_state.get_expert_tensor_parallel_group() if ".local_experts." in name else G.tp_group()


def _all_experts(tensors: dict) -> dict:
    """``tensors`` with local expert indices made global and the other expert-parallel ranks' experts added.

    Megatron's rule: EP rank ``k`` holds experts ``k*n .. k*n + n-1`` as ``local_experts.0 .. n-1``.
    """
    ep, k = parallel_state.get_expert_model_parallel_world_size(), parallel_state.get_expert_model_parallel_rank()
    if ep == 1 or not any(".local_experts." in n for n in tensors):
        return tensors
    n_local = EXPERTS // ep
    pattern = re.compile(r"\.local_experts\.(\d+)\.")
    mine = {pattern.sub(lambda m: f".local_experts.{k * n_local + int(m.group(1))}.", n): v
            for n, v in tensors.items() if ".local_experts." in n}
    parts = [None] * ep
    dist.all_gather_object(parts, mine, group=parallel_state.get_expert_model_parallel_group())
    out = {n: v for n, v in tensors.items() if ".local_experts." not in n}
    for part in parts:
        out.update(part)
    return out


# -- Megatron -> Hugging Face base weights (the test's own reading of Megatron's layout) -------
def split_qkv(w: torch.Tensor, heads: int = G.HEADS, groups: int = GROUPS,
              head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused qkv rows ``[g0: q.. k v | g1: q.. k v | ...]`` -> HF's q, k, v (rows or bias)."""
    per = heads // groups
    grouped = w.reshape(groups, per + 2, head_dim, *w.shape[1:])
    q = grouped[:, :per].reshape(heads * head_dim, *w.shape[1:])
    k, v = (grouped[:, i].reshape(groups * head_dim, *w.shape[1:]) for i in (per, per + 1))
    return q, k, v


def hf_state_dict(full: dict[str, torch.Tensor], arch: str, *, tied: bool = False) -> dict[str, torch.Tensor]:
    """The HF model's state dict from Megatron's full base weights (``base_weights`` of rank 0)."""
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = full["embedding.word_embeddings.weight" if tied else "output_layer.weight"]
    for i in range(G.LAYERS):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        for suffix in ("weight", "bias") if arch == "qwen2" else ("weight",):
            q, k, v = split_qkv(full[m + "self_attention.linear_qkv." + suffix])
            for name, x in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{h}self_attn.{name}.{suffix}"] = x
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        if arch == "mixtral":
            out[h + "mlp.gate.weight"] = full[m + "mlp.router.weight"]
            experts = [f"{m}mlp.experts.local_experts.{e}." for e in range(EXPERTS)]
            out[h + "mlp.experts.gate_up_proj"] = torch.stack([full[e + "linear_fc1.weight"] for e in experts])
            out[h + "mlp.experts.down_proj"] = torch.stack([full[e + "linear_fc2.weight"] for e in experts])
        else:
            gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
    return out


def hf_model(arch: str, full: dict[str, torch.Tensor] | None = None, *, tied: bool = False):
    """The HF twin (fp32, eager attention, eval), with Megatron's weights when ``full`` is given."""
    # transformers and peft stay local here and below: only the test process builds the HF side,
    # and a top-level import would cost every rank that imports this module for its tasks seconds.
    import transformers

    common = dict(vocab_size=G.VOCAB, hidden_size=G.HIDDEN, intermediate_size=G.FFN, num_hidden_layers=G.LAYERS,
                  num_attention_heads=G.HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM, hidden_act="silu",
                  max_position_embeddings=G.SEQ, rms_norm_eps=EPS, tie_word_embeddings=tied,
                  rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, attention_dropout=0.0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=EXPERTS, num_experts_per_tok=TOPK, router_jitter_noise=0.0,
                                         **common)
        cls = transformers.MixtralForCausalLM
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if full is not None:
        sd = hf_state_dict(full, arch, tied=tied)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # rotary inv_freq is a buffer the model computes itself; nothing else may be left out
        missing = [k for k in missing if "rotary" not in k and not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise AssertionError(f"hf_state_dict({arch}) does not fit {cls.__name__}: missing {missing}, "
                                 f"unexpected {unexpected}")
    return model


def hf_logits(model) -> torch.Tensor:
    """Logits ``[b, s, V]`` of an HF model on ``gpt.batch()``'s tokens, with Megatron's positions 0..s-1."""
    data = G.batch()
    with torch.no_grad():
        return model(input_ids=data["input_ids"], position_ids=data["position_ids"]).logits


def random_hf_adapter(arch: str, path: str, *, seed: int = 5) -> dict:
    """A random PEFT adapter on the HF model: a different A per q/k/v and gate/up, different r and alpha.

    Qwen2's uses rsLoRA (scale alpha / sqrt(r)).

    Returns the ``LoraConfig`` fields used (for messages).
    """
    from peft import LoraConfig, get_peft_model

    model = hf_model(arch)
    kw = dict(r=4, lora_alpha=8, target_modules=list(HF_TARGETS), init_lora_weights=False, use_rslora=arch == "qwen2",
              rank_pattern={"k_proj": 2, "v_proj": 6, "up_proj": 3, "model.layers.1.self_attn.o_proj": 5},
              alpha_pattern={"v_proj": 3, "gate_proj": 20})
    if arch == "mixtral":  # the experts are 3-D parameters in transformers 5: PEFT targets them as parameters
        kw["target_modules"] = [t for t in HF_TARGETS if t not in ("gate_proj", "up_proj", "down_proj")]
        kw["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        kw["rank_pattern"] = {k: v for k, v in kw["rank_pattern"].items() if k != "up_proj"}
        kw["alpha_pattern"] = {k: v for k, v in kw["alpha_pattern"].items() if k != "gate_proj"}
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**kw))
    with torch.no_grad():  # PEFT's init_lora_weights=False gives B ~ kaiming like A; make the effect O(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(path)
    return kw


def peft_logits(arch: str, full: dict[str, torch.Tensor], path: str, *, tied: bool = False) -> torch.Tensor:
    """HF + PEFT's logits with the adapter at ``path`` (``PeftModel.from_pretrained``)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(arch, full, tied=tied), path).eval()
    return hf_logits(model)


# -- tasks -------------------------------------------------------------------------------------
MEGATRON_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def adapt(model, *, targets=MEGATRON_TARGETS, seed: int = G.SEED + 1, **overrides):
    """apply_lora (torch backend, random non-zero factors drawn alike at every TP size)."""
    torch.manual_seed(seed)
    kw = dict(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules=list(targets),
              backend="torch")
    kw.update(overrides)
    tplora_kernels.apply_lora(model, tplora_kernels.LoRAConfig(**kw))
    return model


def megatron_factors(model) -> dict[str, dict]:
    """Every LoRA layer's full A, B and scale by global module name (every rank of each TP group calls it)."""
    layers = G.lora_layers(model)  # the model's own (local) names: the oracle numbers experts itself
    names = {n: canonical_name(model, n) for n, _ in layers}
    out = {}
    for name, m in layers:
        a, b = tplora_kernels.gather_full_factors(m, m.active_adapter)
        opts = m.adapter_options(m.active_adapter)
        out[name] = dict(a=a, b=b, scale=opts.scaling, r=opts.r, alpha=opts.lora_alpha)
    out = _all_experts(out)  # the test's own global naming, beside the library's
    if not set(names.values()) <= set(out):
        raise AssertionError(f"canonical_name gives {sorted(set(names.values()) - set(out))[:3]}, not "
                             "megatron's expert numbering")
    return out


def export_task(arch: str, path: str, tp: int, ep: int = 1, tied: bool = False,
                formats: tuple[str, ...] = ("fused",)) -> dict:
    """Train a LoRA on the ``arch`` twin at TP = ``tp`` and export it under HF names (``path/<format>``).

    Layers get different r and alpha (so the export folds scales) and dropout 0.1 while training;
    Qwen2's use rsLoRA.
    """
    with tensor_parallel(tp, ep):
        model = build_megatron(arch, tied=tied)
        adapt(model, targets=MEGATRON_TARGETS + (("output_layer",) if tied else ()), lora_dropout=0.1,
              use_rslora=arch == "qwen2",
              rank_pattern={"linear_proj": 4, "linear_fc2": 6},
              alpha_pattern={"linear_fc2": 9, "layers.1.self_attention.linear_qkv": 5})
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if ".lora_" in n], lr=G.LR)
        G.seed_rng()
        model.train()
        for _ in range(G.STEPS):
            opt.zero_grad(set_to_none=True)
            G.lm_loss(model).backward()
            G.sum_sp_grads(model)
            opt.step()
        written = {fmt: tplora_kernels.export_hf_adapter(model, os.path.join(path, fmt), arch=arch, moe_format=fmt)
                   for fmt in formats}
        return dict(logits=G.full_logits(model), base=base_weights(model), factors=megatron_factors(model),
                    written=written)


def import_task(arch: str, path: str, tp: int, ep: int = 1) -> dict:
    """Load the HF PEFT adapter at ``path`` into the ``arch`` twin (with an adapter of its own) at TP = ``tp``."""
    with tensor_parallel(tp, ep):
        model = build_megatron(arch)
        base = G.full_logits(model)
        adapt(model)
        loaded = tplora_kernels.load_hf_adapter(model, path, arch=arch, adapter_name="hf")
        return dict(logits=G.full_logits(model), base_logits=base, loaded=loaded,
                    layers=len(tplora_kernels.lora_modules(model)), factors=megatron_factors(model),
                    base=base_weights(model))


def _outcome(fn) -> str | None:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def errors_task(adapters: dict[str, str], tmp: str, tp: int = 2) -> dict:
    """Bad calls at TP = ``tp``: each one's error message, and whether the model's factors changed."""
    out = {}
    with tensor_parallel(tp):
        model = adapt(build_megatron("llama"))
        before = megatron_factors(model)
        out["arch"] = _outcome(lambda: tplora_kernels.load_hf_adapter(model, adapters["llama"], arch="gpt2"))
        out["moe_format"] = _outcome(lambda: tplora_kernels.export_hf_adapter(model, tmp, arch="llama",
                                                                              moe_format="stacked"))
        for what, p in adapters.items():
            if what != "llama":
                out[what] = _outcome(lambda p=p: tplora_kernels.load_hf_adapter(model, p, arch="llama"))
        after = megatron_factors(model)
        out["changed"] = sorted(k for k, v in after.items() if not torch.equal(v["b"], before[k]["b"]))
        # No linear_proj LoRA: the file's o_proj tensors find no layer.
        partial = adapt(build_megatron("llama"), targets=("linear_qkv", "linear_fc1", "linear_fc2"))
        out["unused"] = _outcome(lambda: tplora_kernels.load_hf_adapter(partial, adapters["llama"], arch="llama"))
        out["not_strict"] = len(tplora_kernels.load_hf_adapter(partial, adapters["llama"], arch="llama", strict=False))
        plain = adapt(G.build_gpt(gated=False))  # a GELU MLP: no gate_proj/up_proj in Llama
        out["not_gated"] = _outcome(lambda: tplora_kernels.export_hf_adapter(plain, tmp, arch="llama"))
    return out

