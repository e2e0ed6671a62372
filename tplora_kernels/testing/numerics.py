"""How far a result is from the exact one, and the one tolerance rule that judges it.

Errors (every comparison the tests, the bench and the GPU checks make goes through these):

* ``abs_err(got, exact)``: max |got - exact|, computed in fp64.
* ``rel_err(got, exact)``: ``abs_err`` over max |exact| (``norm="l2"``: ||got - exact||₂ /
  ||exact||₂, for vectors such as directional derivatives).
* ``max_rel_err(got, exact)``: the largest ``rel_err`` over the keys of a dict of tensors.

What counts, in one place:

* a missing result (None), a result of another shape, or a NaN/Inf in the difference (a NaN or
  Inf in ``got`` where ``exact`` is finite, or a non-finite ``exact``) is an infinite error;
* an empty tensor has error 0;
* an all-zero ``exact`` has no scale to be relative to: a result equal to it has relative error
  0, any other an infinite one (nothing nonzero is "close" to zero in relative terms).

The tolerance rule (README.md, "Errors and guarantees"), for a result computed in some dtype and
compared with the fp64 math:

* fp32: relative error <= ``FP32_BAR``;
* fp16/bf16: relative error <= ``LOW_FACTOR`` x torch's own relative error doing the same thing
  in that dtype + ``LOW_TINY``. What "torch's own error" is depends on the operation (the caller
  measures it and passes it in); the bar is computed here and nowhere else (``bar_for``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["FP32_BAR", "LOW_FACTOR", "LOW_TINY", "abs_err", "bar_for", "exceeds", "max_rel_err", "rel_err"]

FP32_BAR = 1e-5
LOW_FACTOR = 2.0
LOW_TINY = 1e-6


def _diff(got: torch.Tensor | None, exact: torch.Tensor) -> torch.Tensor | None:
    """``got - exact`` in fp64 on exact's device, or None when got is missing or of another shape."""
    if got is None or tuple(got.shape) != tuple(exact.shape):
        return None
    return got.detach().to(device=exact.device, dtype=torch.float64) - exact.detach().double()


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def abs_err(got: torch.Tensor | None, exact: torch.Tensor) -> float:
    """The largest absolute difference, in fp64.

    Args:
        got: the result (any dtype and device); None counts as missing.
        exact: what it should be.

    Returns:
        max |got - exact|; 0 for empty tensors; inf if got is missing, has another shape, or the
        difference holds a NaN or Inf.

    Example:
        >>> abs_err(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]))
        0.5
        >>> abs_err(torch.tensor([float("nan")]), torch.tensor([1.0]))
        inf
    """
    diff = _diff(got, exact)
    if diff is None:
        return math.inf
    if not diff.numel():
        return 0.0
    return _finite(diff.abs().max().item())


def rel_err(got: torch.Tensor | None, exact: torch.Tensor, *, norm: str = "max") -> float:
    """The error of ``got`` relative to the size of ``exact``.

    Args:
        got: the result (any dtype and device); None counts as missing.
        exact: what it should be.
        norm: ``"max"`` (default): max |got - exact| / max |exact|; ``"l2"``: the Euclidean norms'
            ratio ||got - exact||₂ / ||exact||₂.

    Returns:
        The relative error, in fp64; 0 for empty tensors and for a result equal to an all-zero
        ``exact``; inf where ``abs_err`` is inf or ``exact`` is all zeros and ``got`` is not.

    Example:
        >>> rel_err(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]))
        0.25
        >>> rel_err(torch.zeros(2), torch.zeros(2)), rel_err(torch.tensor([1e-9, 0.0]), torch.zeros(2))
        (0.0, inf)
        >>> rel_err(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0]), norm="l2")
        inf
    """
    if norm not in ("max", "l2"):
        raise ValueError(f"norm must be 'max' or 'l2', got {norm!r}")
    diff = _diff(got, exact)
    if diff is None:
        return math.inf
    if not diff.numel():
        return 0.0
    if norm == "max":
        num, den = diff.abs().max().item(), exact.detach().double().abs().max().item()
    else:
        num, den = diff.norm().item(), exact.detach().double().norm().item()
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def max_rel_err(got: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``rel_err`` over the keys of ``exact``, and its key.

    Args:
        got: tensors by name; a key of ``exact`` missing here is an infinite error.
        exact: what each should be.

    Returns:
        ``(error, key)``; ``(0.0, "")`` when ``exact`` is empty.

    Example:
        >>> max_rel_err({"a": torch.tensor([1.0]), "b": torch.tensor([2.5])},
        ...             {"a": torch.tensor([1.0]), "b": torch.tensor([2.0])})
        (0.25, 'b')
    """
    return max(((rel_err(got.get(k), v), k) for k, v in exact.items()), default=(0.0, ""))


def bar_for(dtype: torch.dtype | str, own: float | dict[str, float] | None = None) -> tuple[float, str]:
    """The bar for a result in ``dtype``, and why: the one tolerance rule.

    Args:
        dtype: the computation's dtype (a torch dtype or "fp32"/"fp16"/"bf16").
        own: for fp16/bf16, torch's own relative error in that dtype; a dict of several such
            errors (named) takes the largest and names them all in the reason.

    Returns:
        ``(bar, reason)``.

    Raises:
        AssertionError: a 16-bit dtype without a finite error of torch's own (an overflowing
            problem would make the bar infinite and the check vacuous).

    Example:
        >>> bar_for(torch.float32)
        (1e-05, 'fp32 bar')
        >>> bar_for("bf16", {"torch in bf16": 2e-3})
        (0.004001, '2x max(torch in bf16 2.0e-03) + 1e-06')
    """
    if dtype in (torch.float32, "fp32"):
        return FP32_BAR, "fp32 bar"
    named = own if isinstance(own, dict) else {"torch's own": own}
    if not named or any(v is None or not math.isfinite(v) for v in named.values()):
        raise AssertionError(f"{dtype}: torch's own error must be finite to set a bar, got {named}")
    worst = max(named.values())
    parts = ", ".join(f"{k} {v:.1e}" for k, v in named.items())
    return LOW_FACTOR * worst + LOW_TINY, f"{LOW_FACTOR:g}x max({parts}) + {LOW_TINY:.0e}"


def exceeds(what: str, err: float, bar: float, why: str = "") -> str | None:
    """A failure line when ``err > bar`` (NaN fails too), else None.

    Args:
        what: names the result in the line.
        err: its error.
        bar: the most it may be.
        why: where the bar comes from (``bar_for``'s reason), appended in parentheses.

    Returns:
        ``"what: rel err E > B (why)"``, or None when ``err <= bar``.

    Example:
        >>> exceeds("y", 2e-5, 1e-5, "fp32 bar")
        'y: rel err 2.0e-05 > 1.0e-05 (fp32 bar)'
        >>> exceeds("y", 1e-6, 1e-5) is None
        True
    """
    if err <= bar:
        return None
    return f"{what}: rel err {err:.1e} > {bar:.1e}" + (f" ({why})" if why else "")
