// What the loop knows about one running task (a coroutine started by run(), a task group or
// a portal): where to resume it, the innermost cancel scope it runs in, and the cancellable
// wait it is suspended at, if any. It lives in the task's root coroutine frame.
#pragma once

#include <coroutine>
#include <exception>

#include "intrusive_list.hpp"
#include "runnable.hpp"

namespace anyio {
class CancelScope;
class EventLoop;
}  // namespace anyio

namespace anyio::detail {

struct ScopeTasksTag {};  // membership in the innermost cancel scope's task list
struct LiveTasksTag {};   // membership in the loop's list of live tasks (for shutdown)

/// A suspension that cancellation can reach. When the task's scope is cancelled while it is
/// suspended here, the loop calls `on_cancel`, which either aborts the wait (unlinking it in
/// O(1) and scheduling the task to resume with Cancelled) or, for shielded operations such as
/// a running run_sync, only passes the request on.
struct Wait {
    using OnCancel = void (*)(Wait* self);
    explicit Wait(OnCancel on_cancel) noexcept : on_cancel_(on_cancel) {}
    OnCancel on_cancel_;
};

void run_task(Runnable* self, bool run);  // defined in event_loop.hpp

class TaskState : public Runnable,
                  public ListHook<ScopeTasksTag>,
                  public ListHook<LiveTasksTag> {
public:
    enum class Outcome : unsigned char { running, completed, cancelled, failed };
    using OnDone = void (*)(void* owner, TaskState& task);

    TaskState() noexcept : Runnable(&run_task) {}
    TaskState(const TaskState&) = delete;
    TaskState& operator=(const TaskState&) = delete;
    ~TaskState() {
        if (ListHook<ScopeTasksTag>::linked()) ListHook<ScopeTasksTag>::unlink();
        if (ListHook<LiveTasksTag>::linked()) ListHook<LiveTasksTag>::unlink();
    }

    EventLoop* loop_ = nullptr;
    CancelScope* scope_ = nullptr;       // innermost scope; nullptr: none (never cancelled)
    Wait* wait_ = nullptr;               // the cancellable wait it is suspended at
    std::coroutine_handle<> resume_point_;
    OnDone on_done_ = nullptr;
    void* owner_ = nullptr;
    std::exception_ptr error_;           // set when the outcome is failed or cancelled
    Outcome outcome_ = Outcome::running;
};

}  // namespace anyio::detail
