"""The reduction layouts of the two split-reduction kernels, at sizes that cross their blocks.

``lora_dy_bwd`` reduces dB over row blocks of 256 tokens (128 above a padded rank of 64) and du
over column splits of 512;
``lora_shrink_bwd`` walks its rows with a hoisted pointer unless an operand is row-chunked. The
op tests keep every dimension <= 256 (the interpreter's speed), so they never cross those
blocks; these cases do (T = 300, N = 600), against the fp64 math and the torch backend.
"""

from __future__ import annotations

import pytest
import torch

from tplora_kernels.mask import DropoutSpec, dropout_threshold, keep_mask, keep_scale
from tplora_kernels.ops import launch as L
from tplora_kernels.ops.configs import DY_COLS, block_r, dy_rows

from ..support.checks import rel_err


@pytest.fixture(scope="module")
def backend(kernel_backend):
    if kernel_backend != "interpret":
        pytest.skip("these cases run the kernels under the interpreter")
    return "interpret"


@pytest.mark.parametrize("r", [5, 72], ids=["r5", "r72"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("u_row0", "u_rows"), [(0, 300), (100, 170)], ids=["all-rows", "own-rows"])
def test_dy_bwd_partials_cross_their_blocks(backend, dtype, u_row0, u_rows, r):
    """lora_dy_bwd's du and dB equal the fp64 math and the torch backend at sizes that cross its row
    and column blocks.
    """
    T, N, s = 300, 600, 0.75
    assert T > dy_rows(block_r(r)) and N > DY_COLS, "the case must cross both blocks"
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(T, N, generator=g).to(dtype)
    b = torch.randn(N, r, generator=g) / N ** 0.5
    u = torch.randn(u_rows, r, generator=g).to(dtype)
    du, db = L.lora_dy_bwd(dy, b, u, scale=s, u_row0=u_row0, backend=backend)
    want_du = s * dy.double() @ b.double()
    want_db = s * dy.double()[u_row0:u_row0 + u_rows].t() @ u.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(du, want_du) < tol, f"du {dtype}: rel err {rel_err(du, want_du):.2e}"
    assert rel_err(db, want_db) < 1e-5, f"dB {dtype} (fp32 partials): rel err {rel_err(db, want_db):.2e}"
    _, db_t = L.lora_dy_bwd(dy, b, u, scale=s, u_row0=u_row0, backend="torch")
    assert rel_err(db, db_t.double()) < 1e-5, "dB differs from the torch backend"


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "row-chunked"])
def test_shrink_bwd_walks_rows_plain_and_chunked(backend, chunked):
    """lora_shrink_bwd's dA equals the fp64 math past its row blocks, with plain and row-chunked operands."""
    T, K, r, p = 300, 48, 3, 0.2
    g = torch.Generator().manual_seed(1)
    du = torch.randn(T, r, generator=g)
    x = torch.randn(T, K, generator=g)
    thr = dropout_threshold(p)
    drop = DropoutSpec(torch.tensor([77], dtype=torch.int64), thr, row0=5, col0=16)
    if chunked:  # [3 chunks, 100 rows, w] views, as the collective buffers hand them over
        du_in, x_in = du.view(3, 100, r), x.view(3, 100, K)
    else:
        du_in, x_in = du, x
    got = L.lora_shrink_bwd(du_in, x_in, drop=drop, backend=backend)
    keep = keep_mask(77, 5, T, 16, K, thr).double() * keep_scale(thr)
    want = du.double().t() @ (x.double() * keep)
    assert rel_err(got, want) < 1e-5, f"dA ({'chunked' if chunked else 'plain'}): rel err {rel_err(got, want):.2e}"
