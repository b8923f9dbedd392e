// anyio-cpp: TaskGroup and task_group(), structured concurrency: the children started with
// start_soon run on the loop of event_loop.hpp under the group's CancelScope (cancel_scope.hpp),
// and task_group() returns only when all of them have ended. debug.hpp's named() names a child.
#pragma once

#include <algorithm>
#include <concepts>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cancel_scope.hpp"
#include "debug.hpp"
#include "detail/loop_thread.hpp"
#include "errors.hpp"
#include "event_loop.hpp"
#include "task.hpp"

namespace anyio {

class TaskGroup;

template <class F>
concept task_group_body = std::invocable<F&, TaskGroup&> &&
                          detail::is_task_v<std::invoke_result_t<F&, TaskGroup&>>;

template <class F>
    requires task_group_body<F>
Task<void> task_group(F body);

/// A nursery (trio) / task group (anyio): children started with start_soon run
/// concurrently; the group's task_group() call returns only when all of them have finished.
/// A child that fails cancels its siblings and the body; the group then rethrows that error
/// (several: ExceptionGroup). Cancelled children do not count as errors.
///
/// Loop-thread only: start_soon (and cancel_scope().cancel()) throw std::logic_error on
/// another thread. Each child costs its own coroutine frames plus one block for the loop's
/// bookkeeping (holding its name, if one is given), and start_soon keeps room for one error
/// per live child (so a failing child never allocates at its end). A child starts with a copy
/// of the context (context variables) of the code calling start_soon, and is named as
/// debug.hpp says; its parent (TaskInfo::parent_id) is the task running task_group(). With
/// several errors, the ExceptionGroup's message says which task raised each. At loop
/// shutdown, children still running are destroyed (newest first) without resuming. Only
/// task_group() creates a TaskGroup.
class TaskGroup {
public:
    TaskGroup(const TaskGroup&) = delete;
    TaskGroup& operator=(const TaskGroup&) = delete;

    /// Starts `task` as a child (it first runs on the next loop turn), named after its
    /// coroutine. Loop thread only (std::logic_error otherwise, as once the group has
    /// finished).
    void start_soon(Task<void> task) { start_child(std::move(task), {}); }

    /// The same, named `name`: `tg.start_soon(anyio::named("fetch user"), fetch_user(id))`.
    void start_soon(TaskName name, Task<void> task) { start_child(std::move(task), name.value); }

    /// Starts `fn(args...)` as a child; `fn` and `args` are decay-copied into the child's
    /// frame first, so a lambda's captures stay alive as long as the child runs. The child is
    /// named after the coroutine `fn` returns once it has made it (in its first step).
    template <class F, class... Args>
        requires returns_task<std::decay_t<F>, std::decay_t<Args>...>
    void start_soon(F&& fn, Args&&... args) {
        start_soon(TaskName{}, std::forward<F>(fn), std::forward<Args>(args)...);
    }

    /// The same, named `name`.
    template <class F, class... Args>
        requires returns_task<std::decay_t<F>, std::decay_t<Args>...>
    void start_soon(TaskName name, F&& fn, Args&&... args) {
        Task<void> body = call_in_frame(std::decay_t<F>(std::forward<F>(fn)),
                                        std::decay_t<Args>(std::forward<Args>(args))...);
        body.set_function_name(nullptr);  // not call_in_frame: the child names itself
        start_child(std::move(body), name.value);
    }

    /// The scope every child (and the body) runs in; cancel() it to cancel them all.
    [[nodiscard]] CancelScope& cancel_scope() noexcept { return scope_; }

private:
    template <class F>
        requires task_group_body<F>
    friend Task<void> task_group(F body);

    explicit TaskGroup(EventLoop& loop) noexcept : loop_(&loop) {}

    void start_child(Task<void> task, std::string_view name) {
        if (detail::current_loop != loop_) detail::throw_wrong_thread("TaskGroup::start_soon");
        require_active();
        reserve_error_slot();
        detail::TaskState& child =
            loop_->spawn(std::move(task), &on_child_done, this, detail::SpawnInfo{name, host_});
        scope_.adopt(child);
        ++live_children_;
    }

    template <class F, class... Args>
    static Task<void> call_in_frame(F fn, Args... args) {
        // The copies are passed on as rvalues, like std::thread does (move-only arguments).
        auto task = std::invoke(std::move(fn), std::move(args)...);
        // The child is named after the coroutine it runs, now that it exists (unless it was
        // given a name). relaxed: see TaskState::name_.
        detail::TaskState* self = detail::running_task;
        if (self != nullptr && self->name_.load(std::memory_order_relaxed) == nullptr) {
            self->name_.store(task.function_name(), std::memory_order_relaxed);
        }
        co_await std::move(task);
    }

    /// How an error's task is named in an ExceptionGroup's message: "task 'x' (id 3)". Empty
    /// if even that cannot be allocated (the error itself is kept either way).
    static std::string describe(const detail::TaskState& task) noexcept {
        try {
            // relaxed: see TaskState::name_.
            return "task '" + detail::task_display_name(task.name_.load(std::memory_order_relaxed), task.id_) +
                   "' (id " + std::to_string(task.id_) + ")";
        } catch (...) {
            return {};
        }
    }

    void require_active() const {
        if (!active_) {
            throw std::logic_error(
                "anyio::TaskGroup::start_soon: the task group has already finished; start "
                "children only while task_group() is running");
        }
    }

    /// Makes room for one more error than can still come (one per live child, one for the
    /// body, and the child about to start), so on_child_done, which runs where nothing may
    /// throw (a task's final suspend), never allocates. Grows geometrically: O(1) amortised.
    void reserve_error_slot() {
        const std::size_t needed = errors_.size() + live_children_ + 2;
        if (errors_.capacity() < needed) errors_.reserve(std::max(needed, 2 * errors_.capacity()));
        if (error_tasks_.capacity() < needed) {
            error_tasks_.reserve(std::max(needed, 2 * error_tasks_.capacity()));
        }
    }

    /// Records an error and who raised it (room reserved: nothing here allocates but the
    /// description, which may fail harmlessly).
    void add_error(std::exception_ptr error, const detail::TaskState& task) noexcept {
        errors_.push_back(std::move(error));
        error_tasks_.push_back(describe(task));
    }

    static void on_child_done(void* owner, detail::TaskState& child) noexcept {
        auto* group = static_cast<TaskGroup*>(owner);
        --group->live_children_;
        if (child.outcome_ == detail::TaskState::Outcome::failed) {
            group->add_error(child.error_, child);  // capacity reserved by start_soon
            group->scope_.cancel();
        } else if (child.outcome_ == detail::TaskState::Outcome::cancelled) {
            group->child_cancelled_ = true;
        }
        if (group->live_children_ == 0 && group->joining_) {
            group->joining_ = false;
            group->loop_->schedule_task(*group->host_, group->join_handle_);
        }
    }

    /// Waits for the children. Not itself cancellable: cancellation of the host reaches the
    /// children through the scope tree, and the host waits for them to finish unwinding.
    struct JoinAwaiter {
        using anyio_loop_awaitable = void;  // resumes the host only through the loop
        TaskGroup* group;
        bool await_ready() const noexcept { return group->live_children_ == 0; }
        void await_suspend(std::coroutine_handle<> handle) noexcept {
            group->joining_ = true;
            group->join_handle_ = handle;
            group->host_->wait_ = nullptr;
            group->host_->resume_point_ = handle;
        }
        void await_resume() const noexcept {}
    };

    [[noreturn]] void rethrow_errors() {
        if (errors_.size() == 1) std::rethrow_exception(errors_.front());
        throw ExceptionGroup(std::move(errors_), error_tasks_);
    }

    CancelScope scope_;
    EventLoop* loop_;
    detail::TaskState* host_ = nullptr;
    std::vector<std::exception_ptr> errors_;
    std::vector<std::string> error_tasks_;  // who raised each of errors_ (describe())
    std::coroutine_handle<> join_handle_;
    std::size_t live_children_ = 0;
    bool active_ = false;
    bool joining_ = false;
    bool child_cancelled_ = false;
};

/// Runs `body(tg)` with a fresh task group and waits for every child it starts:
///
///     co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
///         tg.start_soon(child(1));
///         tg.start_soon(child, 2);
///         co_return;
///     });
template <class F>
    requires task_group_body<F>
Task<void> task_group(F body) {
    detail::TaskState& host = CancelScope::current_task("task_group");
    TaskGroup group(*host.loop_);
    group.host_ = &host;
    group.errors_.reserve(1);  // the body's error, if it fails (as start_soon does per child)
    group.error_tasks_.reserve(1);
    bool body_cancelled = false;
    {
        CancelScope::Entry entry(group.scope_, host);  // the body runs in the group's scope
        group.active_ = true;
        try {
            co_await std::invoke(body, group);
        } catch (const Cancelled&) {
            body_cancelled = true;
        } catch (...) {
            group.add_error(std::current_exception(), host);
            group.scope_.cancel();
        }
        // A child may start another one after the last child ended but before we resume
        // (anyio keeps waiting then): wait until no child is left, then close the group.
        while (group.live_children_ > 0) co_await TaskGroup::JoinAwaiter{&group};
        group.active_ = false;
    }  // the host leaves the group's scope
    if (!group.errors_.empty()) group.rethrow_errors();
    // A cancellation that came from outside the group goes on to the scope that caused it.
    if ((body_cancelled || group.child_cancelled_) && !group.scope_.cancel_called()) {
        throw Cancelled{};
    }
}

}  // namespace anyio
