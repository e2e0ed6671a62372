"""The session's pool of gloo ranks, and what the tests ask of it.

The pool is ``tplora_kernels.testing.launch.RankPool``: ``WORLD`` ranks started once, one TP
group per size in ``TP_SIZES`` (ranks ``0..t-1``). A test sends a picklable, module-level
function and keyword arguments to ranks ``0..tp-1``; each rank calls ``fn(ctx, **kwargs)`` and
sends back the result or the exception (``RemoteError``). Work the pool's daemonic ranks may not
do (start processes of their own, like megatron's checkpoint writer) runs in a fresh world
(``launch.spawn_world``).
"""

from __future__ import annotations

import importlib.util

from tplora_kernels.testing.launch import RankCtx, RankFailed, RankPool, RemoteError

__all__ = ["TP_SIZES", "WORLD", "RankCtx", "RankFailed", "RankPool", "RemoteError", "cpu_kernel_backend",
           "run_example"]

WORLD = 4
TP_SIZES = (1, 2, 4)


def cpu_kernel_backend(kernel_backend: str) -> str:
    """The backend that runs the Triton kernels on the gloo ranks' CPU tensors.

    ``interpret`` on a CPU machine; on a CUDA machine (no interpreter, and gloo's collectives want
    CPU tensors) the multi-rank tests fall back to the ``torch`` backend.
    """
    return "interpret" if kernel_backend == "interpret" else "torch"


def run_example(ctx: RankCtx, path: str, out_dir: str) -> dict:
    """On a pool rank: import an example file and run its ``main()`` on this rank's TP group."""
    spec = importlib.util.spec_from_file_location(f"example_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(tp_group=ctx.group, out_dir=out_dir)
