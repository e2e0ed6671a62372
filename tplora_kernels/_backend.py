"""Backend selection: ``triton`` (CUDA), ``interpret`` (the same kernels on CPU), ``torch``.

Resolution order: the ``backend=`` argument, then the ``TPLORA_BACKEND`` environment variable,
then automatic: CUDA tensors use ``triton``; CPU tensors use ``interpret`` when Triton's
interpreter is active (``TRITON_INTERPRET=1`` was set before triton was imported) and ``torch``
otherwise. The interpreter cannot be switched on later: ``@triton.jit`` reads the variable
when each kernel (and triton's own ``tl.philox``) is defined.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "interpreter_active", "resolve_backend"]

BACKENDS = ("triton", "interpret", "torch")


def interpreter_active() -> bool:
    """True when the Triton kernels were defined under ``TRITON_INTERPRET=1``.

    Example:
        >>> isinstance(interpreter_active(), bool)
        True
    """
    from .ops import kernels

    return type(kernels._lora_shrink_fwd_kernel).__name__ == "InterpretedFunction"


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Pick the backend for tensors on ``device``.

    Args:
        device: the activations' device.
        backend: ``"triton"``, ``"interpret"``, ``"torch"``, ``"auto"`` or None (= env or auto).

    Returns:
        The backend name that will run.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device`` here.

    Example:
        >>> resolve_backend("cpu", "torch")
        'torch'
    """
    name = backend if backend is not None else os.environ.get("TPLORA_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        return "interpret" if interpreter_active() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {name!r}")
    if name == "triton" and (device.type != "cuda" or interpreter_active()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors and TRITON_INTERPRET unset; got device {device}"
            f" with the interpreter {'on' if interpreter_active() else 'off'}")
    if name == "interpret":
        if not interpreter_active():
            raise ValueError("backend='interpret' needs TRITON_INTERPRET=1 in the environment before "
                             "triton is first imported")
        if device.type != "cpu":
            raise ValueError(f"backend='interpret' runs on CPU tensors, got device {device}")
    return name
