"""Error metrics, the one tolerance rule, and the named assertions the tests share.

The project's one tolerance rule (README.md, "Errors and guarantees"), for a result computed in
some dtype and compared with the fp64 math:

* fp32: relative error <= ``FP32_BAR``;
* fp16/bf16: relative error <= ``LOW_FACTOR`` x torch's own relative error doing the same thing
  in that dtype + ``LOW_TINY``. What "torch's own error" is depends on the op (the test says,
  and passes it in); the bar is computed here and nowhere else.

A relative error is max |got - exact| / max |exact|, in fp64; NaN/Inf where the exact value is
finite, or a wrong shape, is an infinite error.
"""

from __future__ import annotations

import math
import os
import re

import torch

__all__ = ["FP32_BAR", "LOW_FACTOR", "LOW_TINY", "abs_err", "assert_raises", "assert_readme_shows_example",
           "assert_within", "bar_for", "exceeds", "rel_err"]

FP32_BAR = 1e-5
LOW_FACTOR, LOW_TINY = 2.0, 1e-6


def abs_err(got: torch.Tensor | None, exact: torch.Tensor) -> float:
    """max |got - exact| in fp64; inf if got is missing, has the wrong shape or a NaN/Inf."""
    if got is None or got.shape != exact.shape:
        return math.inf
    if not exact.numel():
        return 0.0
    diff = (got.double() - exact.double()).abs()
    return diff.max().item() if torch.isfinite(diff).all() else math.inf


def rel_err(got: torch.Tensor | None, exact: torch.Tensor) -> float:
    """``abs_err`` over max |exact| (1 when exact is all zeros)."""
    denom = exact.double().abs().max().item() if exact.numel() else 0.0
    return abs_err(got, exact) / (denom if denom > 0 else 1.0)


def bar_for(dtype: torch.dtype | str, own: float | dict[str, float] | None = None) -> tuple[float, str]:
    """The bar for a result in ``dtype``, and why: the one tolerance rule.

    Args:
        dtype: the computation's dtype (a torch dtype or "fp32"/"fp16"/"bf16").
        own: for fp16/bf16, torch's own relative error in that dtype; a dict of several such
            errors (named) takes the largest and names them all in the reason.
    """
    if dtype in (torch.float32, "fp32"):
        return FP32_BAR, "fp32 bar"
    named = own if isinstance(own, dict) else {"torch's own": own}
    if not named or any(v is None or not math.isfinite(v) for v in named.values()):
        # An overflowing problem would make the bar infinite and the check vacuous.
        raise AssertionError(f"{dtype}: torch's own error must be finite to set a bar, got {named}")
    worst = max(named.values())
    parts = ", ".join(f"{k} {v:.1e}" for k, v in named.items())
    return LOW_FACTOR * worst + LOW_TINY, f"{LOW_FACTOR:g}x max({parts}) + {LOW_TINY:.0e}"


def exceeds(what: str, err: float, bar: float, why: str = "") -> str | None:
    """A failure line when ``err > bar`` (NaN fails), else None: for tests that report every failure."""
    if err <= bar:
        return None
    return f"{what}: rel err {err:.1e} > {bar:.1e}" + (f" ({why})" if why else "")


def assert_within(what: str, err: float, bar: float = FP32_BAR, why: str = "") -> None:
    """Assert ``err <= bar``; the message names ``what`` and both numbers."""
    failure = exceeds(what, err, bar, why)
    assert failure is None, failure


def assert_raises(what: str, exc: type[BaseException], words: list[str], fn, *args, **kwargs) -> str:
    """Call ``fn(*args, **kwargs)``; assert it raises ``exc`` with every one of ``words`` in its message.

    Returns:
        The message.
    """
    try:
        fn(*args, **kwargs)
    except exc as e:
        msg = str(e)
    else:
        raise AssertionError(f"{what}: no {exc.__name__} raised")
    missing = [w for w in words if w not in msg]
    assert not missing, f"{what}: the {exc.__name__} message {msg!r} lacks {missing}"
    return msg


def _readme_region(example_path: str | os.PathLike) -> str:
    with open(example_path) as f:
        text = f.read()
    start, end = "# --8<-- [start:readme]\n", "# --8<-- [end:readme]\n"
    assert start in text and end in text, f"{example_path}: no readme markers"
    return text.split(start)[1].split(end)[0].strip("\n")


def assert_readme_shows_example(example_path: str | os.PathLike, readme: str | os.PathLike, section: str) -> None:
    """The code between an example's ``readme`` markers is one of the README's ```python blocks, verbatim."""
    with open(readme) as f:
        blocks = [b.strip("\n") for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)]
    assert _readme_region(example_path) in blocks, (
        f"the README's {section!r} code must be {os.path.basename(example_path)}'s readme region, verbatim "
        f"({len(blocks)} python blocks in {readme})")
