"""Hugging Face module names for adapters: the mapping, and the conversion both ways, with no model I/O.

A megatron-core ``GPTModel`` fuses what a Hugging Face model keeps apart, so one Megatron LoRA
layer is several HF LoRA targets (names of megatron-core 0.16.1 / transformers 5.24):

==============================================  =============================================
Megatron module (``decoder.layers.{i}.``)       HF module (``model.layers.{i}.``)
==============================================  =============================================
``self_attention.linear_qkv``                   ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``
``self_attention.linear_proj``                  ``self_attn.o_proj``
``mlp.linear_fc1`` (gated)                      ``mlp.gate_proj`` / ``mlp.up_proj``
``mlp.linear_fc2``                              ``mlp.down_proj``
``mlp.experts.local_experts.{e}.linear_fc1``    Mixtral: ``mlp.experts.gate_up_proj`` (expert e)
``mlp.experts.local_experts.{e}.linear_fc2``    Mixtral: ``mlp.experts.down_proj`` (expert e)
``output_layer`` (top level)                    ``lm_head``
==============================================  =============================================

Row order. ``linear_qkv``'s output rows are grouped per query group ``g`` as
``[q heads of g, k_g, v_g]`` (megatron's ``SelfAttention.get_query_key_value_tensors``); query head
``j`` of group ``g`` is HF head ``g * heads/groups + j``, and k/v head ``g`` is HF KV head ``g``.
A gated ``linear_fc1`` is ``[gate; up]`` (the first half goes through the activation), as is a
Mixtral expert's ``gate_up_proj[e]``. Export shares A between the blocks of a layer and splits B
by rows, so every HF target's ``s * B A`` is exactly its block of the Megatron product.

Scales. PEFT honours ``rank_pattern``/``alpha_pattern``; a server that applies one
``lora_alpha / r`` to every module would not. So export writes one scale ``s0`` (the most common
``(r, alpha)``'s) for every target: a layer whose scale ``s`` differs has ``s / s0`` folded into its
B, and ``alpha_pattern`` gives each rank-pattern module ``alpha = s0 * r`` (``s0 * sqrt(r)`` under
rsLoRA). Files then mean the same to both kinds of reader.

Mixtral experts (transformers 5) are 3-D parameters, not ``nn.Linear``: PEFT 0.21 targets them
with ``target_parameters`` (``lora.ParamWrapper``), one LoRA per parameter for all experts:
``A [E*r, K]`` (expert ``e``: rows ``e*r ..``) and ``B [N, E*r]`` (expert ``e``: columns ``e, e+E, ..``).
``moe_format="fused"`` writes that (experts of one layer padded to one r). ``"per_expert"``
writes transformers 4's names ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) /
``w2`` (down), standard per-module LoRAs; PEFT 0.21 converts them onto transformers 5's fused
experts at load time (for that it needs one r and one alpha for every expert: export pads and
folds to give that). Both load with ``PeftModel.from_pretrained``; PEFT refuses
``lora_dropout != 0`` on parameter targets, so a fused file says ``lora_dropout = 0``.

Import (``load_hf_adapter``) inverts this for a file trained in HF, where q/k/v (gate/up) have
their own A, r and alpha: the blocks' factors are stacked into one LoRA of rank
``r_q + r_k + r_v`` (A's rows concatenated, B block-diagonal in the blocks' rows), with each
block's scale folded into its B; a file whose blocks share one A (our export) loads at rank r.
Inference is then the same; training is not quite: PEFT draws a dropout mask per HF module, while
the fused layer draws one for its input.

Layer numbers are global (``tplora_kernels.naming``): ``decoder.layers.{i}`` is the model's
layer i on every pipeline layout, so ``model.layers.{i}`` is the same HF layer from any stage.

Not covered: Transformer Engine layers (``TELayerNormColumnParallelLinear`` ...; Transformer
Engine needs CUDA to build and import, so it was not tested), multi-latent attention, attention
output gates, shared experts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import AdapterOptions
from ..config import pattern_value
from ..naming import PEFT_PREFIX, plain_name

__all__ = ["ARCHS", "MOE_FORMATS", "HFExport", "Reader", "Target", "check_arch", "combine", "heads_of",
           "hf_targets"]

ARCHS = ("llama", "qwen2", "mixtral")
MOE_FORMATS = ("fused", "per_expert")
_MOE_ARCHS = ("mixtral",)
_FUSED_PARAMS = ("gate_up_proj", "down_proj")  # MixtralExperts' registration order = PEFT's nesting order
_LAYER = re.compile(r"(?:^|.*\.)decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])$")


@dataclass(frozen=True)
class Target:
    """One HF LoRA target fed by (rows of) one Megatron layer.

    Attributes:
        name: the HF module name (a fused expert parameter: ``<experts module>.<parameter>``).
        rows: the Megatron layer's output rows that are this target's (None: all, in order).
        expert: for a fused expert parameter, the expert's index in it (else None).
    """

    name: str
    rows: torch.Tensor | None = None
    expert: int | None = None


@dataclass(frozen=True)
class Heads:
    """What the mapping needs of a model's TransformerConfig."""

    heads: int
    groups: int
    head_dim: int
    gated: bool
    layers: int
    experts: int


@dataclass(frozen=True)
class _Factor:
    """One target's full factors and options: it computes ``scale * B A`` (DoRA: rows scaled to ``magnitude``)."""

    target: Target
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    scale: float
    magnitude: torch.Tensor | None = None


# -- argument checks and the Megatron config -------------------------------------------------
def check_arch(arch: Any, moe_format: Any = "fused") -> None:
    """Raise ValueError unless ``arch`` is one of ``ARCHS`` and ``moe_format`` one of ``MOE_FORMATS``."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if moe_format not in MOE_FORMATS:
        raise ValueError(f"moe_format must be one of {MOE_FORMATS}, got {moe_format!r}")


def heads_of(chunks: Sequence[Any], modules: Sequence[Any]) -> Heads:
    """Head/group counts from a megatron TransformerConfig: a chunk itself, ``chunk.config`` or a layer's.

    Raises:
        TypeError: no TransformerConfig found. ValueError: attention output gates (no HF counterpart).
    """
    candidates = [c for chunk in chunks for c in (chunk, getattr(chunk, "config", None))]
    candidates += [getattr(m.base_layer, "config", None) for m in modules]
    cfg = next((c for c in candidates if hasattr(c, "num_attention_heads")), None)
    if cfg is None:
        raise TypeError("model must carry megatron's TransformerConfig as model.config (a GPTModel does); found none")
    if getattr(cfg, "attention_output_gate", False):
        raise ValueError("attention_output_gate=True interleaves a gate into linear_qkv; no Hugging Face llama/qwen2/"
                         "mixtral module holds it")
    heads = int(cfg.num_attention_heads)
    groups = int(cfg.num_query_groups or heads)
    head_dim = int(cfg.kv_channels or cfg.hidden_size // heads)
    return Heads(heads, groups, head_dim, bool(cfg.gated_linear_unit), int(cfg.num_layers),
                 int(getattr(cfg, "num_moe_experts", None) or 0))


def _qkv_rows(h: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's qkv output rows of HF's q (heads in HF order), k and v."""
    per = h.heads // h.groups
    idx = torch.arange(h.groups * (per + 2) * h.head_dim).view(h.groups, per + 2, h.head_dim)
    return idx[:, :per].reshape(-1), idx[:, per].reshape(-1), idx[:, per + 1].reshape(-1)


def _halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n // 2), torch.arange(n // 2, n)


def hf_targets(name: str, out_features: int, *, arch: str, heads: Any, moe_format: str = "fused") -> list[Target]:
    """The HF LoRA targets of one Megatron LoRA layer.

    Args:
        name: the layer's global module name (``decoder.layers.3.self_attention.linear_qkv``; a
            ``base_model.model.`` or other leading prefix is ignored).
        out_features: the layer's full output size N.
        arch: one of ``ARCHS``.
        heads: ``heads_of(...)``, the model's megatron ``TransformerConfig``, or the model.
        moe_format: ``"fused"`` or ``"per_expert"`` (Mixtral experts only).

    Returns:
        One ``Target`` per HF module, with the Megatron output rows it takes.

    Raises:
        ValueError: the layer has no counterpart in ``arch`` (the message says which layers do).

    Example:
        >>> # hf_targets("decoder.layers.0.mlp.linear_fc1", 256, arch="llama", heads=model.config)
        >>> # [Target('model.layers.0.mlp.gate_proj', rows=0..127), Target('model.layers.0.mlp.up_proj', rows=128..255)]
    """
    check_arch(arch, moe_format)
    h = heads if isinstance(heads, Heads) else heads_of([heads], [])
    plain = plain_name(name)
    if plain == "output_layer" or plain.endswith(".output_layer"):
        return [Target("lm_head")]
    m = _LAYER.match(plain)
    rest = m.group(2) if m else ""
    hf = f"model.layers.{m.group(1)}." if m else ""
    if rest == "self_attention.linear_qkv":
        want = h.groups * (h.heads // h.groups + 2) * h.head_dim
        if out_features != want:
            raise ValueError(f"{name}: {out_features} output rows, but {h.heads} heads in {h.groups} query groups of "
                             f"size {h.head_dim} make {want}; model.config does not describe this layer")
        return [Target(hf + f"self_attn.{p}_proj", rows) for p, rows in zip("qkv", _qkv_rows(h))]
    if rest == "self_attention.linear_proj":
        return [Target(hf + "self_attn.o_proj")]
    if rest in ("mlp.linear_fc1", "mlp.linear_fc2") and arch not in _MOE_ARCHS:
        if rest == "mlp.linear_fc2":
            return [Target(hf + "mlp.down_proj")]
        if not h.gated:
            raise ValueError(f"{name}: a non-gated linear_fc1 has no gate_proj/up_proj in Hugging Face {arch} "
                             "(its MLP is SwiGLU: build the model with gated_linear_unit=True)")
        gate, up = _halves(out_features)
        return [Target(hf + "mlp.gate_proj", gate), Target(hf + "mlp.up_proj", up)]
    e = _EXPERT.match(rest)
    if e and arch in _MOE_ARCHS:
        expert, fc1 = int(e.group(1)), e.group(2) == "1"
        if moe_format == "fused":
            return [Target(f"{hf}mlp.experts.{'gate_up_proj' if fc1 else 'down_proj'}", None, expert)]
        head = f"{hf}block_sparse_moe.experts.{expert}."
        if not fc1:
            return [Target(head + "w2")]
        gate, up = _halves(out_features)
        return [Target(head + "w1", gate), Target(head + "w3", up)]
    where = ("mlp.experts.local_experts.{e}.linear_fc1/linear_fc2" if arch in _MOE_ARCHS
             else "mlp.linear_fc1/linear_fc2")
    raise ValueError(f"module {name!r} has no counterpart in Hugging Face {arch}; supported: output_layer and "
                     f"decoder.layers.{{i}}.self_attention.linear_qkv/linear_proj, decoder.layers.{{i}}.{where}")


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    """The alpha that gives rank ``r`` the LoRA scale ``scale``."""
    return scale * (math.sqrt(r) if rslora else r)


def _lora_key(target_name: str, which: str) -> str:
    return f"{PEFT_PREFIX}{target_name}.{which}.weight"


def _magnitude_key(target_name: str) -> str:
    return f"{PEFT_PREFIX}{target_name}.lora_magnitude_vector"


def _fused_key(param: str, targeted: set[str], which: str) -> str:
    """Key of a fused expert parameter's factor: PEFT nests one ParamWrapper per targeted parameter."""
    module, _, leaf = param.rpartition(".")
    inner = [p for p in _FUSED_PARAMS if p in targeted]
    depth = len(inner) - 1 - inner.index(leaf)
    return _lora_key(module + ".base_layer" * depth, which)


def _pad(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``r`` factors with the same product: zero rows of A, zero columns of B."""
    k = a.shape[0]
    return (torch.cat([a, a.new_zeros(r - k, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], r - k)], dim=1))


def _adapter_config(ranks: dict[str, int], r0: int, s0: float, ref: tuple[int, float] | None, heads: Heads, *,
                    dropout: float, use_dora: bool = False) -> dict:
    """adapter_config.json: one LoRA scale ``s0`` everywhere (``use_rslora`` off, alpha = s0 * r).

    ``ref`` (a layers' ``(r, alpha)`` of scale ``s0`` without rsLoRA) gives alpha as ``alpha * r' / r``,
    so the common case writes the user's alpha unchanged.
    """

    def alpha(r: int) -> float:
        return ref[1] * r / ref[0] if ref is not None else _alpha_for(s0, r, False)

    params = sorted(n for n in ranks if n.endswith(tuple(f".mlp.experts.{p}" for p in _FUSED_PARAMS)))
    modules = sorted(n for n in ranks if n not in params)
    other = {n: r for n, r in ranks.items() if r != r0}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "use_dora": use_dora, "use_rslora": False, "r": r0, "lora_alpha": alpha(r0), "lora_dropout": dropout,
            "target_modules": _selectors(modules, heads), "target_parameters": _selectors(params, heads) or None,
            "rank_pattern": other, "alpha_pattern": {n: alpha(r) for n, r in other.items()}}


def _selectors(names: list[str], heads: Heads) -> list[str]:
    """Leaf names where one selects exactly these targets (every layer adapted), else the full names."""
    count = Counter(n.rpartition(".")[2] for n in names)
    out = set()
    for n in names:
        leaf = n.rpartition(".")[2]
        everywhere = 1 if n == "lm_head" else heads.layers * (heads.experts if "block_sparse_moe" in n else 1)
        out.add(leaf if count[leaf] == everywhere else n)
    return sorted(out)


def _pack(found: list[_Factor], s0: float, experts: int, expert_rank: int | None) -> dict[str, torch.Tensor]:
    """The file's tensors at the one scale ``s0``."""
    tensors = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for f in found:
        b = f.b if f.scale == s0 else f.b * (f.scale / s0)
        if f.target.expert is not None:
            fused.setdefault(f.target.name, {})[f.target.expert] = (f.a, b)
            continue
        a = f.a.clone()  # the blocks of one layer share A; a file cannot hold shared storage
        if expert_rank is not None and "block_sparse_moe" in f.target.name:
            a, b = _pad(a, b, expert_rank)
        tensors[_lora_key(f.target.name, "lora_A")], tensors[_lora_key(f.target.name, "lora_B")] = a, b
        if f.magnitude is not None:
            # The norm is of s·B A, which folding s/s0 into B leaves as it is: the magnitude carries over.
            tensors[_magnitude_key(f.target.name)] = f.magnitude.clone()
    targeted: dict[str, set[str]] = {}
    for param in fused:
        module, _, leaf = param.rpartition(".")
        targeted.setdefault(module, set()).add(leaf)
    for param, by_expert in fused.items():
        # PEFT's ParamWrapper: expert e's A is rows e*r.., its B columns e, e+E, ... (B viewed [N, r, E]).
        r = max(a.shape[0] for a, _ in by_expert.values())
        k, n = next(iter(by_expert.values()))[0].shape[1], next(iter(by_expert.values()))[1].shape[0]
        a_all, b_all = torch.zeros(experts, r, k), torch.zeros(n, r, experts)
        for e, (a, b) in by_expert.items():
            a_all[e, :a.shape[0]], b_all[:, :b.shape[1], e] = a, b
        module = param.rpartition(".")[0]
        tensors[_fused_key(param, targeted[module], "lora_A")] = a_all.reshape(experts * r, k)
        tensors[_fused_key(param, targeted[module], "lora_B")] = b_all.reshape(n, r * experts)
    return {k: v.contiguous() for k, v in tensors.items()}


@dataclass(frozen=True)
class LayerInfo:
    """What the export needs of one layer before its tensors move: its options and full sizes."""

    options: AdapterOptions
    in_features: int
    out_features: int


class HFExport:
    """The conversion of one adapter to a Hugging Face PEFT adapter, planned from every layer's options.

    Planning needs only the options of every layer of the model (which every rank knows after the
    agreement step), so the config and every check come before any tensor moves; ``tensors``
    then converts one transformer layer's full factors at a time (all experts of a layer together).

    Args:
        infos: ``{canonical name: LayerInfo}`` of every LoRA layer of the model.
        heads: ``heads_of(...)``.
        arch: one of ``ARCHS``. moe_format: one of ``MOE_FORMATS``.

    Raises:
        ValueError: a layer with no counterpart in ``arch``, or a config that does not describe it.
    """

    def __init__(self, infos: Mapping[str, LayerInfo], heads: Heads, *, arch: str, moe_format: str) -> None:
        check_arch(arch, moe_format)
        self.heads, self.infos = heads, dict(infos)
        self.targets = {n: hf_targets(n, i.out_features, arch=arch, heads=heads, moe_format=moe_format)
                        for n, i in infos.items()}
        opts = [i.options for i in infos.values()]
        r0, alpha0, rslora = Counter((o.r, o.lora_alpha, o.use_rslora) for o in opts).most_common(1)[0][0]
        self.s0 = _scale(r0, alpha0, rslora)
        dropout = Counter(o.lora_dropout for o in opts).most_common(1)[0][0]
        per_expert = [i.options.r for n, i in infos.items()
                      if any("block_sparse_moe" in t.name for t in self.targets[n])]
        fused = any(t.expert is not None for ts in self.targets.values() for t in ts)
        # PEFT's conversion onto transformers 5's fused experts gives every expert the file's r.
        self.expert_rank = max(r0, *per_expert) if per_expert else None
        r_file = self.expert_rank or r0
        ranks: dict[str, int] = {}
        for n, ts in self.targets.items():
            for t in ts:
                if t.expert is not None:
                    ranks[t.name] = max(ranks.get(t.name, 0), infos[n].options.r)
                else:
                    ranks[t.name] = r_file if "block_sparse_moe" in t.name else infos[n].options.r
        # PEFT refuses lora_dropout on parameter targets (which per-expert modules become in transformers 5).
        self.config = _adapter_config(ranks, r_file, self.s0, None if rslora else (r0, alpha0), heads,
                                      dropout=0.0 if (per_expert or fused) else dropout,
                                      use_dora=any(o.use_dora for o in opts))

    def tensors(self, layer: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """HF PEFT tensors of one transformer layer from its full factors ``{canonical name: FullFactors}`` (fp32)."""
        found = []
        for n, full in layer.items():
            o = self.infos[n].options
            a, b = full.a.float(), full.b.float()
            m = None if full.magnitude is None else full.magnitude.float()
            found += [_Factor(t, a, b if t.rows is None else b[t.rows], o.lora_alpha, o.scaling,
                              None if m is None else (m if t.rows is None else m[t.rows]))
                      for t in self.targets[n]]
        return _pack(found, self.s0, self.heads.experts, self.expert_rank)


# -- import ----------------------------------------------------------------------------------
class Reader:
    """An HF PEFT adapter's factors by target, checked against its config; remembers the keys it read.

    Args:
        where: names the adapter in messages (its path).
        cfg: its ``adapter_config.json``. tensors: its ``{key: tensor}``.
        heads: ``heads_of(...)`` of the Megatron model it is read into.
    """

    def __init__(self, where: str, cfg: dict, tensors: Mapping[str, torch.Tensor], heads: Heads) -> None:
        self.path, self.cfg, self.tensors, self.heads = where, cfg, tensors, heads
        self.used: set[str] = set()
        self.rslora = bool(cfg.get("use_rslora", False))
        self.params = list(cfg.get("target_parameters") or [])

    def _options(self, target: str, r: int, where: str) -> tuple[float, float]:
        want = pattern_value(self.cfg.get("rank_pattern"), target, self.cfg.get("r", r))
        if r != want:
            raise ValueError(f"{self.path}: {where} has rank {r}, but adapter_config.json's r/rank_pattern give {want}")
        alpha = pattern_value(self.cfg.get("alpha_pattern"), target, self.cfg.get("lora_alpha", r))
        return alpha, _scale(r, alpha, self.rslora)

    def _pair(self, ka: str, kb: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if ka not in self.tensors and kb not in self.tensors:
            return None
        if ka not in self.tensors or kb not in self.tensors:
            raise ValueError(f"{self.path}: {ka if ka in self.tensors else kb} has no "
                             f"{kb if ka in self.tensors else ka}")
        self.used.update((ka, kb))
        a, b = self.tensors[ka], self.tensors[kb]
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{self.path}: {ka}/{kb} must be 2-D, got shapes {list(a.shape)} and {list(b.shape)}")
        dtype = torch.promote_types(a.dtype, torch.float32)
        return a.to(dtype), b.to(dtype)

    def _magnitude(self, target: str, n: int) -> torch.Tensor | None:
        """DoRA's magnitude of ``target`` (``[n]``) when the config says ``use_dora``, else None."""
        if not self.cfg.get("use_dora", False):
            return None
        key = _magnitude_key(target)
        if key not in self.tensors:
            raise ValueError(f"{self.path}: use_dora is set but {key} is missing")
        m = self.tensors[key]
        if tuple(m.shape) != (n,):
            raise ValueError(f"{self.path}: {key} must be [{n}], got {list(m.shape)}")
        self.used.add(key)
        return m.to(torch.promote_types(m.dtype, torch.float32))

    def factor(self, t: Target, in_features: int, out_features: int) -> _Factor | None:
        """Target ``t``'s factors (None: not in the file), for a layer ``[out_features, in_features]``."""
        n = out_features if t.rows is None else len(t.rows)
        if t.expert is None:
            ka, kb = _lora_key(t.name, "lora_A"), _lora_key(t.name, "lora_B")
            pair = self._pair(ka, kb)
            if pair is None:
                return None
            a, b = pair
            r = a.shape[0]
            if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (n, r):
                raise ValueError(f"{self.path}: {ka}/{kb} do not fit {t.name}: expected [r, {in_features}] and "
                                 f"[{n}, r], got {list(a.shape)} and {list(b.shape)}")
            return _Factor(t, a, b, *self._options(t.name, r, ka), self._magnitude(t.name, n))
        if self.cfg.get("use_dora", False):
            raise ValueError(f"{self.path}: use_dora on Mixtral's fused expert parameters has no Megatron counterpart "
                             "(DoRA is not supported on MoE experts)")
        module, _, leaf = t.name.rpartition(".")
        targeted = {p for p in _FUSED_PARAMS if any(f"{module}.{p}" == q or f"{module}.{p}".endswith(f".{q}")
                                                    for q in self.params)}
        if leaf not in targeted:
            return None
        ka, kb = _fused_key(t.name, targeted, "lora_A"), _fused_key(t.name, targeted, "lora_B")
        pair = self._pair(ka, kb)
        if pair is None:
            return None
        a, b = pair
        e = self.heads.experts
        r = a.shape[0] // e
        if a.shape[0] % e or tuple(a.shape) != (e * r, in_features) or tuple(b.shape) != (n, e * r):
            raise ValueError(f"{self.path}: {ka}/{kb} do not fit {t.name} with {e} experts: expected [{e}*r, "
                             f"{in_features}] and [{n}, {e}*r], got {list(a.shape)} and {list(b.shape)}")
        return _Factor(t, a[t.expert * r:(t.expert + 1) * r], b[:, t.expert::e], *self._options(t.name, r, ka))

    def layer(self, name: str, arch: str, in_features: int, out_features: int) -> list[_Factor]:
        """The factors of every target of Megatron layer ``name`` found in the file (either MoE format)."""
        for fmt in MOE_FORMATS:
            targets = hf_targets(name, out_features, arch=arch, heads=self.heads, moe_format=fmt)
            found = [f for f in (self.factor(t, in_features, out_features) for t in targets) if f is not None]
            if found:
                return found
        return []


def combine(found: list[_Factor], out_features: int,
            rslora: bool) -> tuple[int, float, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One LoRA ``(r, alpha, A [r, K], B [N, r], magnitude [N] or None)`` reproducing every found block in its rows.

    Blocks with one shared A keep its rank; else the A's are stacked (rank = the sum) and B is
    block-diagonal. Each block's scale is folded into its B relative to the first block's. DoRA's
    row norms are per output row, so the blocks' magnitudes go to their rows unchanged.
    """
    first = found[0]
    if len(found) == 1 and first.target.rows is None:
        return first.a.shape[0], first.alpha, first.a, first.b, first.magnitude
    magnitude = None
    if any(f.magnitude is not None for f in found):
        magnitude = first.a.new_zeros(out_features)
        for f in found:
            magnitude[slice(None) if f.target.rows is None else f.target.rows] = f.magnitude
    shared = all(torch.equal(f.a, first.a) for f in found)
    r = first.a.shape[0] if shared else sum(f.a.shape[0] for f in found)
    a = first.a if shared else torch.cat([f.a for f in found])
    b = first.b.new_zeros(out_features, r)
    start = 0
    for f in found:
        cols = slice(0, r) if shared else slice(start, start + f.a.shape[0])
        rows = slice(None) if f.target.rows is None else f.target.rows
        b[rows, cols] = f.b if f.scale == first.scale else f.b * (f.scale / first.scale)
        start += f.a.shape[0]
    return r, first.alpha if shared else _alpha_for(first.scale, r, rslora), a, b, magnitude
