// anyio-cpp: from_thread::run / run_sync / check_cancelled: calling back into the loop from a
// worker thread of to_thread::run_sync, or from any thread holding a LoopToken (event_loop.hpp).
// The caller blocks on its own stack; the call runs on the loop as a task or a callback. Plain
// threads with no loop use blocking_portal.hpp.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "cancel_scope.hpp"
#include "detail/context_data.hpp"
#include "detail/remote_inbox.hpp"
#include "detail/result.hpp"
#include "detail/runnable.hpp"
#include "detail/spin.hpp"
#include "detail/worker_thread.hpp"
#include "errors.hpp"
#include "event_loop.hpp"
#include "task.hpp"
#include "task_group.hpp"

namespace anyio::from_thread {
namespace detail {

/// Where a blocking call goes: the loop's inbox, and the worker's job if the caller is a
/// worker of that loop (its host task's scope then governs the call).
struct Target {
    anyio::detail::LoopShared* loop = nullptr;
    anyio::detail::JobBase* job = nullptr;
};

/// The tasks of a BlockingPortal, as its calls see them (loop side).
struct PortalTasks {
    TaskGroup* group = nullptr;  // the portal's task group, while it runs
    bool stopped = false;        // the portal no longer accepts calls (stop() was called)
};

/// Where the coroutine of a from_thread::run call (or of a portal call) runs.
struct UnderCaller {
    // A task of its own, under the scope of the task that called to_thread::run_sync on this
    // worker, so that cancelling that task cancels it; nullptr: no such task (a plain thread).
    anyio::detail::JobBase* job = nullptr;
};
struct InPortal {
    PortalTasks* tasks = nullptr;  // a child of the portal's task group
};
using SpawnTarget = std::variant<UnderCaller, InPortal>;

[[noreturn]] inline void throw_on_loop_thread(const char* what) {
    throw std::logic_error(std::string("anyio::from_thread::") + what +
                           " was called on the event loop's own thread, where it would block "
                           "the loop for ever; co_await the work directly instead");
}

inline Target resolve(const char* what) {
    anyio::detail::JobBase* job = anyio::detail::current_job;
    anyio::detail::LoopShared* loop = anyio::detail::current_worker_loop;
    if (job == nullptr || loop == nullptr) {
        if (EventLoop::current() != nullptr) throw_on_loop_thread(what);
        throw NoEventLoopError(std::string("anyio::from_thread::") + what +
                               ": this thread is not an anyio worker thread; pass a LoopToken "
                               "(anyio::lowlevel::current_token()) or use a BlockingPortal");
    }
    // A worker: the call goes to the loop whose job it runs. That loop never runs on a worker
    // thread, so it cannot be this thread's; a loop the worker runs itself (a nested
    // anyio::run) is another loop, which waits while the call blocks this thread.
    return {loop, job};
}

inline Target resolve(const LoopToken& token, const char* what) {
    if (!token) {
        throw NoEventLoopError(std::string("anyio::from_thread::") + what +
                               ": the LoopToken is empty; get one with "
                               "anyio::lowlevel::current_token() on the loop");
    }
    if (EventLoop* here = EventLoop::current(); here != nullptr && &here->shared() == token.shared()) {
        throw_on_loop_thread(what);
    }
    if (token.finished()) throw RunFinishedError();
    anyio::detail::JobBase* job = anyio::detail::current_worker_loop == token.shared()
                                      ? anyio::detail::current_job
                                      : nullptr;
    return {token.shared(), job};
}

/// A call parked on the calling thread's stack until the loop has handled it: no allocation.
/// It runs in a copy of the calling thread's context (context variables: a worker's is its
/// job's, a copy of the context of the task that called run_sync).
template <class R>
class BlockingCall : public anyio::detail::Runnable {
public:
    explicit BlockingCall(Invoke invoke) noexcept
        : Runnable(invoke),
          context_(anyio::detail::ContextRef::share(anyio::detail::current_context())) {}

    /// Posts the call and blocks until the loop finishes it; returns or rethrows. User work:
    /// refused (RunFinishedError) once the loop's main task has finished; a call that was
    /// posted but not run by then is disposed of with RunFinishedError.
    R post_and_wait(anyio::detail::LoopShared& loop) {
        if (!loop.post_user(this)) throw RunFinishedError();
        wait();
        return result_.take();
    }

    /// Loop side: the outcome is in result_; let the caller go. The caller may return (and
    /// free this object) as soon as `done_` flips, so it is the last write.
    void finish() noexcept {
        if (!result_.ready()) result_.set_exception(std::make_exception_ptr(RunFinishedError()));
        // release: the result written above is visible to the caller's acquire load.
        done_.store(1, std::memory_order_release);
        // A wake on memory the caller may already have released is harmless: the futex
        // syscall only compares an address (no user memory is touched after the store).
        anyio::detail::futex_wake(&done_);
    }

    anyio::detail::Result<R> result_;

protected:
    /// The caller's context, taken over (on the loop) by the code that runs the call.
    anyio::detail::ContextRef context_;

private:
    void wait() noexcept {
        // A short adaptive spin first: the loop usually answers within microseconds, and
        // sleeping costs a cross-vCPU wake-up (tens of microseconds on a VM).
        // acquire: pairs with finish()'s release store.
        if (wait_spin.spin([this] { return done_.load(std::memory_order_acquire) != 0; })) return;
        while (done_.load(std::memory_order_acquire) == 0) {  // acquire: as above
            anyio::detail::futex_wait(&done_, 0, nullptr);
        }
    }

    static inline thread_local anyio::detail::SpinPolicy wait_spin{};

    std::atomic<std::uint32_t> done_{0};
};

template <class F, class... Args>
class SyncCall final : public BlockingCall<std::invoke_result_t<F&, Args&...>> {
    using R = std::invoke_result_t<F&, Args&...>;

public:
    SyncCall(F& fn, Args&... args) noexcept
        : BlockingCall<R>(&invoke), fn_(fn), args_(args...) {}

private:
    static void invoke(anyio::detail::Runnable* self, bool run) {
        auto* call = static_cast<SyncCall*>(self);
        if (run) {
            anyio::detail::ContextScope in_context(std::move(call->context_));
            call->result_.capture([call]() -> R { return std::apply(call->fn_, call->args_); });
        }
        call->finish();
    }
    F& fn_;
    std::tuple<Args&...> args_;
};

template <class F, class... Args>
using async_result_t = typename std::invoke_result_t<F&, Args&...>::value_type;

/// Runs the coroutine `fn(args...)` as a new task on the loop, where `where` says: under the
/// calling worker's host scope (so cancelling the host cancels it), or in a portal's group.
template <class F, class... Args>
class AsyncCall final : public BlockingCall<async_result_t<F, Args...>> {
    using R = async_result_t<F, Args...>;

public:
    AsyncCall(SpawnTarget where, F& fn, Args&... args) noexcept
        : BlockingCall<R>(&invoke), where_(where), fn_(fn), args_(args...) {}

private:
    static void invoke(anyio::detail::Runnable* self, bool run) {
        auto* call = static_cast<AsyncCall*>(self);
        if (!run) {
            call->finish();
            return;
        }
        std::exception_ptr error;
        try {
            // The task starts with (a copy of) the caller's context.
            anyio::detail::ContextScope in_context(std::move(call->context_));
            call->start(*EventLoop::current());
        } catch (...) {
            error = std::current_exception();
        }
        // Release the caller only after the catch block has ended: until then this thread
        // still references the exception object the caller is about to rethrow.
        if (error) {
            call->result_.set_exception(std::move(error));
            call->finish();
        }
    }

    void start(EventLoop& loop) {
        Task<R> task = std::apply(fn_, args_);  // creates the frame; nothing runs yet
        const char* function = task.function_name();  // the task is named after it
        if (const auto* portal = std::get_if<InPortal>(&where_)) {
            PortalTasks& tasks = *portal->tasks;
            if (tasks.stopped || tasks.group == nullptr) throw RunFinishedError();
            Task<void> body = deliver(std::move(task), this);
            body.set_function_name(function);
            tasks.group->start_soon(std::move(body));
            return;
        }
        anyio::detail::JobBase* job = std::get<UnderCaller>(where_).job;
        CancelScope* parent = nullptr;
        anyio::detail::SpawnInfo info;
        if (job != nullptr) {
            if (job->caller_left()) {
                scope_.cancel();  // the host was cancelled and left: so is this call
            } else {
                parent = job->host_scope_;
                info.parent = job->host_;  // the task that called run_sync
            }
        }
        Task<void> body = deliver(std::move(task), this);
        body.set_function_name(function);
        scope_.activate(loop, parent);
        if (job != nullptr) job->call_scope_ = &scope_;
        try {
            scope_.adopt(loop.spawn(std::move(body), nullptr, nullptr, info));
        } catch (...) {
            // Out of memory: unlink the scope (it lives on the caller's stack) before the
            // caller is released with the error.
            if (job != nullptr) job->call_scope_ = nullptr;
            scope_.deactivate();
            throw;
        }
    }

    // Ends the call however the task ends: with a value, an exception, or its frame destroyed
    // at loop shutdown (the RAII finisher then reports RunFinishedError).
    static Task<void> deliver(Task<R> task, AsyncCall* call) {
        struct Finisher {
            AsyncCall* call;
            ~Finisher() {
                if (const auto* caller = std::get_if<UnderCaller>(&call->where_)) {
                    anyio::detail::JobBase* job = caller->job;
                    if (job != nullptr && job->call_scope_ == &call->scope_) {
                        job->call_scope_ = nullptr;
                    }
                    call->scope_.deactivate();
                }
                call->finish();
            }
        } finisher{call};
        co_await anyio::detail::deliver_result(std::move(task), &call->result_);
    }

    SpawnTarget where_;
    CancelScope scope_;  // the task's scope when it runs under the caller (UnderCaller)
    F& fn_;
    std::tuple<Args&...> args_;
};

template <class F, class... Args>
decltype(auto) call_sync(Target target, F& fn, Args&... args) {
    SyncCall<F, Args...> call(fn, args...);
    return call.post_and_wait(*target.loop);
}

template <class F, class... Args>
decltype(auto) call_async(anyio::detail::LoopShared& loop, SpawnTarget where, F& fn,
                          Args&... args) {
    AsyncCall<F, Args...> call(where, fn, args...);
    return call.post_and_wait(loop);
}

}  // namespace detail

/// From a worker thread (inside to_thread::run_sync): runs the coroutine `async_fn(args...)`
/// on the loop as a new task and blocks until it finishes; returns its value or rethrows.
/// The task runs under the scope of the task that called run_sync, so cancelling that task
/// cancels it too. The call goes to the loop whose job the worker runs, also from inside a
/// loop the worker runs itself (a nested anyio::run, which waits meanwhile). Throws
/// NoEventLoopError on a thread that is not a worker, std::logic_error on a loop thread that
/// is not a worker, RunFinishedError once the loop has finished. Allocates nothing but the
/// new task's frames.
template <class F, class... Args>
    requires(!std::same_as<std::decay_t<F>, LoopToken> && returns_task<F&, Args&...>)
decltype(auto) run(F&& async_fn, Args&&... args) {
    const detail::Target target = detail::resolve("run");
    return detail::call_async(*target.loop, detail::UnderCaller{target.job}, async_fn, args...);
}

/// The same from any thread, given a token of the loop.
template <class F, class... Args>
    requires returns_task<F&, Args&...>
decltype(auto) run(const LoopToken& token, F&& async_fn, Args&&... args) {
    const detail::Target target = detail::resolve(token, "run");
    return detail::call_async(*target.loop, detail::UnderCaller{target.job}, async_fn, args...);
}

/// From a worker thread: runs `fn(args...)` on the loop thread and blocks until it returns;
/// returns its value or rethrows. Errors as for run().
template <class F, class... Args>
    requires(!std::same_as<std::decay_t<F>, LoopToken> && std::invocable<F&, Args&...>)
decltype(auto) run_sync(F&& fn, Args&&... args) {
    return detail::call_sync(detail::resolve("run_sync"), fn, args...);
}

/// The same from any thread, given a token of the loop.
template <class F, class... Args>
    requires std::invocable<F&, Args&...>
decltype(auto) run_sync(const LoopToken& token, F&& fn, Args&&... args) {
    return detail::call_sync(detail::resolve(token, "run_sync"), fn, args...);
}

/// From a worker thread: throws Cancelled if the task that called to_thread::run_sync has
/// been cancelled (respecting shields, as the loop saw it when the cancellation came). Keeps
/// reporting it after the call was abandoned. Errors as for run().
inline void check_cancelled() {
    detail::Target target = detail::resolve("check_cancelled");
    // acquire: pairs with the loop's release store when the caller was cancelled.
    if (target.job->cancelled_.load(std::memory_order_acquire)) throw Cancelled{};
}

}  // namespace anyio::from_thread
