"""Run megatron-core's GPTModel on CPU ranks (gloo) with its GPU semantics kept.

For the test suite and the examples on machines without a GPU; the library never imports it, and
on a GPU nothing here is needed. ``megatron_on_cpu()`` is entered once inside each rank. Every patch
below replaces a CUDA-only call with the CPU equivalent of what it does on a GPU, and nothing else:

- ``torch.cuda.current_device`` -> ``"cpu"``: megatron allocates buffers on "the current device"
  (the causal attention mask, rotary frequencies, the SP all-gather output, the pipeline's
  point-to-point receive buffers, the dist_checkpointing flag tensor).
- ``torch.cuda.synchronize`` -> no-op: dist_checkpointing's writer and the pipeline's batched
  point-to-point transfers sync the device; a CPU has no asynchronous stream to wait for.
- the pipeline schedules' token counter, ``torch.zeros([], dtype=torch.int, device="cuda")`` with a
  literal device: a scalar on the device the model runs on, here the CPU.
- ``torch.cuda.manual_seed`` -> ``torch.manual_seed``: ``model_parallel_cuda_manual_seed`` seeds
  the generator of the device the model runs on; here that is the CPU default generator.
- The RNG tracker is ``cpu_tracker_class()``: the same states ('data-parallel-rng' = seed,
  'model-parallel-rng' = seed + 2718 + tp_rank, 'expert-parallel-rng' = seed + 1024 + 100·ep_rank
  + etp_rank, set by megatron's own ``model_parallel_cuda_manual_seed``), but each state is a CPU
  generator state and ``fork`` swaps the CPU default generator, as the real one swaps the CUDA
  generator. So SP's per-layer ``fork()`` and a nested ``fork('data-parallel-rng')`` change the
  draws of CPU tensors exactly as they change the draws of CUDA tensors on a GPU.
- ``tensor_parallel.random._get_cuda_rng_state``/``_set_cuda_rng_state`` read/write the CPU
  generator: ``CheckpointFunction`` saves "the CUDA RNG" before forward and restores it for the
  recompute, and on a CPU model that generator is the CPU one.
- ``WrappedTorchNorm`` (megatron's norm without apex) refuses SP. Under SP it builds the same
  torch norm and marks its parameters ``sequence_parallel = True``, as ``FusedLayerNorm`` does, so
  the SP gradient sum (``finalize_model_grads`` or ``sum_sequence_parallel_grads``) covers them.
- ``moe_utils.te_general_gemm`` -> None: the MoE router's ``RouterGatingLinearFunction`` reads
  this global, which megatron-core 0.16.1 only defines when Transformer Engine imports (a
  NameError without TE, on a GPU too); None is the module's own "no TE" value, for which the
  router runs its torch.mm branch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from unittest import mock

import torch
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
from megatron.core.transformer import torch_norm
from megatron.core.transformer.moe import moe_utils

__all__ = ["cpu_tracker_class", "megatron_on_cpu"]


class _CpuTorch:
    """``torch`` as megatron's pipeline schedules see it, with ``zeros(device="cuda")`` on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


# Subclass megatron's tracker so isinstance checks in megatron (get_all_rng_states) still hold;
# get_states/set_states/reset/is_initialized are device-free and inherited unchanged.
class _CPURNGStatesTracker(CudaRNGStatesTracker):
    """megatron's ``CudaRNGStatesTracker`` with CPU generator states (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()  # no cudagraph-safe states on CPU

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        # The real fork, with the CPU generator as "the device generator". Its check that the CPU
        # state did not change inside the fork is dropped: here the CPU generator is the one the
        # fork is meant to advance.
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(f"current state name {self._current_state_name} is not the same as the "
                                f"desired state name {name}.")
            # New tensors, never in-place: CheckpointFunction keeps references to old states.
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


def cpu_tracker_class() -> type:
    """The CPU tracker class (see the module docstring).

    Returns:
        A subclass of megatron's ``CudaRNGStatesTracker`` whose states are CPU generator states.
    """
    return _CPURNGStatesTracker


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Install every shim in the module docstring for the duration of the block.

    Example:
        >>> with megatron_on_cpu():
        ...     torch.cuda.current_device()
        'cpu'
    """
    tracker_cls = cpu_tracker_class()
    original_norm_new = torch_norm.WrappedTorchNorm.__new__

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs) -> None:
        # Same contract as megatron's: build once, rebuild on force_reset; always the CPU tracker.
        if force_reset or not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, tracker_cls):
            mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def norm_new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_norm_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_norm_new(cls, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    patches = [
        mock.patch.object(torch.cuda, "current_device", lambda: "cpu"),
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
        mock.patch.object(schedules, "torch", _CpuTorch()),
        mock.patch.object(torch.cuda, "manual_seed", torch.manual_seed),
        mock.patch.object(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        mock.patch.object(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        mock.patch.object(mrandom, "initialize_rng_tracker", initialize_rng_tracker),
        mock.patch.object(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker_cls()),
        mock.patch.object(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True),
        mock.patch.object(torch_norm.WrappedTorchNorm, "__new__", staticmethod(norm_new)),
        # Only when TE did not define it: a real TE GEMM stays.
        mock.patch.object(moe_utils, "te_general_gemm", getattr(moe_utils, "te_general_gemm", None), create=True),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield
