// anyio-cpp: SocketStream: a connected TCP or UNIX stream socket on the loop (receive,
// receive_into, send, send_eof, close). Made by tcp.hpp (connect_tcp, TcpListener::accept) and
// unix_socket.hpp; waits on the loop's poller through detail/socket.hpp. net.hpp includes the
// whole network layer.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "detail/socket.hpp"
#include "errors.hpp"
#include "socket_address.hpp"

namespace anyio {

class SocketStream;

namespace detail {

/// Scratch space for receive(): the data is read here, then copied into a string of the
/// exact size (one allocation of the right size rather than a 64 KiB one). One per loop
/// thread, allocated on first use; only touched on the loop thread, between two system calls.
inline constexpr std::size_t receive_scratch_size = 65536;
inline std::byte* receive_scratch() {
    thread_local std::unique_ptr<std::byte[]> scratch;
    if (!scratch) scratch = std::make_unique<std::byte[]>(receive_scratch_size);
    return scratch.get();
}

/// One recv(2) on a stream socket. A short read marks the handle drained (see
/// IoHandle::read_drained): until the poller reports it readable again, the next call answers
/// would_block without a system call. Safe with edge-triggered epoll: data, an end of file or
/// an error that arrives after the short read queues a new edge, which clears the mark before
/// the waiter retries; one that arrived before it was reported with EPOLLRDHUP/EPOLLERR
/// already, and then nothing is marked (IoHandle::read_hung_up).
inline OpStatus receive_some(IoHandle& handle, void* data, std::size_t size,
                             std::size_t& received) noexcept {
    if (handle.read_drained) return OpStatus::would_block;
    for (;;) {
        ssize_t n = ::recv(handle.fd, data, size, 0);
        if (n > 0) {
            received = static_cast<std::size_t>(n);
            handle.read_drained = received < size && !handle.read_hung_up;
            return OpStatus::done;
        }
        if (n == 0) return OpStatus::end_of_stream;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return OpStatus::would_block;
        return OpStatus::failed;
    }
}

/// co_await stream.receive_into(buffer) -> std::size_t.
class ReceiveIntoAwaiter final : public SocketAwaiter<ReceiveIntoAwaiter> {
public:
    static constexpr bool writes = false;
    static constexpr const char* name = "SocketStream::receive_into";

    ReceiveIntoAwaiter(SocketCore* core, std::span<std::byte> buffer) noexcept
        : SocketAwaiter(core), buffer_(buffer) {}

    bool prepare() const noexcept { return true; }
    OpStatus attempt() noexcept {
        OpStatus status = receive_some(*core_, buffer_.data(), buffer_.size(), received_);
        return status == OpStatus::failed ? fail(errno) : status;
    }
    std::size_t take() const noexcept { return received_; }

private:
    std::span<std::byte> buffer_;
    std::size_t received_ = 0;
};

/// co_await stream.receive(max_bytes) -> std::string.
class SocketReceiveAwaiter final : public SocketAwaiter<SocketReceiveAwaiter> {
public:
    static constexpr bool writes = false;
    static constexpr const char* name = "SocketStream::receive";

    SocketReceiveAwaiter(SocketCore* core, std::size_t max_bytes) noexcept
        : SocketAwaiter(core), max_bytes_(max_bytes) {}

    bool prepare() {
        scratch_ = receive_scratch();  // may allocate (once per thread): here, not in attempt()
        return true;
    }
    OpStatus attempt() noexcept {
        // Up to 64 KiB: read into the scratch space, then copy into a string of the exact
        // size. More: ask the kernel how much is queued, so that a large max_bytes does not
        // cost a large zero-filled string per call (nothing queued yet: a scratch-sized read
        // tells EAGAIN or EOF apart).
        std::size_t wanted = max_bytes_;
        if (wanted > receive_scratch_size) {
            int queued = 0;
            if (::ioctl(core_->fd, FIONREAD, &queued) != 0 || queued <= 0) queued = 0;
            wanted = std::min<std::size_t>(wanted, std::max<std::size_t>(static_cast<std::size_t>(queued),
                                                                         receive_scratch_size));
        }
        std::size_t received = 0;
        try {
            if (wanted <= receive_scratch_size) {
                OpStatus status = receive_some(*core_, scratch_, wanted, received);
                if (status == OpStatus::failed) return fail(errno);
                if (status == OpStatus::done) data_.assign(reinterpret_cast<const char*>(scratch_), received);
                return status;
            }
            data_.resize(wanted);
            OpStatus status = receive_some(*core_, data_.data(), wanted, received);
            if (status == OpStatus::failed) return fail(errno);
            data_.resize(status == OpStatus::done ? received : 0);  // shrinking never allocates
            return status;
        } catch (...) {  // std::bad_alloc from the string: the bytes stay in the socket
            return fail(std::current_exception());
        }
    }
    std::string take() { return std::move(data_); }

private:
    std::size_t max_bytes_;
    std::byte* scratch_ = nullptr;
    std::string data_;
};

/// co_await stream.send(bytes): returns once every byte is written.
class SocketSendAwaiter final : public SocketAwaiter<SocketSendAwaiter> {
public:
    static constexpr bool writes = true;
    static constexpr const char* name = "SocketStream::send";

    SocketSendAwaiter(SocketCore* core, std::span<const std::byte> data) noexcept
        : SocketAwaiter(core), data_(data) {}

    bool prepare() const {
        if (core_->eof_sent) {
            throw ClosedResourceError(
                "anyio::ClosedResourceError: SocketStream::send after send_eof(): this "
                "stream's sending side has been closed; send everything before send_eof()");
        }
        return true;
    }
    OpStatus attempt() noexcept {
        while (sent_ < data_.size()) {
            // MSG_NOSIGNAL: a peer that is gone gives EPIPE here, never SIGPIPE.
            ssize_t n = ::send(core_->fd, data_.data() + sent_, data_.size() - sent_, MSG_NOSIGNAL);
            if (n >= 0) {
                sent_ += static_cast<std::size_t>(n);
                continue;
            }
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return OpStatus::would_block;
            return fail(errno);
        }
        return OpStatus::done;
    }
    void take() const noexcept {}

private:
    std::span<const std::byte> data_;
    std::size_t sent_ = 0;
};

/// co_await stream.send_eof(): a cancellation point that never suspends.
class SocketSendEofAwaiter {
public:
    explicit SocketSendEofAwaiter(SocketCore* core) noexcept : core_(core) {}
    bool await_ready() const noexcept { return true; }
    void await_suspend(std::coroutine_handle<>) const noexcept {}
    void await_resume() const {
        constexpr const char* name = "SocketStream::send_eof";
        TaskState& task = CancelScope::current_task(name);
        if (core_ == nullptr) SocketCore::throw_closed(name);
        core_->check_usable(name);
        if (is_cancelled(task)) throw Cancelled{};
        if (core_->writing) throw BusyResourceError("writing to");
        if (core_->eof_sent) return;  // idempotent, as in trio
        // ENOTCONN: the peer already reset the connection; there is nothing left to close.
        if (::shutdown(core_->fd, SHUT_WR) != 0 && errno != ENOTCONN) {
            throw_stream_error(errno, name);
        }
        core_->eof_sent = true;
    }

private:
    SocketCore* core_;
};

}  // namespace detail

/// A connected stream socket, TCP or UNIX (anyio's SocketStream / UNIXSocketStream). Obtained
/// from connect_tcp, connect_unix, a listener's accept(), or from_fd().
///
/// - `co_await receive(max_bytes = 65536)` -> std::string of 1..max_bytes bytes;
///   `co_await receive_into(span)` -> how many bytes were written into the span (no copy).
///   Both throw EndOfStream once the peer has finished sending (and again on every later
///   call).
/// - `co_await send(bytes)` returns once every byte has been written (partial writes and a
///   full send buffer are handled inside). If it is cancelled, a prefix of the bytes may have
///   been sent: the stream is then best closed (trio's rule for send_all).
/// - `co_await send_eof()` shuts down the sending side (the peer reads EOF); later sends throw
///   ClosedResourceError. `close()` (also the destructor) closes the socket.
///
/// Errors: a reset by the peer (ECONNRESET, EPIPE...) is BrokenResourceError; SIGPIPE is never
/// raised (MSG_NOSIGNAL). After close(): ClosedResourceError, also for a task blocked on the
/// stream when another task closes it. A second task receiving (or sending) while one already
/// is: BusyResourceError. Other system errors: std::system_error.
///
/// Cancellation: every operation is a cancellation point (checked before the system call). An
/// operation that must wait is parked on the loop's epoll; cancelling it frees its slot at
/// once and leaves the stream usable. An operation that can complete at once does, without
/// suspending, except that every 32nd in a row yields to the loop once (fairness).
///
/// Cost: the stream owns one heap block (its epoll registration, made once for its life);
/// receive_into, send and send_eof allocate nothing; receive allocates its result string.
/// TCP_NODELAY is on by default, as in anyio.
///
/// Thread-safety: loop-thread only (other threads get std::logic_error). Movable; a moved-from
/// or default-constructed stream behaves as a closed one. Destroy it on its loop's thread, or
/// after the loop has finished.
class SocketStream {
public:
    SocketStream() noexcept = default;
    explicit SocketStream(std::unique_ptr<detail::SocketCore> core) noexcept : core_(std::move(core)) {}
    SocketStream(SocketStream&&) noexcept = default;
    SocketStream& operator=(SocketStream&& other) noexcept {
        if (this != &other) {
            core_.reset();
            core_ = std::move(other.core_);
        }
        return *this;
    }
    ~SocketStream() = default;  // the core closes the socket

    /// Takes ownership of a connected stream socket `fd` (TCP or UNIX; made non-blocking;
    /// TCP_NODELAY set for TCP). Loop thread only; on failure `fd` is closed and
    /// std::system_error thrown.
    static SocketStream from_fd(int fd) {
        sockaddr_storage address{};
        socklen_t length = sizeof address;
        if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
            int error = errno;
            ::close(fd);
            throw std::system_error(error, std::generic_category(),
                                    "anyio::SocketStream::from_fd: not a socket");
        }
        SocketStream stream(detail::SocketCore::adopt(fd, address.ss_family, "SocketStream::from_fd"));
        if (stream.is_tcp()) stream.set_nodelay(true);
        return stream;
    }

    /// Receives 1..max_bytes bytes (anyio's receive). EndOfStream at end of file. Throws
    /// std::invalid_argument for max_bytes == 0.
    [[nodiscard]] detail::SocketReceiveAwaiter receive(std::size_t max_bytes = 65536) {
        if (max_bytes == 0) {
            throw std::invalid_argument(
                "anyio::SocketStream::receive: max_bytes must be at least 1");
        }
        return detail::SocketReceiveAwaiter{core_.get(), max_bytes};
    }

    /// Receives into `buffer` without a copy; yields the number of bytes written (>= 1).
    /// EndOfStream at end of file. Throws std::invalid_argument for an empty buffer.
    [[nodiscard]] detail::ReceiveIntoAwaiter receive_into(std::span<std::byte> buffer) {
        if (buffer.empty()) {
            throw std::invalid_argument(
                "anyio::SocketStream::receive_into: the buffer is empty; pass at least one byte");
        }
        return detail::ReceiveIntoAwaiter{core_.get(), buffer};
    }

    /// Sends every byte of `data` (the bytes must stay alive until the co_await returns).
    [[nodiscard]] detail::SocketSendAwaiter send(std::span<const std::byte> data) noexcept {
        return detail::SocketSendAwaiter{core_.get(), data};
    }
    [[nodiscard]] detail::SocketSendAwaiter send(std::string_view data) noexcept {
        return detail::SocketSendAwaiter{core_.get(), std::as_bytes(std::span(data.data(), data.size()))};
    }

    /// Shuts down the sending side (the peer receives EOF); idempotent. A cancellation point;
    /// BusyResourceError while another task is sending.
    [[nodiscard]] detail::SocketSendEofAwaiter send_eof() noexcept { return detail::SocketSendEofAwaiter{core_.get()}; }

    /// Closes the socket. A task blocked on it resumes with ClosedResourceError. Idempotent.
    void close() {
        if (!core_) return;
        if (core_->poller != nullptr) core_->affinity.check("SocketStream::close");
        core_.reset();
    }

    [[nodiscard]] bool is_closed() const noexcept { return !core_; }

    /// The local / peer address (getsockname / getpeername).
    [[nodiscard]] SocketAddress local_address() const { return address(false); }
    [[nodiscard]] SocketAddress remote_address() const { return address(true); }

    /// The descriptor (-1 once closed). Do not close it, and do not wait on it with
    /// wait_readable: the stream owns its registration.
    [[nodiscard]] int native_handle() const noexcept { return core_ ? core_->fd : -1; }

    /// Turns TCP_NODELAY (Nagle's algorithm off) on or off; no effect on UNIX sockets.
    void set_nodelay(bool enabled) {
        require_open("SocketStream::set_nodelay");
        if (!is_tcp()) return;
        int value = enabled ? 1 : 0;
        if (::setsockopt(core_->fd, IPPROTO_TCP, TCP_NODELAY, &value, sizeof value) != 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "anyio::SocketStream::set_nodelay");
        }
    }

private:
    [[nodiscard]] bool is_tcp() const noexcept {
        return core_ && (core_->family == AF_INET || core_->family == AF_INET6);
    }
    void require_open(const char* what) const {
        if (!core_) detail::SocketCore::throw_closed(what);
        core_->affinity.check(what);
    }
    [[nodiscard]] SocketAddress address(bool peer) const {
        const char* what = peer ? "SocketStream::remote_address" : "SocketStream::local_address";
        require_open(what);
        sockaddr_storage storage{};
        socklen_t length = sizeof storage;
        auto* raw = reinterpret_cast<sockaddr*>(&storage);
        int rc = peer ? ::getpeername(core_->fd, raw, &length) : ::getsockname(core_->fd, raw, &length);
        if (rc != 0) {
            int error = errno;
            if (peer && error == ENOTCONN) detail::throw_stream_error(error, what);
            throw std::system_error(error, std::generic_category(), std::string("anyio::") + what);
        }
        return SocketAddress::from_sockaddr(raw, length);
    }

    std::unique_ptr<detail::SocketCore> core_;
};

}  // namespace anyio
