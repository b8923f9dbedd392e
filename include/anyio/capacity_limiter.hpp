// anyio-cpp: CapacityLimiter: anyio's loop-thread token bound. to_thread::run_sync borrows one
// token per call from the loop's default limiter (40, to_thread.hpp) or from one it is given;
// file.hpp and getaddrinfo.hpp use that parameter. Waiters queue first in, first out in intrusive
// nodes (detail/wait.hpp), so waiting allocates nothing.
#pragma once

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include "cancel_scope.hpp"
#include "detail/intrusive_list.hpp"
#include "detail/loop_thread.hpp"
#include "detail/wait.hpp"
#include "errors.hpp"
#include "event_loop.hpp"

namespace anyio {

/// No bound: a limiter with this many tokens never makes anyone wait.
inline constexpr std::int64_t infinite_tokens = std::numeric_limits<std::int64_t>::max();

struct CapacityLimiterStatistics {
    std::int64_t borrowed_tokens = 0;
    std::int64_t total_tokens = 0;
    std::vector<const void*> borrowers;  // who holds a token now (tasks, per-call borrowers...)
    std::size_t tasks_waiting = 0;
};

class CapacityLimiter;

namespace detail {
struct LimiterQueueTag {};
struct LimiterHoldTag {};

/// A token held by an internal, per-call borrower (a run_sync job): the node itself is the
/// borrower, so taking and returning it is O(1) and allocates nothing.
struct LimiterHold : ListHook<LimiterHoldTag> {
    CapacityLimiter* limiter = nullptr;  // set while holding; cleared if the limiter dies first
};

/// Someone queued for a token. `woken` runs on the loop when the wait ends; `outcome_` then
/// says how. It must not throw: the limiter calls it while it hands tokens down its queue.
struct LimiterWaiter : ListHook<LimiterQueueTag> {
    enum class Outcome : unsigned char {
        waiting,
        granted,             // the token is the waiter's (already counted as borrowed)
        duplicate_borrower,  // its borrower got a token meanwhile through another waiter
        out_of_memory,       // the borrower could not be recorded; no token was taken
        limiter_destroyed,   // the limiter was destroyed while it waited
    };
    using Woken = void (*)(LimiterWaiter* self) noexcept;
    explicit LimiterWaiter(Woken woken) noexcept : woken_(woken) {}
    const void* borrower_ = nullptr;  // a user borrower, or nullptr when hold_ is used
    LimiterHold* hold_ = nullptr;
    Woken woken_;
    Outcome outcome_ = Outcome::waiting;
};

/// What a waiter of a destroyed limiter is told.
[[noreturn]] inline void throw_limiter_destroyed(const char* what) {
    throw std::logic_error(std::string("anyio::") + what +
                           ": the CapacityLimiter was destroyed while this task waited for one "
                           "of its tokens; keep a limiter alive until every acquire and "
                           "run_sync that uses it has returned");
}
}  // namespace detail

/// Bounds how many borrowers hold one of its tokens at once (anyio.CapacityLimiter).
/// Waiters are served first in, first out; a released token is handed straight to the first
/// waiter (reserved for it, so a nowait acquire in the same loop turn cannot take it).
///
/// Loop-thread only, like anyio's: the limiter binds to the loop that first uses it, and its
/// mutators and waits throw std::logic_error on any other thread (from a worker, go through
/// from_thread::run_sync). The wait queue is intrusive (nodes in the waiting frames):
/// acquire, release and cancelling a waiter are O(1) and allocate nothing; user borrowers
/// (the task, or any `const void*`) are tracked in a hash set, which allocates one node per
/// borrower (run_sync's per-call borrowers allocate nothing). acquire() is a cancellation
/// point; a cancelled waiter leaves the queue and takes no token. If a waiter's borrower
/// cannot be recorded when its token comes (out of memory), that waiter gets std::bad_alloc
/// and the token goes on. Destroying the limiter wakes its waiters with std::logic_error;
/// destroying it while tokens are held by abandoned run_sync calls is safe (they forget it);
/// a Guard must not outlive its limiter.
class CapacityLimiter {
    class AcquireAwaiter;
    class ScopedAwaiter;

public:
    explicit CapacityLimiter(std::int64_t total_tokens) : total_(validated(total_tokens)) {}
    CapacityLimiter(const CapacityLimiter&) = delete;
    CapacityLimiter& operator=(const CapacityLimiter&) = delete;
    /// Wakes every waiter with std::logic_error (a waiter must not wait for ever on a
    /// limiter that is gone); run_sync calls still holding a token forget it.
    ~CapacityLimiter() {
        while (detail::LimiterWaiter* waiter = waiters_.pop_front()) {
            waiter->outcome_ = detail::LimiterWaiter::Outcome::limiter_destroyed;
            waiter->woken_(waiter);
        }
        while (detail::LimiterHold* hold = holds_.pop_front()) hold->limiter = nullptr;
    }

    [[nodiscard]] std::int64_t total_tokens() const noexcept { return total_; }
    [[nodiscard]] std::int64_t borrowed_tokens() const noexcept { return borrowed_; }
    [[nodiscard]] std::int64_t available_tokens() const noexcept {
        return total_ > borrowed_ ? total_ - borrowed_ : 0;
    }

    /// Changes the total. Raising it wakes at once min(waiters, total - borrowed) waiters;
    /// lowering it never takes tokens back, it takes effect as they are released.
    void set_total_tokens(std::int64_t total_tokens) {
        affinity_.check("CapacityLimiter::set_total_tokens");
        total_ = validated(total_tokens);
        hand_over();
    }

    /// Waits for a token on behalf of the current task (a cancellation point).
    [[nodiscard]] AcquireAwaiter acquire() noexcept { return AcquireAwaiter{*this, nullptr, true}; }
    /// Waits for a token on behalf of `borrower`.
    [[nodiscard]] AcquireAwaiter acquire_on_behalf_of(const void* borrower) noexcept {
        return AcquireAwaiter{*this, borrower, false};
    }

    /// Takes a token for the current task now, or throws WouldBlock.
    void acquire_nowait() {
        affinity_.check("CapacityLimiter::acquire_nowait");
        acquire_on_behalf_of_nowait(current_borrower("acquire_nowait"));
    }
    void acquire_on_behalf_of_nowait(const void* borrower) {
        affinity_.check("CapacityLimiter::acquire_on_behalf_of_nowait");
        if (!try_acquire_on_behalf_of(borrower)) {
            throw WouldBlock("anyio::CapacityLimiter: no token is available right now (" +
                             std::to_string(borrowed_) + " of " + std::to_string(total_) +
                             " borrowed); co_await acquire() to wait for one");
        }
    }
    /// Takes a token now if one is free; false otherwise.
    bool try_acquire() {
        affinity_.check("CapacityLimiter::try_acquire");
        return try_acquire_on_behalf_of(current_borrower("try_acquire"));
    }
    bool try_acquire_on_behalf_of(const void* borrower) {
        affinity_.check("CapacityLimiter::try_acquire_on_behalf_of");
        require_not_holding(borrower);
        if (!waiters_.empty() || borrowed_ >= total_) return false;
        take_for(borrower);
        return true;
    }

    /// Returns the current task's token (handing it to the first waiter, if any).
    void release() {
        affinity_.check("CapacityLimiter::release");
        release_on_behalf_of(current_borrower("release"));
    }
    void release_on_behalf_of(const void* borrower) {
        affinity_.check("CapacityLimiter::release_on_behalf_of");
        if (borrowers_.erase(borrower) == 0) {
            throw std::runtime_error(
                "anyio::CapacityLimiter: this borrower does not hold any of this "
                "CapacityLimiter's tokens; release only what was acquired");
        }
        --borrowed_;
        hand_over();
    }

    /// `auto guard = co_await limiter.scoped();` holds a token until `guard` is destroyed.
    class Guard {
    public:
        Guard(Guard&& other) noexcept
            : limiter_(std::exchange(other.limiter_, nullptr)), borrower_(other.borrower_) {}
        Guard& operator=(Guard&&) = delete;
        ~Guard() {
            if (limiter_ != nullptr) limiter_->release_on_behalf_of(borrower_);
        }

    private:
        friend class ScopedAwaiter;
        Guard(CapacityLimiter* limiter, const void* borrower) noexcept
            : limiter_(limiter), borrower_(borrower) {}
        CapacityLimiter* limiter_;
        const void* borrower_;
    };
    [[nodiscard]] ScopedAwaiter scoped() noexcept { return ScopedAwaiter{*this}; }

    [[nodiscard]] CapacityLimiterStatistics statistics() const {
        CapacityLimiterStatistics stats;
        stats.borrowed_tokens = borrowed_;
        stats.total_tokens = total_;
        stats.borrowers.assign(borrowers_.begin(), borrowers_.end());
        const_cast<CapacityLimiter*>(this)->holds_.for_each(
            [&](detail::LimiterHold& hold) { stats.borrowers.push_back(&hold); });
        stats.tasks_waiting = waiting_;
        return stats;
    }

    // ---- Low-level, for to_thread's per-call borrowers ----

    /// Takes a token for `hold` if one is free and nobody waits. Throws std::logic_error on
    /// a thread other than the limiter's loop.
    bool try_acquire_hold(detail::LimiterHold& hold) {
        affinity_.check("CapacityLimiter (to_thread::run_sync)");
        if (!waiters_.empty() || borrowed_ >= total_) return false;
        take_for(hold);
        return true;
    }
    /// Queues `waiter` (its hold_ or borrower_ set) until a token is handed to it.
    void enqueue(detail::LimiterWaiter& waiter) {
        if (waiter.hold_ == nullptr) require_not_holding(waiter.borrower_);
        waiter.outcome_ = detail::LimiterWaiter::Outcome::waiting;
        waiters_.push_back(waiter);
        ++waiting_;
    }
    /// Removes a waiter that gives up (cancellation); O(1).
    void dequeue(detail::LimiterWaiter& waiter) noexcept {
        if (waiter.ListHook<detail::LimiterQueueTag>::linked()) {
            waiter.ListHook<detail::LimiterQueueTag>::unlink();
            --waiting_;
        }
    }
    /// Returns the token of `hold` (no-op if it holds none or the limiter is gone).
    /// Allocates nothing and throws nothing (the completion path of every run_sync call).
    static void release_hold(detail::LimiterHold& hold) noexcept {
        CapacityLimiter* limiter = hold.limiter;
        if (limiter == nullptr) return;
        hold.unlink();
        hold.limiter = nullptr;
        --limiter->borrowed_;
        limiter->hand_over();
    }
    /// Forgets `hold` without handing its token on (the loop is going away).
    static void forget_hold(detail::LimiterHold& hold) noexcept {
        if (hold.limiter == nullptr) return;
        hold.unlink();
        --hold.limiter->borrowed_;
        hold.limiter = nullptr;
    }

private:
    static std::int64_t validated(std::int64_t total) {
        if (total < 0) throw std::invalid_argument("total_tokens must be >= 0");
        return total;
    }

    static const void* current_borrower(const char* what) {
        return &CancelScope::current_task(what);
    }

    void require_not_holding(const void* borrower) const {
        if (borrowers_.count(borrower) != 0) throw_already_holding();
    }
    [[noreturn]] static void throw_already_holding() {
        throw std::runtime_error(
            "anyio::CapacityLimiter: this borrower is already holding one of this "
            "CapacityLimiter's tokens; release it before acquiring again");
    }

    void take_for(const void* borrower) {
        borrowers_.insert(borrower);
        ++borrowed_;
    }
    void take_for(detail::LimiterHold& hold) noexcept {
        hold.limiter = this;
        holds_.push_back(hold);
        ++borrowed_;
    }

    /// Hands free tokens to waiters, first come first served, reserving each token for its
    /// waiter before it runs (anyio#1170: no overtaking by a nowait acquire).
    ///
    /// Iterative and allocation-safe, because it runs inside noexcept release paths:
    /// - A waiter's wake-up may give a token straight back (a run_sync call whose thread
    ///   cannot start releases it). That nested call returns at once and this loop, which
    ///   re-reads the count, passes the token on: one frame however long the queue is.
    /// - A user borrower is recorded before its waiter leaves the queue; if recording it
    ///   fails (bad_alloc), that waiter is woken with the error and takes no token.
    void hand_over() noexcept {
        if (handing_over_) return;
        handing_over_ = true;
        using Outcome = detail::LimiterWaiter::Outcome;
        while (borrowed_ < total_) {
            detail::LimiterWaiter* waiter = waiters_.front();
            if (waiter == nullptr) break;
            Outcome outcome = Outcome::granted;
            if (waiter->hold_ == nullptr) {
                try {
                    if (!borrowers_.insert(waiter->borrower_).second) {
                        // Two tasks waited on behalf of one borrower: the second gets the
                        // usual "already holding" error, and the token goes on.
                        outcome = Outcome::duplicate_borrower;
                    }
                } catch (...) {
                    outcome = Outcome::out_of_memory;
                }
            }
            waiters_.pop_front();
            --waiting_;
            if (outcome == Outcome::granted) {
                if (waiter->hold_ != nullptr) {
                    take_for(*waiter->hold_);
                } else {
                    ++borrowed_;
                }
            }
            waiter->outcome_ = outcome;
            waiter->woken_(waiter);
        }
        handing_over_ = false;
    }

    class AcquireAwaiter final : public detail::CancellableWait<AcquireAwaiter>,
                                 public detail::LimiterWaiter {
    public:
        AcquireAwaiter(CapacityLimiter& limiter, const void* borrower,
                       bool for_current_task) noexcept
            : LimiterWaiter(&on_woken), limiter_(&limiter), for_current_task_(for_current_task) {
            borrower_ = borrower;  // any pointer, nullptr included, is a borrower
        }
        AcquireAwaiter(const AcquireAwaiter&) = delete;
        AcquireAwaiter& operator=(const AcquireAwaiter&) = delete;
        ~AcquireAwaiter() { abort(); }

        bool await_ready() const noexcept { return false; }
        bool await_suspend(std::coroutine_handle<> handle) {
            limiter_->affinity_.check("CapacityLimiter::acquire");
            if (!begin("CapacityLimiter::acquire", handle)) return false;
            if (for_current_task_) borrower_ = task_;
            if (limiter_->try_acquire_on_behalf_of(borrower_)) {
                wake();  // acquired at once: still yield once (anyio's shielded checkpoint)
                return true;
            }
            limiter_->enqueue(*this);
            park();
            return true;
        }
        void await_resume() {
            throw_if_cancelled();
            switch (outcome_) {
            case Outcome::limiter_destroyed:
                detail::throw_limiter_destroyed("CapacityLimiter::acquire");
            case Outcome::out_of_memory:
                throw std::bad_alloc();
            case Outcome::duplicate_borrower:
                throw_already_holding();
            case Outcome::granted:
                if (detail::is_cancelled(*task_)) {
                    // Cancelled in the turn the token arrived: pass it on and report the
                    // cancellation (anyio does the same).
                    limiter_->release_on_behalf_of(borrower_);
                    throw Cancelled{};
                }
                break;
            case Outcome::waiting:
                break;  // acquired at once
            }
        }
        /// Leaves the queue (cancellation, or the frame going away): O(1), and it touches only
        /// this node when the limiter has already let it go (or is gone).
        void abort() noexcept {
            if (ListHook<detail::LimiterQueueTag>::linked()) limiter_->dequeue(*this);
        }
        [[nodiscard]] const void* borrower() const noexcept { return borrower_; }

    private:
        static void on_woken(LimiterWaiter* self) noexcept {
            static_cast<AcquireAwaiter*>(self)->wake();
        }
        CapacityLimiter* limiter_;
        bool for_current_task_;
    };

    class ScopedAwaiter {
    public:
        explicit ScopedAwaiter(CapacityLimiter& limiter) noexcept
            : acquire_(limiter, nullptr, true), limiter_(&limiter) {}
        bool await_ready() const noexcept { return false; }
        bool await_suspend(std::coroutine_handle<> handle) {
            return acquire_.await_suspend(handle);
        }
        Guard await_resume() {
            acquire_.await_resume();
            return Guard{limiter_, acquire_.borrower()};
        }

    private:
        AcquireAwaiter acquire_;
        CapacityLimiter* limiter_;
    };

    detail::IntrusiveList<detail::LimiterWaiter, detail::LimiterQueueTag> waiters_;
    detail::IntrusiveList<detail::LimiterHold, detail::LimiterHoldTag> holds_;
    std::unordered_set<const void*> borrowers_;
    std::int64_t total_;
    std::int64_t borrowed_ = 0;
    std::size_t waiting_ = 0;
    bool handing_over_ = false;  // hand_over() is on the stack (see there)
    detail::LoopAffinity affinity_;
};

}  // namespace anyio
