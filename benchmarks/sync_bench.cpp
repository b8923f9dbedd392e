// Task-to-task coordination on one loop: items per second through a memory object stream
// between two tasks (buffer 0 and 64), and Lock hand-offs per second among 2 and 100 tasks.
// The Asio peer of the same workloads is peers/asio_channel.cpp.
//
//   sync_bench [stream_buffer_0|stream_buffer_64|lock_handoff_2|lock_handoff_100|all] [--n N]
//
// One JSON line per workload: ops_per_s is items (or lock acquisitions) per second of wall
// time; p50_us/p99_us are nearest-rank percentiles of the time between two consecutive items
// at the receiver (two consecutive acquisitions for the lock), sampled every 16th item so
// the clock reads do not dominate. Each run first moves 1000 items (or acquisitions) as
// warm-up.
#include <anyio/anyio.hpp>
#include <anyio/memory_stream.hpp>
#include <anyio/sync.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr std::string_view kSystem = "anyio-cpp";
using bench::Clock;
using bench::kWarmUpRoundTrips;

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

// ---------------------------------------------------------------------------------------------
// A producer task sends `warm + n` ints; a consumer task receives them and times the last n.
anyio::Task<> stream_workload(std::string_view workload, std::size_t buffer, std::int64_t n) {
    auto streams = anyio::create_memory_object_stream<std::int64_t>(buffer);
    auto& tx = streams.first;
    auto& rx = streams.second;
    const std::int64_t total = kWarmUpRoundTrips + n;
    GapSampler sampler(n);
    std::int64_t errors = 0;
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon([&]() -> anyio::Task<> {
            for (std::int64_t i = 0; i < total; ++i) co_await tx.send(std::int64_t{i});
            tx.close();
        });
        tg.start_soon([&]() -> anyio::Task<> {
            for (std::int64_t i = 0; i < total; ++i) {
                std::int64_t item = co_await rx.receive();
                if (item != i) ++errors;
                sampler.tick(i);
            }
        });
        co_return;
    });
    if (errors != 0) {
        fmt::print(stderr, "sync_bench: {} items arrived out of order\n", errors);
        std::exit(1);
    }
    print_line(workload, n, sampler);
}

// ---------------------------------------------------------------------------------------------
// `tasks` tasks loop `acquire(); release();` until `warm + n` acquisitions were made in all.
// With FIFO hand-off every acquisition after the first is a hand-off from the releaser.
anyio::Task<> lock_workload(std::string_view workload, int tasks, std::int64_t n) {
    anyio::Lock lock;
    const std::int64_t total = kWarmUpRoundTrips + n;
    std::int64_t acquisitions = 0;
    GapSampler sampler(n);
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        for (int t = 0; t < tasks; ++t) {
            tg.start_soon([&]() -> anyio::Task<> {
                while (true) {
                    co_await lock.acquire();
                    if (acquisitions == total) {
                        lock.release();
                        co_return;
                    }
                    sampler.tick(acquisitions);
                    ++acquisitions;
                    lock.release();
                }
            });
        }
        co_return;
    });
    print_line(workload, n, sampler);
}

}  // namespace

int main(int argc, char** argv) {
    const std::vector<std::string> workloads = {"stream_buffer_0", "stream_buffer_64",
                                                "lock_handoff_2", "lock_handoff_100"};
    bench::Args args = bench::parse_args(argc, argv, workloads);
    const std::int64_t n = args.n.value_or(1'000'000);
    anyio::run([&]() -> anyio::Task<> {
        if (bench::selected(args, "stream_buffer_0")) {
            co_await stream_workload("stream_buffer_0", 0, n);
        }
        if (bench::selected(args, "stream_buffer_64")) {
            co_await stream_workload("stream_buffer_64", 64, n);
        }
        if (bench::selected(args, "lock_handoff_2")) co_await lock_workload("lock_handoff_2", 2, n);
        if (bench::selected(args, "lock_handoff_100")) {
            co_await lock_workload("lock_handoff_100", 100, n);
        }
    });
}
