// Stress for memory object streams (issue 15, "Stress"): many streams at once, fed by
// thousands of tasks, by worker threads through from_thread and by plain threads through a
// LoopToken, drained by clones that come and go, relayed from one stream into another, some
// streams abandoned by every receiver, and random cancellations everywhere. At the end every
// item that a send delivered arrived exactly once, each receiver saw each sender's items in
// order, and every item object was destroyed exactly once.
//
// memory_stream_test already pushes 1,000,000 items through one stream of each buffer size
// under random cancellations; this file is about everything at once.
// Size: ANYIO_STRESS_SCALE (tests/test_support.hpp); 1.0 moves 2,000,000 items.
#include <anyio/anyio.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;

// The item's heap part: counts live objects, so a lost, leaked or doubly destroyed item shows.
struct Payload {
    static inline std::atomic<std::int64_t> alive{0};
    Payload() { alive.fetch_add(1, std::memory_order_relaxed); }  // relaxed: a counter
    Payload(const Payload&) = delete;
    Payload& operator=(const Payload&) = delete;
    ~Payload() { alive.fetch_sub(1, std::memory_order_relaxed); }
};

// A move-only item, tagged with who sent it and its place in that sender's sequence.
struct Item {
    int sender = -1;
    std::int64_t sequence = -1;
    std::unique_ptr<Payload> payload;
};

Item make_item(int sender, std::int64_t sequence) {
    return Item{sender, sequence, std::make_unique<Payload>()};
}

using Send = anyio::MemoryObjectSendStream<Item>;
using Receive = anyio::MemoryObjectReceiveStream<Item>;

// Who feeds a stream.
enum class Feeder : std::uint8_t { tasks, workers, plain_threads };

struct StreamConfig {
    std::size_t buffer;
    Feeder feeder;
    bool relayed;  // its receiver is a relay into the next stream, whose receivers check
    bool doomed;   // every receiver closes early: the senders end with BrokenResourceError
};

// Eight streams: rendezvous, 1, 16 (fed from workers), unbounded, 4 relayed into 0, 8 whose
// receivers all leave, 64 (fed from plain threads).
const std::vector<StreamConfig> stream_configs{
    {0, Feeder::tasks, false, false},
    {1, Feeder::tasks, false, false},
    {16, Feeder::workers, false, false},
    {anyio::unbounded, Feeder::tasks, false, false},
    {4, Feeder::tasks, true, false},
    {0, Feeder::tasks, false, false},  // the relay's output (no senders of its own)
    {8, Feeder::tasks, false, true},
    {64, Feeder::plain_threads, false, false},
};
constexpr int receivers_per_stream = 6;
constexpr int plain_senders = 4;

struct SenderState {
    int stream = 0;
    std::int64_t target = 0;
    std::int64_t delivered = 0;  // sends that returned (each item delivered once)
    bool broken = false;         // ended by BrokenResourceError
    std::vector<std::uint8_t> received;  // how many times each sequence number arrived
};

struct ReceiverState {
    int stream = 0;
    int origin = 0;  // the stream whose senders' items it gets (the relay's input, after a relay)
    std::vector<std::int64_t> last;  // per sender: the last sequence this receiver got
    std::int64_t items = 0;
};

struct World {
    std::vector<std::optional<Send>> send_ends;       // per stream: the original (closed once set up)
    std::vector<std::optional<Receive>> receive_ends;
    std::vector<SenderState> senders;
    std::vector<ReceiverState> receivers;
    std::vector<std::unique_ptr<Send>> plain_ends;  // the plain threads' clones (closed on the loop)
    std::vector<anyio::CancelScope*> slots;  // scopes of tasks the driver may cancel
    int workers_left = 0;                    // tasks (other than the driver) still running
    std::int64_t out_of_order = 0;
    std::int64_t foreign_items = 0;          // an item on a stream its sender does not feed
    std::int64_t cancels = 0;
    std::int64_t relayed = 0;
    std::int64_t worker_batches = 0;
    std::int64_t early_closes = 0;
    anyio::LoopToken token;

    // Checks an item a receiver got, and counts it for its sender.
    void check(ReceiverState& receiver, Item& item) {
        if (item.sender < 0 || item.sender >= static_cast<int>(senders.size()) || !item.payload) {
            ++foreign_items;
            return;
        }
        SenderState& sender = senders[static_cast<std::size_t>(item.sender)];
        if (sender.stream != receiver.origin || item.sequence < 0 || item.sequence >= sender.target) {
            ++foreign_items;
            return;
        }
        ++sender.received[static_cast<std::size_t>(item.sequence)];
        std::int64_t& last = receiver.last[static_cast<std::size_t>(item.sender)];
        if (item.sequence <= last) ++out_of_order;
        last = item.sequence;
        ++receiver.items;
    }

    std::size_t slot_of(int index) const { return static_cast<std::size_t>(index); }
};

// A sender task: sends its sequence (a cancelled send did not deliver: the same item is sent
// again), then closes its clone.
anyio::Task<> task_sender(World& world, int index, Send tx) {
    SenderState& me = world.senders[static_cast<std::size_t>(index)];
    while (me.delivered < me.target && !me.broken) {
        anyio::CancelScope scope;
        world.slots[world.slot_of(index)] = &scope;
        (void)co_await scope.run([&]() -> anyio::Task<> {
            try {
                while (me.delivered < me.target) {
                    Item item = make_item(index, me.delivered);
                    co_await tx.send(std::move(item));
                    ++me.delivered;
                }
            } catch (const anyio::BrokenResourceError&) {
                me.broken = true;
            }
        }());
        world.slots[world.slot_of(index)] = nullptr;
    }
    tx.close();
    --world.workers_left;
}

// A sender whose items come from a worker thread: batches of up to 16 items, each sent with
// from_thread::run. Cancelling the task cancels the send in progress, which then did not
// deliver; the next batch resumes from there.
anyio::Task<> worker_sender(World& world, int index, Send tx) {
    SenderState& me = world.senders[static_cast<std::size_t>(index)];
    while (me.delivered < me.target && !me.broken) {
        anyio::CancelScope scope;
        world.slots[world.slot_of(index)] = &scope;
        auto batch = [&me, &tx, index] {
            for (int i = 0; i < 16 && me.delivered < me.target; ++i) {
                // The coroutine runs on the loop: `me` and `tx` are touched there only.
                anyio::from_thread::run([&]() -> anyio::Task<> {
                    try {
                        Item item = make_item(index, me.delivered);
                        co_await tx.send(std::move(item));
                        ++me.delivered;
                    } catch (const anyio::BrokenResourceError&) {
                        me.broken = true;
                    }
                });
                if (me.broken) return;
            }
        };
        (void)co_await scope.run([&]() -> anyio::Task<> { co_await anyio::to_thread::run_sync(batch); }());
        world.slots[world.slot_of(index)] = nullptr;
        ++world.worker_batches;
    }
    tx.close();
    --world.workers_left;
}

// A receiver: takes items until the end of the stream (or, for a doomed stream, until it
// decides to leave), checking each. A receiver handed an item keeps it even when cancelled in
// that turn, so nothing is lost between its attempts.
anyio::Task<> receiver_task(World& world, int slot, int index, Receive rx, std::int64_t leave_after) {
    ReceiverState& me = world.receivers[static_cast<std::size_t>(index)];
    bool ended = false;
    while (!ended) {
        anyio::CancelScope scope;
        world.slots[world.slot_of(slot)] = &scope;
        (void)co_await scope.run([&]() -> anyio::Task<> {
            while (auto item = co_await rx.next()) {
                world.check(me, *item);
                if (me.items >= leave_after) break;
            }
            ended = true;
        }());
        world.slots[world.slot_of(slot)] = nullptr;
    }
    if (leave_after != INT64_MAX) ++world.early_closes;
    rx.close();
    --world.workers_left;
}

// The relay: moves every item of one stream into the next, keeping an item it holds across a
// cancellation (a cancelled send leaves the item with the caller).
anyio::Task<> relay_task(World& world, int slot, Receive rx, Send tx) {
    std::optional<Item> held;
    bool ended = false;
    while (!ended) {
        anyio::CancelScope scope;
        world.slots[world.slot_of(slot)] = &scope;
        (void)co_await scope.run([&]() -> anyio::Task<> {
            for (;;) {
                if (!held) {
                    held = co_await rx.next();
                    if (!held) break;
                }
                co_await tx.send(std::move(*held));
                held.reset();
                ++world.relayed;
            }
            ended = true;
        }());
        world.slots[world.slot_of(slot)] = nullptr;
    }
    tx.close();
    rx.close();
    --world.workers_left;
}

// A plain thread's sender: each item through from_thread::run with the loop's token, then the
// clone is closed on the loop.
void plain_sender(World& world, int index, Send* tx) {
    SenderState& me = world.senders[static_cast<std::size_t>(index)];
    for (;;) {
        bool more = false;
        anyio::from_thread::run(world.token, [&]() -> anyio::Task<> {
            more = me.delivered < me.target && !me.broken;
            if (!more) co_return;
            try {
                Item item = make_item(index, me.delivered);
                co_await tx->send(std::move(item));
                ++me.delivered;
            } catch (const anyio::BrokenResourceError&) {
                me.broken = true;
            }
        });
        if (!more) break;
    }
    anyio::from_thread::run_sync(world.token, [&] {
        tx->close();
        --world.workers_left;
    });
}

// Cancels random tasks' scopes until every other task has finished.
anyio::Task<> canceller(World& world) {
    std::mt19937_64 rng(0xca11);
    while (world.workers_left > 0) {
        for (int i = 0; i < 3; ++i) {
            anyio::CancelScope* scope = world.slots[rng() % world.slots.size()];
            if (scope != nullptr && !scope->cancel_called() && rng() % 4 == 0) {
                scope->cancel();
                ++world.cancels;
            }
        }
        co_await anyio::checkpoint();
    }
}

struct StreamReport {
    std::int64_t items_sent = 0;      // sends that returned
    std::int64_t items_received = 0;
    std::int64_t duplicates = 0;
    std::int64_t missing = 0;         // delivered on a stream that was drained, never received
    std::int64_t out_of_order = 0;
    std::int64_t foreign = 0;
    std::int64_t unfinished_senders = 0;  // neither done nor broken
    std::int64_t broken_senders = 0;
    std::int64_t broken_on_healthy = 0;   // BrokenResourceError on a stream with receivers left
    std::int64_t cancels = 0;
    std::int64_t relayed = 0;
    std::int64_t worker_batches = 0;
    std::int64_t early_closes = 0;
    std::int64_t alive_after = 0;
    std::size_t leftover_buffered = 0;
    std::size_t leftover_waiting = 0;
    int tasks = 0;
};

anyio::Task<> run_world(World& world, StreamReport& report, std::int64_t total_items, int senders_per_stream,
                        std::vector<std::thread>& plain) {
    world.token = anyio::lowlevel::current_token();
    const std::size_t streams = stream_configs.size();
    for (const StreamConfig& config : stream_configs) {
        auto [tx, rx] = anyio::create_memory_object_stream<Item>(config.buffer);
        world.send_ends.emplace_back(std::move(tx));
        world.receive_ends.emplace_back(std::move(rx));
    }
    // Senders: the streams that are not a relay's output.
    std::vector<int> fed;
    for (std::size_t s = 0; s < streams; ++s) {
        if (s > 0 && stream_configs[s - 1].relayed) continue;
        fed.push_back(static_cast<int>(s));
    }
    const std::int64_t per_sender = std::max<std::int64_t>(1, total_items / (static_cast<std::int64_t>(fed.size()) * senders_per_stream));
    for (int s : fed) {
        const int count = stream_configs[static_cast<std::size_t>(s)].feeder == Feeder::plain_threads
                              ? plain_senders
                              : senders_per_stream;
        for (int i = 0; i < count; ++i) {
            SenderState sender;
            sender.stream = s;
            // Plain threads send more each (there are few of them): as much as the tasks would.
            sender.target = count == plain_senders ? per_sender * senders_per_stream / plain_senders / 8 + 1 : per_sender;
            sender.received.assign(static_cast<std::size_t>(sender.target), 0);
            world.senders.push_back(std::move(sender));
        }
    }
    for (std::size_t s = 0; s < streams; ++s) {
        if (stream_configs[s].relayed) continue;  // its receiver is the relay
        for (int r = 0; r < receivers_per_stream; ++r) {
            ReceiverState receiver;
            receiver.stream = static_cast<int>(s);
            receiver.origin = s > 0 && stream_configs[s - 1].relayed ? static_cast<int>(s) - 1 : static_cast<int>(s);
            receiver.last.assign(world.senders.size(), -1);
            world.receivers.push_back(std::move(receiver));
        }
    }
    const std::size_t relays = static_cast<std::size_t>(std::count_if(
        stream_configs.begin(), stream_configs.end(), [](const StreamConfig& c) { return c.relayed; }));
    world.slots.assign(world.senders.size() + world.receivers.size() + relays, nullptr);
    world.workers_left = static_cast<int>(world.slots.size());
    report.tasks = static_cast<int>(world.slots.size()) + 1;

    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        std::mt19937_64 rng(0x57e4);
        tg.start_soon(canceller, std::ref(world));
        int slot = static_cast<int>(world.senders.size());
        for (int i = 0; i < static_cast<int>(world.senders.size()); ++i) {
            const int s = world.senders[static_cast<std::size_t>(i)].stream;
            Send tx = world.send_ends[static_cast<std::size_t>(s)]->clone();
            switch (stream_configs[static_cast<std::size_t>(s)].feeder) {
            case Feeder::tasks:
                tg.start_soon(task_sender, std::ref(world), i, std::move(tx));
                break;
            case Feeder::workers:
                // Every other sender of this stream is a worker; the others are tasks.
                if (i % 2 == 0) {
                    tg.start_soon(worker_sender, std::ref(world), i, std::move(tx));
                } else {
                    tg.start_soon(task_sender, std::ref(world), i, std::move(tx));
                }
                break;
            case Feeder::plain_threads: {
                world.plain_ends.push_back(std::make_unique<Send>(std::move(tx)));
                Send* end = world.plain_ends.back().get();
                plain.emplace_back([&world, i, end] { plain_sender(world, i, end); });
                break;
            }
            }
        }
        int receiver_index = 0;
        for (std::size_t s = 0; s < streams; ++s) {
            if (stream_configs[s].relayed) {
                tg.start_soon(relay_task, std::ref(world), slot++, world.receive_ends[s]->clone(),
                              world.send_ends[s + 1]->clone());
                continue;
            }
            for (int r = 0; r < receivers_per_stream; ++r) {
                // On a doomed stream every receiver leaves after a few items; elsewhere one
                // receiver in three leaves early, and the others drain the stream.
                std::int64_t leave_after = INT64_MAX;
                if (stream_configs[s].doomed) {
                    leave_after = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(per_sender * 4 + 1));
                } else if (r % 3 == 2) {
                    leave_after = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(per_sender * 8 + 1));
                }
                tg.start_soon(receiver_task, std::ref(world), slot++, receiver_index++,
                              world.receive_ends[s]->clone(), leave_after);
            }
        }
        // The originals are not needed any more: the clones hold the streams open.
        for (auto& tx : world.send_ends) tx->close();
        for (auto& rx : world.receive_ends) rx->close();
        co_return;
    });

    for (std::size_t s = 0; s < streams; ++s) {
        const anyio::MemoryObjectStreamStatistics stats = world.send_ends[s]->statistics();
        report.leftover_buffered += stats.current_buffer_used;
        report.leftover_waiting += stats.tasks_waiting_send + stats.tasks_waiting_receive;
    }
    for (const SenderState& sender : world.senders) {
        const bool doomed = stream_configs[static_cast<std::size_t>(sender.stream)].doomed;
        report.items_sent += sender.delivered;
        if (sender.delivered < sender.target && !sender.broken) ++report.unfinished_senders;
        if (sender.broken) ++report.broken_senders;
        if (sender.broken && !doomed) ++report.broken_on_healthy;
        for (std::int64_t seq = 0; seq < sender.target; ++seq) {
            const std::uint8_t got = sender.received[static_cast<std::size_t>(seq)];
            if (got > 1) ++report.duplicates;
            // Every delivered item of a drained stream arrived; items arrive only if delivered.
            if (seq < sender.delivered && got == 0 && !doomed) ++report.missing;
            if (seq >= sender.delivered && got != 0) ++report.duplicates;
            report.items_received += got;
        }
    }
    report.out_of_order = world.out_of_order;
    report.foreign = world.foreign_items;
    report.cancels = world.cancels;
    report.relayed = world.relayed;
    report.worker_batches = world.worker_batches;
    report.early_closes = world.early_closes;
}

}  // namespace

TEST_CASE("Items through eight streams at once, from thousands of tasks, workers and threads, "
          "with clones leaving and random cancellations, arrive exactly once and in order",
          "[stress][stream]") {
    const std::int64_t total_items = scaled(2'000'000, 20'000);
    const int senders_per_stream = static_cast<int>(std::clamp<std::int64_t>(total_items / 400, 50, 250));
    const std::size_t baseline = quiet_thread_count();
    World world;
    StreamReport report;
    std::vector<std::thread> plain;
    const Stopwatch watch;
    anyio::run(anyio::fail_after(60s + std::chrono::seconds(total_items / 20'000),
                                 [&]() -> anyio::Task<> {
                                     co_await run_world(world, report, total_items, senders_per_stream, plain);
                                 }()),
               {.thread_name = "stream worker"});
    for (std::thread& thread : plain) thread.join();
    world.plain_ends.clear();  // closed on the loop already; destroyed once the loop has finished
    report.alive_after = Payload::alive.load(std::memory_order_relaxed);  // relaxed: all threads joined
    const double elapsed = std::chrono::duration<double>(watch.elapsed()).count();
    WARN("streams: " << report.items_sent << " items delivered (" << report.items_received << " received, "
                     << report.relayed << " relayed) by " << report.tasks << " tasks in " << elapsed << " s; "
                     << report.cancels << " cancellations, " << report.worker_batches << " worker batches, "
                     << report.early_closes << " receivers left early, " << report.broken_senders
                     << " senders ended by BrokenResourceError");

    CHECK(report.duplicates == 0);
    CHECK(report.missing == 0);
    CHECK(report.out_of_order == 0);
    CHECK(report.foreign == 0);
    CHECK(report.unfinished_senders == 0);
    CHECK(report.broken_on_healthy == 0);
    CHECK(report.broken_senders > 0);  // the doomed stream's senders
    CHECK(report.cancels > 0);
    CHECK(report.relayed > 0);
    CHECK(report.worker_batches > 0);
    CHECK(report.items_received <= report.items_sent);
    CHECK(report.items_sent >= total_items / 2);
    // Nothing left in the streams, nobody waiting, every item object destroyed exactly once.
    CHECK(report.leftover_buffered == 0);
    CHECK(report.leftover_waiting == 0);
    CHECK(report.alive_after == 0);
    CHECK(eventually_true([&] { return threads_named("stream worker") == 0 && thread_count() == baseline; }));
}
