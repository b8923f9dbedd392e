// anyio-cpp: to_thread::run_sync, the offload path.
//
//   co_await run_sync(fn)
//     -> checkpoint: a cancelled caller starts nothing and borrows nothing
//     -> CapacityLimiter: take a token for a fresh per-call borrower, or wait FIFO (O(1))
//     -> WorkerPool::dispatch: the most recently idle worker if it is awake; if it sleeps,
//        queued for the worker that finished a job last (GrantedJobs: no wake-up), the
//        sleeper held as its backup; else a sleeper woken, or a new thread
//     -> the worker runs fn; the job (fn, args, result slot) lives in this awaiter
//     -> the worker posts the job back through the loop's lock-free inbox
//     -> on the loop: worker idle again, token to the next waiter, the caller resumes
//
// Worker threads block every asynchronous signal from their first instruction (the mask is
// set around their creation: detail/signal_mask.hpp), so a signal is never delivered to one;
// the synchronous ones (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS) stay deliverable.
// They also run with the timer slack of the thread that created the loop, not with the 1 ns
// the loop uses for itself.
#pragma once

#include <concepts>
#include <coroutine>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cancel_scope.hpp"
#include "capacity_limiter.hpp"
#include "detail/context_data.hpp"
#include "detail/result.hpp"
#include "detail/worker_pool.hpp"
#include "detail/worker_thread.hpp"
#include "errors.hpp"
#include "event_loop.hpp"

namespace anyio::to_thread {

/// How run_sync borrows its token and what cancellation does to it.
struct RunSyncOptions {
    /// The limiter to take the token from; nullptr: the loop's default (40 tokens).
    CapacityLimiter* limiter = nullptr;
    /// false: the call is shielded, cancellation takes effect after fn returns.
    /// true: cancellation raises Cancelled at once; fn runs on, its outcome is dropped, and
    /// its thread keeps the token until fn returns (trio), so threads stay bounded.
    bool abandon_on_cancel = false;
};

namespace detail {

/// The loop's default limiter and worker pool (anyio's RunVars), created on first use.
class ToThreadService final : public anyio::detail::LoopService {
public:
    explicit ToThreadService(EventLoop& loop)
        : default_limiter_(loop.options().default_thread_tokens), pool_(loop) {}
    void shutdown(EventLoop&) override { pool_.shutdown(); }
    bool holds(const anyio::detail::TaskState& task) noexcept override {
        return pool_.holds_frames_of(task);
    }
    std::optional<std::chrono::steady_clock::time_point> holds_until() const noexcept override {
        return pool_.shutdown_deadline();
    }
    void finish_shutdown(EventLoop&) override { pool_.finish_shutdown(); }
    CapacityLimiter& default_limiter() noexcept { return default_limiter_; }
    anyio::detail::WorkerPool& pool() noexcept { return pool_; }

private:
    CapacityLimiter default_limiter_;  // declared first: outlives the pool's completions
    anyio::detail::WorkerPool pool_;
};

inline ToThreadService& service(const char* what) {
    return anyio::detail::running_loop(what).service<ToThreadService>();
}

template <class F, class... Args>
inline constexpr bool takes_stop_token = std::is_invocable_v<F, std::stop_token, Args...>;

template <class F, class... Args>
struct InvokeResult {
    using type = std::invoke_result_t<F, Args...>;
};
template <class F, class... Args>
    requires takes_stop_token<F, Args...>
struct InvokeResult<F, Args...> {
    using type = std::invoke_result_t<F, std::stop_token, Args...>;
};

/// fn, its arguments and its outcome: everything the worker touches.
template <class F, class... Args>
class Job final : public anyio::detail::JobBase {
public:
    using result_type = typename InvokeResult<F, Args...>::type;
    static constexpr bool with_stop_token = takes_stop_token<F, Args...>;

    template <class Fn, class... As>
    Job(Storage storage, Fn&& fn, As&&... args)
        : JobBase(storage, &execute, &fail_with, &destroy),
          fn_(std::forward<Fn>(fn)),
          args_(std::forward<As>(args)...) {
        if constexpr (with_stop_token) {
            request_stop_ = [](JobBase* self) noexcept { static_cast<Job*>(self)->request_stop(); };
        }
    }

    void request_stop() noexcept {
        if constexpr (with_stop_token) stop_.request_stop();
    }
    result_type take_result() { return result_.take(); }
    void fail(std::exception_ptr error) noexcept { result_.set_exception(std::move(error)); }

    /// fn runs in a copy of `context` (context.hpp): the awaiting task's, taken on the loop.
    void run_in(anyio::detail::ContextRef context) noexcept { context_ = std::move(context); }

private:
    static void execute(JobBase* self) noexcept {
        auto* job = static_cast<Job*>(self);
        // On the worker: fn (and from_thread calls it makes) sees the caller's context.
        anyio::detail::ContextScope in_context(std::move(job->context_));
        job->result_.capture([job]() -> result_type {
            return std::apply(
                [job](Args&... args) -> result_type {
                    if constexpr (with_stop_token) {
                        return std::invoke(std::move(job->fn_), job->stop_.get_token(),
                                           std::move(args)...);
                    } else {
                        return std::invoke(std::move(job->fn_), std::move(args)...);
                    }
                },
                job->args_);
        });
    }
    static void fail_with(JobBase* self, std::exception_ptr error) noexcept {
        static_cast<Job*>(self)->fail(std::move(error));
    }
    static void destroy(JobBase* self) noexcept { delete static_cast<Job*>(self); }

    struct NoStopSource {};
    F fn_;
    std::tuple<Args...> args_;
    anyio::detail::Result<result_type> result_;
    anyio::detail::ContextRef context_;  // the caller's context until the worker takes it
    // std::stop_source allocates its shared state: only callables that take a token pay.
    [[no_unique_address]] std::conditional_t<with_stop_token, std::stop_source, NoStopSource> stop_;
};

/// The awaitable run_sync returns. Not movable: the job and the queue nodes live inside it.
/// Awaited once; a second co_await throws std::logic_error.
template <class F, class... Args>
class [[nodiscard]] RunSyncAwaiter final : anyio::detail::Wait, anyio::detail::LimiterWaiter {
    using JobType = Job<F, Args...>;
    using JobBase = anyio::detail::JobBase;

public:
    using result_type = typename JobType::result_type;

    template <class Fn, class... As>
    RunSyncAwaiter(RunSyncOptions options, Fn&& fn, As&&... args)
        : Wait(&on_cancel),
          LimiterWaiter(&on_woken),
          service_(&service("to_thread::run_sync")),
          limiter_(options.limiter != nullptr ? options.limiter : &service_->default_limiter()),
          abandon_on_cancel_(options.abandon_on_cancel) {
        // The job lives in this awaiter (no allocation) unless a worker may outlive the
        // awaiting frame: after abandon_on_cancel, or when the loop may give up on busy
        // workers at shutdown (shutdown_timeout). Then it is a heap block (see JobBase).
        if (abandon_on_cancel_ || service_->pool().may_detach_workers()) {
            job_ = new JobType(JobBase::Storage::heap, std::forward<Fn>(fn),
                               std::forward<As>(args)...);
        } else {
            job_ = &inline_job_.emplace(JobBase::Storage::in_awaiter, std::forward<Fn>(fn),
                                        std::forward<As>(args)...);
        }
        hold_ = &job_->hold_;
    }
    RunSyncAwaiter(const RunSyncAwaiter&) = delete;
    RunSyncAwaiter& operator=(const RunSyncAwaiter&) = delete;
    ~RunSyncAwaiter() {
        if (phase_ == Phase::waiting_for_token) limiter_->dequeue(*this);
        if (job_ != nullptr) JobBase::let_go(job_, JobBase::awaiter_holds);
    }

    bool await_ready() const noexcept { return false; }

    bool await_suspend(std::coroutine_handle<> handle) {
        if (phase_ != Phase::created) throw_awaited_twice();
        phase_ = Phase::done;  // until the call waits or runs: an exception below ends it
        task_ = &CancelScope::current_task("to_thread::run_sync");
        // anyio's checkpoint before the call: a cancelled caller starts nothing.
        if (anyio::detail::is_cancelled(*task_)) {
            phase_ = Phase::cancelled;
            return false;
        }
        handle_ = handle;
        job_->run_in(anyio::detail::ContextRef::share(task_->context_));
        job_->host_ = task_;
        job_->resume_ = handle;
        job_->host_scope_ = task_->scope_;
        if (limiter_->try_acquire_hold(job_->hold_)) {
            start();  // throws std::system_error if no thread can be started
        } else {
            limiter_->enqueue(*this);
            phase_ = Phase::waiting_for_token;
        }
        task_->wait_ = this;  // cancellation reaches the call through on_cancel
        task_->resume_point_ = handle;
        return true;
    }

    result_type await_resume() {
        if (phase_ == Phase::cancelled || phase_ == Phase::abandoned) throw Cancelled{};
        return job_->take_result();
    }

private:
    // created            not awaited yet (awaiting it again from any other phase throws)
    // waiting_for_token  queued in the limiter; cancellable (-> cancelled)
    // running            on a worker; the caller resumes with the completion, the outcome in
    //                    the job; cancellation is passed on, or (abandon_on_cancel) -> abandoned
    // done               ended without running fn: with the error in the job (no thread
    //                    could start, the limiter was destroyed) or thrown by await_suspend
    // cancelled          cancelled before it started, or while waiting for its token
    // abandoned          the caller left; the job runs on and frees itself (JobBase)
    enum class Phase : unsigned char {
        created,
        waiting_for_token,
        running,
        done,
        cancelled,
        abandoned
    };

    [[noreturn]] static void throw_awaited_twice() {
        throw std::logic_error(
            "anyio::to_thread::run_sync: this call was already awaited; a run_sync awaiter "
            "runs fn once: call run_sync again for another run");
    }

    void start() {
        try {
            service_->pool().dispatch(*job_);
        } catch (...) {
            CapacityLimiter::release_hold(job_->hold_);  // the token goes on to the next waiter
            throw;
        }
        phase_ = Phase::running;
    }

    /// The limiter's wait ended: the token is ours (start), or the limiter is gone.
    static void on_woken(LimiterWaiter* waiter) noexcept {
        auto* self = static_cast<RunSyncAwaiter*>(waiter);
        try {
            if (self->outcome_ == Outcome::limiter_destroyed) {
                anyio::detail::throw_limiter_destroyed("to_thread::run_sync");
            }
            self->start();
        } catch (...) {
            self->job_->fail(std::current_exception());
            self->phase_ = Phase::done;  // await_resume rethrows the error
            self->resume();
        }
    }

    static void on_cancel(Wait* wait) {
        auto* self = static_cast<RunSyncAwaiter*>(wait);
        switch (self->phase_) {
        case Phase::waiting_for_token:
            // Waiting for a token is always cancellable; the queue node unlinks in O(1).
            self->limiter_->dequeue(*self);
            self->phase_ = Phase::cancelled;
            self->resume();
            break;
        case Phase::running:
            // release: check_cancelled() on the worker reads this with acquire.
            self->job_->cancelled_.store(true, std::memory_order_release);
            // fn's std::stop_callbacks run here, on the loop thread (see run_sync).
            self->job_->request_stop();
            if (self->abandon_on_cancel_) self->abandon();
            break;  // shielded: the caller resumes when fn returns
        default:
            break;
        }
    }

    /// The caller leaves now; the job (a heap block) stays with the worker, keeps its token
    /// until fn returns, and is freed on the loop when its completion arrives.
    void abandon() {
        job_->host_ = nullptr;
        job_->host_scope_ = nullptr;
        if (CancelScope* call_scope = job_->call_scope_) {
            // A from_thread::run coroutine of this worker is running under our scope: cancel
            // it and cut it loose before our scope goes away.
            call_scope->cancel();
            call_scope->detach_from_parent();
        }
        JobBase::let_go(std::exchange(job_, nullptr), JobBase::awaiter_holds);
        phase_ = Phase::abandoned;
        resume();
    }

    void resume() noexcept { task_->loop_->schedule_task(*task_, handle_); }

    ToThreadService* service_;
    CapacityLimiter* limiter_;
    JobType* job_ = nullptr;  // nullptr once this awaiter has let go of it (abandoned)
    std::optional<JobType> inline_job_;  // the job's storage in the default (shielded) mode
    anyio::detail::TaskState* task_ = nullptr;
    std::coroutine_handle<> handle_;
    bool abandon_on_cancel_;
    Phase phase_ = Phase::created;
};

}  // namespace detail

template <class F, class... Args>
concept offloadable = std::is_invocable_v<std::decay_t<F>, std::decay_t<Args>...> ||
                      std::is_invocable_v<std::decay_t<F>, std::stop_token, std::decay_t<Args>...>;

/// Runs `fn(args...)` on a worker thread and yields its result on the loop thread (or
/// rethrows what it threw). `fn` and `args` are decay-copied (use std::ref for references).
/// Throws NoEventLoopError at the call when no loop runs on this thread; std::logic_error at
/// co_await for a limiter of another loop's thread, or when the awaiter is awaited again;
/// std::system_error when no worker thread can be started; the exception on_thread_start
/// threw when the thread started for this call failed its start hook.
///
/// stop_token: if fn is invocable as fn(std::stop_token, args...), it is called that way and
/// the token is requested to stop when the awaiting task is cancelled (both modes) or when
/// leaving run() finds the call still running. As everywhere with std::stop_source, the
/// request runs the std::stop_callbacks registered on the token synchronously, on the
/// requesting thread: here the loop thread, inside the cancellation (before cancel() returns).
/// Keep such callbacks short and non-blocking, as any loop callback: set a flag, notify a
/// condition variable, shutdown() a socket; never take a lock that fn holds while it blocks,
/// or the loop waits for fn. (Requesting the stop on another thread was considered and
/// rejected: it would cost a thread, delay the request, and lose the guarantee that
/// stop_requested() is true as soon as the cancellation has been delivered.)
///
/// g++ 12 pitfall (a compiler bug, not avoidable here): a lambda with captures that have
/// destructors, written inside the co_await expression (`co_await run_sync([p] {...})`), is
/// destroyed twice by g++ 12. Name the lambda first (`auto fn = [p] {...}; co_await
/// run_sync(fn);`) or pass the values as arguments (`run_sync([](auto p) {...}, p)`).
/// clang++ and newer g++ are not affected.
template <class F, class... Args>
    requires offloadable<F, Args...>
detail::RunSyncAwaiter<std::decay_t<F>, std::decay_t<Args>...> run_sync(RunSyncOptions options,
                                                                        F&& fn, Args&&... args) {
    return {options, std::forward<F>(fn), std::forward<Args>(args)...};
}

template <class F, class... Args>
    requires(!std::same_as<std::decay_t<F>, RunSyncOptions> && offloadable<F, Args...>)
detail::RunSyncAwaiter<std::decay_t<F>, std::decay_t<Args>...> run_sync(F&& fn, Args&&... args) {
    return {RunSyncOptions{}, std::forward<F>(fn), std::forward<Args>(args)...};
}

/// The running loop's default thread limiter (40 tokens unless the loop options say
/// otherwise). Tune at startup: `current_default_thread_limiter().set_total_tokens(100);`
inline CapacityLimiter& current_default_thread_limiter() {
    return detail::service("to_thread::current_default_thread_limiter").default_limiter();
}

/// Statistics of the running loop's worker pool.
inline WorkerPoolStatistics statistics() {
    return detail::service("to_thread::statistics").pool().statistics();
}

}  // namespace anyio::to_thread
