// The main demo: a loop stays responsive while blocking work runs on worker threads.
//
// Twelve "requests" each do 100 ms of blocking work (a stand-in for a database driver call or
// a file read) through to_thread::run_sync, bounded by a limiter of 4 threads, while a
// heartbeat task on the loop ticks every 50 ms. The heartbeat never stalls, the work takes
// 12 / 4 * 100 ms = about 300 ms, and never more than 4 threads run at once.
#include <anyio/anyio.hpp>
#include <anyio/fmt.hpp>

#include <atomic>
#include <chrono>
#include <thread>

#include <fmt/core.h>

using namespace std::chrono_literals;

namespace {

int blocking_query(int id) {
    std::this_thread::sleep_for(100ms);  // blocking: must never run on the loop
    return id * id;
}

anyio::Task<> heartbeat(anyio::CancelScope& scope, int& ticks) {
    co_await scope.run([&]() -> anyio::Task<> {
        for (;;) {
            co_await anyio::sleep(50ms);
            ++ticks;
        }
    }());
}

anyio::Task<int> amain() {
    auto& limiter = anyio::to_thread::current_default_thread_limiter();
    limiter.set_total_tokens(4);

    auto start = anyio::current_time();
    int ticks = 0;
    long total = 0;
    anyio::CancelScope heartbeat_scope;
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon(heartbeat(heartbeat_scope, ticks));
        co_await anyio::task_group([&](anyio::TaskGroup& requests) -> anyio::Task<> {
            for (int id = 1; id <= 12; ++id) {
                requests.start_soon([&total](int request) -> anyio::Task<> {
                    int rows = co_await anyio::to_thread::run_sync(blocking_query, request);
                    total += rows;
                    fmt::print("request {:2} -> {:3}\n", request, rows);
                }, id);
            }
            co_return;
        });
        heartbeat_scope.cancel();
    });
    auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(anyio::current_time() - start);
    fmt::print("12 blocking calls, 4 threads: {} ms; sum {}; heartbeat ticked {} times meanwhile\n",
               elapsed.count(), total, ticks);
    fmt::print("{}\n{}\n", anyio::to_thread::statistics(), limiter.statistics());
    co_return 0;
}

}  // namespace

int main() { return anyio::run(amain()); }
