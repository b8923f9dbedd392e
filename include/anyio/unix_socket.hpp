// anyio-cpp: connect_unix and create_unix_listener / UnixListener (UNIX stream sockets).
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "detail/socket.hpp"
#include "event.hpp"
#include "socket_listener.hpp"
#include "socket_stream.hpp"
#include "task.hpp"

namespace anyio {

class UnixListener;

namespace detail {

/// sockaddr_un for `path` (a leading '\0' makes it a Linux abstract address).
inline socklen_t unix_address(const std::string& path, sockaddr_un& address, const char* what) {
    address = sockaddr_un{};
    address.sun_family = AF_UNIX;
    const bool abstract = !path.empty() && path.front() == '\0';
    if (path.empty() || path.size() + (abstract ? 0 : 1) > sizeof address.sun_path) {
        throw std::system_error(std::make_error_code(std::errc::filename_too_long),
                                std::string("anyio::") + what + ": the socket path '" + path +
                                    "' is empty or longer than " +
                                    std::to_string(sizeof address.sun_path - 1) + " bytes");
    }
    std::memcpy(address.sun_path, path.data(), path.size());
    return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (abstract ? 0 : 1));
}

inline Task<SocketStream> connect_unix(std::string path) {
    sockaddr_un address{};
    socklen_t length = unix_address(path, address, "connect_unix");
    std::unique_ptr<SocketCore> core = open_stream_socket(AF_UNIX, "connect_unix");
    // A UNIX connect completes at once, or fails with EAGAIN while the listener's backlog is
    // full; the kernel gives no readiness for that, so retry after a short, growing sleep.
    auto backoff = std::chrono::milliseconds(1);
    for (;;) {
        int error = 0;
        try {
            co_await ConnectAwaiter{core.get(), reinterpret_cast<const sockaddr*>(&address), length};
            co_return SocketStream(std::move(core));
        } catch (const std::system_error& failure) {
            error = failure.code().value();
            if (error != EAGAIN) {
                throw std::system_error(failure.code(),
                                        "anyio::connect_unix: cannot connect to '" + path + "'");
            }
        }
        co_await sleep(backoff);
        backoff = std::min(backoff * 2, std::chrono::milliseconds(50));
    }
}

Task<UnixListener> create_unix_listener(std::string path, int backlog);

}  // namespace detail

/// A listener on one UNIX stream socket (see SocketListener for accept and serve).
/// Loop-thread only; movable. Closing it does not remove the socket file.
class UnixListener : public SocketListener {
public:
    UnixListener() noexcept = default;

    /// The path the listener is bound to.
    [[nodiscard]] std::string path() const { return local_addresses().front().path; }

private:
    friend Task<UnixListener> detail::create_unix_listener(std::string, int);
    explicit UnixListener(std::unique_ptr<detail::ListenerState> state) noexcept
        : SocketListener(std::move(state)) {}
};

namespace detail {

inline Task<UnixListener> create_unix_listener(std::string path, int backlog) {
    co_await checkpoint();
    sockaddr_un address{};
    socklen_t length = unix_address(path, address, "create_unix_listener");
    // A socket file left by an earlier run is removed first, as anyio does (anything else
    // at that path is left alone, and bind then fails with EADDRINUSE).
    struct stat status {};
    if (path.front() != '\0' && ::lstat(path.c_str(), &status) == 0 && S_ISSOCK(status.st_mode)) {
        ::unlink(path.c_str());
    }
    std::unique_ptr<SocketCore> core = open_stream_socket(AF_UNIX, "create_unix_listener");
    if (::bind(core->fd, reinterpret_cast<const sockaddr*>(&address), length) != 0 ||
        ::listen(core->fd, std::clamp(backlog, 0, 65536)) != 0) {
        throw std::system_error(errno, std::generic_category(),
                                "anyio::create_unix_listener: cannot listen on '" + path + "'");
    }
    auto state = std::make_unique<ListenerState>();
    state->sockets.push_back(std::move(core));
    co_return UnixListener(std::move(state));
}

}  // namespace detail

/// Connects to the UNIX stream socket at `path` (anyio's connect_unix). Throws
/// std::system_error naming the path when it fails (ENOENT, ECONNREFUSED...). A cancellation
/// point; `path` is copied at the call. Loop thread only.
inline Task<SocketStream> connect_unix(std::string_view path) {
    detail::running_loop("connect_unix");  // NoEventLoopError at the call, not at co_await
    return detail::connect_unix(std::string(path));
}

/// Listens on a UNIX stream socket at `path` (anyio's create_unix_listener), removing a stale
/// socket file there first. Throws std::system_error naming the path. `path` is copied at the
/// call. Loop thread only.
inline Task<UnixListener> create_unix_listener(std::string_view path, int backlog = 65536) {
    detail::running_loop("create_unix_listener");
    return detail::create_unix_listener(std::string(path), backlog);
}

}  // namespace anyio
