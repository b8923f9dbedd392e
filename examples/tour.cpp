// The README's tour, compiled and run as is (keep the two in step).
#include <anyio/anyio.hpp>

#include <fstream>
#include <string>

#include <fmt/core.h>

using namespace std::chrono_literals;

int count_lines(const std::string& path) {  // blocking: must not run on the loop
    std::ifstream file(path);
    int lines = 0;
    for (std::string line; std::getline(file, line);) ++lines;
    return lines;
}

anyio::Task<int> amain() {
    // Blocking work goes to a reused worker thread; the loop keeps serving other tasks.
    int n = co_await anyio::to_thread::run_sync(count_lines, std::string("/etc/passwd"));

    // Your own bound, and cancellation that does not wait for the blocking call.
    anyio::CapacityLimiter db_limiter(8);
    auto m = co_await anyio::move_on_after(100ms, [&]() -> anyio::Task<int> {
        co_return co_await anyio::to_thread::run_sync(
            {.limiter = &db_limiter, .abandon_on_cancel = true}, count_lines, std::string("/big"));
    }());

    // Structured concurrency: the group returns when every child is done; a failing child
    // cancels the others and its exception comes out here.
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon([]() -> anyio::Task<> { co_await anyio::sleep(10ms); });
        tg.start_soon([]() -> anyio::Task<> {
            // A worker thread can call back into the loop.
            co_await anyio::to_thread::run_sync([] {
                anyio::from_thread::run_sync([] { /* runs on the loop thread */ });
            });
        });
        co_return;
    });
    fmt::print("/etc/passwd has {} lines; /big has {}\n", n, m.value_or(0));
    co_return n + m.value_or(0);
}

int main() { return anyio::run(amain()) > 0 ? 0 : 1; }
