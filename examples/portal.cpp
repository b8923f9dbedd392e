// A plain main() driving async code through a BlockingPortal: the loop runs on its own
// thread, and ordinary threads call coroutines on it and get their results back.
#include <anyio/anyio.hpp>

#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include <fmt/core.h>

using namespace std::chrono_literals;

namespace {

anyio::Task<int> fetch_price(int item) {
    co_await anyio::sleep(10ms);  // pretend to await a network reply on the loop
    co_return item * 100;
}

}  // namespace

int main() {
    auto portal = anyio::start_blocking_portal();

    // Blocking call from plain code: returns the coroutine's value (or rethrows).
    fmt::print("price of 7: {}\n", portal.call(fetch_price, 7));

    // Fire and collect later.
    std::future<int> later = portal.start_task_soon(fetch_price, 9);

    // Several threads at once.
    std::vector<std::thread> threads;
    std::vector<int> prices(4);
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] { prices[t] = portal.call(fetch_price, t); });
    }
    for (auto& thread : threads) thread.join();
    for (int t = 0; t < 4; ++t) fmt::print("price of {}: {}\n", t, prices[t]);
    fmt::print("price of 9 (future): {}\n", later.get());

    // A plain callable runs on the portal's loop thread.
    bool on_loop = portal.call([] { return anyio::EventLoop::current() != nullptr; });
    fmt::print("plain call ran on the loop thread: {}\n", on_loop);

    portal.stop();  // waits for tasks still running; stop(true) would cancel them
    try {
        portal.call(fetch_price, 1);
    } catch (const anyio::RunFinishedError& error) {
        fmt::print("after stop: {}\n", error.what());
    }
}
