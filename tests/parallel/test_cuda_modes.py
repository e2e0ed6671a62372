"""Every TP mode on a CUDA device at TP = 1, 2 and 4, against the single-device fp64 math (``gpu`` marker).

Column (SP off/on x gather_output) and row (SP off/on x input_is_parallel) through the functional
API, forward and backward, fp32/fp16/bf16, p = 0 and 0.1. TP > 1 runs t processes on the one
GPU: the kernels run on CUDA, and the collectives are bridged through a CPU gloo group (each call
copies the buffer to the host, runs the gloo collective and copies it back), so the package's
own collective code paths and buffers run unchanged. Each result must meet the one tolerance
rule (``tests/support/cuda.py``). Off CUDA these skip, with the reason; ``test_tp_equivalence.py``
proves the same property on CPU ranks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import tplora_kernels as tk
from tplora_kernels.reference import lora_dense
from tplora_kernels.testing import launch

from ..support.cuda import SEED, failures, needs_cuda, target, verdict, write_verdicts

pytestmark = needs_cuda

MODES = [("column", {"sequence_parallel": sp, "gather_output": go}) for sp in (False, True) for go in (False, True)] \
    + [("row", {"sequence_parallel": sp, "input_is_parallel": iip}) for sp in (False, True) for iip in (True, False)]


def _bridge_collectives() -> None:
    """Route torch.distributed's collectives through host copies, so gloo serves CUDA tensors."""

    def bridged(fn, n_out: int):
        def call(*args, **kwargs):
            ts = list(args)
            dev = [t for t in ts if hasattr(t, "device")]
            if not dev or dev[0].device.type == "cpu":
                return fn(*args, **kwargs)
            host = [t.cpu() if hasattr(t, "device") else t for t in ts]
            work = fn(*host, **kwargs)
            for i in range(n_out):
                ts[i].copy_(host[i])
            return work

        return call

    dist.all_reduce = bridged(dist.all_reduce, 1)
    dist.all_gather_into_tensor = bridged(dist.all_gather_into_tensor, 1)
    dist.reduce_scatter_tensor = bridged(dist.reduce_scatter_tensor, 1)


def _mode_case(tp, rank, group, kind, opts, dt, p, shape, device, backend, results) -> None:
    T, K, N, r = shape
    g = torch.Generator().manual_seed(T * 31 + K)
    X, W = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g) * K ** -0.5
    A, B = torch.randn(r, K, generator=g) * K ** -0.5, torch.randn(N, r, generator=g) * 0.1
    dY = torch.randn(T, N, generator=g)
    s, sp = 0.5, opts["sequence_parallel"] and tp > 1
    grads = {}
    for d in (torch.float64, dt):
        xs, As, Bs = (t.to(device, d, copy=True).requires_grad_(True) for t in (X, A, B))
        y = lora_dense(xs, W.to(device, d), As, Bs, scale=s, dropout_p=p, seed=SEED)
        y.backward(dY.to(device, d))
        grads[d] = {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad}
    rows = slice(rank * T // tp, (rank + 1) * T // tp)
    if kind == "column":
        n = slice(rank * N // tp, (rank + 1) * N // tp)
        sel = {"y": (slice(None), slice(None) if opts["gather_output"] else n), "dx": (rows if sp else slice(None),),
               "dA": (slice(None),), "dB": (n,)}
        x_in = X[rows] if sp else X
        w_i, a_i, b_i = W[n], A, B[n]
        dy_in = dY if opts["gather_output"] else dY[:, n]
    else:
        k = slice(rank * K // tp, (rank + 1) * K // tp)
        iip = opts["input_is_parallel"]
        sel = {"y": (rows if sp else slice(None),), "dx": (slice(None), k if iip else slice(None)),
               "dA": (slice(None), k), "dB": (slice(None),)}
        x_in = X[:, k] if iip else X
        w_i, a_i, b_i = W[:, k], A[:, k], B
        dy_in = dY[rows] if sp else dY
    x_in, a_i, b_i = (t.to(device, dt, copy=True).requires_grad_(True) for t in (x_in, a_i, b_i))
    fn = tk.column_parallel_lora if kind == "column" else tk.row_parallel_lora
    y = fn(x_in, w_i.to(device, dt), a_i, b_i, scale=s, dropout_p=p, seed=SEED, group=group, backend=backend,
           **opts)
    y.backward(dy_in.to(device, dt))
    if sp:
        (a_i if kind == "column" else b_i).sequence_parallel = True
        tk.sum_sequence_parallel_grads([a_i, b_i], group)
    got = {"y": y.detach(), "dx": x_in.grad, "dA": a_i.grad, "dB": b_i.grad}
    tags = {"tp": tp, "rank": rank, "kind": kind, **opts, "dtype": str(dt)[6:], "p": p, "shape": list(shape)}
    for name in ("y", "dx", "dA", "dB"):
        ix = sel[name]
        verdict(f"{kind} {name}", got[name], grads[torch.float64][name][ix], grads[dt][name][ix], results, **tags)


def modes_rank(rank: int, tp: int) -> list[dict]:
    """One rank of a TP = ``tp`` world on the one device: every mode, dtype and p; its verdicts."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    _bridge_collectives()
    tg = target()
    shapes = [(64, 64, 48, 8), (68, 120, 88, 3)] if tg.small else [(256, 512, 384, 16), (68, 120, 88, 3)]
    odd_dtypes = (torch.float32, torch.bfloat16)  # the odd shape: fewer dtypes, fewer compiles
    results: list = []
    for kind, opts in MODES:
        if tp == 1 and (opts["sequence_parallel"] or opts.get("gather_output")
                        or not opts.get("input_is_parallel", True)):
            continue
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for p in (0.0, 0.1):
                for shape in shapes:
                    if shape is shapes[-1] and dt not in odd_dtypes:
                        continue
                    # An exception ends the world (its traceback in the test's failure): a rank that
                    # raised would leave its peers waiting inside a collective.
                    _mode_case(tp, rank, dist.group.WORLD, kind, opts, dt, p, shape, tg.device, tg.backend, results)
    return results


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_mode_matches_fp64(tp, request):
    """At TP = tp every mode's y, dx, dA and dB on every rank equal the fp64 math on its shard, within the rule."""
    ranks = launch.spawn_world(modes_rank, tp, args=(tp,), timeout=300, pg_timeout_s=60)
    results = [r for rank in ranks for r in rank]
    write_verdicts(request, results)
    assert failures(results) is None, failures(results)
