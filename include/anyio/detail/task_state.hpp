// What the loop knows about one running task, how the coroutine frames of a task are linked,
// and how control passes between them.
#pragma once

#include <atomic>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <exception>

#include "context_data.hpp"
#include "intrusive_list.hpp"
#include "runnable.hpp"

namespace anyio {
class CancelScope;
class EventLoop;
}  // namespace anyio

namespace anyio::detail {

/// Reports a misuse that leaves no safe way on (memory a suspended task still uses is going
/// away) and terminates, as std::thread's destructor does for a joinable thread.
[[noreturn]] inline void fatal_error(const char* message) noexcept {
    std::fputs("anyio: fatal error: ", stderr);
    std::fputs(message, stderr);
    std::fputc('\n', stderr);
    std::fflush(stderr);
    std::terminate();
}

struct ScopeTasksTag {};  // membership in the innermost cancel scope's task list
struct LiveTasksTag {};   // membership in the loop's list of live tasks (for shutdown)

/// A suspension that cancellation can reach. When the task's scope is cancelled while it is
/// suspended here, the loop calls `on_cancel`, which either aborts the wait (unlinking it in
/// O(1) and scheduling the task to resume with Cancelled) or, for shielded operations such as
/// a running run_sync, only passes the request on.
struct Wait {
    using OnCancel = void (*)(Wait* self);
    constexpr explicit Wait(OnCancel on_cancel) noexcept : on_cancel_(on_cancel) {}
    OnCancel on_cancel_;
};

// ---------------------------------------------------------------------------------------------
// The frames of a task
//
// A task is a chain of coroutine frames: its body, the Task the body awaits, the Task that one
// awaits, and so on down to the innermost frame, which is suspended at a loop primitive (or
// is running). Every `co_await task` links the two frames through the Task awaiter, which
// lives in the awaiting frame and owns the awaited one:
//
//     awaiting frame                                        awaited frame
//     promise: FrameLink                                    promise: FrameLink
//       awaiting_ ────► Task awaiter: TaskAwaitLink ◄──────── awaited_by_
//                         resume_   (the awaiting frame)
//                         awaited_  (the awaited frame: owned, destroyed with the awaiter)
//                         awaited_link_ ──────────────────► (its promise)
//       ◄──────────────── parent_   (the awaiting promise)
//
// The task's root (RootTask) is the Continuation of the body frame. Its resume_ is empty: the
// body's final suspend then finishes the task instead of resuming a caller. Loop shutdown
// walks awaiting_ / awaited_link_ down to the innermost frame and destroys the frames from
// there back up through awaited_by_ / parent_, one at a time, with no recursion and no
// allocation however deep the chain is.
// ---------------------------------------------------------------------------------------------

struct Continuation;

/// Base of every Task promise.
struct FrameLink {
    Continuation* awaited_by_ = nullptr;  // who awaits this frame: a Task awaiter or a root
    Continuation* awaiting_ = nullptr;    // the Task awaiter this frame is suspended in now
};

/// What awaits a Task frame: a Task awaiter (TaskAwaitLink) or a task's root (RootTask).
struct Continuation {
    std::coroutine_handle<> resume_;      // the awaiting frame; empty: this is a task's root
    std::coroutine_handle<> awaited_;     // the awaited frame, owned
    FrameLink* awaited_link_ = nullptr;   // its promise
};

/// The Continuation inside a Task awaiter: also knows the awaiting frame's promise.
struct TaskAwaitLink : Continuation {
    FrameLink* parent_ = nullptr;  // nullptr: the awaiting coroutine is not a Task
};

// ---------------------------------------------------------------------------------------------
// Passing control between the frames of a task
//
// Awaiting a Task and finishing one are symmetric transfers: await_suspend returns the frame
// to run next and the compiler jumps to it. Where the compiler makes that jump a tail call
// (clang; g++ from -O2), the stack stays flat for any chain of awaits. Where it does not (g++
// below -O2, some sanitizer builds), every transfer nests one more call, and a long chain of
// tasks that complete synchronously (1,000,000 sequential awaits, 100,000 nested ones) would
// overflow the stack. So a transfer checks how much stack the chain has used since the
// innermost driver (resume_chain, which the loop uses to resume a task) began: past
// `direct_transfer_stack` bytes it hands the frame to that driver instead (it records the
// frame and returns to it, unwinding the nested calls), and the driver resumes it. In builds
// with tail calls the check never fires. With no driver on the stack (a Task awaited from a
// coroutine the loop does not run), transfers are always direct.
// ---------------------------------------------------------------------------------------------

/// The innermost driver on this thread. Constant-initialised and trivially destructible, so
/// access is a plain TLS load.
struct Trampoline {
    void* next = nullptr;                   // a frame handed back to the driver to resume
    std::uintptr_t stack_base = 0;          // stack position of the driver; 0: no driver
};
inline thread_local Trampoline trampoline{};

/// How deep (in bytes of stack) a chain of direct transfers may nest before it goes through
/// the driver: small enough for any thread's stack, large enough that the driver is rarely
/// needed (every few dozen transfers in a build without tail calls).
inline constexpr std::uintptr_t direct_transfer_stack = 64 * 1024;

/// The frame a transfer to `next` must return from await_suspend: `next` itself (a direct
/// transfer), or a no-op frame after handing `next` to the driver.
inline std::coroutine_handle<> transfer_to(std::coroutine_handle<> next) noexcept {
    const Trampoline& t = trampoline;
    // The frame address, not a local's: under AddressSanitizer locals may live elsewhere.
    const auto here = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
    if (t.stack_base == 0 || t.stack_base - here < direct_transfer_stack) return next;
    trampoline.next = next.address();
    return std::noop_coroutine();
}

/// Resumes `handle` and whatever it transfers to, until the chain suspends at something that
/// is not a transfer (a loop primitive) or ends. The loop resumes every task through this.
/// Nests: it saves and restores the stack position of the driver it runs inside, if any
/// (`next` is always empty when a driver starts: a frame handed back unwinds straight to
/// its driver, with no code running in between).
inline void resume_chain(std::coroutine_handle<> handle) noexcept {
    Trampoline& t = trampoline;
    const std::uintptr_t outer_base = t.stack_base;
    t.stack_base = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
    handle.resume();
    while (void* next = t.next) {
        t.next = nullptr;
        std::coroutine_handle<>::from_address(next).resume();
    }
    t.stack_base = outer_base;
}

// ---------------------------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------------------------

void run_task(Runnable* self, bool run);  // defined in event_loop.hpp

/// One task of a loop: a Runnable the loop resumes at resume_point_, the innermost cancel
/// scope it runs in and the cancellable wait it is suspended at; its context (the values of
/// context variables it sees: context_data.hpp) and what get_current_task() reports about it.
/// It lives in the task's root (detail/root_task.hpp), allocated once per task.
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
        release(context_);
    }

    EventLoop* loop_ = nullptr;
    CancelScope* scope_ = nullptr;       // innermost scope; nullptr: none (never cancelled)
    Wait* wait_ = nullptr;               // the cancellable wait it is suspended at
    std::coroutine_handle<> resume_point_;
    OnDone on_done_ = nullptr;           // called with owner_ when the task has ended
    void* owner_ = nullptr;
    std::exception_ptr error_;           // set when the outcome is failed or cancelled
    ContextMap* context_ = nullptr;      // one reference; nullptr: no variable set
    // The coroutine function's name (a string literal from the compiler) or the name given to
    // the task (stored after the RootTask, in the same block); nullptr: none known (yet).
    // Written on the loop thread, at spawn or in the task's first step; atomic because the
    // blocked-loop detector's watchdog thread may read it meanwhile (relaxed everywhere: the
    // characters it points to never change; loop_monitor.hpp says how they stay alive).
    std::atomic<const char*> name_{nullptr};
    std::uint64_t id_ = 0;               // unique within the loop, from 1, in spawn order
    std::uint64_t parent_id_ = 0;        // the task that started it (a group's host); 0: none
    Outcome outcome_ = Outcome::running;
};

/// The task the loop is running on this thread right now (nullptr between tasks, in a plain
/// callback, and on threads that run no loop). Constant-initialised: a plain TLS load.
inline thread_local TaskState* running_task = nullptr;

/// The context code on this thread sees now: the running task's, else the thread's own (see
/// context_data.hpp). A plain TLS load or two.
inline ContextMap* current_context() noexcept {
    TaskState* task = running_task;
    return task != nullptr ? task->context_ : thread_context.map;
}

/// Told just before a task's block is freed (the blocked-loop detector: its watchdog thread may
/// be reading the task's name). Set by a loop for the duration of its run() on its own thread;
/// nullptr (the detector is off): a task's end costs one TLS load more.
struct TaskEndWatcher {
    void (*task_ending)(TaskEndWatcher* self, TaskState& task) noexcept;
};
inline thread_local TaskEndWatcher* task_end_watcher = nullptr;

/// More than zero while the loop destroys the frames of tasks still suspended (shutdown):
/// objects that must not be destroyed while in use by a suspended task (a cancel scope a task
/// is inside, a Task frame being awaited) may then go, in the order the loop chooses.
inline thread_local int destroying_suspended_frames = 0;

}  // namespace anyio::detail
