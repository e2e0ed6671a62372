"""Start ranks on this machine (gloo on 127.0.0.1, or NCCL), and end every process they start.

Three ways to run a module-level function on several ranks, and the reaper they share:

* ``spawn_world(fn, world, ...)``: a fresh world of ``world`` spawned ranks runs
  ``fn(rank, *args, **kwargs)`` once each, under a deadline. Each rank's result comes back
  (saved with ``torch.save``; the rank then leaves with ``os._exit``); a rank that raises, or
  a deadline that passes, ends every rank and everything the ranks started, and raises here
  with the tracebacks, or with what each rank last ``note``-d. Nothing outlives the call.
* ``RankPool``: ``world`` ranks started once, with one process group per size in
  ``group_sizes`` (ranks ``0..t-1``), for many small tasks: ``pool.run(fn, t, **kwargs)`` calls
  ``fn(RankCtx, **kwargs)`` on the first ``t`` ranks and brings back results or exceptions.
* ``run_script(main, report)``: what an example script needs: ``main()`` on two gloo ranks
  spawned here, or on the ranks ``torchrun`` started; rank 0 prints ``report(result)``.

Ranks share the machine's cores, so each runs one intra-op thread unless told otherwise.
The reaper (``descendants``, ``kill_all``, ``end_children``) reads Linux's ``/proc``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch

__all__ = ["PG_TIMEOUT_S", "RankCtx", "RankFailed", "RankPool", "RemoteError", "WorldFailed", "descendants",
           "end_children", "free_port", "kill_all", "note", "run_script", "spawn_world"]

PG_TIMEOUT_S = 60  # a process group's own timeout: a rank stuck in a collective errors out after this
_NOTE_ENV = "TPLORA_RANK_NOTES"  # where ``note`` writes, set in each spawned rank
_POLL_S = 0.2


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a new world's rendezvous.

    Returns:
        The port number.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The reaper
# ---------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Live descendants of a process, from Linux's ``/proc``.

    Args:
        pid: the process.

    Returns:
        Their pids, children before grandchildren (zombies left out); [] without ``/proc``.
    """
    if not os.path.isdir("/proc"):
        return []
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
    """SIGKILL each process that still exists.

    Args:
        pids: the processes; those already gone are skipped.
    """
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def end_children(timeout: float = 10.0) -> None:
    """Stop this process's multiprocessing children; call it before ``os._exit``.

    ``os._exit`` skips multiprocessing's exit handler, which would have shut down what libraries
    started here: megatron's checkpoint writer keeps a ``multiprocessing.Manager`` server (its
    results queue) in a module global, which would otherwise outlive the rank, re-parented to init.

    Args:
        timeout: seconds the children get, all together, to stop after SIGTERM before SIGKILL.
    """
    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def note(what: str) -> None:
    """Record what this rank of a ``spawn_world`` world is doing, so that a timeout can name it.

    Args:
        what: a one-line label (the task about to run). Outside a spawned world this does nothing.
    """
    path = os.environ.get(_NOTE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(what.replace("\n", " ") + "\n")


def _last_line(path: str) -> str | None:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return lines[-1] if lines else None


# ---------------------------------------------------------------------------------------------
# A fresh world
# ---------------------------------------------------------------------------------------------
class WorldFailed(RuntimeError):
    """A rank of a ``spawn_world`` world raised or died; the message holds each failed rank's traceback."""


@dataclass(frozen=True)
class _World:
    """What every rank of a ``spawn_world`` world is told (pickled to it)."""

    fn: Callable
    args: tuple
    kwargs: dict
    world: int
    port: int
    backend: str | None
    pg_timeout_s: float
    threads: int | None
    workdir: str
    keep: str
    exit_hard: bool


def _paths(workdir: str, rank: int) -> dict[str, str]:
    return {k: os.path.join(workdir, f"rank{rank}.{k}") for k in ("pt", "err", "log")}


def _init_rank(rank: int, w: _World) -> None:
    """This rank's environment, threads and process group."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(w.port)
    os.environ[_NOTE_ENV] = _paths(w.workdir, rank)["log"]
    if w.threads is not None:
        torch.set_num_threads(w.threads)
    if w.backend is None:
        return
    extra = {}
    if w.backend == "nccl":
        torch.cuda.set_device(rank)
        extra["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(w.backend, rank=rank, world_size=w.world, timeout=timedelta(seconds=w.pg_timeout_s),
                            **extra)


def _world_rank(rank: int, w: _World) -> None:
    """Entry point of one spawned rank (see ``spawn_world``)."""
    import torch.distributed as dist

    paths = _paths(w.workdir, rank)
    try:
        _init_rank(rank, w)
        result = w.fn(rank, *w.args, **w.kwargs)
        if w.keep == "all" or (w.keep == "rank0" and rank == 0):
            torch.save(result, paths["pt"])
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        with open(paths["err"], "w") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
        failed = True
    else:
        failed = False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        end_children()
        sys.stdout.flush()
        sys.stderr.flush()
    if failed or w.exit_hard:
        # Done (and saved), or failed (and said why): leave without interpreter teardown. Megatron's
        # checkpoint writer can leave a joinable C++ thread behind, whose destructor at exit aborts
        # the process now and then ("terminate called without an active exception").
        os._exit(1 if failed else 0)


def _reap(procs: list) -> None:
    """Kill every rank still alive with everything it started; join them all."""
    for p in procs:
        if p.is_alive():
            kill_all([*descendants(p.pid), p.pid])
    for p in procs:
        p.join(timeout=5)


def spawn_world(fn: Callable, world: int, *, args: tuple = (), kwargs: dict | None = None,
                timeout: float | None = 240.0, backend: str | None = "gloo", pg_timeout_s: float = PG_TIMEOUT_S,
                threads: int | None = 1, keep: str = "all", workdir: str | None = None,
                poll: Callable[[], None] | None = None, name: str | None = None, exit_hard: bool = True) -> list:
    """Run ``fn(rank, *args, **kwargs)`` once on each of ``world`` fresh spawned ranks.

    Each rank sets ``MASTER_ADDR``/``MASTER_PORT`` (127.0.0.1, a free port), its intra-op threads
    and its process group, runs ``fn``, saves its result, waits for the others at a barrier,
    destroys the group and ends its multiprocessing children (``end_children``). The ranks are
    not daemonic, so ``fn`` may start processes of its own. Every rank, and everything it
    started, is gone when this returns or raises.

    Args:
        fn: a module-level function (pickled by reference), called as ``fn(rank, *args, **kwargs)``.
        world: how many ranks.
        args, kwargs: passed to ``fn`` (picklable; a ``multiprocessing`` queue from the spawn
            context may be among them, to stream progress back while the world runs).
        timeout: seconds for the whole world; on expiry every rank is killed and this raises
            ``TimeoutError``, naming what each rank last ``note``-d. None: no deadline.
        backend: ``"gloo"``, ``"nccl"`` (rank i on ``cuda:i``) or None (no process group).
        pg_timeout_s: the process group's own timeout.
        threads: ``torch.set_num_threads`` in each rank (None leaves torch's default).
        keep: whose results come back: ``"all"``, ``"rank0"`` or ``"none"``.
        workdir: where results, tracebacks and notes go (kept); default a temporary directory,
            removed afterwards.
        poll: called about every 0.2 s while the world runs, and once after it ends.
        name: what the error messages call this world (default ``fn``'s name).
        exit_hard: leave each rank with ``os._exit`` once its result is saved (see
            ``end_children``); False lets the interpreter tear down as usual.

    Returns:
        One entry per rank: its result, or None where ``keep`` drops it.

    Raises:
        TimeoutError: the deadline passed.
        WorldFailed: a rank raised (its traceback in the message) or died.
    """
    if keep not in ("all", "rank0", "none"):
        raise ValueError(f"keep must be 'all', 'rank0' or 'none', got {keep!r}")
    name = name or getattr(fn, "__name__", repr(fn))
    own_dir = workdir is None
    workdir = tempfile.mkdtemp(prefix="tplora-world-") if own_dir else workdir
    os.makedirs(workdir, exist_ok=True)
    for r in range(world):
        for path in _paths(workdir, r).values():
            if os.path.exists(path):
                os.remove(path)
    spec = _World(fn, tuple(args), dict(kwargs or {}), world, free_port(), backend, pg_timeout_s, threads, workdir,
                  keep, exit_hard)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_world_rank, args=(r, spec), name=f"{name}-rank{r}") for r in range(world)]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while True:
            if poll is not None:
                poll()
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                _reap(procs)
                raise WorldFailed(f"{name} on {world} ranks: " + "\n".join(
                    f"rank {r} exited with code {codes[r]}:\n{_read(_paths(workdir, r)['err']) or '(no traceback)'}"
                    for r in failed))
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                notes = [_last_line(_paths(workdir, r)["log"]) for r in range(world)]
                raise TimeoutError(f"{name} did not finish on {world} ranks within {timeout:g}s; what each rank "
                                   f"last noted: {notes}")
            time.sleep(_POLL_S)
        if poll is not None:
            poll()
        return [torch.load(_paths(workdir, r)["pt"], weights_only=False)
                if keep == "all" or (keep == "rank0" and r == 0) else None for r in range(world)]
    finally:
        _reap(procs)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Example scripts
# ---------------------------------------------------------------------------------------------
def _script_rank(rank: int, main: Callable[[], object], report: Callable[[object], str]) -> None:
    import torch.distributed as dist

    res = main()
    if dist.get_rank() == 0:
        print(report(res), flush=True)


def run_script(main: Callable[[], object], report: Callable[[object], str], world: int = 2) -> None:
    """Run an example's ``main()`` on gloo ranks; rank 0 prints ``report(result)``, the others nothing.

    Under ``torchrun`` (``RANK`` in the environment) this process is one of its ranks and joins
    their group; otherwise ``world`` ranks are spawned here (no deadline).

    Args:
        main: a module-level function of the script, run on every rank.
        report: turns rank 0's result into the line it prints.
        world: ranks to spawn when not under torchrun.
    """
    import torch.distributed as dist

    if "RANK" in os.environ:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
        dist.init_process_group("gloo")
        try:
            _script_rank(dist.get_rank(), main, report)
        finally:
            dist.destroy_process_group()
        return
    spawn_world(_script_rank, world, args=(main, report), timeout=None, threads=None, keep="none",
                name=getattr(main, "__module__", "main"))


# ---------------------------------------------------------------------------------------------
# A pool of ranks for many small tasks
# ---------------------------------------------------------------------------------------------
@dataclass
class RankCtx:
    """What a pool task sees on its rank.

    Attributes:
        rank: this rank (0-based).
        tp: the size of the group the task runs on.
        group: the ``torch.distributed`` process group of ranks ``0..tp-1``.
    """

    rank: int
    tp: int
    group: object = field(repr=False)


@dataclass
class RemoteError:
    """An exception raised on a rank, brought back to the calling process.

    Attributes:
        rank: where it was raised.
        type_name: the exception's class name.
        message: ``str`` of the exception.
        traceback: the rank's formatted traceback.
    """

    rank: int
    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}\n{self.traceback}"


class RankFailed(AssertionError):
    """Raised by ``RankPool.run`` when a rank raised and the caller did not ask for errors."""


def _pool_rank(rank: int, world: int, port: int, group_sizes: tuple, pg_timeout_s: float, conn) -> None:
    import torch.distributed as dist

    # The ranks share the machine's cores: intra-op threads per rank only oversubscribe them
    # (measured: a batch of TP-equivalence cases runs in about half the wall time with one).
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
    groups = {t: dist.new_group(list(range(t))) for t in group_sizes if t <= world}
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


class RankPool:
    """``world`` gloo ranks that live until ``close``; ``run`` executes a task on the first ``tp``.

    Spawning processes and building a process group costs seconds, so the pool starts its ranks
    once (127.0.0.1, gloo, one intra-op thread each) and creates one group per size in
    ``group_sizes`` (ranks ``0..t-1``). Every wait has a deadline: a hang fails the call that
    caused it, and the pool restarts for the next one. The ranks are daemonic, so a task may not
    start processes of its own: such work runs in ``spawn_world``.

    Args:
        world: ranks to start.
        group_sizes: the group sizes tasks may ask for.
        start_timeout: seconds each rank gets to join.
        pg_timeout_s: the process group's own timeout.
    """

    def __init__(self, world: int = 4, group_sizes: tuple[int, ...] = (1, 2, 4), start_timeout: float = 180.0,
                 pg_timeout_s: float = PG_TIMEOUT_S) -> None:
        self.world = world
        self.group_sizes = tuple(group_sizes)
        self._start_timeout = start_timeout
        self._pg_timeout_s = pg_timeout_s
        self._procs: list = []
        self._conns: list = []
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        port = free_port()
        self._procs, self._conns = [], []
        for r in range(self.world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_pool_rank, args=(r, self.world, port, self.group_sizes, self._pg_timeout_s, child),
                            daemon=True)
            p.start()
            self._procs.append(p)
            self._conns.append(parent)
        for r, c in enumerate(self._conns):
            if not c.poll(self._start_timeout):
                self.close()
                raise RuntimeError(f"rank {r} did not start within {self._start_timeout}s")
            c.recv()

    def close(self) -> None:
        """Stop every rank (asked first, killed after 5 s)."""
        for c in self._conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._conns = [], []

    def restart(self) -> None:
        """Stop every rank and start afresh (after a rank may have been left inside a collective)."""
        self.close()
        self._start()

    def run(self, fn: Callable, tp: int, *, timeout: float = 300.0, raise_errors: bool = True, **kwargs) -> list:
        """Run ``fn(RankCtx, **kwargs)`` on ranks ``0..tp-1``; return their results in rank order.

        Args:
            fn: a module-level function (pickled by reference).
            tp: the group size, one of ``group_sizes``.
            timeout: seconds to wait for each rank; on expiry the pool restarts and this raises.
            raise_errors: raise ``RankFailed`` if a rank raised; else return ``RemoteError``s.
            kwargs: passed to ``fn`` (picklable).

        Returns:
            One result (or ``RemoteError``) per rank.

        Raises:
            TimeoutError: a rank gave no answer in time (a hang).
            RankFailed: a rank raised and ``raise_errors`` is set.
        """
        if tp not in self.group_sizes or tp > self.world:
            raise ValueError(f"tp must be one of {self.group_sizes} (<= {self.world}), got {tp}")
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
