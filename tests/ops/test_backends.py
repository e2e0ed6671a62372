"""Backend registry (ops.registry) and resolution (ops.select): names, reasons, the interpreter probe."""

from __future__ import annotations

import pytest
import torch

from tplora_kernels.ops import registry, select
from tplora_kernels.ops import triton_backend as TB


def test_every_builtin_backend_is_registered():
    missing = {"triton", "cublas", "interpret", "torch"} - set(registry.backend_names())
    assert not missing, f"built-in backends not registered by importing the package: {missing}"


def test_unknown_name_and_wrong_device_say_why():
    with pytest.raises(ValueError, match="backend must be one of"):
        select.get_backend("cpu", "nope")
    with pytest.raises(ValueError, match="cannot run on device cpu here: needs CUDA"):
        select.get_backend("cpu", "triton")


def test_a_broken_interpreter_is_refused_with_the_reason(kernel_backend):
    if kernel_backend != "interpret":
        pytest.skip("the interpreter is off in this session")

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    broken = TB.probe_interpreter(Broken())
    assert not broken and "install numpy<2.4" in broken.reason, f"a failing probe must say why and how: {broken}"
    assert TB.probe_interpreter(), "the real probe passes here"
    assert select.get_backend("cpu", "interpret").name == "interpret", "the interpret backend runs here"


def test_a_registered_backend_is_used_by_name():
    class Doubling(registry.Backend):
        name = "test-doubling"

        @classmethod
        def supports(cls, device):
            return registry.Support(True)

    registry.register_backend(Doubling)
    try:
        assert isinstance(select.get_backend("cpu", "test-doubling"), Doubling)
        assert select.resolve_backend(torch.device("cpu"), Doubling()) == "test-doubling"
        with pytest.raises(ValueError, match="test-doubling"):
            select.get_backend("cpu", "nope")  # the error lists the registry's names, the new one too
    finally:
        registry.unregister_backend("test-doubling")
