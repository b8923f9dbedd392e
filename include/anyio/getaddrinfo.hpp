// anyio-cpp: getaddrinfo: the blocking resolver run through to_thread::run_sync
// (abandon_on_cancel) under a limiter of its own (8 tokens), so slow DNS cannot starve the default
// pool. Used by tcp.hpp's connect_tcp and create_tcp_listener.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "capacity_limiter.hpp"
#include "event_loop.hpp"
#include "socket_address.hpp"
#include "task.hpp"
#include "to_thread.hpp"

namespace anyio {

/// What getaddrinfo(3) narrows the lookup by (its `hints`). Zero means "any".
struct AddrInfoHints {
    int family = AF_UNSPEC;  // AF_INET, AF_INET6
    int type = 0;            // SOCK_STREAM, SOCK_DGRAM
    int protocol = 0;
    int flags = 0;           // AI_PASSIVE, AI_ADDRCONFIG, AI_NUMERICHOST, ...
};

/// One result of getaddrinfo: anyio's `(family, type, proto, canonname, sockaddr)` tuple,
/// with the raw socket address kept for connect/bind. A plain value; any thread.
struct AddrInfo {
    int family = AF_UNSPEC;
    int type = 0;
    int protocol = 0;
    std::string canonical_name;  // set on the first result when AI_CANONNAME was asked for
    sockaddr_storage storage{};
    socklen_t length = 0;

    [[nodiscard]] const sockaddr* sockaddr_ptr() const noexcept {
        return reinterpret_cast<const sockaddr*>(&storage);
    }
    /// The address as host and port.
    [[nodiscard]] SocketAddress address() const {
        return SocketAddress::from_sockaddr(sockaddr_ptr(), length);
    }

    /// The entry for a numeric IPv4 or IPv6 address ("127.0.0.1", "::1", "fe80::1%2"), with
    /// no lookup: for tests that substitute the resolver, and for callers that have an address
    /// already. Throws std::invalid_argument for anything else.
    static AddrInfo numeric(std::string_view host, std::uint16_t port, int type = SOCK_STREAM) {
        AddrInfo info;
        if (!parse_numeric(host, port, type, info)) {
            throw std::invalid_argument("anyio::AddrInfo::numeric: '" + std::string(host) +
                                        "' is not a numeric IPv4 or IPv6 address");
        }
        return info;
    }

    /// As numeric(), but returns false instead of throwing.
    static bool parse_numeric(std::string_view host, std::uint16_t port, int type, AddrInfo& out) {
        std::string text(host);
        out.type = type;
        out.protocol = 0;
        sockaddr_in in{};
        if (::inet_pton(AF_INET, text.c_str(), &in.sin_addr) == 1) {
            in.sin_family = AF_INET;
            in.sin_port = htons(port);
            out.family = AF_INET;
            std::memcpy(&out.storage, &in, sizeof in);
            out.length = sizeof in;
            return true;
        }
        // IPv6, possibly with a scope ("fe80::1%2" or "fe80::1%eth0"): let getaddrinfo parse
        // it, without any lookup.
        if (text.find(':') == std::string::npos) return false;
        addrinfo hints{};
        hints.ai_family = AF_INET6;
        hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
        hints.ai_socktype = type;
        addrinfo* found = nullptr;
        std::string service = std::to_string(port);
        if (::getaddrinfo(text.c_str(), service.c_str(), &hints, &found) != 0 || found == nullptr) {
            return false;
        }
        out.family = AF_INET6;
        std::memcpy(&out.storage, found->ai_addr, found->ai_addrlen);
        out.length = found->ai_addrlen;
        ::freeaddrinfo(found);
        return true;
    }
};

namespace lowlevel {
/// A resolver with the shape of the blocking getaddrinfo(3): host ("" for none), service
/// (a port number or a name) and hints in, the address list out (or an exception).
using Resolver = std::function<std::vector<AddrInfo>(const std::string& host,
                                                     const std::string& service,
                                                     const AddrInfoHints& hints)>;
}  // namespace lowlevel

namespace detail {

/// The error category of getaddrinfo's EAI_* codes (messages from gai_strerror).
class GaiErrorCategory final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "getaddrinfo"; }
    [[nodiscard]] std::string message(int code) const override { return ::gai_strerror(code); }
};
inline const std::error_category& gai_category() noexcept {
    static const GaiErrorCategory category;
    return category;
}

using lowlevel::Resolver;

/// The blocking call, run on a worker thread. Duplicates (glibc returns some) are dropped.
inline std::vector<AddrInfo> blocking_getaddrinfo(const std::string& host, const std::string& service,
                                                  const AddrInfoHints& hints) {
    addrinfo raw_hints{};
    raw_hints.ai_family = hints.family;
    raw_hints.ai_socktype = hints.type;
    raw_hints.ai_protocol = hints.protocol;
    raw_hints.ai_flags = hints.flags;
    addrinfo* found = nullptr;
    const char* node = host.empty() ? nullptr : host.c_str();
    const char* port = service.empty() ? nullptr : service.c_str();
    int rc = ::getaddrinfo(node, port, &raw_hints, &found);
    if (rc != 0) {
        std::string what = "anyio::getaddrinfo: cannot resolve '" + host + "' (port '" + service + "')";
        if (rc == EAI_SYSTEM) throw std::system_error(errno, std::generic_category(), what);
        throw std::system_error(rc, gai_category(), what);
    }
    std::vector<AddrInfo> result;
    for (addrinfo* entry = found; entry != nullptr; entry = entry->ai_next) {
        if (entry->ai_addrlen > sizeof(sockaddr_storage)) continue;
        AddrInfo info;
        info.family = entry->ai_family;
        info.type = entry->ai_socktype;
        info.protocol = entry->ai_protocol;
        if (entry->ai_canonname != nullptr) info.canonical_name = entry->ai_canonname;
        std::memcpy(&info.storage, entry->ai_addr, entry->ai_addrlen);
        info.length = entry->ai_addrlen;
        bool duplicate = false;
        for (const AddrInfo& seen : result) {
            if (seen.family == info.family && seen.type == info.type &&
                seen.protocol == info.protocol && seen.length == info.length &&
                std::memcmp(&seen.storage, &info.storage, info.length) == 0) {
                duplicate = true;
                break;
            }
        }
        if (!duplicate) result.push_back(std::move(info));
    }
    ::freeaddrinfo(found);
    return result;
}

/// The loop's resolver state (anyio keeps no such thing; libuv#28 is why we do): a limiter of
/// 8 tokens, so that slow DNS occupies at most 8 worker threads and never the default
/// limiter's 40, and the substitute resolver a test may install.
class ResolverService final : public LoopService {
public:
    static constexpr std::int64_t tokens = 8;
    explicit ResolverService(EventLoop&) : limiter_(tokens) {}
    CapacityLimiter& limiter() noexcept { return limiter_; }
    Resolver& substitute() noexcept { return substitute_; }

private:
    CapacityLimiter limiter_;
    Resolver substitute_;
};

inline ResolverService& resolver_service(const char* what) {
    return running_loop(what).service<ResolverService>();
}

inline Task<std::vector<AddrInfo>> resolve(std::string host, std::string service, AddrInfoHints hints) {
    ResolverService& resolver = resolver_service("getaddrinfo");
    // The job is a copy (the substitute may be replaced while an abandoned lookup still runs).
    Resolver function = resolver.substitute() ? resolver.substitute() : Resolver(&blocking_getaddrinfo);
    to_thread::RunSyncOptions options{.limiter = &resolver.limiter(), .abandon_on_cancel = true};
    auto job = [function = std::move(function), host = std::move(host),
                service = std::move(service), hints]() { return function(host, service, hints); };
    // A named job, passed as an lvalue: no temporary with a destructor inside co_await (g++ 12).
    co_return co_await to_thread::run_sync(options, job);
}

}  // namespace detail

/// Resolves `host` and `service` (a port number or a service name) to addresses, with the
/// blocking getaddrinfo(3) on a worker thread, as anyio does. An empty host means "none"
/// (with AI_PASSIVE: the wildcard address). Duplicates are dropped.
///
/// The lookup takes a token from the loop's resolver limiter (8 tokens, see
/// getaddrinfo_limiter()), never from the default thread limiter, so slow DNS cannot starve
/// other blocking calls. It is abandoned on cancellation (abandon_on_cancel): a cancelled
/// lookup raises Cancelled at once, and its thread finishes in the background.
///
/// Throws std::system_error (category "getaddrinfo" for EAI_* codes, whose message says
/// why, e.g. "Name or service not known"), NoEventLoopError without a running loop. Allocates
/// its coroutine frame, the job and the result. Loop thread only. `host` and `service` are
/// copied before the call first suspends.
inline Task<std::vector<AddrInfo>> getaddrinfo(std::string_view host, std::string_view service,
                                               AddrInfoHints hints = {}) {
    detail::running_loop("getaddrinfo");  // NoEventLoopError at the call, not at co_await
    return detail::resolve(std::string(host), std::string(service), hints);
}
inline Task<std::vector<AddrInfo>> getaddrinfo(std::string_view host, std::uint16_t port,
                                               AddrInfoHints hints = {}) {
    detail::running_loop("getaddrinfo");
    return detail::resolve(std::string(host), std::to_string(port), hints);
}

/// The running loop's resolver limiter (8 tokens); tune it like any limiter.
inline CapacityLimiter& getaddrinfo_limiter() {
    return detail::resolver_service("getaddrinfo_limiter").limiter();
}

namespace lowlevel {

/// For tests (as anyio's tests replace getaddrinfo): while alive, getaddrinfo on the running
/// loop calls `resolver(host, service, hints)` instead of the real getaddrinfo(3), on a
/// worker thread under the same limiter, so it may block, throw, or return any address list
/// (for example a Happy Eyeballs list whose first entry never answers). connect_tcp and
/// create_tcp_listener resolve host names through it; numeric hosts are never looked up.
/// Restores the previous resolver when destroyed. Loop thread only; not nestable out of order.
class ScopedResolver {
public:
    explicit ScopedResolver(Resolver resolver)
        : service_(&detail::resolver_service("lowlevel::ScopedResolver")),
          previous_(std::exchange(service_->substitute(), std::move(resolver))) {}
    ScopedResolver(const ScopedResolver&) = delete;
    ScopedResolver& operator=(const ScopedResolver&) = delete;
    ~ScopedResolver() { service_->substitute() = std::move(previous_); }

private:
    detail::ResolverService* service_;
    Resolver previous_;
};

}  // namespace lowlevel

}  // namespace anyio
