#include <anyio/context.hpp>

#include "catch.hpp"

#include <anyio/blocking_portal.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/from_thread.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <atomic>
#include <barrier>
#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "test_support.hpp"

ANYIO_TEST_FAILING_OPERATOR_NEW();

// Tests of anyio::ContextVar (API.md, "Context variables"): Python's contextvars semantics,
// with anyio's rules for worker threads, from_thread calls and portals.
//
// The loop runs on the test's main thread, so CHECK is used inside coroutines; on other
// threads results are recorded and checked on the main thread.

namespace {

using anyio::Task;
using anyio::TaskGroup;
using anyio_test::run_loop;
using anyio_test::settle;

anyio::ContextVar<std::string> request_id{"request_id"};
anyio::ContextVar<int> with_default{"with_default", 7};

std::string current_request() { return request_id.get_or("<unset>"); }

/// The message of the std::invalid_argument `fn` throws ("" if it throws nothing).
template <class F>
std::string invalid_argument_from(F&& fn) {
    try {
        std::forward<F>(fn)();
    } catch (const std::invalid_argument& error) {
        return error.what();
    }
    return "";
}

/// Counts the copies and the destructions of values of this type.
struct Counted {
    static inline std::atomic<int> copies{0};
    static inline std::atomic<int> alive{0};
    int value = 0;
    explicit Counted(int v) : value(v) { ++alive; }
    Counted(const Counted& other) : value(other.value) {
        ++copies;
        ++alive;
    }
    Counted(Counted&& other) noexcept : value(other.value) { ++alive; }
    Counted& operator=(const Counted&) = delete;
    ~Counted() { --alive; }
};
anyio::ContextVar<Counted> counted{"counted"};

}  // namespace

// ---------------------------------------------------------------------------------------------
// get, get_or, find, set, reset
// ---------------------------------------------------------------------------------------------

TEST_CASE("An unset variable without a default: get throws std::out_of_range naming it", "[context]") {
    run_loop([]() -> Task<> {
        CHECK(request_id.find() == nullptr);
        CHECK(request_id.get_or("fallback") == "fallback");
        std::string message;
        try {
            (void)request_id.get();
        } catch (const std::out_of_range& error) {
            message = error.what();
        }
        CHECK(message.find("'request_id'") != std::string::npos);
        CHECK(message.find("no value is set") != std::string::npos);
        co_return;
    });
}

TEST_CASE("A variable with a default: get returns it, get_or's fallback takes precedence", "[context]") {
    run_loop([]() -> Task<> {
        CHECK(with_default.get() == 7);
        REQUIRE(with_default.find() != nullptr);
        CHECK(*with_default.find() == 7);
        CHECK(with_default.get_or(3) == 3);  // Python's var.get(default)
        auto token = with_default.set(11);
        CHECK(with_default.get() == 11);
        CHECK(with_default.get_or(3) == 11);
        with_default.reset(token);
        CHECK(with_default.get() == 7);
        co_return;
    });
}

TEST_CASE("set makes a value visible in the task; reset restores the previous value or none", "[context]") {
    run_loop([]() -> Task<> {
        auto first = request_id.set("r-1");
        CHECK(request_id.get() == "r-1");
        co_await anyio::checkpoint();  // a value stays across suspensions
        CHECK(request_id.get() == "r-1");
        auto second = request_id.set("r-2");
        CHECK(request_id.get() == "r-2");
        request_id.reset(second);
        CHECK(request_id.get() == "r-1");
        CHECK(second.used());
        request_id.reset(first);
        CHECK(request_id.find() == nullptr);
        co_return;
    });
}

TEST_CASE("A move-only value can be set and read", "[context]") {
    static anyio::ContextVar<std::unique_ptr<int>> owned{"owned"};
    run_loop([]() -> Task<> {
        owned.set(std::make_unique<int>(5));
        REQUIRE(owned.get() != nullptr);
        CHECK(*owned.get() == 5);
        co_return;
    });
}

TEST_CASE("reset rejects a token used twice, out of order, empty, or of another variable", "[context]") {
    run_loop([]() -> Task<> {
        auto first = request_id.set("a");
        auto second = request_id.set("b");
        // Out of order: `second` is still in force.
        CHECK(invalid_argument_from([&] { request_id.reset(first); }).find("out of order") !=
              std::string::npos);
        CHECK(request_id.get() == "b");  // nothing changed
        request_id.reset(second);
        CHECK(invalid_argument_from([&] { request_id.reset(second); }).find("already been used") !=
              std::string::npos);
        CHECK(request_id.get() == "a");
        // Made by another variable.
        auto other = with_default.set(1);
        CHECK(invalid_argument_from([&] { request_id.reset(other); }).find("another ContextVar") !=
              std::string::npos);
        with_default.reset(other);
        // Empty (moved from).
        anyio::ContextVarToken moved = std::move(first);
        CHECK(invalid_argument_from([&] { request_id.reset(first); }).find("empty") !=
              std::string::npos);
        request_id.reset(moved);
        CHECK(request_id.find() == nullptr);
        co_return;
    });
}

TEST_CASE("A token is bound to its context: a child task, a worker or the thread cannot use it",
          "[context]") {
    auto thread_token = request_id.set("thread");
    std::string from_worker;
    run_loop([&]() -> Task<> {
        // Made on this thread before run(): the main task runs in a copy.
        CHECK(invalid_argument_from([&] { request_id.reset(thread_token); })
                  .find("another context") != std::string::npos);
        auto parent_token = request_id.set("parent");
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                CHECK(invalid_argument_from([&] { request_id.reset(parent_token); })
                          .find("another context") != std::string::npos);
                CHECK(request_id.get() == "parent");
                co_return;
            });
            co_return;
        });
        auto on_worker = [&] { from_worker = invalid_argument_from([&] { request_id.reset(parent_token); }); };
        co_await anyio::to_thread::run_sync(on_worker);
        // A token made in a task cannot be used after its task by another one either.
        anyio::ContextVarToken child_token;
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                child_token = request_id.set("child");
                co_return;
            });
            co_return;
        });
        CHECK(invalid_argument_from([&] { request_id.reset(child_token); }).find("another context") !=
              std::string::npos);
        request_id.reset(parent_token);
        CHECK(request_id.get() == "thread");
    });
    CHECK(from_worker.find("another context") != std::string::npos);
    CHECK(request_id.get() == "thread");  // nothing flowed back from the loop
    request_id.reset(thread_token);
    CHECK(request_id.find() == nullptr);
}

// ---------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------

TEST_CASE("A child task sees the context of start_soon's caller as it was at that call", "[context]") {
    run_loop([]() -> Task<> {
        request_id.set("before");
        std::vector<std::string> seen;
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                seen.push_back(current_request());
                co_return;
            });
            request_id.set("after");  // the child has not run yet, and does not see this
            tg.start_soon([&]() -> Task<> {
                seen.push_back(current_request());
                co_return;
            });
            co_return;
        });
        CHECK(seen == std::vector<std::string>{"before", "after"});
        CHECK(request_id.get() == "after");
    });
}

TEST_CASE("Sibling tasks do not see each other's values, and nothing flows back to the parent",
          "[context]") {
    run_loop([]() -> Task<> {
        request_id.set("parent");
        anyio::Event first_set;
        std::string second_saw;
        std::string grandchild_saw;
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                request_id.set("first");
                co_await anyio::task_group([&](TaskGroup& inner) -> Task<> {
                    inner.start_soon([&]() -> Task<> {  // a grandchild sees its parent's value
                        grandchild_saw = current_request();
                        co_return;
                    });
                    co_return;
                });
                first_set.set();
                co_await settle();
                CHECK(request_id.get() == "first");
            });
            tg.start_soon([&]() -> Task<> {
                co_await first_set.wait();
                second_saw = current_request();
                request_id.set("second");
            });
            co_return;
        });
        CHECK(grandchild_saw == "first");
        CHECK(second_saw == "parent");
        CHECK(request_id.get() == "parent");
    });
}

TEST_CASE("The main task starts with a copy of the context of the thread that called run",
          "[context]") {
    auto token = request_id.set("main thread");
    std::string seen;
    anyio::run([&]() -> Task<> {
        seen = current_request();
        request_id.set("changed in the task");
        co_return;
    });
    CHECK(seen == "main thread");
    CHECK(request_id.get() == "main thread");
    request_id.reset(token);
}

TEST_CASE("Copying a context shares its values: a hundred tasks and offloads copy none", "[context]") {
    Counted::copies = 0;
    run_loop([]() -> Task<> {
        counted.set(Counted{42});
        int sum = 0;
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            for (int i = 0; i < 100; ++i) {
                tg.start_soon([&]() -> Task<> {
                    sum += co_await anyio::to_thread::run_sync([] { return counted.get().value; });
                });
            }
            co_return;
        });
        CHECK(sum == 4200);
    });
    CHECK(Counted::copies == 0);
}

TEST_CASE("A value lives as long as a context holds it, and no longer", "[context]") {
    const int alive_before = Counted::alive;
    run_loop([&]() -> Task<> {
        anyio::Event release_child;
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                counted.set(Counted{1});
                CHECK(Counted::alive == alive_before + 1);
                co_await release_child.wait();
            });
            co_await settle();
            CHECK(Counted::alive == alive_before + 1);
            release_child.set();
        });
        CHECK(Counted::alive == alive_before);  // the child's context went with it
        {
            auto token = counted.set(Counted{2});
            counted.reset(token);
        }
        CHECK(Counted::alive == alive_before);
    });
    CHECK(Counted::alive == alive_before);
}

TEST_CASE("A call_soon callback runs in the context current when it was scheduled", "[context]") {
    run_loop([]() -> Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        request_id.set("scheduled");
        std::string seen;
        std::string seen_threadsafe;
        anyio::Event done;
        loop.call_soon([&] {
            seen = current_request();
            request_id.set("set by the callback");  // stays in the callback's copy
        });
        request_id.set("later");
        const anyio::LoopToken token = anyio::lowlevel::current_token();
        auto schedule_from_worker = [&] {
            request_id.set("worker");
            token.call_soon_threadsafe([&] {
                seen_threadsafe = current_request();
                done.set();
            });
        };
        co_await anyio::to_thread::run_sync(schedule_from_worker);
        co_await done.wait();
        CHECK(seen == "scheduled");
        CHECK(seen_threadsafe == "worker");
        CHECK(request_id.get() == "later");
    });
}

// ---------------------------------------------------------------------------------------------
// Threads: run_sync, from_thread, portals, plain threads, two loops
// ---------------------------------------------------------------------------------------------

TEST_CASE("run_sync's fn sees the caller's values on the worker; its sets do not flow back",
          "[context]") {
    run_loop([]() -> Task<> {
        request_id.set("r-42");
        auto fn = [] {
            std::string seen = current_request();
            request_id.set("set on the worker");
            return seen + " | " + current_request();
        };
        CHECK(co_await anyio::to_thread::run_sync(fn) == "r-42 | set on the worker");
        CHECK(request_id.get() == "r-42");
        // The next job on that same worker starts from its caller's context, not the last job's.
        auto token = request_id.set("second call");
        CHECK(co_await anyio::to_thread::run_sync(current_request) == "second call");
        request_id.reset(token);
        request_id.reset(request_id.set("x"));
        CHECK(co_await anyio::to_thread::run_sync(current_request) == "r-42");
        // Also with abandon_on_cancel, where the job lives on the heap.
        CHECK(co_await anyio::to_thread::run_sync({.limiter = nullptr, .abandon_on_cancel = true},
                                                  current_request) == "r-42");
    });
}

TEST_CASE("A worker's job with no value set leaves nothing behind on the worker", "[context]") {
    run_loop([]() -> Task<> {
        auto set_on_worker = [] { request_id.set("left behind?"); };
        co_await anyio::to_thread::run_sync(set_on_worker);
        CHECK(co_await anyio::to_thread::run_sync(current_request) == "<unset>");
        CHECK(anyio::to_thread::statistics().threads_created == 1);  // the same worker twice
    });
}

TEST_CASE("from_thread::run and run_sync run in the worker's context; nothing flows back",
          "[context]") {
    run_loop([]() -> Task<> {
        request_id.set("task");
        auto on_worker = [] {
            std::vector<std::string> seen;
            seen.push_back(anyio::from_thread::run_sync([] {
                std::string value = current_request();
                request_id.set("set in from_thread::run_sync");
                return value;
            }));
            request_id.set("worker");
            seen.push_back(anyio::from_thread::run_sync(current_request));
            seen.push_back(anyio::from_thread::run([]() -> Task<std::string> {
                co_await anyio::checkpoint();
                std::string value = current_request();
                request_id.set("set in from_thread::run");
                co_return value;
            }));
            seen.push_back(current_request());
            return seen;
        };
        auto seen = co_await anyio::to_thread::run_sync(on_worker);
        CHECK(seen == std::vector<std::string>{"task", "worker", "worker", "worker"});
        CHECK(request_id.get() == "task");
    });
}

TEST_CASE("A BlockingPortal call runs in a copy of the calling thread's context", "[context][portal]") {
    auto portal = anyio::start_blocking_portal();
    CHECK(portal.call(current_request) == "<unset>");
    auto token = request_id.set("caller");
    CHECK(portal.call(current_request) == "caller");
    CHECK(portal.call([]() -> Task<std::string> {
        co_await anyio::checkpoint();
        std::string value = current_request();
        request_id.set("set in the portal task");
        co_return value;
    }) == "caller");
    auto future = portal.start_task_soon([]() -> Task<std::string> {
        co_await anyio::checkpoint();
        co_return current_request();
    });
    auto later = request_id.set("after start_task_soon");  // the task got its copy at the call
    CHECK(future.get() == "caller");
    CHECK(portal.call([] {
        std::string value = current_request();
        request_id.set("set in a portal callback");
        return value;
    }) == "after start_task_soon");
    CHECK(request_id.get() == "after start_task_soon");
    // Another thread calling the same portal brings its own (empty) context.
    std::string other_thread_saw;
    std::thread other([&] { other_thread_saw = portal.call(current_request); });
    other.join();
    CHECK(other_thread_saw == "<unset>");
    portal.stop();
    request_id.reset(later);
    request_id.reset(token);
    CHECK(request_id.find() == nullptr);
}

TEST_CASE("A plain thread starts with an empty context, and its own values die with it", "[context]") {
    const int alive_before = Counted::alive;
    auto token = request_id.set("main");
    std::string seen;
    std::string seen_after_set;
    std::thread thread([&] {
        seen = current_request();
        request_id.set("thread");
        counted.set(Counted{3});  // freed when the thread exits
        seen_after_set = current_request();
    });
    thread.join();
    CHECK(seen == "<unset>");
    CHECK(seen_after_set == "thread");
    CHECK(request_id.get() == "main");
    CHECK(Counted::alive == alive_before);
    request_id.reset(token);
}

TEST_CASE("Two loops on two threads never see each other's values", "[context]") {
    constexpr int rounds = 50;
    std::barrier sync(2);
    std::atomic<int> mismatches{0};
    auto loop_on_thread = [&](std::string name) {
        anyio::run([&]() -> Task<> {
            for (int i = 0; i < rounds; ++i) {
                const std::string mine = name + std::to_string(i);
                request_id.set(mine);
                sync.arrive_and_wait();  // both loops have set their value now
                if (current_request() != mine) ++mismatches;
                std::string on_worker = co_await anyio::to_thread::run_sync(current_request);
                if (on_worker != mine) ++mismatches;
                co_await anyio::checkpoint();
                sync.arrive_and_wait();
            }
        });
    };
    std::thread a(loop_on_thread, "a");
    std::thread b(loop_on_thread, "b");
    a.join();
    b.join();
    CHECK(mismatches == 0);
}

TEST_CASE("A run_sync call with a variable set allocates nothing", "[context]") {
    if (!anyio_test::can_fail_allocations) return;  // operator new cannot be replaced (TSan)
    run_loop([]() -> Task<> {
        request_id.set("r-1");
        co_await anyio::to_thread::run_sync([] {});  // starts the worker (allocates)
        auto read = [] { return request_id.find() != nullptr; };
        anyio_test::fail_allocations = true;  // any allocation now fails the call
        bool seen = false;
        try {
            seen = co_await anyio::to_thread::run_sync(read);
        } catch (...) {
            anyio_test::fail_allocations = false;
            throw;
        }
        anyio_test::fail_allocations = false;
        CHECK(seen);
    });
}

TEST_CASE("set with no memory left changes nothing", "[context]") {
    if (!anyio_test::can_fail_allocations) return;  // operator new cannot be replaced (TSan)
    run_loop([]() -> Task<> {
        request_id.set("kept");
        anyio_test::fail_allocations = true;
        bool threw = false;
        try {
            request_id.set("lost");
        } catch (const std::bad_alloc&) {
            threw = true;
        }
        anyio_test::fail_allocations = false;
        CHECK(threw);
        CHECK(request_id.get() == "kept");
        co_return;
    });
}
