// The waits of Lock, Semaphore and Condition (sync.hpp): the lock/permit queue, the acquire
// awaiter they share, and the condition's wait. Every node lives in the waiting frame, so
// nothing allocates and a cancelled waiter unlinks itself in O(1). Stands on event_loop.hpp
// and cancel_scope.hpp (through wait.hpp), so it lives beside the one public header that
// uses it; the awaiters are templates over the public types, which befriend them.
// Loop-thread only; no synchronisation.
#pragma once

#include <coroutine>
#include <cstddef>
#include <stdexcept>
#include <utility>

#include "../cancel_scope.hpp"
#include "../event_loop.hpp"
#include "intrusive_list.hpp"
#include "task_state.hpp"
#include "wait.hpp"

namespace anyio::detail {

struct SyncQueueTag {};
struct ConditionQueueTag {};

/// Someone queued for a Lock (ownership) or a Semaphore (a permit). `granted` runs on the
/// loop, inside the release() that hands the lock or permit over; it must only schedule.
struct SyncWaiter : ListHook<SyncQueueTag> {
    using Granted = void (*)(SyncWaiter* self) noexcept;
    explicit SyncWaiter(Granted granted) noexcept : granted_(granted) {}
    TaskState* waiting_task_ = nullptr;  // the task that owns the lock once it is handed over
    Granted granted_;
};

/// A FIFO of SyncWaiters. Push, pop and removal from the middle (cancellation) are O(1).
class SyncQueue {
public:
    SyncQueue() = default;
    SyncQueue(const SyncQueue&) = delete;
    SyncQueue& operator=(const SyncQueue&) = delete;
    /// Waiters still queued when their lock dies stay parked (like Event's): unlink them so
    /// their own destructors do not touch the freed sentinel.
    ~SyncQueue() {
        while (list_.pop_front() != nullptr) {
        }
    }

    [[nodiscard]] bool empty() const noexcept { return list_.empty(); }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }

    void push_back(SyncWaiter& waiter) noexcept {
        list_.push_back(waiter);
        ++size_;
    }
    SyncWaiter* pop_front() noexcept {
        SyncWaiter* waiter = list_.pop_front();
        if (waiter != nullptr) --size_;
        return waiter;
    }
    /// Removes `waiter` if it is still queued (a no-op otherwise).
    void remove(SyncWaiter& waiter) noexcept {
        if (waiter.linked()) {
            waiter.unlink();
            --size_;
        }
    }

private:
    IntrusiveList<SyncWaiter, SyncQueueTag> list_;
    std::size_t size_ = 0;
};

/// The task being resumed on this thread's loop now, or nullptr (no loop, or a plain
/// callback such as a from_thread::run_sync call).
inline TaskState* current_task_or_null() noexcept {
    EventLoop* loop = EventLoop::current();
    return loop != nullptr ? loop->current_task() : nullptr;
}

/// The co_await of Lock::acquire() and Semaphore::acquire(), as anyio's asyncio backend does
/// it: a free lock (or permit) is taken at once and the task still yields once, without
/// being cancellable in that yield (anyio's cancel_shielded_checkpoint), unless the
/// primitive was made with fast_acquire; otherwise the task queues, first in, first out.
/// release() hands the lock or permit to the first waiter before it runs. A waiter that is
/// cancelled in the turn it was handed one passes it on at once and raises Cancelled (anyio
/// calls release() in the same case). The queue node is this awaiter: no allocation.
template <class Primitive>
class SyncAcquire final : public CancellableWait<SyncAcquire<Primitive>>, public SyncWaiter {
public:
    explicit SyncAcquire(Primitive& primitive) noexcept
        : SyncWaiter(&on_granted), primitive_(&primitive) {}
    SyncAcquire(const SyncAcquire&) = delete;
    SyncAcquire& operator=(const SyncAcquire&) = delete;
    ~SyncAcquire() {
        if (phase_ == Phase::queued) {
            primitive_->queue_.remove(*this);
        } else if (phase_ == Phase::taken || phase_ == Phase::handed) {
            // Only at loop shutdown: the frame is destroyed before it resumed with the lock.
            if (phase_ == Phase::handed) primitive_->hand_off_resolved();
            primitive_->give_back(*this->task_);
        }
    }

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!this->begin(Primitive::acquire_name, handle)) return false;
        if (!primitive_->may_acquire(*this->task_)) {
            refused_ = true;
            return false;
        }
        if (primitive_->try_take(*this->task_)) {
            if (primitive_->fast_acquire_) {
                phase_ = Phase::done;
                return false;
            }
            phase_ = Phase::taken;
            this->wake();  // yield once; not cancellable now, the lock is already ours
            return true;
        }
        waiting_task_ = this->task_;
        primitive_->queue_.push_back(*this);
        phase_ = Phase::queued;
        this->park();
        return true;
    }
    void await_resume() {
        const Phase phase = std::exchange(phase_, Phase::done);
        if (refused_) Primitive::throw_refused();
        this->throw_if_cancelled();
        if (phase == Phase::handed) primitive_->hand_off_resolved();
        if (phase == Phase::handed && is_cancelled(*this->task_)) {
            primitive_->give_back(*this->task_);  // to the next waiter, in order
            throw Cancelled{};
        }
    }

    /// Cancelled while queued: leave the queue (O(1)); nothing was handed over.
    void abort() noexcept {
        primitive_->queue_.remove(*this);
        phase_ = Phase::idle;
    }

private:
    enum class Phase : unsigned char { idle, queued, taken, handed, done };

    static void on_granted(SyncWaiter* self) noexcept {
        auto* awaiter = static_cast<SyncAcquire*>(self);
        awaiter->phase_ = Phase::handed;
        awaiter->wake();
    }

    Primitive* primitive_;
    Phase phase_ = Phase::idle;
    bool refused_ = false;
};

/// `co_await x.lock()` / `co_await x.scoped()`: acquires, then yields a Guard.
template <class Primitive, class Guard>
class ScopedAcquire {
public:
    explicit ScopedAcquire(Primitive& primitive) noexcept
        : acquire_(primitive), primitive_(&primitive) {}
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) { return acquire_.await_suspend(handle); }
    Guard await_resume() {
        acquire_.await_resume();
        return Guard(*primitive_);
    }

private:
    SyncAcquire<Primitive> acquire_;
    Primitive* primitive_;
};

/// The co_await of Condition::wait(). It queues on the condition, releases the lock and
/// parks. notify() moves it straight onto the lock's queue (trio's repark), where it is no
/// longer cancellable: the notification is its own, so it returns normally once the lock is
/// handed to it. Cancelled while still waiting for a notification, it leaves the condition's
/// queue and queues for the lock just the same (anyio re-acquires under a shield), then
/// raises Cancelled holding the lock. The nodes (one per queue) are this awaiter.
template <class Condition>
class ConditionWaiter final : public CancellableWait<ConditionWaiter<Condition>>,
                              public SyncWaiter,
                              public ListHook<ConditionQueueTag> {
    using QueueHook = ListHook<ConditionQueueTag>;
    using Base = CancellableWait<ConditionWaiter<Condition>>;

public:
    explicit ConditionWaiter(Condition& condition) noexcept
        : SyncWaiter(&on_lock_granted), condition_(&condition) {
        // Cancellation must not resume the task at once: it first queues for the lock
        // again, so this wait has its own handler instead of CancellableWait's.
        this->on_cancel_ = &on_cancel;
    }
    ConditionWaiter(const ConditionWaiter&) = delete;
    ConditionWaiter& operator=(const ConditionWaiter&) = delete;
    ~ConditionWaiter() {
        if (phase_ == Phase::waiting) {
            abort();
        } else if (phase_ == Phase::reacquiring) {
            condition_->lock_->queue_.remove(*this);
        } else if (phase_ == Phase::relocked) {
            condition_->lock_->give_back(*this->task_);  // loop shutdown, before it resumed
        }
    }

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!this->begin("Condition::wait", handle)) return false;  // still holding the lock
        auto& lock = *condition_->lock_;
        if (lock.owner_ != this->task_) {
            not_holding_ = true;
            return false;
        }
        condition_->waiters_.push_back(*this);
        ++condition_->waiting_;
        phase_ = Phase::waiting;
        lock.hand_over();
        this->park();
        return true;
    }
    void await_resume() {
        phase_ = Phase::done;
        if (not_holding_) Condition::throw_not_holding();
        this->throw_if_cancelled();
    }

    /// Leaves the condition's queue (O(1)).
    void abort() noexcept {
        if (QueueHook::linked()) {
            QueueHook::unlink();
            --condition_->waiting_;
        }
    }

    /// notify() took it off the condition's queue: from now on it only waits for the lock.
    void notified() noexcept {
        this->task_->wait_ = nullptr;  // not cancellable any more: the notification is ours
        queue_for_lock();
    }

private:
    enum class Phase : unsigned char { idle, waiting, reacquiring, relocked, done };

    void queue_for_lock() noexcept {
        auto& lock = *condition_->lock_;
        if (lock.try_take(*this->task_)) {
            phase_ = Phase::relocked;
            this->wake();
        } else {
            waiting_task_ = this->task_;
            lock.queue_.push_back(*this);
            phase_ = Phase::reacquiring;
        }
    }
    static void on_cancel(Wait* self) {
        auto* waiter = static_cast<ConditionWaiter*>(static_cast<Base*>(self));
        waiter->abort();
        waiter->cancelled_ = true;
        waiter->task_->wait_ = nullptr;  // re-acquiring is shielded, as in anyio
        waiter->queue_for_lock();
    }
    static void on_lock_granted(SyncWaiter* self) noexcept {
        auto* waiter = static_cast<ConditionWaiter*>(self);
        waiter->phase_ = Phase::relocked;
        waiter->wake();
    }

    Condition* condition_;
    Phase phase_ = Phase::idle;
    bool not_holding_ = false;
};

}  // namespace anyio::detail
