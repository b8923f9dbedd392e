#!/usr/bin/env python3
"""The driver behind benchmarks/http/run.sh (see its header for usage and the variables):
runs H1-H3 of BENCH.md with wrk against every available server, interleaved, and prints the
table, the ratios and the goals.

    bench_http.py run OUT.jsonl           # run (configured by environment variables)
    bench_http.py summarize OUT.jsonl     # print the tables of a results file again

Standard library only. Every (repetition, workload, server) gets a fresh server process on a
free loopback port, so no workload inherits another's backlog (FastAPI is still working off
H2's queue when wrk stops) and each server's peak RSS (VmHWM) is that of one workload.
"""
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
TOKENS = 40  # the default limiter of every server (anyio's, Starlette's, hyper's semaphore)

LABELS = {
    "anyio-cpp": "anyio-cpp",
    "anyio-cpp-loops2": "anyio-cpp --loops 2",
    "fastapi-uvloop": "FastAPI, uvicorn + uvloop + httptools",
    "fastapi-h11": "FastAPI, uvicorn + asyncio + h11",
    "hyper": "hyper 0.14 + Tokio current_thread",
}
ORDER = list(LABELS)


def env_int(name, default):
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        sys.exit(f"bench_http: {name} must be an integer (got {value!r})")
    if number < 0:
        sys.exit(f"bench_http: {name} must not be negative (got {value!r})")
    return number


def env_float(name, default):
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        sys.exit(f"bench_http: {name} must be a number (got {value!r})")


def log(message):
    print(f"bench_http: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
class Server:
    def __init__(self, name, argv, workloads=("H1", "H2", "H3")):
        self.name = name
        self.argv = argv  # function (host, port) -> argv
        self.workloads = workloads


def python_has(python, modules):
    try:
        result = subprocess.run([python, "-c", "import " + ", ".join(modules)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def available_servers():
    """The servers of SERVERS (default: all) whose programs exist, with a message for the rest."""
    wanted = os.environ.get("SERVERS", "").replace(",", " ").split() or ORDER
    unknown = [s for s in wanted if s not in LABELS]
    if unknown:
        sys.exit(f"bench_http: unknown server(s) in SERVERS: {' '.join(unknown)} "
                 f"(known: {' '.join(ORDER)})")
    servers = []
    anyio = os.environ.get("ANYIO_HTTP_SERVER", "")
    anyio_args = shlex.split(os.environ.get("ANYIO_SERVER_ARGS", ""))
    python = os.environ.get("PYTHON", "/usr/bin/python3")
    app_dir = HERE
    hyper = os.environ.get("HYPER_SERVER", "")

    def uvicorn(loop, http):
        return lambda host, port: [python, "-m", "uvicorn", "fastapi_app:app", "--app-dir", app_dir,
                                   "--host", host, "--port", str(port), "--loop", loop,
                                   "--http", http, "--no-access-log", "--log-level", "warning"]

    for name in wanted:
        if name in ("anyio-cpp", "anyio-cpp-loops2"):
            if not (anyio and os.access(anyio, os.X_OK)):
                log(f"{name}: no server binary at {anyio or '(ANYIO_HTTP_SERVER unset)'}; skipping "
                    "it (build the target http_server, see run.sh)")
                continue
            if name == "anyio-cpp":
                servers.append(Server(name, lambda host, port: [anyio, "--host", host, "--port",
                                                                str(port), *anyio_args]))
            else:  # issue 12: H1 again with two loops (SO_REUSEPORT), uvicorn --workers' analog
                servers.append(Server(name, lambda host, port: [anyio, "--host", host, "--port",
                                                                str(port), "--loops", "2",
                                                                *anyio_args], ("H1",)))
        elif name in ("fastapi-uvloop", "fastapi-h11"):
            modules = ["fastapi", "uvicorn"] + (["uvloop", "httptools"] if name == "fastapi-uvloop"
                                                else ["h11"])
            if not python_has(python, modules):
                log(f"{name}: {python} cannot import {', '.join(modules)} (apt-get install "
                    "python3-fastapi python3-uvicorn python3-uvloop python3-httptools); skipping it")
                continue
            servers.append(Server(name, uvicorn("uvloop", "httptools") if name == "fastapi-uvloop"
                                  else uvicorn("asyncio", "h11")))
        elif name == "hyper":
            if not (hyper and os.access(hyper, os.X_OK)):
                log(f"hyper: no server binary at {hyper or '(HYPER_SERVER unset)'}; skipping it")
                continue
            servers.append(Server(name, lambda host, port: [hyper, "--host", host, "--port", str(port)]))
    return servers


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5.0):
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_ready(process, port, timeout):
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it answered")
        try:
            status, body = http_get(port, "/async", timeout=2.0)
            if status == 200 and json.loads(body) == {"ok": True}:
                return
            last = f"GET /async answered {status} {body[:80]!r}"
        except (OSError, http.client.HTTPException, ValueError) as e:
            last = f"GET /async: {e}"
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer within {timeout:g} s ({last})")


def check_routes(port):
    """/sync and /stats answer as BENCH.md says; a warning (not an error) when they do not."""
    status, body = http_get(port, "/sync?ms=1")
    if status != 200:
        log(f"  warning: GET /sync?ms=1 answered {status} {body[:80]!r}")
    status, body = http_get(port, "/stats")
    try:
        stats = json.loads(body)
        missing = [k for k in ("borrowed_tokens", "total_tokens") if k not in stats]
    except ValueError:
        stats, missing = None, ["(not JSON)"]
    if status != 200 or missing:
        log(f"  warning: GET /stats answered {status} {body[:120]!r} (missing: {missing})")
    elif stats.get("total_tokens") != TOKENS:
        log(f"  warning: /stats says total_tokens={stats.get('total_tokens')}, expected {TOKENS}")


def warm_up(port, count):
    """BENCH.md's warm-up: `count` sequential round trips (GET /async on one keep-alive connection)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10.0)
    try:
        for _ in range(count):
            try:
                connection.request("GET", "/async")
                response = connection.getresponse()
                response.read()
            except (http.client.HTTPException, ConnectionError):
                connection.close()  # the server closed the connection: open a new one
                connection = http.client.HTTPConnection(HOST, port, timeout=10.0)
                continue
            if response.status != 200:
                raise RuntimeError(f"warm-up: GET /async answered {response.status}")
    finally:
        connection.close()


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def stop(process, timeout):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"  the server (pid {process.pid}) ignored SIGTERM for {timeout:g} s; killing it")
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------
def wrk_command(port, path, connections, duration):
    return [os.environ.get("WRK", "wrk"), "-t1", f"-c{connections}", f"-d{duration}s",
            "--timeout", f"{env_int('WRK_TIMEOUT', 30)}s", "--latency",
            "-s", os.path.join(HERE, "report.lua"), f"http://{HOST}:{port}{path}"]


def wrk_result(command, stdout, stderr, returncode, logfile):
    logfile.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n" + stdout + stderr + "\n")
    logfile.flush()
    if returncode != 0:
        raise RuntimeError(f"wrk exited with status {returncode}: {stderr.strip()[:200]}")
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise RuntimeError("wrk printed no WRK_JSON line (report.lua not run?)")


def run_wrk(port, path, connections, duration, logfile):
    command = wrk_command(port, path, connections, duration)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    result = wrk_result(command, done.stdout, done.stderr, done.returncode, logfile)
    return {"path": path, "connections": connections, "duration_s_asked": duration, **result}


def errors_of(result):
    keys = ("errors_connect", "errors_read", "errors_write", "errors_timeout", "non_2xx")
    return {k: result[k] for k in keys if result.get(k)}


def measure(server, workload, rep, settings, logfile):
    """One workload against a fresh server: returns the JSON record."""
    port = free_port()
    argv = server.argv(HOST, port)
    logfile.write(f"\n=== {server.name} {workload} rep {rep}: {' '.join(map(shlex.quote, argv))}\n")
    logfile.flush()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                               start_new_session=True)
    record = {"system": server.name, "workload": workload, "rep": rep}
    try:
        wait_ready(process, port, settings["ready_timeout"])
        check_routes(port)
        if settings["warmup"]:
            warm_up(port, settings["warmup"])
        sync_path = f"/sync?ms={settings['sync_ms']}"
        if workload == "H1":
            record.update(run_wrk(port, "/async", settings["h1_c"], settings["h1_d"], logfile))
        elif workload == "H2":
            record.update(run_wrk(port, sync_path, settings["h2_c"], settings["h2_d"], logfile))
            record["sync_ms"] = settings["sync_ms"]
        else:  # H3: H2's load in the background; after a delay, /async in the foreground
            bg_command = wrk_command(port, sync_path, settings["h2_c"], settings["h3_bg_d"])
            background = subprocess.Popen(bg_command, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(settings["h3_delay"])
                record["async"] = run_wrk(port, "/async", settings["h3_c"], settings["h3_d"], logfile)
                out, err = background.communicate(timeout=settings["h3_bg_d"] + 120)
            finally:
                if background.poll() is None:
                    background.kill()
                    background.wait()
            record["bg"] = {"path": sync_path, "connections": settings["h2_c"],
                            "duration_s_asked": settings["h3_bg_d"],
                            **wrk_result(bg_command, out, err, background.returncode, logfile)}
            record["sync_ms"] = settings["sync_ms"]
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} during the run")
        record["server_rss_kb"] = proc_status(process.pid, "VmHWM")
        record["server_threads"] = proc_status(process.pid, "Threads")
    finally:
        stop(process, settings["stop_timeout"])
    return record


def run(out_path):
    settings = {
        "repeat": max(1, env_int("REPEAT", 1)),
        "h1_c": env_int("H1_CONNECTIONS", 64), "h1_d": env_int("H1_DURATION", 5),
        "h2_c": env_int("H2_CONNECTIONS", 200), "h2_d": env_int("H2_DURATION", 5),
        "h3_c": env_int("H3_CONNECTIONS", 8), "h3_d": env_int("H3_DURATION", 5),
        "h3_bg_d": env_int("H3_BG_DURATION", 8), "h3_delay": env_float("H3_DELAY", 1.5),
        "sync_ms": env_int("SYNC_MS", 10), "warmup": env_int("WARMUP_REQUESTS", 1000),
        "ready_timeout": env_float("READY_TIMEOUT", 30), "stop_timeout": env_float("STOP_TIMEOUT", 10),
    }
    if settings["h3_bg_d"] < settings["h3_delay"] + settings["h3_d"]:
        sys.exit("bench_http: H3_BG_DURATION must cover H3_DELAY + H3_DURATION")
    if settings["sync_ms"] < 1:
        sys.exit("bench_http: SYNC_MS must be at least 1")
    workloads = os.environ.get("WORKLOADS", "H1 H2 H3").replace(",", " ").split()
    if any(w not in ("H1", "H2", "H3") for w in workloads):
        sys.exit(f"bench_http: WORKLOADS may hold H1 H2 H3 (got {' '.join(workloads)})")
    servers = available_servers()
    if not servers:
        sys.exit("bench_http: no server to measure")

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    log_path = os.path.splitext(out_path)[0] + ".log"
    failures = 0
    with open(out_path, "w") as out, open(log_path, "w") as logfile:
        def emit(record):
            line = json.dumps(record, separators=(",", ":"))
            out.write(line + "\n")
            out.flush()
            print(line, flush=True)

        emit({"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(),
                       "loadavg": loadavg(),
                       "servers": [s.name for s in servers], "workloads": workloads,
                       "tokens": TOKENS, **settings}})
        log(f"servers: {' '.join(s.name for s in servers)}; workloads: {' '.join(workloads)}; "
            f"REPEAT={settings['repeat']}; server output and wrk reports in {log_path}")
        for rep in range(1, settings["repeat"] + 1):
            # Rotate the order each repetition, so no server always runs right after another.
            shift = (rep - 1) % len(servers)
            order = servers[shift:] + servers[:shift]
            for workload in workloads:
                for server in order:
                    if workload not in server.workloads:
                        continue
                    log(f"rep {rep}: {workload} {server.name}")
                    try:
                        record = measure(server, workload, rep, settings, logfile)
                    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError,
                            http.client.HTTPException) as e:
                        log(f"  FAILED: {server.name} {workload}: {e}")
                        record = {"system": server.name, "workload": workload, "rep": rep,
                                  "error": str(e)}
                        failures += 1
                    for part in ([record] if "async" not in record else [record["async"], record["bg"]]):
                        if errors_of(part):
                            log(f"  warning: wrk saw errors: {errors_of(part)}")
                    emit(record)
        emit({"meta_end": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "loadavg": loadavg()}})
    summarize(out_path)
    if failures:
        log(f"{failures} run(s) failed (see above and {log_path})")
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def load(path):
    records, meta = [], {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                log(f"{path}:{number}: not JSON ({e}); skipped")
                continue
            if "meta" in record:
                meta = record["meta"]
            elif "system" in record and "error" not in record:
                records.append(record)
    return records, meta


def median(records, system, workload, *keys):
    values = []
    for r in records:
        if r["system"] != system or r["workload"] != workload:
            continue
        value = r
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(value)
    return statistics.median(values) if values else None


def count(records, system, workload):
    return sum(1 for r in records if r["system"] == system and r["workload"] == workload)


def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def pair(a, b, digits=2):
    return "-" if a is None and b is None else f"{fmt(a, digits)} / {fmt(b, digits)}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def times(value):
    return "-" if value is None else f"{value:,.2f}x"


def percent_of(value, bound):
    return "-" if value is None else f"{value:,.0f} ({100 * value / bound:.1f} %)"


def table(headers, rows):
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                         for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(line(row))


def peak_rss_mib(records, system):
    """The server's peak RSS: the largest of its per-workload medians of VmHWM."""
    values = [median(records, system, w, "server_rss_kb") for w in ("H1", "H2", "H3")]
    values = [v for v in values if v is not None]
    return max(values) / 1024 if values else None


def summarize(path):
    records, meta = load(path)
    if not records:
        print(f"bench_http: no results in {path}")
        return 1
    systems = [s for s in ORDER if any(r["system"] == s for r in records)]
    subject = os.environ.get("SUBJECT", "anyio-cpp")
    sync_ms = meta.get("sync_ms", 10)
    h2_c = meta.get("h2_c", 200)
    bound = TOKENS * 1000 / sync_ms
    ideal_ms = h2_c / TOKENS * sync_ms

    def m(system, workload, *keys):
        return median(records, system, workload, *keys)

    print()
    print(f"HTTP workloads of BENCH.md (medians of {meta.get('repeat', '?')} run(s); "
          f"{meta.get('date', '?')}, {meta.get('cpus', '?')} CPUs, load average at start "
          f"{' '.join(meta.get('loadavg', []))}; H1 -c{meta.get('h1_c', '?')} -d{meta.get('h1_d', '?')}s, "
          f"H2 -c{h2_c} -d{meta.get('h2_d', '?')}s /sync?ms={sync_ms}, H3 -c{meta.get('h3_c', '?')} "
          f"-d{meta.get('h3_d', '?')}s under {meta.get('h3_bg_d', '?')} s of H2)")
    headers = ["system", "H1 req/s", "H1 p50 / p99 ms", "H2 req/s", "H2 p50 / p99 ms",
               "H3 /async req/s", "H3 /async p50 / p99 ms", "H3 bg /sync req/s", "RSS MiB",
               "runs H1/H2/H3"]
    rows = []
    for s in systems:
        rows.append([
            LABELS[s],
            fmt(m(s, "H1", "req_per_s")),
            pair(m(s, "H1", "p50_ms"), m(s, "H1", "p99_ms")),
            fmt(m(s, "H2", "req_per_s")),
            pair(m(s, "H2", "p50_ms"), m(s, "H2", "p99_ms"), 1),
            fmt(m(s, "H3", "async", "req_per_s")),
            pair(m(s, "H3", "async", "p50_ms"), m(s, "H3", "async", "p99_ms")),
            fmt(m(s, "H3", "bg", "req_per_s")),
            fmt(peak_rss_mib(records, s), 1),
            "/".join(str(count(records, s, w)) for w in ("H1", "H2", "H3")),
        ])
    table(headers, rows)

    peers = [s for s in systems if not s.startswith("anyio-cpp") and s != subject]
    if subject in systems and peers:
        print()
        print(f"Ratios {LABELS[subject]} / peer (req/s: higher is better for {subject}; "
              "latency: lower is better; RSS: difference in MiB)")
        headers = ["peer", "H1 req/s", "H1 --loops 2 req/s", "H1 p99", "H2 req/s", "H2 p99",
                   "H3 /async req/s", "H3 /async p99", "H3 bg req/s", "RSS MiB diff"]
        rows = []
        for p in peers:
            rss_s, rss_p = peak_rss_mib(records, subject), peak_rss_mib(records, p)
            rows.append([
                LABELS[p],
                fmt(ratio(m(subject, "H1", "req_per_s"), m(p, "H1", "req_per_s")), 2),
                fmt(ratio(m("anyio-cpp-loops2", "H1", "req_per_s"), m(p, "H1", "req_per_s")), 2),
                fmt(ratio(m(subject, "H1", "p99_ms"), m(p, "H1", "p99_ms")), 2),
                fmt(ratio(m(subject, "H2", "req_per_s"), m(p, "H2", "req_per_s")), 2),
                fmt(ratio(m(subject, "H2", "p99_ms"), m(p, "H2", "p99_ms")), 2),
                fmt(ratio(m(subject, "H3", "async", "req_per_s"), m(p, "H3", "async", "req_per_s")), 2),
                fmt(ratio(m(subject, "H3", "async", "p99_ms"), m(p, "H3", "async", "p99_ms")), 2),
                fmt(ratio(m(subject, "H3", "bg", "req_per_s"), m(p, "H3", "bg", "req_per_s")), 2),
                "-" if rss_s is None or rss_p is None else f"{rss_s - rss_p:+.1f}",
            ])
        table(headers, rows)

    print()
    print(f"Goals (BENCH.md) for {LABELS.get(subject, subject)}, on the medians above "
          f"(bound {fmt(bound)} req/s = {TOKENS} tokens / {sync_ms} ms; ideal H2 wait "
          f"{ideal_ms:g} ms = {h2_c} / {TOKENS} x {sync_ms} ms)")
    goals = []

    def goal(name, ok, value):
        goals.append([name, "-" if ok is None else ("PASS" if ok else "FAIL"), value])

    def at_least(a, b, factor=1.0):
        return None if a is None or b is None else a >= factor * b

    h1 = m(subject, "H1", "req_per_s")
    hyper_h1 = m("hyper", "H1", "req_per_s")
    fastapi_h1 = m("fastapi-uvloop", "H1", "req_per_s")
    goal("H1 req/s >= 1.2x hyper", at_least(h1, hyper_h1, 1.2), times(ratio(h1, hyper_h1)))
    goal("H1 req/s >= 6x FastAPI (uvloop)", at_least(h1, fastapi_h1, 6),
         times(ratio(h1, fastapi_h1)))
    h2 = m(subject, "H2", "req_per_s")
    goal(f"H2 req/s >= 98 % of the bound ({fmt(0.98 * bound)})", at_least(h2, 0.98 * bound),
         percent_of(h2, bound))
    h2_p99 = m(subject, "H2", "p99_ms")
    goal(f"H2 p99 <= 1.2x the ideal wait ({1.2 * ideal_ms:g} ms)",
         None if h2_p99 is None else h2_p99 <= 1.2 * ideal_ms, f"{fmt(h2_p99, 1)} ms")
    h3 = m(subject, "H3", "async", "req_per_s")
    hyper_h3 = m("hyper", "H3", "async", "req_per_s")
    goal("H3 /async req/s >= hyper's", at_least(h3, hyper_h3), times(ratio(h3, hyper_h3)))
    h3_p99 = m(subject, "H3", "async", "p99_ms")
    goal("H3 /async p99 <= 0.5 ms", None if h3_p99 is None else h3_p99 <= 0.5, f"{fmt(h3_p99, 3)} ms")
    bg = m(subject, "H3", "bg", "req_per_s")
    goal(f"H3 bg /sync req/s >= 98 % of the bound ({fmt(0.98 * bound)})", at_least(bg, 0.98 * bound),
         percent_of(bg, bound))
    rss, hyper_rss = peak_rss_mib(records, subject), peak_rss_mib(records, "hyper")
    goal("RSS <= hyper's + 4 MiB",
         None if rss is None or hyper_rss is None else rss <= hyper_rss + 4,
         f"{fmt(rss, 1)} vs {fmt(hyper_rss, 1)} MiB")
    table(["goal", "result", "value"], goals)
    if subject not in systems:
        print(f"({subject} was not measured: no goal evaluated. SUBJECT=hyper checks the harness.)")

    failed = [(r["system"], r["workload"], r["rep"]) for r in load_errors(path)]
    if failed:
        print()
        print("Runs that failed: " + ", ".join(f"{s} {w} (rep {n})" for s, w, n in failed))
    return 0


def load_errors(path):
    errors = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "error" in record:
                errors.append(record)
    return errors


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("run", "summarize"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "run":
        return run(sys.argv[2])
    return summarize(sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())
