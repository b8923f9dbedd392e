// anyio-cpp: Event, sleep, sleep_until, checkpoint, current_time: the basic waits of a task on its
// loop (the ready queue and timers of event_loop.hpp), each a cancellation point
// (cancel_scope.hpp). sync.hpp builds Lock, Semaphore and Condition on the same wait machinery
// (detail/wait.hpp).
#pragma once

#include <chrono>
#include <coroutine>
#include <stdexcept>

#include "cancel_scope.hpp"
#include "detail/intrusive_list.hpp"
#include "detail/loop_thread.hpp"
#include "detail/timer_heap.hpp"
#include "detail/wait.hpp"
#include "event_loop.hpp"

namespace anyio {

/// The loop clock's current time (throws NoEventLoopError with no running loop).
inline std::chrono::steady_clock::time_point current_time() {
    return detail::running_loop("current_time").time();
}

namespace detail {

class SleepAwaiter final : public CancellableWait<SleepAwaiter>, public TimerNode {
public:
    explicit SleepAwaiter(std::chrono::steady_clock::time_point when) noexcept
        : TimerNode(&fire) {
        when_ = when;  // the timer node's own field: read again when it is queued
    }
    SleepAwaiter(const SleepAwaiter&) = delete;
    SleepAwaiter& operator=(const SleepAwaiter&) = delete;
    ~SleepAwaiter() {
        if (queued()) task_->loop_->remove_timer(this);
    }

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!begin("sleep", handle)) return false;
        // A deadline already past still yields once to the loop (sleep(0) is a checkpoint).
        task_->loop_->add_timer(this, when_);
        park();
        return true;
    }
    void await_resume() const { throw_if_cancelled(); }

    void abort() noexcept { task_->loop_->remove_timer(this); }

private:
    static void fire(TimerNode* self, bool run) {
        if (run) static_cast<SleepAwaiter*>(self)->wake();
    }
};

class CheckpointAwaiter {
public:
    using anyio_loop_awaitable = void;  // resumes the task only through the loop

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        task_ = &CancelScope::current_task("checkpoint");
        if (is_cancelled(*task_)) return false;
        task_->loop_->schedule_task(*task_, handle);  // yield: other ready tasks run first
        return true;
    }
    void await_resume() const {
        if (is_cancelled(*task_)) throw Cancelled{};
    }

private:
    TaskState* task_ = nullptr;
};

struct EventWaitersTag {};

}  // namespace detail

/// Suspends the task until `deadline` (a cancellation point; allocates nothing: the timer
/// node lives in the awaiter).
inline detail::SleepAwaiter sleep_until(std::chrono::steady_clock::time_point deadline) noexcept {
    return detail::SleepAwaiter{deadline};
}

/// Suspends the task for `delay` (a cancellation point; `sleep(0s)` yields once).
template <class Rep, class Period>
detail::SleepAwaiter sleep(std::chrono::duration<Rep, Period> delay) {
    return detail::SleepAwaiter{detail::deadline_after(current_time(), delay)};
}

/// Yields once to the loop and raises Cancelled if the task's scope was cancelled.
inline detail::CheckpointAwaiter checkpoint() noexcept { return {}; }

/// A one-shot event: wait() suspends until set() is called (at once if already set).
/// Waiters are intrusive nodes in their own frames: no allocation. wait() is a cancellation
/// point; a cancelled waiter unlinks itself in O(1).
///
/// Loop-thread only: set() and wait() bind the event to the loop that first uses it and throw
/// std::logic_error on any other thread (from a worker, set it through
/// from_thread::run_sync; from other threads, LoopToken::call_soon_threadsafe). Destroying an
/// event that tasks still wait on wakes them with std::logic_error saying so (set() it
/// first).
class Event {
    class Waiter;

public:
    Event() = default;
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    ~Event() {
        while (Waiter* waiter = waiters_.pop_front()) waiter->event_destroyed();
    }

    /// Sets the event and wakes every waiter (they resume on the next loop turn).
    void set() {
        affinity_.check("Event::set");
        if (set_) return;
        set_ = true;
        while (Waiter* waiter = waiters_.pop_front()) waiter->notify();
    }
    [[nodiscard]] bool is_set() const noexcept { return set_; }

    /// Waits until the event is set.
    [[nodiscard]] Waiter wait() {
        affinity_.check("Event::wait");
        return Waiter{*this};
    }

private:
    class Waiter final : public detail::CancellableWait<Waiter>,
                         public detail::ListHook<detail::EventWaitersTag> {
    public:
        explicit Waiter(Event& event) noexcept : event_(&event) {}
        Waiter(const Waiter&) = delete;
        Waiter& operator=(const Waiter&) = delete;
        ~Waiter() { abort(); }

        bool await_ready() const noexcept { return false; }
        bool await_suspend(std::coroutine_handle<> handle) {
            if (!begin("Event::wait", handle)) return false;
            if (event_->set_) {
                wake();  // already set: still a checkpoint (anyio), so yield once
            } else {
                event_->waiters_.push_back(*this);
                park();
            }
            return true;
        }
        void await_resume() const {
            throw_if_cancelled();
            if (event_destroyed_) {
                throw std::logic_error(
                    "anyio::Event::wait: the Event this task was waiting on was destroyed "
                    "before it was set; keep an Event alive until its waiters have been woken "
                    "(set() it before destroying it)");
            }
        }

        void abort() noexcept {
            if (ListHook<detail::EventWaitersTag>::linked()) {
                ListHook<detail::EventWaitersTag>::unlink();
            }
        }
        void notify() { wake(); }
        void event_destroyed() {
            event_destroyed_ = true;
            wake();
        }

    private:
        Event* event_;
        bool event_destroyed_ = false;
    };

    detail::IntrusiveList<Waiter, detail::EventWaitersTag> waiters_;
    detail::LoopAffinity affinity_;
    bool set_ = false;
};

}  // namespace anyio
