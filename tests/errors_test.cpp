#include <anyio/errors.hpp>

#include <anyio/anyio.hpp>

#include <chrono>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "catch.hpp"

// Tests for include/anyio/errors.hpp: the exception hierarchy (Cancelled is not a
// std::exception, the rest are), ExceptionGroup, and that every message says something.

using namespace std::chrono_literals;

namespace {

struct Oops {
    int code;
};

// Every error type other than Cancelled.
static_assert(std::is_base_of_v<std::exception, anyio::TimeoutError>);
static_assert(std::is_base_of_v<std::exception, anyio::WouldBlock>);
static_assert(std::is_base_of_v<std::exception, anyio::NoEventLoopError>);
static_assert(std::is_base_of_v<std::exception, anyio::RunFinishedError>);
static_assert(std::is_base_of_v<std::exception, anyio::ExceptionGroup>);
static_assert(!std::is_base_of_v<std::exception, anyio::Cancelled>);

template <class Error>
bool caught_as_std_exception(const Error& error) {
    try {
        throw error;
    } catch (const std::exception&) {
        return true;
    } catch (...) {
        return false;
    }
}

// Fails at once, without reaching a cancellation point first: when several children of a
// group fail this way, each error is kept (none is turned into a cancellation).
anyio::Task<> fail(std::string message) {
    if (!message.empty()) throw std::runtime_error(message);
    co_return;
}

}  // namespace

TEST_CASE("Cancelled does not derive from std::exception, so catch (std::exception&) "
          "cannot swallow it",
          "[errors]") {
    static_assert(!std::is_base_of_v<std::exception, anyio::Cancelled>);
    static_assert(!std::is_convertible_v<anyio::Cancelled*, std::exception*>);

    bool swallowed = false;
    bool reached_cancelled_handler = false;
    try {
        try {
            throw anyio::Cancelled{};
        } catch (const std::exception&) {
            swallowed = true;
        }
    } catch (const anyio::Cancelled&) {
        reached_cancelled_handler = true;
    }
    CHECK_FALSE(swallowed);
    CHECK(reached_cancelled_handler);

    // The same for a Cancelled raised by the library inside a task.
    swallowed = false;
    bool reached_scope = false;
    anyio::run([&]() -> anyio::Task<> {
        anyio::CancelScope scope;
        scope.cancel();
        co_await scope.run([&]() -> anyio::Task<> {
            try {
                co_await anyio::checkpoint();
            } catch (const std::exception&) {
                swallowed = true;
            }
        }());
        reached_scope = scope.cancelled_caught();
    });
    CHECK_FALSE(swallowed);
    CHECK(reached_scope);
}

TEST_CASE("Every other anyio error derives from std::exception", "[errors]") {
    CHECK(caught_as_std_exception(anyio::TimeoutError()));
    CHECK(caught_as_std_exception(anyio::WouldBlock("would block")));
    CHECK(caught_as_std_exception(anyio::NoEventLoopError("no loop")));
    CHECK(caught_as_std_exception(anyio::RunFinishedError()));
    CHECK(caught_as_std_exception(anyio::ExceptionGroup({})));
    CHECK(caught_as_std_exception(anyio::EndOfStream()));
    CHECK(caught_as_std_exception(anyio::ClosedResourceError()));
    CHECK(caught_as_std_exception(anyio::BrokenResourceError()));
    CHECK(caught_as_std_exception(anyio::BusyResourceError("receiving on")));
    CHECK_FALSE(caught_as_std_exception(anyio::Cancelled{}));

    // As thrown by the library.
    CHECK_THROWS_AS(anyio::lowlevel::current_token(), std::exception);
    CHECK_THROWS_AS(anyio::current_time(), std::exception);
    CHECK_THROWS_AS(anyio::run([]() -> anyio::Task<> {
                        co_await anyio::fail_after(1ms, [&]() -> anyio::Task<> {
                            co_await anyio::sleep(10s);
                        }());
                    }),
                    std::exception);
}

TEST_CASE("ExceptionGroup keeps its exceptions in order and what() mentions each message",
          "[errors]") {
    std::vector<std::exception_ptr> errors{
        std::make_exception_ptr(std::runtime_error("first failure")),
        std::make_exception_ptr(std::logic_error("second failure")),
        std::make_exception_ptr(Oops{3}),
        std::make_exception_ptr(anyio::TimeoutError("fourth failure")),
    };
    const anyio::ExceptionGroup group(errors);

    REQUIRE(group.exceptions().size() == 4);
    CHECK(group.exceptions() == errors);  // the same exception objects, in the same order

    std::vector<std::string> seen;
    for (const auto& error : group.exceptions()) {
        try {
            std::rethrow_exception(error);
        } catch (const std::logic_error& e) {
            seen.push_back(std::string("logic_error: ") + e.what());
        } catch (const std::runtime_error& e) {
            seen.push_back(std::string("runtime_error: ") + e.what());
        } catch (const Oops& e) {
            seen.push_back("Oops " + std::to_string(e.code));
        }
    }
    CHECK(seen == std::vector<std::string>{"runtime_error: first failure",
                                           "logic_error: second failure", "Oops 3",
                                           "runtime_error: fourth failure"});

    const std::string what = group.what();
    CHECK(what.find("first failure") != std::string::npos);
    CHECK(what.find("second failure") != std::string::npos);
    CHECK(what.find("fourth failure") != std::string::npos);
    // In the order of exceptions().
    CHECK(what.find("first failure") < what.find("second failure"));
    CHECK(what.find("second failure") < what.find("fourth failure"));
}

TEST_CASE("A task group whose children fail raises an ExceptionGroup holding each error",
          "[errors]") {
    std::vector<std::string> messages;
    std::string what;
    anyio::run([&]() -> anyio::Task<> {
        try {
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon(fail("child one failed"));
                tg.start_soon(fail("child two failed"));
                co_return;
            });
        } catch (const anyio::ExceptionGroup& group) {
            what = group.what();
            for (const auto& error : group.exceptions()) {
                try {
                    std::rethrow_exception(error);
                } catch (const std::runtime_error& e) {
                    messages.emplace_back(e.what());
                }
            }
        }
    });
    CHECK(messages == std::vector<std::string>{"child one failed", "child two failed"});
    CHECK(what.find("child one failed") != std::string::npos);
    CHECK(what.find("child two failed") != std::string::npos);
}

TEST_CASE("Every error's message is non-empty", "[errors]") {
    // Default-constructed and directly constructed.
    CHECK(std::string(anyio::Cancelled{}.what()).size() > 0);
    CHECK(std::string(anyio::TimeoutError().what()).size() > 0);
    CHECK(std::string(anyio::RunFinishedError().what()).size() > 0);
    CHECK(std::string(anyio::ExceptionGroup({}).what()).size() > 0);
    CHECK(std::string(anyio::EndOfStream().what()).size() > 0);
    CHECK(std::string(anyio::ClosedResourceError().what()).size() > 0);
    CHECK(std::string(anyio::BrokenResourceError().what()).size() > 0);
    // anyio's wording, completed by the action.
    CHECK(std::string(anyio::BusyResourceError("reading from").what())
              .find("Another task is already reading from this resource") != std::string::npos);

    // As raised by the library, one of each.
    std::string no_loop;
    try {
        (void)anyio::lowlevel::current_token();
    } catch (const anyio::NoEventLoopError& e) {
        no_loop = e.what();
    }
    CHECK_FALSE(no_loop.empty());

    std::string timeout;
    std::string would_block;
    std::string cancelled;
    std::string group;
    std::string nested_run;
    std::string awaited_twice;
    anyio::LoopToken token;
    anyio::run([&]() -> anyio::Task<> {
        token = anyio::lowlevel::current_token();
        try {
            co_await anyio::fail_after(1ms, [&]() -> anyio::Task<> {
                co_await anyio::sleep(10s);
            }());
        } catch (const anyio::TimeoutError& e) {
            timeout = e.what();
        }
        anyio::CapacityLimiter limiter(0);
        try {
            limiter.acquire_nowait();
        } catch (const anyio::WouldBlock& e) {
            would_block = e.what();
        }
        anyio::CancelScope scope;
        scope.cancel();
        co_await scope.run([&]() -> anyio::Task<> {
            try {
                co_await anyio::checkpoint();
            } catch (const anyio::Cancelled& e) {
                cancelled = e.what();
                throw;
            }
        }());
        try {
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon(fail("a"));
                tg.start_soon(fail("b"));
                co_return;
            });
        } catch (const anyio::ExceptionGroup& e) {
            group = e.what();
        }
        try {
            anyio::run([]() -> anyio::Task<> { co_return; });
        } catch (const std::logic_error& e) {
            nested_run = e.what();
        }
        anyio::Task<> once = []() -> anyio::Task<> { co_return; }();
        co_await std::move(once);
        try {
            co_await std::move(once);
        } catch (const std::logic_error& e) {
            awaited_twice = e.what();
        }
    });
    std::string finished;
    try {
        token.call_soon_threadsafe([] {});
    } catch (const anyio::RunFinishedError& e) {
        finished = e.what();
    }
    CHECK_FALSE(timeout.empty());
    CHECK_FALSE(would_block.empty());
    CHECK_FALSE(cancelled.empty());
    CHECK_FALSE(group.empty());
    CHECK_FALSE(nested_run.empty());
    CHECK_FALSE(awaited_twice.empty());
    CHECK_FALSE(finished.empty());
}
