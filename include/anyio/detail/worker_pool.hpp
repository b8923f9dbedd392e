// The loop's pool of worker threads (the loop side; see worker_thread.hpp for the thread).
//
// Semantics (anyio's WorkerThread pool, with trio's idle reaping):
// - a thread is started only when no idle worker exists, so threads started == peak
//   concurrency (every call in flight is counted on one worker: the one it was given to, or
//   the backup held for it while it waits in GrantedJobs, or the worker that claimed it);
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
//
// Where a dispatched job goes (dispatch), GrantedJobs' `last` being the worker that finished a
// job last (the one most likely to be awake):
// - to the most recently idle worker if it is awake: through its mailbox, no wake-up needed;
// - if that worker sleeps and is `last`: to it, waking it (it takes what is queued after);
// - if it sleeps and `last` is another worker, still usable (spinning, running a short job,
//   woken, or parked: then the loop wakes it, once, when its timer next fires, i.e. after the
//   burst of dispatches of this loop turn): into GrantedJobs, where `last` takes it; the
//   sleeper is held as its backup (reserved) and stays asleep;
// - otherwise (no `last`, or it has run one job for busy_limit already) to the sleeper,
//   waking it.
// A job left in GrantedJobs while `last` stays busy for busy_limit (a blocking job), or for
// wait_limit at all, is taken back and given to its backup, which is woken then: blocking jobs
// still get one thread each, a moment later.
//
// Loop-thread only. Stands on the public capacity_limiter.hpp and event_loop.hpp.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "../capacity_limiter.hpp"
#include "../event_loop.hpp"
#include "granted_jobs.hpp"
#include "intrusive_list.hpp"
#include "spin.hpp"
#include "timer_heap.hpp"
#include "worker_thread.hpp"

namespace anyio {

/// to_thread::statistics() of a loop's worker pool.
struct WorkerPoolStatistics {
    std::size_t workers = 0;       // threads alive now: idle, busy, or stopping (not yet joined)
    std::size_t idle_workers = 0;
    // Running a call, or held for one queued for the spinning worker. A worker that took the
    // next call before its previous completion reached the loop counts once.
    std::size_t busy_workers = 0;
    std::uint64_t threads_created = 0;
    std::uint64_t threads_pruned = 0;  // stopped for being idle too long
    std::uint64_t jobs_completed = 0;
};

namespace detail {

class WorkerPool {
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;
    using Where = WorkerThread::Where;

public:
    /// How long `last` may stay busy with one job before the jobs waiting for it go to their
    /// backups: far longer than a short job, far shorter than a blocking one.
    static constexpr std::chrono::microseconds busy_limit{10};
    /// How long a job may wait for a `last` that is awake but does not get a CPU. Waking its
    /// backup would not help then (it would wait for a CPU too), so this is only a backstop.
    static constexpr std::chrono::microseconds wait_limit{1000};
    /// After `last` was found stuck, this many dispatches queue at most one job for it.
    static constexpr std::uint32_t blocking_memory = 256;

    explicit WorkerPool(EventLoop& loop)
        : loop_(&loop), shared_(std::make_shared<PoolShared>()), reaper_(this), watch_(this) {
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
        loop_->remove_timer(&watch_);
        for (auto* list : {&idle_, &reserved_}) {
            while (WorkerThread* worker = list->pop_front()) {
                worker->request_stop();
                worker->join();
                delete worker;
            }
        }
        while (WorkerThread* worker = retiring_.pop_front()) {
            worker->join();
            delete worker;
        }
    }

    /// True if shutdown may give up on a busy worker (a shutdown_timeout is set): its job must
    /// then live on the heap, where the worker can own it after the awaiting frame is gone.
    [[nodiscard]] bool may_detach_workers() const noexcept { return shutdown_timeout_.has_value(); }

    /// Runs `job` on a worker (see the top of this file). Throws std::system_error if a thread
    /// cannot be started (the pool stays usable, the job was not handed out).
    void dispatch(JobBase& job) {
        if (shutting_down_) {
            throw RunFinishedError(
                "anyio::to_thread::run_sync: the event loop is shutting down and no longer "
                "starts blocking calls");
        }
        const time_point now = clock::now();
        settle_granted(now);
        prune(now);
        for (;;) {
            WorkerThread* worker = first_available_idle();
            if (worker == nullptr && (!idle_.empty() || resolved_ != tail_)) {
                // Every call in flight must be counted on the worker that runs it before a
                // thread is added (threads started == peak concurrency).
                wait_until_claims_known(now);
                worker = first_available_idle();
            }
            if (worker == nullptr) {
                WorkerThread* fresh = start_worker();  // throws; nothing is handed out yet
                begin_call(job);
                if (!fresh->try_give(&job)) std::terminate();  // a new thread's mailbox is empty
                count_on(job, *fresh, now);
                return;
            }
            if (worker->asleep() && may_queue_for_last(*worker, now)) {
                begin_call(job);
                queue_granted(job, *worker, now);
                return;
            }
            begin_call(job);
            if (give(job, *worker)) {  // wakes it if it sleeps
                count_on(job, *worker, now);
                return;
            }
            // It began taking a granted job meanwhile: its claim decides where it goes.
            undo_begin_call(job);
        }
    }

    /// The job's completion reached the loop: its worker is idle again (most recent first)
    /// once no other call is counted on it.
    void completed(JobBase& job) noexcept {
        const time_point now = clock::now();
        if (job.granted_) {
            // acquire: pairs with the claimer's release store (the post orders it as well).
            attribute(job, *job.runner_.load(std::memory_order_acquire), now);
        }
        WorkerThread* worker = job.worker_;
        job.ListHook<InFlightTag>::unlink();
        loop_->remote_work_finished();
        --worker->jobs_;
        if (worker->start_failed()) {
            retire(worker);  // its thread is already on its way out
            return;
        }
        ++jobs_completed_;
        if (shutting_down_ && worker->jobs_ == 0) {
            retire(worker);
        } else {
            relist(*worker, now);
        }
        settle_granted(now);
    }

    /// A retiring worker has run on_thread_stop and posted its exited node: only the thread's
    /// own exit is left, so joining it here costs the loop next to nothing.
    void exited(WorkerThread* worker) noexcept {
        leave_list(*worker);
        if (worker->id() != 0) {
            by_id_[worker->id()] = nullptr;
            free_ids_.push_back(worker->id());  // capacity reserved in start_worker
        }
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
        loop_->remove_timer(&watch_);
        // No job waits for `last` any more: each goes to its backup (a job in an awaiter must
        // not stay queued where nobody is bound to run it while its frame is destroyed), and
        // every claim is counted on its claimer before the idle workers are retired.
        take_back_granted(clock::now(), /*all=*/true);
        wait_until_claims_known(clock::now());
        while (WorkerThread* worker = idle_.front()) retire(worker);
        // A cooperative fn (stop_token, check_cancelled) can end, so run() need not wait.
        in_flight_.for_each([](JobBase& job) {
            job.cancelled_.store(true, std::memory_order_release);  // release: as in run_sync
            if (job.request_stop_ != nullptr) job.request_stop_(&job);
            // A heap job's awaiter may be destroyed before the completion arrives (once the
            // timeout has passed): the completion must not schedule a task that is gone. Its
            // task is remembered, so that holds_frames_of keeps the frames its fn may use
            // until then. (A job in an awaiter keeps its task alive the same way; scheduling
            // it is harmless: nothing scheduled runs any more.)
            if (job.storage_ == JobBase::Storage::heap) {
                job.shutdown_host_ = job.host_;  // nullptr if the caller left (abandoned)
                job.host_ = nullptr;
            }
        });
    }

    /// True while a call in flight is a shielded call of `task`, whose fn may use the task's
    /// frames (the job itself lives in one without shutdown_timeout; with it, std::ref
    /// arguments may point into one): the frames must outlive the job's completion. With
    /// shutdown_timeout only until the timeout: then the worker is given up, and its fn must
    /// not use them. Every call in flight is in in_flight_, whichever worker runs it (given,
    /// claimed, or handed to its backup at shutdown).
    [[nodiscard]] bool holds_frames_of(const TaskState& task) noexcept {
        const bool waiting = !deadline_passed();
        bool held = false;
        in_flight_.for_each([&](const JobBase& job) {
            if (job.storage_ == JobBase::Storage::in_awaiter && job.host_ == &task) held = true;
            if (waiting && job.shutdown_host_ == &task) held = true;
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
        if (busy_count_ > 0) give_up_busy_workers();
        while (retiring_count_ > 0) loop_->drain_posts(std::nullopt);
    }

    [[nodiscard]] WorkerPoolStatistics statistics() noexcept {
        resolve(clock::now());  // count every claimed call on the worker that runs it
        WorkerPoolStatistics stats;
        stats.idle_workers = idle_count_;
        stats.busy_workers = busy_count_ + reserved_count_;
        stats.workers = idle_count_ + busy_count_ + reserved_count_ + retiring_count_;
        stats.threads_created = threads_created_;
        stats.threads_pruned = threads_pruned_;
        stats.jobs_completed = jobs_completed_;
        return stats;
    }

    // ---- White box, for tests ----

    /// What became of the jobs queued in GrantedJobs (loop-side counts, no synchronisation).
    struct GrantedCounts {
        std::uint64_t queued = 0;     // queued for `last`
        std::uint64_t claimed = 0;    // claimed by the worker that finished a job last
        std::uint64_t to_backup = 0;  // taken back and given to their backups
        std::uint64_t to_last = 0;    // taken back and given to a sleeping `last`, waking it
    };
    [[nodiscard]] GrantedCounts granted_counts() noexcept {
        resolve(clock::now());
        return counts_;
    }
    /// True if every idle worker sleeps on its mailbox (none is spinning any more).
    [[nodiscard]] bool idle_workers_asleep() noexcept {
        for (WorkerThread* worker = idle_.front(); worker != nullptr; worker = next_idle(worker)) {
            if (!worker->asleep()) return false;
        }
        return true;
    }

private:
    struct Reaper final : TimerNode {
        explicit Reaper(WorkerPool* pool) noexcept : TimerNode(&fire), pool(pool) {}
        static void fire(TimerNode* self, bool run) {
            if (!run) return;
            WorkerPool* pool = static_cast<Reaper*>(self)->pool;
            const time_point now = clock::now();
            pool->resolve(now);
            pool->prune(now);
            if (WorkerThread* oldest = pool->idle_.back()) pool->arm_reaper(oldest->idle_since_);
        }
        WorkerPool* pool;
    };

    /// Fires while jobs wait in GrantedJobs: the ones that waited too long go to their backups.
    struct Watch final : TimerNode {
        explicit Watch(WorkerPool* pool) noexcept : TimerNode(&fire), pool(pool) {}
        static void fire(TimerNode* self, bool run) {
            if (run) static_cast<Watch*>(self)->pool->settle_granted(clock::now(), /*watch=*/true);
        }
        WorkerPool* pool;
    };

    // ---- Lists ----

    /// Puts `worker` in the list its counts call for: busy while a call is counted on it,
    /// reserved while it backs a granted job, idle (at the front, idle since `now`) otherwise.
    /// A retiring worker stays retiring. Inlined: every call and completion moves a worker
    /// (W1 pays it twice per call), and at most call sites `to` is then known.
    [[gnu::always_inline]] void relist(WorkerThread& worker, time_point now) noexcept {
        if (worker.where_ == Where::retiring) return;
        const Where to = worker.jobs_ > 0  ? Where::busy
                         : worker.reserved_ ? Where::reserved
                                            : Where::idle;
        if (to == worker.where_) return;
        leave_list(worker);
        worker.where_ = to;
        switch (to) {
        case Where::busy:
            busy_.push_back(worker);
            ++busy_count_;
            break;
        case Where::reserved:
            reserved_.push_back(worker);
            ++reserved_count_;
            break;
        default:
            worker.idle_since_ = now;
            idle_.push_front(worker);
            ++idle_count_;
            if (!reaper_.queued()) arm_reaper(now);
            break;
        }
    }

    [[gnu::always_inline]] void leave_list(WorkerThread& worker) noexcept {
        switch (worker.where_) {
        case Where::nowhere:
            return;
        case Where::idle:
            --idle_count_;
            break;
        case Where::reserved:
            --reserved_count_;
            break;
        case Where::busy:
            --busy_count_;
            break;
        case Where::retiring:
            --retiring_count_;
            break;
        }
        worker.ListHook<WorkerListTag>::unlink();
        worker.where_ = Where::nowhere;
    }

    /// The most recently idle worker that is not taking a granted job (such a worker is
    /// counted where its claim says, as soon as the loop learns of it).
    WorkerThread* first_available_idle() noexcept {
        for (WorkerThread* worker = idle_.front(); worker != nullptr; worker = next_idle(worker)) {
            if (!worker->taking()) return worker;
        }
        return nullptr;
    }
    WorkerThread* next_idle(WorkerThread* worker) noexcept {
        if (worker == idle_.back()) return nullptr;
        return static_cast<WorkerThread*>(worker->ListHook<WorkerListTag>::next);
    }

    // ---- Calls in flight ----

    /// The job is about to be handed out: from now on it is in flight.
    void begin_call(JobBase& job) noexcept {
        job.pool_ = this;
        job.dispatched();
        in_flight_.push_back(job);
        loop_->remote_work_started();
    }
    /// It was not handed out after all (the worker began taking a granted job).
    void undo_begin_call(JobBase& job) noexcept {
        job.ListHook<InFlightTag>::unlink();
        loop_->remote_work_finished();
        job.undispatched();
    }

    /// Counts the call on `worker` (busy from now on). Inlined like relist: it runs once per
    /// dispatch, and inlined the compiler sees that `worker` goes to the busy list.
    [[gnu::always_inline]] void count_on(JobBase& job, WorkerThread& worker, time_point now) noexcept {
        job.worker_ = &worker;
        ++worker.jobs_;
        relist(worker, now);
    }

    // ---- GrantedJobs (the loop's side) ----

    /// The worker GrantedJobs calls `id` (nullptr: none, or one that is retiring).
    WorkerThread* worker_for(std::uint16_t id) noexcept {
        if (id == 0 || id >= by_id_.size()) return nullptr;
        WorkerThread* worker = by_id_[id];
        return worker != nullptr && worker->where_ != Where::retiring ? worker : nullptr;
    }

    /// True if a job for which the sleeping `sleeper` would have to be woken had better be
    /// queued for `last`: there is room, `last` is another usable worker, and it is not stuck.
    bool may_queue_for_last(WorkerThread& sleeper, time_point now) noexcept {
        if (tail_ - resolved_ >= GrantedJobs::capacity) return false;
        // acquire: a hint; queue_granted() re-checks with seq_cst after publishing the job.
        const GrantedJobs::State state = shared_->granted.load(std::memory_order_acquire);
        if (state.last == sleeper.id()) return false;  // it is `last`: waking it is the way
        if (worker_for(state.last) == nullptr || stuck(state, now)) return false;
        if (blocking_seen_ > 0) {
            // `last` was found stuck lately: jobs here may block. Queue only what a spinning
            // `last` takes at once, one job; the others go to sleepers straight away.
            --blocking_seen_;
            return state.phase == GrantedJobs::Phase::free && state.head == tail_;
        }
        return true;
    }

    /// Hands `job` to `worker` (waking it if it sleeps). False if it is taking a granted job.
    bool give(JobBase& job, WorkerThread& worker) noexcept {
        // Waking `last`: it takes the jobs queued for it once this one is done.
        if (worker.asleep() && worker.id() != 0) shared_->granted.wake_last(worker.id());
        return worker.try_give(&job);
    }

    /// True if `last` has been busy with the same job for busy_limit or longer, as far as the
    /// loop has watched it.
    bool stuck(const GrantedJobs::State& state, time_point now) noexcept {
        if (state.phase != GrantedJobs::Phase::busy) {
            busy_watched_ = false;
            return false;
        }
        const std::uint32_t signature = (std::uint32_t{state.last} << 16) | state.runs;
        if (!busy_watched_ || signature != busy_signature_) {
            busy_watched_ = true;
            busy_signature_ = signature;
            busy_since_ = now;
            return false;
        }
        return now - busy_since_ >= busy_limit;
    }

    /// Queues `job` for `last`, holding the sleeping `backup` for it.
    void queue_granted(JobBase& job, WorkerThread& backup, time_point now) noexcept {
        job.worker_ = &backup;
        job.granted_ = true;
        job.granted_index_ = tail_;
        backup.reserved_ = true;
        relist(backup, now);
        pushed_at_[tail_ % GrantedJobs::capacity] = now;
        tail_ = shared_->granted.push(tail_, &job);
        ++counts_.queued;
        // seq_cst: the loop's half of the pattern described at GrantedJobs::push: a `last`
        // that parks after this load sees the job when it looks once more; if it had parked
        // already, the watch wakes it with the job soon (after this loop turn's other
        // dispatches, so once for all of them).
        arm_watch(shared_->granted.load(std::memory_order_seq_cst), now);
    }

    /// Learns who claimed the granted jobs claimed so far, oldest first, and counts each on
    /// its claimer; stops at a claim made a moment ago whose claimer is not visible yet.
    void resolve(time_point now) noexcept {
        if (resolved_ == tail_) return;
        // relaxed: only the head index is used; who claimed a job is read from the job.
        const std::uint32_t head = shared_->granted.load(std::memory_order_relaxed).head;
        while (resolved_ != head) {
            if (JobBase* job = shared_->granted.slot(resolved_)) {
                // acquire: pairs with the claimer's release; the slot may be reused after.
                WorkerThread* runner = job->runner_.load(std::memory_order_acquire);
                if (runner == nullptr) break;
                attribute(*job, *runner, now);
            }
            ++resolved_;
        }
    }

    /// `runner` claimed the granted `job`: the call is counted on it, its backup is free.
    void attribute(JobBase& job, WorkerThread& runner, time_point now) noexcept {
        shared_->granted.clear(job.granted_index_);
        job.granted_ = false;
        WorkerThread* backup = job.worker_;
        backup->reserved_ = false;
        job.worker_ = &runner;
        ++runner.jobs_;
        ++counts_.claimed;
        relist(runner, now);
        if (backup != &runner) relist(*backup, now);
    }

    /// Resolves what was claimed and takes back the jobs that waited too long. Only the
    /// watch (`watch`) wakes a sleeping `last`: it fires after the loop turn's dispatches,
    /// so that one wake-up serves all of them.
    void settle_granted(time_point now, bool watch = false) noexcept {
        if (resolved_ == tail_) return;  // the fate of every queued job is known
        resolve(now);
        if (resolved_ == tail_) return;  // and now it is: nothing waits
        take_back_granted(now, /*all=*/false, watch);
    }

    /// Looks at the waiting jobs, oldest first. With `all`, or when `last` is stuck, gone, or
    /// a job waited wait_limit: takes them back and hands each to its backup, waking it.
    /// When `last` is parked and asleep: wakes it with the oldest (it claims the others after
    /// it). Otherwise leaves them to `last` and arms the watch.
    void take_back_granted(time_point now, bool all, bool wake_last = false) noexcept {
        GrantedJobs& granted = shared_->granted;
        for (;;) {
            // acquire: as in may_queue_for_last (a hint; take_back() decides).
            const GrantedJobs::State state = granted.load(std::memory_order_acquire);
            if (state.head == tail_) return;  // nothing waits
            WorkerThread* last = all ? nullptr : worker_for(state.last);
            bool to_last = false;
            const bool is_stuck = last != nullptr && stuck(state, now);
            // Blocking jobs: for a while, queue at most one job at a time for `last`.
            if (is_stuck) blocking_seen_ = blocking_memory;
            if (last != nullptr && !is_stuck &&
                now - pushed_at_[state.head % GrantedJobs::capacity] < wait_limit) {
                if (!wake_last || state.phase != GrantedJobs::Phase::parked || !last->asleep()) {
                    arm_watch(state, now);  // it takes them, or the watch wakes it soon
                    return;
                }
                to_last = true;
            }
            if (!granted.take_back(state.head)) continue;  // claimed meanwhile
            JobBase& job = *granted.slot(state.head);
            granted.clear(state.head);
            job.granted_ = false;
            WorkerThread& backup = *job.worker_;
            backup.reserved_ = false;
            if (to_last) {
                // `last` sleeps until the loop wakes it: it takes the job, and the rest after.
                relist(backup, now);
                if (!give(job, *last)) std::terminate();
                count_on(job, *last, now);
                ++counts_.to_last;
                continue;  // it is woken now: the others wait for it (or the watch)
            }
            // A backup sleeps until the loop wakes it (it was asleep when it was reserved, and
            // only the loop moves a worker out of sleeping), so it takes the job.
            if (!backup.try_give(&job)) std::terminate();
            ++backup.jobs_;
            ++counts_.to_backup;
            relist(backup, now);
        }
    }

    /// Makes sure the watch fires by `when` (it may be queued for later: then it moves).
    void watch_by(time_point when) {
        if (watch_.queued()) {
            if (watch_.when_ <= when) return;
            loop_->remove_timer(&watch_);
        }
        loop_->add_timer(&watch_, when);
    }

    /// The watch fires at the loop's next look at its timers. Not `now`: the loop fires due
    /// timers in one pass with one clock reading, and the watch must not fire again in it.
    void watch_soon() { watch_by(clock::now() + std::chrono::microseconds(1)); }

    /// Arms the watch for when the oldest waiting job must be looked at again (`state`: the
    /// word as just read).
    void arm_watch(const GrantedJobs::State& state, time_point now) {
        if (state.phase == GrantedJobs::Phase::parked) {
            watch_soon();  // asleep in a moment, if not already: then it is woken
            return;
        }
        time_point when = pushed_at_[state.head % GrantedJobs::capacity] + wait_limit;
        if (state.phase == GrantedJobs::Phase::busy || state.phase == GrantedJobs::Phase::woken) {
            // Busy (or about to be): look again when it would count as stuck.
            when = std::min(when, now + busy_limit);
        }
        watch_by(when);
    }

    /// Before a thread is added: waits until every claim is resolved and no idle worker is in
    /// the middle of taking a granted job. Both take a claimer a few instructions, so this
    /// waits only if one was preempted right there.
    void wait_until_claims_known(time_point now) noexcept {
        for (unsigned round = 0;; ++round) {
            resolve(now);
            // relaxed: compared with the loop's own count; resolve() re-reads with acquire.
            bool pending = resolved_ != shared_->granted.load(std::memory_order_relaxed).head;
            for (WorkerThread* worker = idle_.front(); !pending && worker != nullptr;
                 worker = next_idle(worker)) {
                pending = worker->taking();
            }
            if (!pending) return;
            if (round < 64) {
                cpu_relax();
            } else {
                std::this_thread::yield();
            }
        }
    }

    // ---- Threads ----

    /// Makes sure the reaper fires by the time a worker idle since `idle_since` will have idled
    /// for max_idle_time (an earlier arming stands; a later one moves). Saturating: a
    /// max_idle_time too long for the clock means never, and no timer is armed at
    /// time_point::max().
    ///
    /// Never adds the node twice: the reaper's own firing resolves claims first, which can
    /// relist a backup as idle and so arm the reaper already; pushing it again would leave a
    /// second heap entry for one node, which the loop's timer pass then fires for ever (the
    /// node counts as not queued, so removing it does nothing: the loop spun at 100% CPU and
    /// ran nothing else, seen as a hang of stress_faults_test).
    void arm_reaper(time_point idle_since) {
        const auto when = deadline_after(idle_since, max_idle_time_);
        if (when == time_point::max()) return;
        if (reaper_.queued()) {
            if (reaper_.when_ <= when) return;
            loop_->remove_timer(&reaper_);
        }
        loop_->add_timer(&reaper_, when);
    }

    WorkerThread* start_worker() {
        // The worker's id: a returned one, or the next (prepared before the thread starts, so
        // that nothing can fail after it).
        std::uint16_t id = 0;
        const bool reused = !free_ids_.empty();
        if (reused) {
            id = free_ids_.back();
        } else if (next_id_ <= 0xffff) {
            id = static_cast<std::uint16_t>(next_id_);
            free_ids_.reserve(next_id_);  // exited() returns ids without allocating
            if (by_id_.size() <= id) by_id_.resize(std::size_t{id} + 1, nullptr);
        }
        auto worker = std::make_unique<WorkerThread>(shared_, this, id);
        worker->start();  // throws std::system_error; nothing changed yet
        if (reused) {
            free_ids_.pop_back();
        } else if (id != 0) {
            ++next_id_;
        }
        if (id != 0) by_id_[id] = worker.get();
        ++threads_created_;
        return worker.release();
    }

    /// Stops idle workers past max_idle_time, oldest (the back of the LIFO list) first.
    void prune(time_point now) {
        while (WorkerThread* oldest = idle_.back()) {
            if (now - oldest->idle_since_ < max_idle_time_) break;
            // Not taking() then retire(): a worker that is `last` could claim a granted job in
            // between, and a retiring worker's call would be counted nowhere (busy_workers,
            // shutdown_timeout's give-up). Stopping it and claiming are one word's CAS each.
            if (!oldest->stop_if_idle()) break;  // its claim makes it busy: look again later
            ++threads_pruned_;
            retire(oldest);  // request_stop() again: no-op on a stopped mailbox
        }
    }

    /// Asks a worker to exit and keeps it as retiring until its exited node arrives. Never
    /// waits.
    void retire(WorkerThread* worker) noexcept {
        leave_list(*worker);
        worker->request_stop();
        retiring_.push_back(*worker);
        worker->where_ = Where::retiring;
        ++retiring_count_;
        // If it was `last`, jobs waiting for it go to their backups at the watch.
        if (tail_ != resolved_ && !shutting_down_) watch_soon();
    }

    [[nodiscard]] bool deadline_passed() const noexcept {
        return shutdown_deadline_ && std::chrono::steady_clock::now() >= *shutdown_deadline_;
    }

    /// Shutdown timed out while workers still run calls: forget the calls on the loop side,
    /// keep whatever a worker may still write into alive, and let the threads go.
    void give_up_busy_workers() noexcept {
        // Jobs are on the heap whenever a shutdown timeout is set (to_thread.hpp), so a
        // completion can outlive the awaiting frame (JobBase's ownership table).
        in_flight_.for_each([this](JobBase& job) {
            job.ListHook<InFlightTag>::unlink();
            job.pool_ = nullptr;  // its completion, wherever it ends, touches no pool or limiter
            CapacityLimiter::forget_hold(job.hold_);
            loop_->remote_work_finished();
        });
        while (WorkerThread* worker = busy_.front()) {
            leave_list(*worker);
            // It may free itself from now on; its id is never handed out again.
            if (worker->id() != 0) by_id_[worker->id()] = nullptr;
            worker->request_stop();
            if (!worker->give_up()) {
                // It finished in the meantime and is exiting: join it as any retiring worker.
                retiring_.push_back(*worker);
                worker->where_ = Where::retiring;
                ++retiring_count_;
            }
        }
    }

    EventLoop* loop_;
    std::shared_ptr<PoolShared> shared_;
    IntrusiveList<WorkerThread, WorkerListTag> idle_;      // front: most recently idle
    IntrusiveList<WorkerThread, WorkerListTag> reserved_;  // backups of granted jobs
    IntrusiveList<WorkerThread, WorkerListTag> busy_;
    IntrusiveList<WorkerThread, WorkerListTag> retiring_;  // asked to stop, not yet joined
    IntrusiveList<JobBase, InFlightTag> in_flight_;        // dispatched, completion not handled
    Reaper reaper_;
    Watch watch_;
    std::chrono::steady_clock::duration max_idle_time_{};
    std::optional<std::chrono::steady_clock::duration> shutdown_timeout_;
    std::size_t idle_count_ = 0;
    std::size_t reserved_count_ = 0;
    std::size_t busy_count_ = 0;
    std::size_t retiring_count_ = 0;
    std::uint64_t threads_created_ = 0;
    std::uint64_t threads_pruned_ = 0;
    std::uint64_t jobs_completed_ = 0;
    // GrantedJobs, the loop's side: jobs pushed so far, and how many of them the loop knows
    // the fate of (taken back, or claimed by a known worker). Never more than capacity apart.
    std::uint32_t tail_ = 0;
    std::uint32_t resolved_ = 0;
    time_point pushed_at_[GrantedJobs::capacity] = {};
    // What the loop last saw of a busy `last` (stuck()).
    std::uint32_t blocking_seen_ = 0;  // dispatches left that queue at most one job
    GrantedCounts counts_;
    bool busy_watched_ = false;
    std::uint32_t busy_signature_ = 0;
    time_point busy_since_{};
    // Worker ids for GrantedJobs (1..65535): returned when a worker is joined.
    std::vector<WorkerThread*> by_id_;  // the live worker of each id (nullptr: none)
    std::vector<std::uint16_t> free_ids_;
    std::uint32_t next_id_ = 1;
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
