// Helpers shared by the network tests (net_test, socket_stream_test, socket_listener_test,
// tcp_test, unix_socket_test, getaddrinfo_test): connected stream pairs over loopback and
// UNIX sockets, a temporary directory, descriptor counting. Header-only; not a test target.
#pragma once

#include <anyio/net.hpp>

#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test_support.hpp"

namespace anyio_test {

/// Two connected ends of one stream.
struct StreamPair {
    anyio::SocketStream client;
    anyio::SocketStream server;
};

/// A TCP connection over loopback (`host` is "127.0.0.1" or "::1").
inline anyio::Task<StreamPair> tcp_pair(std::string_view host = "127.0.0.1") {
    anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = host});
    StreamPair pair;
    // The kernel completes the handshake before accept(), so one task can do both.
    pair.client = co_await anyio::connect_tcp(host, listener.local_port());
    pair.server = co_await listener.accept();
    co_return pair;
}

/// A connected pair of UNIX stream sockets (socketpair), as SocketStreams.
inline StreamPair unix_pair() {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) {
        throw std::system_error(errno, std::generic_category(), "socketpair");
    }
    StreamPair pair;
    pair.client = anyio::SocketStream::from_fd(fds[0]);
    pair.server = anyio::SocketStream::from_fd(fds[1]);
    return pair;
}

/// A fresh directory under /tmp, removed with everything in it.
struct TempDir {
    TempDir() {
        std::string pattern = (std::filesystem::temp_directory_path() / "anyio-net-XXXXXX").string();
        if (::mkdtemp(pattern.data()) == nullptr) {
            throw std::system_error(errno, std::generic_category(), "mkdtemp");
        }
        path = pattern;
    }
    ~TempDir() {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    [[nodiscard]] std::string file(std::string_view name) const { return (path / name).string(); }
    std::filesystem::path path;
};

/// True if this machine can bind a socket to ::1.
inline bool has_ipv6_loopback() {
    int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_in6 address{};
    address.sin6_family = AF_INET6;
    address.sin6_addr = in6addr_loopback;
    bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0;
    ::close(fd);
    return ok;
}

/// Open descriptors of this process (/proc/self/fd), to prove sockets were closed.
inline std::size_t open_fd_count() {
    std::size_t count = 0;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
        (void)entry;
        ++count;
    }
    return count;
}

/// `size` bytes of a pattern that shows misplaced or repeated chunks.
inline std::string pattern_bytes(std::size_t size) {
    std::string data(size, '\0');
    for (std::size_t i = 0; i < size; ++i) {
        data[i] = static_cast<char>('a' + (i * 7 + i / 251) % 26);
    }
    return data;
}

/// Receives until `size` bytes have arrived (or EOF).
inline anyio::Task<std::string> receive_exactly(anyio::SocketStream& stream, std::size_t size) {
    std::string data;
    data.reserve(size);
    while (data.size() < size) data += co_await stream.receive(size - data.size());
    co_return data;
}

/// Receives until EOF.
inline anyio::Task<std::string> receive_all(anyio::SocketStream& stream) {
    std::string data;
    for (;;) {
        try {
            data += co_await stream.receive();
        } catch (const anyio::EndOfStream&) {
            break;
        }
    }
    co_return data;
}

/// Echoes everything `stream` receives until EOF, then sends EOF itself.
inline anyio::Task<> echo_all(anyio::SocketStream& stream) {
    std::vector<std::byte> buffer(65536);
    for (;;) {
        std::size_t n = 0;
        try {
            n = co_await stream.receive_into(buffer);
        } catch (const anyio::EndOfStream&) {
            break;
        }
        co_await stream.send(std::span<const std::byte>(buffer.data(), n));
    }
    co_await stream.send_eof();
}

/// echo_all for a stream the task owns (a connection handler).
inline anyio::Task<> echo_until_eof(anyio::SocketStream stream) { co_await echo_all(stream); }

}  // namespace anyio_test
