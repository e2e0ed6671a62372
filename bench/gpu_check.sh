#!/usr/bin/env bash
# One command for a GPU machine: the CUDA checks, then the bench at LoRAFusion's shape.
#
#     OUT=/some/dir bash bench/gpu_check.sh        # OUT defaults to bench_out/gpu_check (git-ignored)
#
# Needs one CUDA GPU with about 10 GB free, torch, triton >= 3.6, pytest and hypothesis; not
# megatron-core or PEFT (neither the CUDA tests nor the bench's own contenders import them; the
# bench skips PEFT's layer without them). Runs from this checkout (PYTHONPATH), nothing installed.
# Each step has its own time limit, so the whole stays under 8 minutes:
#   env          nvidia-smi, versions, and that the package and the bench import without megatron
#   cuda_tests   the suite's CUDA tests (pytest -m gpu: tests/ops/test_cuda.py, every kernel against
#                fp64 in fp32/fp16/bf16 at TP=1 and shard shapes, and each on an operand of > 2^31
#                elements; tests/parallel/test_cuda_modes.py, every mode at TP 1/2/4 as processes
#                sharing the GPU), JUnit report and per-check verdicts under $OUT
#   bench        python -m bench at LoRAFusion's shape: per-rank 4096x4096, T=8192, r=16,
#                p=0.1, bf16 (TP=1 is exactly that; TP 2 and 4 time each rank's shards on the
#                one GPU, collectives "not measured"), backend auto: the package picks triton or
#                cublas per layer shape by measuring both, and the summary lists those choices
#                and times (--backend triton or cublas times one path alone)
# Everything lands under $OUT (logs, JUnit XML, JSON, CSV, PNG); the summary is printed last and
# saved as $OUT/summary.txt. The exit status is 0 only if every step passed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET TPLORA_BACKEND TPLORA_CUDA_CHECKS_ON_CPU
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
import tplora_kernels, bench.runner, bench.report, bench.gpu_summary
print('tplora_kernels', tplora_kernels.__version__, 'imports fine')
EOF" || status=1

if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    rm -rf "$OUT/checks"
    TPLORA_CHECKS_OUT="$OUT/checks" step cuda_tests 270 "$PY" -m pytest -q -m gpu tests/ops \
        tests/parallel/test_cuda_modes.py -p no:cacheprovider --junitxml "$OUT/pytest.xml" || status=1
else
    echo "cuda_tests rc=1: pytest and hypothesis are needed (pip install pytest hypothesis)" >> "$OUT/steps.txt"
    status=1
fi

step bench 170 "$PY" -m bench --tp 1,2,4 --kind column,row --tokens 8192 --in 4096 --out 4096 --r 16 --p 0.1 \
    --dtype bf16 --backend auto --out-dir "$OUT/bench" --no-progress || status=1

"$PY" -m bench.gpu_summary "$OUT" > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit "$status"
