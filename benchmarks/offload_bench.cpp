// anyio-cpp side of the offload benchmarks of BENCH.md (W1..W6) and the physical floors.
//
//   offload_bench [W1|W2|W3|W4|W5|W6|floor|all] [--n N]
//
// Prints one JSON object per line and per workload (W4: one per N, floor: one per variant).
// Every workload runs on a fresh loop (anyio::run, 40 default tokens) that first does 1000
// sequential `co_await run_sync(noop)` warm-up round trips and nothing else as warm-up; the
// first of them also checks that fn runs on another thread. Percentiles are nearest-rank.
// max_rss_kb is the process's peak RSS so far: run one workload per process (run.sh does) to
// get the peak of that workload alone. --n overrides N of whatever runs.
//
// What p50_us / p99_us measure:
//   W1, W5  one sequential round trip;
//   W2, W3  one offload, from its task's co_await (all tasks start in the same loop turn) to
//           its resumption, so queueing for a token is included;
//   W4      the gap between one waiter getting the token and the next one getting it;
//   W6      one call of the burst;
//   floor   one ping-pong round trip.
// W4 runs each N in a fresh process (this program exec'd again with ANYIO_BENCH_W4_INLINE
// set), so its RSS growth is not hidden by memory that earlier workloads freed.
// floor: floor-wait (std::atomic::wait/notify_one, threads placed by the scheduler), the same
// with both threads pinned to one CPU and to two CPUs, floor-futex-other-cpu (a bare futex:
// libstdc++'s atomic::wait spins a little before sleeping) and floor-spin (two CPUs).
//
// Environment: ANYIO_BENCH_CONTEXT=1 sets a context variable in each workload's task first, so
// that every offload copies a non-empty context (the cost of context.hpp when it is used);
// ANYIO_DEBUG=1 turns the loop's blocked-loop detector on (100 ms), as in any program.
#include <anyio/anyio.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include "bench_common.hpp"

using namespace std::chrono_literals;
using bench::Clock;

// ---------------------------------------------------------------------------------------------
// Heap allocation counting (W5, and W4's heap bytes per waiter): every global operator new of
// this program goes through here. Counting is off unless a workload turns it on, so the rest
// of the run only pays one relaxed load of a read-mostly flag per allocation.
// ---------------------------------------------------------------------------------------------
namespace {
std::atomic<bool> g_counting{false};
std::atomic<std::uint64_t> g_allocs{0};
std::atomic<std::uint64_t> g_alloc_bytes{0};

inline void count_allocation(std::size_t size) noexcept {
    // relaxed: plain event counters, read after the measured section has been joined.
    if (g_counting.load(std::memory_order_relaxed)) {
        g_allocs.fetch_add(1, std::memory_order_relaxed);
        g_alloc_bytes.fetch_add(size, std::memory_order_relaxed);
    }
}

void* allocate(std::size_t size) {
    count_allocation(size);
    if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
    throw std::bad_alloc();
}

void* allocate_aligned(std::size_t size, std::align_val_t align) {
    count_allocation(size);
    void* p = nullptr;
    std::size_t alignment = std::max(static_cast<std::size_t>(align), sizeof(void*));
    if (::posix_memalign(&p, alignment, size == 0 ? 1 : size) == 0) return p;
    throw std::bad_alloc();
}

struct AllocCounts {
    std::uint64_t allocs;
    std::uint64_t bytes;
};

void start_counting() {
    g_allocs.store(0, std::memory_order_relaxed);
    g_alloc_bytes.store(0, std::memory_order_relaxed);
    g_counting.store(true, std::memory_order_seq_cst);
}

AllocCounts stop_counting() {
    g_counting.store(false, std::memory_order_seq_cst);
    return {g_allocs.load(std::memory_order_relaxed), g_alloc_bytes.load(std::memory_order_relaxed)};
}
}  // namespace

void* operator new(std::size_t size) { return allocate(size); }
void* operator new[](std::size_t size) { return allocate(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
    try {
        return allocate(size);
    } catch (...) {
        return nullptr;
    }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
    try {
        return allocate(size);
    } catch (...) {
        return nullptr;
    }
}
void* operator new(std::size_t size, std::align_val_t align) { return allocate_aligned(size, align); }
void* operator new[](std::size_t size, std::align_val_t align) {
    return allocate_aligned(size, align);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

constexpr std::string_view kSystem = "anyio-cpp";
using bench::kWarmUpRoundTrips;
using bench::Noop;
using bench::SleepFor;

anyio::EventLoop::Options loop_options(std::chrono::steady_clock::duration max_idle_time = 10s) {
    // Not `Options{.max_idle_time = ..., .default_thread_tokens = 40}`: with -Wextra, g++ 12
    // warns (-Wmissing-field-initializers) about the members that have no default member
    // initializer (on_thread_start, on_thread_stop, shutdown_timeout), and -Werror is on.
    anyio::EventLoop::Options options;
    options.max_idle_time = max_idle_time;
    options.default_thread_tokens = 40;
    return options;
}

anyio::ContextVar<std::string> bench_context{"bench_context"};

/// The only warm-up of every run: 1000 sequential round trips.
/// The first one also checks that fn really runs on another thread than the loop's.
/// With ANYIO_BENCH_CONTEXT set, it first sets a context variable in the calling task.
anyio::Task<> warm_up() {
    if (const char* context = std::getenv("ANYIO_BENCH_CONTEXT"); context != nullptr && *context != '\0') {
        bench_context.set("request-42");
    }
    std::thread::id worker = co_await anyio::to_thread::run_sync([] { return std::this_thread::get_id(); });
    if (worker == std::this_thread::get_id()) {
        fmt::print(stderr, "offload_bench: run_sync ran fn on the loop thread\n");
        std::exit(1);
    }
    for (int i = 1; i < kWarmUpRoundTrips; ++i) co_await anyio::to_thread::run_sync(Noop{});
}

bench::JsonLine& add_resources(bench::JsonLine& line) {
    // Which variant ran (see "Environment" at the top): a context variable set in the
    // workload's task, the detector on.
    return line.num("threads_created", anyio::to_thread::statistics().threads_created)
        .num("max_rss_kb", bench::max_rss_kb())
        .boolean("context_set", bench_context.find() != nullptr)
        .boolean("detector", anyio::EventLoop::Options{}.slow_callback_duration.has_value());
}

// One no-op offload after the other (the W1 loop): fills `latency_us` (one per call) and
// returns the wall time from the first call to the last resumption.
anyio::Task<Clock::duration> sequential_noop_offloads(std::vector<double>& latency_us) {
    auto start = Clock::now();
    auto previous = start;
    for (double& latency : latency_us) {
        co_await anyio::to_thread::run_sync(Noop{});
        auto now = Clock::now();
        latency = bench::to_us(now - previous);
        previous = now;
    }
    co_return previous - start;
}

// ---------------------------------------------------------------------------------------------
// W1: one task, N sequential round trips.
// ---------------------------------------------------------------------------------------------
anyio::Task<> w1(std::int64_t n) {
    co_await warm_up();
    std::vector<double> latency_us(static_cast<std::size_t>(n));
    auto wall = co_await sequential_noop_offloads(latency_us);
    auto line = bench::base_line(kSystem, "W1", n, static_cast<double>(n) / bench::to_s(wall),
                                 latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    add_resources(line).print();
}

// ---------------------------------------------------------------------------------------------
// W2: N tasks started at once, each offloads a no-op through the default 40-token limiter.
// Latency of one offload: from its co_await (the task's first run) to its resumption.
// ---------------------------------------------------------------------------------------------
struct W2State {
    std::vector<double> latency_us;
};

anyio::Task<> w2_child(W2State* state, std::size_t index) {
    auto t0 = Clock::now();
    co_await anyio::to_thread::run_sync(Noop{});
    state->latency_us[index] = bench::to_us(Clock::now() - t0);
}

anyio::Task<> w2(std::int64_t n) {
    co_await warm_up();
    W2State state;
    state.latency_us.resize(static_cast<std::size_t>(n));
    auto start = Clock::now();
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        for (std::int64_t i = 0; i < n; ++i) tg.start_soon(w2_child(&state, static_cast<std::size_t>(i)));
        co_return;
    });
    auto wall = Clock::now() - start;
    auto line = bench::base_line(kSystem, "W2", n, static_cast<double>(n) / bench::to_s(wall),
                                 state.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    add_resources(line).print();
}

// ---------------------------------------------------------------------------------------------
// W3: N tasks offload sleep(10 ms) through 40 tokens; a loop task meanwhile sleeps 1 ms at a
// time and records how late each wake-up is. Wall: start to the last offload's completion.
// ---------------------------------------------------------------------------------------------
struct W3State {
    std::vector<double> latency_us;
    std::vector<double> lag_us;
    std::int64_t remaining = 0;
    Clock::time_point last_done{};
};

anyio::Task<> w3_child(W3State* state, std::size_t index) {
    auto t0 = Clock::now();
    co_await anyio::to_thread::run_sync(SleepFor{10ms});
    auto t1 = Clock::now();
    state->latency_us[index] = bench::to_us(t1 - t0);
    if (--state->remaining == 0) state->last_done = t1;
}

anyio::Task<> w3_probe(W3State* state) {
    while (state->remaining > 0) {
        auto t0 = Clock::now();
        co_await anyio::sleep(1ms);
        state->lag_us.push_back(bench::to_us(Clock::now() - (t0 + 1ms)));
    }
}

anyio::Task<> w3(std::int64_t n) {
    co_await warm_up();
    W3State state;
    state.latency_us.resize(static_cast<std::size_t>(n));
    state.lag_us.reserve(100000);
    state.remaining = n;
    auto start = Clock::now();
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon(w3_probe(&state));
        for (std::int64_t i = 0; i < n; ++i) tg.start_soon(w3_child(&state, static_cast<std::size_t>(i)));
        co_return;
    });
    auto wall = state.last_done - start;
    auto line = bench::base_line(kSystem, "W3", n, static_cast<double>(n) / bench::to_s(wall),
                                 state.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    std::size_t probes = state.lag_us.size();
    line.num("loop_lag_p50_us", bench::percentile(state.lag_us, 0.50), 2)
        .num("loop_lag_p99_us", bench::percentile(state.lag_us, 0.99), 2)
        .num("loop_lag_max_us", state.lag_us.empty() ? 0.0 : state.lag_us.back(), 2)
        .num("lag_samples", probes);
    add_resources(line).print();
}

// ---------------------------------------------------------------------------------------------
// W4: N tasks all waiting on one CapacityLimiter(1) held by the main task, then released one
// by one. RSS growth (statm) and heap bytes (counted) per waiting task, measured at the moment
// all N wait; ns per acquire+release during the drain.
// ---------------------------------------------------------------------------------------------
anyio::Task<> w4_child(anyio::CapacityLimiter* limiter, Clock::time_point* acquired_at) {
    co_await limiter->acquire();
    *acquired_at = Clock::now();
    limiter->release();
}

anyio::Task<> w4(std::int64_t n) {
    co_await warm_up();
    anyio::CapacityLimiter limiter(1);
    co_await limiter.acquire();
    // Allocated and touched before the baseline, so it does not count as waiter memory.
    std::vector<Clock::time_point> acquired_at(static_cast<std::size_t>(n), Clock::time_point{});
    std::int64_t rss_before = 0;
    std::int64_t rss_waiting = 0;
    AllocCounts heap{};
    std::int64_t checkpoints = 0;
    Clock::time_point drain_start{};
    rss_before = bench::current_rss_bytes();
    start_counting();
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        for (std::int64_t i = 0; i < n; ++i) {
            tg.start_soon(w4_child(&limiter, &acquired_at[static_cast<std::size_t>(i)]));
        }
        while (limiter.statistics().tasks_waiting < static_cast<std::size_t>(n)) {
            co_await anyio::checkpoint();
            ++checkpoints;
        }
        heap = stop_counting();
        rss_waiting = bench::current_rss_bytes();
        drain_start = Clock::now();
        limiter.release();  // the main task's token: the first waiter gets it
    });
    auto drain = Clock::now() - drain_start;

    std::vector<double> handover_us;
    handover_us.reserve(static_cast<std::size_t>(n));
    auto previous = drain_start;
    for (auto t : acquired_at) {
        handover_us.push_back(bench::to_us(t - previous));
        previous = t;
    }
    double nd = static_cast<double>(n);
    auto line = bench::base_line(kSystem, "W4", n, nd / bench::to_s(drain), handover_us);
    line.num("bytes_per_waiter", static_cast<double>(rss_waiting - rss_before) / nd, 1)
        .num("heap_bytes_per_waiter", static_cast<double>(heap.bytes) / nd, 1)
        .num("heap_allocs_per_waiter", static_cast<double>(heap.allocs) / nd, 2)
        .num("ns_per_acquire_release", std::chrono::duration<double, std::nano>(drain).count() / nd, 1)
        .num("drain_ms", bench::to_ms(drain), 2)
        .num("rss_waiting_kb", rss_waiting / 1024)
        .num("checkpoints_until_all_waiting", checkpoints);
    add_resources(line).print();
}

/// Runs one W4 size in a fresh process (this program, exec'd again), so its RSS figures start
/// from a clean heap: a forked child would reuse memory the earlier workloads freed.
void run_w4_isolated(std::int64_t n) {
    constexpr const char* kInline = "ANYIO_BENCH_W4_INLINE";
    if (std::getenv(kInline) != nullptr) {  // we are that fresh process
        anyio::run(w4(n), loop_options());
        return;
    }
    std::fflush(stdout);
    std::fflush(stderr);
    pid_t pid = ::fork();
    if (pid == 0) {
        ::setenv(kInline, "1", 1);
        std::string count = std::to_string(n);
        char w4_arg[] = "W4";
        char n_flag[] = "--n";
        char* argv[] = {w4_arg, w4_arg, n_flag, count.data(), nullptr};
        ::execv("/proc/self/exe", argv);
        // No exec: measure in the forked child (RSS growth may then read low).
        int rc = 0;
        try {
            anyio::run(w4(n), loop_options());
        } catch (const std::exception& e) {
            fmt::print(stderr, "W4 (N={}) failed: {}\n", n, e.what());
            rc = 1;
        }
        std::fflush(stdout);
        std::fflush(stderr);
        ::_exit(rc);
    }
    if (pid < 0) {  // no fork: measure in this process (RSS growth may read low)
        anyio::run(w4(n), loop_options());
        return;
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        throw std::runtime_error(fmt::format("W4 (N={}) child exited abnormally (status {:#x})", n, status));
    }
}

// ---------------------------------------------------------------------------------------------
// W5: heap allocations per `co_await run_sync(noop)` in steady state (after the warm-up).
// ---------------------------------------------------------------------------------------------
anyio::Task<> w5(std::int64_t n) {
    co_await warm_up();
    std::vector<double> latency_us(static_cast<std::size_t>(n));
    auto offloads = sequential_noop_offloads(latency_us);  // its frame is allocated uncounted
    start_counting();
    auto wall = co_await std::move(offloads);
    AllocCounts counts = stop_counting();
    double nd = static_cast<double>(n);
    auto line = bench::base_line(kSystem, "W5", n, nd / bench::to_s(wall), latency_us);
    line.num("allocs_per_op", static_cast<double>(counts.allocs) / nd, 4)
        .num("alloc_bytes_per_op", static_cast<double>(counts.bytes) / nd, 2)
        .num("allocs_total", counts.allocs);
    add_resources(line).print();
}

// ---------------------------------------------------------------------------------------------
// W6: a burst of 40 concurrent 5 ms calls with max_idle_time = 1 s, then no traffic: how long
// from the end of the burst until the pool holds 0 threads (polled every 10 ms).
// ---------------------------------------------------------------------------------------------
anyio::Task<> w6_child(std::vector<double>* latency_us, std::size_t index) {
    auto t0 = Clock::now();
    co_await anyio::to_thread::run_sync(SleepFor{5ms});
    (*latency_us)[index] = bench::to_us(Clock::now() - t0);
}

anyio::Task<> w6(std::int64_t n, std::chrono::steady_clock::duration max_idle_time) {
    co_await warm_up();
    std::vector<double> latency_us(static_cast<std::size_t>(n));
    auto start = Clock::now();
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        for (std::int64_t i = 0; i < n; ++i) tg.start_soon(w6_child(&latency_us, static_cast<std::size_t>(i)));
        co_return;
    });
    auto burst_end = Clock::now();
    auto after_burst = anyio::to_thread::statistics();
    const auto give_up = max_idle_time + 30s;
    bool reaped = false;
    Clock::time_point reaped_at{};
    for (;;) {
        auto stats = anyio::to_thread::statistics();
        auto now = Clock::now();
        if (stats.workers == 0) {
            reaped = true;
            reaped_at = now;
            break;
        }
        if (now - burst_end > give_up) break;
        co_await anyio::sleep(10ms);
    }
    auto final_stats = anyio::to_thread::statistics();
    auto line = bench::base_line(kSystem, "W6", n,
                                 static_cast<double>(n) / bench::to_s(burst_end - start), latency_us);
    line.num("reap_ms", reaped ? bench::to_ms(reaped_at - burst_end) : -1.0, 1)
        .boolean("reaped", reaped)
        .num("max_idle_ms", bench::to_ms(max_idle_time), 0)
        .num("workers_after_burst", after_burst.workers)
        .num("threads_pruned", final_stats.threads_pruned)
        .num("workers_at_end", final_stats.workers);
    add_resources(line).print();
}

// ---------------------------------------------------------------------------------------------
// Physical floors: two std::threads ping-pong a no-op job N times, through
// std::atomic::wait/notify_one (both sides sleep between jobs) or by pure spinning.
// ---------------------------------------------------------------------------------------------
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

std::vector<int> allowed_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    std::vector<int> cpus;
    if (::sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
    }
    return cpus;
}

bool pin(pthread_t thread, int cpu) {
    if (cpu < 0) return true;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return ::pthread_setaffinity_np(thread, sizeof set, &set) == 0;
}

enum class Handoff { atomic_wait, futex, spin };

void futex_wait(std::atomic<std::uint32_t>* word, std::uint32_t expected) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected,
              nullptr, nullptr, 0);
}
void futex_wake(std::atomic<std::uint32_t>* word) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE_PRIVATE, 1, nullptr,
              nullptr, 0);
}

/// Waits until `word` holds `value`: spinning, std::atomic::wait (libstdc++ spins a little
/// first), or a bare futex wait (the thread really sleeps between jobs).
void await_value(std::atomic<std::uint32_t>& word, std::uint32_t value, Handoff how) noexcept {
    std::uint32_t seen;
    // acquire: pairs with the other side's release store (the job's inputs or outputs).
    while ((seen = word.load(std::memory_order_acquire)) != value) {
        switch (how) {
        case Handoff::spin: cpu_relax(); break;
        case Handoff::atomic_wait: word.wait(seen, std::memory_order_acquire); break;
        case Handoff::futex: futex_wait(&word, seen); break;
        }
    }
}

void publish(std::atomic<std::uint32_t>& word, std::uint32_t value, Handoff how) noexcept {
    word.store(value, std::memory_order_release);  // release: publishes the job / its result
    switch (how) {
    case Handoff::spin: break;
    case Handoff::atomic_wait: word.notify_one(); break;
    case Handoff::futex: futex_wake(&word); break;
    }
}

void floor_run(std::string_view system, std::int64_t n, Handoff how, int main_cpu, int worker_cpu,
               std::string_view placement) {
    cpu_set_t saved;
    ::pthread_getaffinity_np(::pthread_self(), sizeof saved, &saved);
    std::atomic<std::uint32_t> request{0};
    std::atomic<std::uint32_t> response{0};
    const auto total = static_cast<std::uint32_t>(n + kWarmUpRoundTrips);
    Noop job;

    std::thread worker([&] {
        for (std::uint32_t i = 1; i <= total; ++i) {
            await_value(request, i, how);
            job();
            publish(response, i, how);
        }
    });
    bool pinned = main_cpu >= 0 && worker_cpu >= 0 && pin(::pthread_self(), main_cpu) &&
                  pin(worker.native_handle(), worker_cpu);

    std::vector<double> latency_us(static_cast<std::size_t>(n));
    Clock::time_point start{};
    Clock::time_point previous{};
    for (std::uint32_t i = 1; i <= total; ++i) {
        if (i == static_cast<std::uint32_t>(kWarmUpRoundTrips) + 1) start = previous = Clock::now();
        publish(request, i, how);
        await_value(response, i, how);
        if (i > static_cast<std::uint32_t>(kWarmUpRoundTrips)) {
            auto now = Clock::now();
            latency_us[i - kWarmUpRoundTrips - 1] = bench::to_us(now - previous);
            previous = now;
        }
    }
    auto wall = previous - start;
    worker.join();
    ::pthread_setaffinity_np(::pthread_self(), sizeof saved, &saved);

    auto line = bench::base_line(system, "floor", n, static_cast<double>(n) / bench::to_s(wall),
                                 latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2)
        .str("cpus", placement)
        .boolean("pinned", pinned)
        .num("threads_created", 1)
        .num("max_rss_kb", bench::max_rss_kb());
    line.print();
}

void floors(std::int64_t n) {
    std::vector<int> cpus = allowed_cpus();
    // As the offload path sees it: the scheduler decides where the two threads run.
    floor_run("floor-wait", n, Handoff::atomic_wait, -1, -1, "any");
    if (!cpus.empty()) {
        floor_run("floor-wait-same-cpu", n, Handoff::atomic_wait, cpus[0], cpus[0], "same");
    }
    if (cpus.size() >= 2) {
        floor_run("floor-wait-other-cpu", n, Handoff::atomic_wait, cpus[0], cpus[1], "other");
        // std::atomic::wait spins briefly before it sleeps (libstdc++), so with a no-op job
        // it rarely sleeps: a bare futex shows what waking a sleeping thread really costs.
        floor_run("floor-futex-other-cpu", n, Handoff::futex, cpus[0], cpus[1], "other");
        floor_run("floor-spin", n, Handoff::spin, cpus[0], cpus[1], "other");
    } else {
        fmt::print(stderr, "floor-spin skipped: only one CPU is available\n");
    }
}

}  // namespace

int main(int argc, char** argv) {
    bench::Args args =
        bench::parse_args(argc, argv, {"W1", "W2", "W3", "W4", "W5", "W6", "floor"});
    auto n_or = [&](std::int64_t fallback) { return args.n.value_or(fallback); };
    try {
        if (bench::selected(args, "W1")) anyio::run(w1(n_or(20000)), loop_options());
        if (bench::selected(args, "W2")) anyio::run(w2(n_or(200000)), loop_options());
        if (bench::selected(args, "W3")) anyio::run(w3(n_or(400)), loop_options());
        if (bench::selected(args, "W4")) {
            if (args.n) {
                run_w4_isolated(*args.n);
            } else {
                for (std::int64_t n : {1000, 100000, 1000000}) run_w4_isolated(n);
            }
        }
        if (bench::selected(args, "W5")) anyio::run(w5(n_or(100000)), loop_options());
        if (bench::selected(args, "W6")) anyio::run(w6(n_or(40), 1s), loop_options(1s));
        if (bench::selected(args, "floor")) floors(n_or(20000));
    } catch (const std::exception& e) {
        fmt::print(stderr, "offload_bench: {}\n", e.what());
        return 1;
    }
    return 0;
}
