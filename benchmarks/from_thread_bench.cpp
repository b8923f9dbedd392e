// Round-trip cost of calling back into the loop: from_thread::run_sync from a worker thread,
// from_thread::run (a coroutine), and BlockingPortal::call from a plain thread.
// Prints one JSON line per measurement (nearest-rank percentiles).
#include <anyio/anyio.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/core.h>

namespace {

using clock_type = std::chrono::steady_clock;

struct Samples {
    std::vector<double> micros;
    double wall_s = 0;
    double percentile(double q) {
        std::sort(micros.begin(), micros.end());
        auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(micros.size())));
        return micros[std::max<std::size_t>(rank, 1) - 1];
    }
};

template <class F>
Samples measure(int n, F&& one_call) {
    Samples samples;
    samples.micros.reserve(static_cast<std::size_t>(n));
    auto start = clock_type::now();
    for (int i = 0; i < n; ++i) {
        auto t0 = clock_type::now();
        one_call();
        samples.micros.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
    }
    samples.wall_s = std::chrono::duration<double>(clock_type::now() - start).count();
    return samples;
}

void report(const char* workload, int n, Samples& samples) {
    fmt::print(R"({{"system":"anyio-cpp","workload":"{}","n":{},"ops_per_s":{:.0f},"p50_us":{:.2f},"p99_us":{:.2f}}})"
               "\n",
               workload, n, n / samples.wall_s, samples.percentile(0.50), samples.percentile(0.99));
}

anyio::Task<int> identity(int x) { co_return x; }

}  // namespace

int main(int argc, char** argv) {
    int n = argc > 1 ? std::atoi(argv[1]) : 20000;

    anyio::run([n]() -> anyio::Task<> {
        co_await anyio::to_thread::run_sync([n] {
            for (int i = 0; i < 1000; ++i) anyio::from_thread::run_sync([] {});  // warm-up
            auto sync = measure(n, [] { anyio::from_thread::run_sync([] {}); });
            report("from_thread_run_sync", n, sync);
            auto async = measure(n, [] { anyio::from_thread::run(identity, 1); });
            report("from_thread_run", n, async);
        });
    });

    auto portal = anyio::start_blocking_portal();
    for (int i = 0; i < 1000; ++i) portal.call(identity, 1);  // warm-up
    auto call_async = measure(n, [&] { portal.call(identity, 1); });
    report("portal_call_async", n, call_async);
    auto call_sync = measure(n, [&] { portal.call([] { return 1; }); });
    report("portal_call_sync", n, call_sync);
    portal.stop();
}
