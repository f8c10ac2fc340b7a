#!/usr/bin/env bash
# The GPU evidence in one device call: the whole suite compiled (slow cases
# included), the memory-safety tests under compute-sanitizer, then the main
# job's rows. Records go to experiments/results/ (and a copy of the logs to
# $OUT when set, as on the device machine).
#
#   bash experiments/gpu_check.sh [tests|sanitize|bench|bars|all] [compare args...]
#
# bars: the open issues' speed bars and profiles in about four minutes (host
# path, mixer decode in float32 and bf16, generation at 16 layers, the chunked
# scan backward's kernels); not part of all.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
logs=${OUT:-/tmp/gpu_check}
mkdir -p "$logs"
what=${1:-all}
shift || true
# The tests that drive kernels with malformed indices on the unchecked path.
SAFETY_TESTS=(-k "guard or unchecked or out_of_range or malformed")
# Test files or pytest arguments for the suite run (default: all of tests/).
read -r -a TESTS <<<"${GPU_CHECK_TESTS:-tests/}"

if [[ $what == tests || $what == all ]]; then
    python -m experiments.run_tests --output "$logs/tests.md" -p no:cacheprovider --slow -n 4 "${TESTS[@]:-tests/}" \
        >"$logs/tests.log" 2>&1
    tail -n 25 "$logs/tests.log"
fi
if [[ $what == sanitize || $what == all ]]; then
    # Triton kernels under memcheck; JAX's allocator is left to its default.
    compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1 --print-limit 20 \
        python -m pytest -q -p no:cacheprovider --slow "${SAFETY_TESTS[@]}" tests/ >"$logs/sanitize.log" 2>&1
    echo "compute-sanitizer exit: $?"
    grep -E "ERROR SUMMARY|passed|failed|Invalid" "$logs/sanitize.log" | tail -n 15
fi
if [[ $what == bench || $what == all ]]; then
    python -m experiments.compare "$@" 2>&1 | tee "$logs/compare.log" | tail -n 60
fi
if [[ $what == bars ]]; then
    python -m experiments.bench_host 2>&1 | tee "$logs/bench_host.log"
    for dtype in float32 bfloat16; do
        python -m experiments.bench_mixer --modes decode --dtype "$dtype" 2>&1 | grep -E "^(torch|flax)" \
            | tee "$logs/mixer_decode_$dtype.log"
    done
    python -m experiments.generate --batches 1 --layers 16 --new-tokens 16 \
        --output "$logs/generate-b1-L16.json" 2>&1 | tail -n 40
    python -m experiments.kernel_timeline --op chunked_scan_backward --tokens 16384 2>&1 \
        | tee "$logs/backward_kernels.log"
fi
