#!/usr/bin/env python3
"""Summarises build-bench/results.jsonl (written by benchmarks/run.sh): medians per system and
workload, the ratios anyio-cpp / peers, and the goals of BENCH.md.

    python3 benchmarks/summarize.py build-bench/results.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict


def load(path):
    runs = defaultdict(list)  # (system, workload, n) -> [record]
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"summarize: {path}:{number}: not JSON ({e}); skipped", file=sys.stderr)
                continue
            runs[(rec.get("system"), rec.get("workload"), rec.get("n"))].append(rec)
    return runs


def median(runs, system, workload, field, n=None):
    """Median of `field` over the runs of (system, workload[, n]); None if absent."""
    values = []
    for (sys_, wl, n_), recs in runs.items():
        if sys_ != system or wl != workload or (n is not None and n_ != n):
            continue
        values += [r[field] for r in recs if isinstance(r.get(field), (int, float))]
    return statistics.median(values) if values else None


def count(runs, system, workload, n=None):
    return sum(len(recs) for (s, w, n_), recs in runs.items()
               if s == system and w == workload and (n is None or n_ == n))


def fmt(value, digits=1):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(headers, rows):
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    def line(values):
        return "| " + " | ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        ) + " |"
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                         for i, w in enumerate(widths)) + "|")
    for row in cells:
        print(line(row))


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "build-bench/results.jsonl"
    runs = load(path)
    if not runs:
        print(f"summarize: no results in {path}")
        return 1

    peers = [s for s in ("asio", "libuv", "tokio", "tokio-sem40") if any(k[0] == s for k in runs)]
    systems = ["anyio-cpp"] + peers

    print()
    print("Offload workloads (medians; runs per cell in the last column)")
    headers = ["system", "W1 ops/s", "W1 p50 us", "W1 p99 us", "W2 ops/s", "W2 peak RSS MiB",
               "W3 wall ms", "W3 lag p50 us", "W3 lag p99 us", "threads W1", "runs W1/W2/W3"]
    rows = []
    for s in systems:
        rss = median(runs, s, "W2", "max_rss_kb")
        rows.append([
            s,
            fmt(median(runs, s, "W1", "ops_per_s"), 0),
            fmt(median(runs, s, "W1", "p50_us"), 2),
            fmt(median(runs, s, "W1", "p99_us"), 2),
            fmt(median(runs, s, "W2", "ops_per_s"), 0),
            fmt(rss / 1024 if rss is not None else None, 1),
            fmt(median(runs, s, "W3", "wall_ms"), 1),
            fmt(median(runs, s, "W3", "loop_lag_p50_us"), 0),
            fmt(median(runs, s, "W3", "loop_lag_p99_us"), 0),
            fmt(median(runs, s, "W1", "threads_created"), 0),
            "/".join(str(count(runs, s, w)) for w in ("W1", "W2", "W3")),
        ])
    table(headers, rows)

    if peers:
        print()
        print("Ratios anyio-cpp / peer (of the medians; ops/s: higher is better for anyio, "
              "wall and lag: lower is better)")
        headers = ["peer", "W1 ops/s", "W2 ops/s", "W3 wall", "W3 lag p99"]
        rows = []
        for p in peers:
            rows.append([
                p,
                fmt(ratio(median(runs, "anyio-cpp", "W1", "ops_per_s"), median(runs, p, "W1", "ops_per_s")), 2),
                fmt(ratio(median(runs, "anyio-cpp", "W2", "ops_per_s"), median(runs, p, "W2", "ops_per_s")), 2),
                fmt(ratio(median(runs, "anyio-cpp", "W3", "wall_ms"), median(runs, p, "W3", "wall_ms")), 2),
                fmt(ratio(median(runs, "anyio-cpp", "W3", "loop_lag_p99_us"),
                          median(runs, p, "W3", "loop_lag_p99_us")), 2),
            ])
        table(headers, rows)

    print()
    print("anyio-cpp only")
    rows = []
    w4_sizes = sorted({n for (s, w, n) in runs if s == "anyio-cpp" and w == "W4"})
    for n in w4_sizes:
        rows.append([f"W4 N={n:,}", "bytes/waiter (RSS)",
                     fmt(median(runs, "anyio-cpp", "W4", "bytes_per_waiter", n), 1)])
        rows.append([f"W4 N={n:,}", "heap bytes/waiter",
                     fmt(median(runs, "anyio-cpp", "W4", "heap_bytes_per_waiter", n), 1)])
        rows.append([f"W4 N={n:,}", "ns per acquire+release",
                     fmt(median(runs, "anyio-cpp", "W4", "ns_per_acquire_release", n), 1)])
    rows.append(["W5", "allocs per offload", fmt(median(runs, "anyio-cpp", "W5", "allocs_per_op"), 4)])
    rows.append(["W5", "ops/s", fmt(median(runs, "anyio-cpp", "W5", "ops_per_s"), 0)])
    rows.append(["W6", "reap ms (max_idle_time 1 s)", fmt(median(runs, "anyio-cpp", "W6", "reap_ms"), 1)])
    rows.append(["W6", "threads created by the burst",
                 fmt(median(runs, "anyio-cpp", "W6", "threads_created"), 0)])
    rows.append(["call_soon_threadsafe", "ns per call",
                 fmt(median(runs, "anyio-cpp", "call_soon_threadsafe", "ns_per_call"), 1)])
    rows.append(["call_soon_threadsafe", "pushes per wake-up",
                 fmt(median(runs, "anyio-cpp", "call_soon_threadsafe", "pushes_per_wakeup"), 1)])
    table(["workload", "metric", "median"], rows)

    floors = sorted({s for (s, w, n) in runs if w == "floor"})
    if floors:
        print()
        print("Physical floors: two threads ping-pong a no-op job (medians)")
        table(["floor", "ops/s", "p50 us", "p99 us"],
              [[s, fmt(median(runs, s, "floor", "ops_per_s"), 0),
                fmt(median(runs, s, "floor", "p50_us"), 2),
                fmt(median(runs, s, "floor", "p99_us"), 2)] for s in floors])

    # Goals of BENCH.md.
    print()
    print("Goals (BENCH.md), on the medians above")
    a = lambda w, f, n=None: median(runs, "anyio-cpp", w, f, n)  # noqa: E731
    goals = []

    def goal(name, ok, detail):
        goals.append([name, "-" if ok is None else ("PASS" if ok else "FAIL"), detail])

    w1 = a("W1", "ops_per_s")
    asio_w1 = median(runs, "asio", "W1", "ops_per_s")
    goal("W1 ops/s >= 3x Asio", None if w1 is None or asio_w1 is None else w1 >= 3 * asio_w1,
         f"{fmt(ratio(w1, asio_w1), 2)}x")
    p99 = a("W1", "p99_us")
    goal("W1 p99 <= 30 us", None if p99 is None else p99 <= 30, f"{fmt(p99, 2)} us")
    w2 = a("W2", "ops_per_s")
    asio_w2 = median(runs, "asio", "W2", "ops_per_s")
    tokio_w2 = median(runs, "tokio", "W2", "ops_per_s")
    goal("W2 ops/s >= 2x Tokio spawn_blocking",
         None if w2 is None or tokio_w2 is None else w2 >= 2 * tokio_w2,
         f"{fmt(ratio(w2, tokio_w2), 2)}x ({fmt(w2, 0)} vs {fmt(tokio_w2, 0)})")
    goal("W2 ops/s >= 4x Asio", None if w2 is None or asio_w2 is None else w2 >= 4 * asio_w2,
         f"{fmt(ratio(w2, asio_w2), 2)}x")
    wall = a("W3", "wall_ms")
    goal("W3 wall <= 103 ms", None if wall is None else wall <= 103, f"{fmt(wall, 1)} ms")
    lag = a("W3", "loop_lag_p99_us")
    goal("W3 lag p99 <= 200 us", None if lag is None else lag <= 200, f"{fmt(lag, 0)} us")
    if w4_sizes:
        # At the largest N, where page granularity no longer blurs the RSS growth.
        big = max(w4_sizes)
        per_waiter = a("W4", "bytes_per_waiter", big)
        goal(f"W4 <= 400 bytes per waiter (N={big:,})",
             None if per_waiter is None else per_waiter <= 400, f"{fmt(per_waiter, 1)} B")
        lo, hi = a("W4", "ns_per_acquire_release", min(w4_sizes)), a("W4", "ns_per_acquire_release", max(w4_sizes))
        goal(f"W4 ns at {max(w4_sizes):,} <= 1.5x at {min(w4_sizes):,}",
             None if lo is None or hi is None else hi <= 1.5 * lo, f"{fmt(ratio(hi, lo), 2)}x")
    allocs = a("W5", "allocs_per_op")
    goal("W5 0 allocations per offload", None if allocs is None else allocs == 0, fmt(allocs, 4))
    reap = a("W6", "reap_ms")
    goal("W6 reaped within 1.5 s", None if reap is None else 0 <= reap <= 1500, f"{fmt(reap, 1)} ms")
    threads = a("W1", "threads_created")
    goal("W1 uses 1 worker thread", None if threads is None else threads == 1, fmt(threads, 0))
    table(["goal", "result", "value"], goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
