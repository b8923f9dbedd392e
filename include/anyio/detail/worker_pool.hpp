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
// - leaving run() (EventLoop::shutdown) happens in two steps around the destruction of the
//   tasks still alive: shutdown() starts no more calls, retires the idle workers and asks
//   the running calls to stop; holds_frames_of() keeps a task's frames alive while a worker
//   runs a job that lives in them; finish_shutdown() then waits for the busy workers (at most
//   shutdown_timeout, then gives up on the rest: their late completions are dropped safely)
//   and joins every worker as its "exited" node arrives. No task resumes meanwhile.
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

    /// Leaving run(), the main task has finished: start no more calls, retire the idle
    /// workers, and ask the running calls to stop (their tasks are about to be destroyed).
    /// Does not wait.
    void shutdown() noexcept {
        shutting_down_ = true;
        if (shutdown_timeout_) shutdown_deadline_ = deadline_after(loop_->time(), *shutdown_timeout_);
        loop_->remove_timer(&reaper_);
        while (WorkerThread* worker = idle_.pop_front()) {
            --idle_count_;
            retire(worker);
        }
        // A cooperative fn (stop_token, check_cancelled) can end, so run() need not wait.
        busy_.for_each([](WorkerThread& worker) {
            JobBase* job = worker.job();
            job->cancelled_.store(true, std::memory_order_release);  // release: as in run_sync
            if (job->request_stop_ != nullptr) job->request_stop_(job);
            // A heap job's awaiter may be destroyed before the completion arrives (once the
            // timeout has passed): the completion must not schedule a task that is gone. Its
            // task is remembered, so that holds_frames_of keeps the frames its fn may use
            // until then. (A job in an awaiter keeps its task alive the same way; scheduling
            // it is harmless: nothing scheduled runs any more.)
            if (job->storage_ == JobBase::Storage::heap) {
                job->shutdown_host_ = job->host_;  // nullptr if the caller left (abandoned)
                job->host_ = nullptr;
            }
        });
    }

    /// True while a worker runs a shielded call of `task`, whose fn may use the task's frames
    /// (the job itself lives in one without shutdown_timeout; with it, std::ref arguments may
    /// point into one): the frames must outlive the job's completion. With shutdown_timeout
    /// only until the timeout: then the worker is given up, and its fn must not use them.
    [[nodiscard]] bool holds_frames_of(const TaskState& task) noexcept {
        const bool waiting = !deadline_passed();
        bool held = false;
        busy_.for_each([&](WorkerThread& worker) {
            const JobBase* job = worker.job();
            if (job->storage_ == JobBase::Storage::in_awaiter && job->host_ == &task) held = true;
            if (waiting && job->shutdown_host_ == &task) held = true;
        });
        return held;
    }

    /// When shutdown gives up on busy workers (empty: never).
    [[nodiscard]] std::optional<std::chrono::steady_clock::time_point> shutdown_deadline()
        const noexcept {
        return shutdown_deadline_;
    }

    /// After the tasks are gone: waits for the busy workers (at most shutdown_timeout, then
    /// gives up on the rest) and joins every worker. The loop only processes completions and
    /// exited nodes meanwhile (EventLoop::drain_posts); it never blocks on a join.
    void finish_shutdown() noexcept {
        while (busy_count_ > 0 && !deadline_passed()) loop_->drain_posts(shutdown_deadline_);
        while (WorkerThread* worker = busy_.pop_front()) {
            --busy_count_;
            give_up(*worker);
        }
        while (retiring_count_ > 0) loop_->drain_posts(std::nullopt);
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

    [[nodiscard]] bool deadline_passed() const noexcept {
        return shutdown_deadline_ && std::chrono::steady_clock::now() >= *shutdown_deadline_;
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
    std::optional<std::chrono::steady_clock::time_point> shutdown_deadline_;  // with a timeout
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
