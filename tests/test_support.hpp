// Helpers shared by several tests/*_test.cpp files: each test includes its own header under
// test first, then this one, and takes the names with `using namespace anyio_test;` (or, where
// the file has a helper of the same name, such as task_group_test's own CustomError, with
// using-declarations for the ones it needs). Header-only; not a test target (tests/CMakeLists.txt
// globs only *_test.cpp).
#pragma once

#include <anyio/cancel_scope.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task.hpp>

#include <chrono>
#include <cstddef>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

// Defined when the tests are built with ThreadSanitizer or AddressSanitizer (g++ defines
// __SANITIZE_*__, clang answers __has_feature), so stress tests can do fewer iterations.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define ANYIO_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define ANYIO_TEST_SANITIZED 1
#endif
#endif

namespace anyio_test {

// ---------------------------------------------------------------------------------------------
// Errors, and naming how a call ended (blocking_portal_test, from_thread_test)
// ---------------------------------------------------------------------------------------------

// An exception type that does not derive from std::exception.
struct Boom {
    int code;
};

struct CustomError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Runs `fn` and names how it ended, so that other threads can record it for the main thread.
template <class F>
std::string outcome_of(F&& fn) {
    try {
        std::forward<F>(fn)();
        return "returned";
    } catch (const anyio::Cancelled&) {
        return "Cancelled";
    } catch (const anyio::RunFinishedError&) {
        return "RunFinishedError";
    } catch (const anyio::NoEventLoopError&) {
        return "NoEventLoopError";
    } catch (const std::logic_error&) {
        return "std::logic_error";
    } catch (const Boom& boom) {
        return "Boom " + std::to_string(boom.code);
    } catch (const CustomError& error) {
        return std::string("CustomError: ") + error.what();
    } catch (const std::exception& error) {
        return std::string("std::exception: ") + error.what();
    } catch (...) {
        return "unknown exception";
    }
}

// ---------------------------------------------------------------------------------------------
// Coroutines that other threads run on a loop (blocking_portal_test, from_thread_test). Each
// reaches a real loop primitive first, so it runs as a task of the loop it was started on.
// ---------------------------------------------------------------------------------------------

// Records the thread it ran on in `*ran_on` (if not null) and yields a + b after a short sleep.
inline anyio::Task<int> add_on_loop(int a, int b, std::thread::id* ran_on) {
    if (ran_on != nullptr) *ran_on = std::this_thread::get_id();
    co_await anyio::checkpoint();
    co_await anyio::sleep(std::chrono::milliseconds(1));
    co_return a + b;
}

inline anyio::Task<int> throw_boom(int code) {
    co_await anyio::checkpoint();
    throw Boom{code};
}

inline anyio::Task<int> throw_custom(std::string message) {
    co_await anyio::checkpoint();
    throw CustomError(message);
}

inline anyio::Task<int&> reference_to(int& object) {
    co_await anyio::checkpoint();
    co_return object;
}

inline anyio::Task<std::unique_ptr<int>> make_owned(int value) {
    co_await anyio::checkpoint();
    co_return std::make_unique<int>(value);
}

// ---------------------------------------------------------------------------------------------
// Running a test body on a loop (capacity_limiter_test, to_thread_test)
// ---------------------------------------------------------------------------------------------

// Every body run_loop runs is under this deadline, so a call that never completes (a token
// never granted, a worker never answering) fails the test instead of hanging it.
inline constexpr std::chrono::seconds test_timeout{20};

template <class Body>
void run_loop(Body body, anyio::EventLoop::Options options = {}) {
    anyio::run(anyio::fail_after(test_timeout, body()), options);
}

// Lets the loop run what is ready (children just started, waiters just granted) a few times.
inline anyio::Task<> settle(int turns = 4) {
    for (int i = 0; i < turns; ++i) co_await anyio::checkpoint();
}

// ---------------------------------------------------------------------------------------------
// Timing (cancel_scope_test, task_group_test). Checks are one-sided and generous: a test sleeps
// `forever` where it would hang if a cancellation did not arrive, and checks that it took
// less than `prompt_bound`.
// ---------------------------------------------------------------------------------------------

inline constexpr std::chrono::seconds forever{10};     // a wait a passing test never sits out
inline constexpr std::chrono::seconds prompt_bound{2};  // generous bound for "at once"

struct Stopwatch {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    [[nodiscard]] std::chrono::steady_clock::duration elapsed() const {
        return std::chrono::steady_clock::now() - start;
    }
};

// ---------------------------------------------------------------------------------------------
// Threads of this process (blocking_portal_test, to_thread_test)
// ---------------------------------------------------------------------------------------------

// How many threads this process has now, as listed in /proc/self/task.
inline std::size_t thread_count() {
    std::size_t count = 0;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
        (void)entry;
        ++count;
    }
    return count;
}

}  // namespace anyio_test

// =============================================================================================
// Appended for the core-loop tests (task_test, event_loop_test, cancel_scope_test,
// task_group_test, event_test): running code in a child process, and failing allocations.
// =============================================================================================

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <new>

#include <sys/wait.h>
#include <unistd.h>

namespace anyio_test {

// How a child process started by run_in_child ended.
struct ChildOutcome {
    bool aborted = false;  // killed by SIGABRT (std::terminate, std::abort)
    int exit_code = -1;    // its exit status if it exited normally
    std::string stderr_text;
};

// Runs `fn` in a forked child process whose stderr is captured, and waits for it: the way to
// test that a misuse terminates the process with a message (a "death test"). The child exits
// with 0 if `fn` returns and with 3 if it throws.
template <class F>
ChildOutcome run_in_child(F&& fn) {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("run_in_child: pipe() failed");
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("run_in_child: fork() failed");
    if (pid == 0) {
        // The test framework's handlers would report the abort as a failed test of its own.
        for (int sig : {SIGABRT, SIGSEGV, SIGILL, SIGFPE, SIGBUS}) std::signal(sig, SIG_DFL);
        ::close(fds[0]);
        ::dup2(fds[1], STDERR_FILENO);
        ::close(fds[1]);
        int code = 0;
        try {
            fn();
        } catch (...) {
            code = 3;
        }
        std::fflush(nullptr);
        ::_exit(code);
    }
    ::close(fds[1]);
    ChildOutcome outcome;
    char buffer[4096];
    for (;;) {
        ssize_t n = ::read(fds[0], buffer, sizeof buffer);
        if (n <= 0) break;
        outcome.stderr_text.append(buffer, static_cast<std::size_t>(n));
    }
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    outcome.aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
    if (WIFEXITED(status)) outcome.exit_code = WEXITSTATUS(status);
    return outcome;
}

// While set, every global operator new of a test program that uses
// ANYIO_TEST_FAILING_OPERATOR_NEW() throws std::bad_alloc (the rest of the program allocates
// through malloc as usual). Set it only around the step under test, and skip the test when
// `can_fail_allocations` is false: clang's ThreadSanitizer runtime links its own operator new
// statically, which cannot be replaced, so under TSan (either compiler) nothing is replaced.
#if defined(__SANITIZE_THREAD__)
#define ANYIO_TEST_CAN_FAIL_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ANYIO_TEST_CAN_FAIL_ALLOCATIONS 0
#endif
#endif
#ifndef ANYIO_TEST_CAN_FAIL_ALLOCATIONS
#define ANYIO_TEST_CAN_FAIL_ALLOCATIONS 1
#endif
inline std::atomic<bool> fail_allocations{false};
inline constexpr bool can_fail_allocations = ANYIO_TEST_CAN_FAIL_ALLOCATIONS != 0;

inline void* allocate_unless_failing(std::size_t size) noexcept {
    // relaxed: set and cleared by the thread under test around the step it tests.
    if (fail_allocations.load(std::memory_order_relaxed)) return nullptr;
    return std::malloc(size == 0 ? 1 : size);
}

}  // namespace anyio_test

// Replaces the global operator new/delete of the test program (use it once, at namespace scope
// of the test file) so that anyio_test::fail_allocations can make allocations fail. Every
// non-aligned form is replaced, so that a sanitizer's own versions are never paired with these.
#if !ANYIO_TEST_CAN_FAIL_ALLOCATIONS
#define ANYIO_TEST_FAILING_OPERATOR_NEW() static_assert(true, "")
#else
#define ANYIO_TEST_FAILING_OPERATOR_NEW()                                                    \
    void* operator new(std::size_t size) {                                                   \
        if (void* p = anyio_test::allocate_unless_failing(size)) return p;                   \
        throw std::bad_alloc();                                                              \
    }                                                                                        \
    void* operator new[](std::size_t size) {                                                 \
        if (void* p = anyio_test::allocate_unless_failing(size)) return p;                   \
        throw std::bad_alloc();                                                              \
    }                                                                                        \
    void* operator new(std::size_t size, const std::nothrow_t&) noexcept {                   \
        return anyio_test::allocate_unless_failing(size);                                    \
    }                                                                                        \
    void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {                 \
        return anyio_test::allocate_unless_failing(size);                                    \
    }                                                                                        \
    void operator delete(void* p) noexcept { std::free(p); }                                 \
    void operator delete[](void* p) noexcept { std::free(p); }                               \
    void operator delete(void* p, std::size_t) noexcept { std::free(p); }                    \
    void operator delete[](void* p, std::size_t) noexcept { std::free(p); }                  \
    void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }          \
    void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }        \
    static_assert(true, "")
#endif

// =============================================================================================
// Appended for the reliability tests (stress_*_test, faults_test, misuse_test): the stress
// scale, and threads that must be gone once a loop has returned.
// =============================================================================================

#include <cmath>
#include <fstream>
#include <string_view>
#include <vector>

namespace anyio_test {

// How big a [stress] case runs, as a fraction of issue 15's full sizes (1.0 = 1,000,000
// offloads, ...). The environment variable ANYIO_STRESS_SCALE overrides it (for instance
// ANYIO_STRESS_SCALE=1 for a full run in Release); by default a stress case takes a few
// seconds in Debug and stays well under 10 s under the sanitizers. A value that does not
// parse as a positive number is ignored.
#if defined(ANYIO_TEST_SANITIZED)
inline constexpr double default_stress_scale = 0.004;
#else
inline constexpr double default_stress_scale = 0.02;
#endif

inline double stress_scale() {
    static const double scale = [] {
        if (const char* text = std::getenv("ANYIO_STRESS_SCALE"); text != nullptr) {
            char* end = nullptr;
            const double value = std::strtod(text, &end);
            if (end != text && std::isfinite(value) && value > 0) return value;
        }
        return default_stress_scale;
    }();
    return scale;
}

// `full` (a size at scale 1.0) scaled by stress_scale(), never below `minimum`.
inline std::int64_t scaled(std::int64_t full, std::int64_t minimum = 1) {
    const auto value = static_cast<std::int64_t>(std::llround(static_cast<double>(full) * stress_scale()));
    return value < minimum ? minimum : value;
}

// The names (comm) of this process's threads, from /proc/self/task.
inline std::vector<std::string> list_thread_names() {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
        std::ifstream comm(entry.path() / "comm");
        std::string name;
        if (std::getline(comm, name)) names.push_back(name);
    }
    return names;
}

// How many threads of this process are named `name` (the OS keeps the first 15 bytes).
inline std::size_t threads_named(std::string_view name) {
    std::size_t count = 0;
    for (const std::string& thread : list_thread_names()) {
        if (thread == name.substr(0, 15)) ++count;
    }
    return count;
}

// A joined thread can stay listed in /proc for a moment while the kernel reaps it: polls
// (bounded, 5 s) until `done()` holds, and returns whether it did.
template <class Predicate>
bool eventually_true(Predicate done, std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() >= until) return done();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
}

// The thread count with no loop running. A thread is started and joined first, so that a
// runtime helper thread started lazily (ThreadSanitizer's background thread) is already part
// of it; then it waits until earlier threads are reaped.
inline std::size_t quiet_thread_count() {
    std::thread([] {}).join();
    std::size_t count = thread_count();
    for (int i = 0; i < 100; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        const std::size_t now = thread_count();
        if (now == count) break;
        count = now;
    }
    return count;
}

}  // namespace anyio_test
