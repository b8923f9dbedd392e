#include <anyio/blocking_portal.hpp>

#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/from_thread.hpp>
#include <anyio/task.hpp>
#include <anyio/to_thread.hpp>

#include <pthread.h>
#include <sys/prctl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <future>
#include <latch>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

// Tests for anyio::BlockingPortal (include/anyio/blocking_portal.hpp): an event loop on a
// thread of its own that plain threads call coroutines and loop code through.
//
// Assertions run only on the test's main thread: the portal's loop thread and helper threads
// record what they saw into variables that are checked after a synchronising step (the call
// returning, a future, a join).

using namespace std::chrono_literals;
using namespace anyio_test;

namespace {

#if defined(ANYIO_TEST_SANITIZED)
constexpr int stress_calls_per_thread = 2500;  // about 1.5 s at the full count under TSan
#else
constexpr int stress_calls_per_thread = 10000;
#endif

using Clock = std::chrono::steady_clock;

std::vector<std::string> thread_names() {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
        std::ifstream comm(entry.path() / "comm");
        std::string name;
        if (std::getline(comm, name)) names.push_back(name);
    }
    return names;
}

std::size_t portal_threads() {
    auto names = thread_names();
    return static_cast<std::size_t>(std::count(names.begin(), names.end(), "anyio portal"));
}

// A joined thread may linger in /proc for a moment after pthread_join returns: poll (bounded)
// until the count is `expected`, and return the last count seen.
std::size_t settle_thread_count(std::size_t expected) {
    const auto until = Clock::now() + 5s;
    std::size_t count = thread_count();
    while (count != expected && Clock::now() < until) {
        std::this_thread::sleep_for(1ms);
        count = thread_count();
    }
    return count;
}

// The thread count with no portal running. A thread is started and joined first so that
// runtime helper threads started lazily (sanitizers) are already part of the baseline.
std::size_t baseline_thread_count() {
    std::thread([] {}).join();
    // That thread, or one an earlier test joined, may still linger in /proc: take the count
    // once it has held still for 50 ms (a CI run once counted a lingering thread here).
    std::size_t count = thread_count();
    auto stable_since = Clock::now();
    const auto until = stable_since + 5s;
    while (Clock::now() - stable_since < 50ms && Clock::now() < until) {
        std::this_thread::sleep_for(1ms);
        if (std::size_t now = thread_count(); now != count) {
            count = now;
            stable_since = Clock::now();
        }
    }
    return count;
}

std::string current_thread_name() {
    char name[32] = {};
    ::pthread_getname_np(::pthread_self(), name, sizeof name);
    return name;
}

anyio::Task<std::string> concatenate(std::string a, const std::string& b) {
    co_await anyio::checkpoint();
    co_await anyio::sleep(1ms);  // b must stay valid across suspensions
    co_return a + b;
}

anyio::Task<> set_flag(bool* flag) {
    co_await anyio::checkpoint();
    *flag = true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Results and errors
// ---------------------------------------------------------------------------------------------

TEST_CASE("A portal runs coroutines and plain callables on its own loop thread and returns "
          "their results",
          "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::thread::id coroutine_thread;
    std::thread::id callable_thread;

    CHECK(portal.call(add_on_loop, 1, 2, &coroutine_thread) == 3);
    CHECK(portal.call(
              [&](int a, int b) {
                  callable_thread = std::this_thread::get_id();
                  return a * b;
              },
              6, 7) == 42);
    CHECK(coroutine_thread == callable_thread);
    CHECK(coroutine_thread != std::this_thread::get_id());
    CHECK(coroutine_thread != std::thread::id{});

    int target = 1;
    int& coroutine_ref = portal.call(reference_to, target);
    CHECK(&coroutine_ref == &target);
    int& callable_ref = portal.call([&]() -> int& { return target; });
    CHECK(&callable_ref == &target);

    std::unique_ptr<int> owned = portal.call(make_owned, 5);
    REQUIRE(owned);
    CHECK(*owned == 5);
    std::unique_ptr<int> owned_sync = portal.call([] { return std::make_unique<int>(6); });
    REQUIRE(owned_sync);
    CHECK(*owned_sync == 6);

    bool flag = false;
    portal.call(set_flag, &flag);
    CHECK(flag);
    bool void_ran = false;
    portal.call([&] { void_ran = true; });
    CHECK(void_ran);

    const std::string suffix = "def";
    CHECK(portal.call(concatenate, std::string("abc"), suffix) == "abcdef");

    // Loop primitives work in a plain callable too: it runs on the loop thread.
    std::string loop_seen;
    portal.call([&] {
        loop_seen = anyio::EventLoop::current() != nullptr ? "loop" : "no loop";
    });
    CHECK(loop_seen == "loop");
}

TEST_CASE("Exceptions from the portal's coroutines and callables are rethrown in the caller "
          "with their type",
          "[portal]") {
    auto portal = anyio::start_blocking_portal();
    CHECK(outcome_of([&] { portal.call(throw_boom, 4); }) == "Boom 4");
    CHECK(outcome_of([&] { portal.call(throw_custom, "async failure"); }) ==
          "CustomError: async failure");
    CHECK(outcome_of([&] { portal.call([]() -> int { throw Boom{5}; }); }) == "Boom 5");
    CHECK(outcome_of([&] { portal.call([] { throw CustomError("sync failure"); }); }) ==
          "CustomError: sync failure");
    CHECK_THROWS_AS(portal.call(throw_custom, "typed"), CustomError);
    // A callable that throws before it returns a task at all.
    auto no_task = [](int code) -> anyio::Task<int> {
        if (code != 0) throw Boom{code};
        return throw_boom(0);
    };
    CHECK(outcome_of([&] { portal.call(no_task, 6); }) == "Boom 6");
    std::future<int> no_task_future = portal.start_task_soon(no_task, 7);
    CHECK(outcome_of([&] { no_task_future.get(); }) == "Boom 7");
    // The portal is unharmed.
    CHECK(portal.call(add_on_loop, 20, 22, nullptr) == 42);
}

TEST_CASE("start_task_soon returns a std::future of the task's result", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::thread::id ran_on;
    std::future<int> sum = portal.start_task_soon(add_on_loop, 2, 3, &ran_on);
    bool flag = false;
    std::future<void> done = portal.start_task_soon(set_flag, &flag);
    std::future<std::unique_ptr<int>> owned = portal.start_task_soon(make_owned, 8);
    std::future<int> boom = portal.start_task_soon(throw_boom, 9);
    std::future<int> custom = portal.start_task_soon(throw_custom, std::string("future failure"));

    CHECK(sum.get() == 5);
    CHECK(ran_on != std::this_thread::get_id());
    done.get();
    CHECK(flag);
    std::unique_ptr<int> value = owned.get();
    REQUIRE(value);
    CHECK(*value == 8);
    CHECK(outcome_of([&] { boom.get(); }) == "Boom 9");
    CHECK(outcome_of([&] { custom.get(); }) == "CustomError: future failure");
    CHECK(portal.call(add_on_loop, 1, 1, nullptr) == 2);
}

TEST_CASE("start_task_soon copies its arguments: the caller's objects may change or go away",
          "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::future<std::string> joined;
    std::string prefix = "left-";
    {
        std::string suffix = "right";
        joined = portal.start_task_soon(concatenate, prefix, suffix);
        suffix = "changed";
        prefix = "changed";
    }  // suffix is gone; the task may still be sleeping inside concatenate
    CHECK(joined.get() == "left-right");
}

TEST_CASE("A failing task does not cancel the portal's other tasks", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::future<int> slow = portal.start_task_soon([]() -> anyio::Task<int> {
        co_await anyio::sleep(20ms);
        co_return 1;
    });
    std::future<int> failing = portal.start_task_soon(throw_custom, std::string("failed"));
    CHECK(outcome_of([&] { failing.get(); }) == "CustomError: failed");
    CHECK(outcome_of([&] { portal.call(throw_boom, 1); }) == "Boom 1");
    CHECK(slow.get() == 1);
}

TEST_CASE("Calls from different threads run concurrently as tasks of the portal's loop",
          "[portal]") {
    auto portal = anyio::start_blocking_portal();
    anyio::Event gate;  // used on the portal's loop thread only
    std::promise<void> entered;
    std::future<void> entered_future = entered.get_future();
    int other_result = 0;
    std::thread other([&] {
        other_result = portal.call([&]() -> anyio::Task<int> {
            entered.set_value();
            co_await gate.wait();
            co_return 3;
        });
    });
    REQUIRE(entered_future.wait_for(30s) == std::future_status::ready);
    // The other thread's call is parked in the loop; this call still gets through.
    CHECK(portal.call([](int x) { return x + 1; }, 1) == 2);
    portal.call([&] { gate.set(); });
    other.join();
    CHECK(other_result == 3);
}

// ---------------------------------------------------------------------------------------------
// Tokens, nesting and the error cases
// ---------------------------------------------------------------------------------------------

TEST_CASE("portal.token() lets other threads use from_thread on the portal's loop", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    const std::thread::id portal_thread = portal.call([] { return std::this_thread::get_id(); });
    anyio::LoopToken token = portal.token();
    REQUIRE(static_cast<bool>(token));
    CHECK_FALSE(token.finished());

    std::thread::id sync_ran_on;
    std::thread::id coroutine_ran_on;
    int sync_result = 0;
    int async_result = 0;
    std::string error;
    std::thread other([&, token] {
        sync_result = anyio::from_thread::run_sync(
            token,
            [&](int x) {
                sync_ran_on = std::this_thread::get_id();
                return x * 3;
            },
            5);
        async_result = anyio::from_thread::run(token, add_on_loop, 4, 5, &coroutine_ran_on);
        error = outcome_of([&] { anyio::from_thread::run(token, throw_boom, 6); });
    });
    other.join();
    CHECK(sync_result == 15);
    CHECK(sync_ran_on == portal_thread);
    CHECK(async_result == 9);
    CHECK(coroutine_ran_on == portal_thread);
    CHECK(error == "Boom 6");
    // The main thread is a plain thread too.
    CHECK(anyio::from_thread::run_sync(token, [] { return 1; }) == 1);
}

TEST_CASE("A portal's loop can call into another portal's loop", "[portal]") {
    auto first = anyio::start_blocking_portal();
    auto second = anyio::start_blocking_portal();
    const std::thread::id second_thread = second.call([] { return std::this_thread::get_id(); });
    std::thread::id ran_on;
    int result = first.call([&] {
        return second.call([&] {
                   ran_on = std::this_thread::get_id();
                   return 10;
               }) +
               anyio::from_thread::run_sync(second.token(), [] { return 1; });
    });
    CHECK(result == 11);
    CHECK(ran_on == second_thread);
}

TEST_CASE("A worker thread of the portal's loop can call back through the portal", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    int result = portal.call([&]() -> anyio::Task<int> {
        co_return co_await anyio::to_thread::run_sync([&] {
            return portal.call(add_on_loop, 1, 2, nullptr) + portal.call([] { return 10; }) +
                   anyio::from_thread::run_sync([] { return 100; });
        });
    });
    CHECK(result == 113);
}

TEST_CASE("Calling into a portal from its own loop thread throws std::logic_error", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::string nested_sync;
    std::string nested_async;
    std::string nested_start;
    std::string nested_stop;
    std::string nested_token;
    std::string from_coroutine;
    portal.call([&] {
        nested_sync = outcome_of([&] { portal.call([] { return 1; }); });
        nested_async = outcome_of([&] { portal.call(add_on_loop, 1, 2, nullptr); });
        nested_start = outcome_of([&] { (void)portal.start_task_soon(make_owned, 1); });
        nested_stop = outcome_of([&] { portal.stop(); });
        nested_token = outcome_of([&] { anyio::from_thread::run_sync(portal.token(), [] {}); });
    });
    portal.call([&]() -> anyio::Task<> {
        from_coroutine = outcome_of([&] { portal.call([] { return 1; }); });
        co_return;
    });
    CHECK(nested_sync == "std::logic_error");
    CHECK(nested_async == "std::logic_error");
    CHECK(nested_start == "std::logic_error");
    CHECK(nested_stop == "std::logic_error");
    CHECK(nested_token == "std::logic_error");
    CHECK(from_coroutine == "std::logic_error");
    // Still running and usable.
    CHECK(portal.call(add_on_loop, 2, 2, nullptr) == 4);
}

TEST_CASE("After stop, calls into the portal throw RunFinishedError", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    anyio::LoopToken token = portal.token();
    CHECK(portal.call(add_on_loop, 1, 2, nullptr) == 3);
    portal.stop();

    bool ran = false;
    CHECK_THROWS_AS(portal.call(add_on_loop, 1, 2, nullptr), anyio::RunFinishedError);
    CHECK_THROWS_AS(portal.call([&] { ran = true; }), anyio::RunFinishedError);
    CHECK_THROWS_AS(portal.start_task_soon(set_flag, &ran), anyio::RunFinishedError);
    CHECK(token.finished());
    CHECK_THROWS_AS(anyio::from_thread::run_sync(token, [&] { ran = true; }),
                    anyio::RunFinishedError);
    CHECK_THROWS_AS(anyio::from_thread::run_sync(portal.token(), [&] { ran = true; }),
                    anyio::RunFinishedError);

    std::string other_call;
    std::thread other([&] { other_call = outcome_of([&] { portal.call([&] { ran = true; }); }); });
    other.join();
    CHECK(other_call == "RunFinishedError");
    CHECK_FALSE(ran);

    CHECK_NOTHROW(portal.stop());  // idempotent
    CHECK_NOTHROW(portal.stop(true));
}

// ---------------------------------------------------------------------------------------------
// Stopping
// ---------------------------------------------------------------------------------------------

TEST_CASE("The portal's loop runs on a thread named \"anyio portal\" that is gone after stop",
          "[portal]") {
    const std::size_t baseline = baseline_thread_count();
    const std::size_t named_before = portal_threads();

    auto portal = anyio::start_blocking_portal();
    CHECK(thread_count() == baseline + 1);
    CHECK(portal_threads() == named_before + 1);
    CHECK(portal.call([] { return current_thread_name(); }) == "anyio portal");

    portal.stop();
    CHECK(settle_thread_count(baseline) == baseline);
    CHECK(portal_threads() == named_before);
}

TEST_CASE("Stopping a portal also joins the worker threads its loop started", "[portal]") {
    const std::size_t baseline = baseline_thread_count();
    auto portal = anyio::start_blocking_portal();
    std::size_t during = 0;
    int total = portal.call([&]() -> anyio::Task<int> {
        int sum = 0;
        std::latch all_running(3);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 1; i <= 3; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> {
                    sum += co_await anyio::to_thread::run_sync([&all_running, i] {
                        all_running.arrive_and_wait();  // three workers at once
                        return i;
                    });
                });
            }
            co_return;
        });
        during = thread_count();
        co_return sum;
    });
    CHECK(total == 6);
    CHECK(during == baseline + 4);  // the portal and its three (now idle) workers
    portal.stop();
    CHECK(settle_thread_count(baseline) == baseline);
}

TEST_CASE("stop() waits for the tasks still running and keeps their results", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::promise<void> task_started;
    std::future<void> task_started_future = task_started.get_future();
    std::promise<void> call_started;
    std::future<void> call_started_future = call_started.get_future();

    std::future<int> task = portal.start_task_soon([&task_started]() -> anyio::Task<int> {
        task_started.set_value();
        co_await anyio::sleep(50ms);
        co_return 7;
    });
    int call_result = 0;
    std::thread caller([&] {
        call_result = portal.call([&]() -> anyio::Task<int> {
            call_started.set_value();
            co_await anyio::sleep(50ms);
            co_return 8;
        });
    });
    REQUIRE(task_started_future.wait_for(30s) == std::future_status::ready);
    REQUIRE(call_started_future.wait_for(30s) == std::future_status::ready);

    portal.stop();
    CHECK(task.wait_for(0s) == std::future_status::ready);
    CHECK(task.get() == 7);
    caller.join();
    CHECK(call_result == 8);
}

TEST_CASE("stop(true) cancels the tasks still running: futures hold anyio::Cancelled and "
          "blocked calls throw it",
          "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::promise<void> task_started;
    std::future<void> task_started_future = task_started.get_future();
    std::promise<void> call_started;
    std::future<void> call_started_future = call_started.get_future();
    bool task_finished = false;  // written on the portal thread, read after stop

    std::future<int> task = portal.start_task_soon([&]() -> anyio::Task<int> {
        task_started.set_value();
        co_await anyio::sleep(10s);
        task_finished = true;
        co_return 1;
    });
    std::string call_outcome;
    std::thread caller([&] {
        call_outcome = outcome_of([&] {
            portal.call([&]() -> anyio::Task<> {
                call_started.set_value();
                co_await anyio::sleep(10s);
            });
        });
    });
    REQUIRE(task_started_future.wait_for(30s) == std::future_status::ready);
    REQUIRE(call_started_future.wait_for(30s) == std::future_status::ready);

    const auto start = Clock::now();
    portal.stop(true);
    CHECK(Clock::now() - start < 5s);
    CHECK_THROWS_AS(task.get(), anyio::Cancelled);
    caller.join();
    CHECK(call_outcome == "Cancelled");
    CHECK_FALSE(task_finished);
}

TEST_CASE("The destructor stops the portal and waits for its tasks", "[portal]") {
    const std::size_t baseline = baseline_thread_count();
    std::future<int> task;
    {
        auto portal = anyio::start_blocking_portal();
        CHECK(thread_count() == baseline + 1);
        std::promise<void> started;
        std::future<void> started_future = started.get_future();
        task = portal.start_task_soon([&started]() -> anyio::Task<int> {
            started.set_value();
            co_await anyio::sleep(30ms);
            co_return 9;
        });
        REQUIRE(started_future.wait_for(30s) == std::future_status::ready);
    }
    CHECK(task.wait_for(0s) == std::future_status::ready);
    CHECK(task.get() == 9);
    CHECK(settle_thread_count(baseline) == baseline);
}

TEST_CASE("A portal can be move-constructed and move-assigned", "[portal]") {
    const std::size_t baseline = baseline_thread_count();
    auto first = anyio::start_blocking_portal();
    const std::thread::id first_thread = first.call([] { return std::this_thread::get_id(); });

    anyio::BlockingPortal moved(std::move(first));
    CHECK(thread_count() == baseline + 1);  // moving starts and stops nothing
    CHECK(moved.call([] { return std::this_thread::get_id(); }) == first_thread);
    CHECK(moved.call(add_on_loop, 3, 4, nullptr) == 7);
    CHECK_NOTHROW(first.stop());  // the moved-from portal owns nothing
    CHECK(moved.call(add_on_loop, 1, 1, nullptr) == 2);

    auto other = anyio::start_blocking_portal();
    CHECK(thread_count() == baseline + 2);
    other = std::move(moved);  // stops the portal `other` had
    CHECK(settle_thread_count(baseline + 1) == baseline + 1);
    CHECK(other.call([] { return std::this_thread::get_id(); }) == first_thread);
    CHECK(other.call(add_on_loop, 5, 5, nullptr) == 10);

    other.stop();
    CHECK(settle_thread_count(baseline) == baseline);
}

TEST_CASE("Calls racing with stop() either complete or throw RunFinishedError", "[portal]") {
    auto portal = anyio::start_blocking_portal();
    constexpr int callers = 4;
    std::latch started(callers);
    std::vector<std::int64_t> completed(callers, 0);
    std::vector<std::string> last_outcome(callers);
    std::vector<std::thread> threads;
    for (int i = 0; i < callers; ++i) {
        threads.emplace_back([&, i] {
            const auto index = static_cast<std::size_t>(i);
            started.count_down();
            for (;;) {
                std::string outcome = outcome_of([&] {
                    if (portal.call([](int x) { return x; }, 1) == 1) ++completed[index];
                    if (portal.call(add_on_loop, 0, 1, nullptr) == 1) ++completed[index];
                });
                if (outcome != "returned") {
                    last_outcome[index] = outcome;
                    return;
                }
            }
        });
    }
    started.wait();
    portal.call([] {});  // the callers are under way
    portal.stop();
    for (auto& thread : threads) thread.join();
    for (const auto& outcome : last_outcome) CHECK(outcome == "RunFinishedError");
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

TEST_CASE("8 threads making 10,000 calls each all get their own results", "[portal][stress]") {
    constexpr int threads_count = 8;
    auto portal = anyio::start_blocking_portal();
    std::vector<std::int64_t> sums(threads_count, 0);
    std::vector<std::string> errors(threads_count);
    std::int64_t loop_side_total = 0;  // touched on the portal's loop thread only
    std::latch go(threads_count);
    std::vector<std::thread> threads;
    for (int t = 0; t < threads_count; ++t) {
        threads.emplace_back([&, t] {
            const auto index = static_cast<std::size_t>(t);
            go.arrive_and_wait();
            errors[index] = outcome_of([&] {
                std::int64_t sum = 0;
                for (int i = 0; i < stress_calls_per_thread; ++i) {
                    const std::int64_t n = std::int64_t{t} * 1000000 + i;
                    if (i % 2 == 0) {
                        sum += portal.call([&loop_side_total](std::int64_t v) {
                            loop_side_total += v;
                            return v;
                        }, n);
                    } else {
                        sum += portal.call([&loop_side_total](std::int64_t v) -> anyio::Task<std::int64_t> {
                            loop_side_total += v;
                            co_return v;
                        }, n);
                    }
                }
                sums[index] = sum;
            });
        });
    }
    for (auto& thread : threads) thread.join();
    portal.stop();

    std::int64_t expected_total = 0;
    for (int t = 0; t < threads_count; ++t) {
        std::int64_t expected = 0;
        for (int i = 0; i < stress_calls_per_thread; ++i) expected += std::int64_t{t} * 1000000 + i;
        CHECK(errors[static_cast<std::size_t>(t)] == "returned");
        CHECK(sums[static_cast<std::size_t>(t)] == expected);
        expected_total += expected;
    }
    CHECK(loop_side_total == expected_total);
}

TEST_CASE("Many threads starting tasks with start_task_soon all get their results",
          "[portal][stress]") {
    constexpr int threads_count = 4;
    constexpr int tasks_per_thread = stress_calls_per_thread / 10;
    auto portal = anyio::start_blocking_portal();
    std::vector<std::int64_t> sums(threads_count, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < threads_count; ++t) {
        threads.emplace_back([&, t] {
            std::vector<std::future<int>> futures;
            futures.reserve(tasks_per_thread);
            for (int i = 0; i < tasks_per_thread; ++i) {
                futures.push_back(portal.start_task_soon(add_on_loop, t, i, nullptr));
            }
            std::int64_t sum = 0;
            for (auto& future : futures) sum += future.get();
            sums[static_cast<std::size_t>(t)] = sum;
        });
    }
    for (auto& thread : threads) thread.join();
    for (int t = 0; t < threads_count; ++t) {
        std::int64_t expected = 0;
        for (int i = 0; i < tasks_per_thread; ++i) expected += t + i;
        CHECK(sums[static_cast<std::size_t>(t)] == expected);
    }
}

TEST_CASE("Exceptions keep their type and contents when many are thrown across the portal",
          "[portal][stress]") {
    // Each kind of failure, many times: the exception object is created on the portal's loop
    // thread and inspected (then freed) on this one. Under ThreadSanitizer this also checks
    // that the loop is done with the exception before it lets the caller go.
    auto portal = anyio::start_blocking_portal();
    auto no_task = [](int code) -> anyio::Task<int> {
        if (code != 0) throw Boom{code};
        return throw_boom(0);
    };
    constexpr int rounds = stress_calls_per_thread / 20;
    int async_ok = 0;
    int early_ok = 0;
    int sync_ok = 0;
    int future_ok = 0;
    int early_future_ok = 0;
    for (int i = 1; i <= rounds; ++i) {
        if (outcome_of([&] { portal.call(throw_boom, i); }) == "Boom " + std::to_string(i)) {
            ++async_ok;
        }
        if (outcome_of([&] { portal.call(no_task, i); }) == "Boom " + std::to_string(i)) {
            ++early_ok;
        }
        if (outcome_of([&] { portal.call([i]() -> int { throw Boom{i}; }); }) ==
            "Boom " + std::to_string(i)) {
            ++sync_ok;
        }
        std::future<int> future = portal.start_task_soon(throw_boom, i);
        if (outcome_of([&] { future.get(); }) == "Boom " + std::to_string(i)) ++future_ok;
        std::future<int> early_future = portal.start_task_soon(no_task, i);
        if (outcome_of([&] { early_future.get(); }) == "Boom " + std::to_string(i)) {
            ++early_future_ok;
        }
    }
    // The failure that happens before any task exists is the quickest round trip: more of it.
    int early_burst_ok = 0;
    for (int i = 1; i <= rounds * 10; ++i) {
        try {
            portal.call(no_task, i);
        } catch (const Boom& boom) {
            if (boom.code == i) ++early_burst_ok;
        }
    }
    CHECK(early_burst_ok == rounds * 10);
    CHECK(async_ok == rounds);
    CHECK(early_ok == rounds);
    CHECK(sync_ok == rounds);
    CHECK(future_ok == rounds);
    CHECK(early_future_ok == rounds);
}

// ---------------------------------------------------------------------------------------------
// Concurrent stop. Last in the file: if stop() is not safe to call from several threads at
// once, the failure can leave a thread blocked or the process in an undefined state.
// ---------------------------------------------------------------------------------------------

TEST_CASE("Several threads may stop a portal at once", "[portal]") {
    constexpr int stoppers = 4;
    const std::size_t baseline = baseline_thread_count();
    // Everything the stopping threads touch lives in a block they share: if a stop() never
    // returns, those threads are detached and keep it alive, and the remaining tests still run.
    struct Shared {
        anyio::BlockingPortal portal = anyio::start_blocking_portal();
        std::latch go{stoppers};
    };
    auto shared = std::make_shared<Shared>();
    std::vector<std::future<std::string>> outcomes;
    std::vector<std::thread> threads;
    for (int i = 0; i < stoppers; ++i) {
        std::promise<std::string> outcome;
        outcomes.push_back(outcome.get_future());
        threads.emplace_back([shared, outcome = std::move(outcome)]() mutable {
            shared->go.arrive_and_wait();
            outcome.set_value(outcome_of([&] { shared->portal.stop(); }));
        });
    }
    const auto deadline = Clock::now() + 5s;
    bool all_returned = true;
    for (auto& outcome : outcomes) {
        if (outcome.wait_until(deadline) != std::future_status::ready) all_returned = false;
    }
    if (!all_returned) {
        for (auto& thread : threads) thread.detach();
        FAIL("concurrent BlockingPortal::stop() calls did not all return within 5 s");
    }
    for (auto& thread : threads) thread.join();
    for (auto& outcome : outcomes) CHECK(outcome.get() == "returned");
    shared.reset();
    CHECK(settle_thread_count(baseline) == baseline);
}

TEST_CASE("Stopping a portal from a worker thread of its own loop throws std::logic_error",
          "[portal]") {
    auto portal = anyio::start_blocking_portal();
    std::string outcome = portal.call([&]() -> anyio::Task<std::string> {
        co_return co_await anyio::to_thread::run_sync([&] {
            try {
                portal.stop();
                return std::string("returned");
            } catch (const std::logic_error&) {
                return std::string("std::logic_error");
            }
        });
    });
    CHECK(outcome == "std::logic_error");
    portal.stop();
}

// ---------------------------------------------------------------------------------------------
// Regression tests for issue 8
// ---------------------------------------------------------------------------------------------

TEST_CASE("A portal destroyed on a worker thread of its own loop stops without blocking and its "
          "threads end",
          "[portal]") {
    // It used to call std::terminate: the portal's std::thread was destroyed still joinable.
    const std::size_t baseline = baseline_thread_count();
    auto portal = std::make_unique<anyio::BlockingPortal>(anyio::start_blocking_portal());
    // The worker destroys the portal only once start_task_soon has returned on this thread.
    std::promise<void> submitted;
    std::shared_future<void> submitted_future = submitted.get_future().share();
    std::future<int> result =
        portal->start_task_soon([&portal, submitted_future]() -> anyio::Task<int> {
            co_return co_await anyio::to_thread::run_sync(
                [&portal](std::shared_future<void> go) {
                    go.wait();
                    portal.reset();  // the last owner, on a worker thread of the portal's loop
                    return 5;
                },
                submitted_future);
        });
    submitted.set_value();
    REQUIRE(result.wait_for(5s) == std::future_status::ready);
    CHECK(result.get() == 5);
    CHECK(portal == nullptr);
    CHECK(settle_thread_count(baseline) == baseline);  // the portal's loop and worker ended
    CHECK(portal_threads() == 0);
}

namespace {

long timer_slack() { return static_cast<long>(::prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)); }

// The timer slack of a worker thread of `portal`'s loop.
long portal_worker_slack(anyio::BlockingPortal& portal) {
    return portal.call([]() -> anyio::Task<long> {
        co_return co_await anyio::to_thread::run_sync(timer_slack);
    });
}

}  // namespace

TEST_CASE("A portal's threads run with the timer slack of the thread that started it, not a "
          "loop's 1 ns",
          "[portal]") {
    const long original = timer_slack();
    ::prctl(PR_SET_TIMERSLACK, 123'456UL, 0, 0, 0);  // neither the default nor a loop's 1 ns
    long from_plain_thread = 0;
    long from_loop_thread = 0;
    {
        auto portal = anyio::start_blocking_portal();
        from_plain_thread = portal_worker_slack(portal);
    }
    anyio::run([&]() -> anyio::Task<> {
        // Started by a loop thread (whose slack is the loop's 1 ns while it runs).
        auto portal = anyio::start_blocking_portal();
        from_loop_thread = portal_worker_slack(portal);
        co_return;
    });
    const long after = timer_slack();
    ::prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(original), 0, 0, 0);
    CHECK(from_plain_thread == 123'456);
    CHECK(from_loop_thread == 123'456);
    CHECK(after == 123'456);
}
