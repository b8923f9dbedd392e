// anyio-cpp: connect_tcp (Happy Eyeballs) and create_tcp_listener / TcpListener.
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "cancel_scope.hpp"
#include "detail/socket.hpp"
#include "event.hpp"
#include "getaddrinfo.hpp"
#include "socket_listener.hpp"
#include "socket_stream.hpp"
#include "task.hpp"
#include "task_group.hpp"

namespace anyio {

/// Options of connect_tcp (an aggregate; trivially destructible, so the braced form is safe
/// inside co_await with g++ 12: `co_await connect_tcp(host, port, {.happy_eyeballs_delay =
/// 50ms})`). The strings are views, copied by connect_tcp at the call.
struct ConnectOptions {
    /// The local address (or host name) to bind before connecting; empty: the OS chooses.
    std::string_view local_host{};
    /// How long an attempt runs alone before the next address is tried in parallel.
    std::chrono::steady_clock::duration happy_eyeballs_delay = std::chrono::milliseconds(250);
};

/// Options of create_tcp_listener (an aggregate; trivially destructible, as ConnectOptions).
struct ListenerOptions {
    /// The interface to listen on (address or host name); empty: all interfaces, IPv4 and IPv6.
    std::string_view local_host{};
    /// 0: a free port chosen by the OS (the same one for every address family).
    std::uint16_t local_port = 0;
    /// Queued connections not yet accepted (at most 65536, and capped by the OS's somaxconn).
    int backlog = 65536;
    /// Sets SO_REUSEPORT, so several loops or processes can listen on the same port.
    bool reuse_port = false;
};

// The braced options inside co_await must not have destructors (the g++ 12 bug, DESIGN.md).
static_assert(std::is_trivially_destructible_v<ConnectOptions>);
static_assert(std::is_trivially_destructible_v<ListenerOptions>);

class TcpListener;

namespace detail {
Task<TcpListener> create_tcp_listener(std::string host, std::uint16_t port, int backlog,
                                      bool reuse_port);
}  // namespace detail

/// A listener over one TCP socket per address family (see SocketListener for accept and
/// serve). Loop-thread only; movable.
class TcpListener : public SocketListener {
public:
    TcpListener() noexcept = default;

    /// The port every socket of the listener is bound to.
    [[nodiscard]] std::uint16_t local_port() const { return local_addresses().front().port; }

private:
    friend Task<TcpListener> detail::create_tcp_listener(std::string, std::uint16_t, int, bool);
    explicit TcpListener(std::unique_ptr<detail::ListenerState> state) noexcept
        : SocketListener(std::move(state)) {}
};

namespace detail {

/// RFC 8305 section 4: interleave the address families, IPv6 first (v6, v4, v6, v4, ...),
/// keeping the resolver's order within each family.
inline void order_for_happy_eyeballs(std::vector<AddrInfo>& targets) {
    std::vector<AddrInfo> ipv6;
    std::vector<AddrInfo> other;
    for (AddrInfo& target : targets) (target.family == AF_INET6 ? ipv6 : other).push_back(std::move(target));
    targets.clear();
    std::size_t i = 0;
    for (; i < ipv6.size() || i < other.size(); ++i) {
        if (i < ipv6.size()) targets.push_back(std::move(ipv6[i]));
        if (i < other.size()) targets.push_back(std::move(other[i]));
    }
}

/// One connection attempt: a socket of the target's family, bound to `local` if given.
inline Task<SocketStream> connect_one(const AddrInfo& target, const AddrInfo* local) {
    std::unique_ptr<SocketCore> core = open_stream_socket(target.family, "connect_tcp");
    if (local != nullptr) {
        int one = 1;
        // Leave the port to connect(): many outgoing connections from one address.
        ::setsockopt(core->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (::bind(core->fd, local->sockaddr_ptr(), local->length) != 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "cannot bind to local address " + local->address().to_string());
        }
    }
    co_await ConnectAwaiter{core.get(), target.sockaddr_ptr(), target.length};
    SocketStream stream(std::move(core));
    stream.set_nodelay(true);
    co_return stream;
}

/// The attempts of one connect_tcp (trio's open_tcp_stream): start one, give it the delay,
/// start the next one earlier if any attempt fails meanwhile; the first to connect cancels
/// the others, whose sockets close as their frames unwind.
struct HappyEyeballs {
    const std::vector<AddrInfo>& targets;
    const AddrInfo* local;
    std::chrono::steady_clock::duration delay;
    SocketStream winner;
    bool connected = false;
    std::vector<std::pair<std::size_t, std::error_code>> failures;  // target index, why
    std::unique_ptr<Event> attempt_failed;  // set when any attempt fails; one per round

    Task<void> start_attempts(TaskGroup& group) {
        for (std::size_t i = 0; i < targets.size(); ++i) {
            attempt_failed = std::make_unique<Event>();
            group.start_soon(attempt(i, group));
            if (i + 1 < targets.size()) co_await move_on_after(delay, wait(*attempt_failed));
        }
    }

    static Task<void> wait(Event& event) { co_await event.wait(); }

    Task<void> attempt(std::size_t index, TaskGroup& group) {
        try {
            SocketStream stream = co_await connect_one(targets[index], local);
            if (!connected) {
                connected = true;
                winner = std::move(stream);
                group.cancel_scope().cancel();
            }  // else: a later success, closed at once
        } catch (const std::system_error& error) {
            failures.emplace_back(index, error.code());
            if (attempt_failed != nullptr) attempt_failed->set();
        }
    }

    [[nodiscard]] std::system_error all_failed(const std::string& host, std::uint16_t port) const {
        std::vector<std::pair<std::size_t, std::error_code>> sorted = failures;
        std::sort(sorted.begin(), sorted.end(),
                  [](const auto& a, const auto& b) { return a.first < b.first; });
        std::string what = targets.size() == 1
                               ? "anyio::connect_tcp: cannot connect to " + host + " port " +
                                     std::to_string(port) + " ("
                               : "anyio::connect_tcp: all " + std::to_string(targets.size()) +
                                     " connection attempts to " + host + " port " +
                                     std::to_string(port) + " failed (";
        for (std::size_t i = 0; i < sorted.size(); ++i) {
            if (i != 0) what += "; ";
            what += targets[sorted[i].first].address().to_string() + ": " + sorted[i].second.message();
        }
        what += ")";
        std::error_code first = sorted.empty() ? std::make_error_code(std::errc::host_unreachable)
                                               : sorted.front().second;
        return std::system_error(first, what);
    }
};

inline Task<SocketStream> connect_tcp(std::string host, std::uint16_t port, std::string local_host,
                                      std::chrono::steady_clock::duration delay) {
    std::optional<AddrInfo> local;
    AddrInfoHints hints{.type = SOCK_STREAM};
    if (!local_host.empty()) {
        AddrInfo parsed;
        if (AddrInfo::parse_numeric(local_host, 0, SOCK_STREAM, parsed)) {
            local = parsed;
        } else {
            std::vector<AddrInfo> found = co_await anyio::getaddrinfo(local_host, std::uint16_t{0}, hints);
            if (!found.empty()) local = found.front();
        }
        if (!local) {
            throw std::system_error(EAI_NONAME, gai_category(),
                                    "anyio::connect_tcp: no address for local_host '" + local_host + "'");
        }
        hints.family = local->family;  // only targets the local address can reach
    }
    std::vector<AddrInfo> targets;
    AddrInfo numeric;
    if (AddrInfo::parse_numeric(host, port, SOCK_STREAM, numeric)) {
        targets.push_back(numeric);  // an address: no lookup, no worker thread
    } else {
        targets = co_await anyio::getaddrinfo(host, port, hints);
    }
    if (targets.empty()) {
        throw std::system_error(EAI_NONAME, gai_category(),
                                "anyio::connect_tcp: no address found for '" + host + "'");
    }
    order_for_happy_eyeballs(targets);
    HappyEyeballs race{targets, local ? &*local : nullptr, delay, {}, false, {}, {}};
    co_await task_group([&race](TaskGroup& group) -> Task<void> { co_await race.start_attempts(group); });
    if (!race.connected) throw race.all_failed(host, port);
    co_return std::move(race.winner);
}

/// Binds and listens on one address; returns the registered socket.
inline std::unique_ptr<SocketCore> listen_on(const AddrInfo& address, int backlog, bool reuse_port) {
    std::unique_ptr<SocketCore> core = open_stream_socket(address.family, "create_tcp_listener");
    int one = 1;
    auto fail = [&](const char* step) {
        throw std::system_error(errno, std::generic_category(),
                                std::string("anyio::create_tcp_listener: ") + step + " " +
                                    address.address().to_string());
    };
    if (::setsockopt(core->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) fail("SO_REUSEADDR on");
    if (reuse_port && ::setsockopt(core->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
        fail("SO_REUSEPORT on");
    }
    // One socket per family: the IPv6 one must not also take IPv4 (it would collide with
    // the IPv4 socket on the same port).
    if (address.family == AF_INET6 &&
        ::setsockopt(core->fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0) {
        fail("IPV6_V6ONLY on");
    }
    if (::bind(core->fd, address.sockaddr_ptr(), address.length) != 0) fail("cannot bind to");
    if (::listen(core->fd, backlog) != 0) fail("cannot listen on");
    return core;
}

inline void set_port(AddrInfo& address, std::uint16_t port) noexcept {
    if (address.family == AF_INET) {
        reinterpret_cast<sockaddr_in*>(&address.storage)->sin_port = htons(port);
    } else if (address.family == AF_INET6) {
        reinterpret_cast<sockaddr_in6*>(&address.storage)->sin6_port = htons(port);
    }
}

inline Task<TcpListener> create_tcp_listener(std::string host, std::uint16_t port, int backlog,
                                             bool reuse_port) {
    backlog = std::clamp(backlog, 0, 65536);
    AddrInfoHints hints{.type = SOCK_STREAM, .flags = AI_PASSIVE | AI_ADDRCONFIG};
    std::vector<AddrInfo> addresses;
    AddrInfo numeric;
    if (host.empty()) {
        // The wildcard addresses: getaddrinfo with no host does no lookup, so no thread hop.
        co_await checkpoint();
        addresses = blocking_getaddrinfo({}, std::to_string(port), hints);
    } else if (AddrInfo::parse_numeric(host, port, SOCK_STREAM, numeric)) {
        co_await checkpoint();
        addresses.push_back(numeric);
    } else {
        addresses = co_await anyio::getaddrinfo(host, port, hints);
    }
    // IPv4 first, as anyio sorts them; the port the first bind got is used for the others.
    std::stable_sort(addresses.begin(), addresses.end(),
                     [](const AddrInfo& a, const AddrInfo& b) { return a.family < b.family; });
    if (addresses.empty()) {
        throw std::system_error(EAI_NONAME, gai_category(),
                                "anyio::create_tcp_listener: no address found for '" + host + "'");
    }
    for (int round = 0;; ++round) {
        auto state = std::make_unique<ListenerState>();
        std::uint16_t chosen = port;
        try {
            for (AddrInfo address : addresses) {
                set_port(address, chosen);
                state->sockets.push_back(listen_on(address, backlog, reuse_port));
                if (chosen == 0) {
                    sockaddr_storage bound{};
                    socklen_t length = sizeof bound;
                    ::getsockname(state->sockets.back()->fd, reinterpret_cast<sockaddr*>(&bound), &length);
                    chosen = SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&bound), length).port;
                }
            }
        } catch (const std::system_error& error) {
            // The port the OS chose for the first family may be taken in another: choose again.
            if (port != 0 || state->sockets.empty() || round >= 16 ||
                error.code() != std::errc::address_in_use) {
                throw;
            }
            continue;
        }
        co_return TcpListener(std::move(state));
    }
}

}  // namespace detail

/// Connects to `host` (an address or a host name) on `port` over TCP (anyio's connect_tcp):
/// the name is resolved with getaddrinfo on a worker thread (an address needs no lookup),
/// then the addresses are tried with Happy Eyeballs (RFC 8305): IPv6 first and the families
/// interleaved; each attempt runs alone for happy_eyeballs_delay before the next starts in
/// parallel (at once when one fails); the first to connect wins and the others are cancelled
/// and closed. The stream has TCP_NODELAY on.
///
/// Throws std::system_error: when every attempt failed, naming each address tried and why
/// (its code is the first attempt's error); when the name cannot be resolved (getaddrinfo's
/// error). A cancellation point throughout; cancelling closes every socket it opened.
/// `host` and `options.local_host` are copied at the call. Loop thread only.
inline Task<SocketStream> connect_tcp(std::string_view host, std::uint16_t port,
                                      ConnectOptions options = {}) {
    detail::running_loop("connect_tcp");  // NoEventLoopError at the call, not at co_await
    return detail::connect_tcp(std::string(host), port, std::string(options.local_host),
                               options.happy_eyeballs_delay);
}

/// Listens for TCP connections (anyio's create_tcp_listener): on every address `local_host`
/// resolves to (all interfaces by default), one socket per address, all on the same port,
/// with SO_REUSEADDR (and SO_REUSEPORT when asked), IPv6 sockets IPv6-only. Throws
/// std::system_error naming the address that cannot be bound. `options.local_host` is copied
/// at the call. Loop thread only.
inline Task<TcpListener> create_tcp_listener(ListenerOptions options = {}) {
    detail::running_loop("create_tcp_listener");
    return detail::create_tcp_listener(std::string(options.local_host), options.local_port,
                                       options.backlog, options.reuse_port);
}

}  // namespace anyio
