// anyio-cpp: task names and introspection (anyio's get_current_task / get_running_tasks), and
// the blocked-loop detector's settings.
//
//     tg.start_soon(anyio::named("fetch user"), fetch_user, id);
//     anyio::TaskInfo me = anyio::get_current_task();      // {id, name, parent_id}
//     for (const anyio::TaskInfo& task : anyio::get_running_tasks()) log(task.name);
//
// Every task has a name: the one given with named(), else the name of the coroutine function
// it runs where the compiler gives it ("fetch_user"; GCC and Clang do), else "task-<id>" (a
// lambda, for instance). A default name costs nothing (a pointer to a string literal); a given
// one is copied into the task's own block (no allocation of its own).
//
// The detector (asyncio's debug mode) is an option of the loop, EventLoop::Options (in
// event_loop.hpp, with TaskInfo and SlowCallbackInfo):
//
//     anyio::EventLoop::Options options;
//     options.slow_callback_duration = std::chrono::milliseconds(100);   // or ANYIO_DEBUG=1
//     options.on_slow_callback = [](const anyio::SlowCallbackInfo& info) { log(info.message()); };
//
// A task step or callback that keeps the loop 100 ms or longer is then reported when it ends:
//     anyio: task 'handler' (id 12) blocked the event loop for 0.250 s; move blocking calls
//     into to_thread::run_sync
// and one still running after 300 ms is reported by a watchdog thread while it runs.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "detail/task_state.hpp"
#include "event_loop.hpp"

namespace anyio {

/// The name to start a task with: `tg.start_soon(anyio::named("fetch user"), fn, args...)`.
/// Holds a view of the text, which start_soon copies: use it within the start_soon call.
/// Trivially destructible (safe in any expression). An empty name means "no name given".
struct TaskName {
    std::string_view value;
};

/// `name` as a TaskName for TaskGroup::start_soon.
[[nodiscard]] constexpr TaskName named(std::string_view name) noexcept { return TaskName{name}; }

namespace detail {
/// A TaskInfo snapshot of `task` (allocates its name). Loop thread.
inline TaskInfo task_info(const TaskState& task) {
    TaskInfo info;
    info.id = task.id_;
    // relaxed: see TaskState::name_ (and this is the loop thread, which writes it).
    info.name = task_display_name(task.name_.load(std::memory_order_relaxed), task.id_);
    if (task.parent_id_ != 0) info.parent_id = task.parent_id_;
    return info;
}
}  // namespace detail

/// The task running this code (anyio.get_current_task). Loop thread: throws NoEventLoopError
/// where no loop runs (a worker thread inside run_sync included) and std::logic_error outside
/// a task (a plain callback). Allocates the name.
inline TaskInfo get_current_task() {
    EventLoop& loop = detail::running_loop("get_current_task");
    detail::TaskState* task = loop.current_task();
    if (task == nullptr) {
        throw std::logic_error(
            "anyio::get_current_task must be called from a task run by the loop, not from a "
            "plain callback (call_soon, a timer, a from_thread::run_sync call)");
    }
    return detail::task_info(*task);
}

/// Every task of the running loop that has not ended, oldest first (anyio.get_running_tasks):
/// the main task, task group children, from_thread and portal tasks. Loop thread; throws
/// NoEventLoopError where no loop runs. Allocates the vector and the names.
inline std::vector<TaskInfo> get_running_tasks() {
    EventLoop& loop = detail::running_loop("get_running_tasks");
    std::vector<TaskInfo> tasks;
    loop.for_each_task([&](const detail::TaskState& task) { tasks.push_back(detail::task_info(task)); });
    return tasks;
}

}  // namespace anyio
