#!/usr/bin/env bash
# Issue 16's two-GPU evidence in one device call (nvidia-h200-x2; about 5
# minutes, at most 9): the tensor-parallel tests on both GPUs (torch over
# NCCL and JAX on a mesh, side by side), then the TP benchmark, each
# time-boxed. Logs and the benchmark's result files go to $OUT when set.
#
#   bash experiments/gpu_tp_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
logs=${OUT:-/tmp/gpu_tp_check}
mkdir -p "$logs"
start=$(date +%s)
nvidia-smi -L

# The two GPU tests in parallel (each kills its workers at 240 s).
timeout -k 10 270 python -m pytest -q -p no:cacheprovider -n 2 -rs tests/test_tp.py -k two_gpus \
    >"$logs/tp_tests.log" 2>&1
echo "GPU TP tests exit: $? after $(( $(date +%s) - start )) s"
tail -n 40 "$logs/tp_tests.log"

# The benchmark's parts stop themselves (110 s each); the outer box only catches a hang of the parent.
timeout -k 10 250 python -m experiments.bench_tp 2>&1 | tee "$logs/bench_tp.log"
echo "bench_tp exit: ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
find experiments/results -name 'bench_tp-*' -newer "$logs/tp_tests.log" -exec cp {} "$logs/" \;
