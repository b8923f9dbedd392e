// Allocation failure (issue 15, "Faults"): a test operator new that throws std::bad_alloc on
// the Nth call from now, armed on one thread only, around spawn, run_sync with
// abandon_on_cancel, call_soon_threadsafe and memory object stream sends. For every N until
// the operation no longer allocates that many times, the caller gets std::bad_alloc (or the
// operation succeeds, if the failed allocation was one it could do without), and no state is
// corrupted: nothing half-started runs, every object handed in is destroyed exactly once,
// limiters and streams add up, and the same operation succeeds right after.
//
// This file is its own executable (tests/CMakeLists.txt builds one per *_test.cpp) because
// the replacement operator new is global. Where the runtime's operator new cannot be replaced
// (clang's ThreadSanitizer links its own statically), or the replacement is not the one called,
// each case says so and is skipped; a probe at the start of every case decides.
#include <anyio/anyio.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

// ---------------------------------------------------------------------------------------------
// The failing operator new
// ---------------------------------------------------------------------------------------------

#if defined(__clang__) && defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ANYIO_ALLOC_TEST_REPLACES_NEW 0  // the runtime's own operator new is linked in whole
#endif
#endif
#ifndef ANYIO_ALLOC_TEST_REPLACES_NEW
#define ANYIO_ALLOC_TEST_REPLACES_NEW 1
#endif

namespace {

// Per thread: 0 = off; n > 0: the nth allocation from now on this thread fails (then off).
// Thread-local so that a worker thread's allocations never count against the loop's.
thread_local long allocation_countdown = 0;
std::atomic<long> failed_allocations{0};

[[maybe_unused]] void* allocate(std::size_t size) {  // unused where new is not replaced
    if (allocation_countdown > 0 && --allocation_countdown == 0) {
        failed_allocations.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
        return nullptr;
    }
    return std::malloc(size == 0 ? 1 : size);
}

}  // namespace

#if ANYIO_ALLOC_TEST_REPLACES_NEW
// Not inlined: g++ -O2 would inline free() into callers of operator delete and then warn
// (-Wmismatched-new-delete) that memory from operator new is passed to free().
[[gnu::noinline]] void* operator new(std::size_t size) {
    if (void* p = allocate(size)) return p;
    throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new[](std::size_t size) {
    if (void* p = allocate(size)) return p;
    throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return allocate(size); }
[[gnu::noinline]] void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return allocate(size); }
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;
using anyio::to_thread::run_sync;

// Makes the nth allocation from now on this thread fail; disarm() turns it off again and says
// whether it fired.
void arm(long n) { allocation_countdown = n; }
bool disarm() {
    const bool fired = allocation_countdown == 0;
    allocation_countdown = 0;
    return fired;
}

// Whether this build calls the operator new above (a sanitizer runtime may keep its own).
bool replacement_works() {
#if ANYIO_ALLOC_TEST_REPLACES_NEW
    arm(1);
    bool threw = false;
    try {
        // A call of the function itself, not a new-expression: the optimizer may leave out a
        // new-expression whose result is unused, but not this.
        void* volatile probe = ::operator new(16);
        ::operator delete(probe);
    } catch (const std::bad_alloc&) {
        threw = true;
    }
    disarm();
    return threw;
#else
    return false;
#endif
}

#define SKIP_UNLESS_NEW_CAN_FAIL()                                                           \
    do {                                                                                     \
        if (!replacement_works()) {                                                          \
            WARN("skipped: this build does not call the test's operator new (clang's TSan links its own)"); \
            return;                                                                          \
        }                                                                                    \
    } while (false)

// Counts its live instances: an object handed to an operation that failed must be destroyed
// exactly once, like one handed to an operation that succeeded.
struct Tracked {
    static inline std::atomic<int> alive{0};
    explicit Tracked(int value) : value(value) { alive.fetch_add(1, std::memory_order_relaxed); }  // relaxed: a counter
    Tracked(const Tracked& other) : value(other.value) { alive.fetch_add(1, std::memory_order_relaxed); }
    Tracked(Tracked&& other) noexcept : value(other.value) { alive.fetch_add(1, std::memory_order_relaxed); }
    Tracked& operator=(const Tracked&) = delete;
    ~Tracked() { alive.fetch_sub(1, std::memory_order_relaxed); }
    int value;
};

// The most allocations any one operation below is tried with (each N from 1 up to here, or
// until the operation no longer reaches its Nth allocation).
constexpr long max_attempts = 64;

struct Tally {
    long attempts = 0;     // N tried
    long bad_allocs = 0;   // the caller got std::bad_alloc
    long successes = 0;    // the operation went through although an allocation failed
    bool exhausted = false;  // a run whose Nth allocation never came: every N was tried
};

anyio::Task<> child(int* ran, Tracked token) {
    (void)token;
    ++*ran;
    co_await anyio::checkpoint();
}

}  // namespace

TEST_CASE("An allocation failing while spawning a task or starting a child gives the caller "
          "std::bad_alloc and starts nothing",
          "[stress][faults][alloc]") {
    SKIP_UNLESS_NEW_CAN_FAIL();
    Tally spawn, start_soon;
    int ran = 0;
    int expected_runs = 0;
    run_loop([&]() -> anyio::Task<> {
        // EventLoop::spawn of a task made beforehand.
        for (long n = 1; n <= max_attempts && !spawn.exhausted; ++n) {
            anyio::Task<> task = child(&ran, Tracked(1));
            ++spawn.attempts;
            arm(n);
            try {
                anyio::EventLoop::current()->spawn(std::move(task));
                ++expected_runs;
                if (disarm()) ++spawn.successes; else spawn.exhausted = true;
            } catch (const std::bad_alloc&) {
                disarm();
                ++spawn.bad_allocs;
            }
            co_await settle();
        }
        // TaskGroup::start_soon(fn, args): the frame itself is allocated inside.
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (long n = 1; n <= max_attempts && !start_soon.exhausted; ++n) {
                ++start_soon.attempts;
                const Tracked argument(2);
                arm(n);
                try {
                    tg.start_soon(child, &ran, argument);
                    ++expected_runs;
                    if (disarm()) ++start_soon.successes; else start_soon.exhausted = true;
                } catch (const std::bad_alloc&) {
                    disarm();
                    ++start_soon.bad_allocs;
                }
                co_await settle();
            }
            tg.start_soon(child, &ran, Tracked(3));  // the group still starts children
            ++expected_runs;
            co_return;
        });
    });
    WARN("spawn: " << spawn.bad_allocs << " bad_alloc of " << spawn.attempts << " tries; start_soon: "
                   << start_soon.bad_allocs << " of " << start_soon.attempts);
    CHECK(spawn.exhausted);
    CHECK(start_soon.exhausted);
    CHECK(spawn.bad_allocs > 0);
    CHECK(start_soon.bad_allocs > 0);
    CHECK(ran == expected_runs);  // what started ran once; what failed never ran
    CHECK(Tracked::alive.load() == 0);
}

TEST_CASE("An allocation failing in run_sync with abandon_on_cancel gives the caller "
          "std::bad_alloc, runs nothing and returns the token",
          "[stress][faults][alloc][to_thread]") {
    SKIP_UNLESS_NEW_CAN_FAIL();
    // Reused workers, and (max_idle_time 0) a new thread for every call.
    for (const bool new_thread_each_time : {false, true}) {
        INFO("new thread each time: " << new_thread_each_time);
        Tally tally;
        std::atomic<int> ran{0};
        int returned = 0;
        std::int64_t borrowed_left = -1;
        std::size_t waiting_left = 1;
        int after = 0;
        anyio::EventLoop::Options options;
        if (new_thread_each_time) options.max_idle_time = 0s;
        run_loop(
            [&]() -> anyio::Task<> {
                anyio::CapacityLimiter limiter(1);
                for (long n = 1; n <= max_attempts && !tally.exhausted; ++n) {
                    ++tally.attempts;
                    const Tracked argument(4);
                    arm(n);
                    try {
                        const int value = co_await run_sync(
                            {.limiter = &limiter, .abandon_on_cancel = true},
                            [&ran](const Tracked& t) {
                                ran.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
                                return t.value;
                            },
                            argument);
                        if (value == 4) ++returned;
                        if (disarm()) ++tally.successes; else tally.exhausted = true;
                    } catch (const std::bad_alloc&) {
                        disarm();
                        ++tally.bad_allocs;
                    }
                    if (limiter.borrowed_tokens() != 0) break;  // checked below
                }
                borrowed_left = limiter.borrowed_tokens();
                waiting_left = limiter.statistics().tasks_waiting;
                for (int i = 0; i < 20; ++i) after += co_await run_sync({.limiter = &limiter}, [] { return 1; });
            },
            options);
        WARN("run_sync (abandon_on_cancel" << (new_thread_each_time ? ", a new thread each call" : "")
                                           << "): " << tally.bad_allocs << " bad_alloc of " << tally.attempts
                                           << " tries");
        CHECK(tally.exhausted);
        CHECK(tally.bad_allocs > 0);
        CHECK(borrowed_left == 0);
        CHECK(waiting_left == 0);
        // fn ran exactly for the calls that returned: never for one that failed.
        CHECK(ran.load() == returned);
        CHECK(returned == tally.successes + 1);
        CHECK(after == 20);
        CHECK(Tracked::alive.load() == 0);
    }
}

TEST_CASE("An allocation failing in call_soon_threadsafe gives the caller std::bad_alloc, runs "
          "nothing, and the loop still takes callbacks",
          "[stress][faults][alloc]") {
    SKIP_UNLESS_NEW_CAN_FAIL();
    Tally on_loop, foreign;
    int ran = 0;
    int expected_runs = 0;
    run_loop([&]() -> anyio::Task<> {
        const anyio::LoopToken token = anyio::lowlevel::current_token();
        // From the loop thread.
        for (long n = 1; n <= max_attempts && !on_loop.exhausted; ++n) {
            ++on_loop.attempts;
            auto captured = std::make_shared<Tracked>(5);
            arm(n);
            try {
                token.call_soon_threadsafe([&ran, captured] { ran += captured->value == 5 ? 1 : 100; });
                ++expected_runs;
                if (disarm()) ++on_loop.successes; else on_loop.exhausted = true;
            } catch (const std::bad_alloc&) {
                disarm();
                ++on_loop.bad_allocs;
            }
            captured.reset();
            co_await settle();
        }
        // From a plain thread, with the loop waiting (sleeping in epoll) meanwhile.
        std::atomic<int> posted{0};
        std::thread thread([&] {
            for (long n = 1; n <= max_attempts && !foreign.exhausted; ++n) {
                ++foreign.attempts;
                auto captured = std::make_shared<Tracked>(5);
                arm(n);
                try {
                    token.call_soon_threadsafe([&ran, captured] { ran += captured->value == 5 ? 1 : 100; });
                    posted.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
                    if (disarm()) ++foreign.successes; else foreign.exhausted = true;
                } catch (const std::bad_alloc&) {
                    disarm();
                    ++foreign.bad_allocs;
                }
            }
        });
        co_await run_sync([&thread] { thread.join(); });
        expected_runs += posted.load(std::memory_order_relaxed);
        co_await settle();
        // A callback posted after all those failures runs.
        anyio::Event last;
        token.call_soon_threadsafe([&last] { last.set(); });
        co_await last.wait();
    });
    WARN("call_soon_threadsafe: " << on_loop.bad_allocs << " bad_alloc of " << on_loop.attempts
                                  << " tries on the loop thread, " << foreign.bad_allocs << " of "
                                  << foreign.attempts << " from a plain thread");
    CHECK(on_loop.exhausted);
    CHECK(foreign.exhausted);
    CHECK(on_loop.bad_allocs > 0);
    CHECK(foreign.bad_allocs > 0);
    CHECK(ran == expected_runs);
    CHECK(Tracked::alive.load() == 0);
}

TEST_CASE("An allocation failing in a memory object stream send gives the sender std::bad_alloc; "
          "the item is not delivered, and every other item arrives once, in order",
          "[stress][faults][alloc][streams]") {
    SKIP_UNLESS_NEW_CAN_FAIL();
    Tally nowait, waiting;
    std::vector<int> received;
    std::vector<int> sent;
    std::size_t buffered_left = 1;
    run_loop([&]() -> anyio::Task<> {
        // Unbounded: the buffer grows, so sends allocate; items are copied in (they allocate too).
        auto [send_end, receive_end] = anyio::create_memory_object_stream<std::vector<Tracked>>(anyio::unbounded);
        auto& tx = send_end;  // clang 14 cannot capture a structured binding
        auto& rx = receive_end;
        int next = 0;
        // Room for every item up front: the receiver may run while an allocation is armed.
        received.reserve(4 * max_attempts);
        sent.reserve(4 * max_attempts);
        for (long n = 1; n <= max_attempts && !nowait.exhausted; ++n) {
            ++nowait.attempts;
            const std::vector<Tracked> item(3, Tracked(next));
            arm(n);
            try {
                tx.send_nowait(item);
                const bool fired = disarm();
                sent.push_back(next);
                if (fired) ++nowait.successes; else nowait.exhausted = true;
            } catch (const std::bad_alloc&) {
                disarm();
                ++nowait.bad_allocs;
            }
            ++next;
        }
        // A waiting send: a receiver is parked, so the item is handed over directly.
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                while (auto item = co_await rx.next()) received.push_back(item->front().value);
            });
            co_await settle();
            for (long n = 1; n <= max_attempts && !waiting.exhausted; ++n) {
                ++waiting.attempts;
                const std::vector<Tracked> item(3, Tracked(next));
                arm(n);
                try {
                    co_await tx.send(item);
                    const bool fired = disarm();
                    sent.push_back(next);
                    if (fired) ++waiting.successes; else waiting.exhausted = true;
                } catch (const std::bad_alloc&) {
                    disarm();
                    ++waiting.bad_allocs;
                }
                ++next;
                co_await settle();
            }
            buffered_left = tx.statistics().current_buffer_used;
            tx.close();
        });
    });
    WARN("stream sends: " << nowait.bad_allocs << " bad_alloc of " << nowait.attempts << " send_nowait, "
                          << waiting.bad_allocs << " of " << waiting.attempts << " send");
    CHECK(nowait.exhausted);
    CHECK(waiting.exhausted);
    CHECK(nowait.bad_allocs > 0);
    CHECK(waiting.bad_allocs > 0);
    CHECK(received == sent);  // exactly the sends that returned, once each, in order
    CHECK(buffered_left == 0);
    CHECK(Tracked::alive.load() == 0);
}
