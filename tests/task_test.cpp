#include <anyio/task.hpp>

#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "catch.hpp"

// Tests for anyio::Task<T> (include/anyio/task.hpp): laziness, move-only ownership, every
// kind of result, exception propagation, misuse, frame ownership and long await chains.

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
        first = co_await task;
        try {
            co_await task;
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
        co_await task;
        try {
            co_await task;
        } catch (const std::logic_error&) {
            void_threw = true;
        }
    });
    CHECK(ran);
    CHECK(void_threw);
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
