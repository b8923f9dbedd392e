#include <anyio/tcp.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/getaddrinfo.hpp>
#include <anyio/task_group.hpp>

#include <algorithm>
#include <memory>
#include <chrono>
#include <string>
#include <system_error>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net_test_support.hpp"

// Tests for include/anyio/tcp.hpp: create_tcp_listener, TcpListener, connect_tcp and its
// Happy Eyeballs.

using namespace std::chrono_literals;
using namespace anyio_test;

namespace {

// A port on 127.0.0.1 where nothing listens (bound once, then closed).
std::uint16_t closed_port() {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    socklen_t length = sizeof address;
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
    ::close(fd);
    return ntohs(address.sin_port);
}

// A loopback listener that never completes a handshake: backlog 0, its accept queue filled
// by one connection nobody accepts; Linux then drops every further SYN (the connecting side
// stays in SYN_SENT, retrying for minutes).
struct BlackholeListener {
    BlackholeListener() {
        listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
        REQUIRE(::listen(listener, 0) == 0);
        socklen_t length = sizeof address;
        REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) == 0);
        port = ntohs(address.sin_port);
        filler = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        REQUIRE(::connect(filler, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    }
    ~BlackholeListener() {
        ::close(filler);
        ::close(listener);
    }
    BlackholeListener(const BlackholeListener&) = delete;
    BlackholeListener& operator=(const BlackholeListener&) = delete;
    int listener = -1;
    int filler = -1;
    std::uint16_t port = 0;
};

// A resolver for ScopedResolver that answers every lookup with `addresses`.
anyio::lowlevel::Resolver fixed_addresses(std::vector<anyio::AddrInfo> addresses) {
    return [addresses](const std::string&, const std::string&, const anyio::AddrInfoHints&) {
        return addresses;
    };
}

std::vector<int> families(const std::vector<anyio::AddrInfo>& list) {
    std::vector<int> result;
    for (const auto& entry : list) result.push_back(entry.family);
    return result;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// create_tcp_listener
// ---------------------------------------------------------------------------------------------

TEST_CASE("create_tcp_listener with no host listens on every address family on one port", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener();
        std::vector<anyio::SocketAddress> addresses = listener.local_addresses();
        REQUIRE_FALSE(addresses.empty());
        CHECK(addresses.front().family == AF_INET);  // IPv4 first, as anyio sorts them
        CHECK(addresses.front().host == "0.0.0.0");
        for (const auto& address : addresses) CHECK(address.port == listener.local_port());
        CHECK(listener.local_port() != 0);
        anyio::SocketStream v4 = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
        anyio::SocketStream accepted = co_await listener.accept();
        CHECK(accepted.remote_address() == v4.local_address());
        bool has_v6_socket = std::any_of(addresses.begin(), addresses.end(),
                                         [](const auto& a) { return a.family == AF_INET6; });
        if (has_v6_socket && has_ipv6_loopback()) {
            anyio::SocketStream v6 = co_await anyio::connect_tcp("::1", listener.local_port());
            anyio::SocketStream accepted_v6 = co_await listener.accept();
            CHECK(accepted_v6.remote_address().family == AF_INET6);
        }
    });
}

TEST_CASE("create_tcp_listener on ::1 listens on IPv6 only", "[net]") {
    if (!has_ipv6_loopback()) {
        SUCCEED("no IPv6 loopback on this machine");
        return;
    }
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "::1"});
        REQUIRE(listener.local_addresses().size() == 1);
        CHECK(listener.local_addresses().front().host == "::1");
        StreamPair pair = co_await tcp_pair("::1");
        co_await pair.client.send(std::string_view("six"));
        std::string received = co_await pair.server.receive();
        CHECK(received == "six");
        CHECK(pair.client.remote_address().to_string().front() == '[');
    });
}

TEST_CASE("create_tcp_listener sets SO_REUSEADDR, and reuse_port lets two listeners share a port", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener first = co_await anyio::create_tcp_listener(
            {.local_host = "127.0.0.1", .reuse_port = true});
        int value = 0;
        socklen_t size = sizeof value;
        REQUIRE(::getsockopt(first.native_handles().front(), SOL_SOCKET, SO_REUSEADDR, &value, &size) == 0);
        CHECK(value != 0);
        REQUIRE(::getsockopt(first.native_handles().front(), SOL_SOCKET, SO_REUSEPORT, &value, &size) == 0);
        CHECK(value != 0);
        anyio::TcpListener second = co_await anyio::create_tcp_listener(
            {.local_host = "127.0.0.1", .local_port = first.local_port(), .reuse_port = true});
        CHECK(second.local_port() == first.local_port());
    });
}

TEST_CASE("listening on a taken port fails with a message naming the address", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener first = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        std::string message;
        try {
            (void)co_await anyio::create_tcp_listener(
                {.local_host = "127.0.0.1", .local_port = first.local_port()});
        } catch (const std::system_error& error) {
            message = error.what();
            CHECK(error.code() == std::errc::address_in_use);
        }
        CHECK(message.find("127.0.0.1:" + std::to_string(first.local_port())) != std::string::npos);
    });
}

TEST_CASE("create_tcp_listener resolves a host name", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "localhost"});
        CHECK_FALSE(listener.local_addresses().empty());
        anyio::SocketStream client = co_await anyio::connect_tcp("localhost", listener.local_port());
        anyio::SocketStream server = co_await listener.accept();
        CHECK(server.remote_address() == client.local_address());
    });
}

// ---------------------------------------------------------------------------------------------
// connect_tcp
// ---------------------------------------------------------------------------------------------

TEST_CASE("connect_tcp takes its options in braced form inside co_await", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        std::uint16_t port = listener.local_port();
        anyio::SocketStream a = co_await anyio::connect_tcp("127.0.0.1", port, {.happy_eyeballs_delay = 50ms});
        // Views of strings that die right after the call: connect_tcp copied them at the call.
        // (Named here: a temporary std::string written inside co_await hits the g++ 12 bug.)
        auto host = std::make_unique<std::string>("127.0.0.1");
        auto connecting = anyio::connect_tcp(*host, port, {.local_host = *host});
        host.reset();
        anyio::SocketStream b = co_await std::move(connecting);
        CHECK(b.local_address().host == "127.0.0.1");
        CHECK_FALSE(a.is_closed());
    });
}

TEST_CASE("connect_tcp binds to local_host before connecting", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        anyio::SocketStream client = co_await anyio::connect_tcp(
            "127.0.0.1", listener.local_port(), {.local_host = "127.0.0.2"});
        CHECK(client.local_address().host == "127.0.0.2");
    });
}

TEST_CASE("connect_tcp to a closed port fails with a message naming the address and why", "[net]") {
    std::uint16_t port = closed_port();
    run_loop([port]() -> anyio::Task<> {
        std::string message;
        try {
            (void)co_await anyio::connect_tcp("127.0.0.1", port);
        } catch (const std::system_error& error) {
            message = error.what();
            CHECK(error.code() == std::errc::connection_refused);
        }
        CHECK(message.find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
        CHECK(message.find("refused") != std::string::npos);
    });
}

TEST_CASE("connect_tcp with a name that resolves to nothing fails", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::lowlevel::ScopedResolver resolver(fixed_addresses({}));
        CHECK_THROWS_AS(co_await anyio::connect_tcp("nothing.test", 80), std::system_error);
    });
}

TEST_CASE("cancelling connect_tcp closes every socket it opened", "[net]") {
    BlackholeListener blackhole;
    run_loop([&]() -> anyio::Task<> {
        const std::size_t fds_before = open_fd_count();
        auto start = anyio::current_time();
        bool completed = co_await anyio::move_on_after(50ms, [&]() -> anyio::Task<> {
            (void)co_await anyio::connect_tcp("127.0.0.1", blackhole.port);
        }());
        CHECK_FALSE(completed);
        CHECK(anyio::current_time() - start < prompt_bound);
        CHECK(open_fd_count() == fds_before);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
    });
}

// ---------------------------------------------------------------------------------------------
// Happy Eyeballs (RFC 8305), with a substitute resolver (as anyio's tests replace getaddrinfo)
// ---------------------------------------------------------------------------------------------

TEST_CASE("Happy Eyeballs orders IPv6 first and interleaves the families", "[net]") {
    std::vector<anyio::AddrInfo> targets = {
        anyio::AddrInfo::numeric("127.0.0.1", 1), anyio::AddrInfo::numeric("127.0.0.2", 1),
        anyio::AddrInfo::numeric("127.0.0.3", 1), anyio::AddrInfo::numeric("::1", 1),
        anyio::AddrInfo::numeric("::2", 1)};
    anyio::detail::order_for_happy_eyeballs(targets);
    CHECK(families(targets) == std::vector<int>{AF_INET6, AF_INET, AF_INET6, AF_INET, AF_INET});
    CHECK(targets[0].address().host == "::1");
    CHECK(targets[1].address().host == "127.0.0.1");
    CHECK(targets[2].address().host == "::2");
    CHECK(targets[4].address().host == "127.0.0.3");
}

TEST_CASE("Happy Eyeballs starts the next attempt after the delay and cancels the loser", "[net]") {
    BlackholeListener blackhole;
    run_loop([&]() -> anyio::Task<> {
        anyio::TcpListener good = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        anyio::lowlevel::ScopedResolver resolver(fixed_addresses(
            {anyio::AddrInfo::numeric("127.0.0.1", blackhole.port),
             anyio::AddrInfo::numeric("127.0.0.1", good.local_port())}));
        const std::size_t fds_before = open_fd_count();
        auto start = anyio::current_time();
        anyio::SocketStream stream =
            co_await anyio::connect_tcp("happy.eyeballs.test", 80, {.happy_eyeballs_delay = 50ms});
        auto elapsed = anyio::current_time() - start;
        CHECK(stream.remote_address().port == good.local_port());
        CHECK(elapsed >= 45ms);  // the first attempt had its delay
        CHECK(elapsed < prompt_bound);
        // The loser was cancelled and its socket closed: only the winner is new.
        CHECK(open_fd_count() == fds_before + 1);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
    });
}

TEST_CASE("Happy Eyeballs starts the next attempt at once when one fails", "[net]") {
    std::uint16_t refused = closed_port();
    run_loop([refused]() -> anyio::Task<> {
        anyio::TcpListener good = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        anyio::lowlevel::ScopedResolver resolver(fixed_addresses(
            {anyio::AddrInfo::numeric("127.0.0.1", refused),
             anyio::AddrInfo::numeric("127.0.0.1", good.local_port())}));
        auto start = anyio::current_time();
        anyio::SocketStream stream =
            co_await anyio::connect_tcp("refused.first.test", 80, {.happy_eyeballs_delay = 10s});
        CHECK(anyio::current_time() - start < prompt_bound);  // not the 10 s delay
        CHECK(stream.remote_address().port == good.local_port());
    });
}

TEST_CASE("when every attempt fails the error names every address tried and why", "[net]") {
    std::uint16_t first = closed_port();
    std::uint16_t second = closed_port();
    run_loop([first, second]() -> anyio::Task<> {
        anyio::lowlevel::ScopedResolver resolver(fixed_addresses(
            {anyio::AddrInfo::numeric("127.0.0.1", first), anyio::AddrInfo::numeric("127.0.0.1", second)}));
        std::string message;
        try {
            (void)co_await anyio::connect_tcp("all.refused.test", 80, {.happy_eyeballs_delay = 10ms});
        } catch (const std::system_error& error) {
            message = error.what();
        }
        INFO(message);
        CHECK(message.find("all.refused.test") != std::string::npos);
        CHECK(message.find("127.0.0.1:" + std::to_string(first) + ": Connection refused") != std::string::npos);
        CHECK(message.find("127.0.0.1:" + std::to_string(second) + ": Connection refused") != std::string::npos);
    });
}
