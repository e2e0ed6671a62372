"""LoRA on the MoE experts of a real megatron-core GPTModel: expert TP, expert parallelism, checkpoints.

One 2-rank gloo world (``tests/support/moe.py``) trains a 2-layer GPTModel with 4
``SequentialMLP`` experts (top-2, allgather dispatcher), LoRA with random A and B on attention
and on every expert's linear_fc1/linear_fc2, plain and gated (SwiGLU) experts, dropout 0 and
0.1, at these layouts (TP, expert TP, EP):

- (1, 1, 1): the reference;
- (2, 2, 1): expert TP 2. Its base model and initial adapter must *be* the reference's. One
  configuration runs the Triton kernels (the interpreter on CPU), the others the torch backend;
- (2, 1, 2): EP 2. Given the reference's tensors by global expert index first (megatron builds
  other weights under EP). Dropout compares with per-layer fixed seeds (``MoECase.fixed_seeds``):
  with the default per-call seeds an EP rank's masks are not EP=1's (see ``MoECase``);
- (1, 2, 1) and (1, 1, 2): TP 1, so both data-parallel replicas' tokens reach every expert. One
  step of Megatron's semantics: an expert's gradient is the sum over the replicas (DDP then scales
  every gradient by 1/DP), so with one batch on both it is DP x the reference's, and attention's
  is the reference's. This is where the expert-TP group differs from the TP group.

Tolerances (fp32; the layouts reduce the same sums in other orders), with what was measured:

- ``LOSS_TOL`` 1e-5 per step of 3 SGD steps at lr 0.5 (measured <= 7e-8).
- ``GRAD_TOL`` 1e-4: max |diff| / max |ref| of a factor's step-0 gradient and trained value
  (measured <= 2.1e-6).
- ``FD_TOL`` 3e-3: autograd vs a 4-point finite difference of the model's loss over 3 fixed
  directions, moving factors of the last layer's expert 3 (measured 6e-5..2e-4).
- ``LOGITS_TOL`` 1e-5: a loaded model's logits against the saver's (measured <= 4.6e-7).
- ``MOVED`` 1e-2: a loader's logits before loading must differ by at least this (measured >= 1.2).

``TPLORA_MOE_RESULTS=path.pt`` keeps the raw results; ``tests.support.moe.report`` tabulates them.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from ..support import gpt as G
from ..support import moe as M
from ..support.checks import max_rel_err, rel_err

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
FD_TOL = 3e-3
LOGITS_TOL = 1e-5
MOVED = 1e-2
WORLD_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[list[dict], str]:
    root = str(tmp_path_factory.mktemp("moe_world"))
    ranks = G.run_world(2, M.world_tasks(root), root, timeout=WORLD_TIMEOUT_S)
    if os.environ.get("TPLORA_MOE_RESULTS"):
        torch.save(ranks, os.environ["TPLORA_MOE_RESULTS"])
    return ranks, root


def result(world, label: str, rank: int = 0):
    """One rank's result of a task; fails the test with every rank's error if any rank raised."""
    ranks, _ = world
    errors = [str(r[label]) for r in ranks if isinstance(r.get(label), G.TaskError)]
    if errors:
        pytest.fail(f"{label} raised:\n" + "\n".join(errors), pytrace=False)
    return ranks[rank][label]


def _id(param) -> str:
    return "-".join(p.label.replace("/", "-") for p in param)


COMPARED = ([(M.ETP2, c) for c in M.CASES] + [(M.ETP2, M.KERNELS)] + [(M.EP2, c) for c in M.CASES if not c.dropout]
            + [(M.EP2, c) for c in M.FIXED])
FD = [(M.REF, c) for c in M.CASES] + [(M.ETP2, c) for c in M.CASES] + [(M.EP2, c) for c in M.CASES + M.FIXED]


@pytest.mark.parametrize("param", COMPARED, ids=_id)
def test_training_matches_tp1(world, param):
    """Same adapter, same masks: losses, step-0 gradients and trained factors per expert equal the reference's."""
    par, case = param
    got, ref = result(world, M.train_label(par, case)), result(world, M.train_label(M.REF, case.reference()))
    where = f"{par.label} {case.label}"
    assert sorted(got["grads0"]) == sorted(ref["grads0"]), f"{where}: factor names differ from the reference's"
    if par.ep == 1:  # expert TP alone: megatron's base and our adapter are the reference's as built
        for what in ("base", "init"):
            err, key = max_rel_err(got[what], ref[what])
            assert err == 0.0, f"{where}: {what} tensor {key} differs from the reference's (rel {err:.2e})"
    drift = [abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"])]
    assert max(drift) <= LOSS_TOL, f"{where}: loss per step {got['losses']} vs reference {ref['losses']} " \
                                   f"(rel {[f'{d:.1e}' for d in drift]} > {LOSS_TOL:.0e})"
    for what in ("grads0", "final"):
        err, key = max_rel_err(got[what], ref[what])
        assert err <= GRAD_TOL, f"{where}: {what} of {key} differs from the reference's by rel {err:.2e} " \
                                f"> {GRAD_TOL:.0e}"


def test_backend_is_the_one_configured(world):
    """The grid runs the torch backend; KERNELS runs the Triton kernels (the interpreter on CPU)."""
    for par, case in [(M.REF, c) for c in M.CASES] + COMPARED:
        want = ["torch"] if case.backend == "torch" else ["triton" if torch.cuda.is_available() else "interpret"]
        got = result(world, M.train_label(par, case))["backends"]
        assert got == want, f"{par.label} {case.label}: LoRA layers ran {got}, expected {want}"


@pytest.mark.parametrize("param", FD, ids=_id)
def test_expert_gradient_matches_finite_difference(world, param):
    """Autograd vs finite differences of the model's own loss, moving one expert's factors (jointly, then alone)."""
    par, case = param
    label = M.train_label(par, case)
    result(world, label)
    for which in M.FD_SETS:
        fd = M.fd_result(world[0], label, which)
        assert fd is not None, f"{par.label} {case.label} {which}: no rank holds expert {M.FD_EXPERT}"
        pairs = ", ".join(f"{a:.6e} vs {n:.6e}" for a, n in zip(fd["analytic"], fd["numeric"]))
        moved = ", ".join(k.split(".local_experts.")[1] for k in fd["keys"])
        assert fd["rel_err"] <= FD_TOL, f"{par.label} {case.label} {which} (layer {M.FD_LAYER}, expert {moved}): " \
                                        f"autograd vs finite differences rel err {fd['rel_err']:.2e} > {FD_TOL:.0e} " \
                                        f"({pairs})"


@pytest.mark.parametrize("param", [(p, c) for p in M.DP_PARS for c in M.DP_CASES], ids=_id)
def test_experts_sum_over_data_parallel_replicas(world, param):
    """TP 1 with expert TP 2 or EP 2: expert gradients are DP x the reference's, attention's equal it."""
    par, case = param
    where = f"{par.label} {case.label}"
    ref = result(world, M.train_label(M.REF, case))
    for rank in range(2):
        got = result(world, M.train_label(par, case), rank)
        err = abs(got["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0])
        assert err <= LOSS_TOL, f"{where} rank {rank}: loss {got['losses'][0]} vs reference {ref['losses'][0]} " \
                                f"(rel {err:.1e} > {LOSS_TOL:.0e})"
        for key, g in got["grads0"].items():
            factor = 2 if M.is_expert(key) else 1
            err = rel_err(g, factor * ref["grads0"][key])
            assert err <= GRAD_TOL, f"{where} rank {rank}: step-0 gradient of {key} vs {factor} x the reference's: " \
                                    f"rel {err:.2e} > {GRAD_TOL:.0e}"


@pytest.mark.parametrize("par", [M.REF, M.ETP2, M.EP2, *M.DP_PARS], ids=lambda p: p.label)
def test_expert_factors_reduce_over_expert_data_parallel(world, par):
    """Expert factors carry allreduce=False (Megatron DDP reduces them over expert-DP); attention's do not."""
    case = M.DP_CASES[1] if par in M.DP_PARS else M.CASES[1]
    for rank in range(2):
        flags = result(world, M.train_label(par, case), rank)["flags"]
        experts = {k: f["allreduce"] for k, f in flags.items() if M.is_expert(k)}
        dense = {k: f["allreduce"] for k, f in flags.items() if not M.is_expert(k)}
        assert experts and dense, f"{par.label} rank {rank}: expected expert and attention factors, got {sorted(flags)}"
        wrong = {k: v for k, v in experts.items() if v is not False}
        assert not wrong, f"{par.label} rank {rank}: {len(wrong)} of {len(experts)} expert factors without " \
                          f"allreduce=False, e.g. {list(wrong.items())[:2]}"
        wrong = sorted(k for k, v in dense.items() if v is False)
        assert not wrong, f"{par.label} rank {rank}: {len(wrong)} attention factors marked allreduce=False, " \
                          f"e.g. {wrong[:2]}"


CKPT = [(s, q) for q in reversed(M.CKPT_PARS) for s in M.CKPT_PARS if s != q]


def _expected_keys(world) -> set[str]:
    """The adapter file's keys: every LoRA layer of the reference, experts by global index."""
    names = {k[:-2] for k in result(world, M.train_label(M.REF, M.CKPT_CASE))["init"]}
    return {f"base_model.model.{n}.lora_{f}.weight" for n in names for f in "AB"}


@pytest.mark.parametrize("par", M.CKPT_PARS, ids=lambda p: p.label)
def test_adapter_file_names_experts_globally(world, par):
    """save_adapter writes every EP rank's experts under their global index, tensors as the oracle gathers them."""
    saved = result(world, f"save/{par.label}")["state"]["factors"]
    tensors = load_file(os.path.join(M.ckpt_dir(world[1], par), "peft", "adapter_model.safetensors"))
    want = _expected_keys(world)
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    assert not missing and not unexpected, f"{par.label}: {len(missing)} adapter keys missing (e.g. {missing[:2]}), " \
                                           f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
    for key, t in tensors.items():
        name, f = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        oracle = saved[f"{name}.{f[0]}"]
        assert torch.equal(t, oracle), f"{par.label}: file tensor {key} differs from the saver's factor by " \
                                       f"{(t - oracle).abs().max() if t.shape == oracle.shape else 'shape'}"


@pytest.mark.parametrize("param", CKPT, ids=_id)
def test_adapter_file_loads_at_another_layout(world, param):
    """save_adapter at one layout, load_adapter at another: the saver's factors and logits; merging keeps them."""
    saver, loader = param
    where = f"saved at {saver.label}, loaded at {loader.label}"
    saved = result(world, f"save/{saver.label}")["state"]
    got = result(world, f"load/{saver.label}/{loader.label}")
    before = rel_err(got["peft_before"]["logits"], saved["logits"])
    assert before >= MOVED, f"{where}: the loader's own adapter already gave the saver's logits (rel {before:.1e})"
    err, key = max_rel_err(got["peft"]["factors"], saved["factors"])
    assert err == 0.0, f"{where}: loaded factor {key} differs from the saved one (rel {err:.2e})"
    for what, logits in (("loaded", got["peft"]["logits"]), ("merged", got["merged_logits"])):
        err = rel_err(logits, saved["logits"])
        assert err <= LOGITS_TOL, f"{where}: {what} logits vs the saver's rel {err:.2e} > {LOGITS_TOL:.0e}"


def test_a_file_without_an_expert_is_refused_on_every_ep_rank(world):
    """Expert 3 lives on EP rank 1 only; rank 0 must refuse the file too (else the ranks part ways)."""
    errors = [result(world, f"missing_expert/{M.EP2.label}", rank)["error"] for rank in range(2)]
    assert errors[0] and errors[0] == errors[1], f"EP 2 ranks' errors for a file without expert 3: {errors}"
    assert "local_experts.3." in errors[0], f"the error must name the missing expert: {errors[0]}"


@pytest.mark.parametrize("param", CKPT, ids=_id)
def test_dist_checkpoint_loads_at_another_layout(world, param):
    """model.sharded_state_dict() saved at one layout loads at another: base, factors and logits (gated experts)."""
    saver, loader = param
    where = f"saved at {saver.label}, loaded at {loader.label}"
    saved = result(world, f"save/{saver.label}")["state"]
    got = result(world, f"load/{saver.label}/{loader.label}")
    for what in ("base", "factors"):
        before, _ = max_rel_err(got["dist_before"][what], saved[what])
        assert before >= MOVED, f"{where}: the loader's {what} already equalled the saver's (rel {before:.1e})"
        err, key = max_rel_err(got["dist"][what], saved[what])
        assert err == 0.0, f"{where}: {what} tensor {key} differs from the saved one after loading (rel {err:.2e})"
    err = rel_err(got["dist"]["logits"], saved["logits"])
    assert err <= LOGITS_TOL, f"{where}: loaded logits vs the saver's rel {err:.2e} > {LOGITS_TOL:.0e}"
