"""Backends as objects: the base class, and the registry that names them.

A backend is a ``Backend`` subclass registered here. It answers ``supports(device)`` (truthy, or
falsy with a ``reason``) and implements the five ops that ``ops.launch`` calls after checking and
allocating: ``shrink_fwd``, ``linear_fwd``, ``dy_bwd``, ``linear_dx``, ``shrink_bwd``. Which one
runs is decided once per call by ``ops.select`` and carried in the autograd plan; no code branches
on a backend's name. Adding a backend means adding one class and registering it
(``register_backend``); ``ops/__init__.py`` registers the built-in ones:

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

This module imports nothing else from the package: every backend imports it, never the reverse.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch

__all__ = ["Backend", "Support", "backend_names", "instance", "register_backend", "unregister_backend"]


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

    def linear_fwd(self, x, w, u, b, bias, out, scale, rpc, *, col_scale=None, out0=None, drop=None) -> None:
        """``out = x Wᵀ + s·u Bᵀ (+ bias)`` into ``out``.

        DoRA's keywords (passed only when set): ``acc = drop(x) Wᵀ + s·u Bᵀ`` (an active ``drop``
        masks and rescales the base product only), ``out0 <- acc``, ``out = col_scale ⊙ acc + bias``.
        """
        raise NotImplementedError

    def dy_bwd(self, dy, b, u, u_row0, du, scale, rpc, *, col_scale=None, y0=None,
               dm_out=None) -> torch.Tensor | None:
        """``du = s·dy B`` into ``du`` (if given); return fp32 ``dB = s·dy[u rows]ᵀ u`` (if u given).

        DoRA's keywords (passed only when set): ``g ⊙ dy`` for dy in both (``col_scale``), and
        ``dm_out <- Σ_t dy ⊙ y0`` over y0's rows (``[u_row0, u_row0 + Y)``, raw dy), u given or not.
        """
        raise NotImplementedError

    def linear_dx(self, dy, w, du, a, dx, drop, rpc, *, col_scale=None, mask_all=False) -> None:
        """``dx = dy W + (du A) ⊙ M / (1-p)`` into ``dx``.

        DoRA's keywords (passed only when set): ``(g ⊙ dy) W`` for ``dy W`` (``col_scale``), and with
        ``mask_all`` the whole sum masked and rescaled.
        """
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
    """Register a ``Backend`` subclass under ``cls.name`` (usable as a class decorator).

    Example:
        >>> # @register_backend
        >>> # class Mine(Backend):
        >>> #     name = "mine"   # then get_backend(device, "mine") resolves to it
    """
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or not cls.name:
        raise ValueError(f"register_backend needs a Backend subclass with a non-empty name, got {cls!r}")
    _REGISTRY[cls.name] = cls
    _INSTANCES.pop(cls.name, None)
    return cls


def unregister_backend(name: str) -> None:
    """Take backend ``name`` out of the registry (a no-op for an unknown name).

    Example:
        >>> unregister_backend("not-registered")
    """
    _REGISTRY.pop(name, None)
    _INSTANCES.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, in registration order.

    Example:
        >>> "torch" in backend_names()
        True
    """
    return tuple(_REGISTRY)


def instance(name: str) -> Backend:
    """The one instance of registered backend ``name`` (KeyError if none)."""
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]
