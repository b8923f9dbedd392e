#include <anyio/from_thread.hpp>

#include <anyio/cancel_scope.hpp>
#include <anyio/capacity_limiter.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

// Tests for anyio::from_thread (include/anyio/from_thread.hpp): calling back into the loop
// from worker threads (to_thread::run_sync) and, with a LoopToken, from any thread; the error
// cases; and how cancellation of the task that offloaded reaches the worker's calls.
//
// Assertions run only on the test's main thread, which is also the loop thread inside
// anyio::run: worker functions and plain threads record what they saw into variables that
// are checked after a synchronising step (the run_sync completion, a join, a future).

using namespace std::chrono_literals;
using namespace anyio_test;

namespace {

#if defined(ANYIO_TEST_SANITIZED)
constexpr int stress_calls_per_worker = 1000;
#else
constexpr int stress_calls_per_worker = 2000;
#endif

using Clock = std::chrono::steady_clock;

anyio::Task<std::string> concatenate(std::string a, const std::string& b) {
    co_await anyio::checkpoint();
    co_return a + b;
}

anyio::Task<> set_flag(bool& flag) {
    co_await anyio::checkpoint();
    flag = true;
}

// Runs anyio::run with a main task that offloads `fn` to a worker thread (to_thread::run_sync)
// and returns what `fn` returned, once run() has.
template <class F>
auto run_in_worker(F fn) {
    return anyio::run([&fn]() -> anyio::Task<std::invoke_result_t<F&>> {
        co_return co_await anyio::to_thread::run_sync(fn);
    });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// from_thread::run and from_thread::run_sync from worker threads: results and errors
// ---------------------------------------------------------------------------------------------

TEST_CASE("from_thread::run runs a coroutine as a task on the loop thread and returns its value",
          "[from_thread]") {
    const std::thread::id loop_thread = std::this_thread::get_id();
    std::thread::id worker_thread;
    std::thread::id coroutine_thread;
    int from_worker = 0;
    int awaited = 0;
    awaited = run_in_worker([&] {
        worker_thread = std::this_thread::get_id();
        from_worker = anyio::from_thread::run(add_on_loop, 20, 22, &coroutine_thread);
        return from_worker + 1;
    });
    CHECK(from_worker == 42);
    CHECK(awaited == 43);
    CHECK(coroutine_thread == loop_thread);
    CHECK(worker_thread != loop_thread);
    CHECK(worker_thread != std::thread::id{});
}

TEST_CASE("from_thread::run yields references, move-only values and void", "[from_thread]") {
    int target = 5;
    int* address = nullptr;
    int owned_value = 0;
    bool flag = false;
    std::string joined;
    run_in_worker([&] {
        int& ref = anyio::from_thread::run(reference_to, target);
        address = &ref;
        ref = 6;
        std::unique_ptr<int> owned = anyio::from_thread::run(make_owned, 77);
        owned_value = owned ? *owned : -1;
        anyio::from_thread::run(set_flag, flag);
        std::string suffix = "def";
        joined = anyio::from_thread::run(concatenate, std::string("abc"), suffix);
    });
    CHECK(address == &target);
    CHECK(target == 6);
    CHECK(owned_value == 77);
    CHECK(flag);
    CHECK(joined == "abcdef");
}

TEST_CASE("from_thread::run rethrows the coroutine's exception in the worker with its type",
          "[from_thread]") {
    std::string boom;
    std::string custom;
    std::string escaped;
    anyio::run([&]() -> anyio::Task<> {
        co_await anyio::to_thread::run_sync([&] {
            boom = outcome_of([] { anyio::from_thread::run(throw_boom, 7); });
            custom = outcome_of([] { anyio::from_thread::run(throw_custom, "from the loop"); });
        });
        // Not caught in the worker: it travels on to the task that offloaded.
        try {
            co_await anyio::to_thread::run_sync(
                [] { return anyio::from_thread::run(throw_custom, "escaped"); });
            escaped = "returned";
        } catch (const CustomError& error) {
            escaped = std::string("CustomError: ") + error.what();
        }
    });
    CHECK(boom == "Boom 7");
    CHECK(custom == "CustomError: from the loop");
    CHECK(escaped == "CustomError: escaped");
}

TEST_CASE("from_thread::run_sync runs a function on the loop thread and returns its value",
          "[from_thread]") {
    const std::thread::id loop_thread = std::this_thread::get_id();
    std::thread::id ran_on;
    int sum = 0;
    int target = 1;
    int* address = nullptr;
    int owned_value = 0;
    bool void_ran = false;
    std::string text;
    run_in_worker([&] {
        sum = anyio::from_thread::run_sync(
            [&](int a, int b) {
                ran_on = std::this_thread::get_id();
                return a + b;
            },
            40, 2);
        int& ref = anyio::from_thread::run_sync([&]() -> int& { return target; });
        address = &ref;
        std::unique_ptr<int> owned =
            anyio::from_thread::run_sync([] { return std::make_unique<int>(9); });
        owned_value = owned ? *owned : -1;
        anyio::from_thread::run_sync([&] { void_ran = true; });
        const std::string prefix = "x";
        text = anyio::from_thread::run_sync(
            [](const std::string& p, int n) { return p + std::to_string(n); }, prefix, 3);
    });
    CHECK(sum == 42);
    CHECK(ran_on == loop_thread);
    CHECK(address == &target);
    CHECK(owned_value == 9);
    CHECK(void_ran);
    CHECK(text == "x3");
}

TEST_CASE("from_thread::run_sync rethrows the function's exception in the worker with its type",
          "[from_thread]") {
    std::string boom;
    std::string custom;
    std::string after;
    run_in_worker([&] {
        boom = outcome_of([] { anyio::from_thread::run_sync([] { throw Boom{3}; }); });
        custom = outcome_of(
            [] { anyio::from_thread::run_sync([]() -> int { throw CustomError("sync"); }); });
        // The loop is unharmed: the next call works.
        after = std::to_string(anyio::from_thread::run_sync([] { return 5; }));
    });
    CHECK(boom == "Boom 3");
    CHECK(custom == "CustomError: sync");
    CHECK(after == "5");
}

TEST_CASE("from_thread::run_sync may use loop-only objects: setting an Event wakes a task",
          "[from_thread]") {
    bool woken = false;
    int result = 0;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Event ready;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await ready.wait();
                woken = true;
            });
            tg.start_soon([&]() -> anyio::Task<> {
                result = co_await anyio::to_thread::run_sync([&] {
                    anyio::from_thread::run_sync([&] { ready.set(); });
                    return 1;
                });
            });
            co_return;
        });
    });
    CHECK(woken);
    CHECK(result == 1);
}

TEST_CASE("The coroutine started by from_thread::run is a task of its own: the loop keeps "
          "running other tasks while the worker waits",
          "[from_thread]") {
    int worker_got = 0;
    int other_task_turns = 0;
    bool worker_returned_before_go = true;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Event entered;
        anyio::Event go;
        bool go_set = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                worker_got = co_await anyio::to_thread::run_sync([&] {
                    return anyio::from_thread::run([&]() -> anyio::Task<int> {
                        entered.set();
                        co_await go.wait();
                        co_return 11;
                    });
                });
                worker_returned_before_go = !go_set;
            });
            tg.start_soon([&]() -> anyio::Task<> {
                co_await entered.wait();
                // The worker is blocked in from_thread::run; this task still gets turns.
                for (int i = 0; i < 50; ++i) {
                    co_await anyio::checkpoint();
                    ++other_task_turns;
                }
                go_set = true;
                go.set();
            });
            co_return;
        });
    });
    CHECK(worker_got == 11);
    CHECK(other_task_turns == 50);
    CHECK_FALSE(worker_returned_before_go);
}

// ---------------------------------------------------------------------------------------------
// Tokens and the error cases
// ---------------------------------------------------------------------------------------------

TEST_CASE("from_thread calls without a token throw NoEventLoopError on a thread that is not a "
          "worker",
          "[from_thread]") {
    // The main thread, with no loop running at all.
    CHECK_THROWS_AS(anyio::from_thread::run_sync([] { return 1; }), anyio::NoEventLoopError);
    CHECK_THROWS_AS(anyio::from_thread::run(add_on_loop, 1, 2, nullptr), anyio::NoEventLoopError);
    CHECK_THROWS_AS(anyio::from_thread::check_cancelled(), anyio::NoEventLoopError);

    // A plain thread while a loop runs elsewhere.
    std::string plain_run_sync;
    std::string plain_run;
    std::string plain_check;
    bool ran = false;
    std::thread plain([&] {
        plain_run_sync = outcome_of([&] { anyio::from_thread::run_sync([&] { ran = true; }); });
        plain_run = outcome_of([&] { anyio::from_thread::run(set_flag, ran); });
        plain_check = outcome_of([] { anyio::from_thread::check_cancelled(); });
    });
    plain.join();
    CHECK(plain_run_sync == "NoEventLoopError");
    CHECK(plain_run == "NoEventLoopError");
    CHECK(plain_check == "NoEventLoopError");

    // A thread started by a worker is not a worker itself.
    std::string nested_run_sync;
    std::string nested_check;
    run_in_worker([&] {
        std::thread inner([&] {
            nested_run_sync =
                outcome_of([&] { anyio::from_thread::run_sync([&] { ran = true; }); });
            nested_check = outcome_of([] { anyio::from_thread::check_cancelled(); });
        });
        inner.join();
    });
    CHECK(nested_run_sync == "NoEventLoopError");
    CHECK(nested_check == "NoEventLoopError");
    CHECK_FALSE(ran);
}

TEST_CASE("from_thread calls with a LoopToken work from any thread", "[from_thread]") {
    const std::thread::id loop_thread = std::this_thread::get_id();
    std::thread::id sync_ran_on;
    std::thread::id coroutine_ran_on;
    int sync_result = 0;
    int async_result = 0;
    std::string async_error;
    std::string sync_error;
    std::thread plain;
    anyio::run([&]() -> anyio::Task<> {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        anyio::Event finished;
        plain = std::thread([&, token] {
            sync_result = anyio::from_thread::run_sync(
                token,
                [&](int a) {
                    sync_ran_on = std::this_thread::get_id();
                    return a * 2;
                },
                21);
            async_result = anyio::from_thread::run(token, add_on_loop, 1, 2, &coroutine_ran_on);
            async_error = outcome_of([&] { anyio::from_thread::run(token, throw_boom, 12); });
            sync_error = outcome_of([&] {
                anyio::from_thread::run_sync(token, []() -> int { throw CustomError("token"); });
            });
            anyio::from_thread::run_sync(token, [&] { finished.set(); });
        });
        co_await finished.wait();
    });
    plain.join();
    CHECK(sync_result == 42);
    CHECK(sync_ran_on == loop_thread);
    CHECK(async_result == 3);
    CHECK(coroutine_ran_on == loop_thread);
    CHECK(async_error == "Boom 12");
    CHECK(sync_error == "CustomError: token");
}

TEST_CASE("A worker may pass its own loop's token to from_thread calls", "[from_thread]") {
    int result = 0;
    anyio::run([&]() -> anyio::Task<> {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        auto worker = [token] {  // named: see the note on g++ 12 in the abandon test below
            std::thread::id ignored;
            return anyio::from_thread::run_sync(token, [] { return 1; }) +
                   anyio::from_thread::run(token, add_on_loop, 10, 20, &ignored);
        };
        result = co_await anyio::to_thread::run_sync(std::move(worker));
    });
    CHECK(result == 31);
}

TEST_CASE("from_thread calls with the token of a finished loop throw RunFinishedError",
          "[from_thread]") {
    anyio::LoopToken token;
    anyio::run([&]() -> anyio::Task<> {
        token = anyio::lowlevel::current_token();
        co_return;
    });
    REQUIRE(static_cast<bool>(token));
    CHECK(token.finished());

    bool ran = false;
    CHECK_THROWS_AS(anyio::from_thread::run_sync(token, [&] { ran = true; }),
                    anyio::RunFinishedError);
    CHECK_THROWS_AS(anyio::from_thread::run(token, set_flag, ran), anyio::RunFinishedError);

    std::string plain_run_sync;
    std::string plain_run;
    std::thread plain([&] {
        plain_run_sync = outcome_of([&] { anyio::from_thread::run_sync(token, [&] { ran = true; }); });
        plain_run = outcome_of([&] { anyio::from_thread::run(token, set_flag, ran); });
    });
    plain.join();
    CHECK(plain_run_sync == "RunFinishedError");
    CHECK(plain_run == "RunFinishedError");
    CHECK_FALSE(ran);
}

TEST_CASE("from_thread calls on the loop thread itself throw std::logic_error at once",
          "[from_thread]") {
    bool ran = false;
    bool checked = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        CHECK_THROWS_AS(anyio::from_thread::run_sync([&] { ran = true; }), std::logic_error);
        CHECK_THROWS_AS(anyio::from_thread::run(set_flag, ran), std::logic_error);
        CHECK_THROWS_AS(anyio::from_thread::run_sync(token, [&] { ran = true; }), std::logic_error);
        CHECK_THROWS_AS(anyio::from_thread::run(token, set_flag, ran), std::logic_error);
        CHECK_THROWS_AS(anyio::from_thread::check_cancelled(), std::logic_error);
        // Also from inside a function that from_thread::run_sync runs on the loop thread.
        co_await anyio::to_thread::run_sync([&] {
            anyio::from_thread::run_sync([&] {
                try {
                    anyio::from_thread::run_sync([&] { ran = true; });
                } catch (const std::logic_error&) {
                    checked = true;
                }
            });
        });
        co_await anyio::checkpoint();
    });
    CHECK_FALSE(ran);
    CHECK(checked);
}

TEST_CASE("from_thread calls from an abandoned worker after the loop has finished throw "
          "RunFinishedError",
          "[from_thread]") {
    // Shared with the worker, which outlives anyio::run (its thread is detached at shutdown).
    struct State {
        std::promise<void> release;  // the test lets the worker go on once run() returned
        std::shared_future<void> released = release.get_future().share();
        std::promise<void> done;     // the worker is about to return
        std::string check_after_abandon;
        int value_while_running = 0;
        std::string run_sync_after_loop;
        std::string run_after_loop;
        std::atomic<bool> ran_after_loop{false};
    };
    auto state = std::make_shared<State>();
    std::future<void> worker_done = state->done.get_future();

    bool cancelled_caught = false;
    bool host_saw_cancelled = false;
    const auto started = Clock::now();
    anyio::run(
        [&]() -> anyio::Task<> {
            anyio::CancelScope scope;
            anyio::Event worker_checked;
            // A named lambda, not a temporary inside the co_await expression: g++ 12 destroys
            // such a temporary's captures once too often (the shared_ptr's count drops early).
            auto worker = [state, &scope, &worker_checked] {
                // Cancel our own caller: it is abandoned and leaves at once.
                anyio::from_thread::run_sync([&scope] { scope.cancel(); });
                state->check_after_abandon =
                    outcome_of([] { anyio::from_thread::check_cancelled(); });
                // The loop still runs: calling back still works.
                state->value_while_running = anyio::from_thread::run_sync([] { return 7; });
                anyio::from_thread::run_sync([&worker_checked] { worker_checked.set(); });
                state->released.wait();
                // The loop has finished now.
                state->run_sync_after_loop = outcome_of([&] {
                    anyio::from_thread::run_sync([&] { state->ran_after_loop = true; });
                });
                state->run_after_loop = outcome_of([] {
                    anyio::from_thread::run([]() -> anyio::Task<int> { co_return 1; });
                });
                state->done.set_value();
            };
            co_await scope.run([&]() -> anyio::Task<> {
                try {
                    co_await anyio::to_thread::run_sync({.abandon_on_cancel = true},
                                                        std::move(worker));
                } catch (const anyio::Cancelled&) {
                    host_saw_cancelled = true;
                    throw;
                }
            }());
            cancelled_caught = scope.cancelled_caught();
            co_await worker_checked.wait();
        }(),
        anyio::EventLoop::Options{.shutdown_timeout = 20ms});
    const auto run_took = Clock::now() - started;

    state->release.set_value();
    REQUIRE(worker_done.wait_for(30s) == std::future_status::ready);
    CHECK(host_saw_cancelled);
    CHECK(cancelled_caught);
    CHECK(run_took < 10s);
    CHECK(state->check_after_abandon == "Cancelled");
    CHECK(state->value_while_running == 7);
    CHECK(state->run_sync_after_loop == "RunFinishedError");
    CHECK(state->run_after_loop == "RunFinishedError");
    CHECK_FALSE(state->ran_after_loop.load());
}

TEST_CASE("A from_thread::run call from a plain thread still running when the loop finishes "
          "gets RunFinishedError",
          "[from_thread]") {
    std::string outcome;
    bool coroutine_finished = false;
    std::thread plain;
    anyio::Event entered;  // set on the loop thread only
    anyio::run([&]() -> anyio::Task<> {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        plain = std::thread([&, token] {
            outcome = outcome_of([&] {
                anyio::from_thread::run(token, [&]() -> anyio::Task<> {
                    entered.set();
                    co_await anyio::sleep(10s);
                    coroutine_finished = true;
                });
            });
        });
        co_await entered.wait();
        // The main task returns now; the loop shuts down with that task still sleeping.
    });
    plain.join();
    CHECK(outcome == "RunFinishedError");
    CHECK_FALSE(coroutine_finished);
}

// ---------------------------------------------------------------------------------------------
// Cancellation of the task that offloaded
// ---------------------------------------------------------------------------------------------

TEST_CASE("Cancelling the caller cancels the coroutine its worker started with from_thread::run",
          "[from_thread]") {
    const bool abandon = GENERATE(false, true);
    CAPTURE(abandon);
    std::string worker_outcome;
    Clock::duration worker_waited{};
    bool coroutine_saw_cancelled = false;
    bool coroutine_finished = false;
    std::string host_outcome;
    bool cancelled_caught = false;
    std::promise<void> host_left;
    std::future<void> host_left_future = host_left.get_future();
    std::future_status worker_saw_host_leave = std::future_status::deferred;

    anyio::run([&]() -> anyio::Task<> {
        anyio::Event entered;
        anyio::CancelScope scope;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    try {
                        int value = co_await anyio::to_thread::run_sync(
                            {.abandon_on_cancel = abandon}, [&] {
                                const auto start = Clock::now();
                                worker_outcome = outcome_of([&] {
                                    anyio::from_thread::run([&]() -> anyio::Task<> {
                                        entered.set();
                                        try {
                                            co_await anyio::sleep(10s);
                                        } catch (const anyio::Cancelled&) {
                                            coroutine_saw_cancelled = true;
                                            throw;
                                        }
                                        coroutine_finished = true;
                                    });
                                });
                                worker_waited = Clock::now() - start;
                                if (abandon) {
                                    // Abandoned: the caller has left without waiting for us.
                                    worker_saw_host_leave = host_left_future.wait_for(30s);
                                }
                                return 7;
                            });
                        host_outcome = "returned " + std::to_string(value);
                    } catch (const anyio::Cancelled&) {
                        host_outcome = "Cancelled";
                        throw;
                    }
                    // Shielded mode: the cancellation is delivered at the next checkpoint.
                    co_await anyio::checkpoint();
                    host_outcome += ", then passed a checkpoint";
                }());
                cancelled_caught = scope.cancelled_caught();
                host_left.set_value();
            });
            tg.start_soon([&]() -> anyio::Task<> {
                co_await entered.wait();
                scope.cancel();
            });
            co_return;
        });
    });
    CHECK(worker_outcome == "Cancelled");
    CHECK(coroutine_saw_cancelled);
    CHECK_FALSE(coroutine_finished);
    CHECK(worker_waited < 5s);  // the 10 s sleep was cut short
    CHECK(cancelled_caught);
    if (abandon) {
        CHECK(host_outcome == "Cancelled");
        CHECK(worker_saw_host_leave == std::future_status::ready);
    } else {
        CHECK(host_outcome == "returned 7");
    }
}

TEST_CASE("A deadline on the caller's scope cancels the worker's from_thread::run coroutine",
          "[from_thread]") {
    const bool abandon = GENERATE(false, true);
    CAPTURE(abandon);
    std::string worker_outcome;
    Clock::duration worker_waited{};
    bool timed_out = false;
    anyio::run([&]() -> anyio::Task<> {
        bool completed = co_await anyio::move_on_after(
            50ms, [&]() -> anyio::Task<> {
                co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                    const auto start = Clock::now();
                    worker_outcome = outcome_of([] {
                        anyio::from_thread::run([]() -> anyio::Task<> { co_await anyio::sleep(10s); });
                    });
                    worker_waited = Clock::now() - start;
                });
                co_await anyio::checkpoint();
            }());
        timed_out = !completed;
    });
    CHECK(timed_out);
    CHECK(worker_outcome == "Cancelled");
    CHECK(worker_waited < 5s);
}

TEST_CASE("A task group child's failure cancels the coroutine a sibling's worker started",
          "[from_thread]") {
    std::string worker_outcome;
    Clock::duration worker_waited{};
    std::string group_outcome;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Event entered;
        try {
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await anyio::to_thread::run_sync([&] {
                        const auto start = Clock::now();
                        worker_outcome = outcome_of([&] {
                            anyio::from_thread::run([&]() -> anyio::Task<> {
                                entered.set();
                                co_await anyio::sleep(10s);
                            });
                        });
                        worker_waited = Clock::now() - start;
                    });
                });
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await entered.wait();
                    throw CustomError("sibling failed");
                });
                co_return;
            });
            group_outcome = "returned";
        } catch (const CustomError& error) {
            group_outcome = std::string("CustomError: ") + error.what();
        }
    });
    CHECK(group_outcome == "CustomError: sibling failed");
    CHECK(worker_outcome == "Cancelled");
    CHECK(worker_waited < 5s);
}

TEST_CASE("A from_thread::run started after the caller was cancelled is cancelled at its first "
          "checkpoint",
          "[from_thread]") {
    const bool abandon = GENERATE(false, true);
    CAPTURE(abandon);
    std::string worker_outcome;
    Clock::duration worker_waited{};
    bool coroutine_started = false;
    bool cancelled_caught = false;
    std::promise<void> host_left;
    std::future<void> host_left_future = host_left.get_future();
    std::promise<void> worker_done;
    std::future<void> worker_done_future = worker_done.get_future();
    anyio::run([&]() -> anyio::Task<> {
        anyio::CancelScope scope;
        co_await scope.run([&]() -> anyio::Task<> {
            co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                anyio::from_thread::run_sync([&] { scope.cancel(); });
                if (abandon) host_left_future.wait();  // the scope is gone: only call now
                const auto start = Clock::now();
                worker_outcome = outcome_of([&] {
                    anyio::from_thread::run([&]() -> anyio::Task<> {
                        coroutine_started = true;
                        co_await anyio::sleep(10s);
                    });
                });
                worker_waited = Clock::now() - start;
                worker_done.set_value();
            });
            co_await anyio::checkpoint();
        }());
        cancelled_caught = scope.cancelled_caught();
        host_left.set_value();
        // The loop must still run the abandoned worker's call: once the main task has
        // finished, from_thread calls throw RunFinishedError instead.
        if (abandon) co_await anyio::to_thread::run_sync([&] { worker_done_future.wait(); });
    });
    CHECK(cancelled_caught);
    CHECK(coroutine_started);
    CHECK(worker_outcome == "Cancelled");
    CHECK(worker_waited < 5s);
}

TEST_CASE("check_cancelled reports the caller's cancellation as it stands at the call",
          "[from_thread]") {
    const bool abandon = GENERATE(false, true);
    CAPTURE(abandon);
    std::string before;
    std::string after;
    std::string after_host_left;
    int value_after_cancel = 0;
    std::string host_outcome;
    bool cancelled_caught = false;
    std::promise<void> host_left;
    std::future<void> host_left_future = host_left.get_future();
    std::promise<void> worker_done;
    std::future<void> worker_done_future = worker_done.get_future();
    anyio::run([&]() -> anyio::Task<> {
        anyio::CancelScope scope;
        co_await scope.run([&]() -> anyio::Task<> {
            try {
                co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                    before = outcome_of([] { anyio::from_thread::check_cancelled(); });
                    anyio::from_thread::run_sync([&] { scope.cancel(); });
                    after = outcome_of([] { anyio::from_thread::check_cancelled(); });
                    // run_sync is no cancellation point: it still runs (as in anyio).
                    value_after_cancel = anyio::from_thread::run_sync([] { return 5; });
                    if (abandon) {
                        host_left_future.wait();
                        after_host_left = outcome_of([] { anyio::from_thread::check_cancelled(); });
                    }
                    worker_done.set_value();
                });
                host_outcome = "returned";
            } catch (const anyio::Cancelled&) {
                host_outcome = "Cancelled";
                throw;
            }
            co_await anyio::checkpoint();
        }());
        cancelled_caught = scope.cancelled_caught();
        host_left.set_value();
        // The abandoned worker still calls back: the main task waits for it (see above).
        if (abandon) co_await anyio::to_thread::run_sync([&] { worker_done_future.wait(); });
    });
    CHECK(before == "returned");
    CHECK(after == "Cancelled");
    CHECK(value_after_cancel == 5);
    CHECK(cancelled_caught);
    if (abandon) {
        CHECK(host_outcome == "Cancelled");
        CHECK(after_host_left == "Cancelled");  // still reported after the abandon
    } else {
        CHECK(host_outcome == "returned");
    }
}

TEST_CASE("check_cancelled respects a shielded scope around the caller", "[from_thread]") {
    const bool abandon = GENERATE(false, true);
    CAPTURE(abandon);
    std::string shielded_check;
    std::string unshielded_check;
    int value = 0;
    bool passed_shielded_checkpoint = false;
    bool outer_caught = false;
    bool inner_caught = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::CancelScope outer;
        anyio::CancelScope inner(anyio::CancelScope::time_point::max(), true);
        co_await outer.run([&]() -> anyio::Task<> {
            co_await inner.run([&]() -> anyio::Task<> {
                // Shield kept for the whole call: the caller is not cancelled (nor abandoned).
                value = co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                    anyio::from_thread::run_sync([&] { outer.cancel(); });
                    shielded_check = outcome_of([] { anyio::from_thread::check_cancelled(); });
                    return 42;
                });
                co_await anyio::checkpoint();
                passed_shielded_checkpoint = true;
                // Shield lifted while the worker runs: from then on it reports the cancellation.
                co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                    anyio::from_thread::run_sync([&] { inner.set_shield(false); });
                    unshielded_check = outcome_of([] { anyio::from_thread::check_cancelled(); });
                });
                co_await anyio::checkpoint();
            }());
            inner_caught = inner.cancelled_caught();
        }());
        outer_caught = outer.cancelled_caught();
    });
    CHECK(shielded_check == "returned");
    CHECK(value == 42);
    CHECK(passed_shielded_checkpoint);
    CHECK(unshielded_check == "Cancelled");
    CHECK_FALSE(inner_caught);
    CHECK(outer_caught);
}

TEST_CASE("check_cancelled starts throwing once the caller's deadline passes", "[from_thread]") {
    std::string outcome = "deadline never arrived";
    Clock::duration waited{};
    bool timed_out = false;
    anyio::run([&]() -> anyio::Task<> {
        bool completed = co_await anyio::move_on_after(
            30ms, [&]() -> anyio::Task<> {
                co_await anyio::to_thread::run_sync([&] {
                    const auto start = Clock::now();
                    // Polling is what check_cancelled is for; bounded so a bug cannot hang.
                    while (Clock::now() - start < 10s) {
                        try {
                            anyio::from_thread::check_cancelled();
                        } catch (const anyio::Cancelled&) {
                            outcome = "Cancelled";
                            break;
                        }
                        std::this_thread::yield();
                    }
                    waited = Clock::now() - start;
                });
                co_await anyio::checkpoint();
            }());
        timed_out = !completed;
    });
    CHECK(outcome == "Cancelled");
    CHECK(waited < 5s);
    CHECK(timed_out);
}

TEST_CASE("Cancellation reaches a worker nested through from_thread::run and to_thread::run_sync",
          "[from_thread]") {
    const bool abandon = GENERATE(false, true);
    CAPTURE(abandon);
    std::string inner_before;
    std::string inner_after;
    std::string outer_run;
    bool cancelled_caught = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::CancelScope scope;
        co_await scope.run([&]() -> anyio::Task<> {
            co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                outer_run = outcome_of([&] {
                    anyio::from_thread::run([&]() -> anyio::Task<> {
                        co_await anyio::to_thread::run_sync({.abandon_on_cancel = abandon}, [&] {
                            inner_before = outcome_of([] { anyio::from_thread::check_cancelled(); });
                            anyio::from_thread::run_sync([&] { scope.cancel(); });
                            inner_after = outcome_of([] { anyio::from_thread::check_cancelled(); });
                        });
                        co_await anyio::checkpoint();
                    });
                });
            });
            co_await anyio::checkpoint();
        }());
        cancelled_caught = scope.cancelled_caught();
    });
    CHECK(inner_before == "returned");
    CHECK(inner_after == "Cancelled");
    CHECK(outer_run == "Cancelled");
    CHECK(cancelled_caught);
}

// ---------------------------------------------------------------------------------------------
// Re-entry and load
// ---------------------------------------------------------------------------------------------

TEST_CASE("A worker can offload again through from_thread::run without deadlocking while tokens "
          "remain",
          "[from_thread]") {
    std::thread::id outer_worker;
    std::thread::id inner_worker;
    std::int64_t borrowed_during = -1;
    std::int64_t borrowed_after = -1;
    int result = 0;
    anyio::WorkerPoolStatistics stats;
    anyio::run([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        result = co_await anyio::to_thread::run_sync({.limiter = &limiter}, [&] {
            outer_worker = std::this_thread::get_id();
            return anyio::from_thread::run([&]() -> anyio::Task<int> {
                int inner = co_await anyio::to_thread::run_sync({.limiter = &limiter}, [&] {
                    inner_worker = std::this_thread::get_id();
                    return anyio::from_thread::run_sync([&] {
                        borrowed_during = limiter.borrowed_tokens();  // loop thread
                        return 20;
                    });
                });
                co_return inner + 1;
            }) + 100;
        });
        borrowed_after = limiter.borrowed_tokens();
        stats = anyio::to_thread::statistics();
    });
    CHECK(result == 121);
    CHECK(borrowed_during == 2);
    CHECK(borrowed_after == 0);
    CHECK(outer_worker != inner_worker);
    CHECK(stats.threads_created == 2);
}

TEST_CASE("Many workers call back into the loop at once and every call gets its own result",
          "[from_thread][stress]") {
    constexpr int workers = 8;
    std::vector<std::int64_t> sums(workers, 0);
    std::int64_t loop_side_total = 0;  // touched only on the loop thread
    anyio::run([&]() -> anyio::Task<> {
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int w = 0; w < workers; ++w) {
                tg.start_soon([&, w]() -> anyio::Task<> {
                    sums[static_cast<std::size_t>(w)] = co_await anyio::to_thread::run_sync([&, w] {
                        std::int64_t sum = 0;
                        for (int i = 0; i < stress_calls_per_worker; ++i) {
                            const int n = w * 100000 + i;
                            if (i % 2 == 0) {
                                sum += anyio::from_thread::run_sync([&loop_side_total, n] {
                                    loop_side_total += n;
                                    return n;
                                });
                            } else {
                                sum += anyio::from_thread::run([&loop_side_total, n]() -> anyio::Task<int> {
                                    loop_side_total += n;
                                    co_return n;
                                });
                            }
                        }
                        return sum;
                    });
                });
            }
            co_return;
        });
    });
    std::int64_t expected_total = 0;
    for (int w = 0; w < workers; ++w) {
        std::int64_t expected = 0;
        for (int i = 0; i < stress_calls_per_worker; ++i) expected += w * 100000 + i;
        CHECK(sums[static_cast<std::size_t>(w)] == expected);
        expected_total += expected;
    }
    CHECK(loop_side_total == expected_total);
}

// ---------------------------------------------------------------------------------------------
// Tasks and workers the loop gives up on at shutdown (shutdown_timeout). Last in the file: a
// failure here can leave threads blocked or the heap damaged for whatever runs after it.
// ---------------------------------------------------------------------------------------------

TEST_CASE("An abandoned worker blocked in from_thread::run when the loop gives up on it gets "
          "RunFinishedError",
          "[from_thread]") {
    // The worker's coroutine shields itself from the cancellation, so it is still running
    // when run() detaches the worker (shutdown_timeout) and tears the loop down.
    struct Shared {
        std::promise<std::string> outcome;
        std::atomic<bool> coroutine_finished{false};
    };
    auto shared = std::make_shared<Shared>();
    std::future<std::string> outcome = shared->outcome.get_future();
    bool cancelled_caught = false;
    anyio::run(
        [&]() -> anyio::Task<> {
            anyio::Event entered;
            anyio::CancelScope scope;
            auto worker = [shared, &entered] {
                shared->outcome.set_value(outcome_of([&] {
                    anyio::from_thread::run([&]() -> anyio::Task<> {
                        entered.set();
                        anyio::CancelScope shield(anyio::CancelScope::time_point::max(), true);
                        co_await shield.run([]() -> anyio::Task<> { co_await anyio::sleep(10s); }());
                        shared->coroutine_finished = true;
                    });
                }));
            };
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await scope.run([&]() -> anyio::Task<> {
                        co_await anyio::to_thread::run_sync({.abandon_on_cancel = true},
                                                            std::move(worker));
                    }());
                    cancelled_caught = scope.cancelled_caught();
                });
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await entered.wait();
                    scope.cancel();
                });
                co_return;
            });
        }(),
        anyio::EventLoop::Options{.shutdown_timeout = 20ms});
    CHECK(cancelled_caught);
    REQUIRE(outcome.wait_for(5s) == std::future_status::ready);
    CHECK(outcome.get() == "RunFinishedError");
    CHECK_FALSE(shared->coroutine_finished.load());
}

TEST_CASE("A from_thread::run call whose task is held up by an orphaned worker when the loop "
          "finishes gets RunFinishedError",
          "[from_thread]") {
    // The plain thread's task waits in a shielded run_sync whose worker is still busy when
    // run() gives up on it (shutdown_timeout): the caller must be released, not left blocked.
    // Everything the helper threads touch lives in a shared block, so that a caller that never
    // returns can be detached without leaving dangling references behind.
    struct Shared {
        std::promise<void> release;  // lets the worker finish once run() has returned
        std::shared_future<void> released = release.get_future().share();
        std::promise<std::string> caller_outcome;
        anyio::Event worker_started;  // loop thread only
    };
    auto shared = std::make_shared<Shared>();
    std::future<std::string> caller_outcome = shared->caller_outcome.get_future();
    std::thread caller;
    anyio::run(
        [&]() -> anyio::Task<> {
            anyio::LoopToken token = anyio::lowlevel::current_token();
            caller = std::thread([shared, token] {
                shared->caller_outcome.set_value(outcome_of([&] {
                    anyio::from_thread::run(token, [&shared]() -> anyio::Task<> {
                        auto worker = [shared] {
                            anyio::from_thread::run_sync([&] { shared->worker_started.set(); });
                            shared->released.wait();
                        };
                        co_await anyio::to_thread::run_sync(std::move(worker));  // shielded
                    });
                }));
            });
            co_await shared->worker_started.wait();
            // The main task ends; the plain thread's task is still waiting for its worker.
        }(),
        anyio::EventLoop::Options{.shutdown_timeout = 20ms});
    shared->release.set_value();
    if (caller_outcome.wait_for(5s) != std::future_status::ready) {
        caller.detach();
        FAIL("from_thread::run is still blocked 5 s after its loop finished");
    }
    caller.join();
    CHECK(caller_outcome.get() == "RunFinishedError");
}

TEST_CASE("A task left waiting in an abandon_on_cancel run_sync when the loop gives up on its "
          "worker is torn down safely",
          "[from_thread]") {
    // A task started by from_thread::run from a plain thread outlives the main task; it waits
    // in run_sync({.abandon_on_cancel = true}) (never cancelled), so at shutdown the loop
    // detaches the busy worker after shutdown_timeout and destroys the task's frame. The
    // worker returns the moment the loop has closed, and its completion (which frees the job)
    // then races with the teardown of that frame. Many newer tasks (destroyed first, newest
    // first) make the teardown reach the frame late. Run under ASan to see a use after free.
    struct Shared {
        anyio::Event worker_started;  // loop thread only
        anyio::Event fillers_started;
        std::promise<std::string> caller_outcome;
        std::promise<std::string> filler_outcome;
        std::promise<std::string> worker_outcome;
    };
    auto shared = std::make_shared<Shared>();
    std::future<std::string> caller_outcome = shared->caller_outcome.get_future();
    std::future<std::string> filler_outcome = shared->filler_outcome.get_future();
    std::future<std::string> worker_outcome = shared->worker_outcome.get_future();
    std::thread caller;
    std::thread filler;
    anyio::run(
        [&]() -> anyio::Task<> {
            anyio::LoopToken token = anyio::lowlevel::current_token();
            caller = std::thread([shared, token] {
                shared->caller_outcome.set_value(outcome_of([&] {
                    anyio::from_thread::run(token, [&shared, &token]() -> anyio::Task<> {
                        auto worker = [shared, token] {
                            anyio::from_thread::run_sync([&] { shared->worker_started.set(); });
                            // Polling is the only way to see the loop close from here; bounded.
                            const auto until = Clock::now() + 10s;
                            while (!token.finished() && Clock::now() < until) {
                                std::this_thread::yield();
                            }
                            shared->worker_outcome.set_value(token.finished() ? "saw the loop finish"
                                                                              : "timed out");
                        };
                        co_await anyio::to_thread::run_sync({.abandon_on_cancel = true},
                                                            std::move(worker));
                    });
                }));
            });
            co_await shared->worker_started.wait();
            filler = std::thread([shared, token] {
                shared->filler_outcome.set_value(outcome_of([&] {
                    anyio::from_thread::run(token, [&shared]() -> anyio::Task<> {
                        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                            for (int i = 0; i < 10000; ++i) {
                                tg.start_soon([]() -> anyio::Task<> { co_await anyio::sleep(1h); });
                            }
                            shared->fillers_started.set();
                            co_return;
                        });
                    });
                }));
            });
            co_await shared->fillers_started.wait();
        }(),
        anyio::EventLoop::Options{.shutdown_timeout = 20ms});
    const bool callers_returned =
        caller_outcome.wait_for(5s) == std::future_status::ready &&
        filler_outcome.wait_for(5s) == std::future_status::ready;
    if (!callers_returned) {
        caller.detach();
        filler.detach();
        FAIL("from_thread::run is still blocked 5 s after its loop finished");
    }
    caller.join();
    filler.join();
    CHECK(caller_outcome.get() == "RunFinishedError");
    CHECK(filler_outcome.get() == "RunFinishedError");
    REQUIRE(worker_outcome.wait_for(15s) == std::future_status::ready);
    CHECK(worker_outcome.get() == "saw the loop finish");
}

// ---------------------------------------------------------------------------------------------
// Regression tests for issue 8
// ---------------------------------------------------------------------------------------------

TEST_CASE("A worker running a loop of its own calls back into the outer loop without a token",
          "[from_thread]") {
    // The check against "called on the loop's own thread" used to reject any thread that runs
    // a loop, instead of comparing the loop the call would go to.
    const std::thread::id outer_loop_thread = std::this_thread::get_id();
    std::thread::id sync_ran_on;
    std::thread::id async_ran_on;
    std::string cancelled_check;
    int sum = run_in_worker([&] {
        return anyio::run([&]() -> anyio::Task<int> {
            int a = anyio::from_thread::run_sync([&] {
                sync_ran_on = std::this_thread::get_id();
                return 40;
            });
            int b = anyio::from_thread::run(add_on_loop, 1, 1, &async_ran_on);
            cancelled_check = outcome_of([] { anyio::from_thread::check_cancelled(); });
            co_await anyio::checkpoint();
            co_return a + b;
        });
    });
    CHECK(sum == 42);
    CHECK(sync_ran_on == outer_loop_thread);
    CHECK(async_ran_on == outer_loop_thread);
    CHECK(cancelled_check == "returned");
}

// ---------------------------------------------------------------------------------------------
// Issue 8 item 6: once the main task has finished, no user code runs on the loop; callers
// blocked on its tasks are released with RunFinishedError
// ---------------------------------------------------------------------------------------------

namespace {

// Shared by the loop thread, a plain thread and a worker; outlives a run() that hangs.
struct NestedCallBack {
    anyio::LoopToken token;
    anyio::Event* inner_started = nullptr;  // the main task's; set once, on the loop
    std::atomic<bool> main_done{false};     // set by the main task as its last statement
    std::atomic<int> steps_after_main{0};
    std::promise<std::string> worker_outcome;  // the worker's from_thread::run
    std::promise<std::string> caller_outcome;  // the plain thread's from_thread::run
    std::promise<void> run_returned;

    void note() {
        // acquire: pairs with the main task's release store, so "after" means after.
        if (main_done.load(std::memory_order_acquire)) {
            steps_after_main.fetch_add(1, std::memory_order_relaxed);
        }
    }
};

// The worker's task: never ends by itself.
anyio::Task<> wait_on_loop_for_ever(std::shared_ptr<NestedCallBack> shared) {
    shared->inner_started->set();
    for (;;) {
        co_await anyio::sleep(1ms);
        shared->note();
    }
}

// The plain thread's task: a shielded call (its job lives in this frame) whose fn waits in
// from_thread::run for the task above.
anyio::Task<> offload_a_call_back(std::shared_ptr<NestedCallBack> shared) {
    auto worker = [shared] {
        shared->worker_outcome.set_value(outcome_of([&] {
            anyio::from_thread::run(wait_on_loop_for_ever, shared);
        }));
    };
    co_await anyio::to_thread::run_sync(worker);
    shared->note();
}

}  // namespace

TEST_CASE("A plain thread's from_thread::run task whose offloaded call waits in "
          "from_thread::run ends with RunFinishedError for both callers when the main task "
          "finishes, and run returns",
          "[from_thread][shutdown]") {
    // Leaving run() used to wait for the busy worker while running the loop as usual, and the
    // worker waited for a task that never ends: run() hung for ever.
    const bool with_timeout = GENERATE(false, true);
    CAPTURE(with_timeout);
    auto shared = std::make_shared<NestedCallBack>();
    std::future<std::string> worker_outcome = shared->worker_outcome.get_future();
    std::future<std::string> caller_outcome = shared->caller_outcome.get_future();
    std::future<void> run_returned = shared->run_returned.get_future();
    const auto started = Clock::now();
    std::thread loop_thread([shared, with_timeout] {
        anyio::EventLoop::Options options;
        if (with_timeout) options.shutdown_timeout = 30s;  // run() must not need it
        std::thread caller;
        anyio::run(
            [&shared, &caller]() -> anyio::Task<> {
                anyio::Event inner_started;
                shared->inner_started = &inner_started;
                shared->token = anyio::lowlevel::current_token();
                caller = std::thread([shared] {
                    shared->caller_outcome.set_value(outcome_of([&] {
                        anyio::from_thread::run(shared->token, offload_a_call_back, shared);
                    }));
                });
                co_await inner_started.wait();
                shared->main_done.store(true, std::memory_order_release);  // see note()
            }(),
            options);
        caller.join();
        shared->run_returned.set_value();
    });
    if (run_returned.wait_for(10s) != std::future_status::ready) {
        loop_thread.detach();  // everything it touches is in `shared`
        FAIL("run() is still running 10 s after its main task finished");
    }
    loop_thread.join();
    CHECK(Clock::now() - started < 5s);
    REQUIRE(worker_outcome.wait_for(0s) == std::future_status::ready);
    CHECK(worker_outcome.get() == "RunFinishedError");
    CHECK(caller_outcome.get() == "RunFinishedError");
    CHECK(shared->steps_after_main == 0);
}

TEST_CASE("call_soon_threadsafe and from_thread calls from an abandoned worker after the main "
          "task has finished throw RunFinishedError and never run, with and without "
          "shutdown_timeout",
          "[from_thread][shutdown]") {
    // Leaving run() used to run them while it waited for the worker.
    const bool with_timeout = GENERATE(false, true);
    CAPTURE(with_timeout);
    struct Shared {
        anyio::LoopToken token;
        std::atomic<bool> ran{false};  // set by whichever of the calls ran
        // Written by the worker before `done`:
        bool saw_finished = false;
        std::string call_soon_threadsafe;
        std::string run_sync;
        std::string run;
        std::promise<void> done;
    };
    auto shared = std::make_shared<Shared>();
    std::future<void> done = shared->done.get_future();
    anyio::EventLoop::Options options;
    if (with_timeout) options.shutdown_timeout = 30s;  // run() waits for the worker either way
    bool cancelled_caught = false;
    const auto started = Clock::now();
    anyio::run(
        [&]() -> anyio::Task<> {
            shared->token = anyio::lowlevel::current_token();
            anyio::CancelScope scope;
            anyio::Event running;
            auto worker = [shared, &running] {
                anyio::from_thread::run_sync([&running] { running.set(); });
                // The caller leaves now and the main task finishes. Polling is the only way to
                // see that from here; bounded.
                const auto until = Clock::now() + 5s;
                while (!shared->token.finished() && Clock::now() < until) {
                    std::this_thread::sleep_for(1ms);
                }
                shared->saw_finished = shared->token.finished();
                shared->call_soon_threadsafe = outcome_of([&] {
                    shared->token.call_soon_threadsafe([shared] { shared->ran = true; });
                });
                shared->run_sync = outcome_of([&] {
                    anyio::from_thread::run_sync([&] { shared->ran = true; });
                });
                shared->run = outcome_of([&] {
                    anyio::from_thread::run([&]() -> anyio::Task<> {
                        shared->ran = true;
                        co_return;
                    });
                });
                shared->done.set_value();
            };
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await scope.run([&]() -> anyio::Task<> {
                        co_await anyio::to_thread::run_sync({.abandon_on_cancel = true}, worker);
                    }());
                });
                co_await running.wait();
                scope.cancel();
            });
            cancelled_caught = scope.cancelled_caught();
        }(),
        options);
    const auto run_took = Clock::now() - started;
    CHECK(cancelled_caught);
    // run() joined the worker: it has finished, and what it wrote is visible.
    REQUIRE(done.wait_for(0s) == std::future_status::ready);
    CHECK(shared->saw_finished);
    CHECK(shared->call_soon_threadsafe == "RunFinishedError");
    CHECK(shared->run_sync == "RunFinishedError");
    CHECK(shared->run == "RunFinishedError");
    CHECK_FALSE(shared->ran.load());
    CHECK(run_took < 4s);
}
