#include <anyio/anyio.hpp>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "catch.hpp"

using namespace std::chrono_literals;

// The umbrella header brings in the whole core: one program using every concept.
TEST_CASE("the umbrella header provides the whole core", "[anyio]") {
    auto result = anyio::run([]() -> anyio::Task<std::string> {
        anyio::Event ready;
        anyio::CapacityLimiter limiter(2);
        std::string log;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await ready.wait();
                auto guard = co_await limiter.scoped();
                log += co_await anyio::to_thread::run_sync([] {
                    return anyio::from_thread::run_sync([] { return std::string("worker "); });
                });
            });
            co_await anyio::checkpoint();
            ready.set();
            auto timed_out = co_await anyio::move_on_after(1ms, [&]() -> anyio::Task<int> {
                co_await anyio::sleep(10s);
                co_return 1;
            }());
            if (!timed_out) log += "timeout ";
        });
        co_return log;
    });
    CHECK((result == "timeout worker " || result == "worker timeout "));
}

TEST_CASE("the README's first example runs", "[anyio]") {
    auto count_lines = [](const std::string& text) {
        return static_cast<int>(std::count(text.begin(), text.end(), '\n'));
    };
    int n = anyio::run([&]() -> anyio::Task<int> {
        anyio::CapacityLimiter db_limiter(4);
        int a = co_await anyio::to_thread::run_sync(count_lines, std::string("a\nb\n"));
        int b = co_await anyio::to_thread::run_sync(
            {.limiter = &db_limiter, .abandon_on_cancel = true}, count_lines, std::string("c\n"));
        co_return a + b;
    });
    CHECK(n == 3);
}
