#include <anyio/debug.hpp>

#include "catch.hpp"

#include <anyio/blocking_portal.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/from_thread.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "test_support.hpp"

// Tests of task names, get_current_task / get_running_tasks and the blocked-loop detector
// (API.md, "Task names and the blocked-loop detector").
//
// Timing: a blocking step is a real std::this_thread::sleep_for on the loop (the anti-pattern
// the detector exists for); checks on durations are one-sided (at least the time slept). The
// watchdog test waits for the watchdog's report itself instead of guessing when it comes.

namespace {

using namespace std::chrono_literals;
using anyio::Task;
using anyio::TaskGroup;
using anyio::TaskInfo;
using anyio_test::run_loop;
using anyio_test::settle;

Task<TaskInfo> report_current_task() {
    co_await anyio::checkpoint();
    co_return anyio::get_current_task();
}

Task<> record_current_task(std::vector<TaskInfo>* out) {
    out->push_back(anyio::get_current_task());
    co_return;
}

Task<> record_current_task_with(std::vector<TaskInfo>* out, int) {
    out->push_back(anyio::get_current_task());
    co_return;
}

/// Throws `what` in its first step, before any cancellation point (so a sibling that failed
/// first in the same loop turn cannot cancel it first).
Task<> fail_at_once(std::string what) {
    if (!what.empty()) throw std::runtime_error(what);
    co_return;
}

Task<> fetch_user(std::vector<TaskInfo>* out) { co_await record_current_task(out); }

/// Collects the detector's reports (from the loop thread and the watchdog thread).
struct Reports {
    std::mutex mutex;
    std::vector<anyio::SlowCallbackInfo> all;
    std::atomic<int> still_running{0};

    anyio::EventLoop::Options options(std::chrono::milliseconds threshold) {
        anyio::EventLoop::Options options;
        options.slow_callback_duration = threshold;
        options.on_slow_callback = [this](const anyio::SlowCallbackInfo& info) {
            std::lock_guard<std::mutex> lock(mutex);
            all.push_back(info);
            if (info.still_running) ++still_running;
        };
        return options;
    }
    std::vector<anyio::SlowCallbackInfo> snapshot() {
        std::lock_guard<std::mutex> lock(mutex);
        return all;
    }
    /// The reports of steps that took `at_least` or more, or of the task named `task` ("":
    /// of plain callbacks). On a loaded machine the OS may stop the loop thread in any step
    /// for a while (a true report, but not the test's): checks look only at these.
    std::vector<anyio::SlowCallbackInfo> of_task(const std::string& task) {
        std::vector<anyio::SlowCallbackInfo> out;
        for (const auto& info : snapshot()) {
            if (task.empty() ? !info.task.has_value() : (info.task && info.task->name == task)) {
                out.push_back(info);
            }
        }
        return out;
    }
    std::vector<anyio::SlowCallbackInfo> lasting(std::chrono::steady_clock::duration at_least) {
        std::vector<anyio::SlowCallbackInfo> out;
        for (const auto& info : snapshot()) {
            if (info.duration >= at_least) out.push_back(info);
        }
        return out;
    }
};

Task<> handler() {
    std::this_thread::sleep_for(150ms);  // blocks the loop: what the detector is for
    co_return;
}

Task<> offloading_handler() {
    co_await anyio::to_thread::run_sync([] { std::this_thread::sleep_for(150ms); });
}

/// Sets an environment variable for its lifetime (the tests run on one thread).
struct ScopedEnv {
    std::string name;
    ScopedEnv(const char* n, const char* value) : name(n) { ::setenv(n, value, 1); }
    ~ScopedEnv() { ::unsetenv(name.c_str()); }
};

/// Sends this process's stderr to a temporary file for its lifetime; text() reads it.
class CaptureStderr {
public:
    CaptureStderr() : file_(std::tmpfile()) {
        std::fflush(stderr);
        saved_ = ::dup(STDERR_FILENO);
        ::dup2(::fileno(file_), STDERR_FILENO);
    }
    ~CaptureStderr() {
        restore();
        std::fclose(file_);
    }
    std::string text() {
        restore();
        std::string out;
        std::rewind(file_);
        char buffer[512];
        while (std::size_t n = std::fread(buffer, 1, sizeof buffer, file_)) out.append(buffer, n);
        return out;
    }

private:
    void restore() {
        if (saved_ < 0) return;
        std::fflush(stderr);
        ::dup2(saved_, STDERR_FILENO);
        ::close(saved_);
        saved_ = -1;
    }
    std::FILE* file_;
    int saved_ = -1;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Names, ids, parents
// ---------------------------------------------------------------------------------------------

TEST_CASE("A task is named after its coroutine function; the main task has no parent", "[debug]") {
    std::vector<TaskInfo> seen;
    run_loop([&]() -> Task<> {
        const TaskInfo main = anyio::get_current_task();
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon(record_current_task(&seen));
            tg.start_soon(fetch_user(&seen));
            co_return;
        });
        REQUIRE(seen.size() == 2);
        CHECK(seen[0].name == "record_current_task");
        CHECK(seen[1].name == "fetch_user");  // the task's coroutine, not what it awaits
        CHECK(seen[0].parent_id == main.id);
        CHECK(seen[1].parent_id == main.id);
        CHECK(seen[0].id != seen[1].id);
        CHECK(seen[0].id > main.id);
        CHECK(seen[1].id > seen[0].id);  // in the order they were started
        CHECK_FALSE(main.parent_id.has_value());
    });
}

TEST_CASE("The main task is named after the coroutine given to run", "[debug]") {
    const TaskInfo main = anyio::run(report_current_task());
    CHECK(main.name == "report_current_task");
    CHECK(main.id == 1);
    CHECK_FALSE(main.parent_id.has_value());
}

TEST_CASE("named() names a task, in both start_soon forms", "[debug]") {
    std::vector<TaskInfo> seen;
    run_loop([&]() -> Task<> {
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon(anyio::named("fetch user"), record_current_task(&seen));
            std::string built = "request " + std::to_string(12);
            tg.start_soon(anyio::named(built), record_current_task_with, &seen, 1);
            co_return;
        });
        REQUIRE(seen.size() == 2);
        CHECK(seen[0].name == "fetch user");
        CHECK(seen[1].name == "request 12");
    });
}

TEST_CASE("A callable started with its arguments is named after the coroutine it returns",
          "[debug]") {
    std::vector<TaskInfo> seen;
    std::vector<TaskInfo> listed;
    run_loop([&]() -> Task<> {
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            tg.start_soon(record_current_task_with, &seen, 1);
            tg.start_soon([&]() -> Task<> { return fetch_user(&seen); });
            tg.start_soon([&]() -> Task<> {  // a coroutine lambda: no name to give
                co_await record_current_task(&seen);
            });
            co_await settle();
            co_return;
        });
        REQUIRE(seen.size() == 3);
        CHECK(seen[0].name == "record_current_task_with");
        CHECK(seen[1].name == "fetch_user");
        CHECK(seen[2].name == "task-" + std::to_string(seen[2].id));
    });
}

TEST_CASE("get_running_tasks lists every task that has not ended, oldest first", "[debug]") {
    run_loop([]() -> Task<> {
        anyio::Event release;
        const TaskInfo main = anyio::get_current_task();
        co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
            auto wait = [&]() -> Task<> { co_await release.wait(); };
            tg.start_soon(anyio::named("waiter a"), wait);
            tg.start_soon(anyio::named("waiter b"), wait);
            tg.start_soon(anyio::named("short"), [&]() -> Task<> { co_await anyio::checkpoint(); });
            co_await settle();
            const std::vector<TaskInfo> tasks = anyio::get_running_tasks();
            REQUIRE(tasks.size() == 3);
            CHECK(tasks[0] == main);
            CHECK(tasks[0].name == main.name);
            CHECK(tasks[1].name == "waiter a");
            CHECK(tasks[2].name == "waiter b");
            CHECK(tasks[1].parent_id == main.id);
            release.set();
        });
        CHECK(anyio::get_running_tasks().size() == 1);
    });
}

TEST_CASE("get_current_task outside a task: NoEventLoopError, or std::logic_error in a callback",
          "[debug]") {
    CHECK_THROWS_AS(anyio::get_current_task(), anyio::NoEventLoopError);
    CHECK_THROWS_AS(anyio::get_running_tasks(), anyio::NoEventLoopError);
    run_loop([]() -> Task<> {
        bool threw_logic_error = false;
        anyio::Event done;
        anyio::EventLoop::current()->call_soon([&] {
            try {
                (void)anyio::get_current_task();
            } catch (const std::logic_error&) {
                threw_logic_error = true;
            }
            done.set();
        });
        co_await done.wait();
        CHECK(threw_logic_error);
        // A worker thread runs no loop.
        auto on_worker = [] {
            try {
                (void)anyio::get_current_task();
            } catch (const anyio::NoEventLoopError&) {
                return true;
            }
            return false;
        };
        CHECK(co_await anyio::to_thread::run_sync(on_worker));
    });
}

TEST_CASE("A from_thread::run task is a child of the task that called run_sync, named after its "
          "coroutine",
          "[debug]") {
    run_loop([]() -> Task<> {
        const TaskInfo caller = anyio::get_current_task();
        auto on_worker = [] { return anyio::from_thread::run(report_current_task); };
        const TaskInfo called = co_await anyio::to_thread::run_sync(on_worker);
        CHECK(called.name == "report_current_task");
        CHECK(called.parent_id == caller.id);
        CHECK(called.id > caller.id);
    });
}

TEST_CASE("A portal task is named after its coroutine", "[debug][portal]") {
    auto portal = anyio::start_blocking_portal();
    CHECK(portal.call(report_current_task).name == "report_current_task");
    CHECK(portal.start_task_soon(report_current_task).get().name == "report_current_task");
}

TEST_CASE("An ExceptionGroup's message says which task raised each error", "[debug]") {
    std::string message;
    run_loop([&]() -> Task<> {
        try {
            co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
                tg.start_soon(anyio::named("first worker"), fail_at_once, "disk full");
                tg.start_soon(anyio::named("second worker"), fail_at_once, "timeout");
                co_return;
            });
        } catch (const anyio::ExceptionGroup& group) {
            message = group.what();
            CHECK(group.exceptions().size() == 2);
        }
    });
    CHECK(std::regex_search(message, std::regex(R"(task 'first worker' \(id \d+\): disk full)")));
    CHECK(std::regex_search(message, std::regex(R"(task 'second worker' \(id \d+\): timeout)")));
}

// ---------------------------------------------------------------------------------------------
// The blocked-loop detector
// ---------------------------------------------------------------------------------------------

TEST_CASE("A task that blocks the loop for 150 ms is reported, naming it, with the time", "[debug][detector]") {
    Reports reports;
    std::uint64_t handler_id = 0;
    anyio::run(
        [&]() -> Task<> {
            co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
                tg.start_soon(handler());
                handler_id = anyio::get_running_tasks().back().id;
                co_return;
            });
        }(),
        reports.options(100ms));
    const auto all = reports.of_task("handler");
    REQUIRE(all.size() == 1);
    REQUIRE(all[0].task.has_value());
    CHECK(all[0].task->id == handler_id);  // the task ended in that step: still named
    CHECK(all[0].duration >= 150ms);
    CHECK_FALSE(all[0].still_running);
    CHECK(all[0].message().find("anyio: task 'handler' (id " + std::to_string(handler_id) +
                                ") blocked the event loop for 0.") == 0);
}

TEST_CASE("The same blocking work through run_sync is not reported", "[debug][detector]") {
    Reports reports;
    anyio::run(offloading_handler(), reports.options(100ms));
    CHECK(reports.lasting(150ms).empty());  // the 150 ms on the worker never count
}

TEST_CASE("A plain callback that blocks the loop is reported as a callback", "[debug][detector]") {
    Reports reports;
    anyio::run(
        []() -> Task<> {
            anyio::Event done;
            anyio::EventLoop::current()->call_soon([&] {
                std::this_thread::sleep_for(120ms);
                done.set();
            });
            co_await done.wait();
        }(),
        reports.options(100ms));
    const auto all = reports.of_task("");
    REQUIRE(all.size() == 1);
    CHECK(all[0].duration >= 120ms);
    CHECK(all[0].message().find("anyio: a callback blocked the event loop for ") == 0);
}

TEST_CASE("Many short steps are not a stall: no report", "[debug][detector]") {
    Reports reports;
    anyio::run(
        []() -> Task<> {
            const auto until = std::chrono::steady_clock::now() + 400ms;
            while (std::chrono::steady_clock::now() < until) {
                std::this_thread::sleep_for(1ms);
                co_await anyio::checkpoint();
            }
        }(),
        reports.options(100ms));
    CHECK(reports.lasting(300ms).empty());  // steps are timed one by one, never summed
}

TEST_CASE("The watchdog reports a stall while it is still running, once", "[debug][detector]") {
    Reports reports;
    bool reported_while_stuck = false;
    std::chrono::steady_clock::duration stuck_for{};
    anyio::run(
        [&]() -> Task<> {
            co_await anyio::task_group([&](TaskGroup& tg) -> Task<> {
                tg.start_soon(anyio::named("stuck"), [&]() -> Task<> {
                    anyio_test::Stopwatch stopwatch;
                    // Stuck until the watchdog has spoken (at 3 x 100 ms), at most 3 s.
                    while (reports.still_running == 0 && stopwatch.elapsed() < 3s) {
                        std::this_thread::sleep_for(1ms);
                    }
                    reported_while_stuck = reports.still_running == 1;
                    // Stuck for a good while more: the same stall is not reported again.
                    std::this_thread::sleep_for(400ms);
                    stuck_for = stopwatch.elapsed();
                    co_return;
                });
                co_return;
            });
        }(),
        reports.options(100ms));
    CHECK(reported_while_stuck);
    const auto all = reports.of_task("stuck");
    REQUIRE(all.size() == 2);
    // First the watchdog's report, from its thread, while the step ran...
    CHECK(all[0].still_running);
    REQUIRE(all[0].task.has_value());
    CHECK(all[0].task->name == "stuck");
    CHECK(all[0].duration >= 300ms);
    CHECK(all[0].duration < stuck_for);
    CHECK(all[0].message().find(" has been blocking the event loop for ") != std::string::npos);
    CHECK(all[0].message().find(" and is still running;") != std::string::npos);
    // ...then the loop's, once the step had ended.
    CHECK_FALSE(all[1].still_running);
    REQUIRE(all[1].task.has_value());
    CHECK(all[1].task->id == all[0].task->id);
    CHECK(all[1].duration >= stuck_for);
}

TEST_CASE("ANYIO_DEBUG=1 turns the detector on at 100 ms, reporting one line on stderr", "[debug][detector]") {
    {
        ScopedEnv debug("ANYIO_DEBUG", "0");
        CHECK_FALSE(anyio::EventLoop::Options{}.slow_callback_duration.has_value());
    }
    CHECK_FALSE(anyio::EventLoop::Options{}.slow_callback_duration.has_value());
    std::string text;
    {
        ScopedEnv debug("ANYIO_DEBUG", "1");
        anyio::EventLoop::Options options;  // read here, from the environment
        REQUIRE(options.slow_callback_duration == std::chrono::steady_clock::duration(100ms));
        CaptureStderr capture;
        anyio::run(handler(), options);
        text = capture.text();
    }
    // One line per report (a loaded machine may stall another step too: regex_search).
    CHECK(std::regex_search(text, std::regex(R"((^|\n)anyio: task 'handler' \(id 1\) blocked the event loop for \d\.\d\d\d s; move blocking calls into to_thread::run_sync\n)")));
}

TEST_CASE("With the detector off no thread is started; on, one watchdog", "[debug][detector]") {
    const std::size_t before = anyio_test::thread_count();
    std::size_t off = 0;
    anyio::run([&]() -> Task<> {
        off = anyio_test::thread_count();
        co_return;
    });
    CHECK(off == before);
    Reports reports;
    std::size_t on = 0;
    anyio::run(
        [&]() -> Task<> {
            on = anyio_test::thread_count();
            co_return;
        }(),
        reports.options(100ms));
    CHECK(on == before + 1);
    CHECK(anyio_test::thread_count() == before);  // joined when run() returned
}

TEST_CASE("A report handler that throws is ignored", "[debug][detector]") {
    anyio::EventLoop::Options options;
    options.slow_callback_duration = 10ms;
    std::atomic<int> calls{0};  // the watchdog thread may report too (a slow machine)
    options.on_slow_callback = [&](const anyio::SlowCallbackInfo&) {
        ++calls;
        throw std::runtime_error("handler failed");
    };
    CHECK(anyio::run(
              []() -> Task<int> {
                  std::this_thread::sleep_for(20ms);
                  co_return 5;
              }(),
              options) == 5);
    CHECK(calls >= 1);
}

TEST_CASE("SlowCallbackInfo::message reads like the API's example", "[debug][detector]") {
    anyio::SlowCallbackInfo info;
    info.task = TaskInfo{12, "handler", std::nullopt};
    info.duration = 250ms;
    CHECK(info.message() ==
          "anyio: task 'handler' (id 12) blocked the event loop for 0.250 s; move blocking calls "
          "into to_thread::run_sync");
    info.still_running = true;
    info.duration = 1500ms;
    CHECK(info.message() ==
          "anyio: task 'handler' (id 12) has been blocking the event loop for 1.500 s and is still "
          "running; move blocking calls into to_thread::run_sync");
    info.task.reset();
    info.still_running = false;
    CHECK(info.message() ==
          "anyio: a callback blocked the event loop for 1.500 s; move blocking calls into "
          "to_thread::run_sync");
}
