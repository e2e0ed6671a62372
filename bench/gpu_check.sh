#!/usr/bin/env bash
# One command for a lent GPU (H200: Python 3.12, torch 2.11, triton 3.6, no megatron-core):
#
#     OUT=/some/dir bash bench/gpu_check.sh        # OUT defaults to bench_out/gpu_check (git-ignored)
#
# Runs, each step under its own time limit so the whole stays under 8 minutes:
#   env          nvidia-smi, versions, and that the package and bench import without megatron
#   correctness  every kernel and every mode, fp32/fp16/bf16, TP=1 and shard shapes, TP=2/4 as
#                processes sharing the GPU (python -m bench.gpu_check correctness)
#   pytest_gpu   the test suite's GPU-marked tests, if pytest is installed
#   int64        each kernel on an operand of > 2^31 elements (python -m bench.gpu_check int64)
#   bench        python -m bench at LoRAFusion's shape: per-rank 4096x4096, T=8192, r=16,
#                p=0.1, bf16 (TP=1 is exactly that; TP 2 and 4 time each rank's shards on the
#                one GPU, collectives "not measured"), backend auto: the package picks triton or
#                cublas per layer shape by measuring both, and the summary lists those choices
#                and times (--backend triton or cublas times one path alone)
# Everything lands under $OUT (logs, JSON, CSV, PNG); the summary is printed last and saved as
# $OUT/summary.txt. The exit status is 0 only if every step passed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET TPLORA_BACKEND
: > "$OUT/steps.txt"
status=0

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, record rc and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >&2
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "TIMED OUT after ${limit}s" >> "$OUT/$name.log"
    echo "$name rc=$rc $(( $(date +%s) - start ))s" >> "$OUT/steps.txt"
    tail -n 3 "$OUT/$name.log" >&2
    return "$rc"
}

step env 30 bash -c "nvidia-smi; $PY - <<'EOF'
import sys, importlib.metadata as md
import torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')
try:
    print('megatron-core', md.version('megatron-core'))
except md.PackageNotFoundError:
    print('megatron-core not installed')
import tplora_kernels, bench.runner, bench.report, bench.gpu_check
print('tplora_kernels', tplora_kernels.__version__, 'imports fine')
EOF" || status=1

step correctness 170 "$PY" -m bench.gpu_check correctness --out "$OUT" || status=1

if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    # rc 5 = no GPU-marked test collected: not a failure
    step pytest_gpu 40 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors
    rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1
else
    echo "pytest_gpu skipped: pytest/hypothesis not installed" >> "$OUT/steps.txt"
fi

step int64 60 "$PY" -m bench.gpu_check int64 --out "$OUT" || status=1

step bench 170 "$PY" -m bench --tp 1,2,4 --kind column,row --tokens 8192 --in 4096 --out 4096 --r 16 --p 0.1 \
    --dtype bf16 --backend auto --out-dir "$OUT/bench" --no-progress || status=1

"$PY" -m bench.gpu_check summary --out "$OUT" > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit "$status"
