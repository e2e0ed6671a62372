"""The dropout keep-mask: a pure function of (seed, global row, global column).

Nothing is stored. The kernels regenerate the mask in registers in the forward and backward passes;
this module is the torch implementation of the same function, bit-identical to the kernels'
(``tests/ops/test_mask.py`` proves it), used by the ``torch`` backend, the reference and the tests.

The scheme, and why:

* Counter-based Philox-4x32 (Salmon et al., SC'11), the generator behind ``tl.rand`` and
  ``torch``'s CUDA RNG, keyed by the 64-bit seed, with 7 rounds (``PHILOX_ROUNDS``) instead of
  the usual 10: 7 is the fewest at which the paper finds Philox-4x32 passes all of TestU01's
  BigCrush, and the rounds are most of the mask's cost on a GPU (six instructions per round
  per 8 elements, against about four per element for the threshold test, the select and the
  multiply). The counter is
  ``(col >> 3, row, row >> 32, col >> 35)``: all 64 bits of the row and of the column group
  ``col >> 3``, so every (row, col) an int64 can index has its own counter and the mask cannot
  repeat or wrap.
* One Philox call yields 128 random bits, which we spend on **eight** consecutive columns at
  16 bits each. Element ``(row, col)`` keeps iff its 16-bit lane ``>= thr``, with
  ``thr = round(p · 2^16)``. This is 8x fewer Philox evaluations than one call per element,
  which is what makes a CPU mask affordable. The cost: p is rounded to a multiple of 2^-16
  (1.5e-5). The rescale uses the exact keep probability, ``2^16 / (2^16 - thr)``, so the
  dropped activation stays unbiased.
* The global indices are TP-invariant: column-parallel LoRA masks the (gathered) full input,
  row-parallel LoRA offsets its local columns by ``rank · K/t``, and sequence parallelism offsets
  rows by ``rank · T/t``. So TP=1 and TP=4 drop exactly the same elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = [
    "MASK_BITS",
    "NO_DROPOUT",
    "PHILOX_ROUNDS",
    "DropoutSpec",
    "dropout_threshold",
    "keep_mask",
    "keep_scale",
    "philox4x32",
]

# BigCrush-clean (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"); in the sm_90a SASS of the
# kernels' loops, 16-19% fewer mask instructions than Random123's default of 10 rounds.
PHILOX_ROUNDS = 7
MASK_BITS = 16  # bits of randomness per element: 8 elements per 128-bit Philox output.
_ONE = 1 << MASK_BITS

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
# Philox groups per chunk when generating a large mask: bounds the int64 temporaries (~6 live
# tensors of 8 B per group) to a few MB that stay in cache.
_CHUNK_GROUPS = 1 << 16


def dropout_threshold(p: float) -> int:
    """Integer threshold for dropout probability ``p``: element dropped iff its lane < thr.

    Args:
        p: dropout probability in ``[0, 1)``.

    Returns:
        ``round(p · 2^16)``, in ``[0, 2^16)``. 0 means no dropout.

    Example:
        >>> dropout_threshold(0.1)
        6554
    """
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout p must be a finite float in [0, 1), got {p!r}")
    thr = round(p * _ONE)
    return min(thr, _ONE - 1)


def keep_scale(thr: int) -> float:
    """The rescale ``1 / P(keep)`` for threshold ``thr`` (exact, so dropout stays unbiased).

    Example:
        >>> keep_scale(0)
        1.0
    """
    return _ONE / (_ONE - thr)


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 in torch int64 arithmetic, bit-identical to ``triton.language.philox``.

    Counters are int64 tensors holding uint32 values; they broadcast against each other, so
    the first round runs on row and column vectors only. The int64 products of two uint32
    values wrap modulo 2^64, which keeps both 32-bit halves exact.

    Args:
        seed: 64-bit key (its low and high words are the two Philox keys).
        c0, c1, c2, c3: counter words, int64 tensors with values in ``[0, 2^32)``.
        rounds: Philox rounds.

    Returns:
        Four int64 tensors (the output words, values in ``[0, 2^32)``), broadcast shape.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _M32, seed >> 32
    # Words carry garbage above bit 31 between rounds; only a multiplier's operand must be clean,
    # so each round masks 2 tensors instead of 4, and the outputs are masked once at the end.
    for i in range(rounds):
        pa = (c0 & _M32) * _ROUND_A
        pb = (c2 & _M32) * _ROUND_B
        if i < 2:  # the counters still broadcast (row vectors x column vectors): out of place
            c0 = (pb >> 32) ^ c1 ^ k0
            c2 = (pa >> 32) ^ c3 ^ k1
        else:
            c0 = (pb >> 32).bitwise_xor_(c1).bitwise_xor_(k0)
            c2 = (pa >> 32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = pb, pa
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0 & _M32, c1 & _M32, c2 & _M32, c3 & _M32


def _keep_groups(seed: int, rows: torch.Tensor, groups: torch.Tensor, thr: int | torch.Tensor) -> torch.Tensor:
    """Keep-mask for ``rows`` x column groups of 8: bool ``[len(rows), 8 * len(groups)]``.

    Each 16-bit lane is compared with ``thr`` (an int, or one threshold per row, ``[len(rows), 1]``)
    before the lanes are interleaved, so only bools are stacked (8x less memory than stacking the
    int64 lanes).
    """
    r = rows[:, None]
    g = groups[None, :]
    w = philox4x32(seed, g & _M32, r & _M32, r >> 32, g >> 32)
    # Lane order within a group: word 0 low half, word 0 high half, word 1 low, ...
    keep = []
    for word in w:
        keep.append((word & 0xFFFF) >= thr)
        keep.append((word >> 16) >= thr)
    return torch.stack(torch.broadcast_tensors(*keep), dim=-1).reshape(len(rows), -1)


def keep_mask(seed: int | torch.Tensor, row_start: int, n_rows: int, col_start: int, n_cols: int,
              thr: int, device: torch.device | str | None = None, *,
              row_thr: torch.Tensor | None = None) -> torch.Tensor:
    """The dropout keep-mask for a block of global rows and columns.

    Args:
        seed: the per-call dropout seed (python int or a one-element integer tensor).
        row_start: global index of the first row (token) of the block.
        n_rows: rows in the block.
        col_start: global index of the first column (feature) of the block.
        n_cols: columns in the block.
        thr: ``dropout_threshold(p)`` (ignored when ``row_thr`` is given).
        device: where to build the mask (default CPU).
        row_thr: one threshold per global row, a ``[P]`` integer tensor: global row ``g`` uses
            ``row_thr[g % P]`` (several adapters in one batch, each with its own p, one per sample).

    Returns:
        bool tensor ``[n_rows, n_cols]``, True where the element is kept.

    Example:
        >>> m = keep_mask(1234, 0, 4, 0, 16, dropout_threshold(0.5))
        >>> m.shape, m.dtype
        (torch.Size([4, 16]), torch.bool)
    """
    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(-1)[0].item())
    out = torch.empty(n_rows, n_cols, dtype=torch.bool, device=device)
    if n_rows == 0 or n_cols == 0:
        return out
    g0 = col_start >> 3
    g1 = (col_start + n_cols - 1) >> 3
    groups = torch.arange(g0, g1 + 1, dtype=torch.int64, device=device)
    lead = col_start - (g0 << 3)
    step = max(1, _CHUNK_GROUPS // len(groups))
    for r0 in range(0, n_rows, step):
        rows = torch.arange(row_start + r0, row_start + min(n_rows, r0 + step), dtype=torch.int64,
                            device=device)
        t = thr if row_thr is None else row_thr.to(device=device, dtype=torch.int64)[rows % row_thr.numel()][:, None]
        out[r0:r0 + len(rows)] = _keep_groups(seed, rows, groups, t)[:, lead:lead + n_cols]
    return out


@dataclass(frozen=True, eq=False)
class DropoutSpec:
    """One call's dropout, as the kernels see it: seed, threshold, and where the block starts.

    The mask of element ``(i, j)`` of an operand is ``keep_mask(seed, row0 + i, col0 + j, thr)``, so
    a rank's shard (or a row slice of it) names its global position with ``row0``/``col0`` and gets
    exactly the elements the single-device mask has there. ``shifted`` moves that origin.

    Attributes:
        seed: one-element int64 tensor on the operands' device (None when ``thr == 0``).
        thr: ``dropout_threshold(p)``; 0 means no dropout and no mask work. With ``row_thr``, the
            largest of those thresholds (it only says whether any element can be dropped).
        row0: global row of the operand's first row.
        col0: global column of its first column.
        row_thr: optional per-row thresholds, ``[P]`` int32 on the operands' device: global row
            ``g`` uses ``row_thr[g % P]`` (a mixed batch of adapters with different dropout). The
            rescale ``1/(1-p)`` of such rows is then the caller's (``keep_scale`` is 1).

    Example:
        >>> spec = DropoutSpec(torch.tensor([7]), dropout_threshold(0.5), row0=0, col0=16)
        >>> spec.shifted(rows=4).row0, spec.keep_scale
        (4, 2.0)
    """

    seed: torch.Tensor | None = None
    thr: int = 0
    row0: int = 0
    col0: int = 0
    row_thr: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.thr < _ONE:
            raise ValueError(f"thr must be in [0, {_ONE}), got {self.thr}")
        if self.thr and (not isinstance(self.seed, torch.Tensor) or self.seed.dtype != torch.int64
                         or self.seed.numel() != 1):
            raise ValueError(f"seed must be a one-element int64 tensor when dropout is on, got {self.seed!r}")

    @property
    def active(self) -> bool:
        """True when any element can be dropped."""
        return self.thr > 0

    @property
    def keep_scale(self) -> float:
        """``1 / P(keep)``, the rescale of kept elements (1 with per-row thresholds: the caller rescales)."""
        return 1.0 if self.row_thr is not None else keep_scale(self.thr)

    def shifted(self, rows: int = 0, cols: int = 0) -> DropoutSpec:
        """The same mask seen from an operand that starts ``rows``/``cols`` further on."""
        return replace(self, row0=self.row0 + rows, col0=self.col0 + cols)

    def keep(self, n_rows: int, n_cols: int, device: torch.device | str | None = None) -> torch.Tensor:
        """This block's keep-mask, ``[n_rows, n_cols]`` bool (all True without dropout)."""
        if not self.active:
            return torch.ones(n_rows, n_cols, dtype=torch.bool, device=device)
        return keep_mask(self.seed, self.row0, n_rows, self.col0, n_cols, self.thr, device=device,
                         row_thr=self.row_thr)


NO_DROPOUT = DropoutSpec()
