#include <anyio/socket_address.hpp>

#include "catch.hpp"

#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

// Tests for include/anyio/socket_address.hpp.

TEST_CASE("an IPv4 socket address converts to host, port and text", "[net]") {
    sockaddr_in in{};
    in.sin_family = AF_INET;
    in.sin_port = htons(8080);
    REQUIRE(::inet_pton(AF_INET, "192.0.2.1", &in.sin_addr) == 1);
    auto address = anyio::SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&in), sizeof in);
    CHECK(address.family == AF_INET);
    CHECK(address.host == "192.0.2.1");
    CHECK(address.port == 8080);
    CHECK(address.path.empty());
    CHECK_FALSE(address.is_unix());
    CHECK(address.to_string() == "192.0.2.1:8080");
}

TEST_CASE("an IPv6 socket address is bracketed in text and keeps a non-zero scope", "[net]") {
    sockaddr_in6 in6{};
    in6.sin6_family = AF_INET6;
    in6.sin6_port = htons(443);
    REQUIRE(::inet_pton(AF_INET6, "fe80::1", &in6.sin6_addr) == 1);
    in6.sin6_scope_id = 3;
    auto address = anyio::SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&in6), sizeof in6);
    CHECK(address.host == "fe80::1%3");
    CHECK(address.to_string() == "[fe80::1%3]:443");
    in6.sin6_scope_id = 0;
    CHECK(anyio::SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&in6), sizeof in6).host == "fe80::1");
}

TEST_CASE("a UNIX socket address is its path; an unnamed one is empty", "[net]") {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::strcpy(un.sun_path, "/run/app.sock");
    socklen_t length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + std::strlen(un.sun_path) + 1);
    auto address = anyio::SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&un), length);
    CHECK(address.is_unix());
    CHECK(address.path == "/run/app.sock");
    CHECK(address.host.empty());
    CHECK(address.port == 0);
    CHECK(address.to_string() == "/run/app.sock");
    auto unnamed = anyio::SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&un),
                                                       static_cast<socklen_t>(sizeof(sa_family_t)));
    CHECK(unnamed.is_unix());
    CHECK(unnamed.path.empty());
}

TEST_CASE("addresses compare by value and an unsupported family is refused", "[net]") {
    anyio::SocketAddress a{AF_INET, "127.0.0.1", 1, {}};
    anyio::SocketAddress b = a;
    CHECK(a == b);
    b.port = 2;
    CHECK_FALSE(a == b);
    CHECK(anyio::SocketAddress{}.to_string() == "(no address)");
    sockaddr other{};
    other.sa_family = AF_PACKET;
    CHECK_THROWS_AS(anyio::SocketAddress::from_sockaddr(&other, sizeof other), std::invalid_argument);
}
