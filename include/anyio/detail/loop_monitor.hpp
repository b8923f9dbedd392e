// The blocked-loop detector (EventLoop::Options::slow_callback_duration, asyncio's debug mode):
// the loop times every step it runs (one resumption of a task up to its next suspension, or
// one callback: call_soon, a timer, a completion or call from another thread) and reports the
// steps that took the threshold or longer, once they have ended. A watchdog thread reports a
// step that is still running after 3 times the threshold, while the loop is still stuck in it
// (once per step), so a hung server can be diagnosed before the call ends.
//
// With the detector off the loop holds no monitor: no thread, and no clock read per step.
// With it on, a step costs two clock reads and a few plain stores; a task's end costs one
// uncontended mutex lock more (below).
//
// What the watchdog thread reads, and why it is safe:
// - serial_ (odd while a step runs) and the step's start time: atomics, published by the
//   release store of serial_ at the step's start.
// - the running task's id and name, through shared_task_. That task may end, and its block be
//   freed, inside the very step the watchdog is looking at. So the watchdog reads a task only
//   while it holds mutex_, and the loop takes mutex_ just before it frees any task block
//   (TaskEndWatcher, called by finish_root): the block cannot go while the watchdog reads it.
//   If the ending task is the step's task, its id and name are first copied into the monitor,
//   for the reports that still have to name it.
// Everything else is the loop thread's.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include <pthread.h>

#include "signal_mask.hpp"
#include "task_state.hpp"

namespace anyio::detail {

/// One slow step, as the monitor reports it (the loop turns it into a SlowCallbackInfo).
struct SlowStep {
    bool has_task = false;            // false: a plain callback
    std::uint64_t task_id = 0;
    std::uint64_t parent_id = 0;      // 0: none
    const char* task_name = nullptr;  // valid during the report; nullptr: none known
    std::chrono::steady_clock::duration duration{};
    bool still_running = false;       // from the watchdog, while the step runs
};

class LoopMonitor final : TaskEndWatcher {
public:
    using clock = std::chrono::steady_clock;
    /// Called on the loop thread (a step that ended) or on the watchdog thread (one still
    /// running); must not throw.
    using Report = void (*)(void* context, const SlowStep& step) noexcept;

    LoopMonitor(clock::duration threshold, Report report, void* context) noexcept
        : TaskEndWatcher{&on_task_ending},
          threshold_(std::max(threshold, clock::duration::zero())),
          report_(report),
          context_(context) {}
    LoopMonitor(const LoopMonitor&) = delete;
    LoopMonitor& operator=(const LoopMonitor&) = delete;
    ~LoopMonitor() { stop(); }

    /// Starts the watchdog thread (with every asynchronous signal blocked, like the library's
    /// other threads). Throws std::system_error if it cannot be started.
    void start() {
        BlockAsyncSignals blocked;
        watchdog_ = std::thread([this] { watch(); });
    }

    /// Stops and joins the watchdog (it may be inside a report: that one finishes first).
    void stop() noexcept {
        if (!watchdog_.joinable()) return;
        {
            std::lock_guard<std::mutex> lock(wake_mutex_);
            stopping_ = true;
        }
        wake_.notify_one();
        watchdog_.join();
    }

    /// What finish_root tells (see the top of this file).
    [[nodiscard]] TaskEndWatcher* watcher() noexcept { return this; }

    /// The loop is about to run a step: `task`'s, or a callback (nullptr). Loop thread.
    void begin_step(TaskState* task) noexcept {
        const clock::time_point now = clock::now();
        step_task_ = task;
        step_start_ = now;
        task_ended_ = false;
        // release: a watchdog that loads this task (acquire) also sees its id and parent,
        // written at spawn, even if it pairs it with the serial of an earlier step.
        shared_task_.store(task, std::memory_order_release);
        // relaxed: published by the release store of serial_ just below.
        shared_start_.store(now.time_since_epoch().count(), std::memory_order_relaxed);
        // release: the watchdog's acquire load of an odd serial sees this step's start and task.
        serial_.store(++serial_value_, std::memory_order_release);
    }

    /// The step has ended: reports it if it was slow. Loop thread.
    void end_step() noexcept {
        const clock::time_point now = clock::now();
        // release: pairs with the watchdog's acquire load; an even serial means "no step".
        serial_.store(++serial_value_, std::memory_order_release);
        const clock::duration elapsed = now - step_start_;
        if (elapsed < threshold_) return;
        SlowStep step;
        step.duration = elapsed;
        if (step_task_ != nullptr) {
            step.has_task = true;
            if (task_ended_) {  // copied by on_task_ending on this thread
                step.task_id = ended_id_;
                step.parent_id = ended_parent_id_;
                step.task_name = ended_name_[0] != '\0' ? ended_name_ : nullptr;
            } else {
                step.task_id = step_task_->id_;
                step.parent_id = step_task_->parent_id_;
                // relaxed: see TaskState::name_.
                step.task_name = step_task_->name_.load(std::memory_order_relaxed);
            }
        }
        report_(context_, step);
    }

private:
    static void on_task_ending(TaskEndWatcher* self, TaskState& task) noexcept {
        auto* monitor = static_cast<LoopMonitor*>(self);
        // Waits for a watchdog that may be reading this very task (or any other).
        std::lock_guard<std::mutex> lock(monitor->mutex_);
        if (&task != monitor->step_task_) return;
        monitor->task_ended_ = true;
        monitor->ended_serial_ = monitor->serial_value_;
        monitor->ended_id_ = task.id_;
        monitor->ended_parent_id_ = task.parent_id_;
        const char* name = task.name_.load(std::memory_order_relaxed);  // relaxed: see TaskState
        const std::size_t length = name != nullptr ? std::min(std::strlen(name), sizeof ended_name_ - 1) : 0;
        std::memcpy(monitor->ended_name_, name != nullptr ? name : "", length);
        monitor->ended_name_[length] = '\0';
        // relaxed: read by the watchdog only under mutex_, which we hold.
        monitor->shared_task_.store(nullptr, std::memory_order_relaxed);
    }

    /// The watchdog thread: sleeps until the running step (if any) reaches 3x the threshold,
    /// or for one threshold when no step runs, and reports a step that got there.
    void watch() {
        ::pthread_setname_np(::pthread_self(), "anyio watchdog");
        const clock::duration limit = 3 * threshold_;
        // Looking again at least every millisecond, however small the threshold.
        const clock::duration idle_poll = std::max<clock::duration>(threshold_, std::chrono::milliseconds(1));
        std::uint64_t reported = 0;  // the last step reported (serials are odd, never 0)
        std::unique_lock<std::mutex> lock(wake_mutex_);
        while (!stopping_) {
            clock::time_point wake_at = clock::now() + idle_poll;
            // acquire: pairs with begin_step's release (the step's start time and task).
            const std::uint64_t serial = serial_.load(std::memory_order_acquire);
            if ((serial & 1) != 0 && serial != reported) {
                // relaxed: published by the acquire above (a later step's start can only be
                // later, which never makes a step look longer than it is).
                const clock::time_point start{
                    clock::duration(shared_start_.load(std::memory_order_relaxed))};
                const clock::time_point now = clock::now();
                if (now - start >= limit) {
                    lock.unlock();  // stop() must not wait for a report to get the lock
                    if (report_still_running(serial, now - start)) reported = serial;
                    lock.lock();
                    continue;
                }
                wake_at = std::max(start + limit, now + std::chrono::microseconds(100));
            }
            wake_.wait_until(lock, wake_at, [this] { return stopping_; });
        }
    }

    /// Reports step `serial` as still running, if it still is. Watchdog thread.
    bool report_still_running(std::uint64_t serial, clock::duration so_far) {
        std::string name;
        SlowStep step;
        step.duration = so_far;
        step.still_running = true;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            // acquire: as in watch(); a step that ended meanwhile is not reported.
            if (serial_.load(std::memory_order_acquire) != serial) return false;
            if (ended_serial_ == serial) {
                step.has_task = true;
                step.task_id = ended_id_;
                step.parent_id = ended_parent_id_;
                name = ended_name_;
            // acquire: pairs with begin_step's release (the task's id and parent). Under
            // mutex_ the task cannot be freed (see the top of this file).
            } else if (TaskState* task = shared_task_.load(std::memory_order_acquire)) {
                step.has_task = true;
                step.task_id = task->id_;
                step.parent_id = task->parent_id_;
                if (const char* task_name = task->name_.load(std::memory_order_relaxed)) {
                    name = task_name;  // relaxed: see TaskState
                }
            }
            // acquire: the step may have ended while we read; then the task read may be the
            // next step's: report nothing rather than a wrong name.
            if (serial_.load(std::memory_order_acquire) != serial) return false;
        }
        if (!name.empty()) step.task_name = name.c_str();
        report_(context_, step);
        return true;
    }

    const clock::duration threshold_;
    const Report report_;
    void* const context_;

    // Shared with the watchdog (see the top of this file).
    std::atomic<std::uint64_t> serial_{0};
    std::atomic<clock::rep> shared_start_{0};
    std::atomic<TaskState*> shared_task_{nullptr};
    std::mutex mutex_;  // held by the watchdog while it reads a task; taken before a task is freed
    // Written under mutex_ by the loop thread, read under it by the watchdog (and by the loop).
    std::uint64_t ended_serial_ = 0;
    std::uint64_t ended_id_ = 0;
    std::uint64_t ended_parent_id_ = 0;
    char ended_name_[128] = {};

    // Loop thread only.
    std::uint64_t serial_value_ = 0;
    TaskState* step_task_ = nullptr;
    clock::time_point step_start_{};
    bool task_ended_ = false;

    // The watchdog's sleep and stop.
    std::mutex wake_mutex_;
    std::condition_variable wake_;
    bool stopping_ = false;  // under wake_mutex_
    std::thread watchdog_;
};

}  // namespace anyio::detail
