// Faults under load (issue 15, "Faults"): worker threads that cannot start (the injection knob,
// RLIMIT_NPROC in a child process), on_thread_start hooks that throw now and then, and a
// process out of file descriptors (RLIMIT_NOFILE) while it accepts, connects and opens files.
// Each failed call gets its error, nothing is leaked, tokens come back, and the loop goes on:
// the calls after the fault succeed. Allocation failures are in stress_alloc_test (a test
// operator new is global to its executable).
//
// Size: ANYIO_STRESS_SCALE (tests/test_support.hpp); 1.0 is 200,000 offloads in the mix.
#include <anyio/anyio.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "catch.hpp"
#include "net_test_support.hpp"
#include "test_support.hpp"

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;
using anyio::to_thread::run_sync;
using Catch::Matchers::Contains;

constexpr const char* fault_worker_name = "fault worker";

// =============================================================================================
// Thread starts that fail, and start hooks that throw, during an offload mix
// =============================================================================================

// What a call of the mix does.
enum class Kind : std::uint8_t { value, fn_throws, from_thread, stop_token, count };

struct FaultMix {
    explicit FaultMix(std::int64_t calls, int tasks) : tasks(tasks), per_task(calls / tasks) {}

    int tasks;
    std::int64_t per_task;
    int callers_left = 0;
    anyio::CapacityLimiter* tight = nullptr;  // 2 tokens: long queues, failures reach waiters

    // How calls ended (loop side).
    std::int64_t calls = 0, values = 0, fn_errors = 0, start_errors = 0, hook_errors = 0, cancelled = 0;
    std::int64_t wrong = 0;          // a value or an error that does not belong to the call
    std::int64_t bad_start_error = 0;  // a std::system_error with the wrong code or message
    std::int64_t outcomes = 0;       // every call adds exactly one
    std::int64_t injected = 0;       // thread start failures the driver asked for
    std::int64_t stats_violations = 0;

    // Shared with the workers.
    std::atomic<bool> hooks_throw{true};
    std::atomic<std::int64_t> hook_calls{0};
    std::atomic<std::int64_t> hook_throws{0};
    std::atomic<std::int64_t> fn_runs{0};

    void on_thread_start() {
        // relaxed (all three): counters and a switch; the loop reads the counts after the
        // threads were joined (run() returned), or only compares them for a report.
        const std::int64_t n = hook_calls.fetch_add(1, std::memory_order_relaxed);
        if (hooks_throw.load(std::memory_order_relaxed) && n % 5 == 3) {
            hook_throws.fetch_add(1, std::memory_order_relaxed);
            throw CustomError("start hook failed " + std::to_string(n));
        }
    }

    static std::int64_t expected(std::int64_t id) { return id * 3 + 11; }

    static anyio::Task<std::int64_t> back_on_loop(std::int64_t id) {
        co_await anyio::checkpoint();
        co_return expected(id);
    }

    // One call: records exactly one outcome.
    static anyio::Task<> one_call(FaultMix* mix, std::int64_t id, Kind kind, bool tight) {
        const anyio::to_thread::RunSyncOptions options{.limiter = tight ? mix->tight : nullptr};
        try {
            std::int64_t value = 0;
            if (kind == Kind::stop_token) {
                value = co_await run_sync(options, [mix, id](std::stop_token stop) {
                    mix->fn_runs.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
                    for (int i = 0; i < 10 && !stop.stop_requested(); ++i) std::this_thread::sleep_for(5us);
                    return expected(id);
                });
            } else {
                value = co_await run_sync(options, [mix, id, kind] {
                    mix->fn_runs.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
                    if (kind == Kind::fn_throws) throw std::runtime_error("fn " + std::to_string(id));
                    if (kind == Kind::from_thread) return anyio::from_thread::run(back_on_loop, id);
                    return expected(id);
                });
            }
            if (value != expected(id)) ++mix->wrong;
            ++mix->values;
        } catch (const anyio::Cancelled&) {
            ++mix->cancelled;
            ++mix->outcomes;
            throw;
        } catch (const CustomError& error) {
            if (std::string_view(error.what()).find("start hook failed") != 0) ++mix->wrong;
            ++mix->hook_errors;
        } catch (const std::system_error& error) {
            if (error.code() != std::errc::resource_unavailable_try_again ||
                std::string_view(error.what()).find("cannot start a worker thread") == std::string_view::npos) {
                ++mix->bad_start_error;
            }
            ++mix->start_errors;
        } catch (const std::runtime_error& error) {
            if (kind != Kind::fn_throws || error.what() != "fn " + std::to_string(id)) ++mix->wrong;
            ++mix->fn_errors;
        }
        ++mix->outcomes;
    }

    static anyio::Task<> caller(FaultMix* mix, int index) {
        std::mt19937 rng(0xfa17u + static_cast<unsigned>(index));
        for (std::int64_t j = 0; j < mix->per_task; ++j) {
            const std::int64_t id = mix->calls++;
            const auto kind = static_cast<Kind>(rng() % static_cast<unsigned>(Kind::count));
            const bool tight = rng() % 3 == 0;
            // One call in six has a short deadline: cancelled while it waits for a token, or
            // (shielded) after fn ran, when it still yields fn's outcome.
            auto deadline = anyio::CancelScope::time_point::max();
            if (rng() % 6 == 0) deadline = anyio::current_time() + std::chrono::microseconds(rng() % 300);
            anyio::CancelScope scope(deadline);
            (void)co_await scope.run(one_call(mix, id, kind, tight));
        }
        --mix->callers_left;
    }

    // Makes the next one or two thread starts fail, every few hundred microseconds, and
    // checks the pool's statistics, until the callers are done.
    static anyio::Task<> driver(FaultMix* mix) {
        std::mt19937 rng(0xd1e5u);
        while (mix->callers_left > 0) {
            co_await anyio::sleep(std::chrono::microseconds(200 + rng() % 400));
            const int failures = static_cast<int>(rng() % 3);
            // relaxed: the knob is read only by this (the loop) thread.
            anyio::detail::injected_thread_start_failures.fetch_add(failures, std::memory_order_relaxed);
            mix->injected += failures;
            const anyio::WorkerPoolStatistics stats = anyio::to_thread::statistics();
            if (stats.idle_workers + stats.busy_workers > stats.workers) ++mix->stats_violations;
            if (stats.workers > stats.threads_created) ++mix->stats_violations;
        }
    }
};

}  // namespace

TEST_CASE("Thread starts that fail and start hooks that throw during an offload mix: each failed "
          "call gets the error, tokens come back, later calls succeed",
          "[stress][faults][to_thread]") {
    const std::int64_t calls = scaled(200'000, 1'000);
    const int tasks = static_cast<int>(std::clamp<std::int64_t>(calls / 20, 50, 2'000));
    const std::size_t baseline = quiet_thread_count();
    FaultMix mix(calls, tasks);
    std::int64_t leftover_injections = -1;
    std::int64_t after_values = 0, after_errors = 0;
    std::int64_t borrowed_left = -1, waiting_left = -1, tight_borrowed_left = -1, tight_waiting_left = -1;
    anyio::WorkerPoolStatistics stats;
    const Stopwatch watch;
    anyio::run(
        anyio::fail_after(60s, [&]() -> anyio::Task<> {
            anyio::CapacityLimiter tight(2);
            mix.tight = &tight;
            mix.callers_left = mix.tasks;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon(&FaultMix::driver, &mix);
                for (int t = 0; t < mix.tasks; ++t) tg.start_soon(&FaultMix::caller, &mix, t);
                co_return;
            });
            // relaxed: the loop thread's own knob.
            leftover_injections = anyio::detail::injected_thread_start_failures.exchange(0, std::memory_order_relaxed);
            anyio::CapacityLimiter& limiter = anyio::to_thread::current_default_thread_limiter();
            borrowed_left = limiter.borrowed_tokens();
            waiting_left = static_cast<std::int64_t>(limiter.statistics().tasks_waiting);
            tight_borrowed_left = tight.borrowed_tokens();
            tight_waiting_left = static_cast<std::int64_t>(tight.statistics().tasks_waiting);

            // The fault is over: every later call succeeds, on both limiters, concurrently.
            mix.hooks_throw.store(false, std::memory_order_relaxed);  // relaxed: see on_thread_start
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int i = 0; i < 200; ++i) {
                    tg.start_soon([&, i]() -> anyio::Task<> {
                        try {
                            const int value = co_await run_sync({.limiter = i % 2 == 0 ? &tight : nullptr},
                                                                [i] { return i; });
                            if (value == i) ++after_values;
                        } catch (...) {
                            ++after_errors;
                        }
                    });
                }
                co_return;
            });
            stats = anyio::to_thread::statistics();
        }()),
        {.max_idle_time = 1ms,
         .thread_name = fault_worker_name,
         .on_thread_start = [&mix] { mix.on_thread_start(); }});
    const double elapsed = std::chrono::duration<double>(watch.elapsed()).count();
    const std::int64_t consumed = mix.injected - leftover_injections;
    WARN("fault mix: " << mix.calls << " calls from " << mix.tasks << " tasks in " << elapsed << " s; "
                       << mix.values << " values, " << mix.fn_errors << " fn errors, " << mix.start_errors
                       << " thread start failures (" << consumed << " injected and used), " << mix.hook_errors
                       << " start hook failures (" << mix.hook_throws.load() << " thrown of "
                       << mix.hook_calls.load() << " starts), " << mix.cancelled << " cancelled; "
                       << stats.threads_created << " threads started");

    // Every call ended once, each with its own outcome.
    CHECK(mix.calls == mix.per_task * mix.tasks);
    CHECK(mix.outcomes == mix.calls);
    CHECK(mix.values + mix.fn_errors + mix.start_errors + mix.hook_errors + mix.cancelled == mix.calls);
    CHECK(mix.wrong == 0);
    CHECK(mix.bad_start_error == 0);
    // Every failed start reached exactly one caller as std::system_error, every throwing hook
    // exactly one caller as its own exception.
    CHECK(leftover_injections >= 0);
    CHECK(mix.start_errors == consumed);
    CHECK(mix.hook_errors == mix.hook_throws.load(std::memory_order_relaxed));
    CHECK(mix.start_errors > 0);
    CHECK(mix.hook_errors > 0);
    CHECK(mix.values > 0);
    // Tokens came back; the pool's statistics added up all along.
    CHECK(borrowed_left == 0);
    CHECK(waiting_left == 0);
    CHECK(tight_borrowed_left == 0);
    CHECK(tight_waiting_left == 0);
    CHECK(mix.stats_violations == 0);
    // Later calls succeed.
    CHECK(after_values == 200);
    CHECK(after_errors == 0);
    CHECK(stats.busy_workers == 0);
    // No thread is left (the failed ones included).
    CHECK(threads_named(fault_worker_name) == 0);
    CHECK(eventually_true([&] { return thread_count() == baseline; }));
}

// =============================================================================================
// RLIMIT_NPROC: the OS refuses new threads (in a child process, as an unprivileged user)
// =============================================================================================

namespace {

// In the child: becomes a user of its own (RLIMIT_NPROC counts the tasks of a real user id
// and does not bind root), allows itself `extra` threads besides its own, and offloads.
// Writes what it saw to stderr; returns 0 when every expectation held, 4 when it cannot
// become a user of its own (not root; the test is then skipped), other values on failure.
int nproc_child() {
    // Not root: the limit would count every other process of this user too (the test runner,
    // a shell...), so how many threads it leaves is unknown. Skipped.
    if (::geteuid() != 0) return 4;
    // A user id nobody else has (per process), so no other process counts against it.
    const uid_t uid = 50000 + static_cast<uid_t>(::getpid() % 10000);
    if (::setgid(uid) != 0 || ::setuid(uid) != 0) return 4;
    constexpr int extra = 3;
    rlimit original{};
    ::getrlimit(RLIMIT_NPROC, &original);
    rlimit lowered{static_cast<rlim_t>(1 + extra), original.rlim_max};
    if (::setrlimit(RLIMIT_NPROC, &lowered) != 0) return 5;

    int status = 0;
    try {
        int started = 0, failed = 0, bad_errors = 0, later = 0, after_raise = 0;
        std::int64_t borrowed_left = -1;
        anyio::run([&]() -> anyio::Task<> {
            anyio::CapacityLimiter limiter(20);
            std::atomic<bool> release{false};
            // 20 blocking calls at once: the threads the limit allows start, the others fail.
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int i = 0; i < 20; ++i) {
                    tg.start_soon([&]() -> anyio::Task<> {
                        try {
                            co_await run_sync({.limiter = &limiter}, [&release] {
                                // acquire/relaxed: a flag; the loop sets it once every call began.
                                while (!release.load(std::memory_order_acquire)) std::this_thread::sleep_for(100us);
                            });
                            ++started;
                        } catch (const std::system_error& error) {
                            ++failed;
                            if (error.code() != std::errc::resource_unavailable_try_again) ++bad_errors;
                        }
                    });
                }
                co_await settle(8);
                release.store(true, std::memory_order_release);  // release: pairs with the load
                co_return;
            });
            borrowed_left = limiter.borrowed_tokens();
            // Later calls succeed on the threads that did start.
            for (int i = 0; i < 50; ++i) later += co_await run_sync({.limiter = &limiter}, [] { return 1; });
            // With the limit back up, as many threads as needed start again.
            rlimit restored{original.rlim_max == RLIM_INFINITY ? rlim_t{4096} : original.rlim_max, original.rlim_max};
            ::setrlimit(RLIMIT_NPROC, &restored);
            std::atomic<int> running{0};
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int i = 0; i < 10; ++i) {
                    tg.start_soon([&]() -> anyio::Task<> {
                        co_await run_sync({.limiter = &limiter}, [&running] {
                            // relaxed: a counter; every call waits until all ten run at once.
                            running.fetch_add(1, std::memory_order_relaxed);
                            const auto until = std::chrono::steady_clock::now() + 5s;
                            while (running.load(std::memory_order_relaxed) < 10 && std::chrono::steady_clock::now() < until) {
                                std::this_thread::sleep_for(100us);
                            }
                        });
                        ++after_raise;
                    });
                }
                co_return;
            });
        }());
        std::fprintf(stderr, "nproc child: %d started, %d failed (%d with a wrong code), %d borrowed left, "
                             "%d later calls, %d after raising the limit\n",
                     started, failed, bad_errors, static_cast<int>(borrowed_left), later, after_raise);
        if (started < 1 || started > extra || failed != 20 - started || bad_errors != 0 || borrowed_left != 0 ||
            later != 50 || after_raise != 10) {
            status = 2;
        }
    } catch (const std::exception& error) {
        std::fprintf(stderr, "nproc child: %s\n", error.what());
        status = 3;
    }
    return status;
}

}  // namespace

TEST_CASE("With RLIMIT_NPROC reached, offloads that need a new thread get std::system_error, the "
          "rest run, tokens come back and later calls succeed",
          "[stress][faults][to_thread]") {
    const ChildOutcome outcome = run_in_child([] { std::_Exit(nproc_child()); });
    INFO(outcome.stderr_text);
    if (outcome.exit_code == 4) {
        WARN("skipped: needs root to switch to a user id of its own (RLIMIT_NPROC counts every process of a user and does not bind root)");
        return;
    }
    WARN(outcome.stderr_text);
    CHECK_FALSE(outcome.aborted);
    CHECK(outcome.exit_code == 0);
    CHECK_THAT(outcome.stderr_text, Contains("nproc child:"));
}

// =============================================================================================
// RLIMIT_NOFILE: no descriptor left while accepting, connecting and opening files
// =============================================================================================

namespace {

// Lowers this process's descriptor limit to what is open now and fills every free slot, until
// released: restores the limit and closes the fillers.
class DescriptorDrought {
public:
    DescriptorDrought() {
        ::getrlimit(RLIMIT_NOFILE, &original_);
        null_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        int highest = null_fd_;
        for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
            highest = std::max(highest, std::stoi(entry.path().filename().string()));
        }
        rlimit lowered{static_cast<rlim_t>(highest + 8), original_.rlim_max};
        if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) throw std::runtime_error("setrlimit failed");
        for (int fd; (fd = ::fcntl(null_fd_, F_DUPFD_CLOEXEC, 0)) >= 0;) fillers_.push_back(fd);
        filled_with_emfile_ = errno == EMFILE;
    }
    ~DescriptorDrought() { release(); }
    DescriptorDrought(const DescriptorDrought&) = delete;
    DescriptorDrought& operator=(const DescriptorDrought&) = delete;

    void release() {
        for (int fd : fillers_) ::close(fd);
        fillers_.clear();
        if (null_fd_ >= 0) ::close(null_fd_);
        null_fd_ = -1;
        ::setrlimit(RLIMIT_NOFILE, &original_);
    }
    [[nodiscard]] bool filled() const { return filled_with_emfile_ && !fillers_.empty(); }

private:
    rlimit original_{};
    int null_fd_ = -1;
    bool filled_with_emfile_ = false;
    std::vector<int> fillers_;
};

// How one operation ended during the drought (checked once descriptors are back: a failed
// check must not need a descriptor to report itself).
struct Failure {
    bool system_error = false;
    int code = 0;
    std::string what;
};

}  // namespace

TEST_CASE("With no file descriptor left, accept, connect_tcp and open_file fail with a clear "
          "std::system_error, leak nothing, and work again once descriptors are free",
          "[stress][faults][net][file]") {
    TempDir dir;
    const std::string path = dir.file("data.txt");
    std::ofstream(path) << "some bytes";
    constexpr int connects = 50, opens = 50, accepts = 5;
    std::vector<Failure> connect_failures, open_failures, accept_failures;
    int connect_ok = 0, open_ok = 0, accept_ok = 0;
    bool filled = false;
    std::size_t fds_before = 0, fds_after = 0;
    std::string after_accept, after_file;
    bool after_connect = false;
    const std::size_t baseline = quiet_thread_count();
    run_loop([&]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        const std::uint16_t port = listener.local_port();
        // Warm up: a worker thread exists, and the paths under test have run once.
        {
            anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", port);
            anyio::SocketStream server = co_await listener.accept();
            anyio::AsyncFile file = co_await anyio::open_file(path, "rb");
            co_await file.aclose();
        }
        // Connections waiting in the backlog: the handshake completes without accept().
        std::vector<int> pending;
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_port = htons(port);
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        for (int i = 0; i < accepts; ++i) {
            int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) throw std::runtime_error("connect");
            pending.push_back(fd);
        }
        fds_before = open_fd_count();
        {
            DescriptorDrought drought;
            filled = drought.filled();
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int i = 0; i < connects; ++i) {
                    tg.start_soon([&]() -> anyio::Task<> {
                        try {
                            anyio::SocketStream stream = co_await anyio::connect_tcp("127.0.0.1", port);
                            ++connect_ok;
                        } catch (const std::system_error& error) {
                            connect_failures.push_back({true, error.code().value(), error.what()});
                        } catch (const std::exception& error) {
                            connect_failures.push_back({false, 0, error.what()});
                        }
                    });
                }
                for (int i = 0; i < opens; ++i) {
                    tg.start_soon([&]() -> anyio::Task<> {
                        try {
                            anyio::AsyncFile file = co_await anyio::open_file(path, "rb");
                            ++open_ok;
                        } catch (const std::system_error& error) {
                            open_failures.push_back({true, error.code().value(), error.what()});
                        } catch (const std::exception& error) {
                            open_failures.push_back({false, 0, error.what()});
                        }
                    });
                }
                tg.start_soon([&]() -> anyio::Task<> {
                    for (int i = 0; i < accepts; ++i) {
                        try {
                            anyio::SocketStream stream = co_await listener.accept();
                            ++accept_ok;
                        } catch (const std::system_error& error) {
                            accept_failures.push_back({true, error.code().value(), error.what()});
                        } catch (const std::exception& error) {
                            accept_failures.push_back({false, 0, error.what()});
                        }
                    }
                });
                co_return;
            });
        }  // descriptors free again
        fds_after = open_fd_count();
        // The loop, the listener and the pool go on: the pending connections are accepted,
        // and new connections and files open.
        for (int fd : pending) {
            anyio::SocketStream server = co_await listener.accept();
            anyio::SocketStream client = anyio::SocketStream::from_fd(fd);
            co_await client.send(std::string_view("x"));
            after_accept += co_await server.receive();
        }
        {
            anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", port);
            anyio::SocketStream server = co_await listener.accept();
            after_connect = true;
        }
        anyio::AsyncFile file = co_await anyio::open_file(path, "rb");
        after_file = co_await file.read();
        co_await file.aclose();
    });
    REQUIRE(filled);
    WARN("descriptor drought: " << connect_failures.size() << " connects, " << open_failures.size() << " opens and "
                                << accept_failures.size() << " accepts failed; for example: \""
                                << (connect_failures.empty() ? "" : connect_failures.front().what) << "\", \""
                                << (open_failures.empty() ? "" : open_failures.front().what) << "\", \""
                                << (accept_failures.empty() ? "" : accept_failures.front().what) << "\"");
    // Every operation failed, with EMFILE and a message saying which operation and what.
    CHECK(connect_ok == 0);
    CHECK(open_ok == 0);
    CHECK(accept_ok == 0);
    CHECK(connect_failures.size() == static_cast<std::size_t>(connects));
    CHECK(open_failures.size() == static_cast<std::size_t>(opens));
    CHECK(accept_failures.size() == static_cast<std::size_t>(accepts));
    for (const Failure& failure : connect_failures) {
        INFO(failure.what);
        CHECK(failure.system_error);
        CHECK(failure.code == EMFILE);
        CHECK_THAT(failure.what, Contains("connect_tcp"));
    }
    for (const Failure& failure : open_failures) {
        INFO(failure.what);
        CHECK(failure.system_error);
        CHECK(failure.code == EMFILE);
        CHECK_THAT(failure.what, Contains("open_file: cannot open") && Contains(path));
    }
    for (const Failure& failure : accept_failures) {
        INFO(failure.what);
        CHECK(failure.system_error);
        CHECK(failure.code == EMFILE);
        CHECK_THAT(failure.what, Contains("SocketListener::accept"));
    }
    // Nothing leaked: the drought's own descriptors aside, the same descriptors are open.
    CHECK(fds_after == fds_before);
    // And everything works again.
    CHECK(after_accept == std::string(accepts, 'x'));
    CHECK(after_connect);
    CHECK(after_file == "some bytes");
    CHECK(eventually_true([&] { return thread_count() == baseline; }));
}
