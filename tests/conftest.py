"""Test session setup.

On a machine without CUDA the Triton kernels run under Triton's interpreter: the variable must
be set before triton is first imported, which is why it is set here, at the very top. Child
ranks of the gloo pool inherit it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

from .harness import DistPool

# Examples cost a multi-rank forward+backward under the interpreter: no deadline, no
# too-slow health check. `derandomize` makes CI runs reproducible; locally set
# HYPOTHESIS_PROFILE=dev to explore new examples.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def dist_pool():
    """The session's gloo ranks (see tests/harness.py)."""
    pool = DistPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def kernel_backend() -> str:
    """The backend that runs the Triton kernels on this machine."""
    return "triton" if torch.cuda.is_available() else "interpret"
