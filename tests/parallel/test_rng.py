"""Dropout seeds (tplora_kernels.rng): explicit seeds, Megatron's tracker, recompute.

The tracker stand-in (tplora_kernels/testing/megatron_cpu.py) keeps megatron's states and seeds but swaps
the CPU generator where the real tracker swaps the CUDA one, so "a seed drawn from whatever
generator is current" differs per TP rank inside the model-parallel fork here exactly as it does
on a GPU. One process plays each "TP rank" by seeding the tracker with that rank's tp_rank.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.utils.checkpoint import checkpoint

from tplora_kernels import column_parallel_lora, rng
from tplora_kernels.testing.megatron_cpu import megatron_on_cpu


@contextlib.contextmanager
def tracker_for(tp_rank: int, seed: int = 1234):
    """Megatron's RNG tracker as ``model_parallel_cuda_manual_seed`` leaves it on TP rank ``tp_rank``."""
    with megatron_on_cpu():
        mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True)
        yield mrandom.get_cuda_rng_tracker()


def _draws(tp_rank: int, inside_fork: bool, n: int = 3) -> list[int]:
    with tracker_for(tp_rank) as tracker:
        ctx = tracker.fork() if inside_fork else contextlib.nullcontext()  # SP's per-layer fork
        with ctx:
            return [int(rng.draw_seed("cpu").item()) for _ in range(n)]


def test_tracker_seed_is_the_same_on_every_tp_rank_inside_and_outside_the_fork():
    ranks = {r: _draws(r, inside_fork=True) for r in range(4)}
    assert len({tuple(v) for v in ranks.values()}) == 1, f"seeds differ across TP ranks inside the fork: {ranks}"
    outside = _draws(2, inside_fork=False)
    assert outside == ranks[0], f"the same calls must draw the same seeds inside ({ranks[0]}) and outside ({outside})"
    assert len(set(outside)) == 3, f"consecutive calls must draw fresh seeds: {outside}"


def test_a_draw_from_the_current_generator_would_differ_per_rank():
    """The bug the tracker rule fixes: inside the fork the current generator is per rank."""
    per_rank = []
    for r in range(2):
        with tracker_for(r) as tracker, tracker.fork():
            per_rank.append(int(torch.randint(0, 2**62, (1,)).item()))
    assert per_rank[0] != per_rank[1], "the stand-in must make the model-parallel state per rank, as on a GPU"


def test_tracker_draw_leaves_the_other_states_alone():
    with tracker_for(0) as tracker:
        before = {k: v.clone() for k, v in tracker.get_states().items()}
        cpu_before = torch.get_rng_state()
        rng.draw_seed("cpu")
        after = tracker.get_states()
        assert torch.equal(cpu_before, torch.get_rng_state()), "the default generator must not advance"
        for name in before:
            changed = not torch.equal(before[name], after[name])
            assert changed == (name == rng.TRACKER_STATE), f"state {name}: changed={changed}"


def test_a_tracker_without_the_data_parallel_state_is_refused():
    """Falling back to the current generator would draw per-rank seeds inside SP's fork."""
    with tracker_for(0) as tracker:
        states = tracker.get_states()
        tracker.set_states({k: v for k, v in states.items() if k != rng.TRACKER_STATE})
        try:
            with pytest.raises(RuntimeError, match="data-parallel-rng"):
                rng.draw_seed("cpu")
            assert int(rng.resolve_seed(5, "cpu").item()) == 5, "an explicit seed needs no tracker"
        finally:
            tracker.set_states(states)


def test_without_a_tracker_the_default_generator_is_used():
    assert rng._megatron_tracker() is None, "no tracker is initialised outside tracker_for()"
    torch.manual_seed(5)
    a = rng.draw_seed("cpu")
    torch.manual_seed(5)
    b = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)
    assert torch.equal(a, b), f"no tracker: seed {a} must come from the default generator ({b})"


@pytest.mark.parametrize(("seed", "want"), [(7, 7), (2**63, -(2**63)), (2**64 - 1, -1), (-3, -3),
                                            (np.int64(11), 11), (torch.tensor(9, dtype=torch.int32), 9)],
                         ids=["int", "2^63", "2^64-1", "negative", "numpy", "int32-tensor"])
def test_explicit_seeds(seed, want):
    """An explicit seed (int, numpy, 0-d tensor, or a callable giving one) becomes the same int64, wrapping at 2^64."""
    got = rng.resolve_seed(seed, "cpu")
    assert got.dtype == torch.int64 and got.shape == (1,) and int(got) == want, f"seed {seed!r} -> {got}"
    assert int(rng.resolve_seed(lambda: seed, "cpu")) == want, "a callable's result is resolved the same way"


@pytest.mark.parametrize("bad", [1.5, "3", True, torch.tensor([1, 2]), torch.tensor(1.0)],
                         ids=["float", "str", "bool", "two-elements", "float-tensor"])
def test_bad_seeds_are_refused(bad):
    """A seed that is not an integer scalar is refused by name."""
    with pytest.raises((TypeError, ValueError), match="seed"):
        rng.resolve_seed(bad, "cpu")


def _layer(x, w, a, b):
    return column_parallel_lora(x, w, a, b, scale=0.5, dropout_p=0.5, backend="torch")


def _grads(use_checkpoint: bool, context_fn=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    w = torch.randn(12, 16, generator=g)
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    b = torch.randn(12, 4, generator=g, requires_grad=True)
    with tracker_for(0):
        if use_checkpoint:
            kw = {"context_fn": context_fn} if context_fn else {}
            y = checkpoint(_layer, x, w, a, b, use_reentrant=False, **kw)
            rng.draw_seed("cpu")  # later draws (other layers) advance the tracker before backward
        else:
            y = _layer(x, w, a, b)
        y.square().sum().backward()
    return x.grad, a.grad, b.grad


def test_torch_checkpoint_recomputes_the_same_mask_with_the_context_fn():
    plain = _grads(False)
    recomputed = _grads(True, rng.checkpoint_context_fn)
    for name, p, r in zip(("dx", "dA", "dB"), plain, recomputed):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-6), f"{name}: recompute with context_fn differs"


def test_torch_checkpoint_without_the_context_fn_redraws_a_different_mask():
    """Why the context_fn exists: torch restores its own generators, not the tracker's states."""
    plain = _grads(False)
    recomputed = _grads(True)
    assert not torch.allclose(plain[1], recomputed[1]), "expected a different mask without checkpoint_context_fn"
