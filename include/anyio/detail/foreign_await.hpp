// How a Task coroutine awaits things: the loop's own awaitables as they are, any other C++20
// awaitable (one wrapping a callback library, say) through a wrapper that makes its
// resumption behave like the loop's.
//
// The loop resumes a task through run_task: it records which task runs (running_task, which
// every primitive reads to find its task and cancel scope) and drives the chain of frames
// (resume_chain). A custom awaitable knows nothing of that and resumes the handle it was given
// directly, from a call_soon callback or wherever its library calls back. So a custom
// awaitable is not given the coroutine's own handle but that of a ForeignResumer, a tiny
// stand-in frame inside the wrapper whose resume() does what run_task does: it sets
// running_task, resumes the coroutine through resume_chain, and restores what it found. A
// foreign resumption then looks to the task exactly like a loop resumption.
#pragma once

#include <coroutine>
#include <type_traits>
#include <utility>

#include "loop_thread.hpp"
#include "task_state.hpp"

namespace anyio::detail {

/// An awaitable of the loop: it resumes the task only through the loop
/// (EventLoop::schedule_task), and is awaited as it is. The library's awaiters derive from
/// detail::Wait (as CancellableWait does) or declare `using anyio_loop_awaitable = void;`.
/// Anything else is wrapped in a ForeignAwaiter, which is also correct for a loop awaitable
/// (only slower), so forgetting the mark is harmless.
template <class A>
concept loop_awaitable = std::is_base_of_v<Wait, std::remove_cvref_t<A>> ||
                         requires { typename std::remove_cvref_t<A>::anyio_loop_awaitable; };

/// What a loop awaitable is awaited through: a reference to it (awaiters are not movable, and
/// g++ 12 copies an awaiter that await_transform returns by reference).
template <class A>
class LoopAwaitRef {
public:
    explicit LoopAwaitRef(A& awaitable) noexcept : awaitable_(&awaitable) {}
    decltype(auto) await_ready() { return awaitable_->await_ready(); }
    template <class Promise>
    decltype(auto) await_suspend(std::coroutine_handle<Promise> handle) {
        return awaitable_->await_suspend(handle);
    }
    decltype(auto) await_resume() { return awaitable_->await_resume(); }

private:
    A* awaitable_;
};

/// The marker a task suspended in a custom awaitable waits at. Cancellation cannot abort a
/// custom operation: it takes effect at the task's next cancellation point after the
/// awaitable resumes it.
inline void ignore_cancellation(Wait*) noexcept {}
inline constinit Wait foreign_wait{&ignore_cancellation};

/// The stand-in frame a custom awaitable resumes. Its first two members are laid out as every
/// coroutine frame begins with GCC and Clang (and MSVC): the addresses of the frame's resume
/// and destroy functions, each called with the frame's address. std::coroutine_handle<>'s
/// resume() and destroy() call through them (libstdc++'s noop_coroutine frame is built the
/// same way), so this object can be handed out as a coroutine_handle<>.
struct ForeignResumer {
    void (*resume_entry_)(void*) = &resume;
    void (*destroy_entry_)(void*) = &destroy;
    TaskState* task_ = nullptr;
    std::coroutine_handle<> target_;  // the suspended coroutine

    std::coroutine_handle<> handle() noexcept { return std::coroutine_handle<>::from_address(this); }

    static void resume(void* frame) noexcept {
        auto* self = static_cast<ForeignResumer*>(frame);
        // Copied first: resuming the coroutine destroys the awaiter holding *self.
        TaskState* const task = self->task_;
        const std::coroutine_handle<> target = self->target_;
        if (current_loop != task->loop_) {
            fatal_error(
                "a custom awaitable resumed a task on a thread that does not run the task's "
                "event loop; resume it on the loop thread (call_soon_threadsafe, or "
                "anyio::lowlevel::current_task().reschedule_threadsafe())");
        }
        if (task->wait_ == &foreign_wait) task->wait_ = nullptr;
        TaskState* const outer = running_task;  // a task that resumed this one inline, if any
        running_task = task;
        resume_chain(target);
        running_task = outer;
    }
    static void destroy(void*) noexcept {
        fatal_error(
            "a custom awaitable destroyed the coroutine handle it was given; a task's frames "
            "belong to the event loop: resume the handle (or reschedule the task) exactly once");
    }
};

/// The awaiter `a` gives (its operator co_await, member or not, or itself).
template <class A>
decltype(auto) get_awaiter(A&& awaitable) {
    if constexpr (requires { std::forward<A>(awaitable).operator co_await(); }) {
        return std::forward<A>(awaitable).operator co_await();
    } else if constexpr (requires { operator co_await(std::forward<A>(awaitable)); }) {
        return operator co_await(std::forward<A>(awaitable));
    } else {
        return std::forward<A>(awaitable);
    }
}

/// Awaits a custom awaitable from a task of the loop: the awaitable is given a
/// ForeignResumer's handle instead of the coroutine's, and while the task is suspended in it,
/// it waits at `foreign_wait` (so lowlevel::current_task().reschedule() knows it may resume
/// it). With no task running (a Task awaited outside the loop), the awaitable gets the
/// coroutine's own handle.
template <class A>
class ForeignAwaiter {
    using Awaiter = decltype(get_awaiter(std::declval<A>()));  // a value, or a reference
    using Stored = std::conditional_t<std::is_reference_v<Awaiter>,
                                      std::remove_reference_t<Awaiter>*, Awaiter>;

public:
    explicit ForeignAwaiter(A&& awaitable) : awaiter_(make(std::forward<A>(awaitable))) {}
    ForeignAwaiter(const ForeignAwaiter&) = delete;
    ForeignAwaiter& operator=(const ForeignAwaiter&) = delete;

    decltype(auto) await_ready() { return awaiter().await_ready(); }

    template <class Promise>
    auto await_suspend(std::coroutine_handle<Promise> awaiting) {
        using Result = decltype(awaiter().await_suspend(std::coroutine_handle<>{}));
        TaskState* const task = running_task;
        std::coroutine_handle<> given = awaiting;
        if (task != nullptr) {
            resumer_.task_ = task;
            resumer_.target_ = awaiting;
            task->wait_ = &foreign_wait;
            task->resume_point_ = awaiting;
            given = resumer_.handle();
        }
        // Once the awaitable has the handle it may resume the coroutine at any moment (even
        // before returning), and that may destroy *this: only locals are touched afterwards.
        try {
            if constexpr (std::is_same_v<Result, bool>) {
                const bool suspended = awaiter().await_suspend(given);
                if (!suspended) clear(task);  // not suspended after all: it resumes at once
                return suspended;
            } else {
                return awaiter().await_suspend(given);
            }
        } catch (...) {
            clear(task);
            throw;
        }
    }

    decltype(auto) await_resume() { return awaiter().await_resume(); }

private:
    static Stored make(A&& awaitable) {
        if constexpr (std::is_reference_v<Awaiter>) {
            auto&& awaiter = get_awaiter(std::forward<A>(awaitable));
            return &awaiter;
        } else {
            return get_awaiter(std::forward<A>(awaitable));
        }
    }
    std::remove_reference_t<Awaiter>& awaiter() noexcept {
        if constexpr (std::is_reference_v<Awaiter>) {
            return *awaiter_;
        } else {
            return awaiter_;
        }
    }
    static void clear(TaskState* task) noexcept {
        if (task != nullptr && task->wait_ == &foreign_wait) task->wait_ = nullptr;
    }

    Stored awaiter_;
    ForeignResumer resumer_;
};

/// What a Task coroutine's `co_await x` awaits, for anything but a Task.
template <class A>
auto await_from_task(A&& awaitable) {
    if constexpr (loop_awaitable<A>) {
        return LoopAwaitRef<std::remove_reference_t<A>>{awaitable};
    } else {
        return ForeignAwaiter<A>{std::forward<A>(awaitable)};
    }
}

}  // namespace anyio::detail
