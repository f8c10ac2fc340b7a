#!/usr/bin/env bash
# The GPU evidence in one device call: the whole suite compiled (slow cases
# included), the memory-safety tests under compute-sanitizer, then the main
# job's rows. Records go to experiments/results/ (and a copy of the logs to
# $OUT when set, as on the device machine).
#
#   bash experiments/gpu_check.sh [tests|sanitize|bench|all] [compare args...]
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
