// anyio-cpp: open_signal_receiver / SignalReceiver: POSIX signals delivered to a task through a
// signalfd on the loop's poller. The worker threads of to_thread.hpp block every asynchronous
// signal (detail/signal_mask.hpp), so only the receiver sees them.
#pragma once

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "detail/socket.hpp"
#include "errors.hpp"
#include "event_loop.hpp"

namespace anyio {

namespace detail {

inline constexpr int signal_count = NSIG;

/// Process-wide bookkeeping: dispositions are per process, so each signal has at most one
/// live receiver. Guarded by `signal_registry_mutex`.
inline std::mutex signal_registry_mutex;
inline bool signal_taken[signal_count] = {};

/// The thread id of the loop owning each signal (0: none), read by the forwarding handler.
/// Lock-free atomics, so the handler may read them (async-signal-safe).
inline std::atomic<pid_t> signal_forward_to[signal_count] = {};

/// How many signals the forwarding handler passed on: a signal only reaches it when it was
/// delivered to a thread that does not block it (worker threads block every one; a
/// non-zero count in a test means one of the library's threads took a signal).
inline std::atomic<std::uint64_t> signals_forwarded{0};

inline pid_t current_thread_id() noexcept { return static_cast<pid_t>(::syscall(SYS_gettid)); }

/// The disposition while a receiver lives. A signal sent to the process is taken by a thread
/// that does not block it: the loop thread blocks it (signalfd reads it from there), worker
/// threads block everything, but another thread of the application (the main thread, when
/// the loop runs elsewhere) may not. That thread lands here, and the signal is re-sent to
/// the loop thread, where it waits, blocked, for the signalfd. Installing a handler (rather
/// than leaving SIG_IGN or SIG_DFL) also keeps the kernel from discarding a signal whose
/// disposition was SIG_IGN before it can be queued.
inline void forward_signal(int signal_number) noexcept {
    const int saved_errno = errno;
    if (signal_number > 0 && signal_number < signal_count) {
        // relaxed: the value was stored before sigaction() installed this handler, and the
        // kernel orders that system call before any delivery to it.
        const pid_t target = signal_forward_to[signal_number].load(std::memory_order_relaxed);
        if (target != 0 && target != current_thread_id()) {
            ::syscall(SYS_tgkill, ::getpid(), target, signal_number);
            // relaxed: a statistic, read by tests after the fact.
            signals_forwarded.fetch_add(1, std::memory_order_relaxed);
        }
    }
    errno = saved_errno;
}

inline const char* signal_name(int signal_number) noexcept {
    const char* description = ::strsignal(signal_number);
    return description != nullptr ? description : "unknown signal";
}

/// co_await receiver.receive() -> int.
class SignalAwaiter final : public SocketAwaiter<SignalAwaiter> {
public:
    static constexpr bool writes = false;
    static constexpr const char* name = "SignalReceiver::receive";

    explicit SignalAwaiter(SocketCore* core) noexcept : SocketAwaiter(core) {}

    bool prepare() const noexcept { return true; }
    OpStatus attempt() noexcept {
        for (;;) {
            signalfd_siginfo info{};
            ssize_t n = ::read(core_->fd, &info, sizeof info);
            if (n == static_cast<ssize_t>(sizeof info)) {
                signal_ = static_cast<int>(info.ssi_signo);
                return OpStatus::done;
            }
            if (n >= 0) return fail(EIO);  // a short read: never happens with signalfd
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return OpStatus::would_block;
            return fail(errno);
        }
    }
    int take() const noexcept { return signal_; }
    [[noreturn]] void throw_error(int error) const {
        throw std::system_error(error, std::generic_category(),
                                "anyio::SignalReceiver::receive: read from the signalfd failed");
    }

private:
    int signal_ = 0;
};

}  // namespace detail

/// Receives POSIX signals as values (trio's and anyio's open_signal_receiver), through a
/// signalfd: `int sig = co_await receiver.receive();`.
///
/// While it lives, its signals are blocked in the loop thread and read from the signalfd
/// there, instead of running their handlers; a disposition of SIG_IGN does not stop them
/// either. close() (also the destructor) restores each signal's previous disposition and
/// the loop thread's previous mask for it (trio; anyio's asyncio backend resets to SIG_DFL).
/// A signal that arrived but was not received yet is then delivered under the restored
/// disposition, as trio re-delivers it (so it is not lost). Worker threads block all
/// asynchronous signals from their start, so a signal never lands on a worker; should one
/// land on another thread of the application, it is sent on to the loop thread.
///
/// - Two signals of one kind that arrive before a receive may be reported once (POSIX
///   coalesces a pending standard signal).
/// - One receiver per signal in the process: opening a second for a signal that a live
///   receiver takes throws std::logic_error. Two tasks receiving on one receiver at once:
///   BusyResourceError. receive() after close(): ClosedResourceError, also for a task blocked
///   in it.
/// - receive() is a cancellation point; a cancelled receive takes no signal.
///
/// Loop-thread only: open it on the loop thread and destroy it there (the mask it restores
/// is that thread's). Movable. Opening allocates one block; receive() allocates nothing.
class SignalReceiver {
public:
    SignalReceiver() noexcept = default;
    SignalReceiver(SignalReceiver&&) noexcept = default;
    SignalReceiver& operator=(SignalReceiver&& other) noexcept {
        if (this != &other) {
            restore();
            core_ = std::move(other.core_);
            signals_ = std::move(other.signals_);
            previous_ = std::move(other.previous_);
            loop_thread_ = other.loop_thread_;
            other.signals_.clear();  // the moved-from receiver restores nothing
            other.previous_.clear();
        }
        return *this;
    }
    ~SignalReceiver() { restore(); }

    /// Starts receiving `signals` (see open_signal_receiver).
    explicit SignalReceiver(std::span<const int> signals) {
        constexpr const char* what = "open_signal_receiver";
        detail::running_loop(what);
        if (signals.empty()) {
            throw std::invalid_argument("anyio::open_signal_receiver: no signals were given");
        }
        sigset_t set;
        ::sigemptyset(&set);
        for (int signal_number : signals) {
            if (signal_number <= 0 || signal_number >= detail::signal_count ||
                signal_number == SIGKILL || signal_number == SIGSTOP) {
                throw std::invalid_argument("anyio::open_signal_receiver: " +
                                            std::to_string(signal_number) +
                                            " is not a signal that can be caught");
            }
            if (::sigismember(&set, signal_number) == 1) continue;  // listed twice
            ::sigaddset(&set, signal_number);
            signals_.push_back(signal_number);
        }
        {
            std::lock_guard<std::mutex> lock(detail::signal_registry_mutex);
            for (int signal_number : signals_) {
                if (detail::signal_taken[signal_number]) {
                    signals_.clear();
                    throw std::logic_error(
                        "anyio::open_signal_receiver: signal " + std::to_string(signal_number) +
                        " (" + detail::signal_name(signal_number) +
                        ") is already taken by another live SignalReceiver; a signal has one "
                        "receiver at a time (close that one first, or receive from it)");
                }
            }
            for (int signal_number : signals_) detail::signal_taken[signal_number] = true;
        }
        loop_thread_ = detail::current_thread_id();
        // From here on restore() undoes whatever was done, step by step.
        try {
            sigset_t old_mask;
            if (int rc = ::pthread_sigmask(SIG_BLOCK, &set, &old_mask); rc != 0) {
                throw std::system_error(rc, std::generic_category(),
                                        "anyio::open_signal_receiver: pthread_sigmask");
            }
            for (int signal_number : signals_) {
                previous_.push_back({signal_number, {}, ::sigismember(&old_mask, signal_number) == 1, false});
            }
            int fd = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
            if (fd < 0) {
                throw std::system_error(errno, std::generic_category(),
                                        "anyio::open_signal_receiver: signalfd");
            }
            core_ = detail::SocketCore::adopt(fd, AF_UNSPEC, what);
            struct sigaction forward {};
            forward.sa_handler = &detail::forward_signal;
            ::sigfillset(&forward.sa_mask);
            forward.sa_flags = SA_RESTART;
            for (Previous& previous : previous_) {
                // relaxed: see forward_signal; sigaction() below publishes it to the handler.
                detail::signal_forward_to[previous.signal].store(loop_thread_, std::memory_order_relaxed);
                if (::sigaction(previous.signal, &forward, &previous.action) != 0) {
                    throw std::system_error(errno, std::generic_category(),
                                            "anyio::open_signal_receiver: sigaction");
                }
                previous.installed = true;
            }
        } catch (...) {
            restore();
            throw;
        }
    }

    /// Waits for the next signal and yields its number.
    [[nodiscard]] detail::SignalAwaiter receive() noexcept { return detail::SignalAwaiter{core_.get()}; }

    /// Stops receiving: restores the dispositions and the loop thread's mask (idempotent).
    void close() {
        if (core_ && core_->poller != nullptr) core_->affinity.check("SignalReceiver::close");
        restore();
    }

    /// The signals this receiver takes (empty once closed).
    [[nodiscard]] const std::vector<int>& signals() const noexcept { return signals_; }

    /// The signalfd (-1 once closed).
    [[nodiscard]] int native_handle() const noexcept { return core_ ? core_->fd : -1; }

private:
    struct Previous {
        int signal;
        struct sigaction action;
        bool was_blocked;
        bool installed;
    };

    void restore() noexcept {
        if (signals_.empty()) return;
        core_.reset();  // wakes a blocked receive with ClosedResourceError; closes the signalfd
        sigset_t unblock;
        ::sigemptyset(&unblock);
        for (const Previous& previous : previous_) {
            if (previous.installed) ::sigaction(previous.signal, &previous.action, nullptr);
            // relaxed: as in forward_signal (the handler is no longer installed).
            detail::signal_forward_to[previous.signal].store(0, std::memory_order_relaxed);
            if (!previous.was_blocked) ::sigaddset(&unblock, previous.signal);
        }
        // Only the loop thread's own mask can be restored (a mask is per thread). Signals
        // still pending are delivered now, under the restored disposition.
        if (detail::current_thread_id() == loop_thread_) ::pthread_sigmask(SIG_UNBLOCK, &unblock, nullptr);
        {
            std::lock_guard<std::mutex> lock(detail::signal_registry_mutex);
            for (int signal_number : signals_) detail::signal_taken[signal_number] = false;
        }
        signals_.clear();
        previous_.clear();
    }

    std::unique_ptr<detail::SocketCore> core_;
    std::vector<int> signals_;
    std::vector<Previous> previous_;
    pid_t loop_thread_ = 0;
};

/// Opens a receiver for `signals` on the running loop: `auto receiver =
/// anyio::open_signal_receiver({SIGINT, SIGTERM}); int sig = co_await receiver.receive();`.
/// Throws std::invalid_argument for an empty list or a signal that cannot be caught
/// (SIGKILL, SIGSTOP), std::logic_error when a live receiver already takes one of them,
/// NoEventLoopError off the loop thread.
inline SignalReceiver open_signal_receiver(std::initializer_list<int> signals) {
    return SignalReceiver(std::span<const int>(signals.begin(), signals.size()));
}
inline SignalReceiver open_signal_receiver(std::span<const int> signals) { return SignalReceiver(signals); }

}  // namespace anyio
