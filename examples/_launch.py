"""How the examples start their ranks: two gloo ranks spawned here, or the ranks torchrun started.

Either way rank 0 prints the example's result line; the other ranks print nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int | None, main: Callable[[], dict], report: Callable[[dict], str]) -> None:
    if port is None:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
        dist.init_process_group("gloo")
    else:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = main()
        if dist.get_rank() == 0:
            print(report(res), flush=True)
    finally:
        dist.destroy_process_group()


def run(main: Callable[[], dict], report: Callable[[dict], str], world: int = 2) -> None:
    """Run ``main()`` on ``world`` gloo ranks on this machine (or on torchrun's), print ``report(result)``."""
    if "RANK" in os.environ:
        _rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, main, report)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, main, report), nprocs=world)
