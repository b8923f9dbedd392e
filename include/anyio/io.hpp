// anyio-cpp: wait_readable / wait_writable: a task waits until any file descriptor is ready, on
// the loop's poller (detail/poller.hpp; level-triggered, one registration per wait). For
// descriptors owned by other libraries; the sockets of socket_stream.hpp use the poller's
// persistent edge-triggered registration instead.
#pragma once

#include <coroutine>

#include "cancel_scope.hpp"
#include "detail/poller.hpp"
#include "detail/wait.hpp"
#include "event_loop.hpp"

namespace anyio {
namespace detail {

class IoAwaiter final : public CancellableWait<IoAwaiter>, public IoWaiter {
public:
    IoAwaiter(int fd, bool writable) noexcept : IoWaiter(&on_ready), fd_(fd), writable_(writable) {}
    IoAwaiter(const IoAwaiter&) = delete;
    IoAwaiter& operator=(const IoAwaiter&) = delete;
    ~IoAwaiter() { abort(); }

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!begin(writable_ ? "wait_writable" : "wait_readable", handle)) return false;
        task_->loop_->poller().watch(fd_, writable_, this);  // throws on a bad descriptor
        watching_ = true;
        park();
        return true;
    }
    void await_resume() const { throw_if_cancelled(); }

    void abort() noexcept {
        if (!watching_) return;
        watching_ = false;
        task_->loop_->poller().unwatch(fd_, writable_);
    }

private:
    static void on_ready(IoWaiter* self) {
        auto* awaiter = static_cast<IoAwaiter*>(self);
        awaiter->watching_ = false;  // the poller already stopped watching
        awaiter->wake();
    }
    int fd_;
    bool writable_;
    bool watching_ = false;
};

}  // namespace detail

/// Suspends until `fd` is readable (or has an error/hang-up). A cancellation point. One task
/// at a time may wait per descriptor and direction (std::logic_error otherwise); a descriptor
/// epoll cannot watch (a regular file) gives std::system_error, and so does one that a
/// SocketStream, listener or signal receiver owns (they keep their own registration: use
/// their operations). The descriptor is watched only while a task waits (level-triggered),
/// so the caller may close it at any time it is not waiting. Allocates a map entry per wait.
/// Loop-thread only.
inline detail::IoAwaiter wait_readable(int fd) noexcept { return detail::IoAwaiter{fd, false}; }

/// Suspends until `fd` is writable. As wait_readable.
inline detail::IoAwaiter wait_writable(int fd) noexcept { return detail::IoAwaiter{fd, true}; }

}  // namespace anyio
