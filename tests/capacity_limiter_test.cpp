#include <anyio/capacity_limiter.hpp>

#include <anyio/cancel_scope.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <dlfcn.h>

#include "catch.hpp"
#include "test_support.hpp"

namespace {

// Every test body runs under run_loop's deadline (anyio_test::test_timeout), so a limiter that
// never grants a token fails the test instead of hanging it.
using namespace anyio_test;

// The message of the `E` that `fn()` throws, or nothing if it throws nothing. Any other
// exception escapes and fails the test.
template <class E, class F>
std::optional<std::string> thrown_message(F&& fn) {
    try {
        std::forward<F>(fn)();
    } catch (const E& error) {
        return std::string(error.what());
    }
    return std::nullopt;
}

std::vector<const void*> sorted(std::vector<const void*> pointers) {
    std::sort(pointers.begin(), pointers.end());
    return pointers;
}

constexpr const char* already_holding = "already holding one of this CapacityLimiter's tokens";

bool contains(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

}  // namespace

// Out-of-memory injection: the next `fail_next_allocations` global allocations made on this
// thread throw std::bad_alloc. Only ever armed around a single synchronous call. Not with
// clang's sanitizers, whose runtimes are linked statically and define operator new
// themselves (g++ links them as shared libraries, which a replacement overrides).
#if !(defined(__clang__) && defined(ANYIO_TEST_SANITIZED))
#define ANYIO_TEST_REPLACES_OPERATOR_NEW 1
namespace {
thread_local int fail_next_allocations = 0;
}  // namespace

// The replacement forwards to the operator new and delete it replaces (the C++ runtime's, or
// a sanitizer's), found with dlsym(RTLD_NEXT): memory allocated inside the shared C++ runtime
// may be freed here and the other way round, so both sides must be the same allocator.
namespace {
using OperatorNew = void* (*)(std::size_t);
using OperatorDelete = void (*)(void*) noexcept;

OperatorNew next_operator_new() {
    static const auto fn = reinterpret_cast<OperatorNew>(::dlsym(RTLD_NEXT, "_Znwm"));
    return fn;
}
OperatorDelete next_operator_delete() {
    static const auto fn = reinterpret_cast<OperatorDelete>(::dlsym(RTLD_NEXT, "_ZdlPv"));
    return fn;
}
}  // namespace

void* operator new(std::size_t size) {
    if (fail_next_allocations > 0) {
        --fail_next_allocations;
        throw std::bad_alloc();
    }
    return next_operator_new()(size);
}
void operator delete(void* p) noexcept { next_operator_delete()(p); }
void operator delete(void* p, std::size_t) noexcept { next_operator_delete()(p); }
#endif  // ANYIO_TEST_REPLACES_OPERATOR_NEW

TEST_CASE("A negative total is rejected with std::invalid_argument", "[limiter]") {
    auto message =
        thrown_message<std::invalid_argument>([] { anyio::CapacityLimiter limiter(-1); });
    REQUIRE(message.has_value());
    CHECK(*message == "total_tokens must be >= 0");

    message = thrown_message<std::invalid_argument>(
        [] { anyio::CapacityLimiter limiter(std::numeric_limits<std::int64_t>::min()); });
    REQUIRE(message.has_value());
    CHECK(*message == "total_tokens must be >= 0");

    anyio::CapacityLimiter limiter(2);
    message = thrown_message<std::invalid_argument>([&] { limiter.set_total_tokens(-1); });
    REQUIRE(message.has_value());
    CHECK(*message == "total_tokens must be >= 0");
    CHECK(limiter.total_tokens() == 2);  // a rejected total changes nothing
}

TEST_CASE("A limiter with zero tokens makes acquire wait until the total is raised",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(0);
        CHECK(limiter.total_tokens() == 0);
        CHECK(limiter.available_tokens() == 0);
        CHECK_FALSE(limiter.try_acquire());
        CHECK(thrown_message<anyio::WouldBlock>([&] { limiter.acquire_nowait(); }).has_value());

        bool acquired = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await limiter.acquire();
                acquired = true;
                limiter.release();
            });
            co_await settle();
            CHECK_FALSE(acquired);
            CHECK(limiter.statistics().tasks_waiting == 1);
            CHECK(limiter.borrowed_tokens() == 0);

            limiter.set_total_tokens(1);
            CHECK(limiter.borrowed_tokens() == 1);  // handed to the waiter at once
            CHECK(limiter.statistics().tasks_waiting == 0);
        });
        CHECK(acquired);
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.available_tokens() == 1);
    });
}

TEST_CASE("A limiter with infinite_tokens never makes anyone wait", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(anyio::infinite_tokens);
        CHECK(limiter.total_tokens() == anyio::infinite_tokens);
        CHECK(limiter.available_tokens() == anyio::infinite_tokens);

        std::vector<int> borrowers(1000);
        for (int& borrower : borrowers) limiter.acquire_on_behalf_of_nowait(&borrower);
        co_await limiter.acquire();
        CHECK(limiter.borrowed_tokens() == 1001);
        CHECK(limiter.available_tokens() == anyio::infinite_tokens - 1001);
        CHECK(limiter.statistics().tasks_waiting == 0);

        limiter.release();
        for (int& borrower : borrowers) limiter.release_on_behalf_of(&borrower);
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

TEST_CASE("borrowed_tokens and available_tokens follow acquire and release", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(3);
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.available_tokens() == 3);

        co_await limiter.acquire();
        CHECK(limiter.borrowed_tokens() == 1);
        CHECK(limiter.available_tokens() == 2);

        int other = 0;
        limiter.acquire_on_behalf_of_nowait(&other);
        CHECK(limiter.borrowed_tokens() == 2);
        CHECK(limiter.available_tokens() == 1);

        // Over-subscribed (total lowered below borrowed): available is 0, never negative.
        limiter.set_total_tokens(1);
        CHECK(limiter.borrowed_tokens() == 2);
        CHECK(limiter.available_tokens() == 0);

        limiter.release();
        limiter.release_on_behalf_of(&other);
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.available_tokens() == 1);
    });
}

TEST_CASE("acquire_nowait throws WouldBlock and try_acquire returns false when no token is free",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        int holder = 0;
        CHECK(limiter.try_acquire_on_behalf_of(&holder));

        CHECK(thrown_message<anyio::WouldBlock>([&] { limiter.acquire_nowait(); }).has_value());
        CHECK_FALSE(limiter.try_acquire());
        int other = 0;
        CHECK(thrown_message<anyio::WouldBlock>([&] {
                  limiter.acquire_on_behalf_of_nowait(&other);
              }).has_value());
        CHECK_FALSE(limiter.try_acquire_on_behalf_of(&other));
        // Failed attempts take nothing.
        CHECK(limiter.borrowed_tokens() == 1);
        CHECK(limiter.statistics().borrowers == std::vector<const void*>{&holder});

        limiter.release_on_behalf_of(&holder);
        CHECK(limiter.try_acquire());
        CHECK(limiter.borrowed_tokens() == 1);
        limiter.release();
        limiter.acquire_nowait();
        CHECK(limiter.borrowed_tokens() == 1);
        limiter.release();
        co_return;
    });
}

TEST_CASE("Acquiring twice for the same borrower throws std::runtime_error", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(3);

        // The current task as borrower.
        limiter.acquire_nowait();
        auto message = thrown_message<std::runtime_error>([&] { limiter.acquire_nowait(); });
        REQUIRE(message.has_value());
        CHECK(contains(*message, already_holding));
        message = thrown_message<std::runtime_error>([&] { (void)limiter.try_acquire(); });
        REQUIRE(message.has_value());
        CHECK(contains(*message, already_holding));
        std::optional<std::string> awaited;
        try {
            co_await limiter.acquire();
        } catch (const std::runtime_error& error) {
            awaited = error.what();
        }
        REQUIRE(awaited.has_value());
        CHECK(contains(*awaited, already_holding));
        CHECK(limiter.borrowed_tokens() == 1);

        // An explicit borrower.
        int borrower = 0;
        co_await limiter.acquire_on_behalf_of(&borrower);
        message = thrown_message<std::runtime_error>(
            [&] { limiter.acquire_on_behalf_of_nowait(&borrower); });
        REQUIRE(message.has_value());
        CHECK(contains(*message, already_holding));
        message = thrown_message<std::runtime_error>(
            [&] { (void)limiter.try_acquire_on_behalf_of(&borrower); });
        REQUIRE(message.has_value());
        CHECK(contains(*message, already_holding));
        awaited.reset();
        try {
            co_await limiter.acquire_on_behalf_of(&borrower);
        } catch (const std::runtime_error& error) {
            awaited = error.what();
        }
        REQUIRE(awaited.has_value());
        CHECK(contains(*awaited, already_holding));
        CHECK(limiter.borrowed_tokens() == 2);

        // With no token free the second acquire still throws instead of waiting for ever.
        int filler = 0;
        limiter.acquire_on_behalf_of_nowait(&filler);
        REQUIRE(limiter.available_tokens() == 0);
        awaited.reset();
        try {
            co_await limiter.acquire();
        } catch (const std::runtime_error& error) {
            awaited = error.what();
        }
        REQUIRE(awaited.has_value());
        CHECK(contains(*awaited, already_holding));
        CHECK(limiter.borrowed_tokens() == 3);
        CHECK(limiter.statistics().tasks_waiting == 0);

        limiter.release();
        limiter.release_on_behalf_of(&borrower);
        limiter.release_on_behalf_of(&filler);
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

TEST_CASE("Releasing for a borrower that holds no token throws std::runtime_error",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        CHECK(thrown_message<std::runtime_error>([&] { limiter.release(); }).has_value());
        int borrower = 0;
        int stranger = 0;
        CHECK(thrown_message<std::runtime_error>([&] {
                  limiter.release_on_behalf_of(&borrower);
              }).has_value());
        CHECK(limiter.borrowed_tokens() == 0);

        limiter.acquire_on_behalf_of_nowait(&borrower);
        // Someone else cannot give the token back.
        CHECK(thrown_message<std::runtime_error>([&] {
                  limiter.release_on_behalf_of(&stranger);
              }).has_value());
        CHECK(thrown_message<std::runtime_error>([&] { limiter.release(); }).has_value());
        CHECK(limiter.borrowed_tokens() == 1);

        limiter.release_on_behalf_of(&borrower);
        CHECK(limiter.borrowed_tokens() == 0);
        // Twice is once too many; the count never goes below zero.
        CHECK(thrown_message<std::runtime_error>([&] {
                  limiter.release_on_behalf_of(&borrower);
              }).has_value());
        CHECK(limiter.borrowed_tokens() == 0);

        co_await limiter.acquire();
        limiter.release();
        CHECK(thrown_message<std::runtime_error>([&] { limiter.release(); }).has_value());
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.available_tokens() == 2);
    });
}

TEST_CASE("Tokens can be borrowed on behalf of arbitrary pointers", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(3);
        int a = 0;
        std::string b = "borrower";
        static const char c[] = "a literal";
        const void* pa = &a;
        const void* pb = &b;
        const void* pc = c;

        co_await limiter.acquire_on_behalf_of(pa);
        limiter.acquire_on_behalf_of_nowait(pb);
        CHECK(limiter.try_acquire_on_behalf_of(pc));
        CHECK(limiter.borrowed_tokens() == 3);
        CHECK(sorted(limiter.statistics().borrowers) == sorted({pa, pb, pc}));
        // Full: the task itself (a different borrower) gets nothing now.
        CHECK_FALSE(limiter.try_acquire());

        int d = 0;
        bool d_acquired = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await limiter.acquire_on_behalf_of(&d);
                d_acquired = true;
            });
            co_await settle();
            CHECK_FALSE(d_acquired);
            CHECK(limiter.statistics().tasks_waiting == 1);
            limiter.release_on_behalf_of(pb);  // goes to the borrower &d
        });
        CHECK(d_acquired);
        CHECK(sorted(limiter.statistics().borrowers) == sorted({pa, pc, &d}));

        // A task holding tokens on behalf of pointers can still borrow one for itself.
        limiter.release_on_behalf_of(pc);
        co_await limiter.acquire();
        CHECK(limiter.borrowed_tokens() == 3);
        CHECK(limiter.statistics().borrowers.size() == 3);

        limiter.release();
        limiter.release_on_behalf_of(&d);
        limiter.release_on_behalf_of(pa);
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.statistics().borrowers.empty());
    });
}

TEST_CASE("A null pointer is a borrower like any other", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        const void* null_borrower = nullptr;

        limiter.acquire_on_behalf_of_nowait(null_borrower);
        CHECK(limiter.statistics().borrowers == std::vector<const void*>{nullptr});
        limiter.release_on_behalf_of(null_borrower);
        CHECK(limiter.borrowed_tokens() == 0);

        // The awaited form must borrow for nullptr too, not for the current task.
        co_await limiter.acquire_on_behalf_of(null_borrower);
        CHECK(limiter.statistics().borrowers == std::vector<const void*>{nullptr});
        CHECK(thrown_message<std::runtime_error>([&] {
                  limiter.release_on_behalf_of(null_borrower);
              }) == std::nullopt);
        CHECK(limiter.borrowed_tokens() == 0);
        if (limiter.borrowed_tokens() == 0) {
            CHECK(limiter.try_acquire());  // the task itself holds nothing of this limiter
            limiter.release();
        }
    });
}

TEST_CASE("A scoped guard holds a token until it is destroyed", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        int other = 0;
        {
            auto guard = co_await limiter.scoped();
            CHECK(limiter.borrowed_tokens() == 1);
            CHECK_FALSE(limiter.try_acquire_on_behalf_of(&other));
        }
        CHECK(limiter.borrowed_tokens() == 0);

        // Moving the guard moves the token: released once, by the last owner.
        {
            auto first = co_await limiter.scoped();
            auto second = std::move(first);
            CHECK(limiter.borrowed_tokens() == 1);
        }
        CHECK(limiter.borrowed_tokens() == 0);

        // Unwinding by an exception releases it.
        try {
            auto guard = co_await limiter.scoped();
            CHECK(limiter.borrowed_tokens() == 1);
            throw std::runtime_error("unwind");
        } catch (const std::runtime_error&) {
        }
        CHECK(limiter.borrowed_tokens() == 0);

        // Destroying the guard hands the token to a waiter.
        bool waiter_acquired = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            std::optional<anyio::CapacityLimiter::Guard> guard(co_await limiter.scoped());
            tg.start_soon([&]() -> anyio::Task<> {
                auto waiter_guard = co_await limiter.scoped();
                waiter_acquired = true;
            });
            co_await settle();
            CHECK_FALSE(waiter_acquired);
            CHECK(limiter.statistics().tasks_waiting == 1);
            guard.reset();
            CHECK(limiter.borrowed_tokens() == 1);  // now reserved for the waiter
            CHECK(limiter.statistics().tasks_waiting == 0);
        });
        CHECK(waiter_acquired);
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

TEST_CASE("Waiters get the token first in, first out", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        limiter.acquire_nowait();
        std::vector<int> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 10; ++i) {
                tg.start_soon(
                    [&](int index) -> anyio::Task<> {
                        co_await limiter.acquire();
                        order.push_back(index);
                        co_await anyio::checkpoint();  // hold it across a loop turn
                        limiter.release();
                    },
                    i);
            }
            co_await settle();
            CHECK(limiter.statistics().tasks_waiting == 10);
            CHECK(order.empty());
            limiter.release();
        });
        CHECK(order == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

TEST_CASE("A released token is reserved for the first waiter (anyio#1170)", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        limiter.acquire_nowait();
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await limiter.acquire();
                order.emplace_back("waiter");
                co_await anyio::checkpoint();
                limiter.release();
            });
            co_await settle();
            REQUIRE(limiter.statistics().tasks_waiting == 1);

            limiter.release();
            // Same loop turn: the token already belongs to the waiter, nobody can overtake.
            CHECK(limiter.borrowed_tokens() == 1);
            CHECK(limiter.statistics().tasks_waiting == 0);
            CHECK_FALSE(limiter.try_acquire());
            CHECK(thrown_message<anyio::WouldBlock>([&] { limiter.acquire_nowait(); }).has_value());
            int other = 0;
            CHECK_FALSE(limiter.try_acquire_on_behalf_of(&other));
            CHECK(thrown_message<anyio::WouldBlock>([&] {
                      limiter.acquire_on_behalf_of_nowait(&other);
                  }).has_value());
            CHECK(limiter.borrowed_tokens() == 1);

            // The releaser queues behind the waiter.
            co_await limiter.acquire();
            order.emplace_back("releaser");
            limiter.release();
        });
        CHECK(order == std::vector<std::string>{"waiter", "releaser"});
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

TEST_CASE("Raising the total wakes exactly as many waiters as tokens became free",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        limiter.acquire_nowait();  // total 1, borrowed 1
        anyio::Event finish;
        int acquired = 0;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 5; ++i) {
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await limiter.acquire();
                    ++acquired;
                    co_await finish.wait();
                    limiter.release();
                });
            }
            co_await settle();
            REQUIRE(limiter.statistics().tasks_waiting == 5);

            limiter.set_total_tokens(3);
            CHECK(limiter.statistics().tasks_waiting == 3);
            CHECK(limiter.borrowed_tokens() == 3);
            co_await settle();
            CHECK(acquired == 2);

            // Over-subscribed: lowered below borrowed, then raised by one. Still
            // borrowed >= total, so nobody may be woken.
            limiter.set_total_tokens(1);
            CHECK(limiter.borrowed_tokens() == 3);
            limiter.set_total_tokens(2);
            CHECK(limiter.statistics().tasks_waiting == 3);
            CHECK(limiter.borrowed_tokens() == 3);
            co_await settle();
            CHECK(acquired == 2);

            // A token comes back: borrowed 2, total 2, still nothing free.
            limiter.release();
            CHECK(limiter.borrowed_tokens() == 2);
            CHECK(limiter.statistics().tasks_waiting == 3);
            co_await settle();
            CHECK(acquired == 2);

            // Now total - borrowed == 1: exactly one more.
            limiter.set_total_tokens(3);
            CHECK(limiter.statistics().tasks_waiting == 2);
            CHECK(limiter.borrowed_tokens() == 3);
            co_await settle();
            CHECK(acquired == 3);

            finish.set();
        });
        CHECK(acquired == 5);
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.statistics().tasks_waiting == 0);
    });
}

TEST_CASE("Lowering the total never takes tokens back from their holders", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(3);
        int a = 0;
        int b = 0;
        int c = 0;
        limiter.acquire_on_behalf_of_nowait(&a);
        limiter.acquire_on_behalf_of_nowait(&b);
        limiter.acquire_on_behalf_of_nowait(&c);

        limiter.set_total_tokens(1);
        CHECK(limiter.total_tokens() == 1);
        CHECK(limiter.borrowed_tokens() == 3);
        CHECK(limiter.available_tokens() == 0);
        CHECK(sorted(limiter.statistics().borrowers) == sorted({&a, &b, &c}));

        bool waiter_acquired = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await limiter.acquire();
                waiter_acquired = true;
                limiter.release();
            });
            co_await settle();
            REQUIRE(limiter.statistics().tasks_waiting == 1);

            limiter.release_on_behalf_of(&a);  // borrowed 2 > total 1
            co_await settle();
            CHECK_FALSE(waiter_acquired);
            limiter.release_on_behalf_of(&b);  // borrowed 1 == total 1
            co_await settle();
            CHECK_FALSE(waiter_acquired);
            CHECK(limiter.statistics().tasks_waiting == 1);
            limiter.release_on_behalf_of(&c);  // borrowed 0: the waiter's turn
            CHECK(limiter.borrowed_tokens() == 1);
        });
        CHECK(waiter_acquired);
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

TEST_CASE("A cancelled waiter leaves the queue and takes no token", "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        int holder = 0;
        limiter.acquire_on_behalf_of_nowait(&holder);

        anyio::CancelScope scope;
        bool cancelled_one_acquired = false;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            auto waiter = [&](std::string name) -> anyio::Task<> {
                co_await limiter.acquire();
                order.push_back(name);
                co_await anyio::checkpoint();
                limiter.release();
            };
            tg.start_soon(waiter, "first");
            tg.start_soon([&]() -> anyio::Task<> {
                auto cancellable = [&]() -> anyio::Task<> {
                    co_await limiter.acquire();
                    cancelled_one_acquired = true;
                    limiter.release();
                };
                co_await scope.run(cancellable());
            });
            tg.start_soon(waiter, "third");
            co_await settle();
            REQUIRE(limiter.statistics().tasks_waiting == 3);

            scope.cancel();
            CHECK(limiter.statistics().tasks_waiting == 2);  // unlinked at once
            co_await settle();
            CHECK(scope.cancelled_caught());
            CHECK_FALSE(cancelled_one_acquired);
            CHECK(limiter.borrowed_tokens() == 1);
            CHECK(limiter.statistics().borrowers == std::vector<const void*>{&holder});

            limiter.release_on_behalf_of(&holder);
        });
        CHECK(order == std::vector<std::string>{"first", "third"});
        CHECK_FALSE(cancelled_one_acquired);
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.statistics().tasks_waiting == 0);

        // With the queue now empty, a cancelled lone waiter leaves tasks_waiting at 0.
        limiter.acquire_on_behalf_of_nowait(&holder);
        anyio::CancelScope lone;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto acquire = [&]() -> anyio::Task<> { co_await limiter.acquire(); };
                co_await lone.run(acquire());
            });
            co_await settle();
            REQUIRE(limiter.statistics().tasks_waiting == 1);
            lone.cancel();
        });
        CHECK(lone.cancelled_caught());
        CHECK(limiter.statistics().tasks_waiting == 0);
        CHECK(limiter.borrowed_tokens() == 1);
        limiter.release_on_behalf_of(&holder);
        CHECK(limiter.available_tokens() == 1);
    });
}

TEST_CASE("A token granted to a waiter cancelled in the same turn passes to the next waiter",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        limiter.acquire_nowait();
        anyio::CancelScope first_scope;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto first = [&]() -> anyio::Task<> {
                    co_await limiter.acquire();
                    order.emplace_back("first");
                    limiter.release();
                };
                co_await first_scope.run(first());
            });
            tg.start_soon([&]() -> anyio::Task<> {
                co_await limiter.acquire();
                order.emplace_back("second");
                limiter.release();
            });
            co_await settle();
            REQUIRE(limiter.statistics().tasks_waiting == 2);

            limiter.release();     // reserved for the first waiter...
            first_scope.cancel();  // ...which is cancelled before it runs
            CHECK(limiter.borrowed_tokens() == 1);
        });
        CHECK(first_scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"second"});
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.statistics().tasks_waiting == 0);
        CHECK(limiter.statistics().borrowers.empty());
    });
}

TEST_CASE("statistics reports borrowed and total tokens, borrowers and waiting tasks",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        anyio::CapacityLimiterStatistics stats = limiter.statistics();
        CHECK(stats.borrowed_tokens == 0);
        CHECK(stats.total_tokens == 2);
        CHECK(stats.borrowers.empty());
        CHECK(stats.tasks_waiting == 0);

        int a = 0;
        int b = 0;
        int c = 0;
        limiter.acquire_on_behalf_of_nowait(&a);
        co_await limiter.acquire_on_behalf_of(&b);
        stats = limiter.statistics();
        CHECK(stats.borrowed_tokens == 2);
        CHECK(stats.total_tokens == 2);
        CHECK(sorted(stats.borrowers) == sorted({&a, &b}));
        CHECK(stats.tasks_waiting == 0);

        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { co_await limiter.acquire_on_behalf_of(&c); });
            tg.start_soon([&]() -> anyio::Task<> {
                co_await limiter.acquire();
                limiter.release();
            });
            co_await settle();
            stats = limiter.statistics();
            CHECK(stats.borrowed_tokens == 2);
            CHECK(sorted(stats.borrowers) == sorted({&a, &b}));  // waiters are not borrowers
            CHECK(stats.tasks_waiting == 2);

            limiter.set_total_tokens(5);
            stats = limiter.statistics();
            CHECK(stats.total_tokens == 5);
            CHECK(stats.borrowed_tokens == 4);
            CHECK(stats.tasks_waiting == 0);
            CHECK(stats.borrowers.size() == 4);
            CHECK(std::count(stats.borrowers.begin(), stats.borrowers.end(), &c) == 1);
        });
        stats = limiter.statistics();
        CHECK(stats.borrowed_tokens == 3);
        CHECK(sorted(stats.borrowers) == sorted({&a, &b, &c}));
        limiter.release_on_behalf_of(&a);
        limiter.release_on_behalf_of(&b);
        limiter.release_on_behalf_of(&c);
        stats = limiter.statistics();
        CHECK(stats.borrowed_tokens == 0);
        CHECK(stats.borrowers.empty());
    });
}

TEST_CASE("Leaving run with a token holder and an older waiter still alive frees both cleanly",
          "[limiter][shutdown]") {
    // At shutdown the newer frame is destroyed first; its guard hands the token to the older
    // waiter, which must not be resumed or touched after its own frame is gone (ASan checks).
    anyio::CapacityLimiter* seen = nullptr;
    anyio::run([&]() -> anyio::Task<> {
        static anyio::Event never;  // outlives the loop: the tasks wait on it for ever
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        auto limiter = std::make_shared<anyio::CapacityLimiter>(1);
        seen = limiter.get();
        auto holder = [](std::shared_ptr<anyio::CapacityLimiter> lim) -> anyio::Task<> {
            auto guard = co_await lim->scoped();
            co_await never.wait();
        };
        auto waiter = [](std::shared_ptr<anyio::CapacityLimiter> lim) -> anyio::Task<> {
            co_await lim->acquire();
            co_await never.wait();
        };
        co_await anyio::checkpoint();
        auto held = holder(limiter);
        loop.spawn(std::move(held));
        co_await anyio::sleep(std::chrono::milliseconds(1));  // the holder takes the token
        loop.spawn(waiter(limiter));
        co_await anyio::sleep(std::chrono::milliseconds(1));  // the waiter queues
        CHECK(limiter->statistics().tasks_waiting == 1);
    });
    CHECK(seen != nullptr);
}

// ---------------------------------------------------------------------------------------------
// Regression tests for issue 8 (the limiter's part)
// ---------------------------------------------------------------------------------------------

TEST_CASE("Destroying a CapacityLimiter with waiters wakes them with std::logic_error saying "
          "what was destroyed",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        auto limiter = std::make_unique<anyio::CapacityLimiter>(1);
        int holder = 0;
        int borrower = 0;
        limiter->acquire_on_behalf_of_nowait(&holder);
        std::vector<std::string> errors;
        auto group = [&]() -> anyio::Task<> {
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    try {
                        co_await limiter->acquire();
                        errors.emplace_back("acquired");
                    } catch (const std::logic_error& error) {
                        errors.emplace_back(error.what());
                    }
                });
                tg.start_soon([&]() -> anyio::Task<> {
                    try {
                        co_await limiter->acquire_on_behalf_of(&borrower);
                        errors.emplace_back("acquired");
                    } catch (const std::logic_error& error) {
                        errors.emplace_back(error.what());
                    }
                });
                tg.start_soon([&]() -> anyio::Task<> {
                    try {
                        auto guard = co_await limiter->scoped();
                        errors.emplace_back("acquired");
                    } catch (const std::logic_error& error) {
                        errors.emplace_back(error.what());
                    }
                });
                co_await settle();
                CHECK(limiter->statistics().tasks_waiting == 3);
                limiter.reset();
            });
        };
        // Bounded: waiters nobody wakes fail the test instead of hanging it.
        const bool finished = co_await anyio::move_on_after(std::chrono::seconds(5), group());
        CHECK(finished);
        REQUIRE(errors.size() == 3);
        for (const std::string& error : errors) {
            CHECK(contains(error, "CapacityLimiter"));
            CHECK(contains(error, "destroyed"));
        }
    });
}

TEST_CASE("A CapacityLimiter used from another thread throws std::logic_error naming "
          "from_thread::run_sync",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        int borrower = 0;
        int other = 0;
        limiter.acquire_on_behalf_of_nowait(&borrower);  // binds it to this loop
        // From a worker thread of the loop.
        std::vector<std::string> from_worker =
            co_await anyio::to_thread::run_sync([&limiter, &borrower, &other] {
                std::vector<std::string> messages;
                auto record = [&](auto&& call) {
                    auto message = thrown_message<std::logic_error>(call);
                    messages.push_back(message.value_or("no std::logic_error"));
                };
                record([&] { limiter.release_on_behalf_of(&borrower); });
                record([&] { limiter.release(); });
                record([&] { limiter.set_total_tokens(5); });
                record([&] { (void)limiter.try_acquire_on_behalf_of(&other); });
                record([&] { limiter.acquire_on_behalf_of_nowait(&other); });
                record([&] { (void)limiter.try_acquire(); });
                record([&] { limiter.acquire_nowait(); });
                return messages;
            });
        CHECK(from_worker.size() == 7);
        for (const std::string& message : from_worker) {
            CHECK(contains(message, "CapacityLimiter"));
            CHECK(contains(message, "from_thread::run_sync"));
        }
        // From a loop of its own on a worker thread: waits are refused too.
        std::vector<std::string> from_nested_loop = co_await anyio::to_thread::run_sync([&limiter] {
            return anyio::run([&limiter]() -> anyio::Task<std::vector<std::string>> {
                std::vector<std::string> messages;
                try {
                    co_await limiter.acquire();
                    messages.emplace_back("acquired");
                } catch (const std::logic_error& error) {
                    messages.emplace_back(error.what());
                }
                try {
                    co_await anyio::to_thread::run_sync({.limiter = &limiter}, [] {});
                    messages.emplace_back("offloaded");
                } catch (const std::logic_error& error) {
                    messages.emplace_back(error.what());
                }
                co_return messages;
            });
        });
        CHECK(from_nested_loop.size() == 2);
        for (const std::string& message : from_nested_loop) {
            CHECK(contains(message, "CapacityLimiter"));
            CHECK(contains(message, "from_thread::run_sync"));
        }
        // Nothing changed.
        CHECK(limiter.total_tokens() == 2);
        CHECK(limiter.borrowed_tokens() == 1);
        CHECK(limiter.statistics().borrowers == std::vector<const void*>{&borrower});
        limiter.release_on_behalf_of(&borrower);
    });
}

#if defined(ANYIO_TEST_REPLACES_OPERATOR_NEW)
TEST_CASE("A token handed to a waiter whose borrower cannot be recorded (out of memory) wakes "
          "it with std::bad_alloc; the release itself succeeds",
          "[limiter]") {
    run_loop([]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        int holder = 0;
        std::vector<std::string> outcomes;
        std::vector<std::string> release_errors;
        auto waiter = [&](const void* borrower) -> anyio::Task<> {
            try {
                co_await limiter.acquire_on_behalf_of(borrower);
                outcomes.emplace_back("acquired");
                limiter.release_on_behalf_of(borrower);
            } catch (const std::bad_alloc&) {
                outcomes.emplace_back("bad_alloc");
            }
        };
        // Releases through `release` with the next allocation on this thread failing.
        auto release_out_of_memory = [&](const std::function<void()>& release) {
            fail_next_allocations = 1;
            try {
                release();
            } catch (const std::bad_alloc&) {
                release_errors.emplace_back("bad_alloc");
            }
            fail_next_allocations = 0;
        };
        auto group = [&]() -> anyio::Task<> {
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                int first = 0;
                int second = 0;
                // 1. The public release.
                limiter.acquire_on_behalf_of_nowait(&holder);
                tg.start_soon(waiter(&first));
                co_await settle();
                REQUIRE(limiter.statistics().tasks_waiting == 1);
                release_out_of_memory([&] { limiter.release_on_behalf_of(&holder); });
                co_await settle();
                // 2. A run_sync call's token coming back (noexcept: it used to terminate).
                anyio::detail::LimiterHold hold;
                REQUIRE(limiter.try_acquire_hold(hold));
                tg.start_soon(waiter(&second));
                co_await settle();
                REQUIRE(limiter.statistics().tasks_waiting == 1);
                release_out_of_memory([&] { anyio::CapacityLimiter::release_hold(hold); });
                co_await settle();
            });
        };
        const bool finished = co_await anyio::move_on_after(std::chrono::seconds(5), group());
        CHECK(finished);
        CHECK(release_errors.empty());
        CHECK(outcomes == std::vector<std::string>{"bad_alloc", "bad_alloc"});
        // The token was not lost: it is free again.
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.statistics().tasks_waiting == 0);
        CHECK(limiter.statistics().borrowers.empty());
        int later = 0;
        co_await waiter(&later);
        CHECK(outcomes.back() == "acquired");
    });
}
#endif  // ANYIO_TEST_REPLACES_OPERATOR_NEW
