"""Fine-tune a small Llama-style GPTModel with LoRA at TP2 x PP2, then run the adapter in Hugging Face PEFT.

Four ranks: two pipeline stages of two tensor-parallel ranks. The text is the license that ships
with Python itself (``LICENSE.txt`` of the standard library), read byte by byte (a vocabulary of
256); nothing is downloaded. Every rank builds its stage of megatron-core's ``GPTModel`` (RMSNorm,
SwiGLU, RoPE, grouped-query attention), LoRA wraps its parallel linears (``apply_lora``), and
Megatron's own 1F1B schedule trains the adapter. Then ``export_hf_adapter`` gathers the adapter from
both stages and both TP ranks into one PEFT adapter of the Hugging Face ``LlamaForCausalLM`` with the
same base weights, which PEFT loads (``PeftModel.from_pretrained``) to give Megatron's logits and to
generate text.

The base weights are drawn per weight from its *canonical* name (``tplora_kernels.naming``: global
layer index), so the stage that holds a layer, and the Hugging Face model, build the same tensor.

Runnable on a CPU: ``python examples/pipeline_example.py`` (spawns 4 gloo ranks; about a minute on
two cores) or ``torchrun --nproc-per-node 4 examples/pipeline_example.py``.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")  # megatron-core's import-time notices about apex and TE

import contextlib
import importlib.metadata
import os
import sysconfig
import tempfile
import zlib

import torch
import torch.distributed as dist

import tplora_kernels
from tplora_kernels.adapter_io.hf_format import heads_of, hf_targets
from tplora_kernels.naming import canonical_name

LAYERS, HIDDEN, HEADS, GROUPS, FFN, SEQ, MBS, MICRO = 4, 64, 4, 2, 128, 64, 4, 2
VOCAB = 256  # bytes
STEPS, LR = 40, 3e-2


def text_bytes() -> torch.Tensor:
    """Python's own license text, as bytes (any installed package's text would do)."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    text = open(path, "rb").read() if os.path.exists(path) else importlib.metadata.metadata("torch").get_payload()
    return torch.tensor(list(text if isinstance(text, bytes) else text.encode()), dtype=torch.long)


def config():
    from megatron.core.transformer import TransformerConfig

    t = dist.get_world_size() // 2
    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        activation_func=torch.nn.functional.silu, tensor_model_parallel_size=t, pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        attention_dropout=0.0, hidden_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        batch_p2p_sync=False)


def full_weight(name: str, shape: list[int]) -> torch.Tensor:
    """The full base weight named ``name`` (canonical, so the same on every layout and in Hugging Face)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if "layernorm" in name:
        return 1 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


def build_stage():
    """This rank's stage of the GPTModel, each weight its TP slice of ``full_weight``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(config(), get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope",
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    t, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            module, _, leaf = pname.rpartition(".")
            name = f"{canonical_name(model, module)}.{leaf}"
            shape = list(p.shape)
            dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            if dim is not None:
                shape[dim] *= t
            full = full_weight(name, shape)
            if dim is not None:  # Megatron's rule: t·stride chunks, rank i holds i, i+t, ...
                stride = getattr(p, "partition_stride", 1)
                full = torch.cat(full.chunk(t * stride, dim)[rank::t], dim)
            p.copy_(full)
    return model


def batches(data: torch.Tensor, step: int) -> list[dict]:
    """``MICRO`` micro-batches of ``MBS`` windows of SEQ + 1 bytes (inputs and next-byte labels)."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(data) - SEQ - 1, (MICRO * MBS,), generator=g)
    windows = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return [dict(tokens=windows[i * MBS:(i + 1) * MBS, :-1], labels=windows[i * MBS:(i + 1) * MBS, 1:],
                 position_ids=torch.arange(SEQ).expand(MBS, SEQ), attention_mask=mask) for i in range(MICRO)]


def run_pipeline(model, micro: list[dict], *, forward_only: bool, logits: bool = False) -> list:
    """Every micro-batch through Megatron's 1F1B schedule; the last stage's outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output, non_loss_data=False):
        if non_loss_data:
            return output.detach()
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}  # clone: the schedule scales ``loss`` in place

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        kw = dict(runtime_gather_output=True) if logits else dict(labels=mb["labels"])
        return model(mb["tokens"], mb["position_ids"], mb["attention_mask"], **kw), loss_func

    return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=model,
                                       num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MBS,
                                       forward_only=forward_only, collect_non_loss_data=logits)


def main(out_dir: str | None = None) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size() // 2,
                                 pipeline_model_parallel_size=2)
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # megatron-core names the CUDA device (and its RNG) in places: point them at the CPU
        from tplora_kernels.testing.megatron_cpu import megatron_on_cpu
    with megatron_on_cpu() if on_cpu else contextlib.nullcontext():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)  # Megatron's RNG states (dropout, init)
        model = build_stage()
        targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]  # lm_head too
        tplora_kernels.apply_lora(model, tplora_kernels.LoRAConfig(r=16, lora_alpha=32, target_modules=targets))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
        data, losses = text_bytes(), []
        for step in range(STEPS):
            opt.zero_grad()
            out = run_pipeline(model, batches(data, step), forward_only=False)
            opt.step()
            losses.append(sum(o["loss"].item() for o in out) / MICRO if out else None)
        model.eval()
        with torch.no_grad():
            held_out = batches(data, 10_000)
            logits = run_pipeline(model, held_out, forward_only=True, logits=True)
        # One PEFT adapter of the Hugging Face model, gathered from both stages and TP ranks; rank 0
        # writes it, in the directory rank 0 names.
        box = [out_dir or (tempfile.mkdtemp() if dist.get_rank() == 0 else None)]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
        tplora_kernels.export_hf_adapter(model, out_dir, arch="llama")
    result = {"losses": losses, "out_dir": out_dir, "stage": ps.get_pipeline_model_parallel_rank()}
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        result.update(hugging_face(out_dir, held_out, logits, heads_of([model], [])))
    # Rank 0 reports: take the last stage's results there.
    box = [result]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 2 if dist.get_world_size() > 1 else 0)
    ps.destroy_model_parallel()
    return box[0]


def hugging_face(adapter_dir: str, held_out: list[dict], megatron_logits: list, heads) -> dict:
    """The same base model in transformers, the exported adapter loaded by PEFT: logits and a generation."""
    import transformers
    from peft import PeftModel

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                                   max_position_embeddings=SEQ, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": full_weight("embedding.word_embeddings.weight", [VOCAB, HIDDEN]),
          "model.norm.weight": full_weight("decoder.final_layernorm.weight", [HIDDEN]),
          "lm_head.weight": full_weight("output_layer.weight", [VOCAB, HIDDEN])}
    qkv_rows = (HEADS + 2 * GROUPS) * (HIDDEN // HEADS)
    for i in range(LAYERS):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = full_weight(m + "input_layernorm.weight", [HIDDEN])
        sd[h + "post_attention_layernorm.weight"] = full_weight(m + "pre_mlp_layernorm.weight", [HIDDEN])
        # A fused Megatron weight holds its Hugging Face modules' rows; hf_targets says which.
        for name, rows in ((m + "self_attention.linear_qkv", qkv_rows), (m + "self_attention.linear_proj", HIDDEN),
                           (m + "mlp.linear_fc1", 2 * FFN), (m + "mlp.linear_fc2", HIDDEN)):
            cols = FFN if name.endswith("linear_fc2") else HIDDEN
            full = full_weight(name + ".weight", [rows, cols])
            for target in hf_targets(name, rows, arch="llama", heads=heads):
                sd[target.name + ".weight"] = full if target.rows is None else full[target.rows]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        tokens = torch.cat([mb["tokens"] for mb in held_out])
        ours = torch.cat(megatron_logits)
        theirs = peft_model(input_ids=tokens).logits
        prompt = torch.tensor([list(b"Python Software Foundation")])
        generated = peft_model.generate(input_ids=prompt, max_new_tokens=SEQ - prompt.shape[1], do_sample=False)
    return {"logit_diff": float((ours - theirs).abs().max()), "logit_scale": float(ours.abs().max()),
            "generated": bytes(generated[0].tolist()).decode(errors="replace")}


def _report(res: dict) -> str:
    first, last = res["losses"][0], res["losses"][-1]
    return (f"TP2 x PP2: loss {first:.3f} -> {last:.3f} over {len(res['losses'])} steps; "
            f"HF+PEFT logits vs Megatron: max |diff| {res['logit_diff']:.1e} (of {res['logit_scale']:.1f}); "
            f"generated: {res['generated']!r}")


if __name__ == "__main__":
    from tplora_kernels.testing.launch import run_script  # four gloo ranks here, or torchrun's

    run_script(main, _report, world=4)
