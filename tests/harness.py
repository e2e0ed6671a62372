"""A pool of gloo ranks that lives for the whole test session.

Spawning processes and building a process group costs seconds, so the pool starts ``WORLD``
ranks once (127.0.0.1, gloo) and creates one TP group per size in ``TP_SIZES`` (ranks
``0..t-1``). A test sends a picklable, module-level function and keyword arguments to ranks
``0..tp-1``; each rank calls ``fn(ctx, **kwargs)`` and sends back the result or the exception.

Every wait has a deadline, so a hang fails the test that caused it (and the pool restarts for
the next one) instead of hanging CI.

Work the pool's daemonic ranks may not do (start processes of their own, like megatron's
checkpoint writer) runs in a fresh world (``run_standalone``), whose ranks end their own
children (``end_children``) and are killed with theirs on a timeout: nothing outlives a test.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch.multiprocessing as mp

WORLD = 4
TP_SIZES = (1, 2, 4)
PG_TIMEOUT_S = 60  # gloo's own timeout: a rank stuck in a collective errors out after this.


@dataclass
class RankCtx:
    """What a task sees on its rank."""

    rank: int
    tp: int
    group: object  # torch.distributed.ProcessGroup of ranks 0..tp-1


@dataclass
class RemoteError:
    """An exception raised on a rank, brought back to the test process."""

    rank: int
    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}\n{self.traceback}"


class RankFailed(AssertionError):
    """Raised in the test process when a rank raised and the test did not ask for errors."""


def _worker(rank: int, world: int, port: int, conn) -> None:
    import torch
    import torch.distributed as dist

    # WORLD ranks share the machine's cores: intra-op threads per rank only oversubscribe them
    # (measured: a batch of TP-equivalence cases runs in about half the wall time with one).
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    groups = {t: dist.new_group(list(range(t))) for t in TP_SIZES if t <= world}
    conn.send(("ready", rank))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, tp, kwargs = msg
        try:
            out = ("ok", fn(RankCtx(rank, tp, groups[tp]), **kwargs))
        except BaseException as e:
            out = ("err", RemoteError(rank, type(e).__name__, str(e), traceback.format_exc()))
        try:
            conn.send(out)
        except Exception as e:
            conn.send(("err", RemoteError(rank, type(e).__name__, f"could not send result: {e}", "")))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistPool:
    """``WORLD`` gloo ranks in child processes; ``run`` executes a task on the first ``tp``."""

    def __init__(self, world: int = WORLD, start_timeout: float = 180.0) -> None:
        self.world = world
        self._start_timeout = start_timeout
        self._procs: list = []
        self._conns: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._procs, self._conns = [], []
        for r in range(self.world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, self.world, port, child), daemon=True)
            p.start()
            self._procs.append(p)
            self._conns.append(parent)
        for r, c in enumerate(self._conns):
            if not c.poll(self._start_timeout):
                self.close()
                raise RuntimeError(f"rank {r} did not start within {self._start_timeout}s")
            c.recv()

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs, self._conns = [], []

    def restart(self) -> None:
        self.close()
        self._start()

    def run(self, fn, tp: int, *, timeout: float = 300.0, raise_errors: bool = True, **kwargs) -> list:
        """Run ``fn(ctx, **kwargs)`` on ranks ``0..tp-1``; return their results in rank order.

        Args:
            fn: a module-level function (it is pickled by reference).
            tp: TP size, one of ``TP_SIZES``.
            timeout: seconds to wait for each rank; on expiry the pool restarts and this raises.
            raise_errors: raise ``RankFailed`` if a rank raised; else return ``RemoteError``s.

        Returns:
            One result (or ``RemoteError``) per rank.
        """
        if tp not in TP_SIZES or tp > self.world:
            raise ValueError(f"tp must be one of {TP_SIZES} (<= {self.world}), got {tp}")
        if not self._procs or any(not p.is_alive() for p in self._procs):
            self.restart()
        for r in range(tp):
            self._conns[r].send((fn, tp, kwargs))
        results = []
        for r in range(tp):
            if not self._conns[r].poll(timeout):
                self.restart()
                raise TimeoutError(f"rank {r} of tp={tp} gave no answer within {timeout}s (hang?) in "
                                   f"{fn.__name__}({kwargs})")
            _status, value = self._conns[r].recv()
            results.append(value)
        errors = [v for v in results if isinstance(v, RemoteError)]
        if errors and raise_errors:
            # A rank that raised may have left its peers inside a collective: start afresh.
            self.restart()
            raise RankFailed("\n".join(str(e) for e in errors))
        return results


def cpu_kernel_backend(kernel_backend: str) -> str:
    """The backend that runs the Triton kernels on the gloo ranks' CPU tensors.

    ``interpret`` on a CPU machine; on a CUDA machine (no interpreter, and gloo's collectives want
    CPU tensors) the multi-rank tests fall back to the ``torch`` backend.
    """
    return "interpret" if kernel_backend == "interpret" else "torch"


def run_example(ctx, path: str, out_dir: str) -> dict:
    """On a pool rank: import an example file and run its ``main()`` on this rank's TP group."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(tp_group=ctx.group, out_dir=out_dir)


# ---------------------------------------------------------------------------------------------
# Fresh worlds outside the pool, and the processes they leave
# ---------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def kill_all(pids: list[int]) -> None:
    """SIGKILL each pid that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def end_children(timeout: float = 10.0) -> None:
    """Stop this process's multiprocessing children; call before ``os._exit``.

    ``os._exit`` skips multiprocessing's exit handler, which would have shut down what libraries
    started here: megatron's checkpoint writer keeps a ``multiprocessing.Manager`` server for its
    result queue, which otherwise outlives the rank, re-parented to init.
    """
    import multiprocessing

    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _standalone_worker(rank: int, world: int, port: int, fn, out_path: str, kwargs: dict) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        res = fn(rank, **kwargs)
        if rank == 0:
            torch.save(res, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        end_children()
    # Done and saved: leave without interpreter teardown. Megatron's checkpoint writer can leave a
    # joinable C++ thread behind, whose destructor at exit aborts the process now and then
    # ("terminate called without an active exception"), after the work has finished.
    os._exit(0)


def run_standalone(fn, world: int, out_path: str, timeout: float = 240.0, **kwargs):
    """Run ``fn(rank, **kwargs)`` on ``world`` fresh, non-daemonic gloo ranks; return rank 0's result.

    For work the pool's daemonic ranks may not do (start processes of their own). ``fn`` is a
    module-level function. Every rank, and anything it started, is gone when this returns or raises.
    """
    import torch

    port = _free_port()
    procs = mp.start_processes(_standalone_worker, args=(world, port, fn, out_path, kwargs), nprocs=world,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks within {timeout}s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                kill_all([*descendants(p.pid), p.pid])
            p.join(timeout=5)
    return torch.load(out_path, weights_only=False)
