#!/usr/bin/env bash
# Builds the benchmarks (Release, in build-bench/), runs every workload of BENCH.md REPEAT
# times (default 3) with each system side by side, writes every JSON line to
# build-bench/results.jsonl and prints a table of medians with the goals of BENCH.md.
#
#   benchmarks/run.sh                 # REPEAT=3
#   REPEAT=6 benchmarks/run.sh
#   SKIP_BUILD=1 benchmarks/run.sh    # reuse the binaries already in build-bench/
#   TIMEOUT=600 benchmarks/run.sh     # seconds allowed per program run (default 300)
#
# Each program run measures one workload in its own process, so max_rss_kb is that
# workload's own peak. Within one repetition the systems run one after the other, workload
# by workload, so they share the machine's conditions as far as possible.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build-bench}"
REPEAT="${REPEAT:-3}"
TIMEOUT="${TIMEOUT:-300}"
RESULTS="$BUILD/results.jsonl"
BIN="$BUILD/benchmarks"

if ! [[ "$REPEAT" =~ ^[1-9][0-9]*$ ]]; then
    echo "run.sh: REPEAT must be a positive integer (got '$REPEAT')" >&2
    exit 2
fi

cd "$ROOT"
if [[ -z "${SKIP_BUILD:-}" ]]; then
    cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DANYIO_BUILD_TESTS=OFF -DANYIO_BUILD_EXAMPLES=OFF
    cmake --build "$BUILD"
fi

for required in offload_bench call_soon_threadsafe_bench from_thread_bench; do
    if [[ ! -x "$BIN/$required" ]]; then
        echo "run.sh: $BIN/$required was not built" >&2
        exit 1
    fi
done
peers=()
for peer in asio_offload libuv_offload; do
    if [[ -x "$BIN/$peer" ]]; then
        peers+=("$peer")
    else
        echo "run.sh: $peer not built (its library was not found); skipping it" >&2
    fi
done

: >"$RESULTS"
failures=0

# run <program> <args...>: appends the program's JSON lines to results.jsonl and echoes them.
run() {
    local program="$1"
    shift
    local out rc=0
    out="$(timeout "$TIMEOUT" "$BIN/$program" "$@")" || rc=$?
    if [[ -n "$out" ]]; then
        printf '%s\n' "$out" | tee -a "$RESULTS"
    fi
    if [[ $rc -ne 0 ]]; then
        if [[ $rc -eq 124 ]]; then
            echo "run.sh: FAILED: $program $* timed out after ${TIMEOUT}s" >&2
        else
            echo "run.sh: FAILED: $program $* exited with status $rc" >&2
        fi
        failures=$((failures + 1))
    fi
}

echo "== $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg); REPEAT=$REPEAT"
for ((rep = 1; rep <= REPEAT; rep++)); do
    echo "== repetition $rep of $REPEAT"
    for workload in W1 W2 W3; do
        run offload_bench "$workload"
        for peer in "${peers[@]}"; do run "$peer" "$workload"; done
    done
    for workload in W4 W5 W6 floor; do run offload_bench "$workload"; done
    run call_soon_threadsafe_bench
    run from_thread_bench
    run sync_bench
    if [[ -x "$BIN/asio_channel" ]]; then run asio_channel; fi
done

echo
echo "== results: $RESULTS ($(wc -l <"$RESULTS") lines)"
python3 "$ROOT/benchmarks/summarize.py" "$RESULTS"

if [[ $failures -ne 0 ]]; then
    echo "run.sh: $failures program run(s) failed (see above)" >&2
    exit 1
fi
