#include <anyio/sync.hpp>

#include <anyio/cancel_scope.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

// Tests for include/anyio/sync.hpp: Lock, Semaphore and Condition, with anyio's semantics
// (FIFO hand-off, the yield of an uncontended acquire, owner checks and their messages) and
// cancellation at every wait.

using namespace anyio_test;

namespace {

// The message of the `E` that `fn()` throws, or nothing if it throws nothing.
template <class E, class F>
std::optional<std::string> thrown_message(F&& fn) {
    try {
        std::forward<F>(fn)();
    } catch (const E& error) {
        return std::string(error.what());
    }
    return std::nullopt;
}

// The identity of the task running now, as LockStatistics::owner reports it.
const void* current_task_id() { return anyio::EventLoop::current()->current_task(); }

// The message of the std::logic_error that `fn()` throws on a worker thread.
template <class F>
anyio::Task<std::string> logic_error_on_worker(F fn) {
    std::string message;
    co_await anyio::to_thread::run_sync([&] {
        try {
            fn();
        } catch (const std::logic_error& error) {
            message = error.what();
        }
    });
    co_return message;
}

bool contains(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

constexpr const char* not_holding_message = "The current task is not holding the underlying lock";

}  // namespace

// =============================================================================================
// Lock
// =============================================================================================

TEST_CASE("An uncontended Lock acquire yields once, unless fast_acquire", "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        for (bool fast : {false, true}) {
            anyio::Lock lock(fast);
            std::vector<std::string> order;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    order.emplace_back("other task");
                    co_return;
                });
                co_await lock.acquire();  // the child is ready: it runs first if we yield
                order.emplace_back("acquired");
                CHECK(lock.locked());
                lock.release();
            });
            if (fast) {
                CHECK(order == std::vector<std::string>{"acquired", "other task"});
            } else {
                CHECK(order == std::vector<std::string>{"other task", "acquired"});
            }
            CHECK_FALSE(lock.locked());
        }
    });
}

TEST_CASE("lock() yields a guard that releases the Lock when destroyed or unlocked",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        {
            auto held = co_await lock.lock();
            CHECK(lock.locked());
            CHECK(held.owns_lock());
            CHECK(lock.statistics().owner == current_task_id());
        }
        CHECK_FALSE(lock.locked());

        auto held = co_await lock.lock();
        held.unlock();
        CHECK_FALSE(lock.locked());
        CHECK_FALSE(held.owns_lock());
        held.unlock();  // a second unlock does nothing
        CHECK_FALSE(lock.locked());

        // A moved guard keeps the lock; the moved-from one releases nothing.
        std::optional<anyio::Lock::Guard> moved;
        {
            auto first = co_await lock.lock();
            moved.emplace(std::move(first));
        }
        CHECK(lock.locked());
        moved.reset();
        CHECK_FALSE(lock.locked());
    });
}

TEST_CASE("Lock::acquire_nowait takes a free lock and throws WouldBlock when it is held",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        lock.acquire_nowait();
        CHECK(lock.locked());
        std::optional<std::string> message;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                message = thrown_message<anyio::WouldBlock>([&] { lock.acquire_nowait(); });
                co_return;
            });
            co_return;
        });
        REQUIRE(message.has_value());
        CHECK(contains(*message, "co_await acquire()"));
        lock.release();
        CHECK_FALSE(lock.locked());
    });
}

TEST_CASE("The owner acquiring its Lock again gets anyio's std::runtime_error", "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        co_await lock.acquire();
        CHECK(thrown_message<std::runtime_error>([&] { lock.acquire_nowait(); }) ==
              "Attempted to acquire an already held Lock");
        std::optional<std::string> message;
        try {
            co_await lock.acquire();
        } catch (const std::runtime_error& error) {
            message = error.what();
        }
        CHECK(message == "Attempted to acquire an already held Lock");
        CHECK(lock.locked());
        CHECK(lock.statistics().tasks_waiting == 0);
        lock.release();
    });
}

TEST_CASE("Releasing a Lock the current task does not hold gets anyio's std::runtime_error",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        CHECK(thrown_message<std::runtime_error>([&] { lock.release(); }) ==
              "The current task is not holding this lock");

        co_await lock.acquire();
        std::optional<std::string> message;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                message = thrown_message<std::runtime_error>([&] { lock.release(); });
                co_return;
            });
            co_return;
        });
        CHECK(message == "The current task is not holding this lock");
        CHECK(lock.locked());  // still ours
        lock.release();
    });
}

TEST_CASE("Lock waiters get the lock first in, first out, and own it before they run",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        co_await lock.acquire();
        std::vector<int> order;
        std::vector<const void*> ids(3);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 3; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> {
                    ids[static_cast<std::size_t>(i)] = current_task_id();
                    co_await lock.acquire();
                    order.push_back(i);
                    co_await anyio::checkpoint();  // hold it across a yield
                    lock.release();
                });
                co_await settle();  // queue them in a known order
            }
            CHECK(lock.statistics().tasks_waiting == 3);

            lock.release();
            // Handed to the first waiter, which has not run yet: it already owns the lock,
            // so nobody can take it in between.
            anyio::LockStatistics stats = lock.statistics();
            CHECK(stats.locked);
            CHECK(stats.owner == ids[0]);
            CHECK(stats.tasks_waiting == 2);
            CHECK(order.empty());
            CHECK(thrown_message<anyio::WouldBlock>([&] { lock.acquire_nowait(); }).has_value());
        });
        CHECK(order == std::vector<int>{0, 1, 2});
        CHECK_FALSE(lock.locked());
    });
}

TEST_CASE("Lock::acquire is a cancellation point: an already cancelled task does not take it",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        for (bool fast : {false, true}) {
            anyio::Lock lock(fast);
            anyio::CancelScope scope;
            scope.cancel();
            bool acquired = false;
            bool completed = co_await scope.run([&]() -> anyio::Task<> {
                co_await lock.acquire();
                acquired = true;
            }());
            CHECK_FALSE(completed);
            CHECK(scope.cancelled_caught());
            CHECK_FALSE(acquired);
            CHECK_FALSE(lock.locked());
        }
    });
}

TEST_CASE("A Lock taken without waiting is kept when a cancellation arrives during its yield",
          "[sync][lock]") {
    // anyio's shielded checkpoint after an uncontended acquire: the lock is ours, the
    // cancellation takes effect at the next checkpoint, with the lock still held.
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        anyio::CancelScope scope;
        bool acquired = false;
        bool still_locked_when_cancelled = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    auto held = co_await lock.lock();
                    acquired = true;
                    try {
                        co_await anyio::checkpoint();
                    } catch (const anyio::Cancelled&) {
                        still_locked_when_cancelled = lock.locked();
                        throw;
                    }
                }());
            });
            co_await anyio::checkpoint();  // the child took the lock and yields
            CHECK(lock.locked());
            scope.cancel();
        });
        CHECK(acquired);
        CHECK(still_locked_when_cancelled);
        CHECK(scope.cancelled_caught());
        CHECK_FALSE(lock.locked());
    });
}

TEST_CASE("A cancelled Lock waiter leaves the queue and never gets the lock", "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        co_await lock.acquire();
        anyio::CancelScope scope;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    co_await lock.acquire();
                    order.emplace_back("cancelled one");
                    lock.release();
                }());
            });
            co_await settle();
            tg.start_soon([&]() -> anyio::Task<> {
                co_await lock.acquire();
                order.emplace_back("second");
                lock.release();
            });
            co_await settle();
            CHECK(lock.statistics().tasks_waiting == 2);
            scope.cancel();
            CHECK(lock.statistics().tasks_waiting == 1);  // unlinked at once
            co_await settle();
            CHECK(order.empty());
            lock.release();
        });
        CHECK(scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"second"});
        CHECK_FALSE(lock.locked());
        CHECK(lock.statistics().tasks_waiting == 0);
    });
}

TEST_CASE("A Lock waiter cancelled in the turn the lock was handed to it passes it on in order",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        co_await lock.acquire();
        anyio::CancelScope first_scope;
        std::vector<std::string> order;
        std::vector<const void*> ids(3);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                ids[0] = current_task_id();
                co_await first_scope.run([&]() -> anyio::Task<> {
                    co_await lock.acquire();
                    order.emplace_back("first");
                    lock.release();
                }());
            });
            co_await settle();
            for (int i = 1; i <= 2; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> {
                    ids[static_cast<std::size_t>(i)] = current_task_id();
                    co_await lock.acquire();
                    order.push_back(i == 1 ? "second" : "third");
                    lock.release();
                });
                co_await settle();
            }
            lock.release();        // handed to the first waiter...
            CHECK(lock.statistics().owner == ids[0]);
            first_scope.cancel();  // ...which is cancelled before it runs
            CHECK(lock.statistics().owner == ids[0]);  // it passes the lock on when it resumes
            co_await anyio::checkpoint();
            CHECK(lock.statistics().owner == ids[1]);
        });
        CHECK(first_scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"second", "third"});
        CHECK_FALSE(lock.locked());
        CHECK(lock.statistics().tasks_waiting == 0);
    });
}

TEST_CASE("Lock statistics report locked, owner and tasks_waiting", "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        anyio::LockStatistics stats = lock.statistics();
        CHECK_FALSE(stats.locked);
        CHECK(stats.owner == nullptr);
        CHECK(stats.tasks_waiting == 0);

        co_await lock.acquire();
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 2; ++i) {
                tg.start_soon([&]() -> anyio::Task<> {
                    auto held = co_await lock.lock();
                });
            }
            co_await settle();
            stats = lock.statistics();
            CHECK(stats.locked);
            CHECK(stats.owner == current_task_id());
            CHECK(stats.tasks_waiting == 2);
            lock.release();
        });
        stats = lock.statistics();
        CHECK_FALSE(stats.locked);
        CHECK(stats.owner == nullptr);
        CHECK(stats.tasks_waiting == 0);
    });
}

TEST_CASE("A Lock used from a worker thread throws std::logic_error naming the fix",
          "[sync][lock]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        lock.acquire_nowait();  // binds the lock to this loop
        std::string message = co_await logic_error_on_worker([&] { lock.release(); });
        CHECK(contains(message, "Lock::release"));
        CHECK(contains(message, "from_thread::run_sync"));
        message = co_await logic_error_on_worker([&] { (void)lock.acquire(); });
        CHECK(contains(message, "Lock::acquire"));
        CHECK(lock.locked());
        lock.release();
    });
}

TEST_CASE("Lock::acquire_nowait outside a task throws std::logic_error", "[sync][lock]") {
    anyio::Lock lock;
    CHECK(thrown_message<std::logic_error>([&] { lock.acquire_nowait(); }).has_value());
    CHECK_FALSE(lock.locked());
}

TEST_CASE("Many tasks contending for a Lock with random cancellations never overlap",
          "[sync][lock][stress]") {
    // 100 tasks take the lock in turn, each holding it across a yield, while another task
    // cancels random ones (waiting, just handed the lock, or holding it). Never two holders,
    // every round ends either completed or cancelled, and nothing is left locked or queued.
#if defined(ANYIO_TEST_SANITIZED)
    constexpr int rounds = 300;
#else
    constexpr int rounds = 1000;  // 100,000 hand-offs
#endif
    constexpr int tasks = 100;
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        std::mt19937 rng(12345);
        const void* holder = nullptr;
        int overlaps = 0;
        std::int64_t completed_rounds = 0;
        std::int64_t cancelled_rounds = 0;
        int finished = 0;
        std::vector<anyio::CancelScope*> scopes(tasks, nullptr);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int t = 0; t < tasks; ++t) {
                tg.start_soon([&, t]() -> anyio::Task<> {
                    for (int round = 0; round < rounds; ++round) {
                        anyio::CancelScope scope;
                        scopes[static_cast<std::size_t>(t)] = &scope;
                        bool completed = co_await scope.run([&]() -> anyio::Task<> {
                            auto held = co_await lock.lock();
                            if (holder != nullptr) ++overlaps;
                            holder = current_task_id();
                            struct Clear {
                                const void*& slot;
                                ~Clear() { slot = nullptr; }  // before `held` lets go
                            } clear{holder};
                            co_await anyio::checkpoint();  // may be cancelled holding it
                        }());
                        scopes[static_cast<std::size_t>(t)] = nullptr;
                        ++(completed ? completed_rounds : cancelled_rounds);
                    }
                    ++finished;
                });
            }
            tg.start_soon([&]() -> anyio::Task<> {  // cancels a random task now and then
                while (finished < tasks) {
                    anyio::CancelScope* victim = scopes[rng() % tasks];
                    if (victim != nullptr && rng() % 4 == 0) victim->cancel();
                    co_await anyio::checkpoint();
                }
            });
            co_return;
        });
        CHECK(overlaps == 0);
        CHECK(completed_rounds + cancelled_rounds == std::int64_t{tasks} * rounds);
        CHECK(cancelled_rounds > 0);
        CHECK(completed_rounds > 0);
        CHECK_FALSE(lock.locked());
        CHECK(lock.statistics().tasks_waiting == 0);
    });
}

// =============================================================================================
// Semaphore
// =============================================================================================

TEST_CASE("Semaphore rejects bad initial and max values with anyio's messages",
          "[sync][semaphore]") {
    CHECK(thrown_message<std::invalid_argument>([] { anyio::Semaphore semaphore(-1); }) ==
          "initial_value must be >= 0");
    CHECK(thrown_message<std::invalid_argument>([] { anyio::Semaphore semaphore(3, 2); }) ==
          "max_value must be equal to or higher than initial_value");
    anyio::Semaphore equal(2, 2);
    CHECK(equal.value() == 2);
    CHECK(equal.max_value() == 2);
    anyio::Semaphore unlimited(0);
    CHECK(unlimited.value() == 0);
    CHECK_FALSE(unlimited.max_value().has_value());
}

TEST_CASE("Semaphore acquire and release move its value; release past max_value is refused",
          "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(2, 2);
        co_await semaphore.acquire();
        CHECK(semaphore.value() == 1);
        semaphore.acquire_nowait();
        CHECK(semaphore.value() == 0);
        auto message = thrown_message<anyio::WouldBlock>([&] { semaphore.acquire_nowait(); });
        REQUIRE(message.has_value());
        CHECK(contains(*message, "co_await acquire()"));
        semaphore.release();
        semaphore.release();
        CHECK(semaphore.value() == 2);
        CHECK(thrown_message<std::invalid_argument>([&] { semaphore.release(); }) ==
              "semaphore released too many times");
        CHECK(semaphore.value() == 2);

        anyio::Semaphore unbounded(0);
        for (int i = 0; i < 5; ++i) unbounded.release();
        CHECK(unbounded.value() == 5);
    });
}

TEST_CASE("An uncontended Semaphore acquire yields once, unless fast_acquire",
          "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        for (bool fast : {false, true}) {
            anyio::Semaphore semaphore(1, std::nullopt, fast);
            std::vector<std::string> order;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    order.emplace_back("other task");
                    co_return;
                });
                co_await semaphore.acquire();
                order.emplace_back("acquired");
                semaphore.release();
            });
            if (fast) {
                CHECK(order == std::vector<std::string>{"acquired", "other task"});
            } else {
                CHECK(order == std::vector<std::string>{"other task", "acquired"});
            }
        }
    });
}

TEST_CASE("Semaphore waiters get permits first in, first out, handed over before they run",
          "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(0);
        std::vector<int> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 3; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> {
                    auto held = co_await semaphore.scoped();
                    order.push_back(i);
                    co_await anyio::checkpoint();
                });
                co_await settle();
            }
            CHECK(semaphore.statistics().tasks_waiting == 3);
            semaphore.release();
            // Reserved for the first waiter: the value stays 0 and nobody can overtake.
            CHECK(semaphore.value() == 0);
            CHECK(semaphore.statistics().tasks_waiting == 2);
            CHECK(thrown_message<anyio::WouldBlock>([&] { semaphore.acquire_nowait(); })
                      .has_value());
            CHECK(order.empty());
        });
        CHECK(order == std::vector<int>{0, 1, 2});
        CHECK(semaphore.value() == 1);  // the one permit went round and came back
        CHECK(semaphore.statistics().tasks_waiting == 0);
    });
}

TEST_CASE("A Semaphore guard releases its permit when destroyed or released", "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(1, 1);
        {
            auto held = co_await semaphore.scoped();
            CHECK(semaphore.value() == 0);
        }
        CHECK(semaphore.value() == 1);
        auto held = co_await semaphore.scoped();
        held.release();
        CHECK(semaphore.value() == 1);
        held.release();  // nothing more
        CHECK(semaphore.value() == 1);
    });
}

TEST_CASE("A cancelled Semaphore waiter leaves the queue and takes no permit",
          "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(0);
        anyio::CancelScope scope;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    co_await semaphore.acquire();
                    order.emplace_back("cancelled one");
                }());
            });
            co_await settle();
            tg.start_soon([&]() -> anyio::Task<> {
                co_await semaphore.acquire();
                order.emplace_back("second");
            });
            co_await settle();
            CHECK(semaphore.statistics().tasks_waiting == 2);
            scope.cancel();
            CHECK(semaphore.statistics().tasks_waiting == 1);
            semaphore.release();
        });
        CHECK(scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"second"});
        CHECK(semaphore.value() == 0);
    });
}

TEST_CASE("A Semaphore waiter cancelled in the turn a permit was handed to it passes it on",
          "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(0);
        anyio::CancelScope first_scope;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await first_scope.run([&]() -> anyio::Task<> {
                    co_await semaphore.acquire();
                    order.emplace_back("first");
                }());
            });
            co_await settle();
            tg.start_soon([&]() -> anyio::Task<> {
                co_await semaphore.acquire();
                order.emplace_back("second");
                semaphore.release();
            });
            co_await settle();
            semaphore.release();   // handed to the first waiter...
            first_scope.cancel();  // ...cancelled before it runs
        });
        CHECK(first_scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"second"});
        CHECK(semaphore.value() == 1);  // not lost
        CHECK(semaphore.statistics().tasks_waiting == 0);
    });
}

TEST_CASE("A permit handed to a waiter counts against max_value until the waiter resumes",
          "[sync][semaphore]") {
    // Found by tests/fuzz (bug-semaphore-cancelled-handoff-exceeds-max): the handed permit was
    // not counted, so a second release passed the max check and the cancelled waiter's
    // give-back then pushed value() above max_value().
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(0, 1);
        anyio::CancelScope waiter_scope;
        std::string second_release;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await waiter_scope.run([&]() -> anyio::Task<> {
                    co_await semaphore.acquire();
                }());
            });
            co_await settle();
            semaphore.release();  // handed to the waiter: value stays 0, the waiter holds it
            try {
                semaphore.release();  // the one permit is out: this is one release too many
            } catch (const std::invalid_argument& error) {
                second_release = error.what();
            }
            waiter_scope.cancel();  // cancelled before it runs: it gives the permit back
        });
        CHECK(second_release == "semaphore released too many times");
        CHECK(waiter_scope.cancelled_caught());
        CHECK(semaphore.value() == 1);
        CHECK(*semaphore.max_value() == 1);
        // Once the waiter is gone the permit is back: value() is at max, release refuses.
        CHECK_THROWS_AS(semaphore.release(), std::invalid_argument);
    });
}

TEST_CASE("Semaphore::acquire is a cancellation point", "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(1);
        anyio::CancelScope scope;
        scope.cancel();
        bool completed = co_await scope.run([&]() -> anyio::Task<> {
            co_await semaphore.acquire();
        }());
        CHECK_FALSE(completed);
        CHECK(semaphore.value() == 1);
    });
}

TEST_CASE("A Semaphore used from a worker thread throws std::logic_error", "[sync][semaphore]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Semaphore semaphore(1);
        semaphore.acquire_nowait();
        std::string message = co_await logic_error_on_worker([&] { semaphore.release(); });
        CHECK(contains(message, "Semaphore::release"));
        CHECK(semaphore.value() == 0);
        semaphore.release();
    });
}

// =============================================================================================
// Condition
// =============================================================================================

TEST_CASE("Condition::wait releases the lock while waiting and holds it again on return",
          "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        bool ready = false;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto held = co_await condition.lock();
                while (!ready) {
                    co_await condition.wait();
                    CHECK(condition.locked());
                    CHECK(condition.statistics().lock_statistics.owner == current_task_id());
                }
                order.emplace_back("waiter saw ready");
            });
            co_await settle();
            CHECK_FALSE(condition.locked());  // released while it waits
            CHECK(condition.statistics().tasks_waiting == 1);
            {
                auto held = co_await condition.lock();
                ready = true;
                condition.notify();
                co_await settle();
                // Notified, but the lock is ours: it waits for it, no longer for a notify.
                CHECK(order.empty());
                CHECK(condition.statistics().tasks_waiting == 0);
                CHECK(condition.statistics().lock_statistics.tasks_waiting == 1);
                order.emplace_back("notifier unlocks");
            }
        });
        CHECK(order == std::vector<std::string>{"notifier unlocks", "waiter saw ready"});
        CHECK_FALSE(condition.locked());
    });
}

TEST_CASE("Condition::notify(n) wakes the n oldest waiters; notify_all wakes the rest",
          "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        std::vector<int> woken;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 5; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> {
                    auto held = co_await condition.lock();
                    co_await condition.wait();
                    woken.push_back(i);
                });
                co_await settle();
            }
            CHECK(condition.statistics().tasks_waiting == 5);
            {
                auto held = co_await condition.lock();
                condition.notify(2);
                CHECK(condition.statistics().tasks_waiting == 3);
            }
            co_await settle();
            CHECK(woken == std::vector<int>{0, 1});
            {
                auto held = co_await condition.lock();
                condition.notify();
            }
            co_await settle();
            CHECK(woken == std::vector<int>{0, 1, 2});
            {
                auto held = co_await condition.lock();
                condition.notify_all();
                CHECK(condition.statistics().tasks_waiting == 0);
                condition.notify(10);  // nobody left: nothing happens
            }
        });
        CHECK(woken == std::vector<int>{0, 1, 2, 3, 4});
    });
}

TEST_CASE("Condition wait or notify without holding the lock throws std::runtime_error",
          "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        CHECK(thrown_message<std::runtime_error>([&] { condition.notify(); }) ==
              not_holding_message);
        CHECK(thrown_message<std::runtime_error>([&] { condition.notify_all(); }) ==
              not_holding_message);
        std::optional<std::string> message;
        try {
            co_await condition.wait();
        } catch (const std::runtime_error& error) {
            message = error.what();
        }
        CHECK(message == not_holding_message);
        message.reset();
        try {
            co_await condition.wait_for([] { return true; });
        } catch (const std::runtime_error& error) {
            message = error.what();
        }
        CHECK(message == not_holding_message);

        // Held by another task: still not ours.
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            auto held = co_await condition.lock();
            tg.start_soon([&]() -> anyio::Task<> {
                CHECK(thrown_message<std::runtime_error>([&] { condition.notify(); }) ==
                      not_holding_message);
                co_return;
            });
            co_await settle();
        });
        CHECK_FALSE(condition.locked());
    });
}

TEST_CASE("A cancelled Condition::wait re-acquires the lock before raising Cancelled",
          "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        anyio::CancelScope scope;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto held = co_await condition.lock();
                co_await scope.run([&]() -> anyio::Task<> {
                    try {
                        co_await condition.wait();
                    } catch (const anyio::Cancelled&) {
                        order.emplace_back(condition.statistics().lock_statistics.owner ==
                                                   current_task_id()
                                               ? "cancelled holding the lock"
                                               : "cancelled without the lock");
                        throw;
                    }
                }());
                CHECK(held.owns_lock());
            });
            co_await settle();
            auto held = co_await condition.lock();
            scope.cancel();
            CHECK(condition.statistics().tasks_waiting == 0);
            CHECK(condition.statistics().lock_statistics.tasks_waiting == 1);  // shielded
            co_await settle();
            CHECK(order.empty());  // it cannot return before we unlock
            order.emplace_back("unlocked");
        });
        CHECK(scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"unlocked", "cancelled holding the lock"});
        CHECK_FALSE(condition.locked());
    });
}

TEST_CASE("A cancelled Condition::wait re-acquires a free lock at once", "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        anyio::CancelScope scope;
        bool held_when_cancelled = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto held = co_await condition.lock();
                co_await scope.run([&]() -> anyio::Task<> {
                    try {
                        co_await condition.wait();
                    } catch (const anyio::Cancelled&) {
                        held_when_cancelled = held.owns_lock();
                        throw;
                    }
                }());
            });
            co_await settle();
            CHECK_FALSE(condition.locked());
            scope.cancel();
            CHECK(condition.locked());  // taken for the waiter at once
        });
        CHECK(held_when_cancelled);
        CHECK_FALSE(condition.locked());
    });
}

TEST_CASE("A Condition waiter notified and cancelled in the same turn returns normally",
          "[sync][condition]") {
    // The notification was handed to it, so it returns (with the lock); the cancellation
    // takes effect at its next checkpoint. No notification is lost.
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        anyio::CancelScope scope;
        std::vector<std::string> order;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await scope.run([&]() -> anyio::Task<> {
                    auto held = co_await condition.lock();
                    co_await condition.wait();
                    order.emplace_back(held.owns_lock() ? "returned with the lock"
                                                        : "returned without the lock");
                    co_await anyio::checkpoint();
                    order.emplace_back("not reached");
                }());
            });
            co_await settle();
            {
                auto held = co_await condition.lock();
                condition.notify();
                scope.cancel();
            }
        });
        CHECK(scope.cancelled_caught());
        CHECK(order == std::vector<std::string>{"returned with the lock"});
        CHECK_FALSE(condition.locked());
    });
}

TEST_CASE("Condition::wait in an already cancelled task raises Cancelled still holding the lock",
          "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        anyio::CancelScope scope;
        bool held_after = false;
        co_await scope.run([&]() -> anyio::Task<> {
            auto held = co_await condition.lock();
            scope.cancel();
            try {
                co_await condition.wait();
            } catch (const anyio::Cancelled&) {
                held_after = held.owns_lock();
                throw;
            }
        }());
        CHECK(scope.cancelled_caught());
        CHECK(held_after);
        CHECK(condition.statistics().tasks_waiting == 0);
        CHECK_FALSE(condition.locked());
    });
}

TEST_CASE("Condition::wait_for waits until the predicate holds and yields its value",
          "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        int value = 0;
        std::vector<int> seen;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto held = co_await condition.lock();
                int result = co_await condition.wait_for([&] {
                    seen.push_back(value);
                    return value >= 2 ? value * 10 : 0;
                });
                CHECK(result == 20);
                CHECK(held.owns_lock());
            });
            for (int i = 1; i <= 3; ++i) {
                co_await settle();
                auto held = co_await condition.lock();
                value = i;
                condition.notify_all();
            }
        });
        CHECK(seen == std::vector<int>{0, 1, 2});

        // True at once: no wait at all.
        auto held = co_await condition.lock();
        bool result = co_await condition.wait_for([] { return true; });
        CHECK(result);
        CHECK(condition.statistics().tasks_waiting == 0);
    });
}

TEST_CASE("A Condition over a given Lock uses that lock", "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Lock lock;
        anyio::Condition condition(&lock);
        bool ready = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto held = co_await lock.lock();
                co_await condition.wait_for([&] { return ready; });
                CHECK(lock.statistics().owner == current_task_id());
            });
            co_await settle();
            CHECK_FALSE(lock.locked());
            co_await lock.acquire();
            CHECK(condition.locked());
            ready = true;
            condition.notify();
            lock.release();
        });
        CHECK_FALSE(lock.locked());
    });
}

TEST_CASE("Condition statistics report waiters and the lock's statistics", "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        anyio::ConditionStatistics stats = condition.statistics();
        CHECK(stats.tasks_waiting == 0);
        CHECK_FALSE(stats.lock_statistics.locked);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 3; ++i) {
                tg.start_soon([&]() -> anyio::Task<> {
                    auto held = co_await condition.lock();
                    co_await condition.wait();
                });
            }
            co_await settle();
            stats = condition.statistics();
            CHECK(stats.tasks_waiting == 3);
            CHECK_FALSE(stats.lock_statistics.locked);
            auto held = co_await condition.lock();
            condition.notify_all();
            stats = condition.statistics();
            CHECK(stats.tasks_waiting == 0);
            CHECK(stats.lock_statistics.locked);
            CHECK(stats.lock_statistics.tasks_waiting == 3);
        });
    });
}

TEST_CASE("A Condition used from a worker thread throws std::logic_error", "[sync][condition]") {
    run_loop([]() -> anyio::Task<> {
        anyio::Condition condition;
        auto held = co_await condition.lock();
        condition.notify();  // binds it to this loop
        std::string message = co_await logic_error_on_worker([&] { condition.notify(); });
        CHECK(contains(message, "Condition::notify"));
    });
}

// =============================================================================================
// Shutdown
// =============================================================================================

TEST_CASE("Leaving run with lock, semaphore and condition waiters still queued frees them cleanly",
          "[sync][shutdown]") {
    // At shutdown the newest frames go first; a guard destroyed then hands the lock (or a
    // permit) to an older waiter, which must not be resumed or touched after its own frame
    // is gone, and must give it back in turn (ASan checks).
    struct Shared {
        anyio::Lock lock;
        anyio::Semaphore semaphore{1};
        anyio::Condition condition;
        anyio::Event go;
    };
    std::weak_ptr<Shared> watch;
    anyio::run([&]() -> anyio::Task<> {
        static anyio::Event never;  // outlives the loop: the tasks wait on it for ever
        anyio::EventLoop& loop = *anyio::EventLoop::current();
        auto shared = std::make_shared<Shared>();
        watch = shared;
        // Older waiters: they queue once `go` is set, behind the newer holders.
        loop.spawn([](std::shared_ptr<Shared> s) -> anyio::Task<> {
            co_await s->go.wait();
            auto held = co_await s->lock.lock();
            co_await never.wait();
        }(shared));
        loop.spawn([](std::shared_ptr<Shared> s) -> anyio::Task<> {
            co_await s->go.wait();
            auto held = co_await s->semaphore.scoped();
            co_await never.wait();
        }(shared));
        loop.spawn([](std::shared_ptr<Shared> s) -> anyio::Task<> {
            auto held = co_await s->condition.lock();
            co_await s->condition.wait();  // notified below, then queued for the lock
            co_await never.wait();
        }(shared));
        co_await settle();
        // Newer holders.
        loop.spawn([](std::shared_ptr<Shared> s) -> anyio::Task<> {
            auto held = co_await s->lock.lock();
            auto permit = co_await s->semaphore.scoped();
            auto condition_held = co_await s->condition.lock();
            s->condition.notify();
            co_await never.wait();
        }(shared));
        co_await settle();
        shared->go.set();
        co_await settle();
        CHECK(shared->lock.statistics().tasks_waiting == 1);
        CHECK(shared->semaphore.statistics().tasks_waiting == 1);
        CHECK(shared->condition.statistics().lock_statistics.tasks_waiting == 1);
    });
    CHECK(watch.expired());  // every frame let go of it
}
