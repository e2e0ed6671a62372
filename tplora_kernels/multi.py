"""Several adapters trained at once in one batch: each sample names its adapter.

The adapters used by a batch are stacked into one block-rank LoRA: ``A = [A_1; ...; A_n]``
(``[Σr, K]``) and ``B = [B_1 | ... | B_n]`` (``[N, Σr]``). Every row (token) then runs the
single-adapter kernels at rank Σr, with two per-row facts:

* its **gate**: ``u`` and ``du`` are multiplied by ``G[t, j] = s_a / (1 - p_a)`` on the columns
  ``j`` of its adapter ``a``'s block and 0 elsewhere, so a row's LoRA term is exactly its own
  adapter's, and each adapter's factors get gradient only from its own samples;
* its **dropout threshold**: the mask is the usual f(seed, global row, global column), compared
  with the row's adapter's threshold (``DropoutSpec.row_thr``), so each adapter sees exactly the
  mask it would see trained alone on the same rows.

One pass over x and one over dy serve every adapter; the collectives are the single-adapter
ones, r columns wider (Σr); saved activations grow with Σr, not with the number of adapters × T.
Why a gate over the stacked rank rather than segmented kernels (Punica / LoRAFusion style): the
rows of one sample are strided in Megatron's ``[s, b, h]`` order, so segments would need a
gather of x and dy (two extra passes), while the gate costs a T×Σr multiply on the small u and
du; the extra FLOPs of the Σr-wide shrink are far below the memory time of reading x.

Megatron's activations are ``[s, b, h]``, flattened to rows ``t = i·b + j``: row ``t`` belongs to
sample ``t % b``. That holds for a rank's rows under sequence parallelism too (global row
offsets), so no rank needs another's assignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BASE", "AdapterMix", "build_mix"]

BASE = "__base__"  # PEFT's name for "no adapter on this sample"


def _device_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a host sync (pinned, asynchronous copy on CUDA)."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True, eq=False)
class AdapterMix:
    """Which stacked adapter each sample uses, and every adapter's block, scale and dropout.

    Attributes:
        sample_adapter: ``[b]`` int64 on the activations' device: the index of each sample's
            adapter among the stacked ones, or -1 for none (the base layer alone).
        offsets: the adapters' column offsets in the stacked rank: adapter ``a`` owns
            ``[offsets[a], offsets[a + 1])``; ``offsets[-1]`` is Σr.
        scales: each adapter's LoRA scale s.
        thrs: each adapter's dropout threshold (``mask.dropout_threshold(p)``; 0 in eval mode).

    Example:
        >>> mix = build_mix([0, 1, -1], ranks=[4, 2], scales=[2.0, 1.0], thrs=[0, 0], device="cpu")
        >>> mix.gate(0, 3, torch.device("cpu"))[:, :6].tolist()[2]
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """

    sample_adapter: torch.Tensor
    offsets: tuple[int, ...]
    scales: tuple[float, ...]
    thrs: tuple[int, ...]

    @property
    def period(self) -> int:
        """b: global row ``t`` belongs to sample ``t % b``."""
        return self.sample_adapter.numel()

    @property
    def rank(self) -> int:
        """Σr, the stacked rank."""
        return self.offsets[-1]

    @property
    def max_thr(self) -> int:
        """The largest threshold (0: no adapter drops anything)."""
        return max(self.thrs, default=0)

    def row_adapter(self, row0: int, n: int, device: torch.device) -> torch.Tensor:
        """``[n]`` int64: the adapter index of global rows ``row0 .. row0 + n - 1`` (-1: none)."""
        rows = torch.arange(row0, row0 + n, device=device) % self.period
        return self.sample_adapter.to(device)[rows]

    def row_thr(self, device: torch.device) -> torch.Tensor:
        """``[b]`` int32: each sample's dropout threshold (``DropoutSpec.row_thr``)."""
        table = _device_tensor([*self.thrs, 0], torch.int32, device)  # index -1 -> the trailing 0
        return table[self.sample_adapter.to(device)]

    def gate(self, row0: int, n: int, device: torch.device) -> torch.Tensor:
        """``[n, Σr]`` fp32: ``s_a / (1 - p_a)`` on the block of each row's adapter, 0 elsewhere."""
        from .mask import keep_scale

        values = [s * keep_scale(t) for s, t in zip(self.scales, self.thrs)] + [0.0]
        lo = _device_tensor([*self.offsets[:-1], 0], torch.int64, device)
        hi = _device_tensor([*self.offsets[1:], 0], torch.int64, device)
        g = _device_tensor(values, torch.float32, device)
        a = self.row_adapter(row0, n, device)
        cols = torch.arange(self.rank, device=device)[None, :]
        inside = (cols >= lo[a][:, None]) & (cols < hi[a][:, None])
        return torch.where(inside, g[a][:, None], torch.zeros((), device=device))

    def apply_gate(self, t: torch.Tensor, row0: int) -> None:
        """``t *= gate`` in place, for a ``[n, Σr]`` operand (or a row-chunked view) starting at global row ``row0``."""
        rows = t.numel() // t.shape[-1]
        gated = t.reshape(rows, t.shape[-1]).float() * self.gate(row0, rows, t.device)
        t.copy_(gated.view(t.shape))


def build_mix(sample_adapter: Sequence[int] | torch.Tensor, *, ranks: Sequence[int], scales: Sequence[float],
              thrs: Sequence[int], device: torch.device | str) -> AdapterMix:
    """An ``AdapterMix`` from per-sample adapter indices (-1: none) and per-adapter options.

    Args:
        sample_adapter: ``[b]`` adapter index per sample (a list or an integer tensor).
        ranks, scales, thrs: per stacked adapter: rank, LoRA scale, dropout threshold.
        device: the activations' device.

    Returns:
        The mix; its ``sample_adapter`` is on ``device`` (copied without a host sync on CUDA).

    Example:
        >>> build_mix([1, 0], ranks=[2, 3], scales=[1.0, 0.5], thrs=[0, 0], device="cpu").offsets
        (0, 2, 5)
    """
    if not (len(ranks) == len(scales) == len(thrs)):
        raise ValueError(f"ranks, scales and thrs must have one entry per adapter, got {len(ranks)}, "
                         f"{len(scales)} and {len(thrs)}")
    device = torch.device(device)
    if isinstance(sample_adapter, torch.Tensor):
        idx = sample_adapter.to(device=device, dtype=torch.int64)
    else:
        idx = _device_tensor([int(i) for i in sample_adapter], torch.int64, device)
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + int(r))
    return AdapterMix(idx, tuple(offsets), tuple(float(s) for s in scales), tuple(int(t) for t in thrs))
