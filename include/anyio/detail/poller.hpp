// epoll readiness, and the loop's way to sleep when it has descriptors to watch. Kept behind
// detail/ so kqueue can take its place on other systems. Loop-thread only.
//
// Two kinds of interest share one epoll instance:
// - fd-keyed waits (wait_readable / wait_writable on any descriptor): level-triggered, the
//   descriptor is added when a task starts waiting and removed when it stops, so a caller
//   who owns the descriptor owes the poller nothing;
// - registered handles (sockets, signalfd receivers): added once when the object is
//   created and removed once before its descriptor is closed. See IoHandle for why these
//   are edge-triggered.
// The epoll user data tells them apart: a handle is a pointer (even, since IoHandle is
// aligned), an fd-keyed wait is (fd << 1) | 1, the loop's own eventfd is ~0.
#pragma once

#include <cerrno>
#include <cstdint>
#include <ctime>
#include <stdexcept>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>

#include <sys/epoll.h>
#include <unistd.h>

#include "intrusive_list.hpp"

namespace anyio::detail {

class Poller;
struct IoHandle;
struct IoHandleTag {};

/// Someone waiting for a descriptor to become ready; `ready` is called on the loop thread.
struct IoWaiter {
    using Ready = void (*)(IoWaiter* self);
    explicit IoWaiter(Ready ready) noexcept : ready_(ready) {}
    Ready ready_;
};

/// A task's pending operation on a registered handle (a receive, a send, an accept...).
/// `on_event` is called on the loop thread whenever the descriptor may have become ready in
/// the waiter's direction, and once more when the owner closes the handle. It retries its
/// system call; if that would still block it simply returns (and keeps waiting), otherwise
/// it detaches itself (Poller::clear_waiter) and wakes its task. It must not throw and must
/// not close or free any handle (the poller may be in the middle of a batch of events).
struct HandleWaiter {
    using OnEvent = void (*)(HandleWaiter* self, IoHandle& handle) noexcept;
    explicit HandleWaiter(OnEvent on_event) noexcept : on_event_(on_event) {}
    OnEvent on_event_;
};

/// A descriptor registered with the poller for its whole life: one EPOLL_CTL_ADD when the
/// object is created, one EPOLL_CTL_DEL before its descriptor is closed, none per operation.
///
/// Why edge-triggered (EPOLLET) rather than one-shot: with EPOLLONESHOT every wait needs an
/// EPOLL_CTL_MOD to re-arm, a system call per blocked operation; with EPOLLET nothing is
/// re-armed. Level-triggered would report a readable socket on every epoll_wait while no task
/// is reading it. Edge-triggering loses no wake-up here because every operation tries its
/// system call first and waits only after it returned EAGAIN: the kernel reports an edge for
/// every state change after that, and an edge queued before it merely causes one spurious
/// retry. Everything happens on the loop thread, so nothing can slip between the EAGAIN and
/// the waiter taking its slot. Its address is the epoll user data, so a handle never moves
/// while registered (it lives in a heap block owned by the movable public object).
///
/// Loop-thread only. At most one reader and one writer wait at a time (the owner enforces
/// it, with BusyResourceError). If the loop (its poller) is destroyed first, `poller` is
/// reset to nullptr and the owner just closes its descriptor.
struct alignas(8) IoHandle : ListHook<IoHandleTag> {
    IoHandle() = default;
    IoHandle(const IoHandle&) = delete;
    IoHandle& operator=(const IoHandle&) = delete;

    int fd = -1;
    /// A receive read less than it asked for, so the kernel's receive queue was empty right
    /// after it: the next receive waits for the next readable edge instead of calling recv
    /// just to get EAGAIN (Tokio does the same). Any readable event clears it, waiter or not.
    bool read_drained = false;
    /// The poller reported the read side hung up or in error (EPOLLRDHUP/HUP/ERR). From then
    /// on no read is marked drained: an end of file or an error waiting behind the last bytes
    /// raises no further edge, so only a recv can report it.
    bool read_hung_up = false;
    HandleWaiter* reader = nullptr;
    HandleWaiter* writer = nullptr;
    Poller* poller = nullptr;  // the poller it is registered with; nullptr: not registered
};

class Poller {
public:
    explicit Poller(int wake_fd) : epoll_fd_(::epoll_create1(EPOLL_CLOEXEC)) {
        if (epoll_fd_ < 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "anyio: epoll_create1() failed while creating an event loop");
        }
        epoll_event event{};
        event.events = EPOLLIN;
        event.data.u64 = wake_marker;
        if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd, &event) != 0) {
            int error = errno;
            ::close(epoll_fd_);
            throw std::system_error(error, std::generic_category(),
                                    "anyio: cannot watch the loop's eventfd");
        }
    }
    ~Poller() {
        // Handles still registered belong to objects that outlive the loop (a stream kept
        // after run() returned): they must not call into this poller any more.
        while (IoHandle* handle = handles_.pop_front()) handle->poller = nullptr;
        ::close(epoll_fd_);
    }
    Poller(const Poller&) = delete;
    Poller& operator=(const Poller&) = delete;

    [[nodiscard]] bool has_waiters() const noexcept { return waiters_ != 0; }

    /// Starts watching `fd` for `writable ? EPOLLOUT : EPOLLIN` on behalf of `waiter`.
    void watch(int fd, bool writable, IoWaiter* waiter) {
        Interest& interest = interests_[fd];
        IoWaiter*& slot = writable ? interest.writer : interest.reader;
        if (slot != nullptr) {
            throw std::logic_error("anyio: another task is already waiting for fd " +
                                   std::to_string(fd) + " to become " +
                                   (writable ? "writable" : "readable") +
                                   "; only one task may wait per direction");
        }
        slot = waiter;
        try {
            update(fd, interest);
        } catch (...) {
            slot = nullptr;
            if (interest.reader == nullptr && interest.writer == nullptr) interests_.erase(fd);
            throw;
        }
        ++waiters_;
    }

    /// Stops watching (after readiness was reported, or on cancellation). Never throws.
    void unwatch(int fd, bool writable) noexcept {
        auto found = interests_.find(fd);
        if (found == interests_.end()) return;
        IoWaiter*& slot = writable ? found->second.writer : found->second.reader;
        if (slot == nullptr) return;
        slot = nullptr;
        --waiters_;
        try {
            update(fd, found->second);
        } catch (...) {
            // The descriptor was closed under us; the kernel already forgot it.
        }
        if (found->second.reader == nullptr && found->second.writer == nullptr) {
            interests_.erase(found);
        }
    }

    /// Registers `handle` (whose `fd` is set) for its life, edge-triggered for input, output,
    /// peer hang-up and errors. Throws std::system_error if epoll refuses the descriptor.
    void add(IoHandle& handle) {
        epoll_event event{};
        event.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        event.data.ptr = &handle;
        if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, handle.fd, &event) != 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "anyio: cannot register fd " + std::to_string(handle.fd) +
                                        " with epoll");
        }
        handle.poller = this;
        handles_.push_back(handle);
    }

    /// Unregisters `handle`; call it before closing the descriptor (a descriptor duplicated
    /// into another process would otherwise stay in the epoll set). Its waiters must have been
    /// detached. Never throws.
    void remove(IoHandle& handle) noexcept {
        if (handle.poller != this) return;
        epoll_event unused{};
        ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, handle.fd, &unused);  // ENOENT etc.: nothing to undo
        handle.ListHook<IoHandleTag>::unlink();
        handle.poller = nullptr;
    }

    /// `waiter` now waits for `handle` to become readable (`writable`: writable).
    void set_waiter(IoHandle& handle, bool writable, HandleWaiter* waiter) noexcept {
        HandleWaiter*& slot = writable ? handle.writer : handle.reader;
        if (slot == nullptr) ++waiters_;
        slot = waiter;
    }
    /// The waiter of that direction stops waiting (done, cancelled or closed). Never throws.
    void clear_waiter(IoHandle& handle, bool writable) noexcept {
        HandleWaiter*& slot = writable ? handle.writer : handle.reader;
        if (slot != nullptr) --waiters_;
        slot = nullptr;
    }

    /// Sleeps until an event or the timeout (nullptr: no timeout); calls ready waiters.
    /// Returns true when the wake-up descriptor fired.
    ///
    /// A zero-timeout poll that comes right after a sleeping poll (no poll in between) is
    /// skipped: the loop polls without sleeping before each batch of ready tasks, and when it
    /// has just slept in epoll_wait that second system call finds nothing the first one did
    /// not (an event of the last microseconds is taken at the next turn). It halves the
    /// epoll_wait calls of a loop that wakes for I/O; two zero-timeout polls in a row always
    /// both run, so a busy loop still polls before every batch.
    bool wait(const std::timespec* timeout) {
        const bool zero_timeout = timeout != nullptr && timeout->tv_sec == 0 && timeout->tv_nsec == 0;
        if (zero_timeout && std::exchange(just_slept_, false)) return false;
        constexpr int capacity = 64;
        epoll_event events[capacity];
        int count = wait_for_events(events, capacity, timeout);
        // A full batch may have left events behind: then the next poll must not be skipped.
        just_slept_ = !zero_timeout && count < capacity;
        bool woken = false;
        for (int i = 0; i < count; ++i) {
            const std::uint64_t data = events[i].data.u64;
            if (data == wake_marker) {
                woken = true;
                continue;
            }
            if ((data & 1u) == 0) {
                dispatch(*static_cast<IoHandle*>(events[i].data.ptr), events[i].events);
                continue;
            }
            int fd = static_cast<int>(data >> 1);
            auto found = interests_.find(fd);
            if (found == interests_.end()) continue;
            const std::uint32_t flags = events[i].events;
            const bool error = (flags & (EPOLLERR | EPOLLHUP)) != 0;
            // Read both waiters before calling either: a callback may unwatch the fd.
            IoWaiter* reader = (flags & EPOLLIN) != 0 || error ? found->second.reader : nullptr;
            IoWaiter* writer = (flags & EPOLLOUT) != 0 || error ? found->second.writer : nullptr;
            if (reader != nullptr) {
                unwatch(fd, false);
                reader->ready_(reader);
            }
            if (writer != nullptr) {
                unwatch(fd, true);
                writer->ready_(writer);
            }
        }
        return woken;
    }

private:
    static void dispatch(IoHandle& handle, std::uint32_t flags) noexcept {
        const bool error = (flags & (EPOLLERR | EPOLLHUP)) != 0;
        if ((flags & (EPOLLIN | EPOLLRDHUP)) != 0 || error) handle.read_drained = false;
        if ((flags & EPOLLRDHUP) != 0 || error) handle.read_hung_up = true;
        // A waiter's callback only detaches itself and schedules its task: the handle stays
        // alive, so the writer slot can be read after the reader ran.
        if (handle.reader != nullptr && ((flags & (EPOLLIN | EPOLLRDHUP)) != 0 || error)) {
            handle.reader->on_event_(handle.reader, handle);
        }
        if (handle.writer != nullptr && ((flags & EPOLLOUT) != 0 || error)) {
            handle.writer->on_event_(handle.writer, handle);
        }
    }

    struct Interest {
        IoWaiter* reader = nullptr;
        IoWaiter* writer = nullptr;
        bool registered = false;
    };
    static constexpr std::uint64_t wake_marker = ~std::uint64_t{0};

    void update(int fd, Interest& interest) {
        std::uint32_t wanted = (interest.reader != nullptr ? EPOLLIN : 0u) |
                               (interest.writer != nullptr ? EPOLLOUT : 0u);
        epoll_event event{};
        event.events = wanted;
        event.data.u64 = (static_cast<std::uint64_t>(static_cast<std::uint32_t>(fd)) << 1) | 1u;
        int op = wanted == 0 ? EPOLL_CTL_DEL : interest.registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        if (::epoll_ctl(epoll_fd_, op, fd, &event) != 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "anyio: cannot watch fd " + std::to_string(fd) +
                                        " with epoll (is it open, and a socket, pipe or "
                                        "similar rather than a regular file?)");
        }
        interest.registered = wanted != 0;
    }

    int wait_for_events(epoll_event* events, int capacity, const std::timespec* timeout) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
        if (have_pwait2_) {
            int count = ::epoll_pwait2(epoll_fd_, events, capacity, timeout, nullptr);
            if (count >= 0) return count;
            if (errno == EINTR) return 0;
            if (errno != ENOSYS) return 0;
            have_pwait2_ = false;  // an older kernel: fall back to millisecond timeouts
        }
#endif
        int milliseconds = -1;
        if (timeout != nullptr) {
            // Round up so a timer is never reported before it is due.
            long long ms = static_cast<long long>(timeout->tv_sec) * 1000 +
                           (timeout->tv_nsec + 999'999) / 1'000'000;
            milliseconds = ms > 2'000'000'000 ? 2'000'000'000 : static_cast<int>(ms);
        }
        int count = ::epoll_wait(epoll_fd_, events, capacity, milliseconds);
        return count < 0 ? 0 : count;
    }

    int epoll_fd_;
    std::unordered_map<int, Interest> interests_;
    IntrusiveList<IoHandle, IoHandleTag> handles_;
    std::size_t waiters_ = 0;
    bool just_slept_ = false;  // the last poll slept (or could have): see wait()
    bool have_pwait2_ = true;
};

}  // namespace anyio::detail
