"""The case registry: what one bench case is, how each rank builds it, and what it should cost.

A ``Case`` is one layer shape in one tensor-parallel mode (kind × TP size × SP × dropout). The
shape is the *full* layer (``d_in`` = K, ``d_out`` = N, ``tokens`` = T); each rank builds its
own shards from it, the way Megatron shards a model:

==========  ===================  ==============  ===========  ===========  =================
kind        x (this rank)        W_i             A            B            y (this rank)
==========  ===================  ==============  ===========  ===========  =================
column      [T or T/t (SP), K]   [N/t, K]        [r, K]       [N/t, r]     [T, N/t]
row         [T, K/t]             [N, K/t]        [r, K/t]     [N, r]       [T or T/t (SP), N]
==========  ===================  ==============  ===========  ===========  =================

``KINDS`` maps a kind to its builder; ``CONTENDERS`` names the callables a builder returns:
``base`` (the frozen layer alone, the floor), ``reference`` (``tplora_kernels.reference``: our
torch emulation of PEFT's unfused per-rank structure), ``peft`` (PEFT's own
``LoraParallelLinear`` on megatron-core layers, ``bench.peft_layer``; only where it runs, see
``peft_layer.unsupported``) and ``fused`` (``tplora_kernels``). The FLOP and byte formulas below
are the ones ``NOTES.md`` derives; the roofline floor is
``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

__all__ = [
    "CONTENDERS",
    "DESCRIBE",
    "DTYPES",
    "ELEM",
    "KINDS",
    "PEAKS",
    "Built",
    "Case",
    "build",
    "matrix",
    "min_bytes",
    "model_flops",
    "roofline_ms",
]

CONTENDERS = ("base", "reference", "peft", "fused")
# What each contender is, in one line (the table's legend and the plot's).
DESCRIBE = {
    "base": "the frozen Megatron-style layer alone, with its own collectives (the floor)",
    "reference": "tplora_kernels.reference: our torch emulation of PEFT's LoraParallelLinear structure",
    "peft": "PEFT's own LoraParallelLinear on megatron-core layers (SP off on CPU; bench/peft_layer.py)",
    "fused": "tplora_kernels (column_parallel_lora / row_parallel_lora)",
}
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

    @property
    def label(self) -> str:
        """Short id, e.g. ``column tp=2 sp=on p=0.1``."""
        return f"{self.kind} tp={self.tp} sp={'on' if self.sp else 'off'} p={self.p:g}"

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
    Dropout's elementwise work is not counted.

    Args:
        case: the case.
        contender: ``"base"``, ``"reference"`` or ``"fused"``.
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
    if phase == "fwd":
        return base + lora
    return 2 * base + 3 * lora


def min_bytes(case: Case, contender: str, phase: str, lora_elem: int | None = None) -> int:
    """Compulsory memory traffic per rank of one pass: every operand read or written once.

    fwd: read X ``T·k·e`` and W ``n·k·e``, write y ``T·n·e``; LoRA adds A, B (``r·(k+n)·w``)
    and u written and read back (``2·T·r·e``). bwd: read dy ``T·n·e`` and W, write dx
    ``T·k·e``; LoRA adds the second read of X for dA (``T·k·e``), u, du written and read
    (``3·T·r·e``), A and B (``r·(k+n)·w``) and fp32 dA, dB (``4·r·(k+n)``).

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
    if contender != "base":
        fwd += r * (k + n) * w + 2 * T * r * e
        bwd += T * k * e + 3 * T * r * e + r * (k + n) * w + 4 * r * (k + n)
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
        contenders: ``{name: () -> y}`` for the names of ``CONTENDERS`` that run here, in that order.
        backend: the fused path's resolved backend.
        peft_layer: PEFT's module when the ``peft`` contender runs (for its dropout-free check).
        peft_skipped: why the ``peft`` contender does not run here, or None.
    """

    x: object
    dy: object
    params: list
    grads: list
    contenders: dict[str, Callable[[], object]] = field(default_factory=dict)
    backend: str = ""
    peft_layer: object = None
    peft_skipped: str | None = None


def _tensors(case: Case, rank: int, device, dtype, lora_dtype, seed: int):
    """This rank's shards of one full layer drawn from ``seed`` (the same on every rank).

    Replicated operands (column: x without SP and A; row: B) are therefore identical across
    ranks, as in a real TP model, and the fused path can be checked against the reference.
    """
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    T, K, N, r, t = case.tokens, case.d_in, case.d_out, case.r, case.tp

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    X, W, dY = rnd(T, 1, K), rnd(N, K, std=K ** -0.5), rnd(T, 1, N)
    # A, B as after some training (B = 0 at init would make half the LoRA math trivial).
    A, B = rnd(r, K, std=K ** -0.5), rnd(N, r, std=0.02)
    rows = slice(rank * T // t, (rank + 1) * T // t)
    sp = case.sp and not case.emulated
    if case.kind == "column":
        n = slice(rank * N // t, (rank + 1) * N // t)
        x, w, a, b, dy = X[rows] if sp else X, W[n], A, B[n], dY[..., n]
    else:
        k = slice(rank * K // t, (rank + 1) * K // t)
        x, w, a, b, dy = X[..., k], W[:, k], A[:, k], B, dY[rows] if sp else dY

    def put(v, dt):
        return v.to(device=device, dtype=dt, copy=True).contiguous()  # own storage, as a real shard has

    a_ref = put(a, torch.float32).requires_grad_(True)
    b_ref = put(b, torch.float32).requires_grad_(True)
    return (put(x, dtype).requires_grad_(True), put(w, dtype), put(a, lora_dtype).requires_grad_(True),
            put(b, lora_dtype).requires_grad_(True), a_ref, b_ref, put(dy, dtype))


def _build(case: Case, *, group, rank, device, backend, ref_dropout, lora_dtype, seed, peft) -> Built:
    import torch

    import tplora_kernels as tk
    from tplora_kernels.mappings import base_parallel_linear
    from tplora_kernels.reference import column_parallel_lora_reference, row_parallel_lora_reference

    from . import peft_layer

    dtype = getattr(torch, DTYPES[case.dtype])
    x, w, a, b, a_ref, b_ref, dy = _tensors(case, rank, device, dtype, lora_dtype, seed)
    scale, p, sp = SCALE, case.p, case.sp and not case.emulated
    seed_t = torch.tensor([0x5EED], dtype=torch.int64, device=device)
    be = tk.resolve_backend(device, backend)
    # Column runs without gather_output, row with input_is_parallel: Megatron's usual pairing.
    mode = {} if case.kind == "column" else {"input_is_parallel": True}
    ref, fused = ((column_parallel_lora_reference, tk.column_parallel_lora) if case.kind == "column"
                  else (row_parallel_lora_reference, tk.row_parallel_lora))
    common = dict(sequence_parallel=sp, group=group, **mode)
    built = Built(x, dy, [w, a, b, a_ref, b_ref], [x, a, b, a_ref, b_ref], {
        "base": lambda: base_parallel_linear(x, w, kind=case.kind, **common),
        "reference": lambda: ref(x, w, a_ref, b_ref, scale=scale, dropout_p=p, seed=0x5EED, dropout=ref_dropout,
                                 **common),
    }, be)
    built.peft_skipped = peft_layer.unsupported(case, device.type, group is not None) if peft else "--no-peft"
    if built.peft_skipped is None:
        # Its own fp32 copies of A and B: PEFT keeps its factors in fp32, as the reference does.
        layer, params = peft_layer.build_peft_layer(case.kind, w=w, a=a_ref.detach(), b=b_ref.detach(), r=case.r,
                                                    scale=scale, p=p, group=group, tp=case.tp)
        built.params += params
        built.grads += params[1:]
        built.peft_layer = layer
        built.contenders["peft"] = lambda: layer(x)[0]
    built.contenders["fused"] = lambda: fused(x, w, a, b, scale=scale, dropout_p=p, seed=seed_t, backend=be,
                                              **common)
    return built


KINDS: dict[str, Callable[..., Built]] = {"column": _build, "row": _build}


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
        backend: the fused path's backend (``"auto"``, ``"triton"``, ``"interpret"``, ``"torch"``).
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
    return KINDS[case.kind](case, group=group, rank=rank, device=torch.device(device), backend=backend,
                            ref_dropout=ref_dropout, lora_dtype=lora_dtype or dtype, seed=seed, peft=peft)


def matrix(*, kinds: Iterable[str], tps: Iterable[int], sps: Iterable[bool], tokens: int, d_in: int, d_out: int,
           r: int, ps: Iterable[float], dtype: str, emulate: bool = False) -> list[Case]:
    """Every combination, skipping SP at t = 1 (and when emulated: one device has no SP).

    Cases are ordered by TP size first, so each TP size's ranks are spawned once.

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
                    out.append(Case(kind, tp, sp, tokens, d_in, d_out, r, p, dtype, emulated=emulate and tp > 1))
    return out
