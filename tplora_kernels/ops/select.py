"""Which backend runs a call: the resolution order, and ``auto``'s per-shape choice on CUDA.

Resolution (``get_backend``): the ``backend=`` argument (a name or a ``Backend``), else
``TPLORA_BACKEND``, else ``"auto"``. ``auto`` on CPU is ``interpret`` when Triton's interpreter is
active (``TRITON_INTERPRET=1`` set before triton is imported) and ``torch`` otherwise. ``auto`` on
CUDA chooses between the fused Triton GEMMs (``triton``) and the cuBLAS path (``cublas``) per layer
shape, as follows.

With ``backend="auto"`` on CUDA, the first call of a layer shape times both paths' two GEMM ops
(``linear_fwd`` + ``linear_dx``) on tensors of that shape, keeps the faster, and caches the
answer for the process. The key is (device, dtypes, N, K, r, T rounded up to a power of two), so
a new batch size of the same order reuses it.

The choice is the same on every rank of the layer's TP group: rank 0 of the group measures, and
its answer is broadcast over the group, once per key (the group is part of the key). Every rank
reaches that broadcast, because every rank calls the layer with the same shape; a path that
raises on rank 0 (out of memory, out of shared memory at a large r) loses, and if both do, every
rank raises rank 0's reasons instead of one rank leaving the others in the broadcast. (Every
replicated tensor comes out of the base collective, so ranks that chose apart would still agree;
one choice per group keeps the runs' timings and bench records comparable across ranks.)

Overrides: ``TPLORA_GEMM=triton`` or ``=cublas`` (no measurement), or an explicit
``backend=``. ``decisions()`` returns what was chosen and the times behind it; the bench records it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import distributed as D
from ..mask import NO_DROPOUT
from .kernels import interpreter_active
from .registry import Backend, backend_names, instance

__all__ = ["CANDIDATES", "choose_gemm_backend", "decisions", "get_backend", "reset", "resolve_backend"]

CANDIDATES = ("triton", "cublas")
_DECISIONS: dict[tuple, dict] = {}

Timer = Callable[[str, tuple], float]


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def get_backend(device: torch.device | str, backend: str | Backend | None = None, *,
                gemm: tuple | None = None) -> Backend:
    """The backend object that will run for tensors on ``device``.

    Args:
        device: the activations' device.
        backend: a ``Backend``, a registered name, ``"auto"`` or None (= ``TPLORA_BACKEND``, else auto).
        gemm: for ``"auto"`` on CUDA, the layer's ``(dtype, lora_dtype, N, K, r, T, tp_group)``: the
            GEMM path (``triton`` or ``cublas``) is then chosen for that shape
            (``choose_gemm_backend``); without it, ``"auto"`` on CUDA is ``triton``.

    Returns:
        The ``Backend`` instance (one per name per process).

    Raises:
        ValueError: unknown name (the message lists the registered ones), or a backend that cannot
            run on ``device`` here (with the reason).

    Example:
        >>> get_backend("cpu", "torch").name
        'torch'
    """
    device = torch.device(device)
    if isinstance(backend, Backend):
        chosen = backend
    else:
        name = backend if backend is not None else os.environ.get("TPLORA_BACKEND", "auto")
        name = name.strip().lower() or "auto"
        if name == "auto":
            if device.type == "cuda" and gemm is not None and not interpreter_active():
                return choose_gemm_backend(device, *gemm)
            if device.type == "cuda":
                name = "triton"
            else:
                name = "interpret" if interpreter_active() else "torch"
        if name not in backend_names():
            raise ValueError(f"backend must be one of {(*backend_names(), 'auto')}, got {name!r}")
        chosen = instance(name)
    ok = type(chosen).supports(device)
    if not ok:
        raise ValueError(f"backend={chosen.name!r} cannot run on device {device} here: {ok.reason}")
    return chosen


def resolve_backend(device: torch.device | str, backend: str | Backend | None = None) -> str:
    """The name of ``get_backend(device, backend)``.

    Args:
        device: the activations' device.
        backend: as for ``get_backend`` (without a layer shape, ``"auto"`` on CUDA reports ``triton``).

    Returns:
        The backend's registered name, e.g. ``"torch"``.

    Example:
        >>> resolve_backend("cpu", "torch")
        'torch'
    """
    return get_backend(device, backend).name


def _measure(name: str, key: tuple, reps: int = 5) -> float:
    """Median seconds of one ``linear_fwd`` + ``linear_dx`` on backend ``name`` at ``key``'s shape.

    The operands are built here, well-formed, so the backend's ops are called directly (no launch
    checks): ``ops.launch`` resolves backends through this module, not the other way round.
    """
    device, dtype, lora_dtype, N, K, R, T = key[:7]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, K, device=device, dtype=dtype, generator=g)
    w = torch.randn(N, K, device=device, dtype=dtype, generator=g) * K ** -0.5
    u = torch.randn(T, R, device=device, dtype=dtype, generator=g)
    b = torch.randn(N, R, device=device, dtype=lora_dtype, generator=g)
    a = torch.randn(R, K, device=device, dtype=lora_dtype, generator=g)
    dy = torch.randn(T, N, device=device, dtype=dtype, generator=g)
    out, dx = torch.empty(T, N, device=device, dtype=dtype), torch.empty(T, K, device=device, dtype=dtype)
    be = get_backend(device, name)

    def once() -> None:
        be.linear_fwd(x, w, u, b, None, out, 1.0, T)
        be.linear_dx(dy, w, u, a, dx, NO_DROPOUT, T)

    once()  # compile / autotune outside the timing
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_gemm_backend(device: torch.device, dtype: torch.dtype, lora_dtype: torch.dtype, N: int, K: int, R: int,
                        T: int, group: dist.ProcessGroup | None, *, timer: Timer | None = None) -> Backend:
    """The GEMM path for one layer shape, the same on every rank of ``group``.

    Args:
        device, dtype, lora_dtype: the activations' device and dtype, the LoRA weights' dtype.
        N, K, R, T: the local GEMM shape (out, in, rank, tokens).
        group: the layer's TP group (rank 0 measures, the answer is broadcast).
        timer: ``timer(backend name, key) -> seconds`` (default: a real measurement).

    Returns:
        The chosen backend object.

    Example:
        >>> # choose_gemm_backend(torch.device("cuda"), torch.bfloat16, torch.bfloat16, 4096, 4096, 16, 8192, None)
    """
    forced = os.environ.get("TPLORA_GEMM", "").strip().lower()
    if forced:
        if forced not in CANDIDATES:
            raise ValueError(f"TPLORA_GEMM must be one of {CANDIDATES}, got {forced!r}")
        return get_backend(device, forced)
    key = (torch.device(device), dtype, lora_dtype, int(N), int(K), int(R), _pow2(T), _members(group))
    if key not in _DECISIONS:
        times, errors, pick = {}, {}, None
        if D.group_rank(group) == 0:
            measure = timer or _measure
            for name in CANDIDATES:
                try:
                    times[name] = float(measure(name, key))
                except Exception as e:  # a path that cannot run here loses; rank 0 must still broadcast
                    errors[name] = f"{type(e).__name__}: {e}"
            pick = min(times, key=times.get) if times else None
        else:
            pick = CANDIDATES[0]
        if D.group_size(group) > 1:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            flag = torch.tensor([CANDIDATES.index(pick) if pick else -1], dtype=torch.int64, device=device)
            dist.broadcast(flag, src=src, group=group)
            if int(flag.item()) < 0:  # every rank raises rank 0's reasons
                box = [errors]
                dist.broadcast_object_list(box, src=src, group=group)
                errors = box[0]
            pick = CANDIDATES[int(flag.item())] if int(flag.item()) >= 0 else None
        if pick is None:
            raise RuntimeError(f"no GEMM path runs for N={N}, K={K}, r={R}, {dtype} on {device} "
                               f"(measured on the group's rank 0): {errors}")
        _DECISIONS[key] = {"choice": pick, "seconds": times, "failed": errors}
    return get_backend(device, _DECISIONS[key]["choice"])


def _members(group: dist.ProcessGroup | None) -> tuple[int, ...] | None:
    """The group's global ranks: a decision is per group (each broadcasts its own rank 0's)."""
    if group is None or not dist.is_initialized():
        return None
    return tuple(dist.get_process_group_ranks(group))


def decisions() -> dict[str, dict]:
    """What ``choose_gemm_backend`` decided so far: ``{"N=..,K=..,r=..,T<=..,dtype": {choice, seconds}}``.

    Example:
        >>> isinstance(decisions(), dict)
        True
    """
    def name(k: tuple) -> str:
        group = f" group={list(k[7])}" if k[7] else ""
        return f"{k[0]} {k[1]} lora={k[2]} N={k[3]} K={k[4]} r={k[5]} T<={k[6]}{group}"

    return {name(k): dict(v) for k, v in _DECISIONS.items()}


def reset() -> None:
    """Forget every decision (tests, or after changing TPLORA_GEMM)."""
    _DECISIONS.clear()
