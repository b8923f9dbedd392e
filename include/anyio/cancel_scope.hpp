// anyio-cpp: CancelScope, move_on_after, fail_after.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "detail/intrusive_list.hpp"
#include "detail/task_state.hpp"
#include "detail/timer_heap.hpp"
#include "errors.hpp"
#include "event_loop.hpp"
#include "task.hpp"

namespace anyio {

namespace detail {
struct ScopeChildrenTag {};

/// What `scope.run(task)` yields: std::optional<T> (a reference_wrapper for references),
/// and for Task<void> a bool that is true when the task ran to completion.
template <class T>
struct ScopeResult {
    using type = std::optional<T>;
};
template <class T>
struct ScopeResult<T&> {
    using type = std::optional<std::reference_wrapper<T>>;
};
template <>
struct ScopeResult<void> {
    using type = bool;
};
}  // namespace detail

template <class T>
using scope_result_t = typename detail::ScopeResult<T>::type;

/// A cancel scope, as in trio and anyio: cancelling it (by cancel() or by its deadline)
/// makes every task running inside it raise Cancelled at its next cancellation point, and
/// wakes those suspended at one right away. A shielded scope is not reached by cancellation
/// from outside. `co_await scope.run(task)` runs `task` inside the scope; a Cancelled raised
/// because this scope was cancelled stops there (cancelled_caught() is then true).
///
/// Loop-thread only. Entering allocates nothing but the run() coroutine frame; the deadline
/// is a node in the loop's timer heap, removed in O(log n) when the scope exits. A scope is
/// entered at most once.
class CancelScope : public detail::ListHook<detail::ScopeChildrenTag> {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    explicit CancelScope(time_point deadline = time_point::max(), bool shield = false) noexcept
        : deadline_(deadline), shield_(shield) {
        deadline_timer_.scope = this;
    }
    CancelScope(const CancelScope&) = delete;
    CancelScope& operator=(const CancelScope&) = delete;
    ~CancelScope() { detach_all(); }

    /// Cancels the scope: tasks inside raise Cancelled at their next cancellation point.
    void cancel() {
        if (cancel_called_) return;
        cancel_called_ = true;
        if (active_) {
            loop_->remove_timer(&deadline_timer_);
            deliver();
        }
    }

    [[nodiscard]] bool cancel_called() const noexcept { return cancel_called_; }
    [[nodiscard]] bool cancelled_caught() const noexcept { return cancelled_caught_; }
    [[nodiscard]] time_point deadline() const noexcept { return deadline_; }
    [[nodiscard]] bool shield() const noexcept { return shield_; }

    /// Moves the deadline (also while tasks wait inside; a past deadline cancels at once).
    void set_deadline(time_point deadline) {
        deadline_ = deadline;
        if (active_ && !cancel_called_) arm_deadline();
    }

    /// Shields the scope from outside cancellation, or lifts the shield (which delivers a
    /// cancellation already pending outside).
    void set_shield(bool shield) {
        bool was = shield_;
        shield_ = shield;
        if (active_ && was && !shield && parent_cancelled()) deliver();
    }

    /// Runs `task` inside this scope. Yields std::optional<T> (empty if the task was
    /// cancelled by this scope), or for Task<void> a bool (false if it was).
    template <class T>
    Task<scope_result_t<T>> run(Task<T> task) {
        detail::TaskState& host = current_task("CancelScope::run");
        enter(host);
        struct Exit {
            CancelScope* scope;
            detail::TaskState* task;
            ~Exit() { scope->exit(*task); }
        } exit_guard{this, &host};
        try {
            if constexpr (std::is_void_v<T>) {
                co_await std::move(task);
                co_return true;
            } else if constexpr (std::is_reference_v<T>) {
                T value = co_await std::move(task);
                co_return std::ref(value);
            } else {
                co_return scope_result_t<T>(co_await std::move(task));
            }
        } catch (const Cancelled&) {
            // Caught here only if this scope was cancelled and no cancelled enclosing scope
            // is visible from it (trio's and anyio's rule); otherwise it goes on outwards.
            if (!cancel_called_ || (!shield_ && parent_cancelled())) throw;
            cancelled_caught_ = true;
        }
        co_return scope_result_t<T>{};
    }

    // ---- Low-level, for the library's task groups and cross-thread calls ----

    /// Makes `task` run inside this scope from its start (a task group's child).
    void adopt(detail::TaskState& task) noexcept {
        if (task.ListHook<detail::ScopeTasksTag>::linked()) {
            task.ListHook<detail::ScopeTasksTag>::unlink();
        }
        tasks_.push_back(task);
        task.scope_ = this;
        if (active_ && effectively_cancelled(this) && task.wait_ != nullptr) {
            task.wait_->on_cancel_(task.wait_);
        }
    }

    /// Activates the scope as a child of `parent` without a host task (a scope owned by a
    /// cross-thread call: its task is adopted afterwards).
    void activate(EventLoop& loop, CancelScope* parent) {
        mark_entered(loop);
        attach_to(parent);
        arm_deadline();
    }
    /// Ends a scope started with activate(): unlinks it and whatever is still attached.
    void deactivate() noexcept {
        active_ = false;
        detach_all();
    }
    /// Undoes activate() or cuts the scope loose from its parent (the parent is going away).
    void detach_from_parent() noexcept {
        if (detail::ListHook<detail::ScopeChildrenTag>::linked()) {
            detail::ListHook<detail::ScopeChildrenTag>::unlink();
        }
        parent_ = nullptr;
    }

    void enter(detail::TaskState& task) {
        mark_entered(*task.loop_);
        attach_to(task.scope_);
        adopt(task);
        arm_deadline();
    }

    void exit(detail::TaskState& task) noexcept {
        if (!active_) return;
        active_ = false;
        loop_->remove_timer(&deadline_timer_);
        if (task.ListHook<detail::ScopeTasksTag>::linked()) {
            task.ListHook<detail::ScopeTasksTag>::unlink();
        }
        task.scope_ = parent_;
        if (parent_ != nullptr) parent_->tasks_.push_back(task);
        detach_all();
    }

    /// True if a task whose innermost scope is `scope` must raise Cancelled: some scope on
    /// the way out was cancelled before a shielded one is reached.
    static bool effectively_cancelled(const CancelScope* scope) noexcept {
        for (; scope != nullptr; scope = scope->parent_) {
            if (scope->cancel_called_) return true;
            if (scope->shield_) return false;
        }
        return false;
    }

    static detail::TaskState& current_task(const char* what) {
        EventLoop& loop = detail::running_loop(what);
        detail::TaskState* task = loop.current_task();
        if (task == nullptr) {
            throw std::logic_error(std::string("anyio::") + what +
                                   " must be awaited from a task run by the loop");
        }
        return *task;
    }

private:
    struct DeadlineTimer final : detail::TimerNode {
        DeadlineTimer() noexcept : TimerNode(&fire) {}
        static void fire(TimerNode* self, bool run) {
            if (run) static_cast<DeadlineTimer*>(self)->scope->cancel();
        }
        CancelScope* scope = nullptr;
    };

    void mark_entered(EventLoop& loop) {
        if (entered_) {
            throw std::logic_error(
                "anyio::CancelScope: this scope was already entered once; a cancel scope "
                "is single-use, create a new one");
        }
        entered_ = true;
        active_ = true;
        loop_ = &loop;
    }

    void attach_to(CancelScope* parent) noexcept {
        parent_ = parent;
        if (parent != nullptr) parent->children_.push_back(*this);
    }

    void arm_deadline() {
        loop_->remove_timer(&deadline_timer_);
        if (cancel_called_ || deadline_ == time_point::max()) return;
        if (deadline_ <= loop_->time()) {
            cancel();
        } else {
            loop_->add_timer(&deadline_timer_, deadline_);
        }
    }

    [[nodiscard]] bool parent_cancelled() const noexcept {
        return effectively_cancelled(parent_);
    }

    /// Wakes every task suspended at a cancellation point inside this scope, down through
    /// nested scopes that are not shielded.
    void deliver() {
        tasks_.for_each([](detail::TaskState& task) {
            if (task.wait_ != nullptr) task.wait_->on_cancel_(task.wait_);
        });
        children_.for_each([](CancelScope& child) {
            if (!child.shield_) child.deliver();
        });
    }

    /// Unlinks everything still attached (only at loop shutdown, when frames are destroyed
    /// out of structured order, or when a scope exits with stragglers).
    void detach_all() noexcept {
        if (deadline_timer_.queued()) loop_->remove_timer(&deadline_timer_);
        while (CancelScope* child = children_.pop_front()) child->parent_ = nullptr;
        while (detail::TaskState* task = tasks_.pop_front()) task->scope_ = nullptr;
        detach_from_parent();
    }

    detail::IntrusiveList<CancelScope, detail::ScopeChildrenTag> children_;
    detail::IntrusiveList<detail::TaskState, detail::ScopeTasksTag> tasks_;
    DeadlineTimer deadline_timer_;
    CancelScope* parent_ = nullptr;
    EventLoop* loop_ = nullptr;
    time_point deadline_;
    bool shield_;
    bool cancel_called_ = false;
    bool cancelled_caught_ = false;
    bool active_ = false;
    bool entered_ = false;
};

namespace detail {

/// True if the task must raise Cancelled at a cancellation point now.
inline bool is_cancelled(const TaskState& task) noexcept {
    return CancelScope::effectively_cancelled(task.scope_);
}

}  // namespace detail

/// Runs `task` with a deadline `delay` from now; on timeout yields an empty optional (false
/// for Task<void>) instead of the result.
template <class Rep, class Period, class T>
Task<scope_result_t<T>> move_on_after(std::chrono::duration<Rep, Period> delay, Task<T> task) {
    EventLoop& loop = detail::running_loop("move_on_after");
    CancelScope scope(detail::deadline_after(loop.time(), delay));
    co_return co_await scope.run(std::move(task));
}

/// Runs `task` with a deadline `delay` from now; throws TimeoutError on timeout.
template <class Rep, class Period, class T>
Task<T> fail_after(std::chrono::duration<Rep, Period> delay, Task<T> task) {
    EventLoop& loop = detail::running_loop("fail_after");
    CancelScope scope(detail::deadline_after(loop.time(), delay));
    auto result = co_await scope.run(std::move(task));
    if (scope.cancelled_caught()) throw TimeoutError();
    if constexpr (std::is_void_v<T>) {
        co_return;
    } else if constexpr (std::is_reference_v<T>) {
        co_return result->get();
    } else {
        co_return std::move(*result);
    }
}

}  // namespace anyio
