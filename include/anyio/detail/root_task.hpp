// The root coroutine of every task the loop runs (the main task, task group children,
// from_thread and portal tasks).
#pragma once

#include <coroutine>
#include <exception>
#include <utility>

#include "../errors.hpp"
#include "../task.hpp"
#include "intrusive_list.hpp"
#include "task_state.hpp"

namespace anyio::detail {

// The root coroutine of every task: it owns the TaskState (in its promise, so a task costs no
// allocation beyond its frames), runs the body, records how it ended, tells its owner and
// frees itself.
struct RootPromise;
struct RootCoroutine {
    using promise_type = RootPromise;
    std::coroutine_handle<RootPromise> handle;
};

struct RootPromise : TaskState, FrameLink {
    RootCoroutine get_return_object() noexcept {
        return {std::coroutine_handle<RootPromise>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    struct FinalAwaiter {
        bool await_ready() noexcept { return false; }
        void await_suspend(std::coroutine_handle<RootPromise> self) noexcept {
            RootPromise& task = self.promise();
            if (task.ListHook<ScopeTasksTag>::linked()) task.ListHook<ScopeTasksTag>::unlink();
            if (task.ListHook<LiveTasksTag>::linked()) task.ListHook<LiveTasksTag>::unlink();
            if (task.on_done_ != nullptr) task.on_done_(task.owner_, task);
            self.destroy();
        }
        void await_resume() noexcept {}
    };
    FinalAwaiter final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept {
        outcome_ = Outcome::failed;
        error_ = std::current_exception();
    }
};

struct PromiseAccess {
    RootPromise* promise = nullptr;
    bool await_ready() noexcept { return false; }
    bool await_suspend(std::coroutine_handle<RootPromise> self) noexcept {
        promise = &self.promise();
        return false;  // never actually suspends
    }
    RootPromise& await_resume() noexcept { return *promise; }
};

inline RootCoroutine root_coroutine(Task<void> body) {
    RootPromise& self = co_await PromiseAccess{};
    try {
        co_await std::move(body);
        self.outcome_ = TaskState::Outcome::completed;
    } catch (const Cancelled&) {
        self.outcome_ = TaskState::Outcome::cancelled;
        self.error_ = std::current_exception();
    } catch (...) {
        self.outcome_ = TaskState::Outcome::failed;
        self.error_ = std::current_exception();
    }
}

}  // namespace anyio::detail
