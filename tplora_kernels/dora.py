"""DoRA's weight norm without a weight-sized temporary, cached per weight version, at any TP layout.

DoRA (Liu et al., 2024) scales each output row n of the adapted weight to a learned magnitude:
``y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b`` with ``g = m / ‖W + s·B A‖`` (row norms over K), the norm a
constant in backward (the paper's §4.3, and PEFT). The norm never needs ``W + s·B A``:

    ‖W_n + s·B_n A‖² = ‖W_n‖² + 2s·B_n·(A W_nᵀ) + s²·B_n (A Aᵀ) B_nᵀ

``‖W_n‖²`` (``weight_sq``) depends on the frozen base alone; the rest (``lora_sq``) costs
O(r·N·K + r²·N) against the GEMM's T·N·K, reading W in row blocks of ``BLOCK_ROWS`` in fp32, so no
temporary grows with the weight.

Tensor parallelism. Column-parallel: each rank holds whole rows (W_i, B_i), so its norms are
complete. Row-parallel: each rank holds a K-slice (W_i, A_i), so both parts are partial sums over
the TP group. ``weight_sq`` is summed once per base-weight version (one all-reduce of N fp32
values, at the first forward after the adapter or the base weight changed: creation, a checkpoint
load, a merge), and ``lora_sq``'s partials ride in the layer's own forward collective (``autograd``),
so DoRA adds no collective per micro-batch. Riding, they are summed in the collective's dtype; as
they are the small part of the norm (zero at B = 0), fp32 ``weight_sq`` keeps the norm close to fp32.

Caching. ``NormCache`` keeps each adapter's parts and recomputes them only when a weight changed:
the tensors' identity and version counters (an optimizer's in-place step, a load, a merge), plus
``WEIGHT_EPOCH``, which every ``torch.optim`` step bumps (Megatron's distributed optimizer writes
parameters through ``.data``, which no version counter sees; its step runs a torch optimizer).
Each recomputation of the LoRA part re-reads ``‖W_n‖²`` in the same pass over W, so a base weight
rewritten through ``.data`` is seen at the next step too (``NormCache.parts``). Adapter changes
(register, draw, delete, set_adapter) clear the cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import distributed as D
from .mode import TPMode

__all__ = ["BLOCK_ROWS", "DoRANorm", "NormCache", "lora_sq", "norm_parts", "row_norms", "weight_epoch", "weight_sq"]

BLOCK_ROWS = 1024  # rows of W read per step, in fp32: the largest temporary is BLOCK_ROWS x K

_EPOCH = itertools.count(1)
_state = {"epoch": 0}


def _bump(*_args) -> None:
    _state["epoch"] = next(_EPOCH)


register_optimizer_step_post_hook(_bump)


def weight_epoch() -> int:
    """A number that changes at every ``torch.optim`` step in the process (see the module docstring)."""
    return _state["epoch"]


@dataclass(frozen=True)
class DoRANorm:
    """The parts of one layer's squared row norms ``‖W + s·B A‖²`` for one call (detached, fp32).

    Attributes:
        weight_sq: ``[N_local]`` ``‖W_n‖²``, complete (summed over the TP group for a row layer).
        lora_sq: ``[N_local]`` the LoRA part ``2s·B_n·(A W_nᵀ) + s²·B_n A Aᵀ B_nᵀ``: complete for a
            column layer, this rank's partial sum for a row layer (the forward collective sums it).
    """

    weight_sq: torch.Tensor
    lora_sq: torch.Tensor


def weight_sq(weight: torch.Tensor) -> torch.Tensor:
    """``[N]`` fp32 ``‖W_n‖²`` of this rank's shard, read in row blocks (no weight-sized temporary).

    Example:
        >>> weight_sq(torch.ones(3, 4))
        tensor([4., 4., 4.])
    """
    out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        for i in range(0, weight.shape[0], BLOCK_ROWS):
            out[i:i + BLOCK_ROWS] = weight[i:i + BLOCK_ROWS].float().square().sum(1)
    return out


def lora_sq(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``[N]`` fp32 ``2s·B_n·(A W_nᵀ) + s²·B_n (A Aᵀ) B_nᵀ`` on this rank's shards (fp32, W in row blocks).

    Args:
        weight: ``[N, K]`` (this rank's shard). lora_a: ``[r, K]``. lora_b: ``[N, r]``. scale: s.

    Returns:
        ``[N]`` fp32: with ``weight_sq``, the squared row norms of ``W + s·B A`` (partial over K for
        a K-slice).

    Example:
        >>> w, a, b = torch.randn(5, 7), torch.randn(2, 7), torch.randn(5, 2)
        >>> full = ((w + 0.5 * b @ a) ** 2).sum(1)
        >>> bool(torch.allclose(weight_sq(w) + lora_sq(w, a, b, 0.5), full, rtol=1e-5))
        True
    """
    return _sq_parts(weight, lora_a, lora_b, scale, with_weight=False)[1]


def _sq_parts(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              with_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(``weight_sq`` if asked, ``lora_sq``) in one pass over W: the block ``lora_sq`` reads anyway."""
    with torch.no_grad():
        a, b = lora_a.detach().float(), lora_b.detach().float()
        out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        wsq = torch.empty_like(out) if with_weight else None
        gram = a @ a.t()
        for i in range(0, weight.shape[0], BLOCK_ROWS):
            w = weight[i:i + BLOCK_ROWS].float()
            bb = b[i:i + BLOCK_ROWS]
            cross = (bb * (w @ a.t())).sum(1)
            quad = ((bb @ gram) * bb).sum(1)
            out[i:i + BLOCK_ROWS] = 2 * scale * cross + scale * scale * quad
            if wsq is not None:
                # the same expression as weight_sq, so an unchanged W gives the same bits
                wsq[i:i + BLOCK_ROWS] = w.square().sum(1)
        return wsq, out


def norm_parts(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
               mode: TPMode) -> DoRANorm:
    """This call's ``DoRANorm``, uncached (what the functional API takes; the modules cache it in ``NormCache``).

    A row layer's ``weight_sq`` is all-reduced over its TP group here (every rank calls it); its
    ``lora_sq`` stays partial, for the forward collective to sum.

    Example:
        >>> parts = norm_parts(torch.ones(2, 4), torch.zeros(1, 4), torch.zeros(2, 1), 1.0, TPMode.build("row"))
        >>> parts.weight_sq, parts.lora_sq
        (tensor([4., 4.]), tensor([0., 0.]))
    """
    wsq = weight_sq(weight)
    if mode.kind == "row" and mode.world > 1:
        D.all_reduce_(wsq, mode.group)
    return DoRANorm(wsq, lora_sq(weight, lora_a, lora_b, scale))


def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              mode: TPMode) -> torch.Tensor:
    """``[N_local]`` fp32 ``‖W_n + s·B_n A‖``, complete: for a row layer one all-reduce over its TP group.

    What a new adapter's magnitude starts from (PEFT's ``m = ‖W + s·B A‖``), and the oracle of the
    fused path. Every rank of a row layer's TP group must call it.

    Example:
        >>> row_norms(torch.ones(2, 4), torch.zeros(1, 4), torch.zeros(2, 1), 1.0, TPMode.build("column"))
        tensor([2., 2.])
    """
    total = weight_sq(weight) + lora_sq(weight, lora_a, lora_b, scale)
    if mode.kind == "row" and mode.world > 1:
        D.all_reduce_(total, mode.group)
    return total.clamp_min_(0).sqrt_()


class NormCache:
    """One layer's DoRA norm parts per adapter, recomputed only when a weight changed.

    Args:
        mode: the layer's TP mode (a row layer sums ``weight_sq`` over its group).
    """

    def __init__(self, mode: TPMode) -> None:
        self.mode = mode
        self._weight: tuple | None = None
        self._weight_sq: torch.Tensor | None = None  # complete (summed over TP for a row layer), fp32
        self._weight_sq_local: torch.Tensor | None = None  # this rank's part of it when it was summed
        self._lora: dict[str, tuple[tuple, DoRANorm]] = {}

    @staticmethod
    def _key(*ts: torch.Tensor) -> tuple:
        return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in ts)

    def clear(self, adapter: str | None = None) -> None:
        """Forget one adapter's LoRA part (None: everything, the base part too)."""
        if adapter is None:
            self._weight, self._weight_sq, self._weight_sq_local = None, None, None
            self._lora.clear()
        else:
            self._lora.pop(adapter, None)

    def parts(self, adapter: str, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scale: float) -> DoRANorm:
        """The norm parts for this call, from the cache when no weight changed since they were computed.

        A row layer's ``weight_sq`` recomputation all-reduces N fp32 values over its TP group; it
        happens when the base weight's identity or version changes, which every rank of the group
        sees alike (a load, a merge), so every rank reaches it in the same forward.

        A base weight rewritten through ``.data`` keeps its version; the next ``torch.optim`` step's
        recomputation of the LoRA part (which reads W anyway) also re-reads ``‖W_n‖²`` locally. A
        column layer takes it as is; a row layer cannot all-reduce there (only the rewritten ranks
        would know), so it adds the change of its local part, ``‖W_n‖²_now − ‖W_n‖²_summed``, to the
        LoRA part that rides in the forward collective: exactly 0 while W is unchanged, and the new
        norm, summed in the collective's dtype, once it is not.
        """
        wkey = self._key(weight)
        if self._weight != wkey:
            wsq = weight_sq(weight)
            local = wsq.clone()
            if self.mode.kind == "row" and self.mode.world > 1:
                D.all_reduce_(wsq, self.mode.group)
            self._weight, self._weight_sq, self._weight_sq_local = wkey, wsq, local
            self._lora.clear()
        lkey = (weight_epoch(), scale, *self._key(lora_a, lora_b))
        cached = self._lora.get(adapter)
        if cached is None or cached[0] != lkey:
            wsq_now, lsq = _sq_parts(weight, lora_a, lora_b, scale, with_weight=True)
            if self.mode.kind == "row" and self.mode.world > 1:
                norm = DoRANorm(self._weight_sq, lsq + (wsq_now - self._weight_sq_local))
            else:
                norm = DoRANorm(wsq_now, lsq)
            cached = (lkey, norm)
            self._lora[adapter] = cached
        return cached[1]
