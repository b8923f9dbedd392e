// Cost of EventLoop::call_soon_threadsafe from another thread: a plain std::thread posts N
// small callbacks while the loop runs them; the main task waits on an anyio::Event that the
// last callback sets.
//
//   call_soon_threadsafe_bench [--n N]     (default N = 1,000,000)
//
// ns_per_call: producer wall / N (each post allocates one node; the loop frees it).
// wakeups: wake-ups the producer actually sent to a parked loop (LoopShared::wakeups_sent,
// read on the loop at the end); pushes_per_wakeup = N / wakeups.
#include <anyio/anyio.hpp>

#include <chrono>
#include <cstdint>
#include <thread>

#include <fmt/core.h>

#include "bench_common.hpp"

using bench::Clock;

namespace {

using bench::Noop;

anyio::Task<> bench_call_soon_threadsafe(std::int64_t n) {
    // The same warm-up as every other run: 1000 sequential offload round trips.
    for (int i = 0; i < bench::kWarmUpRoundTrips; ++i) co_await anyio::to_thread::run_sync(Noop{});

    anyio::EventLoop* loop = anyio::EventLoop::current();
    anyio::Event done;
    std::int64_t ran = 0;  // loop thread only
    Clock::time_point last_ran{};
    std::uint64_t wakeups_before = loop->shared().wakeups_sent();

    Clock::time_point producer_start{};
    Clock::time_point producer_end{};
    std::thread producer([&] {
        producer_start = Clock::now();
        for (std::int64_t i = 0; i < n; ++i) {
            loop->call_soon_threadsafe([&ran, &done, &last_ran, i, n] {
                ++ran;
                if (i == n - 1) {
                    last_ran = Clock::now();
                    done.set();
                }
            });
        }
        producer_end = Clock::now();
    });
    co_await done.wait();
    std::uint64_t wakeups = loop->shared().wakeups_sent() - wakeups_before;
    producer.join();  // it has finished posting: the last callback has run

    double nd = static_cast<double>(n);
    auto producer_wall = producer_end - producer_start;
    bench::JsonLine line;
    line.str("system", "anyio-cpp")
        .str("workload", "call_soon_threadsafe")
        .num("n", n)
        .num("ns_per_call", std::chrono::duration<double, std::nano>(producer_wall).count() / nd, 1)
        .num("ops_per_s", nd / bench::to_s(producer_wall), 1)
        .num("wakeups", wakeups)
        .num("pushes_per_wakeup", wakeups == 0 ? nd : nd / static_cast<double>(wakeups), 1)
        .num("loop_ns_per_call",
             std::chrono::duration<double, std::nano>(last_ran - producer_start).count() / nd, 1)
        .num("callbacks_run", ran)
        .num("max_rss_kb", bench::max_rss_kb());
    line.print();
}

}  // namespace

int main(int argc, char** argv) {
    bench::Args args = bench::parse_args(argc, argv, {"call_soon_threadsafe"});
    try {
        anyio::run(bench_call_soon_threadsafe(args.n.value_or(1000000)));
    } catch (const std::exception& e) {
        fmt::print(stderr, "call_soon_threadsafe_bench: {}\n", e.what());
        return 1;
    }
    return 0;
}
