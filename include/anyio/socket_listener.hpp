// anyio-cpp: SocketListener, accept() and serve() over one or more listening sockets (the
// common part of TcpListener and UnixListener).
#pragma once

#include <cerrno>
#include <chrono>
#include <concepts>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/socket.h>
#include <unistd.h>

#include "detail/socket.hpp"
#include "event.hpp"
#include "socket_address.hpp"
#include "socket_stream.hpp"
#include "task.hpp"
#include "task_group.hpp"

namespace anyio {

/// How long serve() waits before accepting again after accept4 failed for lack of resources
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM), as trio's serve_listeners does.
inline constexpr std::chrono::milliseconds accept_retry_delay{100};

namespace detail {

/// The listening sockets of one listener and what accept() shares between calls. A heap
/// block, so a listener may move while a task is accepting on it. Loop-thread only.
struct ListenerState {
    std::vector<std::unique_ptr<SocketCore>> sockets;
    std::function<void(std::error_code)> on_accept_error;  // empty: one line on stderr
    std::uint64_t accept_errors = 0;
    std::size_t next = 0;  // the socket tried first by the next accept (round robin)
    std::uint8_t ready_streak = 0;
    bool accepting = false;
    bool closed = false;

    void close() noexcept {
        closed = true;
        // The first socket with the parked acceptor wakes it (with ClosedResourceError); the
        // acceptor detaches itself from the others at the same time.
        for (auto& socket : sockets) socket->close();
    }
};

/// Errors of accept4 that concern the pending connection rather than the listener (it was
/// reset, or its route vanished, before we took it): Linux reports them through accept, and
/// the right thing is to take the next connection (as libuv and nginx do).
inline bool is_transient_accept_error(int error) noexcept {
    switch (error) {
    case ECONNABORTED:
    case EPROTO:
    case ENETDOWN:
    case ENOPROTOOPT:
    case EHOSTDOWN:
    case ENONET:
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
    case EPERM:  // refused by a firewall rule
        return true;
    default:
        return false;
    }
}

/// accept4 failed for lack of descriptors or memory: the listener is fine, the process or
/// the system is out of resources for a while (trio's ACCEPT_CAPACITY_ERRNOS).
inline bool is_accept_capacity_error(int error) noexcept {
    return error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM;
}

/// co_await listener.accept() -> SocketStream. Parks on every listening socket of the
/// listener at once (the same node sits in each socket's reader slot).
class AcceptAwaiter final : public CancellableWait<AcceptAwaiter>, public HandleWaiter {
public:
    static constexpr const char* name = "SocketListener::accept";

    /// With `capacity_error`, a lack of resources is not thrown: its errno is stored there
    /// and an empty stream returned (serve() backs off without an exception).
    explicit AcceptAwaiter(ListenerState* state, int* capacity_error = nullptr) noexcept
        : HandleWaiter(&on_event), state_(state), capacity_error_(capacity_error) {}
    AcceptAwaiter(const AcceptAwaiter&) = delete;
    AcceptAwaiter& operator=(const AcceptAwaiter&) = delete;
    ~AcceptAwaiter() {
        if (parked_) detach();
        if (accepted_fd_ >= 0) ::close(accepted_fd_);  // taken but never handed over
    }

    bool await_ready() {
        task_ = &CancelScope::current_task(name);
        if (state_ == nullptr || state_->closed || state_->sockets.empty()) {
            SocketCore::throw_closed(name);
        }
        state_->sockets.front()->check_usable(name);
        if (is_cancelled(*task_)) {
            cancelled_ = true;
            return true;
        }
        if (state_->accepting) throw BusyResourceError("accepting connections from");
        const std::size_t count = state_->sockets.size();
        for (std::size_t i = 0; i < count; ++i) {
            SocketCore& socket = *state_->sockets[(state_->next + i) % count];
            OpStatus status = attempt(socket);
            if (status == OpStatus::would_block) continue;
            state_->next = (state_->next + i + 1) % count;
            status_ = status;
            if (++state_->ready_streak < ready_streak_limit) return true;
            state_->ready_streak = 0;
            yield_ = true;  // a flood of connections must not starve the loop
            return false;
        }
        state_->accepting = true;
        state_->ready_streak = 0;
        return false;
    }

    void await_suspend(std::coroutine_handle<> handle) noexcept {
        handle_ = handle;
        if (yield_) {
            task_->loop_->schedule_task(*task_, handle);
            return;
        }
        for (auto& socket : state_->sockets) socket->poller->set_waiter(*socket, false, this);
        parked_ = true;
        park();
    }

    SocketStream await_resume() {
        throw_if_cancelled();
        if (status_ == OpStatus::closed) SocketCore::throw_closed(name);
        if (status_ == OpStatus::failed) {
            if (capacity_error_ != nullptr && is_accept_capacity_error(error_)) {
                *capacity_error_ = error_;
                return SocketStream{};
            }
            throw std::system_error(error_, std::generic_category(),
                                    "anyio::SocketListener::accept: accept4() failed");
        }
        int fd = std::exchange(accepted_fd_, -1);
        SocketStream stream(SocketCore::adopt(fd, family_, name));
        if (family_ == AF_INET || family_ == AF_INET6) stream.set_nodelay(true);
        return stream;
    }

    void abort() noexcept { detach(); }

private:
    OpStatus attempt(SocketCore& socket) noexcept {
        for (;;) {
            int fd = ::accept4(socket.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd >= 0) {
                accepted_fd_ = fd;
                family_ = socket.family;
                return OpStatus::done;
            }
            if (errno == EINTR || is_transient_accept_error(errno)) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return OpStatus::would_block;
            error_ = errno;
            return OpStatus::failed;
        }
    }

    static void on_event(HandleWaiter* waiter, IoHandle& handle) noexcept {
        auto* self = static_cast<AcceptAwaiter*>(waiter);
        auto& socket = static_cast<SocketCore&>(handle);
        OpStatus status = socket.closed ? OpStatus::closed : self->attempt(socket);
        if (status == OpStatus::would_block) return;
        self->status_ = status;
        self->detach();
        self->wake();
    }

    void detach() noexcept {
        if (!parked_) return;
        parked_ = false;
        state_->accepting = false;
        for (auto& socket : state_->sockets) {
            if (socket->poller != nullptr) socket->poller->clear_waiter(*socket, false);
        }
    }

    ListenerState* state_;
    int* capacity_error_;
    int accepted_fd_ = -1;
    int family_ = AF_UNSPEC;
    int error_ = 0;
    OpStatus status_ = OpStatus::done;
    bool parked_ = false;
    bool yield_ = false;
};

}  // namespace detail

/// A handler for serve(): called with each accepted stream, returns the task that serves it.
template <class Handler>
concept connection_handler = std::copy_constructible<std::decay_t<Handler>> &&
                             returns_task<std::decay_t<Handler>, SocketStream>;

/// One or more listening sockets served as one (anyio's SocketListener, and its MultiListener
/// when a host resolves to several address families): accept() takes the next connection from
/// whichever socket has one.
///
/// - `co_await accept()` -> SocketStream. A second task accepting at the same time:
///   BusyResourceError. Errors of a pending connection (it was reset before we took it) are
///   skipped. Lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) throws std::system_error and
///   leaves the listener usable.
/// - `co_await serve(handler[, task_group])` accepts for ever, running `handler(stream)` for
///   each connection as a child task of a task group of its own (or of the given one). It ends
///   only by cancellation, or when a handler fails (task group rules). On a lack of resources
///   it does not fail: it counts the error (accept_errors()), reports it through the handler
///   set with on_accept_error() (default: one line on stderr), waits accept_retry_delay
///   (100 ms) so that descriptors can come free, and accepts again.
/// - `close()` (also the destructor) closes every socket; a task blocked in accept() resumes
///   with ClosedResourceError.
///
/// Loop-thread only. Owns one heap block, plus one per listening socket; accept() allocates
/// nothing beyond the new stream's own block. Every accept is a cancellation point; a cancelled
/// accept takes no connection.
class SocketListener {
public:
    SocketListener() noexcept = default;
    SocketListener(SocketListener&&) noexcept = default;
    SocketListener& operator=(SocketListener&& other) noexcept {
        if (this != &other) {
            state_.reset();
            state_ = std::move(other.state_);
        }
        return *this;
    }
    ~SocketListener() {
        if (state_) state_->close();
    }

    /// Waits for and accepts the next connection.
    [[nodiscard]] detail::AcceptAwaiter accept() noexcept { return detail::AcceptAwaiter{state_.get()}; }

    /// Serves connections in a task group of its own until cancelled.
    ///
    /// g++ 12: write a handler lambda whose captures have destructors (a std::string, a
    /// shared_ptr) as a named variable first, then `co_await listener.serve(handler)`.
    template <class Handler>
        requires connection_handler<Handler>
    Task<void> serve(Handler handler) {
        co_await task_group([this, &handler](TaskGroup& group) -> Task<void> {
            co_await serve_loop(handler, group);
        });
    }

    /// Serves connections as children of `group` (the caller keeps waiting here).
    template <class Handler>
        requires connection_handler<Handler>
    Task<void> serve(Handler handler, TaskGroup& group) {
        co_await serve_loop(handler, group);
    }

    /// Closes every listening socket (idempotent).
    void close() {
        if (!state_) return;
        if (!state_->sockets.empty() && state_->sockets.front()->poller != nullptr) {
            state_->sockets.front()->affinity.check("SocketListener::close");
        }
        state_->close();
    }

    [[nodiscard]] bool is_closed() const noexcept { return !state_ || state_->closed; }

    /// The address of each listening socket.
    [[nodiscard]] std::vector<SocketAddress> local_addresses() const {
        std::vector<SocketAddress> result;
        if (is_closed()) detail::SocketCore::throw_closed("SocketListener::local_addresses");
        for (const auto& socket : state_->sockets) {
            sockaddr_storage storage{};
            socklen_t length = sizeof storage;
            if (::getsockname(socket->fd, reinterpret_cast<sockaddr*>(&storage), &length) != 0) {
                throw std::system_error(errno, std::generic_category(),
                                        "anyio::SocketListener::local_addresses");
            }
            result.push_back(SocketAddress::from_sockaddr(reinterpret_cast<sockaddr*>(&storage), length));
        }
        return result;
    }

    /// The listening descriptors (owned by the listener).
    [[nodiscard]] std::vector<int> native_handles() const {
        std::vector<int> result;
        if (state_) {
            for (const auto& socket : state_->sockets) result.push_back(socket->fd);
        }
        return result;
    }

    /// How many times serve() backed off because accept4 lacked resources (EMFILE...).
    [[nodiscard]] std::uint64_t accept_errors() const noexcept { return state_ ? state_->accept_errors : 0; }

    /// Replaces how serve() reports such an error (default: one line on stderr). Called on the
    /// loop thread with the errno (generic category) before each back-off; what it throws ends
    /// serve(). It runs while the process may have no descriptor to spare.
    void on_accept_error(std::function<void(std::error_code)> handler) {
        if (is_closed()) detail::SocketCore::throw_closed("SocketListener::on_accept_error");
        state_->on_accept_error = std::move(handler);
    }

protected:
    explicit SocketListener(std::unique_ptr<detail::ListenerState> state) noexcept
        : state_(std::move(state)) {}

    std::unique_ptr<detail::ListenerState> state_;

private:
    // Takes the handler by reference: the serve() frame owns it (no copy inside a co_await).
    template <class Handler>
    Task<void> serve_loop(Handler& handler, TaskGroup& group) {
        for (;;) {
            int capacity_error = 0;
            SocketStream client = co_await detail::AcceptAwaiter{state_.get(), &capacity_error};
            if (capacity_error != 0) {
                // trio's serve_listeners: out of descriptors or memory is a passing state of
                // the process, not a broken listener; give the handlers time to close some.
                report_accept_error(std::error_code(capacity_error, std::generic_category()));
                co_await sleep(accept_retry_delay);
                continue;
            }
            group.start_soon(handler, std::move(client));
        }
    }

    void report_accept_error(std::error_code error) {
        ++state_->accept_errors;
        if (state_->on_accept_error) {
            state_->on_accept_error(error);
            return;
        }
        std::string where;
        try {
            for (const auto& address : local_addresses()) where += " " + address.to_string();
        } catch (...) {
        }
        std::fprintf(stderr, "anyio: accept on%s failed: %s; retrying in %lld ms\n", where.c_str(),
                     error.message().c_str(), static_cast<long long>(accept_retry_delay.count()));
    }
};

}  // namespace anyio
