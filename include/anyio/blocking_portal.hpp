// anyio-cpp: BlockingPortal and start_blocking_portal: a loop running on a thread of its own, so
// that plain threads (no loop, not a worker) can call async code and wait for it. Built on
// event_loop.hpp (the portal thread runs a loop), task_group.hpp (the portal's tasks run in one
// group) and the blocking-call machinery of from_thread.hpp; from a worker thread of a loop, use
// from_thread.hpp directly.
#pragma once

#include <exception>
#include <atomic>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

#include <sys/prctl.h>

#include "event.hpp"
#include "event_loop.hpp"
#include "detail/context_data.hpp"
#include "detail/signal_mask.hpp"
#include "detail/worker_thread.hpp"
#include "from_thread.hpp"
#include "task.hpp"
#include "task_group.hpp"

namespace anyio {

/// An event loop running on a thread of its own, for code that is not async (a plain
/// main(), a test, a callback from a C library) to call coroutines and loop code through.
///
///     auto portal = anyio::start_blocking_portal();
///     int v = portal.call(async_fn, 1, 2);          // blocks; returns or rethrows
///     std::future<int> f = portal.start_task_soon(async_fn, 3);
///     portal.stop();                                 // also done by the destructor
///
/// Thread safety: call, start_task_soon and stop may be used from any number of threads at
/// once, except the portal's own loop thread (std::logic_error: it would deadlock). Tasks
/// run in one task group on the portal's loop; every call (a task or a plain callable) runs
/// in a copy of the calling thread's context (context variables, context.hpp), and a task is
/// named after the coroutine it runs (debug.hpp). call() allocates nothing beyond the task's
/// frames; start_task_soon() allocates one node (the arguments are copied into it). After
/// stop(), every call throws RunFinishedError. stop() waits for running tasks; stop(true)
/// cancels them first. The loop thread is named and joined by stop() or the destructor.
/// The destructor never blocks where that would deadlock: on the portal's own loop thread, or
/// on a worker thread of that loop, it asks the loop to stop, lets its thread go, and the
/// thread frees the portal's state once the loop has ended. The portal's thread blocks every
/// asynchronous signal and runs with the timer slack of the thread that started it.
class BlockingPortal {
public:
    BlockingPortal(BlockingPortal&&) noexcept = default;
    BlockingPortal& operator=(BlockingPortal&& other) noexcept {
        if (this != &other) {
            stop_noexcept();
            state_ = std::move(other.state_);
        }
        return *this;
    }
    ~BlockingPortal() { stop_noexcept(); }

    /// Runs the coroutine `fn(args...)` (a callable returning a Task) as a task of the portal,
    /// or the plain callable `fn(args...)` on the portal's loop thread; blocks until it
    /// finishes, returns its value or rethrows.
    template <class F, class... Args>
    decltype(auto) call(F&& fn, Args&&... args) {
        const LoopToken& token = running_token("call");
        if constexpr (returns_task<F&, Args&...>) {
            const from_thread::detail::Target target =
                from_thread::detail::resolve(token, "BlockingPortal::call");
            return from_thread::detail::call_async(
                *target.loop, from_thread::detail::InPortal{&state_->tasks}, fn, args...);
        } else {
            return from_thread::run_sync(token, fn, args...);
        }
    }

    /// Starts the coroutine `fn(args...)` as a task of the portal and returns a future of its
    /// result (which holds Cancelled if stop(true) cancelled it).
    template <class F, class... Args>
        requires returns_task<std::decay_t<F>&, std::decay_t<Args>&...>
    auto start_task_soon(F&& fn, Args&&... args) {
        using R = typename std::invoke_result_t<std::decay_t<F>&, std::decay_t<Args>&...>::value_type;
        const LoopToken& token = running_token("start_task_soon");
        from_thread::detail::resolve(token, "BlockingPortal::start_task_soon");
        auto node = std::make_unique<SpawnNode<R, std::decay_t<F>, std::decay_t<Args>...>>(
            state_.get(), std::forward<F>(fn), std::forward<Args>(args)...);
        std::future<R> future = node->promise.get_future();
        if (!token.post(node.get())) throw RunFinishedError();
        node.release();  // the loop owns it now
        return future;
    }

    /// Stops the portal: no new calls are accepted, running tasks are awaited (or cancelled
    /// first when `cancel_remaining`), and the loop thread is joined. Idempotent.
    void stop(bool cancel_remaining = false) {
        if (!state_) return;
        if (std::this_thread::get_id() == state_->loop_thread_id) {
            throw std::logic_error(
                "anyio::BlockingPortal::stop: called from the portal's own loop thread, which "
                "cannot wait for itself; stop it from another thread");
        }
        if (detail::current_worker_loop == state_->token.shared() &&
            !state_->stopped.load(std::memory_order_acquire)) {  // acquire: as below
            throw std::logic_error(
                "anyio::BlockingPortal::stop: called from a worker thread of the portal's own "
                "loop, which waits for this very call before it can stop; stop it from another "
                "thread");
        }
        // Several threads may stop a portal at once: one joins, the others wait for it.
        std::lock_guard<std::mutex> lock(state_->stop_mutex);
        if (state_->stopped.load(std::memory_order_acquire)) return;  // acquire: see below
        try {
            from_thread::run_sync(state_->token, [state = state_.get(), cancel_remaining] {
                state->tasks.stopped = true;  // refuse new calls from now on
                if (cancel_remaining && state->tasks.group != nullptr) {
                    state->tasks.group->cancel_scope().cancel();
                }
                state->stop_requested.set();
            });
        } catch (const RunFinishedError&) {
            // The loop already ended (e.g. a task crashed it): just join.
        }
        state_->thread.join();
        state_->stopped.store(true, std::memory_order_release);  // release: the join happened
    }

    /// A token of the portal's loop (for from_thread calls from other threads).
    [[nodiscard]] LoopToken token() const { return state_ ? state_->token : LoopToken{}; }

private:
    friend BlockingPortal start_blocking_portal(EventLoop::Options options);

    struct State;

    /// Stops the portal without waiting for it (its destructor, on the portal's own loop
    /// thread or on a worker thread of that loop): runs on the portal's loop thread, which
    /// then frees the state itself once its loop has ended.
    struct LetGoNode final : detail::Runnable {
        explicit LetGoNode(State* state) noexcept : Runnable(&invoke), state(state) {}
        static void invoke(detail::Runnable* self, bool run) noexcept {
            State* state = static_cast<LetGoNode*>(self)->state;
            if (run) {
                state->tasks.stopped = true;
                state->stop_requested.set();
            }
            state->frees_itself = true;
            state->thread.detach();  // this very thread: nobody will join it
        }
        State* state;
    };

    struct State {
        LoopToken token;
        from_thread::detail::PortalTasks tasks;  // loop side
        Event stop_requested;                    // loop side
        LetGoNode let_go{this};                  // posted once, by a destructor that cannot wait
        std::thread thread;
        std::thread::id loop_thread_id;
        std::mutex stop_mutex;
        std::atomic<bool> stopped{false};
        bool frees_itself = false;  // loop thread only (see LetGoNode)
    };

    template <class R, class F, class... Args>
    struct SpawnNode final : detail::Runnable {
        template <class Fn, class... As>
        SpawnNode(State* state, Fn&& fn, As&&... args)
            : Runnable(&invoke), state(state), fn(std::forward<Fn>(fn)),
              args(std::forward<As>(args)...),
              context(detail::ContextRef::share(detail::current_context())) {}

        static void invoke(detail::Runnable* self, bool run) {
            std::unique_ptr<SpawnNode> node(static_cast<SpawnNode*>(self));
            const from_thread::detail::PortalTasks& tasks = node->state->tasks;
            if (!run || tasks.stopped || tasks.group == nullptr) {
                node->promise.set_exception(std::make_exception_ptr(RunFinishedError()));
                return;
            }
            std::exception_ptr error;
            try {
                // The task starts with (a copy of) the calling thread's context.
                detail::ContextScope in_context(std::move(node->context));
                TaskGroup* group = tasks.group;
                Task<R> task = std::apply(node->fn, node->args);
                const char* function = task.function_name();  // the task is named after it
                Task<void> body = run_task(std::move(task), std::move(node));
                body.set_function_name(function);
                group->start_soon(std::move(body));
            } catch (...) {
                error = std::current_exception();
            }
            // Outside the catch block: the future's thread may rethrow at once.
            if (error && node) node->promise.set_exception(std::move(error));
        }

        static Task<void> run_task(Task<R> task, std::unique_ptr<SpawnNode> node) {
            co_await detail::deliver_result(std::move(task), &node->promise);
        }

        State* state;
        F fn;
        std::tuple<Args...> args;
        std::promise<R> promise;
        detail::ContextRef context;  // the calling thread's, until the task starts
    };

    explicit BlockingPortal(std::unique_ptr<State> state) noexcept : state_(std::move(state)) {}

    const LoopToken& running_token(const char* what) const {
        // acquire: pairs with stop()'s release store.
        if (!state_ || state_->stopped.load(std::memory_order_acquire) ||
            state_->token.finished()) {
            throw RunFinishedError(std::string("anyio::BlockingPortal::") + what +
                                   ": the portal has been stopped; start a new one");
        }
        return state_->token;
    }

    void stop_noexcept() noexcept {
        // acquire: as in running_token.
        if (!state_ || state_->stopped.load(std::memory_order_acquire)) return;
        if (std::this_thread::get_id() == state_->loop_thread_id) {
            // On its own loop thread, which cannot join itself: the loop stops and the thread
            // frees the state once run() has returned.
            State* state = state_.release();
            LetGoNode::invoke(&state->let_go, true);
            return;
        }
        if (detail::current_worker_loop == state_->token.shared()) {
            // On a worker thread of its own loop, whose shutdown waits for this very worker:
            // the same, through the loop's inbox.
            // Library work, not user work: accepted while the loop drains (its shutdown
            // waits for this worker), refused only once it has closed for good.
            State* state = state_.release();
            if (!state->token.shared()->post(&state->let_go)) {
                // The loop has already finished (it waits for no worker any more): its
                // thread is ending, so join it here.
                state->thread.join();
                delete state;
            }
            return;
        }
        try {
            stop();
        } catch (...) {
            // Only a system error from the mutex is left: nothing safe to do but let it run.
        }
    }

    std::unique_ptr<State> state_;
};

/// Starts an event loop on a new thread (named after `options.thread_name` with " portal"
/// semantics left to the caller) and returns a portal to it, once the loop is running.
inline BlockingPortal start_blocking_portal(EventLoop::Options options = {}) {
    auto state = std::make_unique<BlockingPortal::State>();
    std::promise<LoopToken> started;
    std::future<LoopToken> token = started.get_future();
    BlockingPortal::State* raw = state.get();
    // The new thread inherits this thread's timer slack, which is a loop's 1 ns if this thread
    // runs one: then it takes the value that thread had before its loop lowered it.
    EventLoop* here = EventLoop::current();
    const int slack = here != nullptr ? here->shared().inherited_timer_slack()
                                      : ::prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    detail::BlockAsyncSignals blocked;  // the portal's loop thread takes no signals either
    state->thread = std::thread([raw, &started, slack, options = std::move(options)]() mutable {
        if (slack > 0) ::prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(slack), 0, 0, 0);
        ::pthread_setname_np(::pthread_self(), "anyio portal");
        bool announced = false;  // after this, `started` (on the caller's stack) is gone
        auto body = [raw, &started, &announced]() -> Task<void> {
            struct ForgetGroup {
                BlockingPortal::State* state;
                ~ForgetGroup() { state->tasks.group = nullptr; }  // however the group ends
            } forget_group{raw};
            co_await task_group([raw, &started, &announced](TaskGroup& group) -> Task<void> {
                raw->tasks.group = &group;
                announced = true;
                started.set_value(lowlevel::current_token());
                co_await raw->stop_requested.wait();
            });
        };
        try {
            run(body(), options);
        } catch (...) {
            // The loop could not start (e.g. no file descriptors left): tell the caller.
            if (!announced) started.set_exception(std::current_exception());
        }
        if (raw->frees_itself) delete raw;
    });
    try {
        state->token = token.get();
    } catch (...) {
        state->thread.join();
        throw;
    }
    state->loop_thread_id = state->thread.get_id();
    return BlockingPortal(std::move(state));
}

}  // namespace anyio
