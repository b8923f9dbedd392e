#!/usr/bin/env bash
# H1-H3 of ../shared/BENCH.md (the seeds' scenario over HTTP): wrk on loopback against every
# server available, interleaved in the same run, then the BENCH.md table, the ratios of
# anyio-cpp against each peer and the goals as PASS/FAIL.
#
#   benchmarks/http/run.sh                       # REPEAT=1, the durations of BENCH.md
#   REPEAT=3 benchmarks/http/run.sh              # medians of 3 interleaved repetitions
#   H1_DURATION=2 H2_DURATION=2 H3_BG_DURATION=5 H3_DELAY=1 H3_DURATION=2 \
#       benchmarks/http/run.sh                   # a short check that everything works
#   SERVERS="hyper fastapi-uvloop" WORKLOADS=H1 benchmarks/http/run.sh
#   python3 benchmarks/http/bench_http.py summarize build-bench/http/results.jsonl   # again
#
# Servers (SERVERS selects some, default all; each one missing is skipped with a message):
#   anyio-cpp         $ANYIO_HTTP_SERVER (default build-bench/examples/http_server) with
#                     --host --port [ANYIO_SERVER_ARGS]. This script builds nothing of the C++
#                     side; build it first, e.g.
#                       cmake -S . -B build-bench -G Ninja -DCMAKE_BUILD_TYPE=Release \
#                           -DANYIO_BUILD_EXAMPLES=ON && cmake --build build-bench -j2 --target http_server
#   anyio-cpp-loops2  the same binary with --loops 2, H1 only (issue 12)
#   fastapi-uvloop    benchmarks/http/fastapi_app.py on uvicorn --loop uvloop --http httptools
#   fastapi-h11       the same on uvicorn --loop asyncio --http h11 (both with $PYTHON,
#                     default /usr/bin/python3: Debian's python3-fastapi, -uvicorn, -uvloop, ...)
#   hyper             benchmarks/http/hyper_server, built here with `cargo build --release
#                     --offline` against /usr/share/cargo/registry (librust-hyper-dev) into
#                     $BUILD_DIR/hyper (CARGO as in benchmarks/run.sh; HYPER_SERVER=path uses
#                     a binary you built, SKIP_BUILD=1 reuses the last one)
#
# Workloads (WORKLOADS selects some, default "H1 H2 H3"), all wrk -t1 on 127.0.0.1:
#   H1  -c$H1_CONNECTIONS (64) -d$H1_DURATION (5) s  GET /async
#   H2  -c$H2_CONNECTIONS (200) -d$H2_DURATION (5) s  GET /sync?ms=$SYNC_MS (10)
#   H3  H2's load for $H3_BG_DURATION (8) s; after $H3_DELAY (1.5) s,
#       -c$H3_CONNECTIONS (8) -d$H3_DURATION (5) s GET /async
# For every (repetition, workload, server) a fresh server is started on a free loopback port
# (READY_TIMEOUT s to answer /async, default 30), /sync and /stats are checked, then
# WARMUP_REQUESTS (default 1000) sequential GET /async warm it up, wrk runs, the server's
# peak RSS is read from /proc/<pid>/status (VmHWM) and it is stopped (SIGTERM, SIGKILL after
# STOP_TIMEOUT s). The server order rotates from one repetition to the next. Latency
# percentiles are nearest-rank, computed exactly from wrk's 1 us histogram by report.lua
# (wrk --timeout $WRK_TIMEOUT s, default 30, so that no slow request goes unrecorded).
#
# Output: one JSON line per run on stdout and in $BUILD_DIR/http/results.jsonl (wrk reports and
# server output in results.log), then the tables. SUBJECT=hyper evaluates the goals and ratios
# for another system (to check the harness when the anyio-cpp server is not built).
# Exit status 1 when a run failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build-bench}"
export PYTHON="${PYTHON:-/usr/bin/python3}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

if ! command -v "${WRK:-wrk}" >/dev/null; then
    echo "run.sh: wrk not found (apt-get install wrk)" >&2
    exit 1
fi

# --- anyio-cpp: only found, never built here ------------------------------------------------
export ANYIO_HTTP_SERVER="${ANYIO_HTTP_SERVER:-$BUILD/examples/http_server}"

# --- hyper (cargo, offline) -----------------------------------------------------------------
HYPER_SRC="$ROOT/benchmarks/http/hyper_server"
if [[ -z "${HYPER_SERVER:-}" ]]; then
    HYPER_SERVER="$BUILD/hyper/release/hyper_server"
    servers_wanted=" ${SERVERS:-hyper} "
    if [[ -z "${SKIP_BUILD:-}" && "${servers_wanted//,/ }" == *" hyper "* ]]; then
        cargo_bin="${CARGO:-$(command -v cargo || true)}"
        [[ -z "$cargo_bin" && -x /usr/bin/cargo ]] && cargo_bin=/usr/bin/cargo
        if [[ -z "$cargo_bin" ]] || ! command -v "$cargo_bin" >/dev/null; then
            echo "run.sh: cargo not found (apt-get install cargo); skipping hyper" >&2
            HYPER_SERVER=""
        elif ! compgen -G "/usr/share/cargo/registry/hyper-0.14.*" >/dev/null; then
            echo "run.sh: no hyper 0.14 crate in /usr/share/cargo/registry (apt-get install" \
                "librust-hyper-dev librust-tokio-dev); skipping hyper" >&2
            HYPER_SERVER=""
        else
            cargo_path="$(command -v "$cargo_bin")"
            rustc_bin="${RUSTC:-}"
            if [[ -z "$rustc_bin" && -x "$(dirname "$cargo_path")/rustc" ]]; then
                rustc_bin="$(dirname "$cargo_path")/rustc"
            fi
            cargo_env=()
            [[ -n "$rustc_bin" ]] && cargo_env=(RUSTC="$rustc_bin")
            echo "== building the hyper server with $cargo_path${rustc_bin:+ (rustc: $rustc_bin)}" >&2
            # cd: cargo finds the source replacement in .cargo/config.toml from the cwd.
            if ! (cd "$HYPER_SRC" && env "${cargo_env[@]}" "$cargo_path" build \
                    --release --offline -j2 --target-dir "$BUILD/hyper" >&2); then
                echo "run.sh: the hyper server did not build (see above); skipping it" >&2
                rm -f "$HYPER_SERVER"
            fi
        fi
    fi
fi
export HYPER_SERVER

echo "== $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg); REPEAT=${REPEAT:-1}" >&2
exec "$PYTHON" "$ROOT/benchmarks/http/bench_http.py" run "$BUILD/http/results.jsonl"
