#!/usr/bin/env bash
# The GPU check: one command, a few minutes on an H200. It runs the `gpu` tests (Triton kernels
# compiled for the device, CUDA graphs, greedy GPU == CPU), the batch-1 decode latency of the
# Llama-3-8B shape in bf16 with every quantization, and the Qwen3-0.6B-shape offline throughput
# against transformers on the same GPU, then writes one markdown table (OUTDIR/gpu-check.md).
#
#   scripts/gpu-check.sh [OUTDIR] [tests] [latency] [throughput] [spec]
#
# The default is the first three. `spec` (opt-in, about 4 minutes) runs speculative decoding
# against plain decoding on the device: `bench spec` on GPU_CHECK_SPEC_MODEL (default smollm2,
# which must be installed there; a random:... model measures only the cost of having it on).
#
# PYTHON picks the interpreter (default .venv/bin/python, else python3); each step has its own
# time limit, so one that hangs or fails still leaves the others' figures in the table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-gpu-check}
shift || true
STEPS=${*:-tests latency throughput}  # spec: opt-in
mkdir -p "$OUT"
KVPILOT=("$PY" -m kvpilot_engine.cli)

step() {  # step NAME LIMIT_S COMMAND...: runs one part, logs to OUT/NAME.log, records its status
    local name=$1 limit=$2 start rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(($(date +%s) - start))" >>"$OUT/steps.txt"
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
    tail -n 25 "$OUT/$name.log"
}

: >"$OUT/steps.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$OUT/env.txt"

step tests "${GPU_CHECK_TESTS_S:-240}" "$PY" -m pytest -m gpu tests/engine -p no:cacheprovider \
    -q -rA --junitxml="$OUT/tests.xml"
step latency "${GPU_CHECK_LATENCY_S:-240}" "${KVPILOT[@]}" bench latency random:llama-3-8b \
    --dtype bfloat16 --max-model-len 4096 --input-len 128 --output-len 256 --num-iters 3 \
    --compare-quantization none int8 int4 fp8 --json "$OUT/latency.json"
step throughput "${GPU_CHECK_THROUGHPUT_S:-300}" "${KVPILOT[@]}" bench throughput \
    random:qwen3-0.6b --dtype bfloat16 --num-prompts 256 --input-len 100 1024 \
    --output-len 100 1024 --max-model-len 4096 --max-num-seqs 256 \
    --max-num-batched-tokens 16384 --hf-batch-size 64 --json "$OUT/throughput.json"

step spec "${GPU_CHECK_SPEC_S:-300}" "${KVPILOT[@]}" bench spec "${GPU_CHECK_SPEC_MODEL:-smollm2}" \
    --dtype bfloat16 --workloads edit qa chat --concurrency 16 --output-len 128 --num-iters 2 \
    --json "$OUT/spec.json"

"$PY" -m kvpilot_engine.bench.gpu_report "$OUT" | tee "$OUT/gpu-check.md"
