"""Backends as objects: which implementation of the five per-rank ops runs, chosen once per call.

A backend is a ``Backend`` subclass registered here. It answers ``supports(device)`` (truthy, or
falsy with a ``reason``) and implements the five ops that ``ops.launch`` calls after checking and
allocating: ``shrink_fwd``, ``linear_fwd``, ``dy_bwd``, ``linear_dx``, ``shrink_bwd``. The
functional API resolves one backend object per call and carries it in the autograd ``Plan``; no
code above this module branches on a backend's name. Adding a backend means adding one class
(and registering it).

=============  ===========  ==========================================================
name           runs on      what
=============  ===========  ==========================================================
``triton``     CUDA         the Triton kernels, compiled; the base GEMMs fused with LoRA
``cublas``     CUDA (CPU*)  the base GEMMs in torch (cuBLAS), the LoRA terms in Triton
``interpret``  CPU          the Triton kernels under Triton's interpreter (how CI runs them)
``torch``      any          the same math in torch ops, with a bit-identical dropout mask
=============  ===========  ==========================================================

(*) On CPU, ``cublas`` runs its Triton parts under the interpreter and torch's CPU matmul stands
in for cuBLAS, so its algebra is tested where CI runs.

Resolution: the ``backend=`` argument (a name or a ``Backend``), else ``TPLORA_BACKEND``, else
``"auto"``: CUDA tensors pick ``triton`` or ``cublas`` per layer shape by a one-time measurement
(``ops.select``); CPU tensors use ``interpret`` when Triton's interpreter is active
(``TRITON_INTERPRET=1`` set before triton is imported) and ``torch`` otherwise.
"""

from __future__ import annotations

import contextlib
import os
from typing import ClassVar

import torch

__all__ = ["BACKENDS", "Backend", "Support", "get_backend", "interpreter_active", "register_backend",
           "resolve_backend"]


class Support:
    """Truthy when a backend can run on a device; falsy with ``reason`` when it cannot.

    Example:
        >>> bool(Support(False, "needs CUDA")), Support(False, "needs CUDA").reason
        (False, 'needs CUDA')
    """

    def __init__(self, ok: bool, reason: str = "") -> None:
        self.ok, self.reason = ok, reason

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"Support({self.ok}{', ' + repr(self.reason) if self.reason else ''})"


class Backend:
    """The five per-rank LoRA ops on one kind of device; ``ops.launch`` checks and allocates first.

    Every op receives validated operands: T-row operands are 2-D ``[T, W]`` or row-chunked 3-D views
    ``[C, T/C, W]`` sharing ``rpc`` rows per chunk (see ``ops.kernels``), outputs are allocated,
    and ``drop`` is a ``mask.DropoutSpec``. Weight gradients come back in fp32.
    """

    name: ClassVar[str] = ""

    @classmethod
    def supports(cls, device: torch.device) -> Support:
        """Whether this backend runs on ``device`` here."""
        raise NotImplementedError

    def shrink_fwd(self, x, a, u, drop, x_out, rpc) -> None:
        """``u = drop(x) Aᵀ`` into ``u``; also copy x into ``x_out`` when given."""
        raise NotImplementedError

    def linear_fwd(self, x, w, u, b, bias, out, scale, rpc) -> None:
        """``out = x Wᵀ + s·u Bᵀ (+ bias)`` into ``out``."""
        raise NotImplementedError

    def dy_bwd(self, dy, b, u, u_row0, du, scale, rpc) -> torch.Tensor | None:
        """``du = s·dy B`` into ``du`` (if given); return fp32 ``dB = s·dy[u rows]ᵀ u`` (if u given)."""
        raise NotImplementedError

    def linear_dx(self, dy, w, du, a, dx, drop, rpc) -> None:
        """``dx = dy W + (du A) ⊙ M / (1-p)`` into ``dx``."""
        raise NotImplementedError

    def shrink_bwd(self, du, x, drop, rpc) -> torch.Tensor:
        """Return fp32 ``dA = duᵀ drop(x)``."""
        raise NotImplementedError

    def backward_scope(self) -> contextlib.AbstractContextManager:
        """A context around one layer's backward, in which a backend may share work between ops."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


_REGISTRY: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a ``Backend`` subclass under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    _REGISTRY[cls.name] = cls
    _INSTANCES.pop(cls.name, None)
    return cls


def _load_builtin() -> None:
    # The built-in backends live beside their kernels; importing them registers them.
    from .ops import cublas_backend, torch_impl, triton_backend  # noqa: F401


def interpreter_active() -> bool:
    """True when the Triton kernels were defined under ``TRITON_INTERPRET=1``.

    Returns:
        Whether ``ops.kernels`` holds interpreted functions (the ``interpret`` backend can run).

    Example:
        >>> isinstance(interpreter_active(), bool)
        True
    """
    from .ops import kernels

    return type(kernels._lora_shrink_fwd_kernel).__name__ == "InterpretedFunction"


def _instance(name: str) -> Backend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def get_backend(device: torch.device | str, backend: str | Backend | None = None, *,
                gemm: tuple | None = None) -> Backend:
    """The backend object that will run for tensors on ``device``.

    Args:
        device: the activations' device.
        backend: a ``Backend``, a registered name, ``"auto"`` or None (= ``TPLORA_BACKEND``, else auto).
        gemm: for ``"auto"`` on CUDA, the layer's ``(dtype, lora_dtype, N, K, r, T, tp_group)``: the
            GEMM path (``triton`` or ``cublas``) is then chosen for that shape by ``ops.select``;
            without it, ``"auto"`` on CUDA is ``triton``.

    Returns:
        The ``Backend`` instance (one per name per process).

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device`` here (with the reason).

    Example:
        >>> get_backend("cpu", "torch").name
        'torch'
    """
    _load_builtin()
    device = torch.device(device)
    if isinstance(backend, Backend):
        chosen = backend
    else:
        name = backend if backend is not None else os.environ.get("TPLORA_BACKEND", "auto")
        name = name.strip().lower() or "auto"
        if name == "auto":
            if device.type == "cuda" and gemm is not None and not interpreter_active():
                from .ops.select import choose_gemm_backend

                return choose_gemm_backend(device, *gemm)
            if device.type == "cuda":
                name = "triton"
            else:
                name = "interpret" if interpreter_active() else "torch"
        if name not in _REGISTRY:
            raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {name!r}")
        chosen = _instance(name)
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


BACKENDS = ("triton", "cublas", "interpret", "torch")
