"""Full problems from one seed, and each rank's shards of them, cut by ``tplora_kernels.layout``.

Every rank builds the same full fp64 matrices from a seed, then takes its pieces with the
library's one shard rule (``layout.layout_for(kind)``): the weights and factors as the layout
says, activations along their feature dimension as the layout's ``x`` / ``y`` say, and the
sequence (dim 0 of ``[S, Bt, ·]``) in contiguous blocks under sequence parallelism. Nothing
here slices by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tplora_kernels.layout import Split, layout_for
from tplora_kernels.reference import lora_dense

__all__ = ["DTYPES", "GRADS", "SEQUENCE", "Shapes", "dense_grads", "features", "full_problem", "shard", "weights"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRADS = ("y", "dx", "dA", "dB")
SEQUENCE = Split(0)  # sequence parallelism: rank i holds the i-th block of the sequence (dim 0)


def features(split: Split) -> Split:
    """A 2-D ``[T, W]`` split moved onto the last dimension, for ``[S, Bt, W]`` tensors and ``[W]`` biases."""
    return Split(-1, split.stride) if split.sharded else split


def _cut(full: torch.Tensor, rank: int, t: int, *splits: Split) -> torch.Tensor:
    for s in splits:
        full = s.shard(full, rank, t)
    return full


@dataclass(frozen=True)
class Shapes:
    """x is ``[S, Bt, K]`` (dim 0 is the sequence, split under SP), W ``[N, K]``, LoRA rank r."""

    S: int
    Bt: int
    K: int
    N: int
    r: int


def full_problem(data_seed: int, sh: Shapes) -> dict[str, torch.Tensor]:
    """Full fp64 x, W, A, B, bias and the output gradient dy, identical on every rank.

    W and A are ~1/sqrt(K) and B ~1/sqrt(r), so the base and the LoRA terms are of the same size
    and an error in either shows in the output and in dx.
    """
    g = torch.Generator().manual_seed(data_seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    return dict(
        x=rnd(sh.S, sh.Bt, sh.K),
        W=rnd(sh.N, sh.K, std=sh.K ** -0.5),
        A=rnd(sh.r, sh.K, std=sh.K ** -0.5),
        B=rnd(sh.N, sh.r, std=sh.r ** -0.5),
        bias=rnd(sh.N),
        dy=rnd(sh.S, sh.Bt, sh.N),
    )


def shard(kind: str, full: dict[str, torch.Tensor], rank: int, t: int, sp: bool, opt: bool) -> dict:
    """This rank's inputs and the pieces of full tensors it should get back.

    Args:
        kind: ``"column"`` or ``"row"``.
        full: ``full_problem`` (any dtype).
        rank, t: this rank, the TP size.
        sp: sequence parallel.
        opt: gather_output (column) / input_is_parallel (row).

    Returns:
        ``x, W, A, B, bias, dy``: this rank's inputs; ``y, dx, dA, dB``: functions mapping a full
        tensor (the oracle's output / gradients) to the piece this rank must hold.
    """
    lay = layout_for(kind)
    sp = sp and t > 1
    # gather_output makes a column layer's y whole; a row layer given the full input scatters it itself.
    x_split = features(lay.x) if kind == "column" or opt else Split()
    y_split = features(lay.y) if kind == "row" or not opt else Split()
    x_rows = SEQUENCE if sp and kind == "column" else Split()
    y_rows = SEQUENCE if sp and kind == "row" else Split()
    out = dict(
        W=lay.weight.shard(full["W"], rank, t), A=lay.lora_a.shard(full["A"], rank, t),
        B=lay.lora_b.shard(full["B"], rank, t), bias=features(lay.y).shard(full["bias"], rank, t),
        x=_cut(full["x"], rank, t, x_split, x_rows), dy=_cut(full["dy"], rank, t, y_split, y_rows),
        y=lambda f: _cut(f, rank, t, y_split, y_rows), dx=lambda f: _cut(f, rank, t, x_split, x_rows),
        dA=lambda f: lay.lora_a.shard(f, rank, t), dB=lambda f: lay.lora_b.shard(f, rank, t),
    )
    return out


def dense_grads(full: dict[str, torch.Tensor], dtype: torch.dtype, lora_dtype: torch.dtype, *, bias: bool,
                scale: float, p: float, seed: int, compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``lora_dense`` on the full matrices: y, dx, dA, dB.

    The inputs are rounded to ``dtype`` (x, W, bias, dy) and ``lora_dtype`` (A, B); the math then
    runs in ``compute_dtype`` (default ``dtype``). ``compute_dtype=float64`` with low-precision
    inputs gives the error that rounding the inputs alone causes.
    """
    cdt = compute_dtype or dtype
    lcdt = compute_dtype or lora_dtype

    def rounded(t, dt, cd):
        return t.to(dt).to(cd).clone()

    x = rounded(full["x"], dtype, cdt).requires_grad_()
    a = rounded(full["A"], lora_dtype, lcdt).requires_grad_()
    b = rounded(full["B"], lora_dtype, lcdt).requires_grad_()
    y = lora_dense(x, rounded(full["W"], dtype, cdt), a, b, bias=rounded(full["bias"], dtype, cdt) if bias else None,
                   scale=scale, dropout_p=p, seed=seed)
    y.backward(rounded(full["dy"], dtype, cdt))
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)


def weights(kind: str, rank: int, t: int, K: int, N: int, r: int, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """This rank's ``weight``, ``lora_a``, ``lora_b``, ``bias`` of full W, A, B, bias drawn from ``seed``.

    W and bias in ``dtype``, the factors in fp32; B is non-zero so the LoRA branch shows.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    lay = layout_for(kind)
    a, b = lay.shard_factors(A, B, rank, t)
    return {"weight": lay.weight.shard(W, rank, t).to(dtype), "lora_a": a.float(), "lora_b": b.float(),
            "bias": features(lay.y).shard(bias, rank, t).to(dtype)}


def tp_case(kind="column", tp=1, sp=False, opt=False, bias=True, dtype="fp32", lora_dtype="fp32", p=0.0,
            seed=1, data_seed=0, S=7, Bt=1, K=8, N=8, r=2, scale=0.5, backend="interpret") -> dict:
    """One TP-equivalence case (LoRA's or DoRA's): the layer's mode, dtypes, dropout, seeds and shapes."""
    return dict(kind=kind, tp=tp, sp=sp, opt=opt, bias=bias, dtype=dtype, lora_dtype=lora_dtype, p=p, seed=seed,
                data_seed=data_seed, shapes=Shapes(S=S, Bt=Bt, K=K, N=N, r=r), scale=scale, backend=backend)
