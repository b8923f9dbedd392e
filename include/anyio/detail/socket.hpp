// Sockets on the loop: SocketCore, the heap block behind a SocketStream or a listener socket,
// and the awaiter shape every socket operation shares. This internal stands on public headers
// (event_loop.hpp, cancel_scope.hpp, errors.hpp, socket_address.hpp); it is the implementation
// of socket_stream.hpp, socket_listener.hpp, tcp.hpp, unix_socket.hpp and signals.hpp.
//
// How one operation runs (receive, send, connect, accept):
//   await_ready:   the cancellation check, the busy check, then the system call at once (the
//                  fast path): done -> no suspension at all;
//   EAGAIN:        the awaiter takes the socket's reader or writer slot in the poller and the
//                  task parks (cancellable: abort() frees the slot in O(1));
//   readiness:     the poller calls the awaiter, which retries the system call right there,
//                  on the loop thread, and wakes the task only when it has an outcome;
//   close():       the owner calls a parked awaiter once more; it sees `closed` and wakes
//                  its task with ClosedResourceError.
// Nothing is allocated: the awaiter lives in the awaiting frame and the socket's epoll
// registration is made once, when the SocketCore is created.
#pragma once

#include <cerrno>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../cancel_scope.hpp"
#include "../errors.hpp"
#include "../event_loop.hpp"
#include "../socket_address.hpp"
#include "loop_thread.hpp"
#include "poller.hpp"
#include "wait.hpp"

namespace anyio::detail {

/// One socket (or signalfd) descriptor, registered with its loop's poller for its whole life.
/// Lives on the heap so that its address, the epoll user data, stays put while the public
/// object that owns it moves. Loop-thread only.
struct SocketCore : IoHandle {
    SocketCore() = default;
    SocketCore(const SocketCore&) = delete;
    SocketCore& operator=(const SocketCore&) = delete;
    ~SocketCore() { close(); }

    /// Takes ownership of `fd` (made non-blocking if it is not) and registers it with the
    /// running loop's poller. On failure `fd` is closed and the error thrown.
    static std::unique_ptr<SocketCore> adopt(int fd, int family, const char* what) {
        struct Closer {
            int fd;
            ~Closer() {
                if (fd >= 0) ::close(fd);
            }
        } guard{fd};
        EventLoop& loop = running_loop(what);
        int flags = ::fcntl(fd, F_GETFL);
        if (flags < 0 || ((flags & O_NONBLOCK) == 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
            throw std::system_error(errno, std::generic_category(),
                                    std::string("anyio::") + what +
                                        ": cannot make the socket non-blocking");
        }
        auto core = std::make_unique<SocketCore>();
        core->family = family;
        core->fd = fd;
        core->affinity.check(what);  // binds it to this loop
        loop.poller().add(*core);
        guard.fd = -1;
        return core;
    }

    /// Closes the descriptor: a task parked on it resumes with ClosedResourceError, the epoll
    /// registration is removed before close(2). Idempotent; never throws.
    void close() noexcept {
        if (fd < 0) return;
        closed = true;
        // A waiter seeing `closed` detaches itself and wakes its task; it does not touch this
        // block afterwards, so the block may be freed before that task runs.
        if (reader != nullptr) reader->on_event_(reader, *this);
        if (writer != nullptr) writer->on_event_(writer, *this);
        if (poller != nullptr) poller->remove(*this);
        ::close(fd);
        fd = -1;
    }

    /// Throws unless operations may start: ClosedResourceError after close(), RunFinishedError
    /// when the loop it was registered with has finished, std::logic_error on another thread.
    void check_usable(const char* what) const {
        if (closed || fd < 0) throw_closed(what);
        affinity.check(what);
        if (poller == nullptr) {
            throw RunFinishedError(std::string("anyio::") + what +
                                   ": the event loop this socket was opened on has finished; "
                                   "a socket is used only on the loop that opened it");
        }
    }

    [[noreturn]] static void throw_closed(const char* what) {
        throw ClosedResourceError(std::string("anyio::ClosedResourceError: ") + what +
                                  ": this socket has been closed; do not use it after close()");
    }

    LoopAffinity affinity;
    int family = AF_UNSPEC;
    bool closed = false;
    bool eof_sent = false;  // send_eof() was called: later sends raise ClosedResourceError
    bool reading = false;   // a receive or accept is in progress (one at a time)
    bool writing = false;   // a send, connect or send_eof is in progress (one at a time)
    // Operations in a row that completed without waiting, per direction (see SocketAwaiter).
    std::uint8_t read_streak = 0;
    std::uint8_t write_streak = 0;
};

/// How one try of a system call ended.
enum class OpStatus : unsigned char { done, would_block, end_of_stream, failed, closed };

/// After this many operations in a row on one socket direction that completed at once, the
/// next one yields to the loop (like Tokio's cooperative budget): a peer that keeps a socket
/// always ready cannot starve the other tasks, timers and I/O of the loop, while a ready
/// operation costs no loop round trip in the common case.
inline constexpr std::uint8_t ready_streak_limit = 32;

/// True for the errno values that mean the connection itself is gone (BrokenResourceError
/// rather than std::system_error).
inline bool is_broken_connection(int error) noexcept {
    switch (error) {
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED:
    case ETIMEDOUT:
    case ENETRESET:
    case ENETDOWN:
    case ENETUNREACH:
    case EHOSTDOWN:
    case EHOSTUNREACH:
    case ENOTCONN:
    case EPROTO:
    case EIO:
        return true;
    default:
        return false;
    }
}

/// The exception for a failed stream operation: BrokenResourceError when the connection is
/// gone (reset by the peer, EPIPE...), std::system_error otherwise.
[[noreturn]] inline void throw_stream_error(int error, const char* what) {
    const std::string reason = std::generic_category().message(error);
    if (is_broken_connection(error)) {
        throw BrokenResourceError(std::string("anyio::BrokenResourceError: ") + what +
                                  " failed: " + reason +
                                  "; the connection is gone, close this stream");
    }
    throw std::system_error(error, std::generic_category(), std::string("anyio::") + what);
}

/// CRTP base of an operation on one SocketCore. `Derived` provides:
///   static constexpr bool writes;              which slot it waits in (and which busy flag)
///   static constexpr const char* name;          for messages ("SocketStream::receive")
///   bool prepare();                             before the first try (may throw; false: the
///                                               outcome is already set, do not try)
///   OpStatus attempt() noexcept;                one try of the system call
///   auto take();                                the value once done
/// The awaiter is not movable: it is the poller's waiter node while parked.
template <class Derived>
class SocketAwaiter : public CancellableWait<Derived>, public HandleWaiter {
public:
    explicit SocketAwaiter(SocketCore* core) noexcept : HandleWaiter(&on_event), core_(core) {}
    SocketAwaiter(const SocketAwaiter&) = delete;
    SocketAwaiter& operator=(const SocketAwaiter&) = delete;
    ~SocketAwaiter() {
        if (parked_) detach();  // the frame is destroyed while parked (loop shutdown)
    }

    bool await_ready() {
        this->task_ = &CancelScope::current_task(Derived::name);
        if (core_ == nullptr) SocketCore::throw_closed(Derived::name);
        core_->check_usable(Derived::name);
        if (is_cancelled(*this->task_)) {
            this->cancelled_ = true;  // a cancellation point, even when the socket is ready
            return true;
        }
        if (busy()) {
            throw BusyResourceError(Derived::writes ? "writing to" : "reading from");
        }
        if (!derived().prepare()) return true;
        OpStatus status = derived().attempt();
        if (status == OpStatus::would_block) {
            busy() = true;
            streak() = 0;
            return false;
        }
        status_ = status;
        if (++streak() < ready_streak_limit) return true;
        streak() = 0;
        yield_ = true;  // the outcome is kept; the task only lets the loop run once
        return false;
    }

    void await_suspend(std::coroutine_handle<> handle) noexcept {
        this->handle_ = handle;
        if (yield_) {
            this->task_->loop_->schedule_task(*this->task_, handle);
            return;
        }
        core_->poller->set_waiter(*core_, Derived::writes, this);
        parked_ = true;
        this->park();
    }

    /// Rethrows how the operation ended, or yields its value.
    decltype(auto) await_resume() {
        this->throw_if_cancelled();
        switch (status_) {
        case OpStatus::done:
            break;
        case OpStatus::closed:
            SocketCore::throw_closed(Derived::name);
        case OpStatus::end_of_stream:
            throw EndOfStream();
        case OpStatus::failed:
            if (exception_) std::rethrow_exception(exception_);
            derived().throw_error(error_);
        case OpStatus::would_block:
            break;
        }
        return derived().take();
    }

    /// Cancellation while parked: give the slot back (O(1)); the socket stays usable.
    void abort() noexcept { detach(); }

    /// The default error mapping (BrokenResourceError / std::system_error).
    [[noreturn]] void throw_error(int error) const { throw_stream_error(error, Derived::name); }

protected:
    Derived& derived() noexcept { return static_cast<Derived&>(*this); }
    bool& busy() noexcept { return Derived::writes ? core_->writing : core_->reading; }
    std::uint8_t& streak() noexcept { return Derived::writes ? core_->write_streak : core_->read_streak; }

    /// For attempt(): a failure whose cause is an errno value / an exception.
    OpStatus fail(int error) noexcept {
        error_ = error;
        return OpStatus::failed;
    }
    OpStatus fail(std::exception_ptr error) noexcept {
        exception_ = std::move(error);
        return OpStatus::failed;
    }

    SocketCore* core_;

private:
    static void on_event(HandleWaiter* waiter, IoHandle&) noexcept {
        auto* self = static_cast<Derived*>(static_cast<SocketAwaiter*>(waiter));
        OpStatus status = self->core_->closed ? OpStatus::closed : self->derived().attempt();
        if (status == OpStatus::would_block) return;  // a stale edge: keep waiting
        self->status_ = status;
        self->detach();  // last touch of the core: after close() it may be freed
        self->wake();
    }

    void detach() noexcept {
        if (!parked_) return;
        parked_ = false;
        busy() = false;
        if (core_->poller != nullptr) core_->poller->clear_waiter(*core_, Derived::writes);
    }

    std::exception_ptr exception_;
    int error_ = 0;
    OpStatus status_ = OpStatus::done;
    bool parked_ = false;
    bool yield_ = false;
};

/// co_await ConnectAwaiter{core, address, length}: a non-blocking connect(2). Waits in the
/// writer slot: the kernel reports the end of the handshake as writability (or an error).
/// Throws std::system_error naming only the errno; the callers add which address it was.
class ConnectAwaiter final : public SocketAwaiter<ConnectAwaiter> {
public:
    static constexpr bool writes = true;
    static constexpr const char* name = "connect";

    ConnectAwaiter(SocketCore* core, const sockaddr* address, socklen_t length) noexcept
        : SocketAwaiter(core), address_(address), length_(length) {}

    bool prepare() const noexcept { return true; }
    OpStatus attempt() noexcept {
        if (!started_) {
            started_ = true;
            if (::connect(core_->fd, address_, length_) == 0) return OpStatus::done;
            // EINTR: the handshake goes on in the background, as after EINPROGRESS.
            if (errno == EINPROGRESS || errno == EINTR) return OpStatus::would_block;
            return fail(errno);
        }
        int error = 0;
        socklen_t size = sizeof error;
        if (::getsockopt(core_->fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0) return fail(errno);
        if (error != 0) return fail(error);
        sockaddr_storage peer{};
        socklen_t peer_length = sizeof peer;
        if (::getpeername(core_->fd, reinterpret_cast<sockaddr*>(&peer), &peer_length) == 0) {
            return OpStatus::done;
        }
        return errno == ENOTCONN ? OpStatus::would_block : fail(errno);  // ENOTCONN: a stale edge
    }
    void take() const noexcept {}
    [[noreturn]] void throw_error(int error) const {
        throw std::system_error(error, std::generic_category(), "connect");
    }

private:
    const sockaddr* address_;
    socklen_t length_;
    bool started_ = false;
};

/// A new non-blocking stream socket of `family`, registered with the running loop.
inline std::unique_ptr<SocketCore> open_stream_socket(int family, const char* what) {
    int fd = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        throw std::system_error(errno, std::generic_category(),
                                std::string("anyio::") + what + ": socket() failed");
    }
    return SocketCore::adopt(fd, family, what);
}

}  // namespace anyio::detail
