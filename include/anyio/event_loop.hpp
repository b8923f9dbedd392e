// anyio-cpp: EventLoop, run(), LoopToken, lowlevel::current_token / current_task: the single-
// threaded loop every other header runs on. It holds the ready queue, the timers, the lock-free
// inbox for other threads (detail/remote_inbox.hpp), the poller behind io.hpp and the sockets
// (detail/poller.hpp), the loop services (the worker pool of to_thread.hpp), the blocked-loop
// detector (debug.hpp) and the shutdown sequence.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/prctl.h>

#include "detail/context_data.hpp"
#include "detail/intrusive_list.hpp"
#include "detail/loop_monitor.hpp"
#include "detail/loop_thread.hpp"
#include "detail/poller.hpp"
#include "detail/remote_inbox.hpp"
#include "detail/result.hpp"
#include "detail/root_task.hpp"
#include "detail/runnable.hpp"
#include "detail/spin.hpp"
#include "detail/task_state.hpp"
#include "detail/timer_heap.hpp"
#include "errors.hpp"
#include "task.hpp"

namespace anyio {

class EventLoop;

namespace detail {

/// Something that hangs on a loop for the loop's lifetime (anyio's RunVar): the worker pool
/// and the default limiter. Leaving run() calls the hooks in this order (EventLoop::shutdown):
/// once the main task has finished and the loop runs no user code any more, `shutdown` (stop
/// starting work, ask what still runs to stop; must not wait); then, while the tasks still
/// alive are destroyed newest first, `holds` (a task it holds is not destroyed until it lets
/// go: the loop processes library posts meanwhile); then `finish_shutdown` (wait for threads
/// with EventLoop::drain_posts, or give up on them). The loop still processes completions
/// until the last one has returned.
class LoopService {
public:
    virtual ~LoopService() = default;
    virtual void shutdown(EventLoop& /*loop*/) {}
    /// True while work of this service still writes into a frame of `task` (a worker running
    /// a shielded call of the task): the frame must not be destroyed yet.
    virtual bool holds(const TaskState& /*task*/) noexcept { return false; }
    /// When `holds` turns false at the latest (the service gives up then): the loop waits for
    /// library posts until then. Empty: no such deadline.
    virtual std::optional<std::chrono::steady_clock::time_point> holds_until() const noexcept {
        return std::nullopt;
    }
    virtual void finish_shutdown(EventLoop& /*loop*/) {}
};

template <class Service>
inline const char service_key = 0;

/// The default of LoopOptions::slow_callback_duration: 100 ms when the environment has
/// ANYIO_DEBUG set to something other than "" or "0" (as PYTHONASYNCIODEBUG), else off.
inline std::optional<std::chrono::steady_clock::duration> debug_slow_callback_duration() {
    const char* debug = std::getenv("ANYIO_DEBUG");
    if (debug == nullptr || *debug == '\0' || std::strcmp(debug, "0") == 0) return std::nullopt;
    return std::chrono::milliseconds(100);
}

/// `fn` bound to a copy of the context of the code calling this: it runs in that copy (as
/// asyncio runs a call_soon callback in the context current at the call).
template <class F>
auto in_current_context(F&& fn) {
    return [context = ContextRef::share(current_context()),
            fn = std::decay_t<F>(std::forward<F>(fn))]() mutable {
        ContextScope scope(std::move(context));
        fn();
    };
}

/// How a task is called in TaskInfo and in messages: its name, or "task-<id>" when it has
/// none (a lambda's "operator()" counts as none).
inline std::string task_display_name(const char* name, std::uint64_t id) {
    if (name == nullptr || *name == '\0' || std::strcmp(name, "operator()") == 0) {
        return "task-" + std::to_string(id);
    }
    return name;
}

/// How EventLoop::spawn names a new task and whose child it is.
struct SpawnInfo {
    std::string_view name{};             // a given name, copied into the task's block
    const TaskState* parent = nullptr;   // the task that starts it; nullptr: none
};

}  // namespace detail

/// What anyio::get_current_task() and get_running_tasks() (debug.hpp) report about a task
/// (anyio's TaskInfo). A snapshot: it owns its strings and stays valid after the task ends.
struct TaskInfo {
    /// Unique among the tasks of its loop, from 1 in the order they were started.
    std::uint64_t id = 0;
    /// The name given with anyio::named(), else the coroutine function's name where the
    /// compiler gives it ("fetch_user"), else "task-<id>".
    std::string name;
    /// The task that started it (a task group's host task, the task whose worker called
    /// from_thread::run); empty for a loop's main task and for tasks started from other threads.
    std::optional<std::uint64_t> parent_id;

    friend bool operator==(const TaskInfo& a, const TaskInfo& b) noexcept { return a.id == b.id; }
};

/// One report of the blocked-loop detector (LoopOptions::slow_callback_duration).
struct SlowCallbackInfo {
    /// The task whose step blocked the loop; empty for a plain callback (call_soon, a timer,
    /// a from_thread::run_sync call running on the loop).
    std::optional<TaskInfo> task;
    /// How long the step kept the loop; while still_running, how long so far.
    std::chrono::steady_clock::duration duration{};
    /// True for the watchdog's report of a step that is still running (3x the threshold).
    bool still_running = false;

    /// The line the default handler prints (without the newline), e.g. "anyio: task 'handler'
    /// (id 12) blocked the event loop for 0.250 s; move blocking calls into
    /// to_thread::run_sync". Allocates.
    [[nodiscard]] std::string message() const {
        std::string what = task ? "task '" + task->name + "' (id " + std::to_string(task->id) + ")"
                                : std::string("a callback");
        char seconds[48];
        std::snprintf(seconds, sizeof seconds, "%.3f s",
                      std::chrono::duration<double>(duration).count());
        return "anyio: " + what +
               (still_running ? " has been blocking the event loop for " : " blocked the event loop for ") +
               seconds + (still_running ? " and is still running" : "") +
               "; move blocking calls into to_thread::run_sync";
    }
};

/// Settings of one event loop (an aggregate: use designated initializers, in this order).
struct LoopOptions {
    /// Worker threads idle for this long or longer are stopped (oldest first), at the next
    /// offload and by the loop on its own when there is no traffic. A duration too long for
    /// the clock (e.g. duration::max()) means never.
    std::chrono::steady_clock::duration max_idle_time = std::chrono::seconds(10);
    /// Total tokens of the loop's default thread limiter.
    std::int64_t default_thread_tokens = 40;
    /// Name of the worker threads, also given to the OS (cut to 15 bytes).
    std::string thread_name = "anyio worker";
    /// on_thread_start runs on each new worker thread before its first job; on_thread_stop
    /// runs before a thread that started exits. An exception from on_thread_start makes that
    /// start a failed start: the run_sync call the thread was started for gets the exception,
    /// its token comes back, and the thread exits without running on_thread_stop. Exceptions
    /// from on_thread_stop are ignored. The loop never waits for a hook: a retiring worker runs
    /// on_thread_stop on its own thread and is joined once it reports that it has exited
    /// (leaving run() still waits until every worker has). Keep hooks short; they must not
    /// call into the loop.
    std::function<void()> on_thread_start{};
    std::function<void()> on_thread_stop{};
    /// How long leaving run() waits for busy workers before detaching them (their late
    /// results are then dropped safely). Empty: wait for ever. A leftover task's frames are
    /// kept while its shielded call runs, but only until the timeout: a fn that may outlive
    /// it must own what it uses (captures by value, shared_ptr), not refer into a frame.
    std::optional<std::chrono::steady_clock::duration> shutdown_timeout{};
    /// Called on the loop thread with an exception that escaped a call_soon / call_at /
    /// call_soon_threadsafe callback (asyncio's exception handler). It never replaces what
    /// run() returns. Empty: one line on stderr. An exception it throws is dropped.
    std::function<void(std::exception_ptr)> on_callback_error{};
    /// The blocked-loop detector (asyncio's slow_callback_duration): a task step or callback
    /// that keeps the loop this long or longer is reported to on_slow_callback once it ends,
    /// and one still running after 3 times this long is reported while it runs, by a watchdog
    /// thread (once per step). Empty: off, with no thread and no clock read per step. Default:
    /// off, or 100 ms when the environment has ANYIO_DEBUG=1 (read when the Options object is
    /// made). On, each step costs two clock reads.
    std::optional<std::chrono::steady_clock::duration> slow_callback_duration =
        detail::debug_slow_callback_duration();
    /// Called with each report of the detector: on the loop thread for a step that has ended,
    /// on the watchdog thread for one still running (SlowCallbackInfo::still_running), so it
    /// must be thread-safe and must not call into the loop. Empty: prints
    /// SlowCallbackInfo::message() as one line on stderr. An exception it throws is dropped.
    std::function<void(const SlowCallbackInfo&)> on_slow_callback{};
};

/// A copyable handle to a loop that any thread may hold, even after the loop has finished:
/// it keeps a small shared block alive, never the loop. Every use after the loop finished
/// throws RunFinishedError. Thread-safe.
class LoopToken {
public:
    LoopToken() noexcept = default;

    /// Runs `fn()` on the loop thread soon (any thread; allocates one node), in a copy of the
    /// calling code's context (context variables: context.hpp), as asyncio does.
    template <class F>
    void call_soon_threadsafe(F&& fn) const {
        detail::Runnable* node = detail::make_callback(detail::in_current_context(std::forward<F>(fn)));
        if (!post(node)) {
            node->invoke_(node, false);
            throw RunFinishedError();
        }
    }

    /// True once the loop has finished (or for an empty token): from the moment its main task
    /// has finished, when it stops accepting user work.
    [[nodiscard]] bool finished() const noexcept { return !shared_ || shared_->closed(); }
    [[nodiscard]] explicit operator bool() const noexcept { return shared_ != nullptr; }
    friend bool operator==(const LoopToken&, const LoopToken&) = default;

    /// Low-level: posts an intrusive node of user work; false if the loop has finished (from
    /// the moment its main task has finished: no user code runs on the loop after that).
    bool post(detail::Runnable* node) const noexcept { return shared_ && shared_->post_user(node); }
    [[nodiscard]] detail::LoopShared* shared() const noexcept { return shared_.get(); }
    [[nodiscard]] const std::shared_ptr<detail::LoopShared>& shared_state() const noexcept {
        return shared_;
    }

private:
    friend class EventLoop;
    explicit LoopToken(std::shared_ptr<detail::LoopShared> shared) noexcept
        : shared_(std::move(shared)) {}
    std::shared_ptr<detail::LoopShared> shared_;
};

/// The single-threaded event loop. One thread runs it (inside run()); every coroutine of the
/// loop resumes on that thread. Loop-owned state needs no locks; only call_soon_threadsafe
/// and the token may be used from other threads.
///
/// Thread safety: distinct objects safe; shared objects: only call_soon_threadsafe, token()
/// and time() from other threads. The loop-thread operations (call_soon, call_at, spawn,
/// schedule) throw std::logic_error on any other thread; before run() the thread that created
/// the loop may call_soon and spawn. Allocates its poller and shared block once; scheduling a
/// task or a timer allocates nothing (the public call_soon* wrap a callable in one node, each
/// task is one block besides its frames). An exception escaping a callback goes to
/// Options::on_callback_error and never to run()'s caller.
/// Shutdown (see shutdown() for the sequence): once the main task has finished, no user code
/// runs on the loop any more: no task is resumed, no timer fires, and call_soon_threadsafe
/// and from_thread calls throw RunFinishedError (token().finished() is true from then on).
/// The frames still alive are destroyed newest first, workers are joined (or given up on
/// after shutdown_timeout), and the inbox is closed for good. After that call_soon and
/// call_at throw RunFinishedError.
/// Debugging: every task has an id and a name (debug.hpp); with Options::slow_callback_duration
/// set, run() times each step and keeps a watchdog thread for its duration (detail/
/// loop_monitor.hpp); with it unset (the default) there is no such thread and no timing.
class EventLoop {
public:
    using clock = std::chrono::steady_clock;
    using time_point = clock::time_point;
    using duration = clock::duration;
    using Options = LoopOptions;

    explicit EventLoop(Options options = {})
        : options_(std::move(options)),
          shared_(std::make_shared<detail::LoopShared>()),
          poller_(shared_->event_fd()),
          owner_(std::this_thread::get_id()) {}
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;
    ~EventLoop() {
        if (running_) std::terminate();  // destroyed from inside its own run(): a bug
        if (!finished_) close_without_running();
    }

    /// Runs `main` to completion on this thread, shuts the loop down, and returns its value
    /// or rethrows its exception. A loop runs once.
    template <class T>
    T run(Task<T> main);

    /// The calling thread's running loop, or nullptr.
    static EventLoop* current() noexcept { return detail::current_loop; }

    /// The loop clock (any thread).
    [[nodiscard]] time_point time() const noexcept { return clock::now(); }
    [[nodiscard]] const Options& options() const noexcept { return options_; }
    [[nodiscard]] LoopToken token() const noexcept { return LoopToken{shared_}; }
    [[nodiscard]] bool is_running() const noexcept { return running_; }
    [[nodiscard]] bool is_finished() const noexcept { return finished_; }

    /// Runs `fn()` on the loop soon, after what is already scheduled. Loop thread only (or,
    /// before the loop runs, the thread that created it: std::logic_error otherwise); throws
    /// RunFinishedError once run() has finished. Allocates one node. An exception escaping
    /// `fn` goes to Options::on_callback_error. `fn` runs in a copy of the calling code's
    /// context (context variables, context.hpp), as in asyncio; so do call_soon_threadsafe's
    /// and call_at's callbacks.
    template <class F>
    void call_soon(F&& fn) {
        require_loop_thread("call_soon");
        ready_.push(detail::make_callback(detail::in_current_context(std::forward<F>(fn))));
    }

    /// Runs `fn()` on the loop thread soon; any thread. Lock-free: one CAS, plus a wake-up
    /// only when the loop is parked. Throws RunFinishedError once the loop has finished (from
    /// the moment its main task has finished); one that raced with that end is freed unrun.
    template <class F>
    void call_soon_threadsafe(F&& fn) {
        token().call_soon_threadsafe(std::forward<F>(fn));
    }

    /// Runs `fn()` on the loop at `when` / after `delay`. Threads and errors as call_soon.
    template <class F>
    void call_at(time_point when, F&& fn) {
        require_loop_thread("call_at");
        using Fn = decltype(detail::in_current_context(std::forward<F>(fn)));
        struct Node final : detail::TimerNode {
            explicit Node(Fn&& f) : TimerNode(&fire), fn(std::move(f)) {}
            static void fire(TimerNode* self, bool run) {
                std::unique_ptr<Node> node(static_cast<Node*>(self));
                if (run) node->fn();
            }
            Fn fn;
        };
        auto node = std::make_unique<Node>(detail::in_current_context(std::forward<F>(fn)));
        add_timer(node.get(), when);
        node.release();
    }
    template <class Rep, class Period, class F>
    void call_later(std::chrono::duration<Rep, Period> delay, F&& fn) {
        call_at(detail::deadline_after(time(), delay), std::forward<F>(fn));
    }

    // ---- Low-level interface for the library's primitives (not needed by applications) ----

    /// Queues `node` to run on the next loop turn. Loop thread only: from any other thread it
    /// throws std::logic_error (a loop object used from the wrong thread would otherwise push
    /// onto the ready queue while the loop sleeps: a lost wake-up and a data race). The check
    /// is one thread-local load.
    void schedule(detail::Runnable* node) {
        if (detail::current_loop != this) [[unlikely]] {
            detail::throw_wrong_thread("EventLoop::schedule");
        }
        ready_.push(node);
    }
    /// Schedules `task` to resume at `where` (it is no longer at a cancellable wait). Loop
    /// thread only, as schedule().
    void schedule_task(detail::TaskState& task, std::coroutine_handle<> where) {
        if (detail::current_loop != this) [[unlikely]] {
            detail::throw_wrong_thread("EventLoop::schedule_task");
        }
        task.wait_ = nullptr;
        task.resume_point_ = where;
        ready_.push(&task);
    }
    void add_timer(detail::TimerNode* node, time_point when) { timers_.push(node, when); }
    void remove_timer(detail::TimerNode* node) noexcept { timers_.remove(node); }
    [[nodiscard]] std::size_t timer_count() const noexcept { return timers_.size(); }

    /// The task being resumed right now (nullptr inside a plain callback). Loop thread.
    [[nodiscard]] detail::TaskState* current_task() const noexcept { return detail::running_task; }

    /// Starts `body` as a new task (scheduled, not yet run). `on_done(owner, task)` is called
    /// on the loop when it ends (task.outcome_ and task.error_ say how), where nothing may
    /// throw. The TaskState lives in the task's root block (one allocation, with the given
    /// name if any: bad_alloc leaves nothing started). The task is named `info.name`, else
    /// after `body.function_name()`; it runs in a copy of the calling code's context (the
    /// running task's, or this thread's). Loop thread (or its owner before run()).
    detail::TaskState& spawn(Task<void> body, detail::TaskState::OnDone on_done = nullptr,
                             void* owner = nullptr, const detail::SpawnInfo& info = {}) {
        require_loop_thread("spawn");
        const char* function = body.function_name();
        auto* task = detail::RootTask::create(body.release(), info.name);  // nothing else throws
        task->loop_ = this;
        task->on_done_ = on_done;
        task->owner_ = owner;
        task->id_ = ++last_task_id_;
        task->parent_id_ = info.parent != nullptr ? info.parent->id_ : 0;
        // relaxed: see TaskState::name_ (the task is not running yet).
        if (info.name.empty()) task->name_.store(function, std::memory_order_relaxed);
        task->context_ = detail::current_context();
        retain(task->context_);
        live_tasks_.push_back(*task);
        ready_.push(task);
        return *task;
    }

    /// Calls `fn(task)` for every task of this loop that has not ended, oldest first. `fn`
    /// must not start or end tasks. Loop thread.
    template <class F>
    void for_each_task(F&& fn) {
        live_tasks_.for_each([&](detail::TaskState& task) { fn(task); });
    }

    /// The loop's instance of `Service` (created on first use, destroyed with the loop).
    template <class Service>
    Service& service() {
        const void* key = &detail::service_key<Service>;
        for (auto& entry : services_) {
            if (entry.key == key) return static_cast<Service&>(*entry.service);
        }
        auto created = std::make_unique<Service>(*this);
        Service& result = *created;
        services_.push_back({key, std::move(created)});
        return result;
    }

    /// Runs loop iterations until `done()` holds (loop thread; not once the main task has
    /// finished: shutdown waits with drain_posts instead).
    template <class Predicate>
    void run_until(Predicate&& done) {
        while (!done()) run_once();
    }

    /// Shutdown only (loop thread, once the main task has finished): runs the library posts
    /// that have arrived (job completions, exited workers), waiting for one until `until` (for
    /// ever if empty) when there is none. User work no longer arrives; what the posts schedule
    /// is dropped unrun, and no timer fires. Returns after one batch, a timeout or a spurious
    /// wake-up: callers loop on their own condition.
    void drain_posts(std::optional<time_point> until) noexcept;

    /// True once the main task has finished (loop thread): from then on the loop runs no user
    /// code (see shutdown()).
    [[nodiscard]] bool draining() const noexcept { return draining_; }

    /// Work handed to another thread whose completion will come back through the inbox: while
    /// any is outstanding, the loop spins briefly before parking (a completion is imminent).
    void remote_work_started() noexcept { ++remote_in_flight_; }
    void remote_work_finished() noexcept { --remote_in_flight_; }

    [[nodiscard]] detail::Poller& poller() noexcept { return poller_; }
    [[nodiscard]] detail::LoopShared& shared() noexcept { return *shared_; }

    /// Throws std::logic_error unless called on the thread running this loop or, before it
    /// runs, on the thread that owns it (that created it); RunFinishedError once run() has
    /// finished. Reads nothing another thread writes without synchronisation: the running
    /// thread is recognised by its own thread-local current_loop, the owner by its id.
    void require_loop_thread(const char* what) const {
        if (detail::current_loop == this) return;
        // relaxed: the id only tells this thread whether it is the owner; it is written by
        // the constructor and by run() on the owner's own thread (a thread racing run()
        // starting on another thread is a misuse either way).
        if (detail::current_loop == nullptr &&
            owner_.load(std::memory_order_relaxed) == std::this_thread::get_id()) {
            if (finished_) {  // written by this same (owner) thread
                throw RunFinishedError(std::string("anyio::EventLoop::") + what +
                                       ": this loop's run() has finished; a loop runs once, "
                                       "create a new one");
            }
            return;
        }
        throw std::logic_error(std::string("anyio::EventLoop::") + what +
                               " must be called on the loop's own thread; from other "
                               "threads use call_soon_threadsafe or a LoopToken");
    }

private:
    friend void detail::run_task(detail::Runnable*, bool);

    struct ServiceEntry {
        const void* key;
        std::unique_ptr<detail::LoopService> service;
    };

    void run_once() {
        if (monitor_ == nullptr) [[likely]] {
            run_turn<false>();
        } else {
            run_turn<true>();
        }
    }
    template <bool Monitored>
    void run_turn();
    template <bool Monitored>
    void fire_due_timers(time_point now);
    void park(time_point now);
    void begin_draining() noexcept;
    void shutdown() noexcept;
    void destroy_tasks_when_released() noexcept;
    void destroy_suspended_task(detail::TaskState& task) noexcept;
    [[nodiscard]] bool held_by_service(const detail::TaskState& task,
                                       std::optional<time_point>& until) noexcept;
    void close_without_running() noexcept;
    void fail_remote_posts() noexcept;
    static void dispose(detail::LoopShared::Chain chain) noexcept;
    void drop_ready_queue() noexcept;
    void destroy_live_tasks() noexcept;
    void free_unfired_timers() noexcept;
    void report_callback_error(std::exception_ptr error) noexcept;
    void run_node(detail::Runnable* node) noexcept {
        try {
            // Once the main task has finished (it may finish in the middle of a batch or of
            // the inbox), what is left of the turn is disposed of unrun: no user code after it.
            node->invoke_(node, !draining_);
        } catch (...) {
            report_callback_error(std::current_exception());
        }
    }
    /// One step: run_node, timed by the blocked-loop detector when it is on.
    template <bool Monitored>
    void run_step(detail::Runnable* node) noexcept {
        if constexpr (Monitored) {
            detail::TaskState* task = node->invoke_ == &detail::run_task
                                          ? static_cast<detail::TaskState*>(node)
                                          : nullptr;
            monitor_->begin_step(task);
            run_node(node);
            monitor_->end_step();
        } else {
            run_node(node);
        }
    }
    void start_monitor();
    void stop_monitor() noexcept;
    static void report_slow_step(void* loop, const detail::SlowStep& step) noexcept;

    Options options_;
    std::shared_ptr<detail::LoopShared> shared_;
    detail::Poller poller_;
    detail::RunQueue ready_;
    detail::TimerHeap timers_;
    detail::IntrusiveList<detail::TaskState, detail::LiveTasksTag> live_tasks_;
    std::vector<ServiceEntry> services_;
    std::int64_t remote_in_flight_ = 0;
    detail::SpinPolicy spin_;
    std::unique_ptr<detail::LoopMonitor> monitor_;  // the blocked-loop detector, while on
    std::uint64_t last_task_id_ = 0;
    std::atomic<std::thread::id> owner_;  // the thread that may use the loop before it runs
    bool running_ = false;                // loop thread only (as finished_ and draining_)
    bool finished_ = false;
    bool draining_ = false;               // the main task has finished: no user code runs
};

namespace detail {

inline void run_task(Runnable* self, bool run) {
    if (!run) return;  // the loop is shutting down; the frame is destroyed separately
    auto* task = static_cast<TaskState*>(self);
    running_task = task;  // the loop runs one task at a time: nothing runs around this
    resume_chain(task->resume_point_);  // may end the task and free `task`
    running_task = nullptr;
}

inline std::timespec to_timespec(std::chrono::steady_clock::duration d) noexcept {
    if (d < d.zero()) d = d.zero();
    auto seconds = std::chrono::duration_cast<std::chrono::seconds>(d);
    std::timespec ts{};
    ts.tv_sec = static_cast<std::time_t>(seconds.count());
    ts.tv_nsec = static_cast<long>(std::chrono::nanoseconds(d - seconds).count());
    return ts;
}

/// The error thrown by loop primitives used on a thread with no running loop.
inline EventLoop& running_loop(const char* what) {
    EventLoop* loop = EventLoop::current();
    if (loop == nullptr) {
        throw NoEventLoopError(std::string("anyio::") + what +
                               ": no event loop is running on this thread; call it from a "
                               "coroutine run by anyio::run (other threads: use a LoopToken "
                               "or a BlockingPortal)");
    }
    return *loop;
}

}  // namespace detail

template <class T>
T EventLoop::run(Task<T> main) {
    if (detail::current_loop != nullptr) {
        throw std::logic_error(
            "anyio::run: this thread is already running an event loop; inside it, co_await "
            "the task instead (other threads: use a BlockingPortal or from_thread)");
    }
    if (running_ || finished_) {
        throw std::logic_error("anyio::EventLoop::run: an EventLoop runs once; create a new one");
    }
    struct MainState {
        detail::Result<T> result;
        bool done = false;
    } state;
    // relaxed: see require_loop_thread; this thread becomes the owner (it may differ from the
    // thread that created the loop).
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    detail::current_loop = this;
    running_ = true;
    // Timer wake-ups on time: Linux adds up to 50 us of "timer slack" to every sleep of a
    // normal thread; the loop asks for 1 ns while it runs and restores the setting after.
    const int previous_slack = ::prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    // Whatever leaves this function (spawn failing with bad_alloc included) leaves the loop
    // closed, this thread without a running loop and its timer slack restored, so ~EventLoop
    // never sees a loop that still looks running.
    struct Leave {
        EventLoop* loop;
        int previous_slack;
        ~Leave() {
            loop->stop_monitor();
            if (!loop->finished_) loop->close_without_running();
            if (previous_slack > 0) {
                ::prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(previous_slack), 0, 0, 0);
            }
        }
    } leave{this, previous_slack};
    // The main task is named after `main`'s coroutine, not after the wrapper that delivers
    // its result.
    const char* main_function = main.function_name();
    Task<void> body = detail::deliver_result<T>(std::move(main), &state.result);
    body.set_function_name(main_function);
    spawn(std::move(body),
          [](void* owner, detail::TaskState& task) {
              auto* main_state = static_cast<MainState*>(owner);
              if (task.error_) main_state->result.set_exception(task.error_);
              main_state->done = true;
              task.loop_->begin_draining();  // at once: nothing else of this turn runs
          },
          &state);
    if (options_.slow_callback_duration) start_monitor();
    run_until([&] { return state.done; });
    shutdown();
    return state.result.take();
}

// One loop turn. Monitored: every step is timed by the blocked-loop detector (a separate
// instantiation, so that with the detector off a turn costs what it did without one).
template <bool Monitored>
void EventLoop::run_turn() {
    // Sleep first when there is nothing to do, so the caller's predicate is checked after
    // every batch of work and before any wait.
    if (ready_.empty() && !shared_->has_posts()) park(clock::now());
    // Remote completions first: they return workers and tokens, which the ready tasks want.
    if (auto chain = shared_->take_all(); chain.first != nullptr) {
        for (detail::Runnable* node = chain.first; node != nullptr;) {
            detail::Runnable* next = node->next_;  // read first: running may free the node
            run_step<Monitored>(node);
            node = next;
        }
    }
    // The clock is read only when a timer may be due: a turn that only hands work between
    // tasks (streams, locks) costs no clock read.
    if (!timers_.empty()) {
        fire_due_timers<Monitored>(clock::now());
    } else {
        timers_.shrink_if_sparse();  // a burst of timers that all went away gives memory back
    }
    if (poller_.has_waiters() && !ready_.empty()) {
        std::timespec zero{};
        if (poller_.wait(&zero)) shared_->drain_event_fd();
    }
    // Run what is ready now; what these schedule runs on the next turn, after I/O and timers.
    detail::RunQueue batch = std::exchange(ready_, detail::RunQueue{});
    while (detail::Runnable* node = batch.pop()) run_step<Monitored>(node);
}

template <bool Monitored>
void EventLoop::fire_due_timers(time_point now) {
    // Only the timers due when the pass began: one that re-arms itself in the past (a deadline
    // computed with an overflow, say) fires once per loop turn, and tasks still run between.
    timers_.begin_pass(now);
    // None once the main task has finished (a timer callback may be what finished it).
    while (detail::TimerNode* timer = draining_ ? nullptr : timers_.pass_due()) {
        timers_.remove(timer);
        if constexpr (Monitored) monitor_->begin_step(nullptr);
        try {
            timer->fire_(timer, true);
        } catch (...) {
            report_callback_error(std::current_exception());
        }
        if constexpr (Monitored) monitor_->end_step();
    }
    timers_.shrink_if_sparse();
}

/// Turns the detector on for this run (run() calls it when slow_callback_duration is set):
/// the monitor, the watchdog thread, and the hook a task's end goes through.
inline void EventLoop::start_monitor() {
    auto monitor = std::make_unique<detail::LoopMonitor>(*options_.slow_callback_duration,
                                                         &EventLoop::report_slow_step, this);
    monitor->start();  // std::system_error: run() fails before anything ran
    detail::task_end_watcher = monitor->watcher();
    monitor_ = std::move(monitor);
}

/// Stops the watchdog (before the frames of suspended tasks are destroyed, which it must not
/// see) and turns the detector off.
inline void EventLoop::stop_monitor() noexcept {
    if (monitor_ == nullptr) return;
    monitor_->stop();
    detail::task_end_watcher = nullptr;
    monitor_.reset();
}

/// Turns the monitor's report into a SlowCallbackInfo for Options::on_slow_callback (or the
/// default line on stderr). Loop thread, or the watchdog thread: reads only the options.
inline void EventLoop::report_slow_step(void* loop, const detail::SlowStep& step) noexcept {
    const Options& options = static_cast<EventLoop*>(loop)->options_;
    try {
        SlowCallbackInfo info;
        info.duration = step.duration;
        info.still_running = step.still_running;
        if (step.has_task) {
            info.task = TaskInfo{step.task_id, detail::task_display_name(step.task_name, step.task_id),
                                 step.parent_id != 0 ? std::optional<std::uint64_t>(step.parent_id)
                                                     : std::nullopt};
        }
        if (options.on_slow_callback) {
            options.on_slow_callback(info);
        } else {
            const std::string line = info.message() + "\n";
            std::fputs(line.c_str(), stderr);
        }
    } catch (...) {
        // Out of memory, or the handler threw: a report is not worth more than the loop.
    }
}

inline void EventLoop::park(time_point now) {
    std::optional<time_point> wake_at;
    if (detail::TimerNode* timer = timers_.top()) {
        if (timer->when_ <= now) return;
        wake_at = timer->when_;
    }
    if (remote_in_flight_ > 0) {
        // A worker is about to post a completion: waking a parked loop costs tens of
        // microseconds on a VM, a short bounded spin costs less. Never past the next timer.
        shared_->note_loop_cpu(detail::current_cpu());
        if (spin_.spin([this] { return shared_->has_posts(); },
                       wake_at.value_or(time_point::max()))) {
            return;
        }
        now = clock::now();
        if (wake_at && *wake_at <= now) return;
    }
    std::timespec timeout{};
    std::timespec* timeout_ptr = nullptr;
    if (wake_at) {
        timeout = detail::to_timespec(*wake_at - now);
        timeout_ptr = &timeout;
    }
    if (poller_.has_waiters()) {
        if (!shared_->prepare_to_park(detail::LoopShared::parked_in_poller)) return;
        bool woken = poller_.wait(timeout_ptr);
        shared_->unparked();
        if (woken) shared_->drain_event_fd();
    } else {
        if (!shared_->prepare_to_park(detail::LoopShared::parked_on_futex)) return;
        shared_->park_on_futex(timeout_ptr);
    }
}

inline void EventLoop::report_callback_error(std::exception_ptr error) noexcept {
    try {
        if (options_.on_callback_error) {
            options_.on_callback_error(std::move(error));
            return;
        }
        try {
            std::rethrow_exception(std::move(error));
        } catch (const std::exception& e) {
            std::fprintf(stderr, "anyio: exception in a loop callback (ignored): %s\n", e.what());
        } catch (...) {
            std::fprintf(stderr,
                         "anyio: exception in a loop callback (ignored): not a std::exception\n");
        }
    } catch (...) {
        // The handler itself threw: nothing sensible is left to do with it.
    }
}

/// The main task has finished: from now on no user code runs on the loop. The inbox refuses
/// user work (call_soon_threadsafe and from_thread calls throw RunFinishedError), and what it
/// still held is disposed of unrun (a blocked from_thread caller gets RunFinishedError).
/// Called by the main task's end, at once, so nothing left of that loop turn runs either.
inline void EventLoop::begin_draining() noexcept {
    if (draining_) return;
    draining_ = true;
    dispose(shared_->close_to_user());
}

/// Leaving run(), after the main task has finished (API.md: "Once the main task has finished,
/// no user code runs on the loop any more"; trio's rule):
/// 1. Draining (begin_draining, when main ended): the inbox is closed to user work, its
///    leftovers disposed of; the ready queue is dropped; no task is resumed and no timer
///    fires from here on. Library posts (job completions, exited workers) are still processed
///    (drain_posts), and what they schedule is dropped unrun.
/// 2. Services stop (LoopService::shutdown): the worker pool starts no more calls, asks the
///    running ones to stop (stop_token, check_cancelled) and retires its idle workers.
/// 3. The frames still alive are destroyed, newest task first (a child is newer than the
///    task hosting its group or scope). A task a service still holds (a worker is running a
///    job that lives in one of its frames: a shielded run_sync without shutdown_timeout) is
///    not destroyed until the job's completion has arrived: the loop processes library posts
///    meanwhile. Destroying a frame releases the from_thread callers blocked on its task with
///    RunFinishedError, which lets their workers finish, which releases the older tasks.
///    With shutdown_timeout a task is held only until the timeout (its job lives on the heap,
///    but the fn may use the frames through std::ref arguments): then the worker is given up
///    and the frames go, so a fn that can outlive the timeout must own its data. A held job
///    whose fn waits for something only user code on the loop would give it ends only when
///    it honours the stop request: without shutdown_timeout run() waits for it, as for any
///    busy worker.
/// 4. Services finish (LoopService::finish_shutdown): the pool waits for its busy workers (at
///    most shutdown_timeout, then gives up on the rest) and joins every worker.
/// 5. close_without_running: the inbox is closed for good, services and timers are freed.
inline void EventLoop::shutdown() noexcept {
    begin_draining();
    drop_ready_queue();
    // By index, newest first: a stop callback run by a service's shutdown may create another
    // service (push_back), which must not invalidate the walk; it is not visited.
    for (std::size_t i = services_.size(); i-- > 0;) {
        try {
            services_[i].service->shutdown(*this);
        } catch (...) {
            report_callback_error(std::current_exception());
        }
    }
    stop_monitor();  // no user step runs from here on: nothing left for the watchdog to report
    destroy_tasks_when_released();
    for (std::size_t i = services_.size(); i-- > 0;) {
        try {
            services_[i].service->finish_shutdown(*this);
        } catch (...) {
            report_callback_error(std::current_exception());
        }
    }
    close_without_running();
}

/// Step 3 of shutdown(): destroys the live tasks newest first, waiting for the services to let
/// go of a task they still hold.
inline void EventLoop::destroy_tasks_when_released() noexcept {
    while (detail::TaskState* task = live_tasks_.back()) {
        if (std::optional<time_point> until; held_by_service(*task, until)) {
            drain_posts(until);
            continue;
        }
        live_tasks_.pop_back();
        destroy_suspended_task(*task);
    }
}

/// Destroys one suspended task that is off live_tasks_: its frames, then what their
/// destructors scheduled (this task among them, possibly), and only then its root.
inline void EventLoop::destroy_suspended_task(detail::TaskState& task) noexcept {
    auto& root = static_cast<detail::RootTask&>(task);
    detail::destroy_task_frames(root);
    drop_ready_queue();
    detail::free_destroyed_task(root);
}

inline bool EventLoop::held_by_service(const detail::TaskState& task,
                                       std::optional<time_point>& until) noexcept {
    for (auto& entry : services_) {
        if (entry.service->holds(task)) {
            until = entry.service->holds_until();
            return true;
        }
    }
    return false;
}

inline void EventLoop::drain_posts(std::optional<time_point> until) noexcept {
    auto chain = shared_->take_all();
    if (chain.first == nullptr) {
        // Park on the futex alone, whatever the poller waits for: a post wakes the futex, and
        // nothing else (I/O, timers) is of interest any more.
        std::timespec timeout{};
        const std::timespec* timeout_ptr = nullptr;
        if (until) {
            const time_point now = clock::now();
            if (*until <= now) return;
            timeout = detail::to_timespec(*until - now);
            timeout_ptr = &timeout;
        }
        if (shared_->prepare_to_park(detail::LoopShared::parked_on_futex)) {
            shared_->park_on_futex(timeout_ptr);
        }
        chain = shared_->take_all();
    }
    // Only library work arrives now (the user half of the inbox is closed), and it must run:
    // a completion returns its worker to the pool, which is what shutdown waits for.
    for (detail::Runnable* node = chain.first; node != nullptr;) {
        detail::Runnable* next = node->next_;  // read first: running may free the node
        try {
            node->invoke_(node, true);
        } catch (...) {
            report_callback_error(std::current_exception());
        }
        node = next;
    }
    drop_ready_queue();  // a completion schedules its caller: no task resumes any more
}

/// Closes the loop without running anything more: the last step of run(), and all of
/// ~EventLoop for a loop that never ran.
///
/// Why nothing is touched after it is freed:
/// 1. The inbox is closed for good first, so no other thread can add work from now on (they
///    get RunFinishedError; a worker drops its completion), and what it still holds is
///    disposed of unrun.
/// 2. The ready queue is dropped before any frame goes away, and again after each task's
///    frames are destroyed: a queued node may point into a frame, and a destructor in a frame
///    may wake an older task (an Event set, a limiter token handed on).
/// 3. Frames go newest task first: a child task is always newer than the task hosting its
///    group or scope, so no frame is destroyed while a newer one still points into it.
/// 4. Services (the pool, the default limiter) go after the frames that may be linked into
///    them, and timers nobody owns any more (call_at nodes) go last, unfired.
/// Runs with this loop as the thread's current loop, as a running loop would, so the
/// destructors it triggers may use the loop's thread-checked operations.
inline void EventLoop::close_without_running() noexcept {
    EventLoop* const previous_loop = detail::current_loop;
    detail::current_loop = this;
    fail_remote_posts();
    drop_ready_queue();
    destroy_live_tasks();
    while (!services_.empty()) services_.pop_back();
    free_unfired_timers();
    drop_ready_queue();  // in case disposing of the above queued more
    running_ = false;
    finished_ = true;
    detail::current_loop = previous_loop == this ? nullptr : previous_loop;
}

/// Closes the inbox (later posts throw RunFinishedError) and disposes of what it still holds.
inline void EventLoop::fail_remote_posts() noexcept { dispose(shared_->close()); }

/// Disposes of a chain taken from the inbox unrun (a blocked from_thread caller gets
/// RunFinishedError; a callback is freed).
inline void EventLoop::dispose(detail::LoopShared::Chain chain) noexcept {
    for (detail::Runnable* node = chain.first; node != nullptr;) {
        detail::Runnable* next = node->next_;  // read first: disposing may free the node
        node->invoke_(node, false);
        node = next;
    }
}

/// Disposes of every queued node unrun (tasks are not resumed; callbacks are freed).
inline void EventLoop::drop_ready_queue() noexcept {
    while (detail::Runnable* node = ready_.pop()) node->invoke_(node, false);
}

/// Destroys the frames of every task still alive, newest task first, dropping what each
/// destruction schedules before the next (older) task's frames go.
inline void EventLoop::destroy_live_tasks() noexcept {
    while (detail::TaskState* task = live_tasks_.pop_back()) destroy_suspended_task(*task);
}

/// Frees the timers still queued (call_at nodes own themselves) without firing them.
inline void EventLoop::free_unfired_timers() noexcept {
    while (detail::TimerNode* timer = timers_.top()) {
        timers_.remove(timer);
        timer->fire_(timer, false);
    }
}

/// Runs `main` on a new event loop on this thread and returns its value or rethrows its
/// exception. Throws std::logic_error if this thread already runs a loop.
template <class T>
T run(Task<T> main, const EventLoop::Options& options = {}) {
    if (EventLoop::current() != nullptr) {
        throw std::logic_error(
            "anyio::run: this thread is already running an event loop; inside it, co_await "
            "the task instead (other threads: use a BlockingPortal or from_thread)");
    }
    EventLoop loop(options);
    return loop.run(std::move(main));
}

/// `run(fn, args...)`: runs the task `fn(args...)` returns.
template <class F, class... Args>
    requires returns_task<F, Args...>
auto run(F&& fn, Args&&... args) {
    return run(std::invoke(std::forward<F>(fn), std::forward<Args>(args)...));
}

namespace lowlevel {
/// A token for the loop running on this thread (throws NoEventLoopError if none).
inline LoopToken current_token() { return detail::running_loop("lowlevel::current_token").token(); }

/// A handle to a task of a loop, for writing custom awaitables (trio's
/// lowlevel.current_task / reschedule). In await_suspend, take `current_task()`; when the
/// operation completes, `reschedule()` the task (on the loop thread) or
/// `reschedule_threadsafe()` it (from any thread) instead of resuming the handle yourself:
///
///     void await_suspend(std::coroutine_handle<>) {
///         start_operation([task = anyio::lowlevel::current_task()] {  // any thread
///             task.reschedule_threadsafe();
///         });
///     }
///
/// The task then resumes on the next loop turn through the loop, like any task woken by a
/// loop primitive. A task suspended in a custom awaitable cannot be woken by cancellation (the
/// library cannot abort a foreign operation); a cancellation that arrives meanwhile takes
/// effect at its next cancellation point. Resuming the handle directly (from a call_soon or
/// call_soon_threadsafe callback, on the loop thread) works too.
///
/// Copyable; comparable (equal handles name the same task). Reschedule a task once per
/// suspension, while it is still suspended there; a handle must not be used after its task
/// has ended.
class TaskHandle {
public:
    TaskHandle() noexcept = default;

    /// Resumes the task, which must be suspended in a custom awaitable, on the next loop turn.
    /// Loop thread only (std::logic_error otherwise); std::logic_error if the task is not
    /// suspended in a custom awaitable (not yet, or it was already rescheduled or resumed).
    void reschedule() const {
        if (task_ == nullptr) {
            throw std::logic_error("anyio::lowlevel::TaskHandle::reschedule: the handle is empty; "
                                   "get one with anyio::lowlevel::current_task()");
        }
        if (detail::current_loop != loop_) {
            detail::throw_wrong_thread("lowlevel::TaskHandle::reschedule");
        }
        if (task_->wait_ != &detail::foreign_wait) {
            throw std::logic_error(
                "anyio::lowlevel::TaskHandle::reschedule: the task is not suspended in a custom "
                "awaitable (it was already rescheduled or resumed, or it has not suspended "
                "yet); reschedule a task exactly once per suspension");
        }
        loop_->schedule_task(*task_, task_->resume_point_);
    }

    /// The same from any thread: the task resumes on the loop thread soon (allocates one
    /// node). Throws RunFinishedError once the loop has finished; a misuse that reschedule()
    /// would reject is reported on the loop through Options::on_callback_error.
    void reschedule_threadsafe() const {
        if (task_ == nullptr) {
            throw std::logic_error(
                "anyio::lowlevel::TaskHandle::reschedule_threadsafe: the handle is empty; get "
                "one with anyio::lowlevel::current_task()");
        }
        token_.call_soon_threadsafe([task = task_, loop = loop_] {
            TaskHandle handle;
            handle.task_ = task;
            handle.loop_ = loop;
            handle.reschedule();
        });
    }

    [[nodiscard]] explicit operator bool() const noexcept { return task_ != nullptr; }
    friend bool operator==(const TaskHandle& a, const TaskHandle& b) noexcept {
        return a.task_ == b.task_;
    }

private:
    friend TaskHandle current_task();
    detail::TaskState* task_ = nullptr;
    EventLoop* loop_ = nullptr;
    LoopToken token_;
};

/// The task running on this thread's loop. Throws NoEventLoopError with no running loop and
/// std::logic_error outside a task (in a plain callback).
inline TaskHandle current_task() {
    EventLoop& loop = detail::running_loop("lowlevel::current_task");
    detail::TaskState* task = loop.current_task();
    if (task == nullptr) {
        throw std::logic_error(
            "anyio::lowlevel::current_task must be called from a task run by the loop (inside "
            "a coroutine's await_suspend, for instance), not from a plain callback");
    }
    TaskHandle handle;
    handle.task_ = task;
    handle.loop_ = &loop;
    handle.token_ = loop.token();
    return handle;
}
}  // namespace lowlevel

}  // namespace anyio
