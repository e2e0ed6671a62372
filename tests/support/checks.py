"""The named assertions the tests share, over ``tplora_kernels.testing.numerics``.

The error metrics and the one tolerance rule (``FP32_BAR``, ``LOW_FACTOR``, ``LOW_TINY``,
``bar_for``, ``exceeds``; ``abs_err``, ``rel_err``, ``max_rel_err``) live in the package, shared
with the bench and the GPU checks; they are re-exported here so a test imports from one place.
"""

from __future__ import annotations

import os
import re

from tplora_kernels.testing.numerics import (
    FP32_BAR,
    LOW_FACTOR,
    LOW_TINY,
    abs_err,
    bar_for,
    exceeds,
    max_rel_err,
    rel_err,
)

__all__ = ["FP32_BAR", "LOW_FACTOR", "LOW_TINY", "abs_err", "assert_raises", "assert_readme_shows_example",
           "assert_within", "bar_for", "exceeds", "max_rel_err", "rank_failures", "rel_err"]


def rank_failures(results: list[dict], names, dtype: str, torch_runs: dict[str, str], where: str,
                  extra: tuple[str, str] | None = None) -> list[str]:
    """Judge one TP group's errors of each tensor in ``names`` against the one tolerance rule.

    Each rank's result holds ``{"scale": {name: max|exact|}, "fused": {name: max|got - exact|}, <run>:
    {name: ...}}``. The error is the whole tensor's over all ranks (the worst rank's absolute error
    over the largest ``max|exact|``); a 16-bit bar takes torch's own error from the ``torch_runs``
    (``{key: label}``). ``extra``: ``(key, label)`` of a per-rank structure that must meet the same
    bar in fp32 (a reference that the 16-bit bars rely on). Returns the failure messages (empty: all pass).
    """
    failures = []
    for name in names:
        scale = max(res["scale"][name] for res in results) or 1.0
        worst = max(range(len(results)), key=lambda r: results[r]["fused"][name])
        err = results[worst]["fused"][name] / scale
        own = None if dtype == "fp32" else {
            label: max(res[k][name] for res in results) / scale for k, label in torch_runs.items()}
        bar, why = bar_for(dtype, own)
        failures.append(exceeds(f"{name} (worst rank {worst}; {where})", err, bar, why))
        if extra is not None and dtype == "fp32":
            other = max(res[extra[0]][name] for res in results) / scale
            failures.append(exceeds(f"{name} of {extra[1]} ({where})", other, bar, why))
    return [f for f in failures if f]


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
