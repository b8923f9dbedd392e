// Context variables, task names and the blocked-loop detector: the README's snippets for
// them, compiled and run as is (keep the two in step).
//
// A request id set in a handler follows its work onto the worker thread and back into the
// loop; a handler that blocks the loop by mistake is named in the detector's report.
#include <anyio/anyio.hpp>

#include <chrono>
#include <string>
#include <thread>

#include <fmt/core.h>

using namespace std::chrono_literals;

inline anyio::ContextVar<std::string> request_id{"request_id"};

void log(const std::string& what) {  // any thread: reads the context it runs in
    fmt::print("[{}] {}\n", request_id.get_or("-"), what);
}

std::string load_user(int id) {  // blocking: runs on a worker thread
    log("loading user " + std::to_string(id) + " on a worker thread");
    anyio::from_thread::run_sync([] { log("back on the loop thread, same request"); });
    return "user-" + std::to_string(id);
}

anyio::Task<> handle(int id) {
    request_id.set("r-" + std::to_string(id));  // this task's context only
    std::string user = co_await anyio::to_thread::run_sync(load_user, id);
    log(anyio::get_current_task().name + " got " + user);
}

anyio::Task<> blocking_handler() {
    std::this_thread::sleep_for(150ms);  // the anti-pattern the detector reports
    co_return;
}

anyio::Task<> amain() {
    co_await anyio::task_group([](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon(handle, 1);                           // named "handle"
        tg.start_soon(anyio::named("second request"), handle, 2);
        tg.start_soon(blocking_handler);
        co_return;
    });
    log("main task: the handlers' ids did not flow back here");
}

int main() {
    anyio::EventLoop::Options options;                     // or run with ANYIO_DEBUG=1
    options.slow_callback_duration = 100ms;
    options.on_slow_callback = [](const anyio::SlowCallbackInfo& info) {
        fmt::print("{}\n", info.message());                 // loop or watchdog thread
    };
    anyio::run(amain(), options);
}
