"""Adapters under Hugging Face names (``adapter_io.hf_format``), against transformers 5.24 and PEFT 0.21.2.

One 4-rank gloo world (``gpt.run_world``) runs every Megatron side, switching between TP 1, 2
and 4 (``llama.tensor_parallel``); this process builds the Hugging Face twins with the same base
weights (``tests/support/llama.py``) and loads adapters with PEFT's own
``PeftModel.from_pretrained`` / ``get_peft_model``. Nothing on the HF side calls the library.

- Export: a LoRA trained at TP = 2 or 4 (layers of different r and alpha, dropout 0.1; Qwen2's
  with rsLoRA), exported under HF names, loaded onto the HF model by PEFT: the logits must match
  Megatron's.
- Import: a random HF PEFT adapter (its own A, r and alpha for q, k, v, gate, up) loaded into the
  Megatron twin at TP 1, 2 and 4: Megatron's logits must match HF + PEFT's.
- Mixtral: experts as transformers 5's fused 3-D parameters (PEFT ``target_parameters``) and as
  transformers 4's per-expert modules (which PEFT converts), also under expert parallelism (EP 2
  and 4); every block of every exported file is checked against the Megatron product too.
- Round trips: our export loads back with ``load_hf_adapter`` at another TP size.

Tolerances (fp32). Both sides do the same math in another order (TP splits the reductions; HF
runs q/k/v and each LoRA branch apart), so logits agree to a few fp32 roundings:

- ``BASE_TOL`` 2e-6 (max |diff| / max |logit|), the base models without any adapter: measured 0
  at TP=1 (dense), <= 7.1e-7 at TP 2/4 and 3.8e-7 for Mixtral at TP=1 (its router computes in
  another order).
- ``LOGITS_TOL`` 3e-5, with an adapter. The adapters move the logits by 130-490 % (``effect`` in
  ``test_report``), which makes this tiny model's fp32 forward noisier: against an fp64 HF + PEFT
  forward of the same imported adapter, HF's fp32 logits are off by 2-3e-6 and Megatron's by
  4-7e-6, so the two may differ by ~1e-5 without any bug (measured: <= 3.5e-6 on import, <= 2.1e-6
  on export). The bugs it guards against (a head order or the gate/up halves swapped, a scale not
  folded, experts' columns mixed up, a scale folded one way only) moved the logits by 0.25 to 1.5
  when put in on purpose.
- ``PRODUCT_TOL`` 1e-6 on each HF target's ``s * B A`` against its block of the Megatron product
  (fp64): exact where no scale is folded into B, one fp32 rounding of B where one is.
- ``EFFECT_MIN`` 1e-2: every adapter must move the logits by at least this much (relative), or a
  lost adapter would pass.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tplora_kernels.adapter_io import hf_format as hf

from ..support import gpt as G
from ..support import llama as L
from ..support.checks import rel_err

BASE_TOL = 2e-6
LOGITS_TOL = 3e-5
PRODUCT_TOL = 1e-6
EFFECT_MIN = 1e-2
WORLD = 4
WORLD_TIMEOUT_S = 400.0

# label: (arch, TP size, EP size, tied embeddings, moe formats exported)
EXPORTS = {"llama": ("llama", 2, 1, False, ("fused",)), "llama-tied": ("llama", 2, 1, True, ("fused",)),
           "qwen2": ("qwen2", 4, 1, False, ("fused",)),
           "mixtral": ("mixtral", 2, 1, False, ("fused", "per_expert")),
           "mixtral-ep2": ("mixtral", 2, 2, False, ("fused",))}
EXPORTED = [(label, fmt) for label, (*_, fmts) in EXPORTS.items() for fmt in fmts]
IMPORTS = [("llama", 1, 1), ("llama", 2, 1), ("llama", 4, 1), ("qwen2", 2, 1), ("mixtral", 1, 1), ("mixtral", 4, 1),
           ("mixtral", 1, 4)]
# (export label, format, TP, EP) to load back
ROUNDTRIPS = [("llama", "fused", 4, 1), ("mixtral", "fused", 1, 1), ("mixtral", "per_expert", 1, 1),
              ("mixtral-ep2", "fused", 1, 2)]
ERRORS_TP = 2


def _size(tp: int, ep: int) -> str:
    return f"tp{tp}" + (f"-ep{ep}" if ep > 1 else "")


def _export_dir(root, label: str, fmt: str) -> str:
    return str(root / "export" / label / fmt)


def _bad_adapters(good: str, root) -> dict[str, str]:
    """Copies of a good Llama adapter with one thing wrong each (and the good one)."""
    with open(os.path.join(good, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(good, "adapter_model.safetensors"))
    k0 = "base_model.model.model.layers.0.self_attn.k_proj."
    variants = {
        "rank": ({**cfg, "rank_pattern": {**cfg["rank_pattern"], "k_proj": 3}}, tensors),
        "shape": (cfg, {**tensors, k0 + "lora_B.weight": tensors[k0 + "lora_B.weight"][:-1]}),
        "half": (cfg, {k: v for k, v in tensors.items() if k != k0 + "lora_B.weight"}),
        "dora": ({**cfg, "use_dora": True}, tensors),
    }
    out = {"llama": good}
    for what, (c, t) in variants.items():
        path = root / what
        path.mkdir(parents=True)
        with open(path / "adapter_config.json", "w") as f:
            json.dump(c, f)
        save_file(t, str(path / "adapter_model.safetensors"))
        out[what] = str(path)
    return out


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory) -> dict:
    """HF adapters written here, then one 4-rank world running every Megatron task."""
    root = tmp_path_factory.mktemp("hf")
    adapters = {arch: str(root / "peft" / arch) for arch in L.ARCHS}
    for arch, path in adapters.items():
        L.random_hf_adapter(arch, path)
    tasks = [(f"export/{label}", "tests.support.llama:export_task",
              dict(arch=arch, path=str(root / "export" / label), tp=tp, ep=ep, tied=tied, formats=fmts))
             for label, (arch, tp, ep, tied, fmts) in EXPORTS.items()]
    tasks += [(f"import/{arch}/{_size(tp, ep)}", "tests.support.llama:import_task",
               dict(arch=arch, path=adapters[arch], tp=tp, ep=ep)) for arch, tp, ep in IMPORTS]
    tasks += [(f"roundtrip/{label}/{fmt}/{_size(tp, ep)}", "tests.support.llama:import_task",
               dict(arch=EXPORTS[label][0], path=_export_dir(root, label, fmt), tp=tp, ep=ep))
              for label, fmt, tp, ep in ROUNDTRIPS]
    bad = _bad_adapters(adapters["llama"], root / "bad")
    tasks.append(("errors", "tests.support.llama:errors_task", dict(adapters=bad, tmp=str(root / "x"), tp=ERRORS_TP)))
    # Grouped by size (each switch rebuilds megatron's process groups); round trips after the exports.
    tasks.sort(key=lambda task: (task[0].startswith("roundtrip"), -task[2].get("tp", ERRORS_TP), -task[2].get("ep", 1)))
    ranks = G.run_world(WORLD, tasks, str(root / "world"), timeout=WORLD_TIMEOUT_S)
    return dict(root=root, ranks=ranks, adapters=adapters)


def result(world: dict, label: str, rank: int = 0):
    """One rank's result of a task; fails the test with every rank's error if any rank raised."""
    errors = [str(r[label]) for r in world["ranks"] if isinstance(r.get(label), G.TaskError)]
    if errors:
        pytest.fail(f"{label} raised:\n" + "\n".join(errors), pytrace=False)
    return world["ranks"][rank][label]


@pytest.fixture(scope="module")
def numbers(hf_world) -> dict[str, dict]:
    """Every comparison of this file, HF side computed once: {row: dict(rel, effect, tol)}."""
    from peft import PeftModel

    root, rows = hf_world["root"], {}
    for arch, tp, ep in IMPORTS:
        got = result(hf_world, f"import/{arch}/{_size(tp, ep)}")
        hf = L.hf_model(arch, got["base"])
        rows[f"base {arch} {_size(tp, ep)}"] = dict(rel=rel_err(got["base_logits"], L.hf_logits(hf)), tol=BASE_TOL)
        want = L.hf_logits(PeftModel.from_pretrained(hf, hf_world["adapters"][arch]).eval())
        rows[f"import {arch} {_size(tp, ep)}"] = dict(rel=rel_err(got["logits"], want), tol=LOGITS_TOL,
                                                      effect=rel_err(want, got["base_logits"]))
    for label, fmt in EXPORTED:
        arch, tp, ep, tied, _ = EXPORTS[label]
        got = result(hf_world, f"export/{label}")
        hf = L.hf_model(arch, got["base"], tied=tied)
        base = L.hf_logits(hf)
        want = L.hf_logits(PeftModel.from_pretrained(hf, _export_dir(root, label, fmt)).eval())
        rows[f"export {label}/{fmt} {_size(tp, ep)}"] = dict(rel=rel_err(want, got["logits"]), tol=LOGITS_TOL,
                                                             effect=rel_err(got["logits"], base))
    for label, fmt, tp, ep in ROUNDTRIPS:
        got = result(hf_world, f"roundtrip/{label}/{fmt}/{_size(tp, ep)}")
        ref = result(hf_world, f"export/{label}")
        rows[f"roundtrip {label}/{fmt} {_size(*EXPORTS[label][1:3])}->{_size(tp, ep)}"] = dict(
            rel=rel_err(got["logits"], ref["logits"]), tol=LOGITS_TOL,
            effect=rel_err(got["logits"], got["base_logits"]))
    return rows


def _check(numbers: dict, prefix: str) -> None:
    picked = {k: v for k, v in numbers.items() if k.startswith(prefix)}
    assert picked, f"no comparison starts with {prefix!r}"
    for row, n in picked.items():
        assert n["rel"] <= n["tol"], f"{row}: logits differ by rel {n['rel']:.2e} > {n['tol']:.0e}"
        if "effect" in n:
            assert n["effect"] >= EFFECT_MIN, f"{row}: the adapter moves the logits by only rel {n['effect']:.2e}; " \
                                              f"it must be >= {EFFECT_MIN:.0e} for the comparison to mean anything"


def test_base_models_agree(numbers):
    """The converted base weights give HF the Megatron twin's logits (no adapter) at TP 1, 2 and 4."""
    _check(numbers, "base ")


@pytest.mark.parametrize("label,fmt", EXPORTED, ids=[f"{label}-{fmt}" for label, fmt in EXPORTED])
def test_export_loads_into_peft(numbers, label, fmt):
    """export_hf_adapter -> PeftModel.from_pretrained(hf_model): HF's logits equal the trained TP model's."""
    _check(numbers, f"export {label}/{fmt} ")


@pytest.mark.parametrize("arch,tp,ep", IMPORTS, ids=[f"{a}-{_size(t, e)}" for a, t, e in IMPORTS])
def test_import_from_peft(numbers, hf_world, arch, tp, ep):
    """A random HF PEFT adapter (own A, r, alpha per q/k/v, gate/up) loads at any TP/EP: Megatron == HF + PEFT."""
    where = f"import {arch} {_size(tp, ep)}"
    _check(numbers, where)
    got = result(hf_world, f"import/{arch}/{_size(tp, ep)}")
    assert len(got["loaded"]) == got["layers"], f"{where}: loaded {len(got['loaded'])} of {got['layers']} layers"


@pytest.mark.parametrize("label,fmt,tp,ep", ROUNDTRIPS, ids=[f"{a}-{f}-{_size(t, e)}" for a, f, t, e in ROUNDTRIPS])
def test_export_then_import_at_another_tp(numbers, hf_world, label, fmt, tp, ep):
    """Our own export loads back at another TP size: same logits, same rank (shared A kept), same products."""
    _check(numbers, f"roundtrip {label}/{fmt} ")
    got, ref = result(hf_world, f"roundtrip/{label}/{fmt}/{_size(tp, ep)}"), result(hf_world, f"export/{label}")
    assert sorted(got["factors"]) == sorted(ref["factors"]), f"roundtrip {label}/{fmt}: other layers"
    for name, want in ref["factors"].items():
        have = got["factors"][name]
        where = f"roundtrip {label}/{fmt} {_size(tp, ep)} {name}"
        if fmt == "fused":  # per_expert pads every expert to one r; fused keeps each layer's own
            assert have["r"] == want["r"], f"{where}: rank {have['r']}, exported at rank {want['r']}"
        err = rel_err(have["scale"] * have["b"].double() @ have["a"].double(),
                   want["scale"] * want["b"].double() @ want["a"].double())
        assert err <= PRODUCT_TOL, f"{where}: s*B*A differs from the exported layer's by rel {err:.2e}"


# -- the mapping without a model ------------------------------------------------------------------
@pytest.mark.parametrize("heads,groups,head_dim", [(4, 2, 16), (8, 8, 4), (8, 1, 4), (6, 3, 2)])
def test_qkv_rows_follow_megatron_grouping(heads, groups, head_dim):
    """q/k/v take Megatron's rows ``[q of g, k_g, v_g]`` per group, heads in HF order (GQA, MHA, MQA)."""
    cfg = SimpleNamespace(num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim, hidden_size=64,
                          gated_linear_unit=True, num_layers=1, num_moe_experts=None)
    n = groups * (heads // groups + 2) * head_dim
    targets = hf.hf_targets("module.decoder.layers.3.self_attention.linear_qkv", n, arch="llama", heads=cfg)
    want = L.split_qkv(torch.arange(n), heads, groups, head_dim)
    for t, w, p in zip(targets, want, "qkv"):
        assert t.name == f"model.layers.3.self_attn.{p}_proj", f"heads={heads} groups={groups}: target {t.name}"
        assert torch.equal(t.rows, w), f"heads={heads} groups={groups} {p}_proj: rows {t.rows.tolist()[:8]}... " \
                                       f"vs Megatron's {w.tolist()[:8]}..."
    with pytest.raises(ValueError, match="output rows"):
        hf.hf_targets("decoder.layers.0.self_attention.linear_qkv", n + 1, arch="llama", heads=cfg)
    with pytest.raises(ValueError, match="no counterpart in Hugging Face qwen2"):
        hf.hf_targets("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1", 8, arch="qwen2", heads=cfg)
    with pytest.raises(ValueError, match="arch must be one of"):
        hf.hf_targets("output_layer", 8, arch="Llama", heads=cfg)
    with pytest.raises(TypeError, match="TransformerConfig"):
        hf.hf_targets("output_layer", 8, arch="llama", heads=object())


# -- the file itself, block by block ------------------------------------------------------------
def _hf_deltas(path: str, arch: str) -> dict[str, torch.Tensor]:
    """``{HF target: s * B A}`` of an adapter directory, as PEFT 0.21.2 computes it (fused experts: [E, N, K])."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    cfg = LoraConfig.from_pretrained(path)
    tensors = {k: v.double() for k, v in load_file(os.path.join(path, "adapter_model.safetensors")).items()}
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        target = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        if target.endswith(".mlp.experts.base_layer") or target.endswith(".mlp.experts"):
            # ParamWrapper nesting (PEFT wraps MixtralExperts.gate_up_proj first): inner = gate_up_proj.
            param = "gate_up_proj" if target.endswith("base_layer") else "down_proj"
            target = target.removesuffix(".base_layer") + "." + param
            e = L.EXPERTS
            r = a.shape[0] // e
            ab = torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], r, e), a.reshape(e, r, a.shape[1]))
        else:
            r, ab = a.shape[0], b @ a
        rk = get_pattern_key(cfg.rank_pattern.keys(), target)
        ak = get_pattern_key(cfg.alpha_pattern.keys(), target)
        assert cfg.rank_pattern.get(rk, cfg.r) == r, f"{path}: {target} has rank {r}, its config says " \
                                                     f"{cfg.rank_pattern.get(rk, cfg.r)}"
        alpha = cfg.alpha_pattern.get(ak, cfg.lora_alpha)
        out[target] = ab * (alpha / (r ** 0.5 if cfg.use_rslora else r))
    return out


def _megatron_blocks(factors: dict[str, dict], fmt: str) -> dict[str, torch.Tensor]:
    """``{HF target: block of s * B A}`` by the test's own reading of Megatron's layout and HF's names."""
    out: dict[str, list | torch.Tensor] = {}
    for name, f in factors.items():
        delta = f["scale"] * f["b"].double() @ f["a"].double()
        if name == "output_layer":
            out["lm_head"] = delta
            continue
        parts = name.split(".")
        i, rest, h = parts[2], ".".join(parts[3:]), f"model.layers.{parts[2]}."
        if rest == "self_attention.linear_qkv":
            for p, block in zip("qkv", L.split_qkv(delta)):
                out[f"{h}self_attn.{p}_proj"] = block
        elif rest == "self_attention.linear_proj":
            out[h + "self_attn.o_proj"] = delta
        elif rest == "mlp.linear_fc1":
            out[h + "mlp.gate_proj"], out[h + "mlp.up_proj"] = delta.chunk(2)
        elif rest == "mlp.linear_fc2":
            out[h + "mlp.down_proj"] = delta
        else:  # mlp.experts.local_experts.{e}.linear_fc{1,2}
            e, fc = int(parts[6]), parts[7]
            if fmt == "fused":
                param = f"{h}mlp.experts.{'gate_up_proj' if fc == 'linear_fc1' else 'down_proj'}"
                out.setdefault(param, [None] * L.EXPERTS)[e] = delta
            else:
                head = f"model.layers.{i}.block_sparse_moe.experts.{e}."
                if fc == "linear_fc1":
                    out[head + "w1"], out[head + "w3"] = delta.chunk(2)
                else:
                    out[head + "w2"] = delta
    return {k: torch.stack(v) if isinstance(v, list) else v for k, v in out.items()}


@pytest.mark.parametrize("label,fmt", EXPORTED, ids=[f"{label}-{fmt}" for label, fmt in EXPORTED])
def test_export_blocks_are_the_megatron_blocks(hf_world, label, fmt):
    """Every HF target's s*B*A in the file is its block of the Megatron layer's product; PEFT's own key set."""
    arch = EXPORTS[label][0]
    path = _export_dir(hf_world["root"], label, fmt)
    got = _hf_deltas(path, arch)
    want = _megatron_blocks(result(hf_world, f"export/{label}")["factors"], fmt)
    assert sorted(got) == sorted(want), f"export {label}/{fmt}: HF targets {sorted(set(got) ^ set(want))[:6]} " \
                                        "are in only one of the file and the expected mapping"
    for target, w in want.items():
        err = rel_err(got[target], w)
        assert err <= PRODUCT_TOL, f"export {label}/{fmt}: {target}'s s*B*A differs from its Megatron block by " \
                                   f"rel {err:.2e} > {PRODUCT_TOL:.0e}"
    if fmt == "fused" and not EXPORTS[label][3]:
        # PEFT's own adapter of the same targets (get_peft_model + save_pretrained) has exactly these keys.
        theirs = set(load_file(os.path.join(hf_world["adapters"][arch], "adapter_model.safetensors")))
        ours = set(load_file(os.path.join(path, "adapter_model.safetensors")))
        assert ours == theirs, f"export {label}/{fmt}: keys differ from PEFT's own file: {sorted(ours ^ theirs)[:6]}"


def test_export_writes_one_scale_and_exact_factors_where_it_can(hf_world):
    """Layers at the common (r, alpha) keep their factors bit for bit; the config has one scale alpha/r."""
    path = _export_dir(hf_world["root"], "llama", "fused")
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    factors = result(hf_world, "export/llama")["factors"]
    s0 = cfg["lora_alpha"] / cfg["r"]
    scales = {n: cfg["alpha_pattern"].get(n, cfg["lora_alpha"]) / r for n, r in cfg["rank_pattern"].items()}
    assert all(abs(s - s0) <= 1e-12 * s0 for s in scales.values()), f"llama export: scales {scales} vs {s0}"
    assert not cfg["use_rslora"] and cfg["target_modules"] == sorted(L.HF_TARGETS), \
        f"llama export: use_rslora {cfg['use_rslora']}, target_modules {cfg['target_modules']}"
    f = factors["decoder.layers.0.mlp.linear_fc1"]  # r 8, alpha 16: the common options, nothing folded
    key = "base_model.model.model.layers.0.mlp.up_proj."
    assert f["scale"] == s0 and torch.equal(tensors[key + "lora_A.weight"], f["a"]) and \
        torch.equal(tensors[key + "lora_B.weight"], f["b"][L.G.FFN:]), \
        f"llama export: up_proj's factors are not fc1's A and second half of B (scale {f['scale']} vs {s0})"


def test_errors_name_the_problem_and_leave_the_model(hf_world):
    """Bad arguments and bad files: a ValueError/TypeError naming what is wrong, the same on every rank."""
    got = [result(hf_world, "errors", r) for r in range(WORLD)]
    for r in range(1, WORLD):
        assert got[r] == got[0], f"errors: rank {r} saw {got[r]}, rank 0 saw {got[0]}"
    e = got[0]
    expect = {"arch": "arch must be one of", "moe_format": "moe_format must be one of", "rank": "k_proj",
              "shape": "k_proj.lora_A.weight/", "half": "k_proj.lora_A.weight has no", "dora": "use_dora",
              "unused": "o_proj", "not_gated": "non-gated linear_fc1"}
    for what, words in expect.items():
        assert e[what] is not None and words in e[what], f"errors[{what}]: expected an error naming {words!r}, " \
                                                         f"got {e[what]!r}"
    assert e["rank"].startswith("ValueError") and "rank 2" in e["rank"], f"errors[rank]: {e['rank']}"
    assert e["changed"] == [], f"errors: failed loads changed the factors of {e['changed']}"
    assert e["not_strict"] == 3 * G.LAYERS, f"errors: strict=False loaded {e['not_strict']} layers, expected " \
                                            f"{3 * G.LAYERS} (qkv, fc1, fc2 of each layer)"


def test_report(numbers, capsys):
    """The max logit differences HF vs Megatron of every configuration (printed; -s or -rP shows them)."""
    lines = [f"{'comparison':44s} {'max|diff|/max|logit|':>22s} {'adapter effect':>15s}"]
    for row, n in numbers.items():
        effect = f"{n['effect']:.2e}" if "effect" in n else "-"
        lines.append(f"{row:44s} {n['rel']:22.2e} {effect:>15s}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    worst = max(numbers.items(), key=lambda kv: kv[1]["rel"] / kv[1]["tol"])
    assert worst[1]["rel"] <= worst[1]["tol"], f"{worst[0]}: rel {worst[1]['rel']:.2e} > {worst[1]['tol']:.0e}"
