// Peer: standalone Asio (Debian libasio-dev, 1.22 = Boost.Asio 1.79) for W1, W2 and W3 of
// BENCH.md. An io_context runs on the main thread, blocking work goes to asio::thread_pool(40).
// One offload, from an awaitable coroutine running on the io_context:
//
//     co_await asio::post(pool, asio::bind_executor(pool, asio::use_awaitable));  // now on a pool thread
//     fn();
//     co_await asio::post(io, asio::use_awaitable);                               // back on the io thread
//
// The first warm-up round trip checks that fn really ran on a pool thread (and that the
// coroutine came back to the main thread).
//
//   asio_offload [W1|W2|W3|all] [--n N]
// Asio 1.22 enables its coroutine support only for compilers it recognises; clang++ with
// libstdc++ has C++20 coroutines too, so say so (g++ is detected on its own).
#if defined(__clang__) && defined(__cpp_impl_coroutine) && !defined(ASIO_HAS_CO_AWAIT)
#define ASIO_HAS_CO_AWAIT 1
#define ASIO_HAS_STD_COROUTINE 1
#endif
#include <asio.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "../bench_common.hpp"

using namespace std::chrono_literals;
using bench::Clock;

namespace {

constexpr std::string_view kSystem = "asio";
constexpr int kPoolThreads = 40;
using bench::kWarmUpRoundTrips;
using bench::Noop;
using bench::SleepFor;

/// The io_context on the main thread and the pool of 40 threads, fresh for each workload.
struct Env {
    asio::io_context io{1};
    asio::thread_pool pool{kPoolThreads};
    std::thread::id loop_thread = std::this_thread::get_id();

    ~Env() {
        pool.join();
    }

    /// Runs fn on a pool thread and resumes the calling coroutine on the io thread.
    template <class F>
    asio::awaitable<void> offload(F fn) {
        co_await asio::post(pool, asio::bind_executor(pool, asio::use_awaitable));
        fn();
        co_await asio::post(io, asio::use_awaitable);
    }

    asio::awaitable<void> warm_up() {
        bool on_pool = false;
        std::thread::id where{};
        co_await offload([&] {
            where = std::this_thread::get_id();
            on_pool = pool.get_executor().running_in_this_thread();
        });
        if (!on_pool || where == loop_thread || std::this_thread::get_id() != loop_thread) {
            fmt::print(stderr, "asio_offload: the offload hop is broken: fn ran on the {} thread, "
                               "the coroutine resumed on the {} thread\n",
                       on_pool && where != loop_thread ? "pool" : "loop (or a non-pool)",
                       std::this_thread::get_id() == loop_thread ? "loop" : "wrong");
            std::exit(1);
        }
        for (int i = 1; i < kWarmUpRoundTrips; ++i) co_await offload(Noop{});
    }

    /// co_spawns `coroutine` on the io_context and runs it (and everything it started) to the
    /// end; rethrows what escaped it.
    void run(asio::awaitable<void> coroutine) {
        std::exception_ptr error;
        // Keeps io.run() going while the coroutine sits on the pool.
        std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
        guard.emplace(io.get_executor());
        asio::co_spawn(io, std::move(coroutine), [&](std::exception_ptr e) {
            if (e && !error) error = e;
            guard.reset();
        });
        io.run();
        io.restart();
        if (error) std::rethrow_exception(error);
    }
};

void add_resources(bench::JsonLine& line) {
    // The pool starts all its threads up front; count what the process really has.
    line.num("threads_created", bench::thread_count() - 1).num("max_rss_kb", bench::max_rss_kb());
}

// ---------------------------------------------------------------------------------------------
void w1(std::int64_t n) {
    Env env;
    env.run(env.warm_up());
    env.run([](Env& env, std::int64_t n) -> asio::awaitable<void> {
        std::vector<double> latency_us(static_cast<std::size_t>(n));
        auto start = Clock::now();
        auto previous = start;
        for (std::int64_t i = 0; i < n; ++i) {
            co_await env.offload(Noop{});
            auto now = Clock::now();
            latency_us[static_cast<std::size_t>(i)] = bench::to_us(now - previous);
            previous = now;
        }
        auto wall = previous - start;
        auto line = bench::base_line(kSystem, "W1", n, static_cast<double>(n) / bench::to_s(wall),
                                     latency_us);
        line.num("wall_ms", bench::to_ms(wall), 2);
        add_resources(line);
        line.print();
    }(env, n));
}

// ---------------------------------------------------------------------------------------------
struct ManyState {
    std::vector<double> latency_us;
    std::int64_t remaining = 0;
    Clock::time_point last_done{};
    std::vector<double> lag_us;
    // Keeps io.run() going while every call sits on the pool; dropped by the last one.
    std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
};

template <class F>
asio::awaitable<void> offload_once(Env& env, ManyState& state, std::size_t index, F fn) {
    auto t0 = Clock::now();
    co_await env.offload(fn);
    auto t1 = Clock::now();
    state.latency_us[index] = bench::to_us(t1 - t0);
    if (--state.remaining == 0) {
        state.last_done = t1;
        state.guard.reset();
    }
}

template <class F>
Clock::duration run_many(Env& env, ManyState& state, std::int64_t n, F fn, bool probe) {
    state.latency_us.resize(static_cast<std::size_t>(n));
    state.remaining = n;
    state.guard.emplace(env.io.get_executor());
    auto start = Clock::now();
    if (probe) {
        // W3's lag probe: a steady_timer loop on the io_context, 1 ms at a time.
        asio::co_spawn(env.io, [](Env& env, ManyState& state) -> asio::awaitable<void> {
            asio::steady_timer timer(env.io);
            while (state.remaining > 0) {
                auto t0 = Clock::now();
                timer.expires_at(t0 + 1ms);
                co_await timer.async_wait(asio::use_awaitable);
                state.lag_us.push_back(bench::to_us(Clock::now() - (t0 + 1ms)));
            }
        }(env, state), asio::detached);
    }
    for (std::int64_t i = 0; i < n; ++i) {
        asio::co_spawn(env.io, offload_once(env, state, static_cast<std::size_t>(i), fn),
                       asio::detached);
    }
    env.io.run();
    env.io.restart();
    if (state.remaining != 0) {
        fmt::print(stderr, "asio_offload: io_context ran out of work with {} calls pending\n",
                   state.remaining);
        std::exit(1);
    }
    return state.last_done - start;
}

void w2(std::int64_t n) {
    Env env;
    env.run(env.warm_up());
    ManyState state;
    auto wall = run_many(env, state, n, Noop{}, false);
    auto line = bench::base_line(kSystem, "W2", n, static_cast<double>(n) / bench::to_s(wall),
                                 state.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    add_resources(line);
    line.print();
}

void w3(std::int64_t n) {
    Env env;
    env.run(env.warm_up());
    ManyState state;
    state.lag_us.reserve(100000);
    auto wall = run_many(env, state, n, SleepFor{10ms}, true);
    auto line = bench::base_line(kSystem, "W3", n, static_cast<double>(n) / bench::to_s(wall),
                                 state.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    std::size_t samples = state.lag_us.size();
    line.num("loop_lag_p50_us", bench::percentile(state.lag_us, 0.50), 2)
        .num("loop_lag_p99_us", bench::percentile(state.lag_us, 0.99), 2)
        .num("loop_lag_max_us", state.lag_us.empty() ? 0.0 : state.lag_us.back(), 2)
        .num("lag_samples", samples);
    add_resources(line);
    line.print();
}

}  // namespace

int main(int argc, char** argv) {
    bench::Args args = bench::parse_args(argc, argv, {"W1", "W2", "W3"});
    try {
        if (bench::selected(args, "W1")) w1(args.n.value_or(20000));
        if (bench::selected(args, "W2")) w2(args.n.value_or(200000));
        if (bench::selected(args, "W3")) w3(args.n.value_or(400));
    } catch (const std::exception& e) {
        fmt::print(stderr, "asio_offload: {}\n", e.what());
        return 1;
    }
    return 0;
}
