// The wait queue of Lock and Semaphore (sync.hpp): an intrusive FIFO of nodes that live in
// the waiting frames, with a count for statistics. Stands on event_loop.hpp (for the task
// that is running now), so it lives beside the one public header that uses it.
// Loop-thread only; no synchronisation.
#pragma once

#include <cstddef>

#include "../event_loop.hpp"
#include "intrusive_list.hpp"
#include "task_state.hpp"

namespace anyio::detail {

struct SyncQueueTag {};

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

}  // namespace anyio::detail
