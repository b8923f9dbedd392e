// anyio-cpp: SocketAddress, one end of a socket (IPv4, IPv6 or a UNIX path), as
// SocketStream::local_address / remote_address (socket_stream.hpp) report it; from_sockaddr
// turns the kernel's sockaddr into one for tcp.hpp and unix_socket.hpp.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

namespace anyio {

/// Where one end of a socket is: an IP address and port (anyio's `(host, port)` tuple), or
/// the path of a UNIX socket. A plain value (copyable, allocates only for its strings); any
/// thread.
struct SocketAddress {
    /// AF_INET, AF_INET6 or AF_UNIX (AF_UNSPEC for an empty address).
    int family = AF_UNSPEC;
    /// The numeric address ("127.0.0.1", "::1"; a non-zero IPv6 scope is appended as
    /// "fe80::1%2", as anyio does). Empty for UNIX sockets.
    std::string host;
    /// The port (0 for UNIX sockets).
    std::uint16_t port = 0;
    /// The path of a UNIX socket (empty for an unnamed one, such as a connecting client's;
    /// a Linux abstract address starts with '\0'). Empty for IP addresses.
    std::string path;

    [[nodiscard]] bool is_unix() const noexcept { return family == AF_UNIX; }

    /// "127.0.0.1:8080", "[::1]:8080", or the path (as RFC 3986 writes hosts and ports).
    [[nodiscard]] std::string to_string() const {
        if (family == AF_UNIX) return path;
        if (family == AF_INET6) return "[" + host + "]:" + std::to_string(port);
        if (family == AF_INET) return host + ":" + std::to_string(port);
        return "(no address)";
    }

    friend bool operator==(const SocketAddress&, const SocketAddress&) = default;

    /// Converts a socket address the kernel returned (getsockname, accept, getaddrinfo).
    /// Throws std::invalid_argument for a family other than the three above.
    static SocketAddress from_sockaddr(const sockaddr* address, socklen_t length) {
        SocketAddress result;
        if (address == nullptr || length < static_cast<socklen_t>(sizeof(sa_family_t))) {
            return result;
        }
        result.family = address->sa_family;
        char text[INET6_ADDRSTRLEN + IF_NAMESIZE + 2] = {};
        switch (address->sa_family) {
        case AF_INET: {
            sockaddr_in in{};
            std::memcpy(&in, address, sizeof in);
            ::inet_ntop(AF_INET, &in.sin_addr, text, sizeof text);
            result.host = text;
            result.port = ntohs(in.sin_port);
            break;
        }
        case AF_INET6: {
            sockaddr_in6 in6{};
            std::memcpy(&in6, address, sizeof in6);
            ::inet_ntop(AF_INET6, &in6.sin6_addr, text, sizeof text);
            result.host = text;
            if (in6.sin6_scope_id != 0) result.host += "%" + std::to_string(in6.sin6_scope_id);
            result.port = ntohs(in6.sin6_port);
            break;
        }
        case AF_UNIX: {
            const auto* un = reinterpret_cast<const sockaddr_un*>(address);
            const std::size_t offset = offsetof(sockaddr_un, sun_path);
            std::size_t size = static_cast<std::size_t>(length) > offset
                                   ? static_cast<std::size_t>(length) - offset
                                   : 0;
            if (size > sizeof un->sun_path) size = sizeof un->sun_path;
            std::string_view raw(un->sun_path, size);
            if (!raw.empty() && raw.front() != '\0') {
                raw = raw.substr(0, std::min(raw.size(), raw.find('\0')));  // drop the NUL
            }
            result.path = std::string(raw);
            break;
        }
        default:
            throw std::invalid_argument("anyio::SocketAddress: unsupported address family " +
                                        std::to_string(address->sa_family) +
                                        " (only AF_INET, AF_INET6 and AF_UNIX are supported)");
        }
        return result;
    }
};

}  // namespace anyio
