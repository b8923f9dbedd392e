// anyio-cpp: to_thread::run_sync, the offload path.
//
//   co_await run_sync(fn)
//     -> checkpoint: a cancelled caller starts nothing and borrows nothing
//     -> CapacityLimiter: take a token for a fresh per-call borrower, or wait FIFO (O(1))
//     -> WorkerPool::dispatch: the most recently idle worker, or a new thread
//     -> the worker runs fn; the job (fn, args, result slot) lives in this awaiter
//     -> the worker posts the job back through the loop's lock-free inbox
//     -> on the loop: worker idle again, token to the next waiter, the caller resumes
#pragma once

#include <concepts>
#include <coroutine>
#include <cstdint>
#include <functional>
#include <optional>
#include <stop_token>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cancel_scope.hpp"
#include "capacity_limiter.hpp"
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
    Job(bool on_heap, Fn&& fn, As&&... args)
        : JobBase(&execute, on_heap ? &destroy : nullptr),
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

private:
    static void execute(JobBase* self) noexcept {
        auto* job = static_cast<Job*>(self);
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
    static void destroy(JobBase* self) noexcept { delete static_cast<Job*>(self); }

    struct NoStopSource {};
    F fn_;
    std::tuple<Args...> args_;
    anyio::detail::Result<result_type> result_;
    // std::stop_source allocates its shared state: only callables that take a token pay.
    [[no_unique_address]] std::conditional_t<with_stop_token, std::stop_source, NoStopSource> stop_;
};

/// The awaitable run_sync returns. Not movable: the job and the queue nodes live inside it.
template <class F, class... Args>
class [[nodiscard]] RunSyncAwaiter final : anyio::detail::Wait, anyio::detail::LimiterWaiter {
    using JobType = Job<F, Args...>;

public:
    using result_type = typename JobType::result_type;

    template <class Fn, class... As>
    RunSyncAwaiter(RunSyncOptions options, Fn&& fn, As&&... args)
        : Wait(&on_cancel),
          LimiterWaiter(&on_granted),
          service_(&service("to_thread::run_sync")),
          limiter_(options.limiter != nullptr ? options.limiter : &service_->default_limiter()),
          abandon_on_cancel_(options.abandon_on_cancel) {
        // The job lives in this awaiter (no allocation) unless a worker may outlive the
        // awaiting frame: after abandon_on_cancel, or when the loop may detach busy workers
        // at shutdown (shutdown_timeout). Then it is a heap block the worker can own.
        if (abandon_on_cancel_ || service_->pool().may_detach_workers()) {
            job_ = new JobType(true, std::forward<Fn>(fn), std::forward<As>(args)...);
            owns_heap_job_ = true;
            job_->awaiter_owns_ = &owns_heap_job_;
        } else {
            job_ = &inline_job_.emplace(false, std::forward<Fn>(fn), std::forward<As>(args)...);
        }
        hold_ = &job_->hold_;
    }
    RunSyncAwaiter(const RunSyncAwaiter&) = delete;
    RunSyncAwaiter& operator=(const RunSyncAwaiter&) = delete;
    ~RunSyncAwaiter() {
        if (phase_ == Phase::waiting_for_token) limiter_->dequeue(*this);
        if (owns_heap_job_) delete job_;
    }

    bool await_ready() const noexcept { return false; }

    bool await_suspend(std::coroutine_handle<> handle) {
        task_ = &CancelScope::current_task("to_thread::run_sync");
        // anyio's checkpoint before the call: a cancelled caller starts nothing.
        if (anyio::detail::is_cancelled(*task_)) {
            phase_ = Phase::cancelled;
            return false;
        }
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
    enum class Phase : unsigned char { created, waiting_for_token, running, cancelled, abandoned };

    void start() {
        try {
            service_->pool().dispatch(*job_);
        } catch (...) {
            CapacityLimiter::release_hold(job_->hold_);  // the token goes on to the next waiter
            throw;
        }
        phase_ = Phase::running;
    }

    static void on_granted(LimiterWaiter* waiter) {
        auto* self = static_cast<RunSyncAwaiter*>(waiter);
        try {
            self->start();
        } catch (...) {
            self->job_->fail(std::current_exception());
            self->phase_ = Phase::running;  // await_resume rethrows the error
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
        job_->abandoned_ = true;
        job_->awaiter_owns_ = nullptr;
        owns_heap_job_ = false;
        job_->host_ = nullptr;
        job_->host_scope_ = nullptr;
        if (CancelScope* call_scope = job_->call_scope_) {
            // A from_thread::run coroutine of this worker is running under our scope: cancel
            // it and cut it loose before our scope goes away.
            call_scope->cancel();
            call_scope->detach_from_parent();
        }
        phase_ = Phase::abandoned;
        resume();
    }

    void resume() noexcept { task_->loop_->schedule_task(*task_, job_->resume_); }

    ToThreadService* service_;
    CapacityLimiter* limiter_;
    JobType* job_ = nullptr;
    std::optional<JobType> inline_job_;  // the job, in the default (shielded) mode
    anyio::detail::TaskState* task_ = nullptr;
    bool abandon_on_cancel_;
    bool owns_heap_job_ = false;  // a heap job this awaiter frees (until abandoned/orphaned)
    Phase phase_ = Phase::created;
};

}  // namespace detail

template <class F, class... Args>
concept offloadable = std::is_invocable_v<std::decay_t<F>, std::decay_t<Args>...> ||
                      std::is_invocable_v<std::decay_t<F>, std::stop_token, std::decay_t<Args>...>;

/// Runs `fn(args...)` on a worker thread and yields its result on the loop thread (or
/// rethrows what it threw). `fn` and `args` are decay-copied (use std::ref for references).
/// Throws NoEventLoopError at the call when no loop runs on this thread.
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
