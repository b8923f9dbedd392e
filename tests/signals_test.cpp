#include <anyio/signals.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <future>
#include <stdexcept>
#include <string>

#include <pthread.h>
#include <unistd.h>

#include "test_support.hpp"

// Tests for include/anyio/signals.hpp: open_signal_receiver / SignalReceiver (signalfd).
// Only SIGUSR1, SIGUSR2 and SIGWINCH are used: Catch2 has handlers of its own on the fatal
// signals and on SIGINT/SIGTERM.

using namespace std::chrono_literals;
using namespace anyio_test;

namespace {

std::atomic<int> custom_handler_calls{0};
void custom_handler(int) {
    // relaxed: read by the same thread after the signal was handled.
    custom_handler_calls.fetch_add(1, std::memory_order_relaxed);
}

bool blocked_here(int signal_number) {
    sigset_t mask;
    ::pthread_sigmask(SIG_BLOCK, nullptr, &mask);
    return ::sigismember(&mask, signal_number) == 1;
}

void (*current_handler(int signal_number))(int) {
    struct sigaction action {};
    ::sigaction(signal_number, nullptr, &action);
    return action.sa_handler;
}

// Sets a disposition for one test and puts the old one back afterwards.
struct Disposition {
    Disposition(int signal_number, void (*handler)(int)) : signal(signal_number) {
        struct sigaction action {};
        action.sa_handler = handler;
        ::sigemptyset(&action.sa_mask);
        ::sigaction(signal, &action, &previous);
    }
    ~Disposition() { ::sigaction(signal, &previous, nullptr); }
    Disposition(const Disposition&) = delete;
    Disposition& operator=(const Disposition&) = delete;
    int signal;
    struct sigaction previous {};
};

}  // namespace

TEST_CASE("a signal sent to the process arrives at the receiver", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1, SIGUSR2});
        CHECK(receiver.signals().size() == 2);
        REQUIRE(::kill(::getpid(), SIGUSR2) == 0);
        int received = co_await receiver.receive();
        CHECK(received == SIGUSR2);
        REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
        received = co_await receiver.receive();
        CHECK(received == SIGUSR1);
    });
}

TEST_CASE("a receive waits for the signal", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
        int received = 0;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { received = co_await receiver.receive(); });
            co_await anyio::sleep(10ms);
            CHECK(received == 0);
            REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
        });
        CHECK(received == SIGUSR1);
    });
}

TEST_CASE("a signal reaches the receiver, not a worker, while 40 workers are busy", "[signals]") {
    std::promise<void> release_promise;
    std::shared_future<void> release = release_promise.get_future().share();
    // relaxed: a statistic; the forwarding handler would have run before receive() returns.
    const std::uint64_t forwarded_before = anyio::detail::signals_forwarded.load(std::memory_order_relaxed);
    run_loop([&]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 40; ++i) {
                tg.start_soon([&]() -> anyio::Task<> {
                    // Named first: g++ 12 destroys a lambda with such captures twice when it
                    // is written inside the co_await expression (see to_thread.hpp).
                    auto blocked = [release] { release.wait(); };
                    co_await anyio::to_thread::run_sync(blocked);
                });
            }
            while (anyio::to_thread::statistics().busy_workers < 40) co_await anyio::sleep(1ms);
            REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
            auto received = co_await anyio::fail_after(5s, [&]() -> anyio::Task<int> {
                co_return co_await receiver.receive();
            }());
            CHECK(received == SIGUSR1);
            release_promise.set_value();
        });
    });
    // Had a worker taken the signal, the forwarding handler would have run on it.
    CHECK(anyio::detail::signals_forwarded.load(std::memory_order_relaxed) == forwarded_before);
}

TEST_CASE("closing the receiver restores the previous disposition and mask", "[signals]") {
    Disposition custom(SIGUSR2, &custom_handler);
    REQUIRE_FALSE(blocked_here(SIGUSR2));
    run_loop([]() -> anyio::Task<> {
        {
            anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR2});
            CHECK(blocked_here(SIGUSR2));
            CHECK(current_handler(SIGUSR2) != &custom_handler);
            REQUIRE(::kill(::getpid(), SIGUSR2) == 0);
            int received = co_await receiver.receive();
            CHECK(received == SIGUSR2);
            CHECK(custom_handler_calls.load() == 0);  // the receiver took it, not the handler
        }
        CHECK_FALSE(blocked_here(SIGUSR2));
        CHECK(current_handler(SIGUSR2) == &custom_handler);
        const int before = custom_handler_calls.load();
        REQUIRE(::kill(::getpid(), SIGUSR2) == 0);
        CHECK(custom_handler_calls.load() == before + 1);
    });
}

TEST_CASE("a signal that was blocked before stays blocked after the receiver", "[signals]") {
    sigset_t one;
    ::sigemptyset(&one);
    ::sigaddset(&one, SIGWINCH);
    ::pthread_sigmask(SIG_BLOCK, &one, nullptr);
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGWINCH});
        receiver.close();
        CHECK(blocked_here(SIGWINCH));
        co_return;
    });
    ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
}

TEST_CASE("a signal whose disposition was SIG_IGN still reaches the receiver", "[signals]") {
    Disposition ignored(SIGUSR1, SIG_IGN);
    run_loop([]() -> anyio::Task<> {
        {
            anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
            REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
            auto received = co_await anyio::fail_after(5s, [&]() -> anyio::Task<int> {
                co_return co_await receiver.receive();
            }());
            CHECK(received == SIGUSR1);
        }
        CHECK(current_handler(SIGUSR1) == SIG_IGN);
    });
}

TEST_CASE("a signal not yet received is delivered under the restored disposition", "[signals]") {
    Disposition custom(SIGUSR2, &custom_handler);
    run_loop([]() -> anyio::Task<> {
        const int before = custom_handler_calls.load();
        {
            anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR2});
            REQUIRE(::kill(::getpid(), SIGUSR2) == 0);
        }  // pending, never received: re-delivered (trio), not lost
        CHECK(custom_handler_calls.load() == before + 1);
        co_return;
    });
}

TEST_CASE("a second live receiver for a taken signal throws std::logic_error", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver first = anyio::open_signal_receiver({SIGUSR1});
        std::string message;
        try {
            anyio::SignalReceiver second = anyio::open_signal_receiver({SIGUSR2, SIGUSR1});
        } catch (const std::logic_error& error) {
            message = error.what();
        }
        CHECK(message.find("already taken") != std::string::npos);
        // Nothing of the failed receiver stays behind: SIGUSR2 is free, SIGUSR1 still taken.
        anyio::SignalReceiver other = anyio::open_signal_receiver({SIGUSR2});
        first.close();
        anyio::SignalReceiver again = anyio::open_signal_receiver({SIGUSR1});
        co_return;
    });
}

TEST_CASE("two tasks receiving on one receiver: the second gets BusyResourceError", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { (void)co_await receiver.receive(); });
            co_await settle();
            CHECK_THROWS_AS(co_await receiver.receive(), anyio::BusyResourceError);
            REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
        });
    });
}

TEST_CASE("closing the receiver wakes a blocked receive with ClosedResourceError", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
        bool closed = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                try {
                    (void)co_await receiver.receive();
                } catch (const anyio::ClosedResourceError&) {
                    closed = true;
                }
            });
            co_await settle();
            receiver.close();
        });
        CHECK(closed);
        CHECK(receiver.native_handle() == -1);
        CHECK_THROWS_AS(co_await receiver.receive(), anyio::ClosedResourceError);
    });
}

TEST_CASE("a cancelled receive takes no signal", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
        bool completed = co_await anyio::move_on_after(10ms, [&]() -> anyio::Task<> {
            (void)co_await receiver.receive();
        }());
        CHECK_FALSE(completed);
        REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
        int received = co_await receiver.receive();
        CHECK(received == SIGUSR1);
    });
}

TEST_CASE("uncatchable signals, an empty list and no loop are refused", "[signals]") {
    CHECK_THROWS_AS(anyio::open_signal_receiver({SIGUSR1}), anyio::NoEventLoopError);
    run_loop([]() -> anyio::Task<> {
        CHECK_THROWS_AS(anyio::open_signal_receiver({SIGKILL}), std::invalid_argument);
        CHECK_THROWS_AS(anyio::open_signal_receiver({SIGSTOP}), std::invalid_argument);
        CHECK_THROWS_AS(anyio::open_signal_receiver({0}), std::invalid_argument);
        CHECK_THROWS_AS(anyio::open_signal_receiver(std::span<const int>{}), std::invalid_argument);
        anyio::SignalReceiver fine = anyio::open_signal_receiver({SIGUSR1});  // nothing leaked
        co_return;
    });
}

TEST_CASE("a receiver used from another thread throws std::logic_error", "[signals]") {
    run_loop([]() -> anyio::Task<> {
        anyio::SignalReceiver receiver = anyio::open_signal_receiver({SIGUSR1});
        std::string outcome = co_await anyio::to_thread::run_sync([&] {
            return outcome_of([&] { receiver.close(); });
        });
        CHECK(outcome == "std::logic_error");
    });
}
