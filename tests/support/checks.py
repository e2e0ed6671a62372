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
           "assert_within", "bar_for", "exceeds", "max_rel_err", "rel_err"]


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
