"""Every docstring example in the package runs and shows what it prints.

Examples that need ranks or megatron objects are written commented out (``>>> # ...``), so what
runs here is the part a reader can paste into a plain Python session.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tplora_kernels

MODULES = sorted(m.name for m in pkgutil.walk_packages(tplora_kernels.__path__, "tplora_kernels.")
                 if m.name != "tplora_kernels.peft" or importlib.util.find_spec("peft") is not None)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    """Every docstring example of this package module runs and shows what it prints."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (run " \
                               f"`python -m doctest -v` on it to see which)"
