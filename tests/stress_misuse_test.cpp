// Misuse, all in one place (issue 15, "Misuse, each with a clear message and no damage"): every
// case checks the exception type, that its message says what was wrong and what to do, and
// that the object misused (and the loop) still works afterwards, with nothing lost or leaked.
// Several cases also have a unit test in their header's test file; this file keeps the whole
// list together, and checks the "no damage" half of each under one roof.
#include <anyio/anyio.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include <sys/socket.h>

#include "catch.hpp"
#include "test_support.hpp"

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;
using anyio::to_thread::run_sync;
using Catch::Matchers::Contains;

// How a misuse ended, as seen by the test: whether the expected type was thrown, and its text.
struct Caught {
    bool thrown = false;      // anything was thrown
    bool right_type = false;  // it was an E
    std::string what;         // E's what(), or a description of what was thrown instead
};

template <class E, class F>
Caught catch_sync(F&& fn) {
    Caught caught;
    try {
        std::forward<F>(fn)();
    } catch (const E& error) {
        caught = {true, true, error.what()};
    } catch (const std::exception& error) {
        caught = {true, false, std::string("another exception: ") + error.what()};
    } catch (...) {
        caught = {true, false, "a non-std exception"};
    }
    return caught;
}

template <class E>
anyio::Task<Caught> catch_async(anyio::Task<> task) {
    Caught caught;
    try {
        co_await std::move(task);
    } catch (const E& error) {
        caught = {true, true, error.what()};
    } catch (const std::exception& error) {
        caught = {true, false, std::string("another exception: ") + error.what()};
    }
    co_return caught;
}

// The checks every case makes: the expected type, and a message naming the problem and the fix.
#define CHECK_MISUSE(caught, ...)                   \
    do {                                            \
        const Caught& misuse_ = (caught);           \
        INFO("message: " << misuse_.what);          \
        CHECK(misuse_.thrown);                      \
        CHECK(misuse_.right_type);                  \
        for (const char* part_ : {__VA_ARGS__}) {   \
            CHECK_THAT(misuse_.what, Contains(part_)); \
        }                                           \
    } while (false)

// The message a loop-thread object gives when used from another thread.
constexpr const char* wrong_thread = "belongs to an event loop running on another thread";
constexpr const char* wrong_thread_fix = "anyio::from_thread::run_sync";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Loop-thread objects used from a worker thread
// ---------------------------------------------------------------------------------------------

TEST_CASE("A CapacityLimiter, a Lock or a memory object stream used from a worker thread "
          "throws std::logic_error naming from_thread, and keeps working on the loop",
          "[misuse]") {
    Caught limiter_acquire, limiter_release, limiter_resize, lock_acquire, lock_release, stream_send,
        stream_receive;
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        anyio::Lock lock;
        auto [send_end, receive_end] = anyio::create_memory_object_stream<int>(4);
        auto& tx = send_end;  // clang 14 cannot capture a structured binding
        auto& rx = receive_end;
        limiter.acquire_nowait();  // binds every object to this loop
        limiter.release();
        tx.send_nowait(0);
        (void)rx.receive_nowait();
        lock.acquire_nowait();
        lock.release();
        co_await run_sync([&] {
            limiter_acquire = catch_sync<std::logic_error>([&] { limiter.acquire_nowait(); });
            limiter_release = catch_sync<std::logic_error>([&] { limiter.release(); });
            limiter_resize = catch_sync<std::logic_error>([&] { limiter.set_total_tokens(7); });
            lock_acquire = catch_sync<std::logic_error>([&] { lock.acquire_nowait(); });
            lock_release = catch_sync<std::logic_error>([&] { lock.release(); });
            stream_send = catch_sync<std::logic_error>([&] { tx.send_nowait(1); });
            stream_receive = catch_sync<std::logic_error>([&] { (void)rx.receive_nowait(); });
        });
        // No damage: nothing was taken, given or queued, and each still works on the loop.
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.total_tokens() == 2);
        CHECK_FALSE(lock.locked());
        CHECK(tx.statistics().current_buffer_used == 0);
        {
            auto guard = co_await limiter.scoped();
            CHECK(limiter.borrowed_tokens() == 1);
        }
        CHECK(limiter.borrowed_tokens() == 0);
        {
            auto held = co_await lock.lock();
            CHECK(lock.locked());
        }
        CHECK_FALSE(lock.locked());
        co_await tx.send(5);
        {
            const auto value = co_await rx.receive();
            CHECK(value == 5);
        }
    });
    CHECK_MISUSE(limiter_acquire, "CapacityLimiter", wrong_thread, wrong_thread_fix);
    CHECK_MISUSE(limiter_release, "CapacityLimiter", wrong_thread, wrong_thread_fix);
    CHECK_MISUSE(limiter_resize, "CapacityLimiter", wrong_thread, wrong_thread_fix);
    CHECK_MISUSE(lock_acquire, "Lock", wrong_thread, wrong_thread_fix);
    CHECK_MISUSE(lock_release, "Lock", wrong_thread, wrong_thread_fix);
    CHECK_MISUSE(stream_send, "MemoryObjectSendStream", wrong_thread, wrong_thread_fix);
    CHECK_MISUSE(stream_receive, "MemoryObjectReceiveStream", wrong_thread, wrong_thread_fix);
}

// ---------------------------------------------------------------------------------------------
// Limiter and lock accounting
// ---------------------------------------------------------------------------------------------

TEST_CASE("A negative token total throws std::invalid_argument and leaves the total as it was",
          "[misuse]") {
    CHECK_MISUSE(catch_sync<std::invalid_argument>([] { anyio::CapacityLimiter limiter(-1); }),
                 "total_tokens must be >= 0");
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(3);
        CHECK_MISUSE(catch_sync<std::invalid_argument>([&] { limiter.set_total_tokens(-5); }),
                     "total_tokens must be >= 0");
        CHECK(limiter.total_tokens() == 3);
        anyio::CapacityLimiter& default_limiter = anyio::to_thread::current_default_thread_limiter();
        CHECK_MISUSE(catch_sync<std::invalid_argument>([&] { default_limiter.set_total_tokens(-1); }),
                     "total_tokens must be >= 0");
        CHECK(default_limiter.total_tokens() == 40);
        {
            const auto value = co_await run_sync([] { return 6; });
            CHECK(value == 6);
        }  // the default limiter still lends
        CHECK(default_limiter.borrowed_tokens() == 0);
        CHECK_MISUSE(catch_sync<std::invalid_argument>([] { anyio::Semaphore semaphore(-1); }),
                     "initial_value must be >= 0");
    });
}

TEST_CASE("Acquiring a limiter token or a lock twice throws std::runtime_error and keeps the "
          "one already held",
          "[misuse]") {
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(5);
        limiter.acquire_nowait();
        CHECK_MISUSE(catch_sync<std::runtime_error>([&] { limiter.acquire_nowait(); }),
                     "already holding one of this CapacityLimiter's tokens", "release it before acquiring again");
        {
            const Caught caught = co_await catch_async<std::runtime_error>([&]() -> anyio::Task<> {
                         co_await limiter.acquire();
                     }());
            CHECK_MISUSE(caught, "already holding one of this CapacityLimiter's tokens");
        }
        const int borrower = 0;
        limiter.acquire_on_behalf_of_nowait(&borrower);
        CHECK_MISUSE(catch_sync<std::runtime_error>([&] { limiter.acquire_on_behalf_of_nowait(&borrower); }),
                     "already holding");
        CHECK(limiter.borrowed_tokens() == 2);
        CHECK(limiter.statistics().tasks_waiting == 0);
        limiter.release();
        limiter.release_on_behalf_of(&borrower);
        CHECK(limiter.borrowed_tokens() == 0);

        anyio::Lock lock;
        co_await lock.acquire();
        {
            const Caught caught = co_await catch_async<std::runtime_error>([&]() -> anyio::Task<> {
                         co_await lock.acquire();
                     }());
            CHECK_MISUSE(caught, "Attempted to acquire an already held Lock");
        }
        CHECK_MISUSE(catch_sync<std::runtime_error>([&] { lock.acquire_nowait(); }),
                     "Attempted to acquire an already held Lock");
        CHECK(lock.locked());
        CHECK(lock.statistics().tasks_waiting == 0);
        lock.release();
        CHECK_FALSE(lock.locked());
        co_await lock.acquire();  // and it can be taken again
        lock.release();
    });
}

TEST_CASE("Releasing a limiter token or a lock that is not held throws std::runtime_error and "
          "changes nothing",
          "[misuse]") {
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        CHECK_MISUSE(catch_sync<std::runtime_error>([&] { limiter.release(); }),
                     "does not hold any of this CapacityLimiter's tokens", "release only what was acquired");
        const int stranger = 0;
        CHECK_MISUSE(catch_sync<std::runtime_error>([&] { limiter.release_on_behalf_of(&stranger); }),
                     "does not hold any");
        CHECK(limiter.borrowed_tokens() == 0);
        CHECK(limiter.available_tokens() == 2);
        // Someone else's token is not released either.
        anyio::Event holding, done;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto guard = co_await limiter.scoped();
                holding.set();
                co_await done.wait();
            });
            co_await holding.wait();
            CHECK_MISUSE(catch_sync<std::runtime_error>([&] { limiter.release(); }), "does not hold any");
            CHECK(limiter.borrowed_tokens() == 1);
            done.set();
        });
        CHECK(limiter.borrowed_tokens() == 0);

        anyio::Lock lock;
        CHECK_MISUSE(catch_sync<std::runtime_error>([&] { lock.release(); }),
                     "The current task is not holding this lock");
        CHECK_FALSE(lock.locked());
    });
}

// ---------------------------------------------------------------------------------------------
// from_thread and call_soon_threadsafe in the wrong place or at the wrong time
// ---------------------------------------------------------------------------------------------

TEST_CASE("from_thread on the loop thread throws std::logic_error at once and runs nothing",
          "[misuse]") {
    int ran = 0;
    run_loop([&]() -> anyio::Task<> {
        CHECK_MISUSE(catch_sync<std::logic_error>([&] { anyio::from_thread::run_sync([&] { ++ran; }); }),
                     "was called on the event loop's own thread", "co_await the work directly");
        const anyio::LoopToken token = anyio::lowlevel::current_token();
        CHECK_MISUSE(catch_sync<std::logic_error>([&] { anyio::from_thread::run_sync(token, [&] { ++ran; }); }),
                     "was called on the event loop's own thread");
        CHECK_MISUSE(catch_sync<std::logic_error>([&] {
                         (void)anyio::from_thread::run(token, [&]() -> anyio::Task<int> {
                             ++ran;
                             co_return 1;
                         });
                     }),
                     "was called on the event loop's own thread");
        CHECK_MISUSE(catch_sync<std::logic_error>([&] { anyio::from_thread::check_cancelled(); }),
                     "was called on the event loop's own thread");
        co_await settle();
        {
            const auto value = co_await run_sync([] { return 2; });
            CHECK(value == 2);
        }  // the loop goes on
    });
    CHECK(ran == 0);
}

TEST_CASE("from_thread on a foreign thread without a token throws NoEventLoopError and runs "
          "nothing",
          "[misuse]") {
    int ran = 0;
    Caught sync_call, async_call, check;
    run_loop([&]() -> anyio::Task<> {
        std::thread foreign([&] {
            sync_call = catch_sync<anyio::NoEventLoopError>([&] { anyio::from_thread::run_sync([&] { ++ran; }); });
            async_call = catch_sync<anyio::NoEventLoopError>([&] {
                (void)anyio::from_thread::run([&]() -> anyio::Task<int> {
                    ++ran;
                    co_return 1;
                });
            });
            check = catch_sync<anyio::NoEventLoopError>([] { anyio::from_thread::check_cancelled(); });
        });
        co_await run_sync([&] { foreign.join(); });
        // With the loop's token the same thread gets through.
        const anyio::LoopToken token = anyio::lowlevel::current_token();
        int with_token = 0;
        std::thread helped([&] { with_token = anyio::from_thread::run_sync(token, [] { return 3; }); });
        co_await run_sync([&] { helped.join(); });
        CHECK(with_token == 3);
    });
    CHECK(ran == 0);
    CHECK_MISUSE(sync_call, "not an anyio worker thread", "pass a LoopToken");
    CHECK_MISUSE(async_call, "not an anyio worker thread", "pass a LoopToken");
    CHECK_MISUSE(check, "not an anyio worker thread");
    // An empty token is no better.
    CHECK_MISUSE(catch_sync<anyio::NoEventLoopError>([] {
                     anyio::from_thread::run_sync(anyio::LoopToken{}, [] {});
                 }),
                 "the LoopToken is empty", "current_token()");
}

TEST_CASE("call_soon_threadsafe and from_thread after the loop ended throw RunFinishedError and "
          "free the callback without running it",
          "[misuse]") {
    anyio::LoopToken token;
    anyio::run([&]() -> anyio::Task<> {
        token = anyio::lowlevel::current_token();
        co_return;
    }());
    REQUIRE(token.finished());
    auto captured = std::make_shared<int>(0);
    Caught from_here, from_foreign, sync_call;
    from_here = catch_sync<anyio::RunFinishedError>([&] { token.call_soon_threadsafe([captured] { ++*captured; }); });
    std::thread foreign([&] {
        from_foreign = catch_sync<anyio::RunFinishedError>([&] {
            token.call_soon_threadsafe([captured] { ++*captured; });
        });
        sync_call = catch_sync<anyio::RunFinishedError>([&] {
            anyio::from_thread::run_sync(token, [captured] { ++*captured; });
        });
    });
    foreign.join();
    CHECK_MISUSE(from_here, "the event loop has already finished", "keep the loop running");
    CHECK_MISUSE(from_foreign, "the event loop has already finished");
    CHECK_MISUSE(sync_call, "the event loop has already finished");
    CHECK(*captured == 0);
    CHECK(captured.use_count() == 1);  // every callback (and its copy of the pointer) is gone

    // An EventLoop built directly says the same once its run() has finished.
    anyio::EventLoop loop;
    loop.run([]() -> anyio::Task<> { co_return; }());
    CHECK_MISUSE(catch_sync<anyio::RunFinishedError>([&] { loop.call_soon_threadsafe([captured] { ++*captured; }); }),
                 "already finished");
    CHECK(captured.use_count() == 1);
}

// ---------------------------------------------------------------------------------------------
// Tasks and loops
// ---------------------------------------------------------------------------------------------

namespace {
anyio::Task<int> forty_two(int* runs) {
    ++*runs;
    co_await anyio::checkpoint();
    co_return 42;
}
}  // namespace

TEST_CASE("A Task awaited twice, or after being moved from, throws std::logic_error and does "
          "not run the coroutine again",
          "[misuse]") {
    int runs = 0;
    run_loop([&]() -> anyio::Task<> {
        anyio::Task<int> task = forty_two(&runs);
        {
            const auto value = co_await std::move(task);
            CHECK(value == 42);
        }
        Caught twice;
        try {
            (void)co_await std::move(task);
        } catch (const std::logic_error& error) {
            twice = {true, true, error.what()};
        }
        CHECK_MISUSE(twice, "already awaited task", "can be awaited once");

        anyio::Task<int> original = forty_two(&runs);
        anyio::Task<int> moved = std::move(original);
        Caught moved_from;
        try {
            (void)co_await std::move(original);  // NOLINT(bugprone-use-after-move): the misuse
        } catch (const std::logic_error& error) {
            moved_from = {true, true, error.what()};
        }
        CHECK_MISUSE(moved_from, "empty or already awaited task");
        {
            const auto value = co_await std::move(moved);
            CHECK(value == 42);
        }  // the task it moved to is intact
    });
    CHECK(runs == 2);
}

TEST_CASE("anyio::run nested in a running loop throws std::logic_error and the outer loop goes on",
          "[misuse]") {
    int inner_ran = 0;
    run_loop([&]() -> anyio::Task<> {
        CHECK_MISUSE(catch_sync<std::logic_error>([&] {
                         anyio::run([&]() -> anyio::Task<> {
                             ++inner_ran;
                             co_return;
                         }());
                     }),
                     "this thread is already running an event loop", "co_await the task instead");
        co_await anyio::sleep(1ms);
        {
            const auto value = co_await run_sync([] { return 1; });
            CHECK(value == 1);
        }
        CHECK(anyio::EventLoop::current() != nullptr);
    });
    CHECK(inner_ran == 0);
    // And the thread can run a loop again afterwards.
    CHECK(anyio::run([]() -> anyio::Task<int> { co_return 9; }()) == 9);
}

TEST_CASE("A BlockingPortal used after stop throws RunFinishedError; stopping again is harmless",
          "[misuse]") {
    auto portal = anyio::start_blocking_portal();
    CHECK(portal.call(add_on_loop, 1, 2, nullptr) == 3);
    portal.stop();
    CHECK_MISUSE(catch_sync<anyio::RunFinishedError>([&] { (void)portal.call(add_on_loop, 1, 2, nullptr); }),
                 "BlockingPortal::call", "the portal has been stopped", "start a new one");
    CHECK_MISUSE(catch_sync<anyio::RunFinishedError>([&] { (void)portal.start_task_soon(add_on_loop, 1, 2, nullptr); }),
                 "BlockingPortal::start_task_soon", "the portal has been stopped");
    portal.stop();  // idempotent
    portal.stop(true);
    auto fresh = anyio::start_blocking_portal();  // a new one works
    CHECK(fresh.call(add_on_loop, 2, 2, nullptr) == 4);
}

// ---------------------------------------------------------------------------------------------
// Streams and sockets
// ---------------------------------------------------------------------------------------------

TEST_CASE("Sending on a closed memory object stream throws ClosedResourceError, on one whose "
          "receivers are gone BrokenResourceError; no item is delivered or leaked",
          "[misuse]") {
    run_loop([&]() -> anyio::Task<> {
        auto [send_end, receive_end] = anyio::create_memory_object_stream<std::shared_ptr<int>>(4);
        auto& tx = send_end;  // clang 14 cannot capture a structured binding
        auto& rx = receive_end;
        auto other = tx.clone();
        auto item = std::make_shared<int>(1);
        tx.close();
        CHECK_MISUSE(catch_sync<anyio::ClosedResourceError>([&] { tx.send_nowait(item); }),
                     "this resource has been closed", "do not use it after close()");
        {
            const Caught caught = co_await catch_async<anyio::ClosedResourceError>([&]() -> anyio::Task<> {
                         co_await tx.send(item);
                     }());
            CHECK_MISUSE(caught, "this resource has been closed");
        }
        CHECK(item.use_count() == 1);
        CHECK(rx.statistics().current_buffer_used == 0);
        CHECK(rx.statistics().open_send_streams == 1);
        // The clone still sends.
        co_await other.send(item);
        {
            const auto value = co_await rx.receive();
            CHECK(*value == 1);
        }
        rx.close();
        {
            const Caught caught = co_await catch_async<anyio::BrokenResourceError>([&]() -> anyio::Task<> {
                         co_await other.send(item);
                     }());
            CHECK_MISUSE(caught, "the other side of this resource is gone");
        }
        CHECK(item.use_count() == 1);
    });
}

TEST_CASE("Sending on a closed socket, or after send_eof, throws ClosedResourceError; two "
          "readers on one socket: the second gets BusyResourceError and the first still reads",
          "[misuse]") {
    run_loop([&]() -> anyio::Task<> {
        int fds[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
        anyio::SocketStream a = anyio::SocketStream::from_fd(fds[0]);
        anyio::SocketStream b = anyio::SocketStream::from_fd(fds[1]);

        // Two readers on b.
        std::string first_got;
        Caught second;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { first_got = co_await b.receive(); });
            co_await settle();
            second = co_await catch_async<anyio::BusyResourceError>([&]() -> anyio::Task<> {
                (void)co_await b.receive();
            }());
            co_await a.send(std::string_view("still mine"));
        });
        CHECK_MISUSE(second, "Another task is already reading from this resource", "only one task may do so");
        CHECK(first_got == "still mine");

        co_await a.send_eof();
        {
            const Caught caught = co_await catch_async<anyio::ClosedResourceError>([&]() -> anyio::Task<> {
                         co_await a.send(std::string_view("after eof"));
                     }());
            CHECK_MISUSE(caught, "SocketStream::send after send_eof()", "send everything before send_eof()");
        }
        {
            const Caught caught = co_await catch_async<anyio::EndOfStream>([&]() -> anyio::Task<> {
                         (void)co_await b.receive();
                     }());
            CHECK_MISUSE(caught, "the stream has ended");
        }
        // b can still send to a.
        co_await b.send(std::string_view("back"));
        {
            const auto value = co_await a.receive();
            CHECK(value == "back");
        }
        b.close();
        {
            const Caught caught = co_await catch_async<anyio::ClosedResourceError>([&]() -> anyio::Task<> {
                         co_await b.send(std::string_view("after close"));
                     }());
            CHECK_MISUSE(caught, "SocketStream::send", "has been closed", "do not use it after close()");
        }
        {
            const Caught caught = co_await catch_async<anyio::ClosedResourceError>([&]() -> anyio::Task<> {
                         (void)co_await b.receive();
                     }());
            CHECK_MISUSE(caught, "SocketStream::receive", "has been closed");
        }
    });
}
