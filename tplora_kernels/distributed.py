"""Collectives on the base layer's tensor-parallel group, and the row-chunked collective buffer.

Plain (non-autograd) functions: the autograd layer decides which of them run in each mode.
Each is a no-op at TP size 1, as Megatron's own mappings are. ``sum_sequence_parallel_grads``
is the helper for training loops without Megatron's ``finalize_model_grads``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "RowChunkedBuffer",
    "all_gather_cols",
    "all_gather_rows",
    "all_reduce_",
    "broadcast_from_first_",
    "group_rank",
    "group_size",
    "reduce_scatter_rows",
    "sum_sequence_parallel_grads",
]


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # torch 2.13 deprecates all_gather_into_tensor for all_gather_single; torch 2.11 (the GPU
    # image) has only the old name. Looked up per call, so tools that wrap dist.* see the call.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor, group) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group`` (1 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[T/t, W] -> [T, W]``: concatenate every rank's rows in rank order."""
    t = group_size(group)
    if t == 1:
        return x
    x = x.contiguous()
    out = torch.empty((t * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=group)
    return out


def all_gather_cols(y: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[T, N/t] -> [T, N]``: concatenate every rank's columns in rank order."""
    t = group_size(group)
    if t == 1:
        return y
    stacked = all_gather_rows(y, group).view(t, *y.shape)
    return stacked.movedim(0, -2).reshape(*y.shape[:-1], t * y.shape[-1])


def all_reduce_(buf: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``buf`` over the group, in place."""
    if group_size(group) > 1:
        dist.all_reduce(buf, group=group)
    return buf


def broadcast_from_first_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Overwrite each tensor with the group's rank 0's, in place (any shape).

    A CPU tensor on an NCCL group (a model still on the CPU, as with Megatron's
    ``use_cpu_initialization`` before ``.cuda()``) travels through the current CUDA device.
    """
    if group_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    nccl = "nccl" in str(dist.get_backend(group)).lower()
    for t in tensors:
        if nccl and t.device.type == "cpu":
            staged = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(staged, src=src, group=group)
            t.copy_(staged)
        else:
            dist.broadcast(t, src=src, group=group)


def reduce_scatter_rows(buf: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over the group and keep this rank's 1/t of ``buf``'s leading dimension."""
    t = group_size(group)
    if t == 1:
        return buf
    out = torch.empty((buf.shape[0] // t, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
    _reduce_scatter(out, buf.contiguous(), group=group)
    return out


class RowChunkedBuffer:
    """One flat buffer that holds several ``[T, w]`` operands, laid out for one collective.

    The buffer is ``chunks`` blocks of ``T/chunks`` rows; each block stores, contiguously, its
    rows of every operand in turn, then ``extra`` values. So an all-reduce (``chunks=1``) or a
    reduce-scatter (``chunks=t``) of the whole buffer reduces every operand at once, and each rank's
    result block splits into contiguous ``[rows, w]`` tensors with no copy. The kernels write into
    the 3-D ``views`` through their row-chunked addressing. ``extras`` (``[chunks, extra]``) carries
    a vector that every rank needs summed whole (DoRA's partial row norms): written into every
    block, it arrives summed in each rank's block after either collective.

    Args:
        rows: T, the total rows (divisible by ``chunks``).
        widths: the operands' widths, e.g. ``(N, r)`` for ``[z | u]``.
        chunks: 1 for all-reduce, t for reduce-scatter.
        dtype, device: of the buffer.
        extra: values per block after the operands' rows (0: none).

    Example:
        >>> b = RowChunkedBuffer(4, (3, 2), chunks=2, dtype=torch.float32, device="cpu", extra=5)
        >>> [tuple(v.shape) for v in b.views], tuple(b.extras.shape)
        ([(2, 2, 3), (2, 2, 2)], (2, 5))
    """

    def __init__(self, rows: int, widths: Sequence[int], chunks: int, dtype: torch.dtype,
                 device: torch.device | str, extra: int = 0) -> None:
        if rows % chunks:
            raise ValueError(f"rows ({rows}) must be divisible by chunks ({chunks})")
        self.widths = tuple(widths)
        self.extra = int(extra)
        self.chunk_rows = rows // chunks
        per = self.chunk_rows * sum(self.widths) + self.extra
        self.flat = torch.empty(chunks * per, dtype=dtype, device=device)
        per_chunk = self.flat.view(chunks, per)
        self.views = []
        offset = 0
        for w in self.widths:
            piece = per_chunk[:, offset * self.chunk_rows:(offset + w) * self.chunk_rows]
            self.views.append(piece.view(chunks, self.chunk_rows, w))
            offset += w
        self.extras = per_chunk[:, offset * self.chunk_rows:]

    def split(self, block: torch.Tensor) -> list[torch.Tensor]:
        """Contiguous ``[rows, w]`` operands of a reduced block (the flat buffer or one chunk), then the
        block's ``extra`` values (``[extra]``) when there are any."""
        rows = (block.numel() - self.extra) // sum(self.widths) if self.widths else 0
        out, offset = [], 0
        for w in self.widths:
            out.append(block[offset * rows:(offset + w) * rows].view(rows, w))
            offset += w
        if self.extra:
            out.append(block[offset * rows:offset * rows + self.extra])
        return out


def sum_sequence_parallel_grads(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> int:
    """Sum over ``group`` the gradients of parameters marked ``sequence_parallel = True``.

    Under sequence parallelism each rank computes the replicated LoRA factor's gradient from its
    own rows only (A for column-parallel, B for row-parallel). Megatron's ``finalize_model_grads``
    sums such parameters across TP, as it does for LayerNorm weights; call this instead in a loop
    without it, once per step after backward. ``main_grad`` is used when present. One coalesced
    all-reduce.

    Args:
        params: parameters to look at (e.g. ``model.parameters()``); unmarked ones are skipped.
        group: the tensor-parallel group.

    Returns:
        The number of gradients summed.

    Example:
        >>> sum_sequence_parallel_grads([], None)
        0
    """
    grads = []
    for p in params:
        if not getattr(p, "sequence_parallel", False):
            continue
        g = getattr(p, "main_grad", None)
        g = g if g is not None else p.grad
        if g is not None:
            grads.append(g)
    if not grads or group_size(group) == 1:
        return len(grads)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(grads)
