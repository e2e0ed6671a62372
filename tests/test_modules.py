"""ColumnParallelLoRA / RowParallelLoRA around real megatron-core layers, at TP 1, 2 and 4.

The contract of the wrapped layer (``(output, bias)`` like the base, frozen base, PEFT's
state-dict keys, shard shapes, scaling), its forward and backward against the fp64 math on the
gathered full matrices, TP-invariant initialisation, and the per-call dropout seed drawn from
torch's default generator.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import tp_cases as C

FP32_BAR = 1e-5
S, BT, K, N = 8, 3, 24, 20  # module_contract_task's sizes
R, ALPHA = 4, 8.0

# (kind, sequence_parallel, gather_output / input_is_parallel). Megatron allows no SP with a
# non-parallel row input, and its column layer gathers no output under SP.
MODES = [("column", False, False), ("column", False, True), ("column", True, False),
         ("row", False, True), ("row", False, False), ("row", True, True)]
CONTRACT = ([(tp, m, "bias", False) for tp in (1, 2, 4) for m in MODES]
            + [(2, m, bias, False) for m in MODES for bias in ("skip_bias_add", "no_bias")]
            + [(4, m, "bias", True) for m in (MODES[0], MODES[5])])


def _mode_id(m) -> str:
    kind, sp, opt = m
    return f"{kind}-sp_{'on' if sp else 'off'}-{'gather_output' if kind == 'column' else 'input_is_parallel'}_{opt}"


@pytest.mark.parametrize(("tp", "mode", "bias_mode", "rslora"), CONTRACT,
                         ids=[f"tp{t}-{_mode_id(m)}-{b}{'-rslora' if rs else ''}" for t, m, b, rs in CONTRACT])
def test_module_contract(dist_pool, kernel_backend, tp, mode, bias_mode, rslora):
    kind, sp, opt = mode
    bias, skip = bias_mode != "no_bias", bias_mode == "skip_bias_add"
    results = dist_pool.run(C.module_contract_task, tp, kind=kind, sp=sp, opt=opt, bias=bias, skip_bias_add=skip,
                            r=R, alpha=ALPHA, rslora=rslora, backend=C.cpu_kernel_backend(kernel_backend))
    where = f"{_mode_id(mode)} tp={tp} {bias_mode}{' rslora' if rslora else ''}"
    sp_on = sp and tp > 1
    want_a = (R, K) if kind == "column" else (R, K // tp)
    want_b = (N // tp, R) if kind == "column" else (N, R)
    rows = S * BT // tp if sp_on and kind == "row" else S * BT
    width = N if kind == "row" or opt else N // tp
    want_scaling = ALPHA / (math.sqrt(R) if rslora else R)
    for rank, res in enumerate(results):
        at = f"rank {rank} {where}"
        for key in ("lora_A.default.weight", "lora_B.default.weight"):
            assert key in res["state_keys"], f"{at}: state_dict lacks {key!r}: {res['state_keys']}"
        assert res["a_shape"] == want_a, f"{at}: lora_A shard {res['a_shape']}, expected {want_a}"
        assert res["b_shape"] == want_b, f"{at}: lora_B shard {res['b_shape']}, expected {want_b}"
        assert res["base_frozen"], f"{at}: a base parameter still requires grad"
        assert res["lora_trainable"], f"{at}: a LoRA factor does not require grad"
        assert not any(res["base_grads"]), f"{at}: base parameters got gradients {res['base_grads']}"
        assert res["scaling"] == pytest.approx(want_scaling, rel=1e-12), (
            f"{at}: scaling {res['scaling']}, expected alpha/{'sqrt(r)' if rslora else 'r'} = {want_scaling}")
        y_rows = res["out_shape"][0] * res["out_shape"][1]
        assert (y_rows, res["out_shape"][-1]) == (rows, width), (
            f"{at}: output {res['out_shape']} for input {res['x_shape']}, expected {rows} rows of width {width}")
        assert res["bias_returned"] == skip, f"{at}: forward returned bias={res['bias_returned']}, skip_bias_add={skip}"
        if skip:
            assert res["bias_is_base_bias"], f"{at}: the returned bias is not the base layer's bias parameter"
        marked = {"column": res["a_sp"], "row": res["b_sp"]}[kind]
        other = {"column": res["b_sp"], "row": res["a_sp"]}[kind]
        assert marked == sp_on and not other, (
            f"{at}: sequence_parallel marks A={res['a_sp']} B={res['b_sp']}, expected only the replicated factor "
            f"under SP")
        assert res["sp_summed"] == (1 if sp_on else 0), f"{at}: sum_sequence_parallel_grads summed {res['sp_summed']}"
        for name, err in res["errors"].items():
            assert err <= FP32_BAR, f"{name} {at}: rel err {err:.1e} > {FP32_BAR:.1e} vs fp64 on the gathered layer"


@pytest.mark.parametrize("init", [True, "gaussian"], ids=["kaiming", "gaussian"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_init_is_tp_invariant(dist_pool, kind, init):
    """With the same ``torch.manual_seed`` before construction, TP=2 and TP=4 hold the TP=1 model."""
    one = dist_pool.run(C.module_init_task, 1, kind=kind, init=init, r=6, lora_seed=77)[0]
    assert torch.count_nonzero(one["B"]) == 0, f"{kind} init={init}: B is not zero at init"
    assert one["A"].std() > 0, f"{kind} init={init}: A is constant"
    for tp in (2, 4):
        for rank, res in enumerate(dist_pool.run(C.module_init_task, tp, kind=kind, init=init, r=6, lora_seed=77)):
            assert torch.equal(res["A"], one["A"]), (
                f"{kind} init={init} tp={tp} rank {rank}: gathered A differs from TP=1's "
                f"(std {res['A'].std():.4f} vs {one['A'].std():.4f})")
            assert torch.equal(res["B"], one["B"]), f"{kind} init={init} tp={tp} rank {rank}: B differs from TP=1's"
    other = dist_pool.run(C.module_init_task, 1, kind=kind, init=init, r=6, lora_seed=78)[0]
    assert not torch.equal(other["A"], one["A"]), f"{kind} init={init}: another seed gave the same A"


SEED_CASES = [("column", 1, False), ("column", 2, True), ("column", 4, False), ("row", 2, False), ("row", 4, True)]


@pytest.mark.parametrize(("kind", "tp", "sp"), SEED_CASES, ids=[f"{k}-tp{t}-sp_{'on' if s else 'off'}"
                                                               for k, t, s in SEED_CASES])
def test_dropout_seed_comes_from_the_default_generator(dist_pool, kernel_backend, kind, tp, sp):
    """Same ``torch.manual_seed`` => the same output; a different one => a different mask.

    Each output equals the fp64 math with the seed ``draw_seed`` draws after that manual_seed,
    so the layer's mask is the drawn seed's, on every rank. Eval mode applies no dropout.
    """
    seeds = [11, 11, 12]
    backend = C.cpu_kernel_backend(kernel_backend)
    res = dist_pool.run(C.module_seed_task, tp, kind=kind, sp=sp, p=0.5, seeds=seeds, backend=backend)
    where = f"{kind} tp={tp} sp={sp}"
    for rank, r in enumerate(res):
        o = r["outs"]
        assert torch.equal(o[0], o[1]), f"rank {rank} {where}: same manual_seed gave different outputs"
        assert not torch.equal(o[0], o[2]), f"rank {rank} {where}: different manual_seed gave the same output"
        for s, err in zip(seeds, r["errs"]):
            assert err <= FP32_BAR, (f"rank {rank} {where} manual_seed({s}): rel err {err:.1e} vs fp64 with the seed "
                                     f"draw_seed draws")
        assert r["eval_err"] <= FP32_BAR, f"rank {rank} {where}: eval output rel err {r['eval_err']:.1e} vs no dropout"
