#include <anyio/event_loop.hpp>

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/task.hpp>
#include <anyio/to_thread.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

// Tests for the event loop (include/anyio/event_loop.hpp): the forms of run(), the current
// loop, call_soon / call_soon_threadsafe / call_later / call_at, LoopToken, the clock, errors
// escaping callbacks and what leaving run() cleans up.

using namespace std::chrono_literals;

ANYIO_TEST_FAILING_OPERATOR_NEW();

namespace {

anyio::Task<int> value_of(int value) { co_return value; }

anyio::Task<int> add(int a, int b) { co_return a + b; }

anyio::Task<> set_flag(bool& flag) {
    flag = true;
    co_return;
}

anyio::Task<> wait_for(anyio::Event& event) { co_await event.wait(); }

// Sets `*flag` when destroyed: proves a coroutine frame was destroyed.
struct SetOnDestroy {
    bool* flag;
    ~SetOnDestroy() { *flag = true; }
};

anyio::Task<> wait_forever(anyio::Event& started, anyio::Event& never, bool* destroyed) {
    SetOnDestroy guard{destroyed};
    started.set();
    co_await never.wait();
}

anyio::Task<> sleep_forever(anyio::Event& started, bool* destroyed) {
    SetOnDestroy guard{destroyed};
    started.set();
    co_await anyio::sleep(24h);
}

// A chain of `depth` nested tasks whose innermost one waits on `never`; every level counts
// its frame's destruction.
anyio::Task<> nested_waiting(int depth, anyio::Event& never, anyio::Event& innermost_waiting,
                             int* destroyed) {
    struct Count {
        int* destroyed;
        ~Count() { ++*destroyed; }
    } count{destroyed};
    if (depth == 0) {
        innermost_waiting.set();
        co_await never.wait();
        co_return;
    }
    co_await nested_waiting(depth - 1, never, innermost_waiting, destroyed);
}

anyio::Task<> never_started(std::shared_ptr<int> resource, bool* ran) {
    *ran = true;
    co_await anyio::checkpoint();
    (void)resource;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The forms of run()
// ---------------------------------------------------------------------------------------------

TEST_CASE("anyio::run runs a Task and returns its value or rethrows its exception", "[loop]") {
    CHECK(anyio::run(value_of(12)) == 12);

    bool ran = false;
    anyio::run(set_flag(ran));
    CHECK(ran);

    CHECK_THROWS_AS(anyio::run([]() -> anyio::Task<int> {
                        throw std::out_of_range("from the main task");
                        co_return 0;
                    }),
                    std::out_of_range);
    CHECK(anyio::EventLoop::current() == nullptr);  // a failed run leaves no loop behind
}

TEST_CASE("anyio::run accepts a callable returning a Task, with arguments", "[loop]") {
    CHECK(anyio::run(add, 2, 3) == 5);
    CHECK(anyio::run(value_of, 9) == 9);

    int captured = 20;
    CHECK(anyio::run([&]() -> anyio::Task<int> { co_return captured + 1; }) == 21);
    CHECK(anyio::run([](int a, std::string b) -> anyio::Task<std::string> {
              co_return b + std::to_string(a);
          }, 4, std::string("n")) == "n4");

    bool ran = false;
    anyio::run(set_flag, std::ref(ran));
    CHECK(ran);
}

TEST_CASE("anyio::run accepts EventLoop::Options given with designated initializers",
          "[loop]") {
    std::chrono::steady_clock::duration idle{};
    std::int64_t tokens = 0;
    std::int64_t limiter_tokens = 0;
    anyio::run(
        [&]() -> anyio::Task<> {
            idle = anyio::EventLoop::current()->options().max_idle_time;
            tokens = anyio::EventLoop::current()->options().default_thread_tokens;
            limiter_tokens = anyio::to_thread::current_default_thread_limiter().total_tokens();
            co_return;
        }(),
        anyio::EventLoop::Options{.max_idle_time = 1s, .default_thread_tokens = 5});
    CHECK(idle == 1s);
    CHECK(tokens == 5);
    CHECK(limiter_tokens == 5);

    // And the defaults when no options are given.
    anyio::run([&]() -> anyio::Task<> {
        limiter_tokens = anyio::to_thread::current_default_thread_limiter().total_tokens();
        co_return;
    });
    CHECK(limiter_tokens == 40);
}

TEST_CASE("anyio::run on a thread already running a loop throws std::logic_error", "[loop]") {
    bool threw_task_form = false;
    bool threw_callable_form = false;
    bool threw_object_form = false;
    bool inner_ran = false;
    bool loop_still_works = false;
    anyio::run([&]() -> anyio::Task<> {
        try {
            anyio::run(set_flag(inner_ran));
        } catch (const std::logic_error&) {
            threw_task_form = true;
        }
        try {
            anyio::run(set_flag, std::ref(inner_ran));
        } catch (const std::logic_error&) {
            threw_callable_form = true;
        }
        try {
            anyio::EventLoop second;
            second.run(set_flag(inner_ran));
        } catch (const std::logic_error&) {
            threw_object_form = true;
        }
        co_await anyio::sleep(0s);  // the outer loop is unharmed
        loop_still_works = true;
    });
    CHECK(threw_task_form);
    CHECK(threw_callable_form);
    CHECK(threw_object_form);
    CHECK_FALSE(inner_ran);
    CHECK(loop_still_works);
}

TEST_CASE("An EventLoop object runs a task once; a second run throws std::logic_error",
          "[loop]") {
    anyio::EventLoop loop;
    anyio::EventLoop* current_inside = nullptr;
    int value = loop.run([&]() -> anyio::Task<int> {
        current_inside = anyio::EventLoop::current();
        co_return co_await value_of(6);
    }());
    CHECK(value == 6);
    CHECK(current_inside == &loop);
    CHECK(anyio::EventLoop::current() == nullptr);

    bool second_ran = false;
    CHECK_THROWS_AS(loop.run(set_flag(second_ran)), std::logic_error);
    CHECK_FALSE(second_ran);

    // The finished loop refuses posts from other threads too.
    CHECK_THROWS_AS(loop.call_soon_threadsafe([] {}), anyio::RunFinishedError);
}

TEST_CASE("An EventLoop that is never run is destroyed cleanly", "[loop]") {
    auto resource = std::make_shared<int>(0);
    bool ran = false;
    {
        anyio::EventLoop loop(anyio::EventLoop::Options{.default_thread_tokens = 2});
        loop.call_soon([resource] { (void)resource; });  // queued, never run
        loop.spawn(never_started(resource, &ran));       // scheduled, never run
        CHECK(resource.use_count() == 3);
    }
    CHECK_FALSE(ran);
    CHECK(resource.use_count() == 1);
    CHECK(anyio::EventLoop::current() == nullptr);
}

// ---------------------------------------------------------------------------------------------
// The current loop and tokens
// ---------------------------------------------------------------------------------------------

TEST_CASE("EventLoop::current() is nullptr outside a loop and the running loop inside",
          "[loop]") {
    CHECK(anyio::EventLoop::current() == nullptr);
    anyio::EventLoop* inside = nullptr;
    anyio::EventLoop* inside_nested_task = nullptr;
    std::atomic<bool> other_thread_saw_null{false};
    anyio::run([&]() -> anyio::Task<> {
        inside = anyio::EventLoop::current();
        inside_nested_task = co_await [&]() -> anyio::Task<anyio::EventLoop*> {
            co_await anyio::checkpoint();
            co_return anyio::EventLoop::current();
        }();
        std::thread other([&] {
            other_thread_saw_null = anyio::EventLoop::current() == nullptr;
        });
        other.join();
    });
    CHECK(inside != nullptr);
    CHECK(inside_nested_task == inside);
    CHECK(other_thread_saw_null);
    CHECK(anyio::EventLoop::current() == nullptr);
}

TEST_CASE("lowlevel::current_token() with no running loop throws NoEventLoopError", "[loop]") {
    CHECK_THROWS_AS(anyio::lowlevel::current_token(), anyio::NoEventLoopError);

    // Also on another thread while this thread runs a loop: the loop is per thread.
    std::atomic<int> outcome{0};
    bool token_inside = false;
    anyio::run([&]() -> anyio::Task<> {
        token_inside = static_cast<bool>(anyio::lowlevel::current_token());
        std::thread other([&] {
            try {
                (void)anyio::lowlevel::current_token();
                outcome = 1;
            } catch (const anyio::NoEventLoopError&) {
                outcome = 2;
            } catch (...) {
                outcome = 3;
            }
        });
        other.join();
        co_return;
    });
    CHECK(token_inside);
    CHECK(outcome == 2);
}

TEST_CASE("After the loop has finished, a LoopToken's call_soon_threadsafe throws "
          "RunFinishedError",
          "[loop]") {
    anyio::LoopToken token;
    bool finished_inside = true;
    std::atomic<bool> posted_inside{false};
    anyio::run([&]() -> anyio::Task<> {
        token = anyio::lowlevel::current_token();
        finished_inside = token.finished();
        anyio::Event delivered;
        // While the loop runs, the token works from any thread.
        std::thread poster([&] { token.call_soon_threadsafe([&] { delivered.set(); }); });
        poster.join();
        co_await anyio::fail_after(5s, wait_for(delivered));
        posted_inside = true;
    });
    CHECK_FALSE(finished_inside);
    CHECK(posted_inside);
    CHECK(token.finished());

    auto captured = std::make_shared<int>(0);
    bool ran = false;
    CHECK_THROWS_AS(token.call_soon_threadsafe([captured, &ran] { ran = true; }),
                    anyio::RunFinishedError);
    CHECK_FALSE(ran);
    CHECK(captured.use_count() == 1);  // the refused callable was destroyed, not leaked

    std::atomic<int> outcome{0};
    std::thread other([&] {
        try {
            token.call_soon_threadsafe([] {});
            outcome = 1;
        } catch (const anyio::RunFinishedError&) {
            outcome = 2;
        } catch (...) {
            outcome = 3;
        }
    });
    other.join();
    CHECK(outcome == 2);
}

// ---------------------------------------------------------------------------------------------
// Callbacks
// ---------------------------------------------------------------------------------------------

TEST_CASE("call_soon runs callbacks in FIFO order", "[loop]") {
    std::vector<int> order;
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        anyio::Event done;
        for (int i = 0; i < 100; ++i) {
            loop.call_soon([&order, i] { order.push_back(i); });
        }
        // A callback scheduled by a callback runs after everything already queued.
        loop.call_soon([&] {
            loop.call_soon([&] {
                order.push_back(1000);
                done.set();
            });
        });
        for (int i = 100; i < 110; ++i) {
            loop.call_soon([&order, i] { order.push_back(i); });
        }
        co_await anyio::fail_after(5s, wait_for(done));
    });
    std::vector<int> expected;
    for (int i = 0; i < 110; ++i) expected.push_back(i);
    expected.push_back(1000);
    CHECK(order == expected);
}

TEST_CASE("call_soon_threadsafe from many threads runs every callback on the loop thread",
          "[loop][threads]") {
    constexpr int thread_count = 4;
    constexpr int posts_per_thread = 10'000;
    constexpr int total = thread_count * posts_per_thread;

    int received = 0;
    int off_loop_thread = 0;
    int out_of_order = 0;
    std::atomic<int> post_errors{0};
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop* loop = anyio::EventLoop::current();
        anyio::LoopToken token = anyio::lowlevel::current_token();
        const std::thread::id loop_thread = std::this_thread::get_id();
        std::vector<int> last_seen(thread_count, -1);
        anyio::Event all_received;
        {
            std::vector<std::jthread> posters;
            for (int t = 0; t < thread_count; ++t) {
                posters.emplace_back([&, t] {
                    for (int i = 0; i < posts_per_thread; ++i) {
                        auto callback = [&, t, i] {
                            if (std::this_thread::get_id() != loop_thread) ++off_loop_thread;
                            if (last_seen[t] + 1 != i) ++out_of_order;  // FIFO per producer
                            last_seen[t] = i;
                            if (++received == total) all_received.set();
                        };
                        try {
                            // Half the threads post through the loop, half through a token.
                            if (t % 2 == 0) {
                                loop->call_soon_threadsafe(callback);
                            } else {
                                token.call_soon_threadsafe(callback);
                            }
                        } catch (...) {
                            ++post_errors;
                        }
                    }
                });
            }
            co_await anyio::fail_after(20s, wait_for(all_received));
        }  // joins the posters (all of them have finished posting by now)
    });
    CHECK(post_errors == 0);
    CHECK(received == total);
    CHECK(off_loop_thread == 0);
    CHECK(out_of_order == 0);
}

TEST_CASE("call_soon_threadsafe wakes a loop that is parked waiting for a far timer",
          "[loop][threads]") {
    std::chrono::steady_clock::duration waited{};
    bool woken = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        anyio::Event event;
        const auto start = std::chrono::steady_clock::now();
        std::jthread poster([&] {
            // Not synchronisation: only makes it likely that the loop is parked first.
            std::this_thread::sleep_for(20ms);
            token.call_soon_threadsafe([&] { event.set(); });
        });
        co_await anyio::fail_after(10s, wait_for(event));  // the only timer is 10 s away
        waited = std::chrono::steady_clock::now() - start;
        woken = true;
    });
    CHECK(woken);
    CHECK(waited < 2s);
}

TEST_CASE("call_later and call_at fire in time order, ties first come first served",
          "[loop]") {
    std::vector<int> order;
    int fired_early = 0;
    std::chrono::steady_clock::duration elapsed{};
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        anyio::Event done;
        const auto start = loop.time();
        auto record = [&](int id, anyio::EventLoop::time_point due) {
            return [&, id, due] {
                if (loop.time() < due) ++fired_early;
                order.push_back(id);
                if (order.size() == 5) done.set();
            };
        };
        loop.call_later(30ms, record(4, start + 30ms));
        loop.call_at(start + 10ms, record(1, start + 10ms));
        loop.call_later(20ms, record(3, start + 20ms));
        loop.call_at(start + 10ms, record(2, start + 10ms));  // same time as 1: after it
        loop.call_at(start - 1s, record(0, start - 1s));      // already due: fires first
        co_await anyio::fail_after(5s, wait_for(done));
        elapsed = loop.time() - start;
    });
    CHECK(order == std::vector<int>{0, 1, 2, 3, 4});
    CHECK(fired_early == 0);
    CHECK(elapsed >= 30ms);
    CHECK(elapsed < 2s);
}

TEST_CASE("loop.time() is monotonic and on the steady clock", "[loop]") {
    int went_backwards = 0;
    bool within_steady_readings = false;
    std::chrono::steady_clock::duration across_sleep{};
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        auto previous = loop.time();
        for (int i = 0; i < 10'000; ++i) {
            auto now = loop.time();
            if (now < previous) ++went_backwards;
            previous = now;
            if (i % 1000 == 0) {
                co_await anyio::checkpoint();  // across loop turns too
                if (loop.time() < previous) ++went_backwards;
            }
        }
        const auto before = std::chrono::steady_clock::now();
        const auto reading = loop.time();
        const auto after = std::chrono::steady_clock::now();
        within_steady_readings = before <= reading && reading <= after;
        co_await anyio::sleep(5ms);
        across_sleep = loop.time() - reading;
    });
    CHECK(went_backwards == 0);
    CHECK(within_steady_readings);
    CHECK(across_sleep >= 5ms);
}

TEST_CASE("An exception escaping a callback goes to Options::on_callback_error and never "
          "replaces run()'s result",
          "[loop]") {
    std::vector<std::string> reported;
    anyio::EventLoop::Options options;
    options.on_callback_error = [&](std::exception_ptr error) {
        try {
            std::rethrow_exception(error);
        } catch (const std::runtime_error& e) {
            reported.emplace_back(e.what());
        }
    };
    int value = anyio::run(
        [&]() -> anyio::Task<int> {
            anyio::EventLoop& loop = *anyio::EventLoop::current();
            loop.call_soon([] { throw std::runtime_error("callback failed"); });
            loop.call_later(1ms, [] { throw std::runtime_error("timer callback failed"); });
            anyio::LoopToken token = anyio::lowlevel::current_token();
            anyio::Event posted;
            std::jthread poster([&] {
                token.call_soon_threadsafe([] { throw std::runtime_error("remote failed"); });
                token.call_soon_threadsafe([&] { posted.set(); });
            });
            co_await anyio::fail_after(5s, wait_for(posted));
            co_await anyio::sleep(10ms);  // the timer has fired; the main task is not disturbed
            co_return 7;
        }(),
        options);
    CHECK(value == 7);
    REQUIRE(reported.size() == 3);
    CHECK(std::find(reported.begin(), reported.end(), "callback failed") != reported.end());
    CHECK(std::find(reported.begin(), reported.end(), "timer callback failed") != reported.end());
    CHECK(std::find(reported.begin(), reported.end(), "remote failed") != reported.end());

    // A main task that fails still reports its own error, not the callback's.
    reported.clear();
    std::string message;
    try {
        anyio::run(
            [&]() -> anyio::Task<> {
                anyio::EventLoop::current()->call_soon(
                    [] { throw std::runtime_error("callback failed"); });
                co_await anyio::checkpoint();
                throw std::logic_error("main failed");
            }(),
            options);
    } catch (const std::logic_error& error) {
        message = error.what();
    }
    CHECK(message == "main failed");
    CHECK(reported.size() == 1);
}

TEST_CASE("By default an exception escaping a callback is reported in one line on stderr",
          "[loop]") {
    anyio_test::ChildOutcome child = anyio_test::run_in_child([] {
        int value = anyio::run([]() -> anyio::Task<int> {
            anyio::EventLoop::current()->call_soon(
                [] { throw std::runtime_error("callback failed on purpose"); });
            co_await anyio::checkpoint();
            co_await anyio::checkpoint();
            co_return 5;
        });
        if (value != 5) std::_Exit(1);
    });
    CHECK(child.exit_code == 0);
    const std::string line =
        "anyio: exception in a loop callback (ignored): callback failed on purpose\n";
    CHECK(child.stderr_text.find(line) != std::string::npos);
    CHECK(std::count(child.stderr_text.begin(), child.stderr_text.end(), '\n') == 1);
}

TEST_CASE("A timer that re-arms itself in the past fires once per loop turn and does not "
          "starve the tasks",
          "[loop]") {
    // A callback that re-arms itself for a time long past, up to `limit` times (before the fix
    // the loop fired it again and again within one turn and no task ran in between).
    struct Rearm {
        anyio::EventLoop* loop;
        int* fires;
        int limit;
        void operator()() const {
            if (++*fires < limit) loop->call_at(anyio::EventLoop::time_point{}, *this);
        }
    };
    constexpr int limit = 100'000;
    int fires = 0;
    std::vector<int> fires_seen_by_task;
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        loop.call_at(loop.time() - 1s, Rearm{&loop, &fires, limit});
        for (int i = 0; i < 5; ++i) {
            co_await anyio::checkpoint();
            fires_seen_by_task.push_back(fires);
        }
        fires = limit;  // stop it
    });
    REQUIRE(fires_seen_by_task.size() == 5);
    CHECK(fires_seen_by_task.front() <= 2);
    for (std::size_t i = 1; i < fires_seen_by_task.size(); ++i) {
        CHECK(fires_seen_by_task[i] - fires_seen_by_task[i - 1] <= 2);
    }
}

TEST_CASE("TimerHeap::push that cannot grow leaves the node unqueued and the heap intact",
          "[loop]") {
    if (!anyio_test::can_fail_allocations) return;  // operator new cannot be replaced (TSan)
    struct Node final : anyio::detail::TimerNode {
        Node() noexcept : TimerNode(&fire) {}
        static void fire(TimerNode*, bool) {}
    };
    std::vector<Node> nodes(64);
    anyio::detail::TimerHeap heap;
    const auto t0 = std::chrono::steady_clock::now();
    // Push until a push needs to grow the heap's storage and that allocation fails.
    std::size_t pushed = 0;
    bool failed = false;
    while (!failed && pushed < nodes.size()) {
        anyio_test::fail_allocations = true;
        try {
            heap.push(&nodes[pushed], t0 + std::chrono::seconds(64 - pushed));
            anyio_test::fail_allocations = false;
            ++pushed;
        } catch (const std::bad_alloc&) {
            anyio_test::fail_allocations = false;
            failed = true;
        }
    }
    REQUIRE(failed);
    Node& refused = nodes[pushed];
    CHECK_FALSE(refused.queued());
    CHECK(heap.size() == pushed);
    heap.remove(&refused);  // a no-op: the heap never took it
    CHECK(heap.size() == pushed);
    // The heap still works: the refused node can be pushed now, and all come out in order.
    heap.push(&refused, t0);
    CHECK(heap.top() == &refused);
    std::size_t popped = 0;
    auto previous = t0 - 1s;
    while (anyio::detail::TimerNode* top = heap.top()) {
        CHECK(top->when_ >= previous);
        previous = top->when_;
        heap.remove(top);
        ++popped;
    }
    CHECK(popped == pushed + 1);
}

TEST_CASE("run() that fails to start its main task leaves the loop closed, so ~EventLoop "
          "does not terminate",
          "[loop]") {
    if (!anyio_test::can_fail_allocations) return;  // operator new cannot be replaced (TSan)
    bool threw_bad_alloc = false;
    bool finished = false;
    {
        anyio::EventLoop loop;
        anyio::Task<int> main = value_of(1);
        anyio_test::fail_allocations = true;  // the frames run() creates cannot be allocated
        try {
            (void)loop.run(std::move(main));
        } catch (const std::bad_alloc&) {
            threw_bad_alloc = true;
        }
        anyio_test::fail_allocations = false;
        finished = loop.is_finished() && !loop.is_running();
    }  // before the fix, ~EventLoop called std::terminate here
    CHECK(threw_bad_alloc);
    CHECK(finished);
    CHECK(anyio::EventLoop::current() == nullptr);
    CHECK(anyio::run(value_of(2)) == 2);  // and this thread can run a loop again
}

TEST_CASE("call_soon and call_at after run() has finished throw RunFinishedError and free "
          "the callable",
          "[loop]") {
    anyio::EventLoop loop;
    CHECK(loop.run(value_of(3)) == 3);
    auto captured = std::make_shared<int>(0);
    bool ran = false;
    CHECK_THROWS_AS(loop.call_soon([captured, &ran] { ran = true; }), anyio::RunFinishedError);
    CHECK_THROWS_AS(loop.call_at(loop.time(), [captured, &ran] { ran = true; }),
                    anyio::RunFinishedError);
    CHECK_THROWS_AS(loop.call_later(1ms, [captured, &ran] { ran = true; }),
                    anyio::RunFinishedError);
    CHECK_FALSE(ran);
    CHECK(captured.use_count() == 1);  // nothing was queued or leaked
}

TEST_CASE("call_soon, call_at, spawn and schedule from another thread while the loop runs "
          "throw std::logic_error",
          "[loop]") {
    struct Node final : anyio::detail::Runnable {
        Node() noexcept : Runnable(&invoke) {}
        static void invoke(Runnable* self, bool) { static_cast<Node*>(self)->ran = true; }
        bool ran = false;
    } node;
    std::vector<std::string> outcomes;
    bool callback_ran = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop* loop = anyio::EventLoop::current();
        std::thread other([&] {
            auto outcome = [&](auto&& fn) {
                try {
                    fn();
                    outcomes.emplace_back("returned");
                } catch (const std::logic_error& error) {
                    outcomes.emplace_back(std::string("logic_error: ") + error.what());
                } catch (...) {
                    outcomes.emplace_back("other exception");
                }
            };
            outcome([&] { loop->call_soon([&] { callback_ran = true; }); });
            outcome([&] { loop->call_at(loop->time(), [&] { callback_ran = true; }); });
            outcome([&] { loop->spawn(set_flag(callback_ran)); });
            outcome([&] { loop->schedule(&node); });
        });
        other.join();
        co_await anyio::checkpoint();
        co_await anyio::checkpoint();
    });
    REQUIRE(outcomes.size() == 4);
    for (const std::string& outcome : outcomes) {
        CHECK(outcome.rfind("logic_error: anyio::", 0) == 0);
        CHECK(outcome.find("call_soon_threadsafe") != std::string::npos);
    }
    CHECK_FALSE(callback_ran);
    CHECK_FALSE(node.ran);
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

TEST_CASE("Leaving run destroys the frames of tasks that are still suspended", "[loop]") {
    anyio::Event never;  // outlives the loop; nobody sets it
    bool waiter_destroyed = false;
    bool sleeper_destroyed = false;
    bool destroyed_before_return = true;
    auto resource = std::make_shared<int>(0);
    bool unstarted_ran = false;
    const auto start = std::chrono::steady_clock::now();
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        anyio::Event waiter_started;
        anyio::Event sleeper_started;
        loop.spawn(wait_forever(waiter_started, never, &waiter_destroyed));
        loop.spawn(sleep_forever(sleeper_started, &sleeper_destroyed));
        co_await anyio::fail_after(5s, wait_for(waiter_started));
        co_await anyio::fail_after(5s, wait_for(sleeper_started));
        loop.spawn(never_started(resource, &unstarted_ran));  // scheduled, never run
        destroyed_before_return = waiter_destroyed || sleeper_destroyed;
    });
    CHECK_FALSE(destroyed_before_return);
    CHECK(waiter_destroyed);
    CHECK(sleeper_destroyed);
    CHECK(std::chrono::steady_clock::now() - start < 2s);  // did not wait for the 24 h sleep
    CHECK_FALSE(unstarted_ran);
    CHECK(resource.use_count() == 1);
    CHECK_FALSE(never.is_set());
}

TEST_CASE("Leaving run destroys the frames of every level of a suspended nested task",
          "[loop]") {
    anyio::Event never;
    int destroyed = 0;
    int destroyed_before_return = -1;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Event innermost_waiting;
        anyio::EventLoop::current()->spawn(
            nested_waiting(3, never, innermost_waiting, &destroyed));
        co_await anyio::fail_after(5s, wait_for(innermost_waiting));
        destroyed_before_return = destroyed;
    });
    CHECK(destroyed_before_return == 0);
    CHECK(destroyed == 4);
}

TEST_CASE("A thread posting while the loop shuts down gets RunFinishedError, and every "
          "callback is run or destroyed",
          "[loop][threads]") {
    auto resource = std::make_shared<int>(0);
    std::atomic<long> posted{0};
    std::atomic<int> ending{0};  // 1: RunFinishedError, 2: anything else
    int ran = 0;
    anyio::Event some_arrived;  // outlives the loop, like everything the callbacks touch
    std::jthread poster;
    anyio::run([&]() -> anyio::Task<> {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        poster = std::jthread([&, token] {
            try {
                for (;;) {
                    token.call_soon_threadsafe([&, resource] {
                        (void)resource;
                        if (++ran == 100) some_arrived.set();
                    });
                    ++posted;
                }
            } catch (const anyio::RunFinishedError&) {
                ending = 1;
            } catch (...) {
                ending = 2;
            }
        });
        co_await anyio::fail_after(5s, wait_for(some_arrived));
        // Returning ends the loop while the poster is still posting.
    });
    poster.join();
    CHECK(ending == 1);
    CHECK(ran >= 100);
    CHECK(ran <= posted);
    CHECK(resource.use_count() == 1);  // no callback (and no capture) was leaked
}

TEST_CASE("call_later with a delay too large for the clock never fires", "[loop]") {
    bool fired = false;
    bool fired_after_wait = true;
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        loop.call_later(std::chrono::seconds::max(), [&] { fired = true; });
        loop.call_later(std::chrono::hours::max(), [&] { fired = true; });
        co_await anyio::sleep(20ms);
        fired_after_wait = fired;
    });
    CHECK_FALSE(fired_after_wait);
    CHECK_FALSE(fired);
}

namespace {

// Waits for `go` and records whether it took a step after the main task had finished.
anyio::Task<> step_after(anyio::Event& go, const bool& main_done, int* steps_after_main) {
    co_await go.wait();
    if (main_done) ++*steps_after_main;
}

// Sets `go`, then queues a callback: both wake-ups land in the main task's last loop turn,
// after the main task.
anyio::Task<> release_all(anyio::Event& go, const bool& main_done, int* steps_after_main) {
    go.set();
    anyio::EventLoop::current()->call_soon([&main_done, steps_after_main] {
        if (main_done) ++*steps_after_main;
    });
    co_return;
}

}  // namespace

TEST_CASE("Once the main task has finished, no task step or callback runs, not even in the "
          "same loop turn",
          "[loop][shutdown]") {
    // The loop used to run the rest of the batch in which the main task finished.
    bool main_done = false;
    int steps_after_main = 0;
    anyio::Event go;  // outlives the loop
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        // The main task waits first, so set() wakes it first: the others follow it in its
        // last turn.
        for (int i = 0; i < 3; ++i) loop.spawn(step_after(go, main_done, &steps_after_main));
        loop.spawn(release_all(go, main_done, &steps_after_main));
        co_await go.wait();
        main_done = true;
    });
    CHECK(main_done);
    CHECK(steps_after_main == 0);
}

// Kept last in this file: without the fix it overflows the stack and ends the program.
TEST_CASE("Leaving run destroys a suspended chain of 100,000 nested tasks without "
          "overflowing the stack",
          "[loop][stress]") {
    constexpr int depth = 100'000;
    anyio::Event never;
    int destroyed = 0;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Event innermost_waiting;
        anyio::EventLoop::current()->spawn(
            nested_waiting(depth, never, innermost_waiting, &destroyed));
        co_await anyio::fail_after(5s, wait_for(innermost_waiting));
    });
    CHECK(destroyed == depth + 1);
}

TEST_CASE("Leaving run destroys a suspended chain of 100,000 nested tasks while every "
          "allocation fails: shutdown allocates nothing",
          "[loop][stress]") {
    if (!anyio_test::can_fail_allocations) return;  // operator new cannot be replaced (TSan)
    constexpr int depth = 100'000;
    int destroyed = 0;
    anyio::Event never;
    anyio::Event innermost_waiting;
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop::current()->spawn(
            nested_waiting(depth, never, innermost_waiting, &destroyed));
        co_await innermost_waiting.wait();
        anyio_test::fail_allocations = true;  // from here until run() has returned
    });
    anyio_test::fail_allocations = false;
    CHECK(destroyed == depth + 1);
}
