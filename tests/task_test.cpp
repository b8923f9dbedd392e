#include <anyio/task.hpp>

#include <anyio/capacity_limiter.hpp>
#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <chrono>
#include <coroutine>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

using namespace std::chrono_literals;

// Tests for anyio::Task<T> (include/anyio/task.hpp): laziness, move-only ownership, every
// kind of result, exception propagation, misuse, frame ownership, long await chains, and
// custom awaitables (with lowlevel::current_task()).

namespace {

struct Oops {
    int code;
};

anyio::Task<> set_flag(bool& flag) {
    flag = true;
    co_return;
}

anyio::Task<int> value_of(int value) { co_return value; }

anyio::Task<int&> reference_to(int& object) { co_return object; }

anyio::Task<const std::string&> const_reference_to(const std::string& object) {
    co_return object;
}

anyio::Task<std::unique_ptr<int>> make_owned(int value) {
    auto owned = std::make_unique<int>(value);
    co_return std::move(owned);
}

anyio::Task<std::unique_ptr<int>> pass_owned_through(int value) {
    std::unique_ptr<int> owned = co_await make_owned(value);
    *owned += 1;
    co_return std::move(owned);
}

anyio::Task<int> fail_with_runtime_error(bool fail) {
    if (fail) throw std::runtime_error("task failed on purpose");
    co_return 0;
}

anyio::Task<> fail_with_oops(bool fail) {
    if (fail) throw Oops{42};
    co_return;
}

anyio::Task<int> rethrow_from_inner() {
    int value = co_await fail_with_runtime_error(true);
    co_return value + 1;  // never reached
}

// Holds `resource` in its frame (a by-value parameter) and records whether its body ran.
anyio::Task<int> hold(std::shared_ptr<int> resource, bool& ran) {
    ran = true;
    co_return *resource;
}

anyio::Task<int> zero_or_one(int i) { co_return i & 1; }

anyio::Task<std::int64_t> sequential_awaits(int count) {
    std::int64_t total = 0;
    for (int i = 0; i < count; ++i) total += co_await zero_or_one(i);
    co_return total;
}

anyio::Task<int> nested(int depth) {
    if (depth == 0) co_return 0;
    int below = co_await nested(depth - 1);
    co_return below + 1;
}

anyio::Task<int> nested_throwing(int depth) {
    if (depth == 0) throw std::runtime_error("thrown at the bottom");
    int below = co_await nested_throwing(depth - 1);
    co_return below + 1;
}


anyio::Task<int> value_after(anyio::Event& event, int value) {
    co_await event.wait();
    co_return value;
}

// Can `T` be awaited through a member operator co_await?
template <class T>
concept member_co_awaitable = requires(T&& t) { std::forward<T>(t).operator co_await(); };

// ---- Custom awaitables: C++20 awaitables that know nothing of anyio ----

// Resumes the coroutine from a call_soon callback (a plain callback on the loop thread).
struct ResumeFromCallSoon {
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) const {
        anyio::EventLoop::current()->call_soon([handle] { handle.resume(); });
    }
    int await_resume() const noexcept { return 7; }
};

// Completes on another thread, which hands the resumption to the loop through
// call_soon_threadsafe (the usual way to wrap a callback library).
struct ResumeFromOtherThread {
    std::thread worker;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) {
        anyio::LoopToken token = anyio::lowlevel::current_token();
        worker = std::thread([token, handle] {
            std::this_thread::sleep_for(1ms);  // "the operation"
            token.call_soon_threadsafe([handle] { handle.resume(); });
        });
    }
    std::thread::id await_resume() {
        worker.join();
        return std::this_thread::get_id();
    }
};

// Reschedules the task through lowlevel::current_task(), from a callback or another thread.
struct Reschedule {
    bool from_other_thread = false;
    std::thread worker;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<>) {
        anyio::lowlevel::TaskHandle task = anyio::lowlevel::current_task();
        if (from_other_thread) {
            worker = std::thread([task] { task.reschedule_threadsafe(); });
        } else {
            anyio::EventLoop::current()->call_soon([task] { task.reschedule(); });
        }
    }
    void await_resume() {
        if (worker.joinable()) worker.join();
    }
};

// Stores the handle for someone else to resume.
struct Park {
    std::coroutine_handle<>* slot;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) const noexcept { *slot = handle; }
    void await_resume() const noexcept {}
};

// Resumes the coroutine inline, inside its own await_suspend.
struct ResumeInline {
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) const { handle.resume(); }
    void await_resume() const noexcept {}
};

// Declines to suspend (await_suspend returns false), or symmetric-transfers straight back to
// the handle it was given.
struct DeclineToSuspend {
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<>) const noexcept { return false; }
    int await_resume() const noexcept { return 1; }
};
struct TransferBack {
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> handle) const noexcept {
        return handle;
    }
    int await_resume() const noexcept { return 2; }
};

// An awaitable through a (non-member) operator co_await.
struct NeedsOperatorCoAwait {};
ResumeFromCallSoon operator co_await(NeedsOperatorCoAwait) { return {}; }

// Uses every kind of loop primitive, so a test can check they all work in the task it runs in.
anyio::Task<std::string> use_every_primitive(anyio::lowlevel::TaskHandle expected_task) {
    std::string failures;
    if (!(anyio::lowlevel::current_task() == expected_task)) failures += "current_task; ";
    if (co_await value_of(5) != 5) failures += "Task; ";
    if (co_await nested(50) != 50) failures += "nested Task; ";
    co_await anyio::checkpoint();
    co_await anyio::sleep(1ms);
    anyio::Event event;
    event.set();
    co_await event.wait();
    if (!co_await anyio::move_on_after(1h, value_of(3))) failures += "move_on_after; ";
    // A deadline far off: the value must come through (1 ms was missed once under clang TSan
    // at -O0, with another test running beside it).
    if (co_await anyio::move_on_after(1h, value_after(event, 0)) != std::optional<int>(0)) {
        failures += "move_on_after (set event); ";
    }
    anyio::Event never;
    if (co_await anyio::move_on_after(1ms, value_after(never, 1))) failures += "timeout; ";
    int children = 0;
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        for (int i = 0; i < 3; ++i) {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await anyio::checkpoint();
                ++children;
            });
        }
        co_return;
    });
    if (children != 3) failures += "task_group; ";
    anyio::CapacityLimiter limiter(1);
    co_await limiter.acquire();
    limiter.release();
    if (co_await anyio::to_thread::run_sync([] { return 11; }) != 11) failures += "run_sync; ";
    if (!(anyio::lowlevel::current_task() == expected_task)) failures += "current_task after; ";
    co_return failures;
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Laziness and ownership
// ---------------------------------------------------------------------------------------------

TEST_CASE("A task does not run its body until it is awaited", "[task]") {
    bool ran = false;
    {
        anyio::Task<> task = set_flag(ran);
        CHECK_FALSE(ran);  // created outside any loop: nothing ran
    }
    CHECK_FALSE(ran);  // destroyed without being awaited: still nothing ran

    bool ran_in_loop = false;
    bool ran_before_await = true;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<> task = set_flag(ran_in_loop);
        co_await anyio::checkpoint();  // give the loop full turns: still not started
        co_await anyio::checkpoint();
        ran_before_await = ran_in_loop;
        co_await std::move(task);
    });
    CHECK_FALSE(ran_before_await);
    CHECK(ran_in_loop);
}

TEST_CASE("Task is move-only and moving transfers the coroutine", "[task]") {
    static_assert(std::is_same_v<anyio::Task<>, anyio::Task<void>>);
    static_assert(!std::is_copy_constructible_v<anyio::Task<int>>);
    static_assert(!std::is_copy_assignable_v<anyio::Task<int>>);
    static_assert(!std::is_copy_constructible_v<anyio::Task<>>);
    static_assert(std::is_nothrow_move_constructible_v<anyio::Task<int>>);
    static_assert(std::is_nothrow_move_assignable_v<anyio::Task<int>>);

    auto resource = std::make_shared<int>(7);
    bool replaced_ran = false;
    bool moved_ran = false;
    int value = 0;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<int> first = hold(resource, moved_ran);
        anyio::Task<int> second = std::move(first);  // move construction
        anyio::Task<int> third = hold(resource, replaced_ran);
        third = std::move(second);  // move assignment destroys the never-awaited one
        value = co_await std::move(third);
    });
    CHECK(value == 7);
    CHECK(moved_ran);
    CHECK_FALSE(replaced_ran);
    CHECK(resource.use_count() == 1);  // both frames are gone
}

TEST_CASE("Destroying a never-awaited task does not run it and frees its frame", "[task]") {
    auto resource = std::make_shared<int>(1);
    bool ran = false;
    {
        anyio::Task<int> task = hold(resource, ran);
        CHECK(resource.use_count() == 2);  // the frame holds a copy of the parameter
    }
    CHECK_FALSE(ran);
    CHECK(resource.use_count() == 1);

    long count_inside = 0;
    anyio::run([&]() -> anyio::Task<> {
        {
            anyio::Task<int> task = hold(resource, ran);
            co_await anyio::checkpoint();
        }
        count_inside = resource.use_count();
    });
    CHECK_FALSE(ran);
    CHECK(count_inside == 1);
    CHECK(resource.use_count() == 1);
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

TEST_CASE("A Task<int> yields its value to the awaiter and to run()", "[task]") {
    int awaited = 0;
    int returned = anyio::run([&]() -> anyio::Task<int> {
        awaited = co_await value_of(41);
        co_return awaited + 1;
    });
    CHECK(awaited == 41);
    CHECK(returned == 42);
    CHECK(anyio::run(value_of(5)) == 5);
}

TEST_CASE("A Task<T&> yields a reference to the very same object", "[task]") {
    int target = 1;
    const std::string text = "unchanged";
    int* address = nullptr;
    const std::string* text_address = nullptr;
    anyio::run([&]() -> anyio::Task<> {
        int& ref = co_await reference_to(target);
        address = &ref;
        ref = 99;  // writes through to the original
        const std::string& cref = co_await const_reference_to(text);
        text_address = &cref;
    });
    CHECK(address == &target);
    CHECK(target == 99);
    CHECK(text_address == &text);

    int& from_run = anyio::run(reference_to(target));
    CHECK(&from_run == &target);
}

TEST_CASE("A Task of a move-only type (std::unique_ptr) yields the value", "[task]") {
    std::unique_ptr<int> owned = anyio::run([]() -> anyio::Task<std::unique_ptr<int>> {
        std::unique_ptr<int> inner = co_await pass_owned_through(10);
        co_return std::move(inner);
    });
    REQUIRE(owned != nullptr);
    CHECK(*owned == 11);

    std::unique_ptr<int> direct = anyio::run(make_owned(3));
    REQUIRE(direct != nullptr);
    CHECK(*direct == 3);
}

TEST_CASE("A Task<void> runs to completion", "[task]") {
    bool ran = false;
    bool after = false;
    anyio::run([&]() -> anyio::Task<> {
        co_await set_flag(ran);
        after = true;
    });
    CHECK(ran);
    CHECK(after);

    bool direct = false;
    anyio::run(set_flag(direct));
    CHECK(direct);
}

// ---------------------------------------------------------------------------------------------
// Exceptions and misuse
// ---------------------------------------------------------------------------------------------

TEST_CASE("An exception thrown in a task is rethrown in the awaiter", "[task]") {
    std::string message;
    bool continued = false;
    anyio::run([&]() -> anyio::Task<> {
        try {
            co_await rethrow_from_inner();  // two levels: inner throws, middle rethrows
        } catch (const std::runtime_error& error) {
            message = error.what();
        }
        continued = true;  // the awaiter carries on normally after catching
    });
    CHECK(message == "task failed on purpose");
    CHECK(continued);

    CHECK_THROWS_AS(anyio::run(fail_with_runtime_error(true)), std::runtime_error);
}

TEST_CASE("A thrown non-std::exception type is rethrown in the awaiter", "[task]") {
    int code = 0;
    bool caught_as_std_exception = false;
    anyio::run([&]() -> anyio::Task<> {
        try {
            co_await fail_with_oops(true);
        } catch (const std::exception&) {
            caught_as_std_exception = true;
        } catch (const Oops& oops) {
            code = oops.code;
        }
    });
    CHECK(code == 42);
    CHECK_FALSE(caught_as_std_exception);

    bool escaped_run = false;
    try {
        anyio::run(fail_with_oops(true));
    } catch (const Oops& oops) {
        escaped_run = oops.code == 42;
    }
    CHECK(escaped_run);
}

TEST_CASE("Awaiting a moved-from task throws std::logic_error", "[task]") {
    bool threw = false;
    std::string message;
    int value = 0;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<int> original = value_of(3);
        anyio::Task<int> moved = std::move(original);
        try {
            co_await std::move(original);
        } catch (const std::logic_error& error) {
            threw = true;
            message = error.what();
        }
        value = co_await std::move(moved);  // the moved-to task still works
    });
    CHECK(threw);
    CHECK_FALSE(message.empty());
    CHECK(value == 3);

    bool default_threw = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<int> empty;
        try {
            co_await std::move(empty);
        } catch (const std::logic_error&) {
            default_threw = true;
        }
    });
    CHECK(default_threw);
}

TEST_CASE("Awaiting an already awaited task throws std::logic_error", "[task]") {
    int first = 0;
    bool threw = false;
    std::string message;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<int> task = value_of(8);
        first = co_await std::move(task);
        try {
            co_await std::move(task);  // from this task or any other: the first await took it
        } catch (const std::logic_error& error) {
            threw = true;
            message = error.what();
        }
    });
    CHECK(first == 8);
    CHECK(threw);
    CHECK_FALSE(message.empty());

    bool void_threw = false;
    bool ran = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<> task = set_flag(ran);
        co_await std::move(task);
        try {
            co_await std::move(task);
        } catch (const std::logic_error&) {
            void_threw = true;
        }
    });
    CHECK(ran);
    CHECK(void_threw);
}


TEST_CASE("Awaiting consumes a Task: an lvalue Task cannot be awaited and an awaited one is "
          "left empty",
          "[task]") {
    static_assert(member_co_awaitable<anyio::Task<int>&&>);
    static_assert(!member_co_awaitable<anyio::Task<int>&>);
    static_assert(!member_co_awaitable<const anyio::Task<int>&>);
    bool valid_before = false;
    bool valid_after = true;
    int value = 0;
    anyio::run([&]() -> anyio::Task<> {
        anyio::Task<int> task = value_of(12);
        valid_before = task.valid();
        value = co_await std::move(task);
        valid_after = task.valid();
    });
    CHECK(valid_before);
    CHECK_FALSE(valid_after);
    CHECK(value == 12);
}

TEST_CASE("A task awaited by two tasks at once is rejected with std::logic_error", "[task]") {
    int first = 0;
    std::string second_error;
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::Event release;
        anyio::Task<int> shared = value_after(release, 4);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { first = co_await std::move(shared); });
            tg.start_soon([&]() -> anyio::Task<> {
                co_await anyio::checkpoint();  // the first child is inside the task by now
                try {
                    co_await std::move(shared);
                } catch (const std::logic_error& error) {
                    second_error = error.what();
                }
                release.set();
            });
            co_return;
        });
    });
    CHECK(first == 4);
    CHECK(second_error.find("already awaited") != std::string::npos);
}

TEST_CASE("Destroying or reassigning a Task object while its coroutine is being awaited does "
          "not disturb the await",
          "[task]") {
    int result = 0;
    bool holder_empty = false;
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::Event release;
        auto holder = std::make_unique<anyio::Task<int>>(value_after(release, 5));
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { result = co_await std::move(*holder); });
            co_await anyio::checkpoint();  // the child awaits the task, which waits on `release`
            holder_empty = !holder->valid();
            *holder = value_of(9);  // assigned over while awaited (once: freed the running frame)
            holder.reset();         // and destroyed
            release.set();
        });
    });
    CHECK(holder_empty);
    CHECK(result == 5);
}

TEST_CASE("Destroying a coroutine frame while the Task it awaits still runs terminates with a "
          "message",
          "[task]") {
    // A coroutine type of the user's, not run by the loop, awaiting an anyio Task.
    struct Detached {
        struct promise_type {
            Detached get_return_object() {
                return {std::coroutine_handle<promise_type>::from_promise(*this)};
            }
            std::suspend_never initial_suspend() noexcept { return {}; }
            std::suspend_always final_suspend() noexcept { return {}; }
            void return_void() noexcept {}
            void unhandled_exception() noexcept {}
        };
        std::coroutine_handle<promise_type> handle;
    };
    anyio_test::ChildOutcome child = anyio_test::run_in_child([] {
        anyio::run([]() -> anyio::Task<> {
            anyio::Event never;
            Detached detached = [](anyio::Event& event) -> Detached {
                co_await value_after(event, 1);
            }(never);
            co_await anyio::checkpoint();
            detached.handle.destroy();  // the awaited task still waits on `never`
        });
    });
    CHECK(child.aborted);
    CHECK(child.stderr_text.find("anyio: fatal error: anyio::Task: a coroutine frame was "
                                 "destroyed while the Task it awaits was still running") !=
          std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Custom awaitables
// ---------------------------------------------------------------------------------------------

TEST_CASE("A custom awaitable that resumes the coroutine from a call_soon callback leaves "
          "every primitive working",
          "[task][custom]") {
    std::string failures = "not run";
    int awaited = 0;
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::lowlevel::TaskHandle self = anyio::lowlevel::current_task();
        awaited = co_await ResumeFromCallSoon{};
        failures = co_await use_every_primitive(self);
        // Also when the custom awaitable is awaited in a nested task.
        failures += co_await [](anyio::lowlevel::TaskHandle task) -> anyio::Task<std::string> {
            co_await ResumeFromCallSoon{};
            co_return co_await use_every_primitive(task);
        }(self);
    });
    CHECK(awaited == 7);
    CHECK(failures == "");  // prints what failed
}

TEST_CASE("A custom awaitable resumed from another thread through call_soon_threadsafe leaves "
          "every primitive working",
          "[task][custom]") {
    std::string failures = "not run";
    bool resumed_on_loop_thread = false;
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::lowlevel::TaskHandle self = anyio::lowlevel::current_task();
        std::thread::id resumed_on = co_await ResumeFromOtherThread{};
        resumed_on_loop_thread = resumed_on == std::this_thread::get_id();
        failures = co_await use_every_primitive(self);
    });
    CHECK(resumed_on_loop_thread);
    CHECK(failures == "");  // prints what failed
}

TEST_CASE("lowlevel::current_task().reschedule() and reschedule_threadsafe() resume a task "
          "suspended in a custom awaitable",
          "[task][custom]") {
    std::string failures = "not run";
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::lowlevel::TaskHandle self = anyio::lowlevel::current_task();
        co_await Reschedule{false, {}};
        failures = co_await use_every_primitive(self);
        co_await Reschedule{true, {}};
        failures += co_await use_every_primitive(self);
    });
    CHECK(failures == "");  // prints what failed
    CHECK_THROWS_AS(anyio::lowlevel::current_task(), anyio::NoEventLoopError);
}

TEST_CASE("A custom awaitable may resume the coroutine inline, from its own await_suspend or "
          "from another task's step",
          "[task][custom]") {
    std::string inline_failures = "not run";
    std::string resumer_failures = "not run";
    std::string resumed_failures = "not run";
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::lowlevel::TaskHandle self = anyio::lowlevel::current_task();
        co_await ResumeInline{};
        inline_failures = co_await use_every_primitive(self);

        std::coroutine_handle<> parked;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                anyio::lowlevel::TaskHandle me = anyio::lowlevel::current_task();
                co_await Park{&parked};
                resumed_failures = co_await use_every_primitive(me);
            });
            tg.start_soon([&]() -> anyio::Task<> {
                anyio::lowlevel::TaskHandle me = anyio::lowlevel::current_task();
                co_await anyio::checkpoint();  // the other child has parked by now
                parked.resume();  // it runs inside this step until it suspends, then we go on
                resumer_failures = co_await use_every_primitive(me);
            });
            co_return;
        });
    });
    CHECK(inline_failures == "");
    CHECK(resumer_failures == "");
    CHECK(resumed_failures == "");
}

TEST_CASE("Custom awaitables through operator co_await, or whose await_suspend returns bool "
          "or a handle, work",
          "[task][custom]") {
    std::vector<int> results;
    anyio::run([&]() -> anyio::Task<> {
        results.push_back(co_await NeedsOperatorCoAwait{});
        results.push_back(co_await DeclineToSuspend{});
        results.push_back(co_await TransferBack{});
        co_await anyio::checkpoint();
        results.push_back(co_await value_of(3));
    });
    CHECK(results == std::vector<int>{7, 1, 2, 3});
}

TEST_CASE("Rescheduling a task twice, or one not suspended in a custom awaitable, throws "
          "std::logic_error",
          "[task][custom]") {
    std::vector<std::string> errors;
    anyio::lowlevel::TaskHandle empty;
    CHECK_FALSE(static_cast<bool>(empty));
    CHECK_THROWS_AS(empty.reschedule(), std::logic_error);
    anyio::run([&]() -> anyio::Task<> {
        anyio::lowlevel::TaskHandle self = anyio::lowlevel::current_task();
        try {
            self.reschedule();  // running, not suspended
        } catch (const std::logic_error& error) {
            errors.emplace_back(error.what());
        }
        struct RescheduleTwice {
            std::vector<std::string>* errors;
            bool await_ready() const noexcept { return false; }
            void await_suspend(std::coroutine_handle<>) const {
                anyio::lowlevel::TaskHandle task = anyio::lowlevel::current_task();
                task.reschedule();
                try {
                    task.reschedule();
                } catch (const std::logic_error& error) {
                    errors->emplace_back(error.what());
                }
            }
            void await_resume() const noexcept {}
        };
        co_await RescheduleTwice{&errors};
        std::thread other([&] {
            try {
                self.reschedule();
            } catch (const std::logic_error& error) {
                errors.emplace_back(error.what());
            }
        });
        other.join();
    });
    REQUIRE(errors.size() == 3);
    CHECK(errors[0].find("not suspended in a custom awaitable") != std::string::npos);
    CHECK(errors[1].find("not suspended in a custom awaitable") != std::string::npos);
    CHECK(errors[2].find("call_soon_threadsafe") != std::string::npos);
}

TEST_CASE("A task cancelled while suspended in a custom awaitable raises Cancelled at its next "
          "cancellation point after it resumes",
          "[task][custom]") {
    bool resumed = false;
    bool reached_after_checkpoint = false;
    bool caught = false;
    anyio_test::run_loop([&]() -> anyio::Task<> {
        anyio::CancelScope scope;
        std::coroutine_handle<> parked;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    co_await Park{&parked};
                    resumed = true;
                    co_await anyio::checkpoint();
                    reached_after_checkpoint = true;
                }());
                caught = scope.cancelled_caught();
            });
            co_await anyio::checkpoint();
            scope.cancel();               // cannot wake it: the custom awaitable holds it
            co_await anyio::checkpoint();
            anyio::EventLoop::current()->call_soon([&] { parked.resume(); });
        });
    });
    CHECK(resumed);
    CHECK_FALSE(reached_after_checkpoint);
    CHECK(caught);
}

// ---------------------------------------------------------------------------------------------
// Long chains: the stack must stay flat in Debug and under sanitizers too.
// ---------------------------------------------------------------------------------------------

TEST_CASE("1,000,000 sequential awaits of synchronously completing tasks do not overflow "
          "the stack",
          "[task][stress]") {
    constexpr int count = 1'000'000;
    std::int64_t total = anyio::run(sequential_awaits(count));
    CHECK(total == count / 2);
}

TEST_CASE("100,000 nested tasks, each awaiting the next, do not overflow the stack",
          "[task][stress]") {
    constexpr int depth = 100'000;
    CHECK(anyio::run(nested(depth)) == depth);

    // An exception from the bottom travels back up all 100,000 levels.
    std::string message;
    try {
        anyio::run(nested_throwing(depth));
    } catch (const std::runtime_error& error) {
        message = error.what();
    }
    CHECK(message == "thrown at the bottom");
}
