// The common shape of a cancellable suspension on the loop: remember the task and where to
// resume it, and on cancellation unlink (by the subclass's `abort`) and resume with Cancelled.
#pragma once

#include <coroutine>

#include "../cancel_scope.hpp"
#include "../errors.hpp"
#include "../event_loop.hpp"
#include "task_state.hpp"

namespace anyio::detail {

/// CRTP base: `Derived::abort()` unlinks the waiter from whatever it waits on (O(1)).
template <class Derived>
class CancellableWait : public Wait {
public:
    CancellableWait() noexcept : Wait(&cancel_thunk) {}

protected:
    /// Call from await_suspend. Returns false (do not suspend) if the task is already
    /// cancelled; await_resume then throws.
    bool begin(const char* what, std::coroutine_handle<> handle) {
        task_ = &CancelScope::current_task(what);
        if (is_cancelled(*task_)) {
            cancelled_ = true;
            return false;
        }
        handle_ = handle;
        return true;
    }
    /// The task now waits here and cancellation may reach it.
    void park() noexcept {
        task_->wait_ = this;
        task_->resume_point_ = handle_;
    }
    /// Normal completion: resume the task on the next loop turn.
    void wake() noexcept { task_->loop_->schedule_task(*task_, handle_); }
    void throw_if_cancelled() const {
        if (cancelled_) throw Cancelled{};
    }

    TaskState* task_ = nullptr;
    std::coroutine_handle<> handle_;
    bool cancelled_ = false;

private:
    static void cancel_thunk(Wait* self) {
        auto* waiter = static_cast<Derived*>(static_cast<CancellableWait*>(self));
        waiter->abort();
        waiter->cancelled_ = true;
        waiter->wake();
    }
};

}  // namespace anyio::detail
