// anyio-cpp: Lock, Semaphore, Condition (anyio's synchronization primitives): loop-thread objects
// with first-in, first-out hand-off, on the wait machinery of event.hpp (detail/wait.hpp,
// detail/sync_waiters.hpp). To pass values between tasks use memory_stream.hpp; to bound threads,
// capacity_limiter.hpp.
#pragma once

#include <concepts>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "cancel_scope.hpp"
#include "detail/intrusive_list.hpp"
#include "detail/loop_thread.hpp"
#include "detail/sync_waiters.hpp"
#include "errors.hpp"
#include "event_loop.hpp"
#include "task.hpp"

namespace anyio {

/// What Lock::statistics() reports.
struct LockStatistics {
    bool locked = false;            ///< whether some task holds the lock
    const void* owner = nullptr;    ///< the task holding it (an identity only), or nullptr
    std::size_t tasks_waiting = 0;  ///< tasks queued in acquire()
};

/// What Semaphore::statistics() reports.
struct SemaphoreStatistics {
    std::size_t tasks_waiting = 0;  ///< tasks queued in acquire()
};

/// What Condition::statistics() reports.
struct ConditionStatistics {
    std::size_t tasks_waiting = 0;   ///< tasks blocked in wait() (not yet notified)
    LockStatistics lock_statistics;  ///< the underlying lock's statistics
};

/// A mutual exclusion lock for tasks (anyio.Lock): one task holds it at a time.
///
///     auto held = co_await lock.lock();   // released when `held` is destroyed
///
/// Waiters are served first in, first out, and release() hands the lock to the first waiter
/// before it runs, so nobody can overtake it. Without `fast_acquire`, acquiring a free lock
/// still yields once (a checkpoint, as in anyio); with it, a free lock is taken without
/// yielding (still a cancellation point). A waiter cancelled in the turn the lock was handed
/// to it passes the lock on to the next waiter and raises Cancelled: nothing stays locked.
///
/// Loop-thread only (std::logic_error from another thread). Allocates nothing: waiters are
/// nodes in their own frames, unlinked in O(1) when cancelled. Throws std::runtime_error when
/// the owner acquires again or another task releases, WouldBlock from acquire_nowait(). At
/// shutdown, a frame destroyed while it holds a Guard (or a lock just handed to it) gives
/// the lock back. The lock must outlive its waiters and guards.
class Lock {
public:
    /// RAII ownership of a Lock: releases it when destroyed (or at unlock()). Move-only.
    class Guard {
    public:
        Guard(Guard&& other) noexcept
            : lock_(std::exchange(other.lock_, nullptr)), owner_(other.owner_) {}
        Guard& operator=(Guard&&) = delete;
        ~Guard() {
            if (owns_lock()) lock_->hand_over();
        }
        /// Releases the lock now (the destructor then does nothing).
        void unlock() {
            if (lock_ == nullptr) return;
            lock_->affinity_.check("Lock::Guard::unlock");
            if (owns_lock()) lock_->hand_over();
            lock_ = nullptr;
        }
        /// True while this guard's task still holds the lock.
        [[nodiscard]] bool owns_lock() const noexcept {
            return lock_ != nullptr && lock_->owner_ == owner_;
        }

    private:
        friend class detail::ScopedAcquire<Lock, Guard>;
        explicit Guard(Lock& lock) noexcept : lock_(&lock), owner_(lock.owner_) {}
        Lock* lock_;
        detail::TaskState* owner_;
    };

    explicit Lock(bool fast_acquire = false) noexcept : fast_acquire_(fast_acquire) {}
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;
    ~Lock() = default;

    /// `auto held = co_await lock.lock();` acquires and yields a Guard.
    [[nodiscard]] detail::ScopedAcquire<Lock, Guard> lock() {
        affinity_.check("Lock::lock");
        return detail::ScopedAcquire<Lock, Guard>(*this);
    }
    /// Waits for the lock (a cancellation point). The owner acquiring it again:
    /// std::runtime_error.
    [[nodiscard]] detail::SyncAcquire<Lock> acquire() {
        affinity_.check("Lock::acquire");
        return detail::SyncAcquire<Lock>(*this);
    }
    /// Takes the lock now for the current task, or throws WouldBlock.
    void acquire_nowait() {
        affinity_.check("Lock::acquire_nowait");
        detail::TaskState* task = detail::current_task_or_null();
        if (task == nullptr) {
            throw std::logic_error(
                "anyio::Lock::acquire_nowait must be called from a task run by the loop (a "
                "lock is owned by a task)");
        }
        if (!may_acquire(*task)) throw_refused();
        if (!try_take(*task)) {
            throw WouldBlock(
                "anyio::Lock::acquire_nowait: the lock is held by another task; co_await "
                "acquire() to wait for it");
        }
    }
    /// Releases the lock, handing it to the first waiter. Throws std::runtime_error unless
    /// the current task holds it.
    void release() {
        affinity_.check("Lock::release");
        if (owner_ == nullptr || owner_ != detail::current_task_or_null()) {
            throw std::runtime_error("The current task is not holding this lock");
        }
        hand_over();
    }

    [[nodiscard]] bool locked() const noexcept { return owner_ != nullptr; }

    [[nodiscard]] LockStatistics statistics() const noexcept {
        return LockStatistics{owner_ != nullptr, owner_, queue_.size()};
    }

private:
    friend class detail::SyncAcquire<Lock>;
    template <class>
    friend class detail::ConditionWaiter;
    friend class Condition;
    static constexpr const char* acquire_name = "Lock::acquire";

    [[noreturn]] static void throw_refused() {
        throw std::runtime_error("Attempted to acquire an already held Lock");
    }
    bool may_acquire(const detail::TaskState& task) const noexcept { return owner_ != &task; }
    /// The lock is free exactly when nobody owns it: release() never leaves it free while
    /// someone waits, so "free" needs no look at the queue.
    bool try_take(detail::TaskState& task) noexcept {
        if (owner_ != nullptr) return false;
        owner_ = &task;
        return true;
    }
    void give_back(const detail::TaskState& task) noexcept {
        if (owner_ == &task) hand_over();
    }
    void hand_off_resolved() noexcept {}  // ownership moved with the hand-off: nothing to count
    /// Gives the lock to the first waiter (it owns it from now on) or frees it.
    void hand_over() noexcept {
        detail::SyncWaiter* next = queue_.pop_front();
        owner_ = next != nullptr ? next->waiting_task_ : nullptr;
        if (next != nullptr) next->granted_(next);
    }

    detail::SyncQueue queue_;
    detail::TaskState* owner_ = nullptr;
    bool fast_acquire_;
    detail::LoopAffinity affinity_;
};

/// A counting semaphore for tasks (anyio.Semaphore): acquire() takes one of `value()`
/// permits, waiting while there are none; release() gives one back.
///
///     auto held = co_await semaphore.scoped();   // released when `held` is destroyed
///
/// Waiters are served first in, first out; release() hands the permit to the first waiter
/// before it runs. Without `fast_acquire`, acquiring still yields once (anyio). A waiter
/// cancelled in the turn a permit was handed to it passes it on and raises Cancelled.
///
/// Loop-thread only (std::logic_error from another thread). Allocates nothing. Throws
/// std::invalid_argument for a negative initial value ("initial_value must be >= 0"), a
/// maximum below it ("max_value must be equal to or higher than initial_value") and a
/// release past the maximum ("semaphore released too many times"); WouldBlock from
/// acquire_nowait(). At shutdown, a frame destroyed while it holds a Guard gives the permit
/// back. The semaphore must outlive its waiters and guards.
class Semaphore {
public:
    /// RAII hold of one permit: released when destroyed (or at release()). Move-only.
    class Guard {
    public:
        Guard(Guard&& other) noexcept : semaphore_(std::exchange(other.semaphore_, nullptr)) {}
        Guard& operator=(Guard&&) = delete;
        ~Guard() {
            if (semaphore_ != nullptr) semaphore_->give_permit();
        }
        /// Releases the permit now (the destructor then does nothing).
        void release() {
            if (semaphore_ == nullptr) return;
            semaphore_->affinity_.check("Semaphore::Guard::release");
            std::exchange(semaphore_, nullptr)->give_permit();
        }

    private:
        friend class detail::ScopedAcquire<Semaphore, Guard>;
        explicit Guard(Semaphore& semaphore) noexcept : semaphore_(&semaphore) {}
        Semaphore* semaphore_;
    };

    explicit Semaphore(std::int64_t initial_value, std::optional<std::int64_t> max_value = {},
                       bool fast_acquire = false)
        : value_(initial_value), max_value_(max_value), fast_acquire_(fast_acquire) {
        if (initial_value < 0) throw std::invalid_argument("initial_value must be >= 0");
        if (max_value && *max_value < initial_value) {
            throw std::invalid_argument("max_value must be equal to or higher than initial_value");
        }
    }
    Semaphore(const Semaphore&) = delete;
    Semaphore& operator=(const Semaphore&) = delete;
    ~Semaphore() = default;

    /// Waits for a permit (a cancellation point).
    [[nodiscard]] detail::SyncAcquire<Semaphore> acquire() {
        affinity_.check("Semaphore::acquire");
        return detail::SyncAcquire<Semaphore>(*this);
    }
    /// `auto held = co_await semaphore.scoped();` acquires and yields a Guard.
    [[nodiscard]] detail::ScopedAcquire<Semaphore, Guard> scoped() {
        affinity_.check("Semaphore::scoped");
        return detail::ScopedAcquire<Semaphore, Guard>(*this);
    }
    /// Takes a permit now, or throws WouldBlock.
    void acquire_nowait() {
        affinity_.check("Semaphore::acquire_nowait");
        if (value_ == 0) {
            throw WouldBlock(
                "anyio::Semaphore::acquire_nowait: no permit is free; co_await acquire() to "
                "wait for one");
        }
        --value_;
    }
    /// Gives a permit back (to the first waiter, if any). Past max_value():
    /// std::invalid_argument.
    void release() {
        affinity_.check("Semaphore::release");
        // A permit handed to a waiter that has not resumed yet is still out: counting it keeps
        // value() <= max_value() even if that waiter is cancelled and gives the permit back.
        if (max_value_ && value_ + handed_off_ >= *max_value_) {
            throw std::invalid_argument("semaphore released too many times");
        }
        give_permit();
    }

    [[nodiscard]] std::int64_t value() const noexcept { return value_; }
    [[nodiscard]] std::optional<std::int64_t> max_value() const noexcept { return max_value_; }
    [[nodiscard]] SemaphoreStatistics statistics() const noexcept {
        return SemaphoreStatistics{queue_.size()};
    }

private:
    friend class detail::SyncAcquire<Semaphore>;
    static constexpr const char* acquire_name = "Semaphore::acquire";

    [[noreturn]] static void throw_refused() { std::terminate(); }  // never refused
    static bool may_acquire(const detail::TaskState&) noexcept { return true; }
    /// A permit is free exactly when value_ > 0: release() hands permits to waiters first.
    bool try_take(detail::TaskState&) noexcept {
        if (value_ == 0) return false;
        --value_;
        return true;
    }
    void give_back(const detail::TaskState&) noexcept { give_permit(); }
    void hand_off_resolved() noexcept { --handed_off_; }  // the waiter resumed (or died)
    void give_permit() noexcept {
        if (detail::SyncWaiter* next = queue_.pop_front()) {
            ++handed_off_;
            next->granted_(next);
        } else {
            ++value_;
        }
    }

    detail::SyncQueue queue_;
    std::int64_t value_;
    std::int64_t handed_off_ = 0;  // permits handed to waiters that have not resumed yet
    std::optional<std::int64_t> max_value_;
    bool fast_acquire_;
    detail::LoopAffinity affinity_;
};

/// A condition variable for tasks (anyio.Condition), over a Lock of its own or the one given.
///
///     auto held = co_await cond.lock();
///     while (!ready) co_await cond.wait();   // or: co_await cond.wait_for([&] { return ready; });
///
/// wait() releases the lock, waits for notify(), and takes the lock again before it returns,
/// also when it raises Cancelled. A notified waiter queues for the lock at once (trio's
/// repark) and is no longer cancellable: the notification is its own, so it returns normally
/// and a cancellation takes effect at its next checkpoint. Waiters are notified first in,
/// first out.
///
/// Loop-thread only (std::logic_error from another thread). wait() allocates nothing;
/// wait_for() allocates its coroutine frame. Waiting or notifying without holding the lock
/// throws std::runtime_error ("The current task is not holding the underlying lock"). The
/// condition (and its lock) must outlive its waiters.
class Condition {
    using WaitAwaiter = detail::ConditionWaiter<Condition>;

public:
    /// Uses `*lock` when given (it must outlive the condition), else a Lock of its own.
    explicit Condition(Lock* lock = nullptr) noexcept
        : lock_(lock != nullptr ? lock : &own_lock_) {}
    Condition(const Condition&) = delete;
    Condition& operator=(const Condition&) = delete;
    ~Condition() {
        while (waiters_.pop_front() != nullptr) {
        }
    }

    /// `auto held = co_await cond.lock();` acquires the underlying lock.
    [[nodiscard]] auto lock() { return lock_->lock(); }
    [[nodiscard]] auto acquire() { return lock_->acquire(); }
    void acquire_nowait() { lock_->acquire_nowait(); }
    void release() { lock_->release(); }
    [[nodiscard]] bool locked() const noexcept { return lock_->locked(); }

    /// Releases the lock, waits for a notification and re-acquires the lock (a cancellation
    /// point; re-acquires before raising Cancelled too).
    [[nodiscard]] WaitAwaiter wait();

    /// Waits until `predicate()` is truthy (checked under the lock, first at once) and yields
    /// its value. Allocates its coroutine frame. g++ 12: do not write a lambda that captures
    /// objects with destructors inside the co_await (see to_thread.hpp); `[&]` is fine.
    template <class Predicate>
        requires std::invocable<Predicate&>
    Task<std::remove_cvref_t<std::invoke_result_t<Predicate&>>> wait_for(Predicate predicate) {
        affinity_.check("Condition::wait_for");
        require_holding();
        while (true) {
            auto result = predicate();
            if (static_cast<bool>(result)) co_return result;
            co_await wait();
        }
    }

    /// Wakes up to `n` waiters, oldest first (they then queue for the lock).
    void notify(std::size_t n = 1);
    /// Wakes every waiter.
    void notify_all() { notify(std::numeric_limits<std::size_t>::max()); }

    [[nodiscard]] ConditionStatistics statistics() const noexcept {
        return ConditionStatistics{waiting_, lock_->statistics()};
    }

private:
    friend WaitAwaiter;

    [[noreturn]] static void throw_not_holding() {
        throw std::runtime_error("The current task is not holding the underlying lock");
    }
    void require_holding() const {
        detail::TaskState* task = detail::current_task_or_null();
        if (task == nullptr || lock_->owner_ != task) throw_not_holding();
    }

    Lock own_lock_;
    Lock* lock_;
    detail::IntrusiveList<WaitAwaiter, detail::ConditionQueueTag> waiters_;
    std::size_t waiting_ = 0;
    detail::LoopAffinity affinity_;
};

inline Condition::WaitAwaiter Condition::wait() {
    affinity_.check("Condition::wait");
    return WaitAwaiter(*this);
}

inline void Condition::notify(std::size_t n) {
    affinity_.check("Condition::notify");
    require_holding();
    for (; n > 0; --n) {
        WaitAwaiter* waiter = waiters_.pop_front();
        if (waiter == nullptr) break;
        --waiting_;
        waiter->notified();
    }
}

}  // namespace anyio
