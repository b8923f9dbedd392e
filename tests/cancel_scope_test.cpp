#include <anyio/cancel_scope.hpp>
#include <anyio/capacity_limiter.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

ANYIO_TEST_FAILING_OPERATOR_NEW();

// Tests of anyio::CancelScope, move_on_after and fail_after (API.md, "Cancellation").
//
// Conventions: the loop runs on the test's main thread, so CHECK is used inside coroutines
// too; results are mostly copied out and checked after anyio::run() returned. Another party
// that must act "while the task waits" is a call_soon callback (it runs on the next loop
// turn, after the task has suspended) or a sibling task synchronised by an Event. Timing
// checks are one-sided and generous: "elapsed < 2 s" where the alternative is a 10 s sleep.

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;
using Clock = std::chrono::steady_clock;
using anyio::CancelScope;
using anyio::Task;

static_assert(!std::is_base_of_v<std::exception, anyio::Cancelled>,
              "anyio::Cancelled must not derive from std::exception");
static_assert(std::is_base_of_v<std::exception, anyio::TimeoutError>);

// The scope.run result types stated by the contract.
static_assert(std::is_same_v<anyio::scope_result_t<void>, bool>);
static_assert(std::is_same_v<anyio::scope_result_t<int>, std::optional<int>>);

/// Schedules `fn` to run on the loop's next turn (after the calling task has suspended).
template <class F>
void on_next_turn(F fn) {
    anyio::EventLoop* loop = anyio::EventLoop::current();
    REQUIRE(loop != nullptr);
    loop->call_soon(std::move(fn));
}

Task<int> value_now(int value) { co_return value; }

Task<int> value_after_checkpoint(int value) {
    co_await anyio::checkpoint();
    co_return value;
}

Task<int> value_after_sleep(Clock::duration delay, int value) {
    co_await anyio::sleep(delay);
    co_return value;
}

Task<> nothing_after_sleep(Clock::duration delay) { co_await anyio::sleep(delay); }

Task<> nothing_now() { co_return; }

Task<int&> ref_after_checkpoint(int& target) {
    co_await anyio::checkpoint();
    co_return target;
}

Task<int&> ref_after_sleep(Clock::duration delay, int& target) {
    co_await anyio::sleep(delay);
    co_return target;
}

/// Busy work with no cancellation point (co_await of a plain Task is not one either).
Task<int> compute_without_checkpoint(int n) {
    int sum = 0;
    for (int i = 1; i <= n; ++i) sum += co_await value_now(i);
    co_return sum;
}

/// `depth` nested scopes, each running the next level in scope.run(); the innermost level
/// sleeps until cancelled and records that it was.
Task<> nest_scopes(int depth, anyio::Event& innermost_waiting, bool& innermost_cancelled) {
    if (depth == 0) {
        innermost_waiting.set();
        try {
            co_await anyio::sleep(forever);
        } catch (const anyio::Cancelled&) {
            innermost_cancelled = true;
            throw;
        }
        co_return;
    }
    CancelScope scope;
    co_await scope.run(nest_scopes(depth - 1, innermost_waiting, innermost_cancelled));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// cancel()
// ---------------------------------------------------------------------------------------------

TEST_CASE("Cancelling a scope wakes a task sleeping inside it at once with Cancelled",
          "[cancel]") {
    CancelScope scope;
    bool called_before = true;
    bool caught_before = true;
    bool saw_cancelled = false;
    bool ran_past_sleep = false;
    std::optional<int> result = -1;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        called_before = scope.cancel_called();
        caught_before = scope.cancelled_caught();
        on_next_turn([&] { scope.cancel(); });
        Stopwatch watch;
        result = co_await scope.run([&]() -> Task<int> {
            try {
                co_await anyio::sleep(forever);
            } catch (const anyio::Cancelled&) {
                saw_cancelled = true;
                throw;
            }
            ran_past_sleep = true;
            co_return 1;
        }());
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(called_before);
    CHECK_FALSE(caught_before);
    CHECK(saw_cancelled);
    CHECK_FALSE(ran_past_sleep);
    CHECK_FALSE(result.has_value());
    CHECK(scope.cancel_called());
    CHECK(scope.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("Cancelling a scope running a Task<void> makes run() return false", "[cancel]") {
    CancelScope scope;
    bool result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        on_next_turn([&] { scope.cancel(); });
        Stopwatch watch;
        result = co_await scope.run(nothing_after_sleep(forever));
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(result);
    CHECK(scope.cancel_called());
    CHECK(scope.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("A scope that is never cancelled returns the task's value and reports nothing",
          "[cancel]") {
    CancelScope scope;
    std::optional<int> value;
    bool completed = false;

    anyio::run([&]() -> Task<> {
        value = co_await scope.run(value_after_checkpoint(7));
        CancelScope void_scope;
        completed = co_await void_scope.run(nothing_after_sleep(1ms));
        CHECK_FALSE(void_scope.cancel_called());
        CHECK_FALSE(void_scope.cancelled_caught());
    }());

    REQUIRE(value.has_value());
    CHECK(*value == 7);
    CHECK(completed);
    CHECK_FALSE(scope.cancel_called());
    CHECK_FALSE(scope.cancelled_caught());
}

TEST_CASE("A scope cancelled before run() raises Cancelled at the first cancellation point",
          "[cancel]") {
    CancelScope scope;
    bool before_checkpoint = false;
    bool after_checkpoint = false;
    bool result = true;

    anyio::run([&]() -> Task<> {
        scope.cancel();
        CHECK(scope.cancel_called());
        CHECK_FALSE(scope.cancelled_caught());
        result = co_await scope.run([&]() -> Task<> {
            before_checkpoint = true;
            co_await anyio::checkpoint();
            after_checkpoint = true;
        }());
    }());

    CHECK(before_checkpoint);
    CHECK_FALSE(after_checkpoint);
    CHECK_FALSE(result);
    CHECK(scope.cancel_called());
    CHECK(scope.cancelled_caught());
}

TEST_CASE("Every kind of cancellation point raises Cancelled in a cancelled scope",
          "[cancel]") {
    enum class Point { checkpoint, sleep_zero, sleep_until_past, event_set, limiter_free };
    for (Point point : {Point::checkpoint, Point::sleep_zero, Point::sleep_until_past,
                        Point::event_set, Point::limiter_free}) {
        CAPTURE(static_cast<int>(point));
        bool passed_point = false;
        bool result = true;
        std::int64_t borrowed_after = -1;

        anyio::run([&]() -> Task<> {
            anyio::Event event;
            event.set();  // would not wait at all: still a cancellation point
            anyio::CapacityLimiter limiter(1);  // a token is free: still a cancellation point
            CancelScope scope;
            scope.cancel();
            result = co_await scope.run([&]() -> Task<> {
                switch (point) {
                    case Point::checkpoint: co_await anyio::checkpoint(); break;
                    case Point::sleep_zero: co_await anyio::sleep(0s); break;
                    case Point::sleep_until_past:
                        co_await anyio::sleep_until(anyio::current_time() - 1s);
                        break;
                    case Point::event_set: co_await event.wait(); break;
                    case Point::limiter_free: co_await limiter.acquire(); break;
                }
                passed_point = true;
            }());
            borrowed_after = limiter.borrowed_tokens();
        }());

        CHECK_FALSE(passed_point);
        CHECK_FALSE(result);
        CHECK(borrowed_after == 0);  // a cancelled acquire takes no token
    }
}

TEST_CASE("A task with no cancellation point inside a cancelled scope runs to completion",
          "[cancel]") {
    CancelScope scope;
    std::optional<int> result;
    bool finished = false;

    anyio::run([&]() -> Task<> {
        scope.cancel();
        result = co_await scope.run([&]() -> Task<int> {
            int sum = co_await compute_without_checkpoint(100);
            finished = true;
            co_return sum;
        }());
    }());

    CHECK(finished);
    REQUIRE(result.has_value());
    CHECK(*result == 5050);
    CHECK(scope.cancel_called());
    CHECK_FALSE(scope.cancelled_caught());  // nothing was cancelled: delivery needs a point
}

TEST_CASE("A task that cancels its own scope runs on until its next cancellation point",
          "[cancel]") {
    CancelScope scope;
    bool after_cancel = false;
    bool after_checkpoint = false;
    bool result = true;

    anyio::run([&]() -> Task<> {
        result = co_await scope.run([&]() -> Task<> {
            scope.cancel();
            scope.cancel();  // idempotent
            after_cancel = true;
            co_await anyio::checkpoint();
            after_checkpoint = true;
        }());
    }());

    CHECK(after_cancel);
    CHECK_FALSE(after_checkpoint);
    CHECK_FALSE(result);
    CHECK(scope.cancelled_caught());
}

TEST_CASE("Event::wait and CapacityLimiter::acquire are woken by a cancellation and leave "
          "nothing behind",
          "[cancel]") {
    bool event_result = true;
    bool limiter_result = true;
    std::int64_t waiting_after = -1;
    std::int64_t borrowed_after = -1;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        anyio::Event event;
        CancelScope event_scope;
        on_next_turn([&] { event_scope.cancel(); });
        event_result = co_await event_scope.run([&]() -> Task<> { co_await event.wait(); }());
        event.set();  // the cancelled waiter must be gone from the event's list

        anyio::CapacityLimiter limiter(0);  // every acquire waits
        CancelScope limiter_scope;
        on_next_turn([&] { limiter_scope.cancel(); });
        limiter_result =
            co_await limiter_scope.run([&]() -> Task<> { co_await limiter.acquire(); }());
        waiting_after = limiter.statistics().tasks_waiting;
        limiter.set_total_tokens(1);  // nobody is left to hand it to
        borrowed_after = limiter.borrowed_tokens();
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(event_result);
    CHECK_FALSE(limiter_result);
    CHECK(waiting_after == 0);
    CHECK(borrowed_after == 0);
    CHECK(elapsed < prompt_bound);
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

TEST_CASE("A scope whose deadline has passed cancels at the first checkpoint", "[cancel]") {
    const auto past = Clock::now() - 1s;
    CancelScope scope(past);
    bool before_checkpoint = false;
    bool after_checkpoint = false;
    bool result = true;

    CHECK(scope.deadline() == past);
    CHECK_FALSE(scope.shield());
    anyio::run([&]() -> Task<> {
        result = co_await scope.run([&]() -> Task<> {
            before_checkpoint = true;
            co_await anyio::checkpoint();
            after_checkpoint = true;
        }());
    }());

    CHECK(before_checkpoint);
    CHECK_FALSE(after_checkpoint);
    CHECK_FALSE(result);
    CHECK(scope.cancel_called());
    CHECK(scope.cancelled_caught());
}

TEST_CASE("A scope's deadline cancels a task waiting inside it when it expires", "[cancel]") {
    std::optional<int> result = -1;
    bool called = false;
    bool caught = false;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        CancelScope scope(anyio::current_time() + 20ms);
        result = co_await scope.run(value_after_sleep(forever, 1));
        elapsed = watch.elapsed();
        called = scope.cancel_called();
        caught = scope.cancelled_caught();
    }());

    CHECK_FALSE(result.has_value());
    CHECK(called);
    CHECK(caught);
    CHECK(elapsed >= 20ms);
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("The default deadline is time_point::max and set_deadline moves deadline()",
          "[cancel]") {
    CancelScope scope;
    CHECK(scope.deadline() == CancelScope::time_point::max());
    const auto later = Clock::now() + 1h;
    scope.set_deadline(later);
    CHECK(scope.deadline() == later);
    CHECK_FALSE(scope.cancel_called());

    // Setting a deadline on a scope that is not entered yet takes effect when it is entered.
    bool result = true;
    anyio::run([&]() -> Task<> {
        scope.set_deadline(anyio::current_time() - 1s);
        CHECK_FALSE(scope.cancel_called());  // not entered: nothing is cancelled yet
        result = co_await scope.run(nothing_after_sleep(forever));
    }());
    CHECK_FALSE(result);
    CHECK(scope.cancelled_caught());
}

TEST_CASE("Moving the deadline earlier while a task waits inside cancels it sooner",
          "[cancel]") {
    CancelScope scope;
    bool result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] { scope.set_deadline(anyio::current_time() + 20ms); });
        result = co_await scope.run(nothing_after_sleep(forever));
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(result);
    CHECK(scope.cancel_called());
    CHECK(scope.cancelled_caught());
    CHECK(elapsed >= 20ms);
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("Moving the deadline into the past while a task waits inside cancels it at once",
          "[cancel]") {
    CancelScope scope(Clock::now() + forever);
    bool result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] {
            scope.set_deadline(anyio::current_time() - 1s);
            // A past deadline cancels right away, not at some later timer tick.
            CHECK(scope.cancel_called());
        });
        result = co_await scope.run(nothing_after_sleep(forever));
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(result);
    CHECK(scope.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("Moving the deadline later while a task waits inside keeps it waiting",
          "[cancel]") {
    bool result = false;
    bool moved_in_time = false;
    bool called = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        const auto first_deadline = anyio::current_time() + 150ms;
        CancelScope scope(first_deadline);
        anyio::Event inside;
        anyio::Event release;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                result = co_await scope.run([&]() -> Task<> {
                    inside.set();
                    co_await release.wait();
                }());
            });
            tg.start_soon([&]() -> Task<> {
                co_await inside.wait();
                moved_in_time = anyio::current_time() < first_deadline;
                scope.set_deadline(anyio::current_time() + forever);
                // The first deadline passes while the task still waits inside.
                co_await anyio::sleep(300ms);
                release.set();
            });
            co_return;
        });
        elapsed = watch.elapsed();
        called = scope.cancel_called();
    }());

    REQUIRE(moved_in_time);
    CHECK(result);
    CHECK_FALSE(called);
    CHECK(elapsed >= 300ms);
}

TEST_CASE("set_deadline(time_point::max()) disables the deadline of an active scope",
          "[cancel]") {
    bool result = false;
    bool called = true;
    auto deadline_after = Clock::time_point{};

    anyio::run([&]() -> Task<> {
        CancelScope scope(anyio::current_time() + 50ms);
        on_next_turn([&] { scope.set_deadline(CancelScope::time_point::max()); });
        result = co_await scope.run(nothing_after_sleep(200ms));
        called = scope.cancel_called();
        deadline_after = scope.deadline();
    }());

    CHECK(result);
    CHECK_FALSE(called);
    CHECK(deadline_after == CancelScope::time_point::max());
}

TEST_CASE("A scope that exits before its deadline leaves no timer behind", "[cancel]") {
    std::size_t timers_after = 99;
    bool completed = false;

    anyio::run([&]() -> Task<> {
        {
            CancelScope scope(anyio::current_time() + 30ms);
            completed = co_await scope.run(nothing_now());
        }  // the scope is gone: its deadline must not fire into freed memory
        timers_after = anyio::EventLoop::current()->timer_count();
        co_await anyio::sleep(60ms);
    }());

    CHECK(completed);
    CHECK(timers_after == 0);
}

// ---------------------------------------------------------------------------------------------
// Shielding
// ---------------------------------------------------------------------------------------------

TEST_CASE("A shielded scope inside a cancelled scope runs to completion and the outer "
          "cancellation arrives at the next checkpoint after it",
          "[cancel]") {
    CancelScope outer;
    CancelScope shielded(CancelScope::time_point::max(), true);
    bool shielded_result = false;
    bool after_shield = false;
    bool after_checkpoint = false;
    bool outer_result = true;
    Clock::duration shielded_elapsed{};

    CHECK(shielded.shield());
    anyio::run([&]() -> Task<> {
        outer_result = co_await outer.run([&]() -> Task<> {
            outer.cancel();
            Stopwatch watch;
            shielded_result = co_await shielded.run(nothing_after_sleep(20ms));
            shielded_elapsed = watch.elapsed();
            after_shield = true;  // no cancellation point since the shield ended
            co_await anyio::checkpoint();
            after_checkpoint = true;
        }());
    }());

    CHECK(shielded_result);
    CHECK(shielded_elapsed >= 20ms);
    CHECK_FALSE(shielded.cancel_called());
    CHECK_FALSE(shielded.cancelled_caught());
    CHECK(after_shield);
    CHECK_FALSE(after_checkpoint);
    CHECK_FALSE(outer_result);
    CHECK(outer.cancelled_caught());
}

TEST_CASE("A shield protects a task already waiting inside it, nested scopes included",
          "[cancel]") {
    CancelScope outer;
    CancelScope shielded(CancelScope::time_point::max(), true);
    CancelScope inner;  // not shielded itself, but inside the shield
    bool inner_result = false;
    bool outer_result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] { outer.cancel(); });
        outer_result = co_await outer.run([&]() -> Task<> {
            co_await shielded.run([&]() -> Task<> {
                inner_result = co_await inner.run(nothing_after_sleep(50ms));
            }());
            co_await anyio::sleep(forever);  // the outer cancellation lands here
        }());
        elapsed = watch.elapsed();
    }());

    CHECK(inner_result);
    CHECK_FALSE(inner.cancelled_caught());
    CHECK_FALSE(shielded.cancelled_caught());
    CHECK_FALSE(outer_result);
    CHECK(outer.cancelled_caught());
    CHECK(elapsed >= 50ms);
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("A shielded scope's own cancel() still cancels the task inside it", "[cancel]") {
    CancelScope shielded(CancelScope::time_point::max(), true);
    bool result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] { shielded.cancel(); });
        result = co_await shielded.run(nothing_after_sleep(forever));
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(result);
    CHECK(shielded.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("Lifting the shield of an active scope delivers a pending outer cancellation",
          "[cancel]") {
    CancelScope outer;
    CancelScope shielded(CancelScope::time_point::max(), true);
    bool woken_before_unshield = true;
    bool woken = false;
    bool passed_shielded = false;
    bool outer_result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] {
            outer.cancel();
            // If the cancellation had reached the task, it would run before this callback.
            on_next_turn([&] {
                woken_before_unshield = woken;
                shielded.set_shield(false);
            });
        });
        outer_result = co_await outer.run([&]() -> Task<> {
            try {
                co_await shielded.run([&]() -> Task<> {
                    try {
                        co_await anyio::sleep(forever);
                    } catch (const anyio::Cancelled&) {
                        woken = true;
                        throw;
                    }
                }());
            } catch (const anyio::Cancelled&) {
                passed_shielded = true;
                throw;
            }
        }());
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(woken_before_unshield);
    CHECK(woken);
    CHECK_FALSE(shielded.shield());
    CHECK(passed_shielded);  // the cancellation was the outer scope's
    CHECK_FALSE(shielded.cancelled_caught());
    CHECK_FALSE(outer_result);
    CHECK(outer.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

// ---------------------------------------------------------------------------------------------
// Nesting
// ---------------------------------------------------------------------------------------------

TEST_CASE("A Cancelled caused by an outer scope passes through an inner scope and is caught "
          "by the outer one",
          "[cancel]") {
    CancelScope outer;
    CancelScope inner;
    bool passed_inner = false;
    bool outer_result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] { outer.cancel(); });
        outer_result = co_await outer.run([&]() -> Task<> {
            try {
                co_await inner.run(value_after_sleep(forever, 1));
            } catch (const anyio::Cancelled&) {
                passed_inner = true;
                throw;
            }
        }());
        elapsed = watch.elapsed();
    }());

    CHECK(passed_inner);
    CHECK_FALSE(inner.cancel_called());
    CHECK_FALSE(inner.cancelled_caught());
    CHECK_FALSE(outer_result);
    CHECK(outer.cancel_called());
    CHECK(outer.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("When an inner and an outer scope are both cancelled, the Cancelled goes on to the "
          "outer scope",
          "[cancel]") {
    // anyio 4 / trio: a scope swallows Cancelled only if no cancelled enclosing scope is
    // visible to it (anyio: `_parent_cancellation_is_visible_to_us`), so the code after the
    // inner scope does not run and the outermost cancelled scope catches the exception.
    CancelScope outer;
    CancelScope inner;
    bool after_inner = false;
    bool outer_result = true;

    anyio::run([&]() -> Task<> {
        outer_result = co_await outer.run([&]() -> Task<> {
            outer.cancel();
            inner.cancel();
            co_await inner.run(nothing_after_sleep(forever));
            after_inner = true;
        }());
    }());

    CHECK_FALSE(after_inner);
    CHECK_FALSE(inner.cancelled_caught());
    CHECK_FALSE(outer_result);
    CHECK(outer.cancelled_caught());
}

TEST_CASE("Cancelling an inner scope leaves the outer scope running", "[cancel]") {
    CancelScope outer;
    CancelScope inner;
    bool inner_result = true;
    bool after_inner = false;
    bool outer_result = false;

    anyio::run([&]() -> Task<> {
        on_next_turn([&] { inner.cancel(); });
        outer_result = co_await outer.run([&]() -> Task<> {
            inner_result = co_await inner.run(nothing_after_sleep(forever));
            co_await anyio::checkpoint();  // the outer scope is not cancelled
            after_inner = true;
        }());
    }());

    CHECK_FALSE(inner_result);
    CHECK(inner.cancelled_caught());
    CHECK(after_inner);
    CHECK(outer_result);
    CHECK_FALSE(outer.cancel_called());
    CHECK_FALSE(outer.cancelled_caught());
}

// ---------------------------------------------------------------------------------------------
// move_on_after / fail_after
// ---------------------------------------------------------------------------------------------

TEST_CASE("move_on_after returns the value when the task finishes in time", "[cancel]") {
    std::optional<int> value;
    bool void_result = false;
    int target = 5;
    std::optional<std::reference_wrapper<int>> ref;
    std::optional<std::unique_ptr<int>> owned;

    anyio::run([&]() -> Task<> {
        value = co_await anyio::move_on_after(forever, value_after_checkpoint(42));
        void_result = co_await anyio::move_on_after(forever, nothing_after_sleep(1ms));
        ref = co_await anyio::move_on_after(forever, ref_after_checkpoint(target));
        owned = co_await anyio::move_on_after(forever, []() -> Task<std::unique_ptr<int>> {
            co_await anyio::checkpoint();
            co_return std::make_unique<int>(9);
        }());
    }());

    REQUIRE(value.has_value());
    CHECK(*value == 42);
    CHECK(void_result);
    REQUIRE(ref.has_value());
    CHECK(&ref->get() == &target);
    REQUIRE(owned.has_value());
    REQUIRE(*owned != nullptr);
    CHECK(**owned == 9);
}

TEST_CASE("move_on_after returns an empty result when the deadline passes", "[cancel]") {
    std::optional<int> value = -1;
    bool void_result = true;
    int target = 5;
    std::optional<std::reference_wrapper<int>> ref = std::ref(target);
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        value = co_await anyio::move_on_after(20ms, value_after_sleep(forever, 1));
        void_result = co_await anyio::move_on_after(20ms, nothing_after_sleep(forever));
        ref = co_await anyio::move_on_after(20ms, ref_after_sleep(forever, target));
        elapsed = watch.elapsed();
    }());

    CHECK_FALSE(value.has_value());
    CHECK_FALSE(void_result);
    CHECK_FALSE(ref.has_value());
    CHECK(elapsed >= 60ms);
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("move_on_after with a zero or negative delay only cancels at a cancellation point",
          "[cancel]") {
    std::optional<int> no_checkpoint;
    std::optional<int> zero = -1;
    std::optional<int> negative = -1;

    anyio::run([&]() -> Task<> {
        no_checkpoint = co_await anyio::move_on_after(0s, compute_without_checkpoint(10));
        zero = co_await anyio::move_on_after(0s, value_after_checkpoint(1));
        negative = co_await anyio::move_on_after(-1s, value_after_checkpoint(1));
    }());

    REQUIRE(no_checkpoint.has_value());
    CHECK(*no_checkpoint == 55);
    CHECK_FALSE(zero.has_value());
    CHECK_FALSE(negative.has_value());
}

TEST_CASE("fail_after returns the value when the task finishes in time", "[cancel]") {
    int value = 0;
    bool void_done = false;
    int target = 5;
    int* ref_address = nullptr;

    anyio::run([&]() -> Task<> {
        value = co_await anyio::fail_after(forever, value_after_checkpoint(42));
        co_await anyio::fail_after(forever, nothing_after_sleep(1ms));
        void_done = true;
        int& ref = co_await anyio::fail_after(forever, ref_after_checkpoint(target));
        ref_address = &ref;
    }());

    CHECK(value == 42);
    CHECK(void_done);
    CHECK(ref_address == &target);
}

TEST_CASE("fail_after throws TimeoutError when the deadline passes", "[cancel]") {
    int timeouts = 0;
    bool value_assigned = false;
    bool void_continued = false;
    bool ref_assigned = false;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        int target = 0;
        try {
            int v = co_await anyio::fail_after(20ms, value_after_sleep(forever, 1));
            value_assigned = v == 1;
        } catch (const anyio::TimeoutError&) {
            ++timeouts;
        }
        try {
            co_await anyio::fail_after(20ms, nothing_after_sleep(forever));
            void_continued = true;
        } catch (const anyio::TimeoutError&) {
            ++timeouts;
        }
        try {
            int& r = co_await anyio::fail_after(20ms, ref_after_sleep(forever, target));
            ref_assigned = &r == &target;
        } catch (const anyio::TimeoutError& error) {
            CHECK(std::string(error.what()).find("deadline") != std::string::npos);
            ++timeouts;
        }
        elapsed = watch.elapsed();
    }());

    CHECK(timeouts == 3);
    CHECK_FALSE(value_assigned);
    CHECK_FALSE(void_continued);
    CHECK_FALSE(ref_assigned);
    CHECK(elapsed >= 60ms);
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("fail_after inside a cancelled outer scope lets Cancelled through, not TimeoutError",
          "[cancel]") {
    CancelScope outer;
    bool saw_timeout = false;
    bool saw_cancelled = false;
    bool outer_result = true;

    anyio::run([&]() -> Task<> {
        on_next_turn([&] { outer.cancel(); });
        outer_result = co_await outer.run([&]() -> Task<> {
            try {
                co_await anyio::fail_after(forever, nothing_after_sleep(forever));
            } catch (const anyio::TimeoutError&) {
                saw_timeout = true;
            } catch (const anyio::Cancelled&) {
                saw_cancelled = true;
                throw;
            }
        }());
    }());

    CHECK_FALSE(saw_timeout);
    CHECK(saw_cancelled);
    CHECK_FALSE(outer_result);
    CHECK(outer.cancelled_caught());
}

// ---------------------------------------------------------------------------------------------
// Cleanup, errors and misuse
// ---------------------------------------------------------------------------------------------

TEST_CASE("Catching Cancelled to clean up and rethrowing it lets the scope catch it",
          "[cancel]") {
    CancelScope scope;
    bool cleaned_up = false;
    bool shielded_cleanup_done = false;
    bool result = true;
    Clock::duration elapsed{};

    anyio::run([&]() -> Task<> {
        Stopwatch watch;
        on_next_turn([&] { scope.cancel(); });
        result = co_await scope.run([&]() -> Task<> {
            std::exception_ptr pending;
            try {
                co_await anyio::sleep(forever);
            } catch (const anyio::Cancelled&) {
                cleaned_up = true;
                pending = std::current_exception();
            }
            if (pending) {
                // Asynchronous cleanup needs a shield (trio's idiom), then the rethrow.
                CancelScope cleanup(CancelScope::time_point::max(), true);
                shielded_cleanup_done = co_await cleanup.run(nothing_after_sleep(5ms));
                std::rethrow_exception(pending);
            }
        }());
        elapsed = watch.elapsed();
    }());

    CHECK(cleaned_up);
    CHECK(shielded_cleanup_done);
    CHECK_FALSE(result);
    CHECK(scope.cancelled_caught());
    CHECK(elapsed < prompt_bound);
}

TEST_CASE("catch (const std::exception&) does not swallow a cancellation", "[cancel]") {
    CancelScope scope;
    bool swallowed = false;
    bool result = true;

    anyio::run([&]() -> Task<> {
        on_next_turn([&] { scope.cancel(); });
        result = co_await scope.run([&]() -> Task<> {
            try {
                co_await anyio::sleep(forever);
            } catch (const std::exception&) {
                swallowed = true;
            }
        }());
    }());

    CHECK_FALSE(swallowed);
    CHECK_FALSE(result);
    CHECK(scope.cancelled_caught());
}

TEST_CASE("An error thrown inside a scope propagates through run() with its own type",
          "[cancel]") {
    struct CustomError {
        int code;
    };
    CancelScope plain;
    CancelScope cancelled;
    std::string plain_message;
    int custom_code = 0;

    anyio::run([&]() -> Task<> {
        try {
            co_await plain.run([]() -> Task<int> {
                co_await anyio::checkpoint();
                throw std::invalid_argument("bad input");
            }());
        } catch (const std::invalid_argument& error) {
            plain_message = error.what();
        }
        // An error raised while handling this scope's cancellation replaces the Cancelled:
        // the scope must not swallow it.
        on_next_turn([&] { cancelled.cancel(); });
        try {
            co_await cancelled.run([]() -> Task<> {
                try {
                    co_await anyio::sleep(forever);
                } catch (const anyio::Cancelled&) {
                    throw CustomError{17};
                }
            }());
        } catch (const CustomError& error) {
            custom_code = error.code;
        }
    }());

    CHECK(plain_message == "bad input");
    CHECK_FALSE(plain.cancelled_caught());
    CHECK(custom_code == 17);
    CHECK(cancelled.cancel_called());
    CHECK_FALSE(cancelled.cancelled_caught());
}

TEST_CASE("Running a scope twice throws std::logic_error", "[cancel]") {
    CancelScope scope;
    bool first = false;
    bool second_threw = false;
    bool second_task_ran = false;
    bool nested_threw = false;

    anyio::run([&]() -> Task<> {
        first = co_await scope.run(nothing_now());
        try {
            co_await scope.run([&]() -> Task<> {
                second_task_ran = true;
                co_return;
            }());
        } catch (const std::logic_error&) {
            second_threw = true;
        }
        // Re-entering a scope that is still running is misuse too.
        CancelScope active;
        co_await active.run([&]() -> Task<> {
            try {
                co_await active.run(nothing_now());
            } catch (const std::logic_error&) {
                nested_threw = true;
            }
        }());
    }());

    CHECK(first);
    CHECK(second_threw);
    CHECK_FALSE(second_task_ran);
    CHECK(nested_threw);
}

TEST_CASE("A cancelled scope frees everything when the loop ends", "[cancel]") {
    // Many cancelled tasks with live awaiters, timers and shielded cleanups; the ASan build
    // checks that nothing leaks and nothing is touched after it is freed.
    int caught = 0;
    anyio::run([&]() -> Task<> {
        for (int i = 0; i < 200; ++i) {
            CancelScope scope(anyio::current_time() + std::chrono::microseconds(i % 7));
            anyio::Event never;
            bool done = co_await scope.run([&]() -> Task<> {
                auto owned = std::make_unique<std::string>("resource");
                if (i % 2 == 0) {
                    co_await never.wait();
                } else {
                    co_await anyio::sleep(forever);
                }
            }());
            if (!done && scope.cancelled_caught()) ++caught;
        }
    }());
    CHECK(caught == 200);
}

// Kept last: with the overflow it guards against, the UBSan build stops at this test.
TEST_CASE("move_on_after and fail_after accept a huge delay as 'no deadline'", "[cancel]") {
    // Durations may be any std::chrono::duration: a delay past the clock's range means no
    // deadline; it must not overflow into one in the past.
    std::optional<int> moved = -1;
    int failed = -1;
    bool timed_out = false;

    anyio::run([&]() -> Task<> {
        moved = co_await anyio::move_on_after(std::chrono::seconds::max(),
                                              value_after_checkpoint(3));
        try {
            failed = co_await anyio::fail_after(std::chrono::hours::max(),
                                                value_after_checkpoint(4));
        } catch (const anyio::TimeoutError&) {
            timed_out = true;
        }
    }());

    CHECK(moved.has_value());
    CHECK(moved.value_or(-1) == 3);
    CHECK_FALSE(timed_out);
    CHECK(failed == 4);
}

// ---------------------------------------------------------------------------------------------
// Misuse, failure and scale
// ---------------------------------------------------------------------------------------------

TEST_CASE("Entering a cancel scope whose deadline timer cannot be armed leaves the task in "
          "the scope it was in",
          "[cancel]") {
    if (!can_fail_allocations) return;  // operator new cannot be replaced (TSan)
    bool threw_bad_alloc = false;
    bool scope_unchanged = false;
    bool scopes_still_work = false;
    anyio::run([&]() -> Task<> {
        anyio::detail::TaskState& host = CancelScope::current_task("test");
        CancelScope* before = host.scope_;
        {
            CancelScope scope(Clock::now() + 1h);
            // The loop's timer heap is still empty: arming the deadline has to allocate.
            fail_allocations = true;
            try {
                scope.enter(host);
            } catch (const std::bad_alloc&) {
                threw_bad_alloc = true;
            }
            fail_allocations = false;
            scope_unchanged = host.scope_ == before;
        }  // before the fix, the task still pointed into this scope once it was gone
        CancelScope outer;
        on_next_turn([&] { outer.cancel(); });
        co_await outer.run(nothing_after_sleep(forever));
        scopes_still_work = outer.cancelled_caught() && host.scope_ == before;
    });
    CHECK(threw_bad_alloc);
    CHECK(scope_unchanged);
    CHECK(scopes_still_work);
}

TEST_CASE("Destroying a cancel scope while a task is inside it terminates with a message",
          "[cancel]") {
    ChildOutcome child = run_in_child([] {
        anyio::run([]() -> Task<> {
            auto scope = std::make_unique<CancelScope>();
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> Task<> {
                tg.start_soon([&]() -> Task<> { co_await scope->run(nothing_after_sleep(50ms)); });
                co_await anyio::checkpoint();  // the child is inside the scope, sleeping
                scope.reset();
            });
        });
    });
    CHECK(child.aborted);
    CHECK(child.stderr_text.find("anyio: fatal error: anyio::CancelScope: a cancel scope was "
                                 "destroyed while a task was still inside it") !=
          std::string::npos);
}

TEST_CASE("cancel, set_deadline and set_shield from another thread throw std::logic_error",
          "[cancel]") {
    std::vector<std::string> outcomes;
    bool cancelled = true;
    anyio::run([&]() -> Task<> {
        CancelScope scope;
        co_await scope.run([&]() -> Task<> {
            std::thread other([&] {
                outcomes.push_back(outcome_of([&] { scope.cancel(); }));
                outcomes.push_back(outcome_of([&] { scope.set_deadline(Clock::now()); }));
                outcomes.push_back(outcome_of([&] { scope.set_shield(true); }));
            });
            other.join();
            co_await anyio::checkpoint();
        }());
        cancelled = scope.cancel_called() || scope.shield();
    });
    CHECK(outcomes == std::vector<std::string>(3, "std::logic_error"));
    CHECK_FALSE(cancelled);
}

TEST_CASE("100,000 nested cancel scopes are entered in O(1) each, and cancelling the outermost "
          "reaches the innermost without recursion",
          "[cancel][stress]") {
    constexpr int depth = 100'000;
    bool innermost_cancelled = false;
    bool caught_by_outer = false;
    Clock::duration entering{};
    Clock::duration cancelling{};
    anyio::run([&]() -> Task<> {
        CancelScope outer;
        anyio::Event innermost_waiting;
        Stopwatch watch;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> Task<> {
            tg.start_soon([&]() -> Task<> {
                co_await outer.run(nest_scopes(depth, innermost_waiting, innermost_cancelled));
            });
            co_await innermost_waiting.wait();
            entering = watch.elapsed();
            watch = Stopwatch{};
            outer.cancel();
        });
        cancelling = watch.elapsed();
        caught_by_outer = outer.cancelled_caught();
    });
    CHECK(innermost_cancelled);
    CHECK(caught_by_outer);
    // Before: entering walked to the root each time (21.7 s for 100,000), delivery recursed.
    CHECK(entering < 10s);
    CHECK(cancelling < 10s);
}

TEST_CASE("Shielding a scope after an outer cancellation protects the tasks inside it from "
          "then on, and lifting the shield again cancels them",
          "[cancel]") {
    bool inner_cancelled_while_shielded = true;
    bool inner_cancelled_after = false;
    anyio::run([&]() -> Task<> {
        CancelScope outer;
        CancelScope middle;
        CancelScope inner;
        co_await outer.run([&]() -> Task<> {
            co_await middle.run([&]() -> Task<> {
                co_await inner.run([&]() -> Task<> {
                    outer.cancel();
                    middle.set_shield(true);  // the pending outer cancellation no longer applies
                    inner_cancelled_while_shielded =
                        anyio::detail::is_cancelled(CancelScope::current_task("test"));
                    co_await anyio::checkpoint();  // not a Cancelled
                    middle.set_shield(false);
                    inner_cancelled_after =
                        anyio::detail::is_cancelled(CancelScope::current_task("test"));
                    co_await anyio::checkpoint();  // Cancelled, caught by outer
                }());
            }());
        }());
        CHECK(outer.cancelled_caught());
        CHECK_FALSE(middle.cancelled_caught());
        CHECK_FALSE(inner.cancelled_caught());
    });
    CHECK_FALSE(inner_cancelled_while_shielded);
    CHECK(inner_cancelled_after);
}
