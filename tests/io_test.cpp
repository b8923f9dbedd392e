#include <anyio/io.hpp>

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/socket_stream.hpp>
#include <anyio/task_group.hpp>

#include <array>
#include <chrono>
#include <stdexcept>
#include <system_error>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "catch.hpp"

using namespace std::chrono_literals;

namespace {

struct Pipe {
    Pipe() {
        if (::pipe2(fds.data(), O_NONBLOCK | O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
    }
    ~Pipe() {
        ::close(fds[0]);
        ::close(fds[1]);
    }
    int reader() const { return fds[0]; }
    int writer() const { return fds[1]; }
    std::array<int, 2> fds{};
};

}  // namespace

TEST_CASE("wait_readable completes once another task writes to the pipe", "[io]") {
    Pipe pipe;
    char received = 0;
    anyio::run([&]() -> anyio::Task<> {
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await anyio::wait_readable(pipe.reader());
                REQUIRE(::read(pipe.reader(), &received, 1) == 1);
            });
            co_await anyio::sleep(5ms);
            CHECK(received == 0);
            char byte = 'x';
            REQUIRE(::write(pipe.writer(), &byte, 1) == 1);
        });
    });
    CHECK(received == 'x');
}

TEST_CASE("wait_writable completes at once for an empty pipe", "[io]") {
    Pipe pipe;
    anyio::run([&]() -> anyio::Task<> {
        auto done = co_await anyio::move_on_after(1s, [&]() -> anyio::Task<> {
            co_await anyio::wait_writable(pipe.writer());
        }());
        CHECK(done);
    });
}

TEST_CASE("waiting for readiness is a cancellation point and cancelling it unwatches the fd", "[io]") {
    Pipe pipe;
    anyio::run([&]() -> anyio::Task<> {
        auto start = anyio::current_time();
        bool completed = co_await anyio::move_on_after(20ms, [&]() -> anyio::Task<> {
            co_await anyio::wait_readable(pipe.reader());
        }());
        CHECK_FALSE(completed);
        CHECK(anyio::current_time() - start < 2s);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
        // The descriptor can be waited for again after the cancelled wait.
        char byte = 'y';
        REQUIRE(::write(pipe.writer(), &byte, 1) == 1);
        co_await anyio::wait_readable(pipe.reader());
    });
}

TEST_CASE("two tasks waiting for the same fd and direction is an error", "[io]") {
    Pipe pipe;
    bool logic_error = false;
    anyio::run([&]() -> anyio::Task<> {
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { co_await anyio::wait_readable(pipe.reader()); });
            co_await anyio::sleep(1ms);
            try {
                co_await anyio::wait_readable(pipe.reader());
            } catch (const std::logic_error&) {
                logic_error = true;
            }
            char byte = 'z';
            REQUIRE(::write(pipe.writer(), &byte, 1) == 1);
        });
    });
    CHECK(logic_error);
}

TEST_CASE("a descriptor epoll cannot watch gives std::system_error", "[io]") {
    anyio::run([&]() -> anyio::Task<> {
        CHECK_THROWS_AS(co_await anyio::wait_readable(-1), std::system_error);
        co_return;
    });
}

TEST_CASE("a cancelled task does not start waiting for readiness", "[io]") {
    Pipe pipe;
    anyio::run([&]() -> anyio::Task<> {
        anyio::CancelScope scope;
        scope.cancel();
        bool completed = co_await scope.run([&]() -> anyio::Task<> {
            co_await anyio::wait_readable(pipe.reader());
        }());
        CHECK_FALSE(completed);
        CHECK(scope.cancelled_caught());
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
    });
}

TEST_CASE("a descriptor a SocketStream owns cannot be waited for with wait_readable", "[io]") {
    anyio::run([&]() -> anyio::Task<> {
        int fds[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0);
        anyio::SocketStream owned = anyio::SocketStream::from_fd(fds[0]);
        CHECK_THROWS_AS(co_await anyio::wait_readable(owned.native_handle()), std::system_error);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
        // The other end, not owned by a stream, still can; and the two kinds of waits share
        // the loop's epoll.
        char byte = 'q';
        co_await owned.send(std::string_view(&byte, 1));
        co_await anyio::wait_readable(fds[1]);
        REQUIRE(::read(fds[1], &byte, 1) == 1);
        ::close(fds[1]);
    });
}

TEST_CASE("a loop busy with ready tasks still polls for I/O at every turn", "[io]") {
    Pipe pipe;
    int turns_after_write = -1;
    anyio::run([&]() -> anyio::Task<> {
        bool woken = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await anyio::wait_readable(pipe.reader());
                woken = true;
            });
            // A task that is always ready: the loop never sleeps while it runs.
            for (int turn = 0; turn < 10; ++turn) co_await anyio::checkpoint();
            char byte = 'b';
            REQUIRE(::write(pipe.writer(), &byte, 1) == 1);
            int turns = 0;
            while (!woken && turns < 100) {
                co_await anyio::checkpoint();
                ++turns;
            }
            turns_after_write = turns;
        });
    });
    // Polled before the next batch, the waiter runs in the turn after: never a turn later
    // because a poll was skipped.
    CHECK(turns_after_write >= 1);
    CHECK(turns_after_write <= 2);
}
