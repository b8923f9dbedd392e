// Peer: standalone Asio (Debian libasio-dev, 1.22 = Boost.Asio 1.79) for the workloads of
// sync_bench.cpp, on one io_context run by the main thread:
//
// - stream_buffer_0 / stream_buffer_64: items per second through an
//   asio::experimental::channel<void(asio::error_code, std::int64_t)> of that capacity
//   between two awaitable coroutines (async_send / async_receive with use_awaitable);
// - lock_handoff_2 / lock_handoff_100: Asio has no asynchronous mutex, so the lock is the
//   usual channel idiom: a channel of capacity 1 holding one token; acquire is
//   `co_await async_receive`, release is `try_send` (which hands the token straight to the
//   oldest waiting receiver, like a FIFO hand-off). The token is an int: in Asio 1.22 the
//   plain signature void(asio::error_code) does not compile (its channel_traits
//   specialisations are ambiguous).
//
//   asio_channel [stream_buffer_0|stream_buffer_64|lock_handoff_2|lock_handoff_100|all] [--n N]
//
// The JSON lines and their timing are exactly sync_bench.cpp's (GapSampler is the same).
//
// Asio 1.22 enables its coroutine support only for compilers it recognises; clang++ with
// libstdc++ has C++20 coroutines too, so say so (g++ is detected on its own). The channel
// headers need nothing more (they are header-only, like the rest of Asio).
#if defined(__clang__) && defined(__cpp_impl_coroutine) && !defined(ASIO_HAS_CO_AWAIT)
#define ASIO_HAS_CO_AWAIT 1
#define ASIO_HAS_STD_COROUTINE 1
#endif
#include <asio.hpp>
#include <asio/experimental/channel.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "../bench_common.hpp"

namespace {

constexpr std::string_view kSystem = "asio";
using bench::Clock;
using bench::kWarmUpRoundTrips;

using ItemChannel = asio::experimental::channel<void(asio::error_code, std::int64_t)>;
using TokenChannel = asio::experimental::channel<void(asio::error_code, int)>;

/// Times `warm-up + n` events (items received, lock acquisitions), indexed from 0: the wall
/// time of the last n, and the gap before every 16th of them. Two clock reads per 16 events,
/// so reading the clock (tens of ns on these VMs) does not dominate what is measured.
struct GapSampler {
    static constexpr std::int64_t kEvery = 16;
    explicit GapSampler(std::int64_t n) : n_(n) {
        gaps_us.reserve(static_cast<std::size_t>(n / kEvery + 1));
    }
    void tick(std::int64_t index) {
        const std::int64_t k = index - kWarmUpRoundTrips;  // index among the measured events
        const bool sampled = k == -1 || k == n_ - 1 ||
                             (k >= 0 && k % kEvery >= kEvery - 2);  // events 14 and 15 of 16
        if (!sampled) return;
        const Clock::time_point now = Clock::now();
        if (k == -1) start_ = now;
        if (k == n_ - 1) end_ = now;
        if (k >= 0 && k % kEvery == kEvery - 1) gaps_us.push_back(bench::to_us(now - previous_));
        previous_ = now;
    }
    [[nodiscard]] Clock::duration wall() const { return end_ - start_; }

    std::vector<double> gaps_us;

private:
    std::int64_t n_;
    Clock::time_point start_{};
    Clock::time_point end_{};
    Clock::time_point previous_{};
};

void print_line(std::string_view workload, std::int64_t n, GapSampler& sampler) {
    const Clock::duration wall = sampler.wall();
    auto line = bench::base_line(kSystem, workload, n, static_cast<double>(n) / bench::to_s(wall),
                                 sampler.gaps_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    line.num("threads_created", 0).num("max_rss_kb", bench::max_rss_kb());
    line.print();
}

/// Runs the io_context until every coroutine has finished; exits on an escaped exception.
void run(asio::io_context& io) {
    io.run();
    io.restart();
}

void on_done(std::exception_ptr error) {
    if (error) {
        try {
            std::rethrow_exception(error);
        } catch (const std::exception& e) {
            fmt::print(stderr, "asio_channel: a coroutine failed: {}\n", e.what());
        }
        std::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
void stream_workload(std::string_view workload, std::size_t buffer, std::int64_t n) {
    asio::io_context io{1};
    ItemChannel channel(io, buffer);
    const std::int64_t total = kWarmUpRoundTrips + n;
    GapSampler sampler(n);
    std::int64_t errors = 0;
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
            for (std::int64_t i = 0; i < total; ++i) {
                co_await channel.async_send(asio::error_code{}, i, asio::use_awaitable);
            }
        },
        on_done);
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
            for (std::int64_t i = 0; i < total; ++i) {
                std::int64_t item = co_await channel.async_receive(asio::use_awaitable);
                if (item != i) ++errors;
                sampler.tick(i);
            }
        },
        on_done);
    run(io);
    if (errors != 0) {
        fmt::print(stderr, "asio_channel: {} items arrived out of order\n", errors);
        std::exit(1);
    }
    print_line(workload, n, sampler);
}

// ---------------------------------------------------------------------------------------------
void lock_workload(std::string_view workload, int tasks, std::int64_t n) {
    asio::io_context io{1};
    TokenChannel lock(io, 1);
    if (!lock.try_send(asio::error_code{}, 0)) {  // the one token: the lock starts free
        fmt::print(stderr, "asio_channel: could not put the token in\n");
        std::exit(1);
    }
    const std::int64_t total = kWarmUpRoundTrips + n;
    std::int64_t acquisitions = 0;
    GapSampler sampler(n);
    for (int t = 0; t < tasks; ++t) {
        asio::co_spawn(
            io,
            [&]() -> asio::awaitable<void> {
                while (true) {
                    co_await lock.async_receive(asio::use_awaitable);  // acquire
                    if (acquisitions == total) {
                        lock.try_send(asio::error_code{}, 0);
                        co_return;
                    }
                    sampler.tick(acquisitions);
                    ++acquisitions;
                    lock.try_send(asio::error_code{}, 0);  // release
                }
            },
            on_done);
    }
    run(io);
    print_line(workload, n, sampler);
}

}  // namespace

int main(int argc, char** argv) {
    const std::vector<std::string> workloads = {"stream_buffer_0", "stream_buffer_64",
                                                "lock_handoff_2", "lock_handoff_100"};
    bench::Args args = bench::parse_args(argc, argv, workloads);
    const std::int64_t n = args.n.value_or(1'000'000);
    if (bench::selected(args, "stream_buffer_0")) stream_workload("stream_buffer_0", 0, n);
    if (bench::selected(args, "stream_buffer_64")) stream_workload("stream_buffer_64", 64, n);
    if (bench::selected(args, "lock_handoff_2")) lock_workload("lock_handoff_2", 2, n);
    if (bench::selected(args, "lock_handoff_100")) lock_workload("lock_handoff_100", 100, n);
}
