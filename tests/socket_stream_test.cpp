#include <anyio/socket_stream.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "net_test_support.hpp"

// Tests for include/anyio/socket_stream.hpp: SocketStream over TCP and UNIX sockets.

using namespace std::chrono_literals;
using namespace anyio_test;

// ---------------------------------------------------------------------------------------------
// Heap allocations of this program, to show that receive_into and send allocate nothing in
// steady state (as in event_test.cpp; clang's TSan runtime has an operator new that cannot be
// replaced, so the count is skipped under TSan).
// ---------------------------------------------------------------------------------------------
#if defined(__SANITIZE_THREAD__)
#define ANYIO_TEST_NO_ALLOCATION_COUNT 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ANYIO_TEST_NO_ALLOCATION_COUNT 1
#endif
#endif

#if !defined(ANYIO_TEST_NO_ALLOCATION_COUNT)
namespace {
std::atomic<long long> allocations{0};
void* counted_allocate(std::size_t size) noexcept {
    void* p = std::malloc(size == 0 ? 1 : size);
    // relaxed: a count read by the same thread after the measured loop.
    if (p != nullptr) allocations.fetch_add(1, std::memory_order_relaxed);
    return p;
}
}  // namespace

void* operator new(std::size_t size) {
    void* p = counted_allocate(size);
    if (p == nullptr) throw std::bad_alloc();
    return p;
}
void* operator new[](std::size_t size) {
    void* p = counted_allocate(size);
    if (p == nullptr) throw std::bad_alloc();
    return p;
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return counted_allocate(size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return counted_allocate(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif

namespace {

// Resets the connection when closed: the peer's next receive or send fails with ECONNRESET.
void arm_reset_on_close(anyio::SocketStream& stream) {
    linger option{1, 0};
    REQUIRE(::setsockopt(stream.native_handle(), SOL_SOCKET, SO_LINGER, &option, sizeof option) == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Receiving and sending
// ---------------------------------------------------------------------------------------------

TEST_CASE("receive returns at least one and at most max_bytes of what the peer sent", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        co_await pair.client.send(std::string_view("hello world"));
        std::string first = co_await pair.server.receive(5);
        CHECK(first == "hello");
        std::string rest = co_await receive_exactly(pair.server, 6);
        CHECK(rest == " world");
    });
}

TEST_CASE("receive_into writes into the caller's buffer and returns the byte count", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        co_await pair.client.send(std::string_view("abc"));
        std::array<std::byte, 16> buffer{};
        std::size_t n = co_await pair.server.receive_into(buffer);
        REQUIRE(n == 3);
        CHECK(static_cast<char>(buffer[0]) == 'a');
        CHECK(static_cast<char>(buffer[2]) == 'c');
    });
}

TEST_CASE("a receive waits until the peer sends", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        std::string received;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { received = co_await pair.server.receive(); });
            co_await anyio::sleep(20ms);
            CHECK(received.empty());
            co_await pair.client.send(std::string_view("late"));
        });
        CHECK(received == "late");
    });
}

TEST_CASE("send writes everything through a small send buffer (partial writes)", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        int small = 4096;
        // (Only the sender's buffer: a receive window shrunk after the handshake makes TCP
        // crawl on its persist timer.)
        REQUIRE(::setsockopt(pair.client.native_handle(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
        const std::string data = pattern_bytes(2 * 1024 * 1024);
        std::string received;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await pair.client.send(data);
                co_await pair.client.send_eof();
            });
            // A slow reader: the sender meets a full buffer again and again.
            std::array<std::byte, 1000> buffer{};
            for (;;) {
                std::size_t n = 0;
                try {
                    n = co_await pair.server.receive_into(buffer);
                } catch (const anyio::EndOfStream&) {
                    break;
                }
                received.append(reinterpret_cast<const char*>(buffer.data()), n);
            }
        });
        CHECK(received.size() == data.size());
        CHECK(received == data);
    });
}

TEST_CASE("a receive larger than 64 KiB returns a right-sized string", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        co_await pair.client.send(std::string_view("xyz"));
        std::string data = co_await pair.server.receive(1 << 20);
        CHECK(data == "xyz");
        CHECK(data.capacity() < 65536);
    });
}

TEST_CASE("receive(0) and an empty receive_into buffer are invalid arguments", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        CHECK_THROWS_AS(pair.server.receive(0), std::invalid_argument);
        std::span<std::byte> empty;
        CHECK_THROWS_AS(pair.server.receive_into(empty), std::invalid_argument);
        co_return;
    });
}

// ---------------------------------------------------------------------------------------------
// End of stream, half-close, resets
// ---------------------------------------------------------------------------------------------

TEST_CASE("send_eof half-closes: the peer gets EndOfStream and can still answer", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        co_await pair.client.send(std::string_view("request"));
        co_await pair.client.send_eof();
        co_await pair.client.send_eof();  // idempotent
        // (co_await is kept out of CHECK: Catch repeats the expression in a short-circuited
        // condition, which g++ 12 evaluates when it holds a co_await.)
        std::string request = co_await receive_all(pair.server);
        CHECK(request == "request");
        CHECK_THROWS_AS(co_await pair.server.receive(), anyio::EndOfStream);  // and again
        co_await pair.server.send(std::string_view("response"));
        co_await pair.server.send_eof();
        std::string response = co_await receive_all(pair.client);
        CHECK(response == "response");
    });
}

TEST_CASE("send after send_eof raises ClosedResourceError", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        co_await pair.client.send_eof();
        CHECK_THROWS_AS(co_await pair.client.send(std::string_view("x")), anyio::ClosedResourceError);
    });
}

TEST_CASE("a reset by the peer raises BrokenResourceError on receive", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        arm_reset_on_close(pair.client);
        pair.client.close();
        bool broken = false;
        try {
            (void)co_await pair.server.receive();
        } catch (const anyio::BrokenResourceError& error) {
            broken = true;
            CHECK(std::string(error.what()).find("reset") != std::string::npos);
        }
        CHECK(broken);
    });
}

TEST_CASE("sending to a peer that reset raises BrokenResourceError and never SIGPIPE", "[net]") {
    // With SIGPIPE at its default action the process would die here if MSG_NOSIGNAL were lost.
    auto previous = std::signal(SIGPIPE, SIG_DFL);
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        arm_reset_on_close(pair.server);
        pair.server.close();
        co_await anyio::sleep(10ms);  // let the RST arrive
        const std::string chunk(65536, 'x');
        bool broken = false;
        try {
            for (int i = 0; i < 100; ++i) co_await pair.client.send(chunk);
        } catch (const anyio::BrokenResourceError&) {
            broken = true;
        }
        CHECK(broken);
    });
    std::signal(SIGPIPE, previous);
}

// ---------------------------------------------------------------------------------------------
// One reader and one writer at a time; close
// ---------------------------------------------------------------------------------------------

TEST_CASE("a second concurrent reader gets BusyResourceError", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        std::string first;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { first = co_await pair.server.receive(); });
            co_await settle();
            bool busy = false;
            try {
                (void)co_await pair.server.receive();
            } catch (const anyio::BusyResourceError& error) {
                busy = true;
                CHECK(std::string(error.what()).find("reading from") != std::string::npos);
            }
            CHECK(busy);
            co_await pair.client.send(std::string_view("one"));
        });
        CHECK(first == "one");
    });
}

TEST_CASE("a second concurrent writer gets BusyResourceError, and send_eof too", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        const std::string big = pattern_bytes(8 * 1024 * 1024);  // more than the socket buffers
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { co_await pair.client.send(big); });
            co_await settle();
            CHECK_THROWS_AS(co_await pair.client.send(std::string_view("x")), anyio::BusyResourceError);
            CHECK_THROWS_AS(co_await pair.client.send_eof(), anyio::BusyResourceError);
            std::string received = co_await receive_exactly(pair.server, big.size());
            CHECK(received == big);
        });
    });
}

TEST_CASE("closing a stream wakes a task blocked on it with ClosedResourceError", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        bool closed_receive = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                try {
                    (void)co_await pair.server.receive();
                } catch (const anyio::ClosedResourceError&) {
                    closed_receive = true;
                }
            });
            co_await settle();
            pair.server.close();
        });
        CHECK(closed_receive);
        CHECK(pair.server.native_handle() == -1);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
    });
}

TEST_CASE("operations after close raise ClosedResourceError; close is idempotent", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        pair.client.close();
        pair.client.close();
        CHECK(pair.client.is_closed());
        CHECK_THROWS_AS(co_await pair.client.receive(), anyio::ClosedResourceError);
        CHECK_THROWS_AS(co_await pair.client.send(std::string_view("x")), anyio::ClosedResourceError);
        CHECK_THROWS_AS(co_await pair.client.send_eof(), anyio::ClosedResourceError);
        CHECK_THROWS_AS(pair.client.local_address(), anyio::ClosedResourceError);
        anyio::SocketStream moved = std::move(pair.server);
        CHECK_THROWS_AS(co_await pair.server.receive(), anyio::ClosedResourceError);  // moved-from
        CHECK(moved.native_handle() >= 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

TEST_CASE("cancelling a blocked receive leaves the stream usable", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        bool completed = co_await anyio::move_on_after(20ms, [&]() -> anyio::Task<> {
            (void)co_await pair.server.receive();
        }());
        CHECK_FALSE(completed);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
        co_await pair.client.send(std::string_view("after"));
        std::string after = co_await pair.server.receive();  // not busy, not half-registered
        CHECK(after == "after");
    });
}

TEST_CASE("cancelling a blocked send leaves the stream usable", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        const std::string big = pattern_bytes(8 * 1024 * 1024);
        bool completed = co_await anyio::move_on_after(20ms, [&]() -> anyio::Task<> {
            co_await pair.client.send(big);
        }());
        CHECK_FALSE(completed);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
        // The writer slot is free again: another send can start (and finishes once the
        // reader drains what the cancelled send left in the buffers).
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await pair.client.send(std::string_view("tail"));
                pair.client.close();
            });
            std::string all = co_await receive_all(pair.server);
            CHECK(all.size() >= 4);
            CHECK(all.substr(all.size() - 4) == "tail");
        });
    });
}

TEST_CASE("a cancelled task's receive raises Cancelled even when data is ready", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        co_await pair.client.send(std::string_view("ready"));
        anyio::CancelScope scope;
        scope.cancel();
        bool completed = co_await scope.run([&]() -> anyio::Task<> { (void)co_await pair.server.receive(); }());
        CHECK_FALSE(completed);
        std::string ready = co_await pair.server.receive();  // nothing was taken
        CHECK(ready == "ready");
    });
}

// ---------------------------------------------------------------------------------------------
// Options, addresses, threads, cost
// ---------------------------------------------------------------------------------------------

TEST_CASE("TCP_NODELAY is on by default and set_nodelay turns it off", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        auto nodelay = [](const anyio::SocketStream& stream) {
            int value = -1;
            socklen_t size = sizeof value;
            REQUIRE(::getsockopt(stream.native_handle(), IPPROTO_TCP, TCP_NODELAY, &value, &size) == 0);
            return value != 0;
        };
        CHECK(nodelay(pair.client));
        CHECK(nodelay(pair.server));
        pair.client.set_nodelay(false);
        CHECK_FALSE(nodelay(pair.client));
        StreamPair local = unix_pair();
        local.client.set_nodelay(true);  // no effect on UNIX sockets, no error
    });
}

TEST_CASE("local_address and remote_address name the two ends", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        anyio::SocketAddress client_local = pair.client.local_address();
        anyio::SocketAddress server_remote = pair.server.remote_address();
        CHECK(client_local == server_remote);
        CHECK(client_local.host == "127.0.0.1");
        CHECK(client_local.family == AF_INET);
        CHECK(pair.client.remote_address() == pair.server.local_address());
        CHECK(pair.client.remote_address().to_string() ==
              "127.0.0.1:" + std::to_string(pair.server.local_address().port));
        StreamPair local = unix_pair();
        CHECK(local.client.local_address().is_unix());
        CHECK(local.client.remote_address().path.empty());  // socketpair ends have no path
    });
}

TEST_CASE("a stream used from another thread throws std::logic_error", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        std::string outcome = co_await anyio::to_thread::run_sync(
            [&] { return outcome_of([&] { pair.client.set_nodelay(true); }); });
        CHECK(outcome == "std::logic_error");
    });
}

TEST_CASE("a stream that outlives its loop can still be closed", "[net]") {
    anyio::SocketStream kept;
    int fd = -1;
    run_loop([&]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        kept = std::move(pair.client);
        fd = kept.native_handle();
        co_return;
    });
    CHECK(fd >= 0);
    CHECK_FALSE(kept.is_closed());
    kept.close();  // the loop (and its epoll) are gone: only the descriptor is closed
    CHECK(kept.is_closed());
}

TEST_CASE("a socket that is always ready still lets the other tasks run", "[net]") {
    run_loop([]() -> anyio::Task<> {
        StreamPair pair = unix_pair();
        constexpr int bytes = 8000;
        co_await pair.client.send(pattern_bytes(bytes));
        int other_task_turns = 0;
        bool done = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                while (!done) {
                    ++other_task_turns;
                    co_await anyio::checkpoint();
                }
            });
            co_await anyio::checkpoint();
            std::array<std::byte, 1> one{};
            // Every receive can complete at once; without the fairness yield the other task
            // would not run once during these 8000 receives.
            for (int i = 0; i < bytes; ++i) co_await pair.server.receive_into(one);
            CHECK(other_task_turns > bytes / 64);
            done = true;
        });
    });
}

TEST_CASE("receive_into and send allocate nothing in steady state", "[net]") {
#if defined(ANYIO_TEST_NO_ALLOCATION_COUNT)
    SUCCEED("allocation counting is not available under ThreadSanitizer");
#else
    long long measured = -1;
    run_loop([&]() -> anyio::Task<> {
        StreamPair pair = co_await tcp_pair();
        std::array<std::byte, 64> message{};
        std::array<std::byte, 64> buffer{};
        auto round_trips = [&](int count) -> anyio::Task<> {
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    std::array<std::byte, 64> echo{};
                    for (int i = 0; i < count; ++i) {
                        std::size_t n = co_await pair.server.receive_into(echo);
                        co_await pair.server.send(std::span<const std::byte>(echo.data(), n));
                    }
                });
                for (int i = 0; i < count; ++i) {
                    co_await pair.client.send(message);
                    std::size_t got = 0;
                    while (got < message.size()) {
                        got += co_await pair.client.receive_into(std::span(buffer).subspan(got));
                    }
                }
            });
        };
        co_await round_trips(200);  // warm-up: scratch buffers, the loop's own first uses
        // relaxed: this thread's own counter (no other thread allocates here).
        long long before = allocations.load(std::memory_order_relaxed);
        std::array<std::byte, 64> echo{};
        for (int i = 0; i < 2000; ++i) {
            co_await pair.client.send(message);
            std::size_t n = co_await pair.server.receive_into(echo);
            co_await pair.server.send(std::span<const std::byte>(echo.data(), n));
            std::size_t got = 0;
            while (got < n) got += co_await pair.client.receive_into(std::span(buffer).subspan(got));
        }
        measured = allocations.load(std::memory_order_relaxed) - before;
    });
    CHECK(measured == 0);
#endif
}
