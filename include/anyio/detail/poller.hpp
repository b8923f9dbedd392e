// epoll readiness for wait_readable / wait_writable, and the loop's way to sleep when it has
// descriptors to watch. Kept behind detail/ so kqueue can take its place on other systems.
// Loop-thread only.
#pragma once

#include <cerrno>
#include <cstdint>
#include <ctime>
#include <stdexcept>
#include <string>
#include <system_error>
#include <unordered_map>

#include <sys/epoll.h>
#include <unistd.h>

namespace anyio::detail {

/// Someone waiting for a descriptor to become ready; `ready` is called on the loop thread.
struct IoWaiter {
    using Ready = void (*)(IoWaiter* self);
    explicit IoWaiter(Ready ready) noexcept : ready_(ready) {}
    Ready ready_;
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
    ~Poller() { ::close(epoll_fd_); }
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

    /// Sleeps until an event or the timeout (nullptr: no timeout); calls ready waiters.
    /// Returns true when the wake-up descriptor fired.
    bool wait(const std::timespec* timeout) {
        epoll_event events[64];
        int count = wait_for_events(events, 64, timeout);
        bool woken = false;
        for (int i = 0; i < count; ++i) {
            if (events[i].data.u64 == wake_marker) {
                woken = true;
                continue;
            }
            int fd = static_cast<int>(events[i].data.u64);
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
        event.data.u64 = static_cast<std::uint64_t>(static_cast<std::uint32_t>(fd));
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
    std::size_t waiters_ = 0;
    bool have_pwait2_ = true;
};

}  // namespace anyio::detail
