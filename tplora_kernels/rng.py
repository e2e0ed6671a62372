"""Where a dropout seed comes from: one rule, identical on every TP rank, redrawn alike on recompute.

The mask is a pure function of (seed, global row, global column), so the seed is all that must
agree between the TP ranks of a layer and between a forward and its recompute. The rule, in order:

1. **An explicit seed** (``seed=`` on the functional call or the module): an int, a one-element
   integer tensor (read at each call, so a tensor updated in place gives a fresh mask per step),
   or a zero-argument callable returning either. Its agreement across ranks is the caller's.
2. **Megatron's RNG tracker**, when ``model_parallel_cuda_manual_seed`` has initialised it: the
   seed is drawn inside ``get_cuda_rng_tracker().fork("data-parallel-rng")``. Megatron seeds that
   state with the same seed on every TP rank, which its other states are not: under sequence
   parallelism ``TransformerBlock`` runs each layer inside the ``"model-parallel-rng"`` fork,
   seeded ``seed + 2718 + tp_rank``, so a draw from whatever generator is current there differs
   per rank (it gave wrong gradients). The fork swaps whichever generator the tracker swaps (the
   CUDA one on GPUs), so this holds inside or outside any other fork, at TP 1 or 8, with SP on or
   off: the same calls draw the same seeds, and the masks are the same at every TP size.
   Megatron's ``tensor_parallel.checkpoint`` (full and selective recompute) saves and restores
   every tracker state, so a recompute draws the seed again.
3. **Otherwise, torch's default generator on x's device** (no Megatron model), which
   ``torch.utils.checkpoint`` restores before a recompute.

**Pipeline stages.** Each stage draws from its own generators. Megatron's training seeds stage p
with ``seed + 100·p``, so the stages' draws differ; a loop that seeds every stage alike would
make stage 1's k-th draw equal stage 0's, and layer L + n (stage 1) would reuse layer L's masks.
So rules 2 and 3 mix the pipeline rank into the seed (XOR with ``pp_rank · 0x9E3779B97F4A7C15``
mod 2⁶³, when Megatron's parallel_state has PP > 1): the stages' seeds differ however they were
seeded, identically on every TP rank of a stage and on a recompute. An explicit seed (rule 1) is
used as given.

The draw is a device-side ``randint``: no host sync and no collective.
``torch.utils.checkpoint`` restores torch's generators but not the tracker's states; inside a
Megatron model use megatron's checkpoint, or pass ``context_fn=checkpoint_context_fn`` (non-reentrant
checkpoint) so the tracker's state is restored for the recompute too.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TRACKER_STATE", "SeedLike", "check_seed", "checkpoint_context_fn", "draw_seed", "resolve_seed"]

TRACKER_STATE = "data-parallel-rng"
SeedLike = int | torch.Tensor | Callable[[], Any] | None
_U64 = 1 << 64
_SEED_HIGH = 2**63 - 1  # randint's exclusive upper bound for an int64 draw


def _megatron_tracker():
    """Megatron's initialised RNG tracker holding ``TRACKER_STATE``, else None (never creates one).

    Raises RuntimeError if the tracker holds states but not ``TRACKER_STATE``.

    ``get_cuda_rng_tracker()`` would *create* an empty tracker when none exists, which would stop a
    later ``model_parallel_cuda_manual_seed(te_rng_tracker=True)`` from installing TE's; so the
    module's own flag is read first.
    """
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return None
    if not getattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    tracker = mrandom.get_cuda_rng_tracker()
    states = tracker.get_states() if tracker.is_initialized() else {}
    if not states:  # nothing seeded (e.g. only tensor_parallel.checkpoint ran): no fork can be active
        return None
    if TRACKER_STATE not in states:
        # Drawing from the current generator instead is what goes wrong under SP: Megatron runs
        # each layer inside the per-TP-rank model-parallel fork, so ranks would draw apart.
        raise RuntimeError(f"megatron's RNG tracker is initialised without its {TRACKER_STATE!r} state "
                           f"(it has {sorted(states)}), which every TP rank draws dropout seeds "
                           "from alike; seed it with model_parallel_cuda_manual_seed, or pass seed= to the LoRA "
                           "layers")
    return tracker


_GOLDEN = 0x9E3779B97F4A7C15 % (1 << 63)  # odd multiplier: distinct pipeline ranks give distinct salts


def _stage_salt() -> int:
    """``pp_rank · golden mod 2⁶³`` under Megatron pipeline parallelism, else 0 (see the module docstring)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return 0
    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return 0
    return (ps.get_pipeline_model_parallel_rank() * _GOLDEN) % (1 << 63)


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed by the module's rule 2 or 3, as a ``[1]`` int64 tensor on ``device``.

    Args:
        device: where the seed lives (x's device: a device-side draw, no host sync).

    Returns:
        ``[1]`` int64 tensor in ``[0, 2^63 - 1)`` on ``device``.

    Example:
        >>> draw_seed("cpu").shape
        torch.Size([1])
    """
    tracker = _megatron_tracker()
    if tracker is None:
        seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    else:
        with tracker.fork(TRACKER_STATE):
            seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    salt = _stage_salt()
    return seed.bitwise_xor_(salt) if salt else seed


def _as_int64(value: int) -> int:
    """Any python int as the signed int64 with the same low 64 bits (the mask's key is 64-bit)."""
    v = int(value) % _U64
    return v - _U64 if v >= 1 << 63 else v


def check_seed(seed: SeedLike) -> None:
    """Raise TypeError/ValueError unless ``seed`` is a valid seed (see ``resolve_seed``).

    Callables are checked when called. Example:
        >>> check_seed(2**64 - 1)
    """
    if seed is None or (callable(seed) and not isinstance(seed, torch.Tensor)):
        return
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed tensor must hold one integer, got shape {tuple(seed.shape)} {seed.dtype}")
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int, a one-element integer tensor or a callable returning one, "
                        f"got {type(seed).__name__}")


def resolve_seed(seed: SeedLike, device: torch.device | str) -> torch.Tensor:
    """The ``[1]`` int64 seed tensor on ``device`` for one call.

    Args:
        seed: None (draw by the module's rule), an int (any size: its low 64 bits are used), a
            one-element integer tensor, or a callable returning one of those.
        device: the activations' device.

    Returns:
        ``[1]`` int64 tensor on ``device``. An int becomes a device-side fill, not a host copy.

    Example:
        >>> resolve_seed(2**64 - 1, "cpu")
        tensor([-1])
    """
    if callable(seed) and not isinstance(seed, torch.Tensor):
        seed = seed()
    check_seed(seed)
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), _as_int64(seed), dtype=torch.int64, device=device)


def _clone_state(state):
    # Graph-safe trackers hold torch.Generator states that later draws mutate in place.
    return state.clone_state() if hasattr(state, "clone_state") else state.clone()


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    torch's checkpoint restores torch's own generators before a recompute, not Megatron's tracker
    states; with a tracker initialised, LoRA's seeds come from the tracker, so without this the
    recompute would draw new seeds. The forward context remembers the tracker's
    ``"data-parallel-rng"`` state; the recompute context sets it back for the recompute and then
    restores the state the tracker had, so later draws are unaffected. Without a tracker both are
    no-ops.

    Returns:
        ``(forward context, recompute context)``.

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> y = checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=False,
        ...                context_fn=checkpoint_context_fn)
    """
    saved: dict[str, Any] = {}

    @contextlib.contextmanager
    def forward():
        tracker = _megatron_tracker()
        if tracker is not None:
            saved["state"] = _clone_state(tracker.get_states()[TRACKER_STATE])
        yield

    @contextlib.contextmanager
    def recompute():
        tracker = _megatron_tracker()
        if tracker is None or "state" not in saved:
            yield
            return
        states = tracker.get_states()
        now = states[TRACKER_STATE]
        tracker.set_states({**states, TRACKER_STATE: _clone_state(saved["state"])})
        try:
            yield
        finally:
            tracker.set_states({**tracker.get_states(), TRACKER_STATE: now})

    return forward(), recompute()
