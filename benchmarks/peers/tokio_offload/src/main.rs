//! Peer: Tokio 1.24 (Debian librust-tokio-dev) for W1, W2 and W3 of BENCH.md.
//!
//! A current_thread runtime (the loop runs on the main thread) with `max_blocking_threads(40)`;
//! one offload is `tokio::task::spawn_blocking(f).await`. With `--sem40` every call first
//! takes a permit of a `tokio::sync::Semaphore` of 40 permits and holds it until the call has
//! come back (the equivalent of anyio's 40-token limiter in front of an unbounded pool).
//!
//!   tokio_offload [W1|W2|W3|all] [--n N] [--sem40]
//!
//! Each workload runs on a fresh runtime that first does 1000 sequential warm-up round trips
//! and nothing else as warm-up; the first one checks that f ran on another thread. One JSON
//! line per workload, with the fields of offload_bench (`system` "tokio" or "tokio-sem40").
//! Percentiles are nearest-rank. threads_created is the number of distinct blocking-pool
//! threads that ran a job (each marks itself in a thread-local on its first job);
//! max_rss_kb is VmHWM of /proc/self/status, as getrusage's ru_maxrss.
//!
//! What p50_us / p99_us measure (as in offload_bench):
//!   W1  one sequential round trip;
//!   W2, W3  one offload, from its task's first poll (all tasks are spawned before any runs)
//!           to its resumption, so queueing (for a permit, for a blocking thread) is included.
//! Wall for W2 and W3: from before the first spawn to the last offload's resumption.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

const WARM_UP_ROUND_TRIPS: usize = 1000;
const BLOCKING_THREADS: usize = 40;
const PERMITS: usize = 40;

// ---------------------------------------------------------------------------------------------
// Distinct blocking threads that ran a job.
// ---------------------------------------------------------------------------------------------
static THREADS_SEEN: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MARKED: Cell<bool> = Cell::new(false);
}

fn mark_thread() {
    MARKED.with(|marked| {
        if !marked.get() {
            marked.set(true);
            // Relaxed: a plain counter, read after the workload's jobs have all come back.
            THREADS_SEEN.fetch_add(1, Ordering::Relaxed);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The offload path under test.
// ---------------------------------------------------------------------------------------------
#[derive(Clone)]
struct Offload {
    semaphore: Option<Arc<Semaphore>>,
}

impl Offload {
    /// Runs `f` on the blocking pool and returns its value on the loop.
    async fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let job = move || {
            mark_thread();
            f()
        };
        match &self.semaphore {
            None => tokio::task::spawn_blocking(job).await.expect("blocking job panicked"),
            Some(semaphore) => {
                let _permit = semaphore.acquire().await.expect("semaphore closed");
                tokio::task::spawn_blocking(job).await.expect("blocking job panicked")
            }
        }
    }

    async fn warm_up(&self) {
        let loop_thread = std::thread::current().id();
        let worker = self.run(|| std::thread::current().id()).await;
        if worker == loop_thread {
            eprintln!("tokio_offload: spawn_blocking ran f on the loop thread");
            std::process::exit(1);
        }
        if std::thread::current().id() != loop_thread {
            eprintln!("tokio_offload: the task resumed on another thread than the loop's");
            std::process::exit(1);
        }
        for _ in 1..WARM_UP_ROUND_TRIPS {
            self.run(noop).await;
        }
    }
}

fn noop() {}

fn sleep_10ms() {
    std::thread::sleep(Duration::from_millis(10));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_time()
        .build()
        .expect("cannot build the Tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Measurements and output (the JSON line of bench_common.hpp's base_line).
// ---------------------------------------------------------------------------------------------
fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Nearest-rank percentile: the ceil(q*n)-th smallest sample (sorts `samples`).
fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).expect("NaN sample"));
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// Peak RSS of this process so far, in KiB (VmHWM).
fn max_rss_kb() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(-1)
}

struct JsonLine {
    body: String,
}

impl JsonLine {
    fn new(system: &str, workload: &str, n: usize, wall: Duration, latency_us: &mut [f64]) -> Self {
        let mut line = JsonLine { body: String::new() };
        line.raw("system", &format!("\"{}\"", system));
        line.raw("workload", &format!("\"{}\"", workload));
        line.raw("n", &n.to_string());
        line.num("ops_per_s", n as f64 / wall.as_secs_f64(), 1);
        let p50 = percentile(latency_us, 0.50);
        let p99 = percentile(latency_us, 0.99);
        line.num("p50_us", p50, 2);
        line.num("p99_us", p99, 2);
        line.num("wall_ms", wall.as_secs_f64() * 1e3, 2);
        line
    }

    fn raw(&mut self, key: &str, value: &str) {
        if !self.body.is_empty() {
            self.body.push(',');
        }
        self.body.push_str(&format!("\"{}\":{}", key, value));
    }

    fn num(&mut self, key: &str, value: f64, digits: usize) {
        let text = if value.is_finite() { format!("{:.*}", digits, value) } else { "null".to_string() };
        self.raw(key, &text);
    }

    fn print(mut self) {
        self.raw("threads_created", &THREADS_SEEN.load(Ordering::Relaxed).to_string());
        self.raw("max_rss_kb", &max_rss_kb().to_string());
        println!("{{{}}}", self.body);
    }
}

// ---------------------------------------------------------------------------------------------
// W1: one task, N sequential round trips.
// ---------------------------------------------------------------------------------------------
fn w1(system: &str, offload: &Offload, n: usize) {
    runtime().block_on(async {
        offload.warm_up().await;
        let mut latency_us = vec![0.0; n];
        let start = Instant::now();
        let mut previous = start;
        for latency in latency_us.iter_mut() {
            offload.run(noop).await;
            let now = Instant::now();
            *latency = us(now - previous);
            previous = now;
        }
        JsonLine::new(system, "W1", n, previous - start, &mut latency_us).print();
    });
}

// ---------------------------------------------------------------------------------------------
// W2 and W3: N tasks spawned at once, each offloads `job` once.
// ---------------------------------------------------------------------------------------------
struct Many {
    latency_us: Vec<f64>,
    wall: Duration,
}

/// Spawns the N tasks, then waits for all of them (the main future only awaits their handles).
async fn run_many(offload: &Offload, n: usize, job: fn(), remaining: Arc<AtomicI64>) -> Many {
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let offload = offload.clone();
        let remaining = remaining.clone();
        handles.push(tokio::spawn(async move {
            let t0 = Instant::now();
            offload.run(job).await;
            let t1 = Instant::now();
            // Relaxed: only read by the probe task, on this same loop thread.
            remaining.fetch_sub(1, Ordering::Relaxed);
            (us(t1 - t0), t1)
        }));
    }
    let mut latency_us = Vec::with_capacity(n);
    let mut last_done = start;
    for handle in handles {
        let (latency, done) = handle.await.expect("offloading task panicked");
        latency_us.push(latency);
        last_done = last_done.max(done);
    }
    Many { latency_us, wall: last_done - start }
}

fn w2(system: &str, offload: &Offload, n: usize) {
    runtime().block_on(async {
        offload.warm_up().await;
        let mut many = run_many(offload, n, noop, Arc::new(AtomicI64::new(n as i64))).await;
        JsonLine::new(system, "W2", n, many.wall, &mut many.latency_us).print();
    });
}

// W3: meanwhile one loop task sleeps 1 ms at a time and records how late each wake-up is.
fn w3(system: &str, offload: &Offload, n: usize) {
    runtime().block_on(async {
        offload.warm_up().await;
        let remaining = Arc::new(AtomicI64::new(n as i64));
        let probe_remaining = remaining.clone();
        // Spawned first, so it is polled (and starts its first sleep) before the offloads.
        let probe = tokio::spawn(async move {
            let mut lag_us = Vec::with_capacity(100_000);
            while probe_remaining.load(Ordering::Relaxed) > 0 {
                let t0 = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                lag_us.push(us(Instant::now() - (t0 + Duration::from_millis(1))));
            }
            lag_us
        });
        let mut many = run_many(offload, n, sleep_10ms, remaining).await;
        let mut lag_us = probe.await.expect("probe task panicked");
        let mut line = JsonLine::new(system, "W3", n, many.wall, &mut many.latency_us);
        let samples = lag_us.len();
        line.num("loop_lag_p50_us", percentile(&mut lag_us, 0.50), 2);
        line.num("loop_lag_p99_us", percentile(&mut lag_us, 0.99), 2);
        line.num("loop_lag_max_us", lag_us.last().copied().unwrap_or(0.0), 2);
        line.raw("lag_samples", &samples.to_string());
        line.print();
    });
}

// ---------------------------------------------------------------------------------------------
fn usage(program: &str, why: &str) -> ! {
    eprintln!("{}\nusage: {} [W1|W2|W3|all] [--n N] [--sem40]", why, program);
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let program = args.first().map(String::as_str).unwrap_or("tokio_offload");
    let mut workload = "all".to_string();
    let mut n: Option<usize> = None;
    let mut sem40 = false;
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].as_str();
        let parse_n = |value: Option<&String>| -> usize {
            match value.and_then(|v| v.parse::<usize>().ok()) {
                Some(v) if v > 0 => v,
                _ => usage(program, "--n needs a positive integer"),
            }
        };
        match arg {
            "--n" | "-n" => {
                i += 1;
                n = Some(parse_n(args.get(i)));
            }
            _ if arg.starts_with("--n=") => n = Some(parse_n(Some(&arg[4..].to_string()))),
            "--sem40" => sem40 = true,
            "-h" | "--help" => usage(program, ""),
            "W1" | "W2" | "W3" | "all" => workload = arg.to_string(),
            _ => usage(program, &format!("unknown argument: {}", arg)),
        }
        i += 1;
    }

    let system = if sem40 { "tokio-sem40" } else { "tokio" };
    let offload = Offload { semaphore: if sem40 { Some(Arc::new(Semaphore::new(PERMITS))) } else { None } };
    // Each workload counts its own threads (a fresh runtime has a fresh blocking pool, but
    // thread-locals of the old pool's threads are gone with them; reset the counter too).
    let selected = |w: &str| workload == "all" || workload == w;
    if selected("W1") {
        THREADS_SEEN.store(0, Ordering::Relaxed);
        w1(system, &offload, n.unwrap_or(20_000));
    }
    if selected("W2") {
        THREADS_SEEN.store(0, Ordering::Relaxed);
        w2(system, &offload, n.unwrap_or(200_000));
    }
    if selected("W3") {
        THREADS_SEEN.store(0, Ordering::Relaxed);
        w3(system, &offload, n.unwrap_or(400));
    }
}
