// anyio-cpp: CancelScope, move_on_after, fail_after: trio/anyio cancellation. Scopes form a tree
// per loop; every wait of event.hpp, capacity_limiter.hpp, sync.hpp, memory_stream.hpp and the
// sockets is a cancellation point through detail/wait.hpp. task_group.hpp owns one scope per
// group; to_thread.hpp decides how a running call meets a cancellation (shielded or abandoned).
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "detail/intrusive_list.hpp"
#include "detail/loop_thread.hpp"
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
/// Loop-thread only: cancel(), set_deadline(), set_shield() and entering bind the scope to
/// the loop that first uses it and throw std::logic_error on any other thread (use
/// from_thread::run_sync or call_soon_threadsafe). Entering allocates nothing but the run()
/// coroutine frame and costs O(1) however deeply scopes nest (each scope caches whether it is
/// effectively cancelled); cancelling visits the scopes inside it iteratively. The deadline
/// is a node in the loop's timer heap, removed in O(log n) when the scope exits. A scope is
/// entered at most once (std::logic_error otherwise), and must outlive its entry: destroying
/// a scope while a task is inside it terminates with a message (at loop shutdown, when the
/// frames of suspended tasks are destroyed, it is allowed).
class CancelScope : public detail::ListHook<detail::ScopeChildrenTag> {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;

    class Entry;

    explicit CancelScope(time_point deadline = time_point::max(), bool shield = false) noexcept
        : deadline_(deadline), shield_(shield) {
        deadline_timer_.scope = this;
    }
    CancelScope(const CancelScope&) = delete;
    CancelScope& operator=(const CancelScope&) = delete;
    ~CancelScope() {
        if (active_ && detail::destroying_suspended_frames == 0) {
            detail::fatal_error(
                "anyio::CancelScope: a cancel scope was destroyed while a task was still inside "
                "it; a scope must outlive the scope.run() (or task group) that entered it");
        }
        detach_all();
    }

    /// Cancels the scope: tasks inside raise Cancelled at their next cancellation point.
    void cancel() {
        affinity_.check("CancelScope::cancel");
        if (cancel_called_) return;
        cancel_called_ = true;
        if (active_) {
            loop_->remove_timer(&deadline_timer_);
            propagate();
        }
    }

    [[nodiscard]] bool cancel_called() const noexcept { return cancel_called_; }
    [[nodiscard]] bool cancelled_caught() const noexcept { return cancelled_caught_; }
    [[nodiscard]] time_point deadline() const noexcept { return deadline_; }
    [[nodiscard]] bool shield() const noexcept { return shield_; }

    /// Moves the deadline (also while tasks wait inside; a past deadline cancels at once).
    void set_deadline(time_point deadline) {
        affinity_.check("CancelScope::set_deadline");
        deadline_ = deadline;
        if (active_ && !cancel_called_) {
            loop_->remove_timer(&deadline_timer_);
            arm_deadline();
        }
    }

    /// Shields the scope from outside cancellation, or lifts the shield (which delivers a
    /// cancellation already pending outside).
    void set_shield(bool shield) {
        affinity_.check("CancelScope::set_shield");
        if (shield_ == shield) return;
        shield_ = shield;
        if (active_) propagate();
    }

    /// Runs `task` inside this scope. Yields std::optional<T> (empty if the task was
    /// cancelled by this scope), or for Task<void> a bool (false if it was).
    template <class T>
    Task<scope_result_t<T>> run(Task<T> task);

    // ---- Low-level, for the library's task groups and cross-thread calls ----

    /// Makes `task` run inside this scope from now on (a task group's child, a cross-thread
    /// call's task); a waiting task of an effectively cancelled scope is woken at once. O(1).
    void adopt(detail::TaskState& task) noexcept {
        if (task.ListHook<detail::ScopeTasksTag>::linked()) {
            task.ListHook<detail::ScopeTasksTag>::unlink();
        }
        tasks_.push_back(task);
        task.scope_ = this;
        if (active_ && effective_ && task.wait_ != nullptr) task.wait_->on_cancel_(task.wait_);
    }

    /// The verbs of the Entry, for code that cannot hold one in a single frame (a scope
    /// activated on the loop by one object and ended by another): activate() is the
    /// host-less Entry's constructor, deactivate() its destructor; enter(task) / exit(task)
    /// those of an Entry with a host.
    void activate(EventLoop& loop, CancelScope* parent) { enter_scope(loop, parent, nullptr); }
    void deactivate() noexcept { leave_scope(nullptr); }
    void enter(detail::TaskState& task) { enter_scope(*task.loop_, task.scope_, &task); }
    void exit(detail::TaskState& task) noexcept { leave_scope(&task); }

    /// Cuts the scope loose from its parent (the parent is going away): outside cancellation
    /// no longer reaches it.
    void detach_from_parent() noexcept {
        if (detail::ListHook<detail::ScopeChildrenTag>::linked()) {
            detail::ListHook<detail::ScopeChildrenTag>::unlink();
        }
        parent_ = nullptr;
        if (active_) propagate();
    }

    /// True if a task whose innermost scope is `scope` must raise Cancelled: some scope on
    /// the way out was cancelled before a shielded one is reached. O(1): each scope caches it.
    static bool effectively_cancelled(const CancelScope* scope) noexcept {
        return scope != nullptr && scope->effective_;
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

    /// Enters the scope as a child of `parent`, with `host` (if any) moving inside. The one
    /// step that can fail (arming the deadline: bad_alloc) comes before anything is linked,
    /// so a failed entry leaves the scope, its parent and the host as they were.
    void enter_scope(EventLoop& loop, CancelScope* parent, detail::TaskState* host) {
        affinity_.check("CancelScope::run");
        if (entered_) {
            throw std::logic_error(
                "anyio::CancelScope: this scope was already entered once; a cancel scope "
                "is single-use, create a new one");
        }
        loop_ = &loop;
        arm_deadline();
        entered_ = true;
        active_ = true;
        parent_ = parent;
        if (parent != nullptr) parent->children_.push_back(*this);
        effective_ = computed_effective();
        if (host != nullptr) adopt(*host);
    }

    /// Leaves the scope: `host` (if any) goes back to the parent scope, and whatever is still
    /// attached is cut loose.
    void leave_scope(detail::TaskState* host) noexcept {
        if (!active_) return;
        active_ = false;
        if (host != nullptr) {
            if (host->ListHook<detail::ScopeTasksTag>::linked()) {
                host->ListHook<detail::ScopeTasksTag>::unlink();
            }
            host->scope_ = parent_;
            if (parent_ != nullptr) parent_->tasks_.push_back(*host);
        }
        detach_all();
    }

    /// Queues the deadline timer, or cancels now if the deadline has passed (before the
    /// scope is linked anywhere, that only marks it). Throws bad_alloc with nothing queued.
    void arm_deadline() {
        if (cancel_called_ || deadline_ == time_point::max()) return;
        if (deadline_ <= loop_->time()) {
            cancel();
        } else {
            loop_->add_timer(&deadline_timer_, deadline_);
        }
    }

    /// Whether a task inside must raise Cancelled, from this scope's own state and its
    /// parent's cached one.
    [[nodiscard]] bool computed_effective() const noexcept {
        return cancel_called_ || (!shield_ && parent_ != nullptr && parent_->effective_);
    }

    /// This scope catches the Cancelled it sees (trio's and anyio's rule): it was cancelled
    /// itself and no cancelled enclosing scope is visible from it (one would take precedence).
    [[nodiscard]] bool catches_own_cancellation() const noexcept {
        return cancel_called_ && !(!shield_ && parent_ != nullptr && parent_->effective_);
    }

    /// Brings the cached state of this scope and of the scopes inside it up to date after a
    /// change (cancel, shield, parent), waking the waiting tasks of each scope that became
    /// effectively cancelled. Iterative (a pre-order walk over the scope tree through the
    /// parent and sibling links, no recursion, no allocation); it skips every subtree whose
    /// root did not change, so the scopes already cancelled are not visited again.
    void propagate() {
        CancelScope* node = this;
        for (;;) {
            if (node->refresh()) {
                if (CancelScope* child = node->children_.front()) {
                    node = child;
                    continue;
                }
            }
            // On to the next sibling of `node` or of its nearest ancestor below `this`.
            for (;;) {
                if (node == this) return;
                CancelScope* parent = node->parent_;
                if (CancelScope* sibling = parent->children_.next(*node)) {
                    node = sibling;
                    break;
                }
                node = parent;
            }
        }
    }

    /// Recomputes the cached state; wakes the waiting tasks if it became true. Returns whether
    /// it changed (the scopes inside depend on it then).
    bool refresh() {
        const bool effective = computed_effective();
        if (effective == effective_) return false;
        effective_ = effective;
        if (effective) {
            tasks_.for_each([](detail::TaskState& task) {
                if (task.wait_ != nullptr) task.wait_->on_cancel_(task.wait_);
            });
        }
        return true;
    }

    /// Unlinks everything still attached (only at loop shutdown, when frames are destroyed
    /// out of structured order, or when a scope exits with stragglers).
    void detach_all() noexcept {
        if (deadline_timer_.queued()) loop_->remove_timer(&deadline_timer_);
        while (CancelScope* child = children_.pop_front()) {
            child->parent_ = nullptr;
            // The scopes inside lose what they inherited: nothing becomes cancelled, so
            // nothing is delivered (and nothing can throw).
            child->propagate();
        }
        while (detail::TaskState* task = tasks_.pop_front()) task->scope_ = nullptr;
        if (detail::ListHook<detail::ScopeChildrenTag>::linked()) {
            detail::ListHook<detail::ScopeChildrenTag>::unlink();
        }
        parent_ = nullptr;
    }

    detail::IntrusiveList<CancelScope, detail::ScopeChildrenTag> children_;
    detail::IntrusiveList<detail::TaskState, detail::ScopeTasksTag> tasks_;
    DeadlineTimer deadline_timer_;
    CancelScope* parent_ = nullptr;
    EventLoop* loop_ = nullptr;
    detail::LoopAffinity affinity_;
    time_point deadline_;
    bool shield_;
    bool cancel_called_ = false;
    bool cancelled_caught_ = false;
    bool effective_ = false;  // cached computed_effective() while active
    bool active_ = false;
    bool entered_ = false;
};

/// A scope entered for as long as the Entry lives: created where a scope begins (run(),
/// task_group()), destroyed where it ends. With a host task, the host runs inside the scope
/// until the entry ends and then returns to the scope it came from; without one (a
/// cross-thread call's scope), the task is adopted afterwards. Entering is O(1); a failed
/// entry (std::logic_error for a scope entered before, bad_alloc arming the deadline) leaves
/// nothing changed.
class CancelScope::Entry {
public:
    Entry(CancelScope& scope, detail::TaskState& host) : scope_(&scope), host_(&host) {
        scope.enter_scope(*host.loop_, host.scope_, &host);
    }
    Entry(CancelScope& scope, EventLoop& loop, CancelScope* parent) : scope_(&scope) {
        scope.enter_scope(loop, parent, nullptr);
    }
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;
    ~Entry() { scope_->leave_scope(host_); }

private:
    CancelScope* scope_;
    detail::TaskState* host_ = nullptr;
};

template <class T>
Task<scope_result_t<T>> CancelScope::run(Task<T> task) {
    Entry entry(*this, current_task("CancelScope::run"));
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
        if (!catches_own_cancellation()) throw;
        cancelled_caught_ = true;
    }
    co_return scope_result_t<T>{};
}

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
