// One worker thread of the offload pool, and the job it runs.
//
// The loop hands a job over through the worker's mailbox word, or queues it in the pool's
// GrantedJobs (granted_jobs.hpp) for the worker that finished a job last, which takes it
// without a wake-up. The worker runs it and posts the job itself (it is also the completion
// node) back through the loop's remote inbox. The worker never touches loop-owned state, and
// never touches a job after posting it.
//
// A worker's life. [brackets]: the pool list it is in, as the loop sees it. Every transition
// between lists is made on the loop thread. The loop waits for a worker in one place only:
// before it adds a thread, until every claim of a granted job is known (a claimer takes a few
// instructions for that; WorkerPool::wait_until_claims_known).
//
//      WorkerPool::start_worker: a std::thread, created with every asynchronous signal blocked
//            |
//            v
//      starting [busy]       restores the timer slack the loop's thread had, names itself,
//            |               runs on_thread_start; if that throws, a failed start: the job it
//            |               was started for fails with that exception (the caller gets it,
//            |               the token comes back) and the thread retires at once, without
//            |               on_thread_stop
//            v
//  +---> busy [busy]         runs the job, becomes GrantedJobs' `last`, posts the completion;
//  |         |               then, as `last`, spins at most 50 us (not on the loop's CPU),
//  |         |               taking granted jobs as they come: each is one more call it runs
//  |         |               (the loop counts it in jobs_ once it learns who claimed it)
//  |         |  the last of its completions is processed on the loop (WorkerPool::completed)
//  |         v
//  |     idle [idle]         at the front of the idle list (LIFO); still spinning, or asleep
//  |         |               on its mailbox futex (it parked: it no longer takes granted jobs)
//  |         +--> reserved [reserved]  asleep, held as the backup of a granted job (dispatch
//  |         |         |               queued the job for `last` instead of waking it)
//  |         |         +-- `last` took the job: back to idle [idle] (front, idle since now)
//  |         |         +-- the job waited too long (`last` is busy with a long job, or is not
//  |         |             looking): the loop takes it back and gives it here: busy [busy]
//  +---------+  give(job) from the front (a spinning worker takes it at once; a sleeping one
//            |  is woken only when no worker is looking at GrantedJobs)
//            |
//            |  request_stop(): idle for max_idle_time or longer (by the reaper timer or the
//            |  next dispatch, oldest first), the pool shutting down, or a failed start
//            v
//      retiring [retiring]   finishes a job it was given or had taken, runs on_thread_stop,
//            |               then posts its "exited" node
//            v
//      joined and freed      on the loop, when the exited node arrives (worker_exited): the
//                            join only waits for the thread's own exit by then
//
//  busy when leaving run() times out (shutdown_timeout): given up (WorkerPool::give_up). The
//  pool forgets it; it finishes its job, drops the completion if the loop is gone, runs
//  on_thread_stop and frees itself. The `ownership_` word decides who frees it.
//
// The mailbox word (`state_`), which the loop and the worker race on:
//
//      empty --give--> has_job --worker takes it--> empty          (loop: give, CAS)
//      empty --worker parks--> sleeping --give (+ futex wake)--> has_job
//      empty --worker claims a granted job--> taking --job done--> empty   (worker, CAS)
//      empty | sleeping --request_stop, stop_if_idle--> stopping   (loop, CAS)
//
// While `taking`, give() fails: the loop never hands a job to a worker that runs a job the
// loop has not attributed to it yet (it learns that from the job's runner_). request_stop()
// leaves has_job and taking alone and sets stop_requested_, which the worker checks after
// the job (a store-buffer pattern: see request_stop). Only the loop leaves `sleeping`.
#pragma once

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include <pthread.h>
#include <sys/prctl.h>

#include "../capacity_limiter.hpp"
#include "granted_jobs.hpp"
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
void worker_exited(Runnable* self, bool run);  // defined in worker_pool.hpp

// Who owns a job's storage.
//
// A job in the awaiter (the default, shielded mode) is part of the awaiting coroutine frame
// and is never freed on its own: that frame cannot end before the completion has been
// processed (DESIGN.md, invariant 4). A job on the heap (abandon_on_cancel, or a loop that may
// give up on busy workers at shutdown) has up to two holders, in JobBase::holders_, and
// whichever lets go last frees it (JobBase::let_go, from any thread):
//
//   holders                event                                          holders after
//   awaiter                handed out (WorkerPool::dispatch: to a         awaiter + completion
//                          worker, or queued in GrantedJobs)
//   awaiter + completion   completion processed; the caller resumes       awaiter
//   awaiter + completion   the caller leaves (abandon_on_cancel)          completion
//   awaiter + completion   the frame is destroyed while the worker runs   completion
//                          on (loop shutdown, after giving up on it)
//   awaiter + completion   completion dropped unprocessed (loop closed)   awaiter
//   awaiter                the awaiter is destroyed                       (freed)
//   completion             completion processed or dropped                (freed)
//
// The completion is processed on the loop (complete_job), or dropped: at loop close, or on
// the worker when it finds the loop's inbox closed. When the pool gives up on a busy worker it
// does not change the holders; it clears the job's pool_, so the completion, wherever it ends,
// touches neither the pool nor the limiter.
//
// Who touches a job while it is in flight (from dispatch until its completion is processed):
// the loop (its loop-side fields, and runner_ with acquire); exactly one worker, the one it
// was given to or the one whose claim took it out of GrantedJobs (execute_, the outcome,
// runner_ with release, then the post); and GrantedJobs holds a pointer to it while it waits
// there, which only its claimer reads. Either way the job outlives every such touch: its
// storage is not freed before its completion is processed or dropped (the table above).

struct InFlightTag {};  // the pool's list of calls in flight (loop side)

/// A unit of blocking work. It lives in the awaiting coroutine's frame (default mode) or in a
/// heap block, and doubles as the completion node the worker posts.
struct JobBase : Runnable, ListHook<InFlightTag> {
    using Execute = void (*)(JobBase* self) noexcept;
    using Fail = void (*)(JobBase* self, std::exception_ptr error) noexcept;
    using Destroy = void (*)(JobBase* self) noexcept;
    enum class Storage : unsigned char { in_awaiter, heap };
    enum Holder : std::uint8_t { awaiter_holds = 1, completion_holds = 2 };

    JobBase(Storage storage, Execute execute, Fail fail, Destroy destroy) noexcept
        : Runnable(&complete_job),
          execute_(execute),
          fail_(fail),
          destroy_(destroy),
          storage_(storage),
          holders_(storage == Storage::heap ? awaiter_holds : 0) {}
    JobBase(const JobBase&) = delete;
    JobBase& operator=(const JobBase&) = delete;

    /// The loop hands the job to a worker: from now on its completion holds it too.
    void dispatched() noexcept {
        // relaxed: the job is not shared yet; WorkerThread::try_give() or GrantedJobs::push
        // publishes it (release).
        if (storage_ == Storage::heap) {
            holders_.store(awaiter_holds | completion_holds, std::memory_order_relaxed);
        }
    }
    /// dispatched() undone: the worker it was meant for would not take it (still unshared).
    void undispatched() noexcept {
        // relaxed: as in dispatched(); no other thread has seen the job.
        if (storage_ == Storage::heap) holders_.store(awaiter_holds, std::memory_order_relaxed);
    }

    /// `who` is done with the job; the last holder of a heap job frees it (table above).
    static void let_go(JobBase* job, Holder who) noexcept {
        if (job->storage_ == Storage::in_awaiter) return;  // it ends with the awaiter
        // acq_rel: the last holder frees the job, so it must see what the other one wrote
        // into it (the other's release) before freeing it (this acquire).
        const auto before =
            job->holders_.fetch_and(static_cast<std::uint8_t>(~who), std::memory_order_acq_rel);
        if (before == who) job->destroy_(job);
    }

    /// The caller has left (abandon_on_cancel): nobody will take the outcome.
    [[nodiscard]] bool caller_left() const noexcept { return host_ == nullptr; }

    Execute execute_;                  // runs on the worker: calls fn, stores the outcome
    Fail fail_;                        // stores an error as the outcome instead (failed start)
    void (*request_stop_)(JobBase* self) noexcept = nullptr;  // fn's stop_token, if it takes one
    Destroy destroy_;                  // frees a heap job (let_go decides when)
    const Storage storage_;
    std::atomic<std::uint8_t> holders_;  // heap jobs: JobBase::Holder bits (any thread)
    // A granted job's claimer writes itself here (release) before running it; the loop reads
    // it (acquire) to learn who runs the job. Unused for jobs handed over by give().
    std::atomic<WorkerThread*> runner_{nullptr};
    WorkerPool* pool_ = nullptr;       // loop-side fields from here on; nullptr: given up on
    // The worker the loop counts the call on: the one it was given to; for a granted job its
    // backup until the loop learns who claimed it, then the claimer.
    WorkerThread* worker_ = nullptr;
    std::uint32_t granted_index_ = 0;  // its index in GrantedJobs while `granted_`
    bool granted_ = false;             // queued in GrantedJobs, claimer not known yet
    LimiterHold hold_;                 // the per-call borrower's token
    TaskState* host_ = nullptr;        // the awaiting task (nullptr once it left)
    // Leaving run() with shutdown_timeout: the task a shielded heap job was called from, whose
    // frames its fn may still use (std::ref arguments): kept until the job ends or the timeout.
    const TaskState* shutdown_host_ = nullptr;
    std::coroutine_handle<> resume_;
    CancelScope* host_scope_ = nullptr;  // where from_thread::run tasks are started
    CancelScope* call_scope_ = nullptr;  // scope of a from_thread::run in progress
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
    // Granted jobs for the worker that finished a job last; only that worker spins
    // (BENCH.md: never more than one spinning worker).
    GrantedJobs granted;
};

/// Tests set this to make the next N thread starts fail with std::system_error (EAGAIN).
inline std::atomic<int> injected_thread_start_failures{0};

struct WorkerListTag {};  // the pool's idle, busy or retiring list (one at a time)

class WorkerThread : public ListHook<WorkerListTag> {
public:
    /// `id`: its name in GrantedJobs (1..65535, unique among the pool's live workers), or 0
    /// for a worker that never takes granted jobs (the pool ran out of ids).
    WorkerThread(std::shared_ptr<PoolShared> shared, WorkerPool* pool, std::uint16_t id) noexcept
        : id_(id), exited_(this), pool_(pool), shared_(std::move(shared)) {}
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

    /// Hands `job` to this worker unless it is taking a granted job (loop thread). Wakes it if
    /// it sleeps. False: it is `taking` (it runs, or is about to run, a job it claimed).
    bool try_give(JobBase* job) noexcept {
        // acquire, before job_ is written: the worker may still be reading job_ from its
        // previous hand-over (the loop can wake `last` with a job before its last completion
        // arrives); the empty or sleeping it wrote after that read (release) orders the read
        // before this write.
        std::uint32_t state = state_.load(std::memory_order_acquire);
        if (state != empty && state != sleeping) return false;
        job_ = job;  // read by the worker only after it sees has_job (published below)
        return replace_idle(state, has_job);
    }

    /// True if the worker sleeps on its mailbox (loop thread). A sleeper can be held as the
    /// backup of a granted job: it cannot claim one, since only the loop wakes it.
    [[nodiscard]] bool asleep() const noexcept {
        // relaxed: only the loop moves a worker out of `sleeping` (try_give, request_stop; a
        // spurious futex wake-up leaves the word as it is), so a true answer stays true until
        // the loop acts on it.
        return state_.load(std::memory_order_relaxed) == sleeping;
    }
    /// True if the worker is taking a granted job (loop thread; a hint: try_give decides).
    [[nodiscard]] bool taking() const noexcept {
        // relaxed: a hint only; the worker may start or stop taking right after.
        return state_.load(std::memory_order_relaxed) == taking_job;
    }

    /// Stops the worker if it neither has a job handed to it nor is taking a granted one
    /// (loop thread). False: it is busy after all (it claimed a granted job just now); it was
    /// not asked to stop. Once this succeeds the worker runs nothing more: its own move to
    /// `taking` fails.
    [[nodiscard]] bool stop_if_idle() noexcept {
        // relaxed: only a first guess for the compare-and-swap, which re-reads. That
        // compare-and-swap excludes the worker's empty -> taking one, so a claim and this stop
        // cannot both succeed.
        return replace_idle(state_.load(std::memory_order_relaxed), stopping);
    }

    /// Asks the worker to exit once its current job (if any) is done (loop thread).
    void request_stop() noexcept {
        // seq_cst store, then seq_cst load of the state: with the worker's seq_cst take of a
        // job (or its seq_cst return from `taking` to empty) and its seq_cst load of the flag
        // after it, either we see the mailbox empty or sleeping (and stop it below) or the
        // worker sees the flag: a store-buffer pattern that release/acquire alone would not
        // exclude.
        stop_requested_.store(true, std::memory_order_seq_cst);
        std::uint32_t state = state_.load(std::memory_order_seq_cst);
        // A job handed over but not yet taken, or a granted job being taken, stays: the worker
        // checks the flag after it.
        (void)replace_idle(state, stopping);
    }

    /// Waits for the thread to end (loop thread). Called once the worker has posted its
    /// "exited" node, when only the thread's own exit is left, or when the loop is gone.
    void join() {
        if (thread_.joinable()) thread_.join();
    }

    /// Gives the thread up (leaving run() timed out while it runs a job): it frees itself when
    /// it exits. Returns false if it is already exiting; its "exited" node is then on its way
    /// and the pool joins and frees it as usual.
    bool give_up() noexcept {
        int expected = owned;
        // acq_rel: pairs with the worker's exchange at exit; exactly one side decides. On
        // success the worker owns `this` from now on, thread_ included.
        return ownership_.compare_exchange_strong(expected, given_up, std::memory_order_acq_rel,
                                                  std::memory_order_acquire);
    }

    [[nodiscard]] std::uint16_t id() const noexcept { return id_; }
    [[nodiscard]] WorkerPool* pool() const noexcept { return pool_; }
    /// The worker's start hook threw (read on the loop with the failed job's completion).
    [[nodiscard]] bool start_failed() const noexcept { return start_failed_; }

    // ---- Loop side: WorkerPool's bookkeeping (never touched by the worker thread) ----
    enum class Where : std::uint8_t { nowhere, idle, reserved, busy, retiring };
    std::chrono::steady_clock::time_point idle_since_{};
    std::uint32_t jobs_ = 0;   // calls in flight counted on this worker (JobBase::worker_)
    bool reserved_ = false;    // the backup of a granted job
    Where where_ = Where::nowhere;  // the pool list it is in

private:
    enum State : std::uint32_t { empty = 0, sleeping = 1, has_job = 2, stopping = 3, taking_job = 4 };
    enum Ownership : int { owned = 0, exited = 1, given_up = 2 };

    /// Posted by the worker after on_thread_stop: the loop joins it then (worker_exited).
    struct ExitedNode final : Runnable {
        explicit ExitedNode(WorkerThread* owner) noexcept
            : Runnable(&worker_exited), worker(owner) {}
        WorkerThread* worker;
    };
    friend void worker_exited(Runnable* self, bool run);

    /// Moves the mailbox from empty or sleeping to `to` (loop thread), waking the worker if
    /// it slept; `state` is the caller's last reading. False, and nothing changed: it holds a
    /// job handed over, is taking a granted one, or is stopping.
    bool replace_idle(std::uint32_t state, std::uint32_t to) noexcept {
        while (state == empty || state == sleeping) {
            // release: publishes what the loop wrote before (job_, the job's contents) to the
            // worker, which loads the state with acquire. acquire: we learn whether it went to
            // sleep, to wake it only then.
            if (state_.compare_exchange_weak(state, to, std::memory_order_acq_rel,
                                             std::memory_order_acquire)) {
                if (state == sleeping) futex_wake(&state_);
                return true;
            }
        }
        return false;
    }

    void main() {
        // Held to the very end: the loop may free `this` as soon as the exited node is posted,
        // and post() still touches the loop's shared block after that.
        const std::shared_ptr<PoolShared> shared = shared_;
        restore_timer_slack(shared->loop->inherited_timer_slack());
        set_thread_name(shared->thread_name);
        current_worker_loop = shared->loop.get();
        const std::exception_ptr start_error = run_start_hook(shared->on_thread_start);
        for (;;) {
            bool granted = false;
            JobBase* job = next_job(granted);
            if (job == nullptr) break;  // asked to stop
            if (start_error) {
                // A failed start: the call that needed this thread gets the hook's error.
                start_failed_ = true;  // published to the loop by the post below
                job->fail_(job, start_error);
                if (!shared->loop->post(job)) job->invoke_(job, false);  // loop gone: drop it
                break;
            }
            current_job = job;
            job->execute_(job);
            current_job = nullptr;
            // Last to finish a job: free to take granted jobs, before the loop learns of this
            // completion (so that, handling it, the loop finds this worker last).
            if (id_ != 0) shared->granted.finished(id_);
            if (granted) {
                // seq_cst: leaving `taking` is this side of request_stop's store-buffer
                // pattern (the flag is checked below).
                state_.store(empty, std::memory_order_seq_cst);
            }
            // The job is the completion node. After a successful post the job belongs to the
            // loop again (its awaiter may resume and free it at once): do not touch it.
            if (!shared->loop->post(job)) job->invoke_(job, false);  // loop gone: drop it
            // seq_cst: the other half of request_stop's store-buffer pattern.
            if (stop_requested_.load(std::memory_order_seq_cst)) break;
        }
        if (id_ != 0) shared->granted.leave(id_);
        if (!start_error) run_hook(shared->on_thread_stop);
        current_worker_loop = nullptr;
        // acq_rel: pairs with give_up(); if the loop gave us up, we free ourselves.
        if (ownership_.exchange(exited, std::memory_order_acq_rel) == given_up) {
            thread_.detach();  // ours since give_up(); nobody will join
            delete this;
            return;
        }
        // The last touch of `this`: from here on the loop may join and free it. If the loop is
        // gone the post fails, and the pool's destructor joins us instead.
        (void)shared->loop->post(&exited_);
    }

    /// The next job: handed over in the mailbox, or (`granted` set) claimed from GrantedJobs.
    /// nullptr: the worker is asked to stop.
    JobBase* next_job(bool& granted) noexcept {
        for (;;) {
            // acquire: pairs with try_give()'s release, making the job's contents visible.
            std::uint32_t state = state_.load(std::memory_order_acquire);
            if (state == has_job) return take_handed_job();
            if (state == stopping) return nullptr;
            if (state == empty) {
                bool stop = false;
                if (JobBase* job = look_for_granted_job(stop)) {
                    granted = true;
                    return job;
                }
                if (stop) return nullptr;
                // acq_rel: announce sleep; if it fails, `state` holds the new job or stop.
                if (!state_.compare_exchange_strong(state, sleeping, std::memory_order_acq_rel,
                                                    std::memory_order_acquire)) {
                    continue;
                }
            }
            futex_wait(&state_, sleeping, nullptr);  // returns at once unless still sleeping
        }
    }

    JobBase* take_handed_job() noexcept {
        JobBase* job = job_;
        std::uint32_t expected = has_job;
        // seq_cst: mark the mailbox empty (request_stop never replaces has_job); seq_cst for
        // the store-buffer pattern with request_stop (see there).
        state_.compare_exchange_strong(expected, empty, std::memory_order_seq_cst,
                                       std::memory_order_seq_cst);
        if (id_ != 0) shared_->granted.begin_direct(id_);  // if it is `last`: busy meanwhile
        return job;
    }

    /// As GrantedJobs' `last`: spins (bounded) taking granted jobs, then stops looking there.
    /// Returns a claimed job, or nullptr when it is time to sleep, when the mailbox changed
    /// (a job or a stop request), or (`stop` set) when asked to stop while trying to claim.
    JobBase* look_for_granted_job(bool& stop) noexcept {
        if (id_ == 0) return nullptr;
        GrantedJobs& granted = shared_->granted;
        JobBase* found = nullptr;
        // Spinning on the loop's own CPU would only delay the loop that is to give us a job.
        if (current_cpu() != shared_->loop->loop_cpu()) {
            spin_.spin([&] {
                // acquire: as in next_job; a handed job (or a stop) ends the spin.
                if (state_.load(std::memory_order_acquire) != empty) return true;
                // acquire: a hint; claim() re-checks with its compare-and-swap.
                if (!granted.load(std::memory_order_acquire).is_free(id_)) return true;
                // acquire: a hint as well; claim() reads tail again.
                if (granted.has_waiting(std::memory_order_acquire)) {
                    found = claim_granted_job(stop);
                    if (found != nullptr || stop) return true;
                }
                return false;
            });
            if (found != nullptr || stop) return found;
        }
        // Done spinning: stop looking, then look once more. A job the loop queued while it
        // still saw us looking is ours to take; one queued after this park() is taken back
        // by the loop itself (GrantedJobs::push explains the pattern).
        while (granted.park(id_) && granted.has_waiting(std::memory_order_seq_cst)) {
            if (!granted.unpark(id_)) break;  // someone else finished a job: theirs now
            found = claim_granted_job(stop);
            if (found != nullptr || stop) return found;
            // acquire: as in next_job. A handed job (or a stop) is next_job's to take.
            if (state_.load(std::memory_order_acquire) != empty) return nullptr;
        }
        return nullptr;
    }

    JobBase* claim_granted_job(bool& stop) noexcept {
        std::uint32_t expected = empty;
        // seq_cst: entering `taking` is this side of request_stop's store-buffer pattern, and
        // the compare-and-swap excludes a concurrent give() (which then fails). If it fails,
        // a job was handed to us or we are asked to stop: next_job sees which.
        if (!state_.compare_exchange_strong(expected, taking_job, std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
            return nullptr;
        }
        if (JobBase* job = shared_->granted.claim(id_)) {
            // release: the loop learns who runs the job from this (acquire) and only then
            // reuses the job's slot in GrantedJobs, which claim() just read.
            job->runner_.store(this, std::memory_order_release);
            return job;
        }
        // seq_cst: leaving `taking`, then the flag: request_stop may have found us taking and
        // left the mailbox alone.
        state_.store(empty, std::memory_order_seq_cst);
        stop = stop_requested_.load(std::memory_order_seq_cst);
        return nullptr;
    }

    /// The loop runs with 1 ns of timer slack, which a thread it starts would inherit: a
    /// worker sleeps with the slack the loop's thread had before the loop lowered it.
    static void restore_timer_slack(int slack) noexcept {
        if (slack > 0) ::prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(slack), 0, 0, 0);
    }

    static void set_thread_name(const std::string& thread_name) noexcept {
        std::string name = thread_name.substr(0, 15);  // the kernel's limit
        ::pthread_setname_np(::pthread_self(), name.c_str());
    }

    /// Runs on_thread_start; its exception, if any, makes this start a failed one.
    static std::exception_ptr run_start_hook(const std::function<void()>& hook) noexcept {
        if (!hook) return nullptr;
        try {
            hook();
        } catch (...) {
            return std::current_exception();
        }
        return nullptr;
    }

    static void run_hook(const std::function<void()>& hook) noexcept {
        if (!hook) return;
        try {
            hook();
        } catch (...) {
            // A stop hook that throws must not take the worker (or the process) down with it.
        }
    }

    std::atomic<std::uint32_t> state_{empty};
    std::atomic<bool> stop_requested_{false};
    std::atomic<int> ownership_{owned};
    const std::uint16_t id_;
    JobBase* job_ = nullptr;      // written by the loop before the release in try_give()
    bool start_failed_ = false;   // written by the worker before it posts the failed job
    ExitedNode exited_;
    WorkerPool* pool_;            // the pool that started it (loop side)
    SpinPolicy spin_;             // worker thread only
    std::shared_ptr<PoolShared> shared_;
    std::thread thread_;
};

}  // namespace anyio::detail
