"""Triton kernels for LoRA on one tensor-parallel rank (private; see ``ops.launch``).

Five kernels, after LoRAFusion's split (arXiv 2510.00206: a shrink pass, the base GEMM with the
LoRA up-projection fused in, and their backward twins):

==========================  ==========================================  ===================
kernel                      computes                                    reads once
==========================  ==========================================  ===================
``_lora_shrink_fwd_kernel``  ``u = drop(X) Aᵀ`` (and optionally copies X)  X
``_lora_linear_fwd_kernel``  ``out = X Wᵀ + s·u Bᵀ (+ bias)``             X, W
``_lora_dy_bwd_kernel``      ``du = s·dy B`` and ``dB = s·dyᵀ u``         dy
``_lora_linear_dx_kernel``   ``dx = dy W + (du A) ⊙ M / (1-p)``           dy, W
``_lora_shrink_bwd_kernel``  ``dA = duᵀ drop(X)``                         X
==========================  ==========================================  ===================

DoRA's per-output-column factor ``g`` (``COL_SCALE``, fp32 ``[N]``) and its extras, each a
constexpr flag whose off setting compiles to the code above:

* ``linear_fwd``: ``acc = drop(X) Wᵀ + s·u Bᵀ`` (``HAS_DROPOUT``: X masked in the K loop with
  shrink_fwd's bits, only that product rescaled); ``OUT0`` stores ``acc`` (pre-scale, no bias),
  then ``out = g ⊙ acc (+ bias)``.
* ``dy_bwd``: ``g ⊙ dy`` feeds du and dB (as ``dy (g ⊙ B)`` and ``g ⊙ (dyᵀ u)``: the small
  tiles take g, not dy's); ``COMPUTE_DM`` also reduces ``dm = Σ_t dy ⊙ y0`` over u's rows from
  the same read of dy, as fp32 partials per row block.
* ``linear_dx``: ``(g ⊙ dy) W + du A``; ``MASK_ALL`` masks the whole sum (in the epilogue)
  instead of the LoRA term only.

Conventions that every kernel shares:

* **Row-chunked operands.** Every operand with one row per token ("T-row") is addressed as
  ``row m -> (m // RPC) * s_c + (m % RPC) * s_m``. A plain 2-D tensor passes ``s_c = RPC·s_m``;
  a collective buffer ``[t chunks, T/t rows, W]`` passes its chunk stride. That lets the kernels
  write ``z`` and ``u`` (or ``dX`` and ``du``) straight into the one buffer that the base layer's
  collective reduces, so LoRA adds no collective and no copy.
* **Dropout in registers.** ``_keep8`` is the mask of ``tplora_kernels.mask``, bit for bit:
  Philox-4x32-7 (``mask.PHILOX_ROUNDS``) on counter ``(col >> 3, row, row >> 32, col >> 35)``, 16-bit lane ``col & 7``,
  keep iff ``lane >= THR``; one Philox call serves 8 columns. ``_keep`` (one call per element)
  is the fallback when a shard's first column is not a multiple of 8 (``PACKED`` off). Dropping
  multiplies by the 0/1 mask (not ``where``), so a NaN or Inf in x propagates exactly as through
  ``nn.Dropout``; the 1/(1-p) rescale is applied once to the fp32 accumulator, not per element.
* **fp32 accumulation**; outputs take their buffer's dtype. LoRA weight tiles are cast to the
  activation dtype for ``tl.dot``.
* ``INTERP_BF16`` is set only under Triton's interpreter with bf16 activations, whose emulation
  has two faults: ``tl.dot`` multiplies bf16's raw uint16 bits (triton issue #11584), and the
  fp32->bf16 cast truncates where the GPU rounds to nearest even. The flag upcasts dot operands
  to fp32 (``_dot``, the one place) and rounds stores by hand (``_cast_out``), so the interpreter
  computes what the GPU does.
* **No recompiles per batch.** Token counts and per-rank offsets are ``do_not_specialize``, so a
  new T, a new rank or a new sequence-parallel slice reuses the compiled kernel.
* **int64 offsets.** Row indices are int64 before they meet a stride, so T·K > 2^31 is safe.
* **Reductions never depend on the launch config.** Autotune varies only the non-reduction
  tiles, warps and stages; every reduction's block (``BLOCK_K`` of the forward GEMM, ``BLOCK_N``
  of the backward one, the dy-pass and shrink-grad row blocks) is fixed per dtype, so results
  are bit-identical whichever config a rank's autotuner picks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..mask import PHILOX_ROUNDS

__all__ = ["KERNELS", "interpreter_active"]

_ROUNDS = tl.constexpr(PHILOX_ROUNDS)
# _dot's CAST: which operand of a mixed-dtype dot (a LoRA weight in fp32 beside 16-bit activations)
# takes the other's dtype on the GPU. Globals must be constexpr *values* for triton's compiler (an
# annotated ``_SAME: tl.constexpr = 0`` passes the interpreter but is a NameError when compiled).
_SAME = tl.constexpr(0)
_B_TO_A = tl.constexpr(1)
_A_TO_B = tl.constexpr(2)


@triton.jit
def _philox_grid(seed, r, g):
    """Philox-4x32's four words (``mask.PHILOX_ROUNDS`` rounds) for rows ``r`` [BM, 1] x column groups ``g`` [1, G].

    ``r`` and ``g`` are int64; the counter is ``(g, r, r >> 32, g >> 32)``, as in ``mask``. They
    go in as a column and a row vector and broadcast inside Philox's first rounds.
    """
    return tl.philox(seed, g.to(tl.uint32), r.to(tl.uint32), (r >> 32).to(tl.uint32), (g >> 32).to(tl.uint32),
                     n_rounds=_ROUNDS)


@triton.jit
def _keep(seed, o_row, o_col, THR):
    """[BM, BN] keep-mask for global rows ``o_row`` [BM] and columns ``o_col`` [BN] (int64).

    ``THR`` is the constexpr threshold, or one per row (``[BM, 1]`` uint32, see ``_thr``)."""
    w0, w1, w2, w3 = _philox_grid(seed, o_row[:, None], o_col[None, :] >> 3)
    lane = o_col[None, :] & 7
    word = tl.where(lane < 2, w0, tl.where(lane < 4, w1, tl.where(lane < 6, w2, w3)))
    half = (word >> ((lane & 1) * 16).to(tl.uint32)) & 0xFFFF
    return half >= THR


@triton.jit
def _keep8(seed, o_row, g0, BLOCK_N: tl.constexpr, THR):
    """[BM, BLOCK_N] keep-mask for rows ``o_row`` and the columns ``8·g0 ..``: the same bits as ``_keep``.

    One Philox call per group of 8 columns instead of per element (8x fewer integer ops): the
    four 32-bit words are split into eight 16-bit lanes and interleaved back into column order.
    Needs the first column to be a multiple of 8 (the launcher checks ``col0 % 8``). ``THR`` as
    in ``_keep``.
    """
    G: tl.constexpr = BLOCK_N // 8
    g = g0 + tl.arange(0, G).to(tl.int64)
    w0, w1, w2, w3 = _philox_grid(seed, o_row[:, None], g[None, :])
    # [BM, G, 2, 2] flattens to words w0, w1, w2, w3 (join puts its new axis last).
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [o_row.shape[0], G * 4])
    lanes = tl.join(words & 0xFFFF, words >> 16)  # [BM, 4G, 2]: low half first, as in ``_keep``
    return tl.reshape(lanes, [o_row.shape[0], BLOCK_N]) >= THR


@triton.jit
def _thr(p_rthr, o_row, PERIOD, THR: tl.constexpr, ROW_THR: tl.constexpr):
    """The threshold for global rows ``o_row``: the constexpr ``THR``, or (``ROW_THR``) each row's
    ``p_rthr[row % PERIOD]`` as ``[BM, 1]`` uint32 (one adapter per sample, each with its own p)."""
    # One return statement: triton's compiler (not the interpreter) types every return of a
    # function alike, and a [BM, 1] tensor beside a constexpr int fails the ROW_THR compile.
    if ROW_THR:
        thr = tl.load(p_rthr + o_row % PERIOD).to(tl.uint32)[:, None]
    else:
        thr = THR
    return thr


@triton.jit
def _dot(a, b, acc, CAST: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` (``acc`` None: ``a @ b``) in fp32: the one place the interpreter's bf16 fix lives.

    On a GPU the operand named by ``CAST`` takes the other's dtype first (``_B_TO_A``: a LoRA weight
    tile meets 16-bit activations). Under ``INTERP_BF16`` both go to fp32 unrounded instead, since
    the interpreter's bf16 dot multiplies raw bits (see the module docstring).
    """
    if INTERP_BF16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    elif CAST == _B_TO_A:
        out = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    elif CAST == _A_TO_B:
        out = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _cast_out(acc, p_out, INTERP_BF16: tl.constexpr):
    """fp32 accumulator -> the output's dtype, rounding to nearest even (see INTERP_BF16)."""
    if INTERP_BF16:
        if p_out.dtype.element_ty == tl.bfloat16:
            # Round the fp32 bits to nearest even at bit 16, keep the top half as the bf16 bits.
            bits = acc.to(tl.uint32, bitcast=True)
            top = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
            return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return acc.to(p_out.dtype.element_ty)


@triton.jit
def _rows(o_m, RPC, s_c, s_m):
    """int64 element offsets of T-rows ``o_m`` in a row-chunked operand."""
    return (o_m // RPC) * s_c + (o_m % RPC) * s_m


@triton.jit
def _grouped(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Swizzled (pid_m, pid_n): GROUP_M row-blocks share each column-block sweep, for L2 reuse."""
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["T", "RPC", "row0", "col0", "PERIOD"])
def _lora_shrink_fwd_kernel(
    p_x, p_a, p_u, p_seed, p_xo, p_rthr,
    T, K, R, RPC,
    s_xc, s_xm, s_xk,
    s_ar, s_ak,
    s_uc, s_um, s_ur,
    s_xoc, s_xom, s_xok,
    row0, col0, inv_keep, PERIOD,
    THR: tl.constexpr, HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr, ROW_THR: tl.constexpr, COPY_X: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # COPY_X also writes the (undropped) x tile to p_xo: column-parallel SP packs [x_i | u_i] for
    # the base's all-gather in the same single read of x.
    pid = tl.program_id(0)
    o_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < T
    m_r = o_r < R
    o_xm = _rows(o_m, RPC, s_xc, s_xm)
    if COPY_X:
        o_xom = _rows(o_m, RPC, s_xoc, s_xom)
    if HAS_DROPOUT:
        seed = tl.load(p_seed)
        thr = _thr(p_rthr, row0 + o_m, PERIOD, THR, ROW_THR)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(p_x + o_xm[:, None] + o_k[None, :] * s_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if COPY_X:
            tl.store(p_xo + o_xom[:, None] + o_k[None, :] * s_xok, b_x, mask=m_m[:, None] & m_k[None, :])
        if HAS_DROPOUT:
            if PACKED:
                keep = _keep8(seed, row0 + o_m, (col0 + k0) >> 3, BLOCK_K, thr)
            else:
                keep = _keep(seed, row0 + o_m, col0 + o_k, thr)
            b_x = b_x * keep.to(b_x.dtype)
        b_at = tl.load(p_a + o_r[None, :] * s_ar + o_k[:, None] * s_ak, mask=m_k[:, None] & m_r[None, :],
                       other=0.0)
        acc = _dot(b_x, b_at, acc, _B_TO_A, INTERP_BF16, PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    o_um = _rows(o_m, RPC, s_uc, s_um)
    tl.store(p_u + o_um[:, None] + o_r[None, :] * s_ur, _cast_out(acc, p_u, INTERP_BF16),
             mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _keep_at(seed, o_row, o_col, g0, BLOCK: tl.constexpr, PACKED: tl.constexpr, THR):
    """The keep-mask of rows ``o_row`` x columns ``o_col`` (``8·g0 ..`` when ``PACKED``): ``_keep8`` or ``_keep``."""
    if PACKED:
        keep = _keep8(seed, o_row, g0, BLOCK, THR)
    else:
        keep = _keep(seed, o_row, o_col, THR)
    return keep


@triton.jit(do_not_specialize=["T", "RPC", "row0", "col0", "PERIOD"])
def _lora_linear_fwd_kernel(
    p_x, p_w, p_u, p_b, p_bias, p_out, p_g, p_out0, p_seed, p_rthr,
    T, N, K, R, RPC,
    s_xc, s_xm, s_xk,
    s_wn, s_wk,
    s_uc, s_um, s_ur,
    s_bn, s_br,
    s_oc, s_om, s_on,
    s_o0c, s_o0m, s_o0n,
    s_bias, s_g,
    scale, row0, col0, inv_keep, PERIOD,
    HAS_BIAS: tl.constexpr, COL_SCALE: tl.constexpr, OUT0: tl.constexpr, THR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr, ROW_THR: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < T
    m_n = o_n < N
    m_r = o_r < R
    # The LoRA term first: s·(u Bᵀ), an fp32 tile (s never rounds a low-precision one), seeds the
    # accumulator of the K loop. Added after the loop instead, it would be a second BM x BN fp32
    # tile live beside the accumulator, which at 128x256 (8 warps) or 128x128 (4 warps) is past
    # sm_90's 255 registers: ptxas spills and serialises the wgmma pipeline.
    # With dropout the launcher passes scale = s·(1-p): the one 1/(1-p) after the loop rescales
    # the dropped X Wᵀ and gives the seed back its s, with still one fp32 tile.
    o_um = _rows(o_m, RPC, s_uc, s_um)
    b_u = tl.load(p_u + o_um[:, None] + o_r[None, :] * s_ur, mask=m_m[:, None] & m_r[None, :], other=0.0)
    b_bt = tl.load(p_b + o_n[None, :] * s_bn + o_r[:, None] * s_br, mask=m_r[:, None] & m_n[None, :],
                   other=0.0)
    acc = _dot(b_u, b_bt, None, _B_TO_A, INTERP_BF16, PRECISION)
    acc = acc * scale
    o_xm = _rows(o_m, RPC, s_xc, s_xm)
    if HAS_DROPOUT:
        seed = tl.load(p_seed)
        thr = _thr(p_rthr, row0 + o_m, PERIOD, THR, ROW_THR)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(p_x + o_xm[:, None] + o_k[None, :] * s_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if HAS_DROPOUT:  # shrink_fwd's mask, bit for bit
            b_x = b_x * _keep_at(seed, row0 + o_m, col0 + o_k, (col0 + k0) >> 3, BLOCK_K, PACKED, thr).to(b_x.dtype)
        b_wt = tl.load(p_w + o_n[None, :] * s_wn + o_k[:, None] * s_wk, mask=m_k[:, None] & m_n[None, :],
                       other=0.0)
        acc = _dot(b_x, b_wt, acc, _SAME, INTERP_BF16, PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    if OUT0:  # DoRA saves the pre-scale output for dm; stored before the scale so no copy is live
        o_o0m = _rows(o_m, RPC, s_o0c, s_o0m)
        tl.store(p_out0 + o_o0m[:, None] + o_n[None, :] * s_o0n, _cast_out(acc, p_out0, INTERP_BF16),
                 mask=m_m[:, None] & m_n[None, :])
    if COL_SCALE:
        acc = acc * tl.load(p_g + o_n * s_g, mask=m_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(p_bias + o_n * s_bias, mask=m_n, other=0.0).to(tl.float32)[None, :]
    o_om = _rows(o_m, RPC, s_oc, s_om)
    tl.store(p_out + o_om[:, None] + o_n[None, :] * s_on, _cast_out(acc, p_out, INTERP_BF16),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["T", "RPC", "U_ROW0", "U_ROWS"])
def _lora_dy_bwd_kernel(
    p_dy, p_b, p_u, p_dup, p_dbp, p_g, p_y0, p_dmp,
    T, N, R, RPC, U_ROW0, U_ROWS, N_PER_SPLIT,
    s_dyc, s_dym, s_dyn,
    s_bn, s_br,
    s_um, s_ur,
    s_dpt, s_dpm, s_dpr,
    s_pt, s_pn, s_pr,
    s_g, s_y0m, s_y0n, s_qt, s_qn,
    COMPUTE_DU: tl.constexpr, COMPUTE_DB: tl.constexpr, COL_SCALE: tl.constexpr, COMPUTE_DM: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid (row blocks of BLOCK_M, column splits of N_PER_SPLIT): each program streams its block
    # of dy once. du's reduction over N is split across the column splits into fp32 partials
    # p_dup[split, T, R]; dB's reduction over T across the row blocks into fp32 partials
    # p_dbp[block, N, R]. Both are summed afterwards in a fixed order (deterministic, unlike
    # atomics); the row block is large (256) so that the dB partials stay a quarter of dy's size
    # at most for r <= 16, and the column splits give the grid enough programs for the GPU.
    # u holds rows [U_ROW0, U_ROW0 + U_ROWS) of dy's row space (row-parallel SP keeps only its
    # own rows of u); partial slot = this block's index among the blocks that meet those rows.
    # DoRA: du and dB take g ⊙ dy (COL_SCALE), applied as (g ⊙ B) to du's small B tile and as
    # g ⊙ (dyᵀ u) to dB's partial, never to the big dy tile: scaling that one costs the registers
    # that spill at r = 64 (ptxas: 48 B). dm's Σ_t dy ⊙ y0 over the same rows as dB (y0 indexed
    # like u) goes to fp32 partials p_dmp[block, N] from the same tile of dy (COMPUTE_DM).
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < T
    m_r = o_r < R
    o_dym = _rows(o_m, RPC, s_dyc, s_dym)
    if COMPUTE_DB or COMPUTE_DM:
        o_ul = o_m - U_ROW0
        m_u = m_m & (o_ul >= 0) & (o_ul < U_ROWS)
        first = U_ROW0 // BLOCK_M
        last = (U_ROW0 + U_ROWS - 1) // BLOCK_M
        do_db = (pid >= first) & (pid <= last)
        slot = (pid - first).to(tl.int64)
    if COMPUTE_DB:
        b_u = tl.load(p_u + o_ul[:, None] * s_um + o_r[None, :] * s_ur, mask=m_u[:, None] & m_r[None, :],
                      other=0.0)
    acc_du = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    n_start = pid_s.to(tl.int64) * N_PER_SPLIT
    for n0 in range(n_start, tl.minimum(n_start + N_PER_SPLIT, N), BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        b_dy = tl.load(p_dy + o_dym[:, None] + o_n[None, :] * s_dyn, mask=m_m[:, None] & m_n[None, :],
                       other=0.0)
        if COMPUTE_DM:
            if do_db:
                b_y0 = tl.load(p_y0 + o_ul[:, None] * s_y0m + o_n[None, :] * s_y0n, mask=m_u[:, None] & m_n[None, :],
                               other=0.0)
                # Raw dy (dm's g is the caller's); where(), as for dB below: another rank's Inf is not NaN here.
                b_dm = tl.sum(tl.where(m_u[:, None], b_dy.to(tl.float32) * b_y0.to(tl.float32), 0.0), axis=0)
                tl.store(p_dmp + slot * s_qt + o_n * s_qn, b_dm, mask=m_n)
        if COL_SCALE:
            b_g = tl.load(p_g + o_n * s_g, mask=m_n, other=0.0)
        if COMPUTE_DU:
            b_b = tl.load(p_b + o_n[:, None] * s_bn + o_r[None, :] * s_br, mask=m_n[:, None] & m_r[None, :],
                          other=0.0)
            if COL_SCALE:  # g ⊙ B in fp32, rounded once to dy's dtype for the dot (as B alone is)
                b_b = b_b.to(tl.float32) * b_g[:, None]
            acc_du = _dot(b_dy, b_b, acc_du, _B_TO_A, INTERP_BF16, PRECISION)
        if COMPUTE_DB:
            if do_db:
                # Rows outside u's (another rank's, under row SP) are zeroed in dy, not only in u:
                # an Inf there must not become Inf * 0 = NaN in this rank's dB.
                b_dyu = tl.where(m_u[:, None], b_dy, 0.0)
                db = _dot(tl.trans(b_dyu), b_u, None, _B_TO_A, INTERP_BF16, PRECISION)
                if COL_SCALE:
                    db = db * b_g[:, None]
                tl.store(p_dbp + slot * s_pt + o_n[:, None] * s_pn + o_r[None, :] * s_pr, db,
                         mask=m_n[:, None] & m_r[None, :])
    if COMPUTE_DU:
        tl.store(p_dup + pid_s.to(tl.int64) * s_dpt + o_m[:, None] * s_dpm + o_r[None, :] * s_dpr, acc_du,
                 mask=m_m[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["T", "RPC", "row0", "col0", "PERIOD"])
def _lora_linear_dx_kernel(
    p_dy, p_w, p_du, p_a, p_dx, p_seed, p_rthr, p_g,
    T, N, K, R, RPC,
    s_dyc, s_dym, s_dyn,
    s_wn, s_wk,
    s_duc, s_dum, s_dur,
    s_ar, s_ak,
    s_dxc, s_dxm, s_dxk,
    s_g,
    row0, col0, inv_keep, PERIOD,
    THR: tl.constexpr, HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr, ROW_THR: tl.constexpr,
    COL_SCALE: tl.constexpr, MASK_ALL: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < T
    m_k = o_k < K
    m_r = o_r < R
    # Prologue: (du A) ⊙ M / (1-p) seeds the accumulator, for the same reason as in the forward,
    # and so the mask's registers (Philox state, the keep tile) are dead before the main loop
    # starts instead of live beside its accumulator. The mask is regenerated from (seed, row, col).
    # MASK_ALL (DoRA under dropout) masks the whole sum instead, so its mask waits for the epilogue,
    # where nothing but the accumulator is live.
    o_dum = _rows(o_m, RPC, s_duc, s_dum)
    b_du = tl.load(p_du + o_dum[:, None] + o_r[None, :] * s_dur, mask=m_m[:, None] & m_r[None, :], other=0.0)
    b_a = tl.load(p_a + o_r[:, None] * s_ar + o_k[None, :] * s_ak, mask=m_r[:, None] & m_k[None, :], other=0.0)
    acc = _dot(b_du, b_a, None, _B_TO_A, INTERP_BF16, PRECISION)
    if HAS_DROPOUT:
        seed = tl.load(p_seed)
        g0 = (col0 + pid_k.to(tl.int64) * BLOCK_K) >> 3
        if not MASK_ALL:
            thr = _thr(p_rthr, row0 + o_m, PERIOD, THR, ROW_THR)
            keep = _keep_at(seed, row0 + o_m, col0 + o_k, g0, BLOCK_K, PACKED, thr)
            acc = acc * (keep.to(tl.float32) * inv_keep)
    o_dym = _rows(o_m, RPC, s_dyc, s_dym)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        b_dy = tl.load(p_dy + o_dym[:, None] + o_n[None, :] * s_dyn, mask=m_m[:, None] & m_n[None, :],
                       other=0.0)
        if COL_SCALE:  # g ⊙ dy rounded once to dy's dtype, as in the dy pass
            b_g = tl.load(p_g + o_n * s_g, mask=m_n, other=0.0)
            b_dy = _cast_out(b_dy.to(tl.float32) * b_g[None, :], p_dy, INTERP_BF16)
        b_w = tl.load(p_w + o_n[:, None] * s_wn + o_k[None, :] * s_wk, mask=m_n[:, None] & m_k[None, :],
                      other=0.0)
        acc = _dot(b_dy, b_w, acc, _SAME, INTERP_BF16, PRECISION)
    if HAS_DROPOUT:
        if MASK_ALL:
            thr = _thr(p_rthr, row0 + o_m, PERIOD, THR, ROW_THR)
            keep = _keep_at(seed, row0 + o_m, col0 + o_k, g0, BLOCK_K, PACKED, thr)
            acc = acc * (keep.to(tl.float32) * inv_keep)
    o_dxm = _rows(o_m, RPC, s_dxc, s_dxm)
    tl.store(p_dx + o_dxm[:, None] + o_k[None, :] * s_dxk, _cast_out(acc, p_dx, INTERP_BF16),
             mask=m_m[:, None] & m_k[None, :])


@triton.jit(do_not_specialize=["T", "RPC", "row0", "col0", "PERIOD"])
def _lora_shrink_bwd_kernel(
    p_du, p_x, p_dap, p_seed, p_rthr,
    T, K, R, RPC, ROWS_PER_SPLIT,
    s_duc, s_dum, s_dur,
    s_xc, s_xm, s_xk,
    s_pt, s_pr, s_pk,
    row0, col0, inv_keep, PERIOD,
    THR: tl.constexpr, HAS_DROPOUT: tl.constexpr, PACKED: tl.constexpr, ROW_THR: tl.constexpr,
    CHUNKED: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Grid (K blocks, T splits). Each program reduces its split's rows in registers and writes
    # one fp32 partial p_dap[split, R, K]; the splits are summed afterwards in a fixed order.
    # The loop runs over rows, so their offsets are hoisted: plain 2-D operands (CHUNKED off, the
    # usual case here) advance a row pointer; row-chunked ones recompute (m // RPC, m % RPC).
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R)
    m_k = o_k < K
    m_r = o_r < R
    if HAS_DROPOUT:
        seed = tl.load(p_seed)
        g0 = (col0 + pid_k.to(tl.int64) * BLOCK_K) >> 3
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    o_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
    p_dut = p_du + o_r[:, None] * s_dur + o_m[None, :] * s_dum
    p_xt = p_x + o_m[:, None] * s_xm + o_k[None, :] * s_xk
    for m0 in range(start, tl.minimum(start + ROWS_PER_SPLIT, T), BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < T
        if CHUNKED:
            o_dum = _rows(o_m, RPC, s_duc, s_dum)
            o_xm = _rows(o_m, RPC, s_xc, s_xm)
            b_dut = tl.load(p_du + o_dum[None, :] + o_r[:, None] * s_dur, mask=m_r[:, None] & m_m[None, :],
                            other=0.0)
            b_x = tl.load(p_x + o_xm[:, None] + o_k[None, :] * s_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        else:
            b_dut = tl.load(p_dut, mask=m_r[:, None] & m_m[None, :], other=0.0)
            b_x = tl.load(p_xt, mask=m_m[:, None] & m_k[None, :], other=0.0)
            p_dut += BLOCK_M * s_dum
            p_xt += BLOCK_M * s_xm
        if HAS_DROPOUT:
            thr = _thr(p_rthr, row0 + o_m, PERIOD, THR, ROW_THR)
            if PACKED:
                keep = _keep8(seed, row0 + o_m, g0, BLOCK_K, thr)
            else:
                keep = _keep(seed, row0 + o_m, col0 + o_k, thr)
            b_x = b_x * keep.to(b_x.dtype)
        acc = _dot(b_dut, b_x, acc, _A_TO_B, INTERP_BF16, PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(p_dap + pid_s.to(tl.int64) * s_pt + o_r[:, None] * s_pr + o_k[None, :] * s_pk, acc,
             mask=m_r[:, None] & m_k[None, :])


KERNELS = {"shrink_fwd": _lora_shrink_fwd_kernel, "linear_fwd": _lora_linear_fwd_kernel, "dy_bwd": _lora_dy_bwd_kernel,
           "linear_dx": _lora_linear_dx_kernel, "shrink_bwd": _lora_shrink_bwd_kernel}
"""The kernels by op name: what the backends launch and the compile gate compiles (the kernels stay private)."""


def interpreter_active() -> bool:
    """True when these kernels were defined under ``TRITON_INTERPRET=1`` (the ``interpret`` backend can run).

    The one place that tells: triton decides at ``@triton.jit`` time, when this module is imported.

    Example:
        >>> isinstance(interpreter_active(), bool)
        True
    """
    return type(_lora_shrink_fwd_kernel).__name__ == "InterpretedFunction"
