#!/usr/bin/env bash
# Builds anyio's libFuzzer targets (tests/fuzz) with clang++, AddressSanitizer,
# UndefinedBehaviorSanitizer and LeakSanitizer, and runs each one for a given time over a
# scratch copy of its seed corpus (tests/fuzz/corpus/<target>/).
#
#   tests/fuzz/run.sh [SECONDS]     fuzz each target for SECONDS (default 60)
#   tests/fuzz/run.sh --regress     only replay the seed corpora (what ctest -L fuzz runs)
#
# Environment: ANYIO_FUZZ_BUILD_DIR (default <repo>/build-fuzz; reused as configured when it
# already has ANYIO_BUILD_FUZZERS=ON and clang++), ANYIO_FUZZ_TARGETS (default:
# every target the build defines), ANYIO_FUZZ_JOBS (build parallelism, default 2).
#
# Fails (non-zero exit) on any crash, model mismatch, sanitizer report, leak, or input that
# runs longer than 10 s (-timeout=10). The failing input is kept in
# <build dir>/fuzz-artifacts/<target>/ and its path printed; replay it with
#   <build dir>/tests/fuzz/<target> <input>
# and, once fixed, add it to tests/fuzz/corpus/<target>/ so it stays fixed. Prints the
# number of executions (and executions per second) of each target. The targets run
# concurrently, each on its own core for the whole time.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${ANYIO_FUZZ_BUILD_DIR:-$root/build-fuzz}
jobs=${ANYIO_FUZZ_JOBS:-2}
targets=${ANYIO_FUZZ_TARGETS:-loop_model_fuzz http_request_fuzz}

seconds=60
regress=0
case "${1:-}" in
    "") ;;
    --regress) regress=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *[!0-9]*) echo "run.sh: expected a number of seconds or --regress, got '$1'" >&2; exit 2 ;;
    *) seconds=$1 ;;
esac

command -v clang++ >/dev/null || { echo "run.sh: clang++ not found" >&2; exit 2; }

# A build directory that is already configured with the fuzzers on (CI's clang ASan+UBSan
# stage) is reused as it is; otherwise one is configured here.
if ! grep -qs '^ANYIO_BUILD_FUZZERS:BOOL=ON' "$build/CMakeCache.txt"; then
cmake -S "$root" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER=clang++ \
    -DANYIO_SANITIZE=address,undefined \
    -DANYIO_BUILD_FUZZERS=ON \
    -DANYIO_BUILD_TESTS=ON \
    -DANYIO_BUILD_EXAMPLES=OFF \
    -DANYIO_BUILD_BENCHMARKS=OFF >/dev/null
fi
# A target the build does not define (http_request_fuzz without http-parser) is skipped,
# unless it was asked for by name.
if [ -z "${ANYIO_FUZZ_TARGETS:-}" ]; then
    known=$(ninja -C "$build" -t targets all 2>/dev/null | sed -n 's/^\([A-Za-z0-9_]*\): phony$/\1/p')
    kept=""
    for target in $targets; do
        if printf '%s\n' "$known" | grep -qx "$target"; then
            kept="$kept $target"
        else
            echo "run.sh: $target is not defined by this build (see cmake's messages); skipping it" >&2
        fi
    done
    targets=${kept# }
fi
# shellcheck disable=SC2086  # targets is a list
cmake --build "$build" -j "$jobs" --target $targets

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

# One target: fuzz (or replay) it, print its summary, and return non-zero on any finding.
fuzz_one() {
    local target=$1 binary seeds artifacts scratch log rc runs took
    binary=$build/tests/fuzz/$target
    seeds=$root/tests/fuzz/corpus/$target
    artifacts=$build/fuzz-artifacts/$target
    rm -rf "$artifacts"
    mkdir -p "$artifacts"
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/anyio-fuzz-$target.XXXXXX")
    mkdir "$scratch/corpus"
    cp "$seeds"/* "$scratch/corpus/"
    log=$scratch/log

    if [ "$regress" = 1 ]; then
        args=(-timeout=10 -artifact_prefix="$artifacts/" "$seeds"/*)
    else
        args=(-timeout=10 -max_total_time="$seconds" -print_final_stats=1
              -artifact_prefix="$artifacts/" "$scratch/corpus")
    fi
    echo "== $target: ${args[*]:0:3} ..."
    set +e
    "$binary" "${args[@]}" >"$log" 2>&1
    rc=$?
    set -e

    if [ "$regress" = 1 ]; then
        runs=$(grep -c '^Executed ' "$log" || true)
        echo "$target: $runs of $(find "$seeds" -type f | wc -l) seed inputs replayed cleanly"
    else
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
        if [ -n "$runs" ] && [ -n "$took" ] && [ "$took" -gt 0 ]; then
            echo "$target: $runs executions in ${took} s ($((runs / took))/s)," \
                 "corpus $(find "$scratch/corpus" -type f | wc -l) inputs"
        else
            echo "$target: ${runs:-?} executions"
        fi
    fi
    # Sanitizer reports abort the run, but check the log as well: a report must never pass.
    if [ "$rc" -ne 0 ] || grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|MODEL MISMATCH' "$log"; then
        echo "$target: FAILED (exit $rc); the last lines of its log:" >&2
        tail -n 60 "$log" >&2
        if [ "$regress" = 1 ]; then
            sed -n 's/^Running: /  failing seed: /p' "$log" | tail -n 1 >&2
        else
            ls "$artifacts" 2>/dev/null | sed "s|^|  kept input: $artifacts/|" >&2
        fi
        echo "  full log: $log" >&2
        return 1
    fi
    rm -rf "$scratch"
}

# The targets run at the same time, one per core (each still for SECONDS): their summaries
# are printed in order once all have finished.
status=0
pids=()
outputs=()
for target in $targets; do
    out=$(mktemp "${TMPDIR:-/tmp}/anyio-fuzz-out.XXXXXX")
    fuzz_one "$target" >"$out" 2>&1 &
    pids+=($!)
    outputs+=("$out")
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    cat "${outputs[$i]}"
    rm -f "${outputs[$i]}"
done
exit $status
