// One worker thread of the offload pool, and the job it runs.
//
// The loop hands a job over through the worker's mailbox word; the worker runs it and posts
// the job itself (it is also the completion node) back through the loop's remote inbox. The
// worker never touches loop-owned state, and never touches a job after posting it.
#pragma once

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include <pthread.h>

#include "../capacity_limiter.hpp"
#include "intrusive_list.hpp"
#include "remote_inbox.hpp"
#include "runnable.hpp"
#include "signal_mask.hpp"
#include "spin.hpp"
#include "task_state.hpp"

namespace anyio {
class CancelScope;
}

namespace anyio::detail {

class WorkerPool;
class WorkerThread;

void complete_job(Runnable* self, bool run);  // defined in worker_pool.hpp

/// A unit of blocking work. It lives in the awaiting coroutine's frame (default mode) or in a
/// heap block (abandon_on_cancel), and doubles as the completion node the worker posts.
struct JobBase : Runnable {
    using Execute = void (*)(JobBase* self) noexcept;
    using Destroy = void (*)(JobBase* self) noexcept;

    JobBase(Execute execute, Destroy destroy) noexcept
        : Runnable(&complete_job), execute_(execute), destroy_(destroy) {}
    JobBase(const JobBase&) = delete;
    JobBase& operator=(const JobBase&) = delete;

    Execute execute_;                  // runs on the worker: calls fn, stores the outcome
    void (*request_stop_)(JobBase* self) noexcept = nullptr;  // fn's stop_token, if it takes one
    Destroy destroy_;                  // non-null for heap jobs
    WorkerPool* pool_ = nullptr;       // loop-side fields from here on
    WorkerThread* worker_ = nullptr;
    LimiterHold hold_;                 // the per-call borrower's token
    TaskState* host_ = nullptr;        // the awaiting task (nullptr once abandoned)
    std::coroutine_handle<> resume_;
    CancelScope* host_scope_ = nullptr;  // where from_thread::run tasks are started
    CancelScope* call_scope_ = nullptr;  // scope of a from_thread::run in progress
    bool* awaiter_owns_ = nullptr;     // heap job: the awaiter's "I free it" flag, if it still does
    bool abandoned_ = false;           // the caller gave up (abandon_on_cancel)
    bool orphaned_ = false;            // the loop shut down and detached the worker
    // Set on the loop when the caller is cancelled; read by from_thread::check_cancelled.
    std::atomic<bool> cancelled_{false};
};

/// The job the current worker thread is running (nullptr elsewhere), and its loop.
inline thread_local JobBase* current_job = nullptr;
inline thread_local LoopShared* current_worker_loop = nullptr;

/// Shared by a pool and its workers; outlives the loop when a worker had to be detached.
struct PoolShared {
    std::shared_ptr<LoopShared> loop;
    std::string thread_name;
    std::function<void()> on_thread_start;
    std::function<void()> on_thread_stop;
    // At most one worker spins waiting for its next job (BENCH.md: never more than one).
    std::atomic<int> spinning_workers{0};
};

/// Tests set this to make the next N thread starts fail with std::system_error (EAGAIN).
inline std::atomic<int> injected_thread_start_failures{0};

struct IdleWorkersTag {};
struct BusyWorkersTag {};

class WorkerThread : public ListHook<IdleWorkersTag>, public ListHook<BusyWorkersTag> {
public:
    explicit WorkerThread(std::shared_ptr<PoolShared> shared) noexcept
        : shared_(std::move(shared)) {}
    WorkerThread(const WorkerThread&) = delete;
    WorkerThread& operator=(const WorkerThread&) = delete;
    ~WorkerThread() = default;

    /// Starts the OS thread; throws std::system_error when it cannot.
    void start() {
        // relaxed: a test knob read by the loop thread only.
        int failures = injected_thread_start_failures.load(std::memory_order_relaxed);
        while (failures > 0) {
            if (injected_thread_start_failures.compare_exchange_weak(
                    failures, failures - 1, std::memory_order_relaxed)) {
                throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                                        "anyio: cannot start a worker thread (injected)");
            }
        }
        BlockAsyncSignals blocked;  // inherited by the new thread from its first instruction
        thread_ = std::thread([this] { main(); });
    }

    /// Hands `job` to this idle worker (loop thread).
    void give(JobBase* job) noexcept {
        job_ = job;
        // release: publishes job_ (and the job's contents) to the worker, which loads the state
        // with acquire. acquire: we learn whether it went to sleep, so we wake it only then.
        if (state_.exchange(has_job, std::memory_order_acq_rel) == sleeping) futex_wake(&state_);
    }

    /// Asks the worker to exit once its current job (if any) is done (loop thread).
    void request_stop() noexcept {
        // seq_cst store, then seq_cst load of the state: with the worker's seq_cst take of a
        // job and its seq_cst load of the flag after it, either we see the job taken (and
        // stop the mailbox below) or the worker sees the flag: a store-buffer pattern that
        // release/acquire alone would not exclude.
        stop_requested_.store(true, std::memory_order_seq_cst);
        std::uint32_t state = state_.load(std::memory_order_seq_cst);
        // A job handed over but not yet taken stays: the worker checks the flag after it.
        while (state == empty || state == sleeping) {
            // acq_rel: as in give(); the CAS keeps a concurrent take of a job intact.
            if (state_.compare_exchange_weak(state, stopping, std::memory_order_acq_rel,
                                             std::memory_order_acquire)) {
                if (state == sleeping) futex_wake(&state_);
                return;
            }
        }
    }

    void join() {
        if (thread_.joinable()) thread_.join();
    }

    /// Gives the thread up: it frees itself when its job ends (loop shutdown timed out).
    /// Returns false if it had already finished, in which case the caller joins and frees it.
    bool detach() noexcept {
        thread_.detach();  // first: once ownership flips, the thread may free `this`
        // acq_rel: pairs with the worker's exchange at exit; exactly one side frees.
        return ownership_.exchange(detached, std::memory_order_acq_rel) != exited;
    }

    [[nodiscard]] JobBase* job() const noexcept { return job_; }

    std::chrono::steady_clock::time_point idle_since_{};

private:
    enum State : std::uint32_t { empty = 0, sleeping = 1, has_job = 2, stopping = 3 };
    enum Ownership : int { owned = 0, exited = 1, detached = 2 };

    void main() {
        set_thread_name();
        current_worker_loop = shared_->loop.get();
        run_hook(shared_->on_thread_start);
        for (;;) {
            if (wait_for_work() == stopping) break;
            JobBase* job = job_;
            std::uint32_t expected = has_job;
            // seq_cst: mark the mailbox empty unless a stop request replaced the job state;
            // seq_cst for the store-buffer pattern with request_stop (see there).
            state_.compare_exchange_strong(expected, empty, std::memory_order_seq_cst,
                                           std::memory_order_seq_cst);
            current_job = job;
            job->execute_(job);
            current_job = nullptr;
            // The job is the completion node. After a successful post the job belongs to the
            // loop again (its awaiter may resume and free it at once): do not touch it.
            if (!shared_->loop->post(job)) job->invoke_(job, false);  // loop gone: drop it
            // seq_cst: the other half of request_stop's store-buffer pattern.
            if (stop_requested_.load(std::memory_order_seq_cst)) break;
        }
        run_hook(shared_->on_thread_stop);
        current_worker_loop = nullptr;
        // acq_rel: pairs with detach(); if the loop detached us, we free ourselves.
        if (ownership_.exchange(exited, std::memory_order_acq_rel) == detached) delete this;
    }

    std::uint32_t wait_for_work() noexcept {
        // acquire: pairs with give()'s release, making the job's contents visible.
        std::uint32_t state = state_.load(std::memory_order_acquire);
        if (state == empty) state = spin_for_work();
        while (state == empty || state == sleeping) {
            if (state == empty) {
                // acq_rel: announce sleep; if it fails, `state` holds the new job or stop.
                if (!state_.compare_exchange_strong(state, sleeping, std::memory_order_acq_rel,
                                                    std::memory_order_acquire)) {
                    continue;
                }
            }
            futex_wait(&state_, sleeping, nullptr);
            state = state_.load(std::memory_order_acquire);  // acquire: as above
        }
        return state;
    }

    std::uint32_t spin_for_work() noexcept {
        // Spinning on the loop's own CPU would only delay the loop that is to give us a job.
        if (current_cpu() == shared_->loop->loop_cpu()) return empty;
        int idle = 0;
        // acquire: the slot guards nothing but itself; relaxed would do, acquire is free here.
        if (!shared_->spinning_workers.compare_exchange_strong(idle, 1, std::memory_order_acquire,
                                                               std::memory_order_relaxed)) {
            return empty;  // someone else is spinning: sleep straight away
        }
        std::uint32_t state = empty;
        spin_.spin([&] {
            state = state_.load(std::memory_order_acquire);  // acquire: as in wait_for_work
            return state != empty;
        });
        shared_->spinning_workers.store(0, std::memory_order_release);  // release: slot free
        return state;
    }

    void set_thread_name() noexcept {
        std::string name = shared_->thread_name.substr(0, 15);  // the kernel's limit
        ::pthread_setname_np(::pthread_self(), name.c_str());
    }

    static void run_hook(const std::function<void()>& hook) noexcept {
        if (!hook) return;
        try {
            hook();
        } catch (...) {
            // A hook that throws must not take the worker (or the process) down with it.
        }
    }

    std::atomic<std::uint32_t> state_{empty};
    std::atomic<bool> stop_requested_{false};
    std::atomic<int> ownership_{owned};
    JobBase* job_ = nullptr;  // written by the loop before the release in give()
    SpinPolicy spin_;         // worker thread only
    std::shared_ptr<PoolShared> shared_;
    std::thread thread_;
};

}  // namespace anyio::detail
