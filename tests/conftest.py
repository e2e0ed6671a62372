"""Test session setup.

On a machine without CUDA the Triton kernels run under Triton's interpreter: the variable must
be set before triton is first imported, which is why it is set here, at the very top. Child
ranks of the gloo pool inherit it.

No process may outlive the session. Every process the suite starts inherits ``SESSION_MARK``
(set here, unique to this session); when the session ends, any process that still carries it,
or still descends from this one, is killed and the session fails with its pid and command line.
"""

import os
import time
import uuid

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

from tplora_kernels.testing.launch import RankPool, descendants, kill_all

from .support.harness import TP_SIZES, WORLD

# Examples cost a multi-rank forward+backward under the interpreter: no deadline, no
# too-slow health check. `derandomize` makes CI runs reproducible; locally set
# HYPOTHESIS_PROFILE=dev to explore new examples.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SESSION_MARK = "TPLORA_TEST_SESSION"
LEFTOVER_GRACE_S = 10.0  # processes that are ending (a killed rank's children) get this long to go


@pytest.fixture(scope="session")
def dist_pool():
    """The session's gloo ranks (see tests/support/harness.py)."""
    pool = RankPool(WORLD, TP_SIZES)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def kernel_backend() -> str:
    """The backend that runs the Triton kernels on this machine."""
    return "triton" if torch.cuda.is_available() else "interpret"


# ---------------------------------------------------------------------------------------------
# Nothing outlives the session
# ---------------------------------------------------------------------------------------------
def pytest_configure(config):
    # A new value per session, also under an outer pytest: each session answers for its own children.
    os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _marked(mark: str) -> set[int]:
    """Live processes whose environment holds ``SESSION_MARK=mark``."""
    needle = f"{SESSION_MARK}={mark}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue  # gone, or a zombie, or not ours to read
        if needle in env:
            found.add(int(entry))
    return found


def _leftovers(mark: str) -> dict[int, str]:
    """pid -> command line of every process this session started that is still alive.

    This process's own multiprocessing resource tracker is not one: it exits with this process.
    """
    pids = _marked(mark) | set(descendants(os.getpid()))
    out = {}
    for pid in pids:
        cmd = _cmdline(pid)
        if cmd is None or not os.path.exists(f"/proc/{pid}"):
            continue
        if "multiprocessing.resource_tracker" in cmd and _parent(pid) == os.getpid():
            continue
        out[pid] = cmd
    return out


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    mark = os.environ.get(SESSION_MARK)
    if not mark or not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    left = _leftovers(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _leftovers(mark)
    if not left:
        return
    kill_all(sorted(left))
    session.config.stash[_LEFT] = left
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_LEFT = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left = config.stash.get(_LEFT, None)
    if not left:
        return
    terminalreporter.write_sep("=", f"{len(left)} process(es) started by the tests outlived them (killed now)",
                               red=True, bold=True)
    for pid, cmd in sorted(left.items()):
        terminalreporter.write_line(f"pid {pid}: {cmd[:300]}", red=True)
    terminalreporter.write_line("the session fails: a test must end every process it starts (join, kill in finally)",
                                red=True)
