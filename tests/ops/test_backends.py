"""Backend registry and resolution (tplora_kernels.backends): names, reasons, the interpreter probe."""

from __future__ import annotations

import pytest
import torch

from tplora_kernels import backends
from tplora_kernels.ops import triton_backend as TB


def test_every_builtin_backend_is_registered():
    backends.get_backend("cpu", "torch")  # loads the built-in providers
    missing = set(backends.BACKENDS) - set(backends._REGISTRY)
    assert not missing, f"built-in backends not registered: {missing}"


def test_unknown_name_and_wrong_device_say_why():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.get_backend("cpu", "nope")
    with pytest.raises(ValueError, match="cannot run on device cpu here: needs CUDA"):
        backends.get_backend("cpu", "triton")


def test_a_broken_interpreter_is_refused_with_the_reason(kernel_backend, monkeypatch):
    if kernel_backend != "interpret":
        pytest.skip("the interpreter is off in this session")

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    TB._interpreter_works.cache_clear()
    monkeypatch.setattr(TB._k, "_interpreter_probe_kernel", Broken())
    try:
        with pytest.raises(ValueError, match=r"interpreter fails with numpy .*install numpy<2.4"):
            backends.get_backend("cpu", "interpret")
    finally:
        monkeypatch.undo()
        TB._interpreter_works.cache_clear()
    assert backends.get_backend("cpu", "interpret").name == "interpret", "the real probe passes here"


def test_a_registered_backend_is_used_by_name():
    class Doubling(backends.Backend):
        name = "test-doubling"

        @classmethod
        def supports(cls, device):
            return backends.Support(True)

    backends.register_backend(Doubling)
    try:
        assert isinstance(backends.get_backend("cpu", "test-doubling"), Doubling)
        assert backends.resolve_backend(torch.device("cpu"), Doubling()) == "test-doubling"
    finally:
        backends._REGISTRY.pop("test-doubling")
