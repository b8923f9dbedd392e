#!/usr/bin/env bash
# Builds the benchmarks (Release, in build-bench/), runs every workload of BENCH.md REPEAT
# times (default 3) with each system side by side, writes every JSON line to
# build-bench/results.jsonl and prints a table of medians with the goals of BENCH.md.
#
#   benchmarks/run.sh                 # REPEAT=3
#   REPEAT=6 benchmarks/run.sh
#   SKIP_BUILD=1 benchmarks/run.sh    # reuse the binaries already in build-bench/
#   TIMEOUT=600 benchmarks/run.sh     # seconds allowed per program run (default 300)
#   CARGO=/usr/bin/cargo benchmarks/run.sh   # the cargo that builds the Tokio peer
#   JOBS=1 benchmarks/run.sh          # parallel build jobs (default 2)
#
# Peers: asio_offload and libuv_offload are CMake targets (built when their library is found);
# the Tokio peer (benchmarks/peers/tokio_offload, run as "tokio" and "tokio-sem40") is built
# with `cargo build --release --offline` against Debian's crates in /usr/share/cargo/registry
# (librust-tokio-dev) into $BUILD_DIR/tokio; it is skipped with a message when cargo or the
# crates are missing or the build fails. CARGO defaults to the cargo in PATH, else
# /usr/bin/cargo; the rustc next to that cargo is used unless RUSTC is set.
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
        -DANYIO_BUILD_TESTS=OFF -DANYIO_BUILD_EXAMPLES=OFF -DANYIO_BUILD_BENCHMARKS=ON
    cmake --build "$BUILD" --parallel "${JOBS:-2}"
fi

for required in offload_bench call_soon_threadsafe_bench from_thread_bench; do
    if [[ ! -x "$BIN/$required" ]]; then
        echo "run.sh: $BIN/$required was not built" >&2
        exit 1
    fi
done
# --- Tokio peer (cargo, offline) --------------------------------------------------------------
TOKIO_SRC="$ROOT/benchmarks/peers/tokio_offload"
TOKIO_BIN="$BUILD/tokio/release/tokio_offload"
if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo_bin="${CARGO:-$(command -v cargo || true)}"
    [[ -z "$cargo_bin" && -x /usr/bin/cargo ]] && cargo_bin=/usr/bin/cargo
    if [[ -z "$cargo_bin" ]] || ! command -v "$cargo_bin" >/dev/null; then
        echo "run.sh: cargo not found (apt-get install cargo); skipping the Tokio peer" >&2
    elif ! compgen -G "/usr/share/cargo/registry/tokio-1.*" >/dev/null; then
        echo "run.sh: no tokio crate in /usr/share/cargo/registry (apt-get install" \
            "librust-tokio-dev); skipping the Tokio peer" >&2
    else
        cargo_path="$(command -v "$cargo_bin")"
        rustc_bin="${RUSTC:-}"
        if [[ -z "$rustc_bin" && -x "$(dirname "$cargo_path")/rustc" ]]; then
            rustc_bin="$(dirname "$cargo_path")/rustc"
        fi
        cargo_env=()
        [[ -n "$rustc_bin" ]] && cargo_env=(RUSTC="$rustc_bin")
        echo "== building the Tokio peer with $cargo_path${rustc_bin:+ (rustc: $rustc_bin)}"
        # cd: cargo finds the source replacement in the peer's .cargo/config.toml from the cwd.
        if ! (cd "$TOKIO_SRC" && env "${cargo_env[@]}" "$cargo_path" build \
                --release --offline -j2 --target-dir "$BUILD/tokio"); then
            echo "run.sh: the Tokio peer did not build (see above); skipping it" >&2
            rm -f "$TOKIO_BIN"
        fi
    fi
fi

peers=()
for peer in asio_offload libuv_offload; do
    if [[ -x "$BIN/$peer" ]]; then
        peers+=("$peer")
    else
        echo "run.sh: $peer not built (its library was not found); skipping it" >&2
    fi
done
if [[ -x "$TOKIO_BIN" ]]; then
    peers+=(tokio tokio-sem40)
else
    echo "run.sh: $TOKIO_BIN not built; skipping the Tokio peer" >&2
fi

: >"$RESULTS"
failures=0

# run <program> <args...>: appends the program's JSON lines to results.jsonl and echoes them.
# <program> is a target in $BIN, or a path.
run() {
    local program="$1"
    shift
    local path="$BIN/$program"
    [[ "$program" == */* ]] && path="$program"
    local out rc=0
    out="$(timeout "$TIMEOUT" "$path" "$@")" || rc=$?
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

# run_peer <peer> <workload>
run_peer() {
    case "$1" in
    tokio) run "$TOKIO_BIN" "$2" ;;
    tokio-sem40) run "$TOKIO_BIN" "$2" --sem40 ;;
    *) run "$1" "$2" ;;
    esac
}

echo "== $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg); REPEAT=$REPEAT"
for ((rep = 1; rep <= REPEAT; rep++)); do
    echo "== repetition $rep of $REPEAT"
    for workload in W1 W2 W3; do
        run offload_bench "$workload"
        for peer in "${peers[@]}"; do run_peer "$peer" "$workload"; done
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
