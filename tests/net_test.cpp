#include <anyio/net.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/task_group.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "net_test_support.hpp"

// Tests for include/anyio/net.hpp, the whole network layer together: echo over every
// transport and size, many connections at once, and a listener that runs out of descriptors.

using namespace std::chrono_literals;
using namespace anyio_test;

namespace {

#if defined(ANYIO_TEST_SANITIZED)
constexpr int concurrent_connections = 400;
#else
constexpr int concurrent_connections = 1000;
#endif

// Sends `data` and EOF through `client`, which a handler echoes, and checks the echo.
anyio::Task<bool> echo_round_trip(anyio::SocketStream& client, const std::string& data) {
    std::string echoed;
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon([&]() -> anyio::Task<> {
            co_await client.send(data);
            co_await client.send_eof();
        });
        echoed = co_await receive_all(client);
    });
    co_return echoed == data;
}

// Runs `listener.serve(echo_until_eof)` while `body` runs, then stops serving.
template <class Listener, class Body>
anyio::Task<> while_serving_echo(Listener& listener, Body body) {
    anyio::CancelScope serving;
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon([&]() -> anyio::Task<> { (void)co_await serving.run(listener.serve(echo_until_eof)); });
        co_await body();
        serving.cancel();
    });
}

const std::vector<std::size_t> echo_sizes = {1, 100, 65536, 1 << 20, 16 << 20};

}  // namespace

TEST_CASE("echo round trips from 1 byte to 16 MiB over TCP on 127.0.0.1", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        co_await while_serving_echo(listener, [&]() -> anyio::Task<> {
            for (std::size_t size : echo_sizes) {
                anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
                bool same = co_await echo_round_trip(client, pattern_bytes(size));
                INFO("size " << size);
                CHECK(same);
            }
        });
    });
}

TEST_CASE("echo round trips from 1 byte to 16 MiB over TCP on ::1", "[net]") {
    if (!has_ipv6_loopback()) {
        SUCCEED("no IPv6 loopback on this machine");
        return;
    }
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "::1"});
        co_await while_serving_echo(listener, [&]() -> anyio::Task<> {
            for (std::size_t size : echo_sizes) {
                anyio::SocketStream client = co_await anyio::connect_tcp("::1", listener.local_port());
                bool same = co_await echo_round_trip(client, pattern_bytes(size));
                INFO("size " << size);
                CHECK(same);
            }
        });
    });
}

TEST_CASE("echo round trips from 1 byte to 16 MiB over a UNIX socket", "[net]") {
    run_loop([]() -> anyio::Task<> {
        TempDir dir;
        anyio::UnixListener listener = co_await anyio::create_unix_listener(dir.file("echo.sock"));
        co_await while_serving_echo(listener, [&]() -> anyio::Task<> {
            for (std::size_t size : echo_sizes) {
                anyio::SocketStream client = co_await anyio::connect_unix(listener.path());
                bool same = co_await echo_round_trip(client, pattern_bytes(size));
                INFO("size " << size);
                CHECK(same);
            }
        });
    });
}

TEST_CASE("1,000 concurrent connections through one listener", "[net][stress]") {
    // Each connection costs two descriptors here (both ends live in this process).
    rlimit limit{};
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &limit) == 0);
    const rlim_t needed = 2 * concurrent_connections + 100;
    if (limit.rlim_cur < needed) {
        rlimit raised = limit;
        raised.rlim_cur = limit.rlim_max == RLIM_INFINITY ? needed : std::min(needed, limit.rlim_max);
        REQUIRE(::setrlimit(RLIMIT_NOFILE, &raised) == 0);
    }
    int completed = 0;
    run_loop([&]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        co_await while_serving_echo(listener, [&]() -> anyio::Task<> {
            anyio::Event all_connected;
            int connected = 0;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int i = 0; i < concurrent_connections; ++i) {
                    tg.start_soon([&, i]() -> anyio::Task<> {
                        anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
                        // Every connection is open at the same time before any is used.
                        if (++connected == concurrent_connections) all_connected.set();
                        co_await all_connected.wait();
                        const std::string message = "connection " + std::to_string(i);
                        if (co_await echo_round_trip(client, message)) ++completed;
                    });
                }
                co_return;
            });
        });
    });
    ::setrlimit(RLIMIT_NOFILE, &limit);
    CHECK(completed == concurrent_connections);
}

// ---------------------------------------------------------------------------------------------
// EMFILE at accept, in a child process with a lowered RLIMIT_NOFILE
// ---------------------------------------------------------------------------------------------

namespace {

// The child: a listener whose process has no descriptor left when connections arrive. It
// must back off and report (not spin, not die), and serve them once descriptors are free.
// Returns the exit status: 0 when every expectation held.
int emfile_child() {
    int status = 1;
    try {
        anyio::run([&]() -> anyio::Task<> {
            anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
            int reported_emfile = 0;
            listener.on_accept_error([&](std::error_code error) {
                // Plain value checks: the process has no descriptor for UBSan's vptr checks now.
                if (error.value() == EMFILE) ++reported_emfile;
            });
            constexpr int clients = 3;
            std::vector<int> client_fds;
            for (int i = 0; i < clients; ++i) client_fds.push_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
            // No descriptor left: lower the limit just above what is open, fill the gaps.
            std::vector<int> fillers;
            int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
            int highest = null_fd;
            for (int fd : client_fds) highest = std::max(highest, fd);
            rlimit lowered{static_cast<rlim_t>(highest + 16), static_cast<rlim_t>(highest + 16)};
            rlimit original{};
            ::getrlimit(RLIMIT_NOFILE, &original);
            lowered.rlim_max = original.rlim_max;
            if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) throw std::runtime_error("setrlimit");
            for (int fd; (fd = ::fcntl(null_fd, F_DUPFD_CLOEXEC, 0)) >= 0;) fillers.push_back(fd);
            if (errno != EMFILE) throw std::runtime_error("filling the descriptor table");

            anyio::CancelScope serving;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    (void)co_await serving.run(listener.serve(echo_until_eof));
                });
                sockaddr_in address{};
                address.sin_family = AF_INET;
                address.sin_port = htons(listener.local_port());
                address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
                for (int fd : client_fds) {
                    // The kernel completes a loopback handshake without accept().
                    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
                        throw std::runtime_error("connect");
                    }
                }
                while (listener.accept_errors() == 0) co_await anyio::sleep(2ms);
                co_await anyio::sleep(300ms);
                // Backing off 100 ms at a time: a few reports, not a busy loop of thousands.
                const auto errors = listener.accept_errors();
                if (errors < 2 || errors > 10 || reported_emfile != static_cast<int>(errors)) {
                    std::fprintf(stderr, "emfile child: %llu accept errors, %d EMFILE reports\n",
                                 static_cast<unsigned long long>(errors), reported_emfile);
                    throw std::runtime_error("unexpected back-off");
                }
                for (int fd : fillers) ::close(fd);  // descriptors free again
                fillers.clear();
                int echoed = 0;
                for (int fd : client_fds) {
                    anyio::SocketStream client = anyio::SocketStream::from_fd(fd);
                    if (co_await echo_round_trip(client, "still serving")) ++echoed;
                }
                if (echoed != clients) throw std::runtime_error("not every client was served");
                serving.cancel();
            });
            ::close(null_fd);
            status = 0;
        });
    } catch (const std::exception& error) {
        std::fprintf(stderr, "emfile child: %s\n", error.what());
        status = 2;
    }
    return status;
}

}  // namespace

TEST_CASE("EMFILE at accept does not kill the listener: it backs off, reports and serves on", "[net]") {
    std::fflush(nullptr);
    pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) ::_exit(emfile_child());
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}
