#include <anyio/memory_stream.hpp>

#include <anyio/blocking_portal.hpp>
#include <anyio/cancel_scope.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/from_thread.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <future>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

// Tests for include/anyio/memory_stream.hpp: create_memory_object_stream and its two ends,
// with anyio's errors and trio's close semantics, the no-loss/no-duplication rules under
// cancellation, item moves, and pushing items from worker and plain threads.
//
// g++ 12 runs a co_await written inside a Catch assertion (CHECK(co_await x == 1)) twice
// when it suspends (clang++ does not), so results are awaited into variables first.
//
// clang 14 cannot capture structured bindings in lambdas, so the tests name the two ends
// with references (`auto& tx = streams.first;`) instead of `auto [tx, rx] = ...`.

// ---------------------------------------------------------------------------------------------
// Heap allocations of this program, to show that steady-state sends and receives allocate
// nothing (see event_test.cpp for why every non-aligned form is replaced, and why the count
// is off under ThreadSanitizer).
// ---------------------------------------------------------------------------------------------
#if defined(__SANITIZE_THREAD__)
#define ANYIO_TEST_NO_ALLOCATION_COUNT 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ANYIO_TEST_NO_ALLOCATION_COUNT 1
#endif
#endif

#if !defined(ANYIO_TEST_NO_ALLOCATION_COUNT)
namespace {
std::atomic<long long> allocation_count{0};

void* counted_allocate(std::size_t size) noexcept {
    // Relaxed: a statistic read by the test's own thread after the work it counts.
    allocation_count.fetch_add(1, std::memory_order_relaxed);
    return std::malloc(size == 0 ? 1 : size);
}
}  // namespace

void* operator new(std::size_t size) {
    void* p = counted_allocate(size);
    if (p == nullptr) throw std::bad_alloc();
    return p;
}
void* operator new[](std::size_t size) {
    void* p = counted_allocate(size);
    if (p == nullptr) throw std::bad_alloc();
    return p;
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
    return counted_allocate(size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
    return counted_allocate(size);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif

using namespace anyio_test;

namespace {

template <class T>
using Streams = std::pair<anyio::MemoryObjectSendStream<T>, anyio::MemoryObjectReceiveStream<T>>;

// Counts copies, moves and live objects, to show the stream moves items and destroys them.
struct Counted {
    static inline int copies = 0;
    static inline int moves = 0;
    static inline int live = 0;
    static void reset() { copies = moves = live = 0; }

    int value;
    explicit Counted(int v) : value(v) { ++live; }
    Counted(const Counted& other) : value(other.value) {
        ++copies;
        ++live;
    }
    Counted(Counted&& other) noexcept : value(other.value) {
        ++moves;
        ++live;
    }
    Counted& operator=(const Counted&) = delete;
    Counted& operator=(Counted&&) = delete;
    ~Counted() { --live; }
};

// How `co_await awaitable` ended: "value", or the name of what it threw.
template <class Awaitable>
anyio::Task<std::string> outcome(Awaitable&& awaitable) {
    try {
        if constexpr (anyio::detail::is_task_v<std::remove_cvref_t<Awaitable>>) {
            co_await std::move(awaitable);  // awaiting consumes a Task
        } else {
            co_await awaitable;  // as an lvalue: the awaiters are neither copyable nor movable
        }
        co_return "value";
    } catch (const anyio::WouldBlock&) {
        co_return "WouldBlock";
    } catch (const anyio::EndOfStream&) {
        co_return "EndOfStream";
    } catch (const anyio::ClosedResourceError&) {
        co_return "ClosedResourceError";
    } catch (const anyio::BrokenResourceError&) {
        co_return "BrokenResourceError";
    } catch (const anyio::Cancelled&) {
        co_return "Cancelled";
    }
}

// How `fn()` ended, for the non-blocking forms.
template <class F>
std::string outcome_now(F&& fn) {
    try {
        std::forward<F>(fn)();
        return "value";
    } catch (const anyio::WouldBlock&) {
        return "WouldBlock";
    } catch (const anyio::EndOfStream&) {
        return "EndOfStream";
    } catch (const anyio::ClosedResourceError&) {
        return "ClosedResourceError";
    } catch (const anyio::BrokenResourceError&) {
        return "BrokenResourceError";
    }
}

bool contains(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

}  // namespace

// =============================================================================================
// Buffering: rendezvous, bounded, unbounded
// =============================================================================================

TEST_CASE("With buffer 0 a send completes only when a receiver takes the item", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        CHECK(outcome_now([&] { tx.send_nowait(1); }) == "WouldBlock");  // nobody receives
        bool sent = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await tx.send(1);
                sent = true;
            });
            co_await settle();
            CHECK_FALSE(sent);
            CHECK(tx.statistics().tasks_waiting_send == 1);
            CHECK(tx.statistics().current_buffer_used == 0);
            CHECK(rx.receive_nowait() == 1);  // straight from the waiting sender
            CHECK(tx.statistics().tasks_waiting_send == 0);
        });
        CHECK(sent);

        // A receiver waiting first: send_nowait hands the item straight to it.
        int received = 0;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { received = co_await rx.receive(); });
            co_await settle();
            CHECK(rx.statistics().tasks_waiting_receive == 1);
            tx.send_nowait(5);
            CHECK(rx.statistics().tasks_waiting_receive == 0);
            CHECK(rx.statistics().current_buffer_used == 0);
        });
        CHECK(received == 5);
    });
}

TEST_CASE("A bounded stream buffers up to max_buffer_size, then send waits", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(2);
        auto& tx = streams.first;
        auto& rx = streams.second;
        tx.send_nowait(1);
        co_await tx.send(2);
        CHECK(tx.statistics().current_buffer_used == 2);
        std::string message;
        try {
            tx.send_nowait(3);
        } catch (const anyio::WouldBlock& error) {
            message = error.what();
        }
        CHECK(contains(message, "buffer is full"));
        CHECK(contains(message, "co_await send()"));

        bool sent = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await tx.send(3);
                sent = true;
            });
            co_await settle();
            CHECK_FALSE(sent);
            CHECK(tx.statistics().tasks_waiting_send == 1);
            CHECK(rx.receive_nowait() == 1);  // the waiting sender's item moves into the buffer
            CHECK(tx.statistics().current_buffer_used == 2);
            CHECK(tx.statistics().tasks_waiting_send == 0);
        });
        CHECK(sent);
        auto result1 = co_await rx.receive();
        CHECK(result1 == 2);
        auto result2 = co_await rx.receive();
        CHECK(result2 == 3);
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "WouldBlock");
    });
}

TEST_CASE("An unbounded stream never makes a send wait", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(anyio::unbounded);
        auto& tx = streams.first;
        auto& rx = streams.second;
        CHECK(tx.statistics().max_buffer_size == anyio::unbounded);
        constexpr int count = 10000;
        for (int i = 0; i < count; ++i) {
            if (i % 2 == 0) {
                tx.send_nowait(i);
            } else {
                co_await tx.send(std::move(i));
            }
        }
        CHECK(rx.statistics().current_buffer_used == count);
        CHECK(rx.statistics().tasks_waiting_send == 0);
        for (int i = 0; i < count; ++i) {
            int value = (i % 2 == 0) ? rx.receive_nowait() : co_await rx.receive();
            if (value != i) {
                FAIL("item " << i << " arrived as " << value);
            }
        }
    });
}

TEST_CASE("The ring buffer keeps items in order while it wraps and grows", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<std::unique_ptr<int>>(64);
        auto& tx = streams.first;
        auto& rx = streams.second;
        int next_in = 0;
        int next_out = 0;
        bool in_order = true;
        std::mt19937 rng(7);
        for (int step = 0; step < 2000; ++step) {
            int pushes = static_cast<int>(rng() % 9);
            for (int i = 0; i < pushes && tx.statistics().current_buffer_used < 64; ++i) {
                tx.send_nowait(std::make_unique<int>(next_in++));
            }
            int pops = static_cast<int>(rng() % 8);
            for (int i = 0; i < pops && rx.statistics().current_buffer_used > 0; ++i) {
                if (*rx.receive_nowait() != next_out++) in_order = false;
            }
        }
        while (rx.statistics().current_buffer_used > 0) {
            if (*rx.receive_nowait() != next_out++) in_order = false;
        }
        CHECK(in_order);
        CHECK(next_out == next_in);
        CHECK(next_in > 1000);
        co_return;
    });
}

// =============================================================================================
// End of stream, clones, close
// =============================================================================================

TEST_CASE("receive_nowait throws WouldBlock while senders remain, EndOfStream once none do",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        std::string message;
        try {
            (void)rx.receive_nowait();
        } catch (const anyio::WouldBlock& error) {
            message = error.what();
        }
        CHECK(contains(message, "co_await receive()"));
        tx.send_nowait(1);
        tx.send_nowait(2);
        tx.close();
        // Items sent before the close are still delivered, then the stream ends.
        CHECK(rx.receive_nowait() == 1);
        auto result3 = co_await rx.receive();
        CHECK(result3 == 2);
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "EndOfStream");
        auto result4 = co_await outcome(rx.receive());
        CHECK(result4 == "EndOfStream");
        auto result5 = co_await outcome(rx.receive());  // and it stays ended
        CHECK(result5 == "EndOfStream");
    });
}

TEST_CASE("next() yields each item, then an empty optional at the end of the stream",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<std::string>(8);
        auto& tx = streams.first;
        auto& rx = streams.second;
        for (const char* word : {"a", "b", "c"}) tx.send_nowait(std::string(word));
        tx.close();
        std::vector<std::string> seen;
        while (auto item = co_await rx.next()) seen.push_back(std::move(*item));
        CHECK(seen == std::vector<std::string>{"a", "b", "c"});
        auto result6 = co_await rx.next();
        CHECK_FALSE(result6.has_value());
    });
}

TEST_CASE("clone() makes another handle; the stream ends once every send clone is closed",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto tx2 = tx.clone();
        auto rx2 = rx.clone();
        anyio::MemoryObjectStreamStatistics stats = tx.statistics();
        CHECK(stats.open_send_streams == 2);
        CHECK(stats.open_receive_streams == 2);
        tx2.send_nowait(1);
        CHECK(rx2.receive_nowait() == 1);  // clones share the items
        tx.close();
        CHECK(rx.statistics().open_send_streams == 1);
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "WouldBlock");  // tx2 is open
        tx2.send_nowait(2);
        tx2.close();
        CHECK(rx.receive_nowait() == 2);
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "EndOfStream");
        CHECK(outcome_now([&] { (void)rx2.receive_nowait(); }) == "EndOfStream");
        co_return;
    });
}

TEST_CASE("Using a handle after its own close() throws ClosedResourceError", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto tx2 = tx.clone();
        auto rx2 = rx.clone();
        tx.close();
        tx.close();  // idempotent
        rx.close();
        CHECK(outcome_now([&] { tx.send_nowait(1); }) == "ClosedResourceError");
        auto result7 = co_await outcome(tx.send(1));
        CHECK(result7 == "ClosedResourceError");
        CHECK(outcome_now([&] { (void)tx.clone(); }) == "ClosedResourceError");
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "ClosedResourceError");
        auto result8 = co_await outcome(rx.receive());
        CHECK(result8 == "ClosedResourceError");
        auto result9 = co_await outcome(rx.next());
        CHECK(result9 == "ClosedResourceError");
        CHECK(outcome_now([&] { (void)rx.clone(); }) == "ClosedResourceError");
        // The clones are still open and the statistics still readable.
        tx2.send_nowait(7);
        CHECK(rx2.receive_nowait() == 7);
        CHECK(tx.statistics().open_send_streams == 1);
        CHECK(tx.statistics().open_receive_streams == 1);
    });
}

TEST_CASE("Destroying a handle closes it", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        {
            auto tx2 = tx.clone();
            auto rx2 = rx.clone();
            CHECK(tx.statistics().open_send_streams == 2);
            CHECK(tx.statistics().open_receive_streams == 2);
        }
        CHECK(tx.statistics().open_send_streams == 1);
        CHECK(tx.statistics().open_receive_streams == 1);
        {
            auto gone = std::move(tx);
        }
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "EndOfStream");
        co_return;
    });
}

TEST_CASE("A moved-from handle throws ClosedResourceError; move assignment closes the old one",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto moved = std::move(tx);
        CHECK(outcome_now([&] { tx.send_nowait(1); }) == "ClosedResourceError");
        CHECK(outcome_now([&] { (void)tx.statistics(); }) == "ClosedResourceError");
        tx.close();  // nothing to close
        moved.send_nowait(1);
        CHECK(rx.receive_nowait() == 1);

        auto other = anyio::create_memory_object_stream<int>(4);
        CHECK(rx.statistics().open_send_streams == 1);
        moved = std::move(other.first);  // closes the handle `moved` had
        CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "EndOfStream");
        moved.send_nowait(2);
        CHECK(other.second.receive_nowait() == 2);
        co_return;
    });
}

TEST_CASE("Closing a handle wakes only the tasks blocked on that handle, with ClosedResourceError",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<std::unique_ptr<int>>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto tx2 = tx.clone();
        auto rx2 = rx.clone();
        std::vector<std::string> ends;
        auto first_item = std::make_unique<int>(1);
        auto second_item = std::make_unique<int>(2);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back("tx: " + co_await outcome(tx.send(std::move(first_item))));
            });
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back("tx2: " + co_await outcome(tx2.send(std::move(second_item))));
            });
            co_await settle();
            CHECK(tx.statistics().tasks_waiting_send == 2);
            tx.close();
            CHECK(tx.statistics().tasks_waiting_send == 1);  // only tx's sender left
            co_await settle();
            CHECK(ends == std::vector<std::string>{"tx: ClosedResourceError"});
            CHECK(first_item != nullptr);  // not delivered, still the caller's
            CHECK(*rx2.receive_nowait() == 2);
        });
        CHECK(ends == std::vector<std::string>{"tx: ClosedResourceError", "tx2: value"});

        // The same on the receive side.
        ends.clear();
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back("rx: " + co_await outcome(rx.receive()));
            });
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back("rx2: " + co_await outcome(rx2.receive()));
            });
            co_await settle();
            CHECK(rx.statistics().tasks_waiting_receive == 2);
            rx.close();
            CHECK(rx.statistics().tasks_waiting_receive == 1);
            co_await settle();
            CHECK(ends == std::vector<std::string>{"rx: ClosedResourceError"});
            tx2.send_nowait(std::make_unique<int>(3));
        });
        CHECK(ends == std::vector<std::string>{"rx: ClosedResourceError", "rx2: value"});
    });
}

TEST_CASE("When the last receive end closes, waiting senders get BrokenResourceError and "
          "buffered items are destroyed at once",
          "[stream]") {
    Counted::reset();
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<Counted>(2);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto rx2 = rx.clone();
        tx.send_nowait(Counted(1));
        tx.send_nowait(Counted(2));
        CHECK(Counted::live == 2);
        std::vector<std::string> ends;
        Counted third(3);
        Counted fourth(4);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back(co_await outcome(tx.send(std::move(third))));
            });
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back(co_await outcome(tx.send(std::move(fourth))));
            });
            co_await settle();
            CHECK(tx.statistics().tasks_waiting_send == 2);
            rx.close();
            CHECK(Counted::live == 4);  // rx2 is still open: nothing happens
            CHECK(tx.statistics().tasks_waiting_send == 2);
            rx2.close();
            CHECK(Counted::live == 2);  // the two buffered items died at once
            CHECK(tx.statistics().current_buffer_used == 0);
            CHECK(tx.statistics().tasks_waiting_send == 0);
        });
        CHECK(ends == std::vector<std::string>{"BrokenResourceError", "BrokenResourceError"});
        CHECK(third.value == 3);  // the waiting senders' items are still theirs
        CHECK(fourth.value == 4);
        CHECK(outcome_now([&] { tx.send_nowait(Counted(5)); }) == "BrokenResourceError");
        auto result10 = co_await outcome(tx.send(Counted(6)));
        CHECK(result10 == "BrokenResourceError");
    });
    CHECK(Counted::live == 0);
}

TEST_CASE("When the last send end closes, receivers already waiting get EndOfStream",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto tx2 = tx.clone();
        auto rx2 = rx.clone();
        std::vector<std::string> ends;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back(co_await outcome(rx.receive()));
            });
            tg.start_soon([&]() -> anyio::Task<> {
                ends.push_back(co_await outcome(rx2.receive()));
            });
            tg.start_soon([&]() -> anyio::Task<> {
                auto item = co_await rx.next();
                ends.push_back(item.has_value() ? "item" : "empty optional");
            });
            co_await settle();
            CHECK(rx.statistics().tasks_waiting_receive == 3);
            tx.close();
            CHECK(rx.statistics().tasks_waiting_receive == 3);  // tx2 is still open
            tx2.close();
            CHECK(rx.statistics().tasks_waiting_receive == 0);
        });
        CHECK(ends == std::vector<std::string>{"EndOfStream", "EndOfStream", "empty optional"});
    });
}

// =============================================================================================
// Items: move-only, moved not copied, untouched when a send fails
// =============================================================================================

TEST_CASE("Move-only items pass through every kind of buffer", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        for (std::size_t size :
             {std::size_t{0}, std::size_t{1}, std::size_t{64}, anyio::unbounded}) {
            auto streams = anyio::create_memory_object_stream<std::unique_ptr<int>>(size);
            auto& tx = streams.first;
            auto& rx = streams.second;
            std::vector<int> seen;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    for (int i = 0; i < 100; ++i) co_await tx.send(std::make_unique<int>(i));
                    tx.close();
                });
                while (auto item = co_await rx.next()) seen.push_back(**item);
            });
            CHECK(seen.size() == 100);
            CHECK(std::is_sorted(seen.begin(), seen.end()));
        }
    });
}

TEST_CASE("Items are moved through the stream, never copied", "[stream]") {
    Counted::reset();
    run_loop([]() -> anyio::Task<> {
        for (std::size_t size : {std::size_t{0}, std::size_t{2}}) {
            auto streams = anyio::create_memory_object_stream<Counted>(size);
            auto& tx = streams.first;
            auto& rx = streams.second;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                // Handed to a waiting receiver, taken from a waiting sender, buffered.
                tg.start_soon([&]() -> anyio::Task<> {
                    for (int i = 0; i < 10; ++i) co_await tx.send(Counted(i));
                    Counted last(10);
                    co_await tx.send(std::move(last));
                    tx.close();
                });
                int expected = 0;
                while (auto item = co_await rx.next()) CHECK(item->value == expected++);
                CHECK(expected == 11);
            });
        }
        CHECK(Counted::copies == 0);
        CHECK(Counted::moves > 0);

        // A const lvalue is copied once, when it is delivered, and stays the caller's.
        auto streams = anyio::create_memory_object_stream<Counted>(1);
        auto& tx = streams.first;
        auto& rx = streams.second;
        const Counted original(42);
        co_await tx.send(original);
        CHECK(Counted::copies == 1);
        CHECK(outcome_now([&] { tx.send_nowait(original); }) == "WouldBlock");
        CHECK(Counted::copies == 1);  // not delivered, not copied
        CHECK(rx.receive_nowait().value == 42);
        CHECK(original.value == 42);
    });
    CHECK(Counted::live == 0);
}

TEST_CASE("A send that fails leaves the item with the caller", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<std::unique_ptr<int>>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto item = std::make_unique<int>(1);
        CHECK(outcome_now([&] { tx.send_nowait(std::move(item)); }) == "WouldBlock");
        CHECK(item != nullptr);

        anyio::CancelScope scope;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    co_await tx.send(std::move(item));
                }());
            });
            co_await settle();
            scope.cancel();
        });
        CHECK(scope.cancelled_caught());
        CHECK(item != nullptr);

        auto tx2 = tx.clone();
        tx2.close();
        CHECK(outcome_now([&] { tx2.send_nowait(std::move(item)); }) == "ClosedResourceError");
        auto result11 = co_await outcome(tx2.send(std::move(item)));
        CHECK(result11 == "ClosedResourceError");
        CHECK(item != nullptr);

        rx.close();
        CHECK(outcome_now([&] { tx.send_nowait(std::move(item)); }) == "BrokenResourceError");
        auto result12 = co_await outcome(tx.send(std::move(item)));
        CHECK(result12 == "BrokenResourceError");
        CHECK(item != nullptr);
        CHECK(*item == 1);
    });
}

// =============================================================================================
// Cancellation
// =============================================================================================

TEST_CASE("send and receive are cancellation points even when they could complete at once",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(4);
        auto& tx = streams.first;
        auto& rx = streams.second;
        anyio::CancelScope scope;
        scope.cancel();
        co_await scope.run([&]() -> anyio::Task<> {
            auto result13 = co_await outcome(tx.send(1));
            CHECK(result13 == "Cancelled");
            CHECK(tx.statistics().current_buffer_used == 0);  // not sent
            tx.send_nowait(2);                                // the nowait forms are not
            auto result14 = co_await outcome(rx.receive());
            CHECK(result14 == "Cancelled");
            auto result15 = co_await outcome(rx.next());
            CHECK(result15 == "Cancelled");
            CHECK(rx.statistics().current_buffer_used == 1);  // not taken
        }());
        CHECK(rx.receive_nowait() == 2);
    });
}

TEST_CASE("A sender cancelled while waiting did not deliver its item", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        for (std::size_t size : {std::size_t{0}, std::size_t{1}}) {
            auto streams = anyio::create_memory_object_stream<int>(size);
            auto& tx = streams.first;
            auto& rx = streams.second;
            if (size == 1) tx.send_nowait(0);  // full
            anyio::CancelScope scope;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await scope.run([&]() -> anyio::Task<> { co_await tx.send(1); }());
                });
                co_await settle();
                CHECK(tx.statistics().tasks_waiting_send == 1);
                scope.cancel();
                CHECK(tx.statistics().tasks_waiting_send == 0);  // unlinked at once
            });
            CHECK(scope.cancelled_caught());
            if (size == 1) CHECK(rx.receive_nowait() == 0);
            CHECK(outcome_now([&] { (void)rx.receive_nowait(); }) == "WouldBlock");
        }
    });
}

TEST_CASE("A receiver cancelled while waiting takes nothing; the item goes to the next one",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        anyio::CancelScope scope;
        std::vector<std::string> got;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                got.push_back("first: " + co_await outcome(scope.run([&]() -> anyio::Task<> {
                                  got.push_back(std::to_string(co_await rx.receive()));
                              }())));
            });
            co_await settle();
            tg.start_soon([&]() -> anyio::Task<> {
                got.push_back("second got " + std::to_string(co_await rx.receive()));
            });
            co_await settle();
            CHECK(rx.statistics().tasks_waiting_receive == 2);
            scope.cancel();
            CHECK(rx.statistics().tasks_waiting_receive == 1);
            tx.send_nowait(9);
        });
        CHECK(got == std::vector<std::string>{"first: value", "second got 9"});
    });
}

TEST_CASE("A receiver handed an item returns it even if cancelled in the same turn",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        anyio::CancelScope scope;
        std::vector<std::string> events;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    int item = co_await rx.receive();
                    events.push_back("received " + std::to_string(item));
                    co_await anyio::checkpoint();
                    events.emplace_back("not reached");
                }());
            });
            co_await settle();
            tx.send_nowait(7);  // handed to the waiting receiver...
            scope.cancel();     // ...which is cancelled before it runs
        });
        CHECK(scope.cancelled_caught());
        CHECK(events == std::vector<std::string>{"received 7"});
    });
}

TEST_CASE("A sender whose item was taken and that is cancelled in the same turn returns normally",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        anyio::CancelScope scope;
        std::vector<std::string> events;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    co_await tx.send(3);
                    events.emplace_back("send returned");
                    co_await anyio::checkpoint();
                    events.emplace_back("not reached");
                }());
            });
            co_await settle();
            CHECK(rx.receive_nowait() == 3);
            scope.cancel();
        });
        CHECK(scope.cancelled_caught());
        CHECK(events == std::vector<std::string>{"send returned"});
    });
}

TEST_CASE("A send never hands an item to a receiver whose cancellation is pending", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        for (std::size_t size : {std::size_t{0}, std::size_t{4}}) {
            auto streams = anyio::create_memory_object_stream<int>(size);
            auto& tx = streams.first;
            auto& rx = streams.second;
            anyio::CancelScope scope;
            std::string receiver_end;
            std::string send_end;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    receiver_end = co_await outcome(scope.run([&]() -> anyio::Task<> {
                        (void)co_await rx.receive();
                        receiver_end = "received";
                    }()));
                });
                co_await settle();
                scope.cancel();  // in this same turn, a send comes
                send_end = outcome_now([&] { tx.send_nowait(11); });
            });
            CHECK(scope.cancelled_caught());
            CHECK(receiver_end == "value");  // scope.run returned: the receive was cancelled
            if (size == 0) {
                CHECK(send_end == "WouldBlock");  // nobody left to take it
            } else {
                CHECK(send_end == "value");  // buffered, not lost
                CHECK(rx.receive_nowait() == 11);
            }
        }
    });
}

TEST_CASE("Waiting senders and waiting receivers are served first in, first out", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(0);
        auto& tx = streams.first;
        auto& rx = streams.second;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 4; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> { co_await tx.send(int(i)); });
                co_await settle();
            }
            CHECK(tx.statistics().tasks_waiting_send == 4);
            for (int i = 0; i < 4; ++i) CHECK(rx.receive_nowait() == i);
        });
        std::vector<std::pair<int, int>> got;  // (receiver, item)
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 4; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> {
                    got.emplace_back(i, co_await rx.receive());
                });
                co_await settle();
            }
            for (int i = 0; i < 4; ++i) tx.send_nowait(i * 10);
        });
        CHECK(got == std::vector<std::pair<int, int>>{{0, 0}, {1, 10}, {2, 20}, {3, 30}});
    });
}

TEST_CASE("Stream statistics report every field", "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(3);
        auto& tx = streams.first;
        auto& rx = streams.second;
        auto tx2 = tx.clone();
        tx.send_nowait(1);
        tx.send_nowait(2);
        anyio::MemoryObjectStreamStatistics stats = rx.statistics();
        CHECK(stats.current_buffer_used == 2);
        CHECK(stats.max_buffer_size == 3);
        CHECK(stats.open_send_streams == 2);
        CHECK(stats.open_receive_streams == 1);
        CHECK(stats.tasks_waiting_send == 0);
        CHECK(stats.tasks_waiting_receive == 0);
        tx.send_nowait(3);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { co_await tx.send(4); });
            tg.start_soon([&]() -> anyio::Task<> { co_await tx2.send(5); });
            co_await settle();
            CHECK(tx.statistics().tasks_waiting_send == 2);
            for (int i = 1; i <= 5; ++i) CHECK(rx.receive_nowait() == i);
        });
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { (void)co_await rx.receive(); });
            co_await settle();
            stats = tx.statistics();
            CHECK(stats.tasks_waiting_receive == 1);
            CHECK(stats.current_buffer_used == 0);
            tx.send_nowait(6);
        });
    });
}

// =============================================================================================
// Threads
// =============================================================================================

TEST_CASE("A stream used from a worker thread throws std::logic_error naming the fix",
          "[stream]") {
    run_loop([]() -> anyio::Task<> {
        auto streams = anyio::create_memory_object_stream<int>(anyio::unbounded);
        auto& tx = streams.first;
        auto& rx = streams.second;
        tx.send_nowait(1);  // binds the stream to this loop
        std::string message;
        co_await anyio::to_thread::run_sync([&] {
            try {
                tx.send_nowait(2);
            } catch (const std::logic_error& error) {
                message = error.what();
            }
        });
        CHECK(contains(message, "MemoryObjectSendStream::send_nowait"));
        CHECK(contains(message, "from_thread::run_sync"));
        CHECK(rx.statistics().current_buffer_used == 1);
    });
}

TEST_CASE("Worker threads push items into a stream through from_thread", "[stream][threads]") {
    run_loop([]() -> anyio::Task<> {
        constexpr int workers = 4;
        constexpr int per_worker = 200;
        for (std::size_t size : {anyio::unbounded, std::size_t{1}}) {
            auto streams = anyio::create_memory_object_stream<int>(size);
            auto& tx = streams.first;
            auto& rx = streams.second;
            std::vector<int> got;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int w = 0; w < workers; ++w) {
                    tg.start_soon([&, w]() -> anyio::Task<> {
                        co_await anyio::to_thread::run_sync([&, w] {
                            for (int i = 0; i < per_worker; ++i) {
                                int item = w * per_worker + i;
                                if (size == anyio::unbounded) {
                                    anyio::from_thread::run_sync([&] { tx.send_nowait(item); });
                                } else {  // bounded: wait for room on the loop
                                    anyio::from_thread::run([&]() -> anyio::Task<> {
                                        co_await tx.send(std::move(item));
                                    });
                                }
                            }
                        });
                    });
                }
                for (int i = 0; i < workers * per_worker; ++i) got.push_back(co_await rx.receive());
            });
            // Every item exactly once, each worker's in its order.
            std::vector<int> last(workers, -1);
            bool in_order = true;
            for (int item : got) {
                int& previous = last[static_cast<std::size_t>(item / per_worker)];
                if (item <= previous) in_order = false;
                previous = item;
            }
            CHECK(in_order);
            std::sort(got.begin(), got.end());
            CHECK(std::adjacent_find(got.begin(), got.end()) == got.end());
            CHECK(got.size() == std::size_t{workers * per_worker});
            CHECK(rx.statistics().current_buffer_used == 0);
        }
    });
}

TEST_CASE("Plain threads push items into a stream through a BlockingPortal", "[stream][threads]") {
    constexpr int producers = 3;
    constexpr int per_producer = 200;
    auto portal = anyio::start_blocking_portal();
    // Made here, used only on the portal's loop, destroyed after it stopped.
    auto bounded = anyio::create_memory_object_stream<int>(2);
    auto unbounded = anyio::create_memory_object_stream<int>(anyio::unbounded);
    auto collect = [](anyio::MemoryObjectReceiveStream<int>& rx) -> anyio::Task<std::vector<int>> {
        std::vector<int> got;
        while (auto item = co_await rx.next()) got.push_back(*item);
        co_return got;
    };
    std::future<std::vector<int>> bounded_items =
        portal.start_task_soon(collect, std::ref(bounded.second));
    std::future<std::vector<int>> unbounded_items =
        portal.start_task_soon(collect, std::ref(unbounded.second));
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
            for (int i = 0; i < per_producer; ++i) {
                int item = p * per_producer + i;
                portal.call([&]() -> anyio::Task<> { co_await bounded.first.send(int(item)); });
                portal.call([&] { unbounded.first.send_nowait(int(item)); });
            }
        });
    }
    for (auto& thread : threads) thread.join();
    portal.call([&] {
        bounded.first.close();
        unbounded.first.close();
    });
    for (auto* future : {&bounded_items, &unbounded_items}) {
        std::vector<int> got = future->get();
        REQUIRE(got.size() == std::size_t{producers * per_producer});
        std::vector<int> last(producers, -1);
        bool in_order = true;
        for (int item : got) {
            int& previous = last[static_cast<std::size_t>(item / per_producer)];
            if (item <= previous) in_order = false;
            previous = item;
        }
        CHECK(in_order);
        std::sort(got.begin(), got.end());
        CHECK(std::adjacent_find(got.begin(), got.end()) == got.end());
    }
    portal.stop();
}

// =============================================================================================
// Stress: every item exactly once, in order per sender, under random cancellations
// =============================================================================================

namespace {

struct Tagged {
    int sender;
    std::int64_t sequence;
};

// 1,000,000 items per buffer size (about 1.5 s per case in a Debug build); 150,000 under the
// sanitizers, which run the loop several times slower.
#if defined(ANYIO_TEST_SANITIZED)
constexpr std::int64_t stress_items = 150'000;
#else
constexpr std::int64_t stress_items = 1'000'000;
#endif

// Four senders (clones) and two receivers (clones) move `stress_items` items through a
// stream of `buffer_size`, while another task cancels one of them now and then: waiting, just
// handed an item, or between operations. A cancelled sender sends the same item again (a send
// that raised Cancelled did not deliver it); a send that returned is never repeated.
// Receivers check that each sender's items arrive exactly once and in order.
void producer_consumer_with_cancellations(std::size_t buffer_size) {
    run_loop([buffer_size]() -> anyio::Task<> {
        constexpr int senders = 4;
        constexpr int receivers = 2;
        constexpr std::int64_t per_sender = stress_items / senders;
        auto streams = anyio::create_memory_object_stream<Tagged>(buffer_size);
        std::vector<anyio::MemoryObjectSendStream<Tagged>> send_ends;
        for (int s = 1; s < senders; ++s) send_ends.push_back(streams.first.clone());
        send_ends.push_back(std::move(streams.first));
        std::vector<anyio::MemoryObjectReceiveStream<Tagged>> receive_ends;
        receive_ends.push_back(streams.second.clone());
        receive_ends.push_back(std::move(streams.second));

        std::vector<std::int64_t> next_expected(senders, 0);
        std::int64_t received = 0;
        std::int64_t out_of_order = 0;
        std::int64_t cancellations = 0;
        int finished = 0;
        std::vector<anyio::CancelScope*> scopes(senders + receivers, nullptr);
        std::mt19937 rng(static_cast<unsigned>(buffer_size % 1000 + 1));

        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int s = 0; s < senders; ++s) {
                tg.start_soon([&, s]() -> anyio::Task<> {
                    auto& tx = send_ends[static_cast<std::size_t>(s)];
                    std::int64_t sequence = 0;
                    while (sequence < per_sender) {
                        anyio::CancelScope scope;
                        scopes[static_cast<std::size_t>(s)] = &scope;
                        co_await scope.run([&]() -> anyio::Task<> {
                            while (sequence < per_sender) {
                                co_await tx.send(Tagged{s, sequence});
                                ++sequence;  // delivered: never sent again
                            }
                        }());
                        scopes[static_cast<std::size_t>(s)] = nullptr;
                        if (scope.cancelled_caught()) ++cancellations;
                    }
                    tx.close();
                    ++finished;
                });
            }
            for (int r = 0; r < receivers; ++r) {
                tg.start_soon([&, r]() -> anyio::Task<> {
                    auto& rx = receive_ends[static_cast<std::size_t>(r)];
                    bool ended = false;
                    while (!ended) {
                        anyio::CancelScope scope;
                        scopes[static_cast<std::size_t>(senders + r)] = &scope;
                        co_await scope.run([&]() -> anyio::Task<> {
                            while (auto item = co_await rx.next()) {
                                std::int64_t& expected =
                                    next_expected[static_cast<std::size_t>(item->sender)];
                                if (item->sequence != expected) ++out_of_order;
                                expected = item->sequence + 1;
                                ++received;
                            }
                            ended = true;
                        }());
                        scopes[static_cast<std::size_t>(senders + r)] = nullptr;
                        if (scope.cancelled_caught()) ++cancellations;
                    }
                    ++finished;
                });
            }
            tg.start_soon([&]() -> anyio::Task<> {
                while (finished < senders + receivers) {
                    anyio::CancelScope* victim = scopes[rng() % scopes.size()];
                    if (victim != nullptr && rng() % 8 == 0) victim->cancel();
                    co_await anyio::checkpoint();
                }
            });
            co_return;
        });
        INFO("buffer " << buffer_size << ": " << received << " items, " << cancellations
                       << " cancellations");
        CHECK(out_of_order == 0);
        CHECK(received == per_sender * senders);
        for (std::int64_t next : next_expected) CHECK(next == per_sender);
        CHECK(cancellations > 0);
    });
}

}  // namespace

TEST_CASE("Items through a rendezvous stream arrive exactly once and in order under "
          "random cancellations",
          "[stream][stress]") {
    producer_consumer_with_cancellations(0);
}

TEST_CASE("Items through a stream of buffer 1 arrive exactly once and in order under "
          "random cancellations",
          "[stream][stress]") {
    producer_consumer_with_cancellations(1);
}

TEST_CASE("Items through a stream of buffer 64 arrive exactly once and in order under "
          "random cancellations",
          "[stream][stress]") {
    producer_consumer_with_cancellations(64);
}

TEST_CASE("Items through an unbounded stream arrive exactly once and in order under "
          "random cancellations",
          "[stream][stress]") {
    producer_consumer_with_cancellations(anyio::unbounded);
}

// =============================================================================================
// Allocation and shutdown
// =============================================================================================

#if !defined(ANYIO_TEST_NO_ALLOCATION_COUNT)
TEST_CASE("Steady-state sends and receives allocate nothing", "[stream][allocation]") {
    run_loop([]() -> anyio::Task<> {
        for (std::size_t size : {std::size_t{0}, std::size_t{64}}) {
            auto streams = anyio::create_memory_object_stream<int>(size);
            auto& tx = streams.first;
            auto& rx = streams.second;
            constexpr int warm_up = 1000;
            constexpr int measured = 20000;
            long long before = 0;
            long long after = 0;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    for (int i = 0; i < warm_up + measured; ++i) {
                        if (i == warm_up) {
                            // Relaxed: counted and read on this thread (the loop's).
                            before = allocation_count.load(std::memory_order_relaxed);
                        }
                        co_await tx.send(int(i));
                    }
                    tx.close();
                });
                tg.start_soon([&]() -> anyio::Task<> {
                    while (co_await rx.next()) {
                    }
                    after = allocation_count.load(std::memory_order_relaxed);  // same thread
                });
                co_return;
            });
            CHECK(after - before == 0);
        }
    });
}
#endif

TEST_CASE("Leaving run with senders and receivers still blocked frees everything cleanly",
          "[stream][shutdown]") {
    Counted::reset();
    std::weak_ptr<int> watch;
    anyio::run([&]() -> anyio::Task<> {
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        auto marker = std::make_shared<int>(0);
        watch = marker;
        auto full =
            std::make_shared<Streams<Counted>>(anyio::create_memory_object_stream<Counted>(1));
        auto empty =
            std::make_shared<Streams<Counted>>(anyio::create_memory_object_stream<Counted>(0));
        full->first.send_nowait(Counted(1));
        loop.spawn([](std::shared_ptr<Streams<Counted>> s, std::shared_ptr<int>) -> anyio::Task<> {
            co_await s->first.send(Counted(2));  // blocked: the buffer is full
        }(full, marker));
        loop.spawn([](std::shared_ptr<Streams<Counted>> s, std::shared_ptr<int>) -> anyio::Task<> {
            (void)co_await s->second.receive();  // blocked: nothing comes
        }(empty, marker));
        co_await settle();
        CHECK(full->first.statistics().tasks_waiting_send == 1);
        CHECK(empty->second.statistics().tasks_waiting_receive == 1);
    });
    CHECK(watch.expired());
    CHECK(Counted::live == 0);
}
