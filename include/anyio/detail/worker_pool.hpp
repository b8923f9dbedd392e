// The loop's pool of worker threads (the loop side; see worker_thread.hpp for the thread).
//
// Semantics (anyio's WorkerThread pool, with trio's idle reaping):
// - a thread is started only when no idle one exists, so threads started == peak concurrency;
// - the most recently idle worker is reused first (LIFO), so sequential calls use one thread;
// - a worker goes back to the idle list on the loop, before the awaiting task resumes;
// - workers idle for max_idle_time or longer are stopped oldest first, at each dispatch and
//   also by a loop timer when there is no traffic;
// - the loop never waits for a worker: a retiring worker runs on_thread_stop on its own and
//   then posts an "exited" node, and the loop joins it when that node arrives;
// - leaving run() stops every worker after its current job and joins it (the loop runs
//   until each has reported its exit), or gives up on the ones still busy after
//   shutdown_timeout (their late completions are dropped safely).
// Loop-thread only. Stands on the public capacity_limiter.hpp and event_loop.hpp.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "../capacity_limiter.hpp"
#include "../event_loop.hpp"
#include "intrusive_list.hpp"
#include "timer_heap.hpp"
#include "worker_thread.hpp"

namespace anyio {

/// to_thread::statistics() of a loop's worker pool.
struct WorkerPoolStatistics {
    std::size_t workers = 0;       // threads alive now: idle, busy, or stopping (not yet joined)
    std::size_t idle_workers = 0;
    std::size_t busy_workers = 0;
    std::uint64_t threads_created = 0;
    std::uint64_t threads_pruned = 0;  // stopped for being idle too long
    std::uint64_t jobs_completed = 0;
};

namespace detail {

class WorkerPool {
public:
    explicit WorkerPool(EventLoop& loop)
        : loop_(&loop), shared_(std::make_shared<PoolShared>()), reaper_(this) {
        const LoopOptions& options = loop.options();
        shared_->loop = loop.token().shared_state();
        shared_->thread_name = options.thread_name;
        shared_->on_thread_start = options.on_thread_start;
        shared_->on_thread_stop = options.on_thread_stop;
        max_idle_time_ = options.max_idle_time;
        shutdown_timeout_ = options.shutdown_timeout;
    }
    WorkerPool(const WorkerPool&) = delete;
    WorkerPool& operator=(const WorkerPool&) = delete;
    /// shutdown() ran before and left no thread behind. This is the fallback for a loop torn
    /// down without it: services are destroyed after the loop closed its inbox, so no exited
    /// node can arrive any more and joining here is the only way left.
    ~WorkerPool() {
        loop_->remove_timer(&reaper_);
        while (WorkerThread* worker = idle_.pop_front()) {
            worker->request_stop();
            worker->join();
            delete worker;
        }
        while (WorkerThread* worker = retiring_.pop_front()) {
            worker->join();
            delete worker;
        }
    }

    /// True if shutdown may give up on a busy worker (a shutdown_timeout is set): its job must
    /// then live on the heap, where the worker can own it after the awaiting frame is gone.
    [[nodiscard]] bool may_detach_workers() const noexcept { return shutdown_timeout_.has_value(); }

    /// Runs `job` on an idle worker, or on a new one. Throws std::system_error if a thread
    /// cannot be started (the pool stays usable).
    void dispatch(JobBase& job) {
        if (shutting_down_) {
            throw RunFinishedError(
                "anyio::to_thread::run_sync: the event loop is shutting down and no longer "
                "starts blocking calls");
        }
        auto now = std::chrono::steady_clock::now();
        prune(now);
        WorkerThread* worker = idle_.pop_front();
        if (worker != nullptr) {
            --idle_count_;
        } else {
            worker = start_worker();
        }
        busy_.push_back(*worker);
        ++busy_count_;
        job.pool_ = this;
        job.worker_ = worker;
        job.dispatched();
        loop_->remote_work_started();
        worker->give(&job);
    }

    /// The job's completion reached the loop: its worker is idle again (most recent first).
    void completed(JobBase& job) noexcept {
        WorkerThread* worker = job.worker_;
        worker->ListHook<WorkerListTag>::unlink();
        --busy_count_;
        loop_->remote_work_finished();
        if (worker->start_failed()) {
            retire(worker);  // its thread is already on its way out
            return;
        }
        ++jobs_completed_;
        if (shutting_down_) {
            retire(worker);
            return;
        }
        worker->idle_since_ = std::chrono::steady_clock::now();
        idle_.push_front(*worker);
        ++idle_count_;
        if (!reaper_.queued()) arm_reaper(worker->idle_since_);
    }

    /// A retiring worker has run on_thread_stop and posted its exited node: only the thread's
    /// own exit is left, so joining it here costs the loop next to nothing.
    void exited(WorkerThread* worker) noexcept {
        worker->ListHook<WorkerListTag>::unlink();
        --retiring_count_;
        worker->join();
        delete worker;
    }

    void shutdown() {
        shutting_down_ = true;
        loop_->remove_timer(&reaper_);
        while (WorkerThread* worker = idle_.pop_front()) {
            --idle_count_;
            retire(worker);
        }
        if (busy_count_ > 0) wait_for_busy_workers();
        // Every worker not given up is joined before run() returns. The loop keeps running
        // meanwhile (it never blocks on a join): each exited node ends one retiring worker.
        loop_->run_until([&] { return retiring_count_ == 0; });
    }

    [[nodiscard]] WorkerPoolStatistics statistics() const noexcept {
        WorkerPoolStatistics stats;
        stats.idle_workers = idle_count_;
        stats.busy_workers = busy_count_;
        stats.workers = idle_count_ + busy_count_ + retiring_count_;
        stats.threads_created = threads_created_;
        stats.threads_pruned = threads_pruned_;
        stats.jobs_completed = jobs_completed_;
        return stats;
    }

private:
    struct Reaper final : TimerNode {
        explicit Reaper(WorkerPool* pool) noexcept : TimerNode(&fire), pool(pool) {}
        static void fire(TimerNode* self, bool run) {
            if (!run) return;
            WorkerPool* pool = static_cast<Reaper*>(self)->pool;
            pool->prune(std::chrono::steady_clock::now());
            if (WorkerThread* oldest = pool->idle_.back()) pool->arm_reaper(oldest->idle_since_);
        }
        WorkerPool* pool;
    };

    /// Arms the reaper for when a worker idle since `idle_since` will have idled for
    /// max_idle_time. Saturating: a max_idle_time too long for the clock means never, and no
    /// timer is armed at time_point::max().
    void arm_reaper(std::chrono::steady_clock::time_point idle_since) {
        const auto when = deadline_after(idle_since, max_idle_time_);
        if (when != std::chrono::steady_clock::time_point::max()) loop_->add_timer(&reaper_, when);
    }

    WorkerThread* start_worker() {
        auto worker = std::make_unique<WorkerThread>(shared_, this);
        worker->start();  // throws std::system_error; nothing changed yet
        ++threads_created_;
        return worker.release();
    }

    /// Stops idle workers past max_idle_time, oldest (the back of the LIFO list) first.
    void prune(std::chrono::steady_clock::time_point now) {
        while (WorkerThread* oldest = idle_.back()) {
            if (now - oldest->idle_since_ < max_idle_time_) break;
            oldest->ListHook<WorkerListTag>::unlink();
            --idle_count_;
            ++threads_pruned_;
            retire(oldest);
        }
    }

    /// Asks a worker (not in any list) to exit and keeps it as retiring until its exited node
    /// arrives. Never waits.
    void retire(WorkerThread* worker) noexcept {
        worker->request_stop();
        retiring_.push_back(*worker);
        ++retiring_count_;
    }

    /// Leaving run(): busy workers are told their tasks are going away and waited for, at most
    /// shutdown_timeout; the pool gives up on those still busy after it.
    void wait_for_busy_workers() {
        // Jobs still running belong to tasks that are about to be destroyed: tell them, so a
        // cooperative fn (stop_token, check_cancelled) can end and run() need not wait.
        busy_.for_each([](WorkerThread& worker) {
            JobBase* job = worker.job();
            job->cancelled_.store(true, std::memory_order_release);  // release: as in run_sync
            if (job->request_stop_ != nullptr) job->request_stop_(job);
        });
        struct Timeout final : TimerNode {
            Timeout() noexcept : TimerNode(&fire) {}
            static void fire(TimerNode* self, bool) { static_cast<Timeout*>(self)->expired = true; }
            bool expired = false;
        } timeout;
        if (shutdown_timeout_) {
            loop_->add_timer(&timeout, deadline_after(loop_->time(), *shutdown_timeout_));
        }
        loop_->run_until([&] { return busy_count_ == 0 || timeout.expired; });
        loop_->remove_timer(&timeout);
        while (WorkerThread* worker = busy_.pop_front()) {
            --busy_count_;
            give_up(*worker);
        }
    }

    /// Shutdown timed out while `worker` still runs a job: forget the job on the loop side,
    /// keep whatever the worker may still write into alive, and let the thread go.
    void give_up(WorkerThread& worker) noexcept {
        JobBase* job = worker.job();
        // Jobs are on the heap whenever a shutdown timeout is set (to_thread.hpp), so the
        // completion can outlive the awaiting frame (JobBase's ownership table).
        job->pool_ = nullptr;  // its completion, wherever it ends, touches no pool or limiter
        CapacityLimiter::forget_hold(job->hold_);
        loop_->remote_work_finished();
        worker.request_stop();
        if (!worker.give_up()) {
            // It finished in the meantime and is exiting: join it as any retiring worker.
            retiring_.push_back(worker);
            ++retiring_count_;
        }
    }

    EventLoop* loop_;
    std::shared_ptr<PoolShared> shared_;
    IntrusiveList<WorkerThread, WorkerListTag> idle_;  // front: most recently idle
    IntrusiveList<WorkerThread, WorkerListTag> busy_;
    IntrusiveList<WorkerThread, WorkerListTag> retiring_;  // asked to stop, not yet joined
    Reaper reaper_;
    std::chrono::steady_clock::duration max_idle_time_{};
    std::optional<std::chrono::steady_clock::duration> shutdown_timeout_;
    std::size_t idle_count_ = 0;
    std::size_t busy_count_ = 0;
    std::size_t retiring_count_ = 0;
    std::uint64_t threads_created_ = 0;
    std::uint64_t threads_pruned_ = 0;
    std::uint64_t jobs_completed_ = 0;
    bool shutting_down_ = false;
};

/// The completion of a job: processed on the loop (`run`), or dropped unprocessed at loop
/// close or on a worker that found the loop's inbox closed.
inline void complete_job(Runnable* self, bool run) {
    auto* job = static_cast<JobBase*>(self);
    if (run && job->pool_ != nullptr) {
        job->pool_->completed(*job);               // 1. the worker is idle again (LIFO)
        CapacityLimiter::release_hold(job->hold_);  // 2. the token goes to the next waiter
        if (TaskState* host = job->host_) {
            host->loop_->schedule_task(*host, job->resume_);  // 3. the caller resumes
        }
    } else {
        // The loop is closing, or it gave up on this worker: hand no token on, wake nobody.
        // (A given-up job's token was already forgotten on the loop, so on a worker thread
        // this touches nothing of the loop's.)
        CapacityLimiter::forget_hold(job->hold_);
    }
    JobBase::let_go(job, JobBase::completion_holds);  // frees it if nobody else holds it
}

/// A retiring worker's exited node (processed, or dropped at loop close: join it either way).
inline void worker_exited(Runnable* self, bool /*run*/) {
    WorkerThread* worker = static_cast<WorkerThread::ExitedNode*>(self)->worker;
    worker->pool()->exited(worker);
}

}  // namespace detail
}  // namespace anyio
