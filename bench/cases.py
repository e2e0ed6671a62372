"""The case registry: what one bench case is, how each rank builds it, and what it should cost.

A ``Case`` is one layer shape in one tensor-parallel mode (kind × TP size × SP × dropout). The
shape is the *full* layer (``d_in`` = K, ``d_out`` = N, ``tokens`` = T); each rank builds its
own shards from it with ``tplora_kernels.layout`` (the package's one shard rule), the way
Megatron shards a model:

==========  ===================  ==============  ===========  ===========  =================
kind        x (this rank)        W_i             A            B            y (this rank)
==========  ===================  ==============  ===========  ===========  =================
column      [T or T/t (SP), K]   [N/t, K]        [r, K]       [N/t, r]     [T, N/t]
row         [T, K/t]             [N, K/t]        [r, K/t]     [N, r]       [T or T/t (SP), N]
==========  ===================  ==============  ===========  ===========  =================

A single-adapter case (``adapters == 1``) has the contenders of ``CONTENDERS``: ``base`` (the
frozen layer alone, the floor), ``reference`` (``tplora_kernels.reference``: our torch emulation
of PEFT's unfused per-rank structure), ``peft`` (PEFT's own ``LoraParallelLinear`` on
megatron-core layers, ``bench.peft_layer``; only where it runs, see ``peft_layer.unsupported``)
and ``fused`` (``tplora_kernels``). A multi-adapter case (``adapters = n > 1``, each of rank r)
has those of ``MULTI_CONTENDERS``: ``base``, ``mixed`` (one fused call with a
``multi.AdapterMix``: x is ``[s, n, K]`` and sample j uses adapter j) and ``sequential`` (the
fused single-adapter call once per adapter on its own sample, one after another). A DoRA case
(``dora=True``) has those of ``DORA_CONTENDERS``: ``base``, ``lora`` (the fused LoRA call),
``dora`` (the fused call with ``magnitude=``: DoRA, ``tplora_kernels.dora``) and ``peft_dora``
(PEFT's DoRA math on each rank's shard, unfused, ``bench.peft_dora``). The FLOP and byte
formulas below are the ones ``NOTES.md`` derives; the roofline floor is
``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from tplora_kernels.testing.numerics import rel_err

__all__ = [
    "CONTENDERS",
    "DESCRIBE",
    "DORA_CONTENDERS",
    "DTYPES",
    "ELEM",
    "KINDS",
    "MULTI_CONTENDERS",
    "PEAKS",
    "Built",
    "Case",
    "build",
    "matrix",
    "min_bytes",
    "model_flops",
    "roofline_ms",
]

KINDS = ("column", "row")
CONTENDERS = ("base", "reference", "peft", "fused")
MULTI_CONTENDERS = ("base", "mixed", "sequential")
DORA_CONTENDERS = ("base", "lora", "dora", "peft_dora")
# What each contender is, in one line (the table's legend and the plot's).
DESCRIBE = {
    "base": "the frozen Megatron-style layer alone, with its own collectives (the floor)",
    "reference": "tplora_kernels.reference: our torch emulation of PEFT's LoraParallelLinear structure",
    "peft": "PEFT's own LoraParallelLinear on megatron-core layers (SP off on CPU; bench/peft_layer.py)",
    "fused": "tplora_kernels (column_parallel_lora / row_parallel_lora)",
    "mixed": "multi-adapter case: one tplora_kernels call with an AdapterMix, every adapter on its own samples",
    "sequential": "multi-adapter case: the fused single-adapter call once per adapter, on its own samples",
    "lora": "DoRA case: the fused LoRA call (tplora_kernels), the same factors without a magnitude",
    "dora": "DoRA case: the fused DoRA call (tplora_kernels, magnitude=; the norm's LoRA part recomputed per call)",
    "peft_dora": "DoRA case: PEFT's DoRA math per rank, unfused (B A materialised for the norm every forward; "
                 "bench/peft_dora.py)",
}
# A DoRA case's magnitude: PEFT's initial ‖W + s·B A‖ times a factor in [1 - DORA_SPREAD, 1 + DORA_SPREAD]
# per row, as after some training (at g = 1 half of DoRA's terms would vanish).
DORA_SPREAD = 0.1
# A multi-adapter case's adapters differ in alpha and dropout: adapter a has scale
# SCALE * MIX_SCALE[a % 4] and dropout p * MIX_DROP[a % 4] (one of every four drops nothing).
MIX_SCALE = (1.0, 0.5, 2.0, 1.0)
MIX_DROP = (1.0, 0.5, 1.0, 0.0)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}
SCALE = 2.0  # LoRA scaling s = alpha / r of every contender

# Dense peak FLOP/s by activation dtype and HBM bandwidth, from the vendors' datasheets (SXM
# parts). fp32 means TF32 tensor cores, which is what Triton's fp32 dot uses unless torch's
# matmul precision is "highest". Matched against torch.cuda.get_device_name().
PEAKS = {
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "bw": 4.8e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "bw": 3.35e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12, "bw": 2.04e12},
}


@dataclass(frozen=True)
class Case:
    """One bench case: a full layer shape in one TP mode.

    Attributes:
        kind: ``"column"`` or ``"row"`` (the Megatron base layer).
        tp: tensor-parallel size t.
        sp: sequence parallelism on (only meaningful for t > 1).
        tokens: T, tokens (rows) of the full batch.
        d_in: K, the layer's full input features.
        d_out: N, the layer's full output features.
        r: LoRA rank.
        p: LoRA dropout probability.
        dtype: activation / base weight dtype, ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        emulated: each rank's shard shapes run on one device with no process group
            (fewer GPUs than t); collectives are then "not measured".
        adapters: 1 for a single-adapter case; n > 1 for a multi-adapter case: n adapters of
            rank r, x shaped ``[T/n, n, K]`` (Megatron's ``[s, b, h]``), sample j on adapter j.
        dora: a DoRA case (one adapter): contenders ``DORA_CONTENDERS``.

    Example:
        >>> Case("column", 2, False, 1024, 1024, 1024, 16, 0.1, "fp32").local
        {'rows_in': 1024, 'rows_out': 1024, 'rows': 1024, 'k': 1024, 'n': 512}
    """

    kind: str
    tp: int
    sp: bool
    tokens: int
    d_in: int
    d_out: int
    r: int
    p: float
    dtype: str
    emulated: bool = False
    adapters: int = 1
    dora: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.tp < 1 or self.d_in % self.tp or self.d_out % self.tp:
            raise ValueError(f"--in {self.d_in} and --out {self.d_out} must divide by tp={self.tp}")
        if self.sp and self.tokens % self.tp:
            raise ValueError(f"sequence parallelism needs --tokens {self.tokens} divisible by tp={self.tp}")
        if self.sp and self.tp == 1:
            raise ValueError("sequence parallelism needs tp > 1")
        if not (0.0 <= self.p < 1.0) or self.r < 1:
            raise ValueError(f"need 0 <= p < 1 and r >= 1, got p={self.p}, r={self.r}")
        if self.adapters < 1:
            raise ValueError(f"adapters must be >= 1, got {self.adapters}")
        if self.dora and self.adapters > 1:
            raise ValueError("a DoRA case has one adapter (DoRA does not run in a mixed batch)")
        rows = self.samples * (self.tp if self.sp else 1)
        if self.tokens % rows:
            raise ValueError(f"--tokens {self.tokens} must divide by {rows} (the {self.samples} samples of the "
                             f"multi-adapter case{f' times tp={self.tp} under SP' if self.sp else ''})")

    @property
    def samples(self) -> int:
        """b, the batch's samples: one per adapter (a single-adapter case keeps x as ``[T, 1, K]``)."""
        return self.adapters

    @property
    def label(self) -> str:
        """Short id, e.g. ``column tp=2 sp=on p=0.1`` (``... mix=4x16`` for 4 adapters of rank 16, ``... dora``)."""
        mix = f" mix={self.adapters}x{self.r}" if self.adapters > 1 else ""
        dora = " dora" if self.dora else ""
        return f"{self.kind} tp={self.tp} sp={'on' if self.sp else 'off'} p={self.p:g}{mix}{dora}"

    @property
    def local(self) -> dict[str, int]:
        """This rank's sizes: rows of x and y, rows the GEMMs run over, and the local K and N."""
        T, t = self.tokens, self.tp
        if self.kind == "column":
            return {"rows_in": T // t if self.sp else T, "rows_out": T, "rows": T, "k": self.d_in,
                    "n": self.d_out // t}
        return {"rows_in": T, "rows_out": T // t if self.sp else T, "rows": T, "k": self.d_in // t,
                "n": self.d_out}

    def as_dict(self) -> dict:
        """The case's fields (for JSON / CSV)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Formulas (per rank; NOTES.md derives them)
# ---------------------------------------------------------------------------------------------
def model_flops(case: Case, contender: str, phase: str) -> int:
    """Useful FLOPs per rank of one pass, the same count for every LoRA contender.

    base fwd ``2·T·n·k``; base bwd is the dgrad only (W is frozen) ``2·T·n·k``. LoRA fwd adds
    ``2·T·r·(k+n)`` (shrink + expand); LoRA bwd adds ``4·T·r·(k+n)`` (du, dB, du·A, dA).
    Dropout's elementwise work is not counted. In a multi-adapter case every row needs only its
    own adapter's r columns, so the count is the same; ``mixed`` executes n·r-wide LoRA GEMMs
    (the other adapters' columns gated to 0), n times these LoRA FLOPs. DoRA (``dora``,
    ``peft_dora``) adds the row norms' ``2·n·k·r + 2·r²·k + 2·n·r²`` in forward (the LoRA part of
    ``‖W + s·B A‖²``: ``W Aᵀ``, ``A Aᵀ``, ``B (A Aᵀ)``; PEFT's materialised ``B A`` costs the same
    ``2·n·k·r``) and, with dropout, PEFT's second base GEMM on the dropped x (``2·T·n·k`` in
    forward, again in backward).

    Args:
        case: the case.
        contender: ``"base"`` or a LoRA contender.
        phase: ``"fwd"`` or ``"fwd_bwd"``.

    Returns:
        FLOPs (multiply-add = 2).

    Example:
        >>> model_flops(Case("row", 1, False, 2, 3, 5, 1, 0.0, "fp32"), "fused", "fwd")
        92
    """
    loc = case.local
    T, k, n, r = loc["rows"], loc["k"], loc["n"], case.r
    base = 2 * T * n * k
    lora = 0 if contender == "base" else 2 * T * r * (k + n)
    norm = 2 * n * k * r + 2 * r * r * k + 2 * n * r * r if contender in ("dora", "peft_dora") else 0
    drop = base if contender in ("dora", "peft_dora") and case.p > 0 else 0
    if phase == "fwd":
        return base + lora + norm + drop
    return 2 * base + 3 * lora + norm + 2 * drop


def min_bytes(case: Case, contender: str, phase: str, lora_elem: int | None = None) -> int:
    """Compulsory memory traffic per rank of one pass: every operand read or written once.

    fwd: read X ``T·k·e`` and W ``n·k·e``, write y ``T·n·e``; LoRA adds A, B (``r·(k+n)·w``)
    and u written and read back (``2·T·r·e``). bwd: read dy ``T·n·e`` and W, write dx
    ``T·k·e``; LoRA adds the second read of X for dA (``T·k·e``), u, du written and read
    (``3·T·r·e``), A and B (``r·(k+n)·w``) and fp32 dA, dB (``4·r·(k+n)``). A multi-adapter
    case moves every adapter's factors (n times the factor terms); u stays ``T·r`` useful elements.
    DoRA adds the pre-scale output y0 written in forward and read in backward (``2·T·n·e``) and
    one more read of W for the norm (``n·k·e``).

    Args:
        case: the case.
        contender: ``"base"`` or a LoRA contender (the floor is the same for all of them; the
            unfused ones move far more).
        phase: ``"fwd"`` or ``"fwd_bwd"``.
        lora_elem: bytes per LoRA weight element (default: the activation's).

    Returns:
        Bytes.

    Example:
        >>> min_bytes(Case("row", 1, False, 2, 3, 5, 1, 0.0, "fp32"), "base", "fwd")
        124
    """
    loc = case.local
    T, k, n, r = loc["rows"], loc["k"], loc["n"], case.r
    e = ELEM[case.dtype]
    w = lora_elem or e
    fwd = (T * k + n * k + T * n) * e
    bwd = (T * n + n * k + T * k) * e
    f = case.adapters * r * (k + n)
    if contender != "base":
        fwd += f * w + 2 * T * r * e
        bwd += T * k * e + 3 * T * r * e + f * w + 4 * f
    if contender in ("dora", "peft_dora"):
        fwd += T * n * e + n * k * e
        bwd += T * n * e
    return fwd if phase == "fwd" else fwd + bwd


def roofline_ms(case: Case, contender: str, phase: str, device_name: str) -> float | None:
    """The roofline floor in ms, ``max(FLOPs / peak, bytes / bandwidth)``, or None off ``PEAKS``.

    Example:
        >>> roofline_ms(Case("row", 1, False, 8, 8, 8, 1, 0.0, "fp32"), "base", "fwd", "cpu") is None
        True
    """
    peaks = next((v for k, v in PEAKS.items() if k in device_name), None)
    if peaks is None:
        return None
    t_flop = model_flops(case, contender, phase) / peaks[case.dtype]
    t_mem = min_bytes(case, contender, phase) / peaks["bw"]
    return 1e3 * max(t_flop, t_mem)


# ---------------------------------------------------------------------------------------------
# Builders (run on each rank)
# ---------------------------------------------------------------------------------------------
@dataclass
class Built:
    """One case's tensors on one rank, and the contenders as zero-argument callables.

    Attributes:
        x: this rank's input (requires grad, as a hidden layer's input does).
        dy: the output gradient fed to backward, shaped as every contender's output.
        params: tensors that hold the layer's weights (excluded from saved-activation bytes).
        grads: tensors whose ``.grad`` each backward fills (reset between runs).
        contenders: ``{name: () -> y}`` for the contenders that run here, in table order; ``y`` is
            a tensor, or a tuple of them for ``sequential`` (one per call).
        backend: the backend name the fused path asks for, resolved without a layer shape (on CUDA
            ``auto`` becomes a per-shape choice: ``gemm`` says which shapes, the runner which ran).
        dy_for: the output gradient of a contender whose output is not shaped as ``dy`` (``sequential``:
            a tuple, one per call).
        gemm: per LoRA contender, the ``(dtype, lora dtype, N, K, r, T)`` of each of its calls, the key
            by which ``tplora_kernels`` picks the GEMM path (``ops.select.get_backend(gemm=...)``).
        verify: checks a contender's answer against another's before anything is timed; returns
            relative errors by name (multi-adapter cases; the runner refuses to time above its bar).
        peft_layer: PEFT's module when the ``peft`` contender runs (for its dropout-free check).
        peft_skipped: why the ``peft`` contender does not run here, or None.
        checked_by: the contender whose record carries ``verify``'s errors, and under which key.
    """

    x: object
    dy: object
    params: list
    grads: list
    contenders: dict[str, Callable[[], object]] = field(default_factory=dict)
    backend: str = ""
    dy_for: dict[str, object] = field(default_factory=dict)
    gemm: dict[str, list[tuple]] = field(default_factory=dict)
    verify: Callable[[], dict[str, float]] | None = None
    peft_layer: object = None
    peft_skipped: str | None = None
    checked_by: tuple[str, str] = ("mixed", "checks_vs_sequential")


@dataclass
class _Shards:
    """This rank's pieces of one full layer: x and dy ``[rows / b, b, features]``, W, and every
    adapter's ``(A, B)`` in fp32 (each contender casts its own copy)."""

    x: object
    w: object
    dy: object
    factors: list


def _tensors(case: Case, rank: int, device, dtype, seed: int) -> _Shards:
    """This rank's shards of one full layer drawn from ``seed`` (the same on every rank).

    Every split is ``tplora_kernels.layout``'s, the rule the package shards a model with;
    sequence parallelism splits the rows of x (column) or of y (row) on top of it. Replicated
    operands (column: x without SP and A; row: B) are therefore identical across ranks, as in a
    real TP model, and the fused path can be checked against the reference.
    """
    import torch

    from tplora_kernels.layout import Split, layout_for

    g = torch.Generator(device="cpu").manual_seed(seed)
    T, K, N, r, t = case.tokens, case.d_in, case.d_out, case.r, case.tp

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    X, W, dY = rnd(T, K), rnd(N, K, std=K ** -0.5), rnd(T, N)
    # A, B as after some training (B = 0 at init would make half the LoRA math trivial).
    full = [(rnd(r, K, std=K ** -0.5), rnd(N, r, std=0.02)) for _ in range(case.adapters)]
    lay, rows = layout_for(case.kind), Split(0)
    x, dy = lay.x.shard(X, rank, t), lay.y.shard(dY, rank, t)
    if case.sp and not case.emulated:
        if case.kind == "column":
            x = rows.shard(x, rank, t)
        else:
            dy = rows.shard(dy, rank, t)

    def put(v, dt):
        return v.to(device=device, dtype=dt, copy=True).contiguous()  # own storage, as a real shard has

    b = case.samples
    return _Shards(put(x, dtype).view(-1, b, x.shape[-1]), put(lay.weight.shard(W, rank, t), dtype),
                   put(dy, dtype).view(-1, b, dy.shape[-1]),
                   [tuple(put(f, torch.float32) for f in lay.shard_factors(A, B_, rank, t)) for A, B_ in full])


def _leaf(t, dtype):
    return t.to(dtype=dtype, copy=True).contiguous().requires_grad_(True)


def _functions(kind: str):
    import tplora_kernels as tk
    from tplora_kernels.reference import column_parallel_lora_reference, row_parallel_lora_reference

    if kind == "column":
        return column_parallel_lora_reference, tk.column_parallel_lora
    return row_parallel_lora_reference, tk.row_parallel_lora


def _setup(case: Case, group, device, backend: str):
    """What every builder shares: the mode's keyword arguments, the dropout seed, and the backend's name
    without a layer shape. The calls get ``backend`` as asked: on CUDA ``auto`` must reach the package,
    which picks the GEMM path per layer shape."""
    import torch

    import tplora_kernels as tk

    # Column runs without gather_output, row with input_is_parallel: Megatron's usual pairing.
    mode = {} if case.kind == "column" else {"input_is_parallel": True}
    common = dict(sequence_parallel=case.sp and not case.emulated, group=group, **mode)
    return common, torch.tensor([0x5EED], dtype=torch.int64, device=device), tk.resolve_backend(device, backend)


def _build(case: Case, *, group, rank, device, backend, ref_dropout, lora_dtype, seed, peft) -> Built:
    import torch

    from tplora_kernels.functional import parallel_linear

    from . import peft_layer

    dtype = getattr(torch, DTYPES[case.dtype])
    sh = _tensors(case, rank, device, dtype, seed)
    (a32, b32), = sh.factors
    x, w, dy = sh.x.requires_grad_(True), sh.w, sh.dy
    a, b, a_ref, b_ref = _leaf(a32, lora_dtype), _leaf(b32, lora_dtype), _leaf(a32, torch.float32), _leaf(
        b32, torch.float32)
    scale, p = SCALE, case.p
    common, seed_t, be = _setup(case, group, device, backend)
    ref, fused = _functions(case.kind)
    loc = case.local
    built = Built(x, dy, [w, a, b, a_ref, b_ref], [x, a, b, a_ref, b_ref], {
        "base": lambda: parallel_linear(x, w, kind=case.kind, **common),
        "reference": lambda: ref(x, w, a_ref, b_ref, scale=scale, dropout_p=p, seed=0x5EED, dropout=ref_dropout,
                                 **common),
    }, be, gemm={"fused": [(dtype, lora_dtype, loc["n"], loc["k"], case.r, loc["rows"])]})
    built.peft_skipped = peft_layer.unsupported(case, device.type, group is not None) if peft else "--no-peft"
    if built.peft_skipped is None:
        # Its own fp32 copies of A and B: PEFT keeps its factors in fp32, as the reference does.
        layer, params = peft_layer.build_peft_layer(case.kind, w=w, a=a_ref.detach(), b=b_ref.detach(), r=case.r,
                                                    scale=scale, p=p, group=group, tp=case.tp)
        built.params += params
        built.grads += params[1:]
        built.peft_layer = layer
        built.contenders["peft"] = lambda: layer(x)[0]
    built.contenders["fused"] = lambda: fused(x, w, a, b, scale=scale, dropout_p=p, seed=seed_t, backend=backend,
                                              **common)
    return built


def _build_multi(case: Case, *, group, rank, device, backend, lora_dtype, seed, **_) -> Built:
    """``base``, ``mixed`` and ``sequential`` for n adapters of rank r; sample j of x ``[s, n, K]`` is adapter j's.

    ``sequential`` gets each sample as its own contiguous tensor (a micro-batch of its own, as
    when the adapters train one after another) with its own leaves for A and B; ``mixed`` gets
    the whole batch and the adapters' factors stacked (``A [n·r, K]``, ``B [N, n·r]``).
    """
    import torch

    from tplora_kernels.functional import parallel_linear
    from tplora_kernels.mask import dropout_threshold
    from tplora_kernels.multi import build_mix

    dtype = getattr(torch, DTYPES[case.dtype])
    sh = _tensors(case, rank, device, dtype, seed)
    n, r, loc = case.adapters, case.r, case.local
    scales = [SCALE * MIX_SCALE[a % len(MIX_SCALE)] for a in range(n)]
    ps = [case.p * MIX_DROP[a % len(MIX_DROP)] for a in range(n)]
    common, seed_t, be = _setup(case, group, device, backend)
    fused = _functions(case.kind)[1]
    x, w = sh.x.requires_grad_(True), sh.w
    a_all = _leaf(torch.cat([a for a, _ in sh.factors], dim=0), lora_dtype)
    b_all = _leaf(torch.cat([b for _, b in sh.factors], dim=1), lora_dtype)
    xs = [_leaf(sh.x[:, j:j + 1], dtype) for j in range(n)]
    a_s, b_s = [_leaf(a, lora_dtype) for a, _ in sh.factors], [_leaf(b, lora_dtype) for _, b in sh.factors]
    dys = tuple(sh.dy[:, j:j + 1].contiguous() for j in range(n))
    # Built once: a mix holds small device tensors, which a training step would not rebuild per call.
    mixes = {train: build_mix(list(range(n)), ranks=[r] * n, scales=scales, device=device,
                              thrs=[dropout_threshold(p) if train else 0 for p in ps]) for train in (True, False)}

    def mixed(train: bool = True):
        return fused(x, w, a_all, b_all, mix=mixes[train], seed=seed_t, backend=backend, **common)

    def alone(a: int, x_in, train: bool = True):
        return fused(x_in, w, a_s[a], b_s[a], scale=scales[a], dropout_p=ps[a] if train else 0.0, seed=seed_t,
                     backend=backend, **common)

    def sequential(train: bool = True):
        return tuple(alone(a, xs[a], train) for a in range(n))

    def verify() -> dict[str, float]:
        """Dropout off: mixed and sequential give every sample the same output and every gradient.
        Dropout on (sequential's calls number their rows from 0, so its masks differ by design):
        mixed's output of sample a equals adapter a alone on the whole batch, the same rows and seed."""
        errs: dict[str, float] = {}

        def worst(name, e):
            errs[name] = max(errs.get(name, 0.0), e)

        y_m = mixed(train=False)
        g_m = torch.autograd.grad(y_m, [x, a_all, b_all], sh.dy)
        y_s = sequential(train=False)
        g_s = torch.autograd.grad(y_s, [*xs, *a_s, *b_s], dys)
        with torch.no_grad():
            y_t = mixed()
            for a in range(n):
                blk = slice(a * r, (a + 1) * r)
                worst("y, dropout off", rel_err(y_m[:, a:a + 1], y_s[a]))
                worst("dx, dropout off", rel_err(g_m[0][:, a:a + 1], g_s[a]))
                worst("dA, dropout off", rel_err(g_m[1][blk], g_s[n + a]))
                worst("dB, dropout off", rel_err(g_m[2][:, blk], g_s[2 * n + a]))
                worst("y, dropout on, vs each adapter alone on the batch", rel_err(y_t[:, a], alone(a, x)[:, a]))
        return errs

    return Built(x, sh.dy, [w, a_all, b_all, *a_s, *b_s], [x, a_all, b_all, *xs, *a_s, *b_s], {
        "base": lambda: parallel_linear(x, w, kind=case.kind, **common),
        "mixed": mixed,
        "sequential": sequential,
    }, be, dy_for={"sequential": dys}, verify=verify, gemm={
        "mixed": [(dtype, lora_dtype, loc["n"], loc["k"], n * r, loc["rows"])],
        "sequential": [(dtype, lora_dtype, loc["n"], loc["k"], r, loc["rows"] // n)] * n})


def _build_dora(case: Case, *, group, rank, device, backend, ref_dropout, lora_dtype, seed, **_) -> Built:
    """``base``, ``lora``, ``dora`` and ``peft_dora`` on one layer's shards (see ``DORA_CONTENDERS``).

    The magnitude is PEFT's initial ``‖W + s·B A‖`` (complete rows: a row layer's norms summed over
    TP) times a per-row factor (``DORA_SPREAD``), the same on every rank. ``dora`` runs as a
    ``use_dora`` module does in training: ``‖W‖²`` once per base-weight version (here at build, a
    row layer's all-reduce included; the module's ``NormCache``), the norm's LoRA part (which
    changes at every optimizer step) recomputed in every call. ``peft_dora`` keeps PEFT's fp32 LoRA
    weights and magnitude, and its dropout is ``ref_dropout``. ``verify`` compares ``dora`` with
    ``peft_dora`` run in the fused path's dtypes on the same Philox mask (dropout off and at the
    case's p), output and every gradient, and the fused LoRA output with the LoRA reference.
    """
    import torch

    from tplora_kernels.dora import DoRANorm, lora_sq, norm_parts, row_norms
    from tplora_kernels.functional import parallel_linear
    from tplora_kernels.layout import layout_for
    from tplora_kernels.mode import TPMode

    from .peft_dora import column_parallel_dora_peft, row_parallel_dora_peft

    dtype = getattr(torch, DTYPES[case.dtype])
    sh = _tensors(case, rank, device, dtype, seed)
    (a32, b32), = sh.factors
    x, w, dy = sh.x.requires_grad_(True), sh.w, sh.dy
    common, seed_t, be = _setup(case, group, device, backend)
    ref, fused = _functions(case.kind)
    peft_fn = column_parallel_dora_peft if case.kind == "column" else row_parallel_dora_peft
    mode = TPMode.build(case.kind, group=group)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    spread = 1 - DORA_SPREAD + 2 * DORA_SPREAD * torch.rand(case.d_out, 1, generator=g)
    spread = layout_for(case.kind).lora_b.shard(spread, rank, case.tp)  # this rank's rows, as W's (_tensors)
    m32 = row_norms(w.float(), a32, b32, SCALE, mode) * spread.reshape(-1).to(device)
    weight_sq = norm_parts(w, a32, b32, SCALE, mode).weight_sq  # once per base-weight version
    scale, p, loc = SCALE, case.p, case.local
    a, b, m = (_leaf(t, lora_dtype) for t in (a32, b32, m32))
    a_p, b_p, m_p = (_leaf(t, torch.float32) for t in (a32, b32, m32))  # PEFT's fp32 copies
    a_v, b_v, m_v = (_leaf(t, lora_dtype) for t in (a32, b32, m32))  # peft_dora in the fused dtypes, for verify

    def dora(p=p, seed=seed_t):
        norm = DoRANorm(weight_sq, lora_sq(w, a.detach(), b.detach(), scale))
        return fused(x, w, a, b, scale=scale, dropout_p=p, seed=seed, backend=backend, magnitude=m, norm=norm,
                     **common)

    def verify() -> dict[str, float]:
        errs: dict[str, float] = {}
        for pv in sorted({0.0, p}):
            y_d = dora(pv, 0x5EED)
            g_d = torch.autograd.grad(y_d, [x, a, b, m], dy)
            y_p = peft_fn(x, w, a_v, b_v, m_v, scale=scale, dropout_p=pv, seed=0x5EED, dropout="philox", **common)
            g_p = torch.autograd.grad(y_p, [x, a_v, b_v, m_v], dy)
            for name, got, want in zip(("y", "dx", "dA", "dB", "dm"), (y_d, *g_d), (y_p, *g_p)):
                errs[f"dora vs peft_dora {name}, p={pv:g}"] = rel_err(got, want)
        with torch.no_grad():
            y_l = fused(x, w, a, b, scale=scale, dropout_p=p, seed=0x5EED, backend=backend, **common)
            y_r = ref(x, w, a.float(), b.float(), scale=scale, dropout_p=p, seed=0x5EED, dropout="philox", **common)
        errs[f"lora vs reference y, p={p:g}"] = rel_err(y_l, y_r)
        return errs

    key = (dtype, lora_dtype, loc["n"], loc["k"], case.r, loc["rows"])
    return Built(x, dy, [w, a, b, m, a_p, b_p, m_p, a_v, b_v, m_v], [x, a, b, m, a_p, b_p, m_p, a_v, b_v, m_v], {
        "base": lambda: parallel_linear(x, w, kind=case.kind, **common),
        "lora": lambda: fused(x, w, a, b, scale=scale, dropout_p=p, seed=seed_t, backend=backend, **common),
        "dora": dora,
        "peft_dora": lambda: peft_fn(x, w, a_p, b_p, m_p, scale=scale, dropout_p=p, seed=0x5EED, dropout=ref_dropout,
                                     **common),
    }, be, gemm={"lora": [key], "dora": [key]}, verify=verify, checked_by=("dora", "checks_vs_peft_dora"))


def build(case: Case, *, group, device, backend: str, rank: int = 0, ref_dropout: str = "bernoulli",
          lora_dtype=None, seed: int = 0, peft: bool = False) -> Built:
    """Build ``case`` on this rank: shards, output gradient and the contenders.

    The reference keeps PEFT's fp32 LoRA weights (and so upcasts x); the fused path's LoRA
    weights are ``lora_dtype`` (default: the activation dtype, the modules' default).

    Args:
        case: the case.
        group: the TP process group (None when emulated or t = 1 without one).
        device: torch device of this rank.
        rank: this rank in the group (0 when emulated: rank 0's shard shapes).
        backend: the fused path's backend (``"auto"``, ``"triton"``, ``"cublas"``, ``"interpret"``, ``"torch"``),
            passed to its calls as given.
        ref_dropout: the reference's dropout, ``"bernoulli"`` (nn.Dropout, what PEFT runs) or
            ``"philox"`` (the package's mask, bit-comparable with the fused path).
        lora_dtype: torch dtype of the fused path's A and B.
        seed: seeds the full layer's random tensors; every rank must pass the same.
        peft: add PEFT's own layer where it runs (needs megatron's ``parallel_state``
            initialised over the group: ``peft_layer.init_parallel_state``).

    Returns:
        ``Built``.

    Example:
        >>> c = Case("row", 1, False, 8, 16, 16, 4, 0.0, "fp32")
        >>> sorted(build(c, group=None, device="cpu", backend="torch").contenders)
        ['base', 'fused', 'reference']
    """
    import torch

    dtype = getattr(torch, DTYPES[case.dtype])
    builder = _build_dora if case.dora else _build_multi if case.adapters > 1 else _build
    return builder(case, group=group, rank=rank, device=torch.device(device), backend=backend,
                   ref_dropout=ref_dropout, lora_dtype=lora_dtype or dtype, seed=seed, peft=peft)


def matrix(*, kinds: Iterable[str], tps: Iterable[int], sps: Iterable[bool], tokens: int, d_in: int, d_out: int,
           r: int, ps: Iterable[float], dtype: str, emulate: bool = False, adapters: int = 1,
           dora: bool = False) -> list[Case]:
    """Every combination, skipping SP at t = 1 (and when emulated: one device has no SP).

    Cases are ordered by TP size first, so each TP size's ranks are spawned once. ``adapters``
    > 1 makes multi-adapter cases (``Case.adapters``); ``dora`` DoRA cases (``Case.dora``).

    Example:
        >>> len(matrix(kinds=["column", "row"], tps=[1, 2], sps=[False, True], tokens=64, d_in=64,
        ...            d_out=64, r=8, ps=[0.0, 0.1], dtype="fp32"))
        12
    """
    out = []
    for tp in tps:
        for kind in kinds:
            for sp in dict.fromkeys(sps):
                if sp and (tp == 1 or emulate):
                    continue
                for p in ps:
                    out.append(Case(kind, tp, sp, tokens, d_in, d_out, r, p, dtype, emulated=emulate and tp > 1,
                                    adapters=adapters, dora=dora))
    return out
