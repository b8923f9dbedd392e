// Stress for the offload path (issue 15, "Stress"): a large number of to_thread::run_sync calls
// from thousands of tasks at once, with every feature of the path mixed at random, and an
// account of every single call at the end. The single behaviours are tested once each in
// to_thread_test, capacity_limiter_test and from_thread_test; this file shows that they hold
// together, under load. Also here: leaving run() with hundreds of calls still in flight.
//
// Size: ANYIO_STRESS_SCALE (tests/test_support.hpp); 1.0 is the 1,000,000 offloads.
#include <anyio/anyio.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <memory>
#include <random>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "test_support.hpp"

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;
using anyio::to_thread::run_sync;
using anyio::to_thread::RunSyncOptions;
using Clock = std::chrono::steady_clock;

constexpr const char* worker_name = "stress worker";

// ---------------------------------------------------------------------------------------------
// The mix
// ---------------------------------------------------------------------------------------------

// What fn does.
enum class Kind : std::uint8_t {
    int_value,          // returns a number derived from the call's id
    string_value,       // returns a std::string (allocated on the worker, freed on the loop)
    unique_value,       // returns a std::unique_ptr (move-only)
    std_error,          // throws std::runtime_error naming the id
    custom_error,       // throws a type derived from std::runtime_error
    non_std_error,      // throws Boom, which is not a std::exception
    stop_token,         // takes a std::stop_token and ends early when stop is requested
    from_thread_sync,   // calls back into the loop with from_thread::run_sync
    from_thread_async,  // from_thread::run of a coroutine that offloads again (nested)
    check_cancelled,    // polls from_thread::check_cancelled while it works
    sleepy,             // blocks its thread for a moment (calls overlap, tokens run out)
    count
};

// How the call is awaited.
enum class Mode : std::uint8_t {
    shielded_call,  // the default: cancellation waits for fn
    abandon,        // abandon_on_cancel: cancellation makes the caller leave at once
    shield_scope,   // the call inside a shielded CancelScope: cancellation never reaches it
    count
};

// How the co_await ended, as the caller saw it.
enum class Outcome : std::uint8_t { none, value, std_error, non_std_error, cancelled };

// How fn itself ended, as the worker saw it.
enum class FnEnd : std::uint8_t { not_run, returned, threw, cancelled };

// Every call has one record. The loop-side fields are written by the calling task; the
// worker-side ones by fn, on the worker thread.
struct CallRecord {
    // relaxed (both): fn writes them, and the loop reads them only after fn's completion was
    // handed back (the library's inbox orders it) or after the pool has no busy worker left.
    std::atomic<std::uint8_t> runs{0};
    std::atomic<FnEnd> fn_end{FnEnd::not_run};
    Kind kind = Kind::int_value;
    Mode mode = Mode::shielded_call;
    std::uint8_t limiter = 0;
    Outcome outcome = Outcome::none;
    std::uint8_t outcomes = 0;  // how many times the caller recorded an outcome (must be 1)
    bool wrong_result = false;  // a value or an exception that does not belong to this call
};

std::int64_t expected_int(std::int64_t id) { return id * 7 + 1; }

// The limiters of the mix. Index 0 is the loop's default limiter.
constexpr std::size_t limiter_count = 4;
struct LimiterRange {
    std::int64_t initial;
    std::int64_t low;
    std::int64_t high;
};
// default, tight (often 0 or 1: long queues, many calls cancelled while waiting), medium, wide.
constexpr std::array<LimiterRange, limiter_count> limiter_ranges{{
    {40, 8, 40},
    {1, 0, 2},
    {4, 1, 8},
    {16, 4, 16},
}};
constexpr std::int64_t nested_tokens = 16;  // the limiter of the offloads made from the loop

struct Harness;

// RAII on the worker: counts fn as running (globally and per limiter), records how it ended.
struct FnRun {
    FnRun(Harness& harness, std::int64_t id);
    ~FnRun();
    FnRun(const FnRun&) = delete;
    FnRun& operator=(const FnRun&) = delete;
    Harness& harness;
    CallRecord& record;
    FnEnd end = FnEnd::threw;
};

struct Harness {
    explicit Harness(std::int64_t calls, int tasks) : tasks(tasks), total_calls(calls) {
        records = std::make_unique<CallRecord[]>(static_cast<std::size_t>(calls));
        slots.assign(static_cast<std::size_t>(tasks), nullptr);
    }

    // ---- shared with workers ----
    std::unique_ptr<CallRecord[]> records;
    std::atomic<int> running{0};      // fns running now (outer and nested)
    std::atomic<int> peak_running{0};
    std::array<std::atomic<int>, limiter_count> running_on{};  // outer fns per limiter
    // Written by the loop when a total is raised, read by fns: the most a limiter ever allowed.
    std::array<std::atomic<std::int64_t>, limiter_count> max_total{};
    std::atomic<int> over_limit{0};   // a fn found more fns on its limiter than it ever allowed
    std::atomic<std::int64_t> nested_runs{0};
    std::atomic<int> loop_callbacks_off_loop{0};  // from_thread::run_sync fns not on the loop
    std::thread::id loop_thread;

    // ---- loop side ----
    int tasks;
    std::int64_t total_calls;
    std::int64_t next_id = 0;
    int callers_left = 0;
    std::vector<anyio::CancelScope*> slots;  // the scope of each task's call in progress
    std::array<anyio::CapacityLimiter*, limiter_count> limiters{};
    anyio::CapacityLimiter* nested = nullptr;
    std::int64_t loop_side_calls = 0;  // from_thread::run_sync callbacks run on the loop
    std::int64_t cancels_sent = 0;
    std::int64_t resizes = 0;
    int stats_violations = 0;

    void note_running_started(std::size_t limiter) {
        // relaxed: counters; only their values matter, not ordering with other memory.
        const int now = running.fetch_add(1, std::memory_order_relaxed) + 1;
        int peak = peak_running.load(std::memory_order_relaxed);
        while (now > peak && !peak_running.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
        }
        if (limiter < limiter_count) {
            // relaxed: as above; max_total only grows, and is raised before a token is granted.
            const int on = running_on[limiter].fetch_add(1, std::memory_order_relaxed) + 1;
            if (on > max_total[limiter].load(std::memory_order_relaxed)) {
                over_limit.fetch_add(1, std::memory_order_relaxed);
            }
        }
    }
    void note_running_ended(std::size_t limiter) {
        running.fetch_sub(1, std::memory_order_relaxed);  // relaxed: a counter
        if (limiter < limiter_count) running_on[limiter].fetch_sub(1, std::memory_order_relaxed);
    }

    RunSyncOptions options_for(const CallRecord& record) const {
        return {.limiter = record.limiter == 0 ? nullptr : limiters[record.limiter],
                .abandon_on_cancel = record.mode == Mode::abandon};
    }

    static void record_outcome(CallRecord& record, Outcome outcome) {
        record.outcome = outcome;
        ++record.outcomes;
    }

    // ---- the blocking functions (worker side) ----

    // fn for every kind that yields an int64.
    struct IntFn {
        Harness* harness;
        std::int64_t id;
        std::int64_t operator()() const {
            FnRun run(*harness, id);
            std::int64_t result = expected_int(id);
            switch (run.record.kind) {
            case Kind::std_error:
                throw std::runtime_error("call " + std::to_string(id));
            case Kind::custom_error:
                throw CustomError("call " + std::to_string(id));
            case Kind::non_std_error:
                throw Boom{static_cast<int>(id)};
            case Kind::from_thread_sync:
                result = anyio::from_thread::run_sync([this] {
                    if (std::this_thread::get_id() != harness->loop_thread) {
                        harness->loop_callbacks_off_loop.fetch_add(1, std::memory_order_relaxed);
                    }
                    ++harness->loop_side_calls;  // on the loop thread: plain state
                    return expected_int(id);
                });
                break;
            case Kind::from_thread_async:
                try {
                    result = anyio::from_thread::run(&Harness::nested_offload, harness, id);
                } catch (const anyio::Cancelled&) {
                    run.end = FnEnd::cancelled;  // the caller was cancelled: so was the coroutine
                    throw;
                }
                break;
            case Kind::check_cancelled:
                try {
                    for (int i = 0; i < 4; ++i) {
                        anyio::from_thread::check_cancelled();
                        std::this_thread::sleep_for(20us);
                    }
                } catch (const anyio::Cancelled&) {
                    run.end = FnEnd::cancelled;
                    throw;
                }
                break;
            case Kind::sleepy:
                std::this_thread::sleep_for(std::chrono::microseconds(50 + id % 150));
                break;
            default:
                break;
            }
            run.end = FnEnd::returned;
            return result;
        }
    };

    struct StringFn {
        Harness* harness;
        std::int64_t id;
        std::string operator()() const {
            FnRun run(*harness, id);
            std::string result = "call " + std::to_string(id) + " of a stress run, long enough to allocate";
            run.end = FnEnd::returned;
            return result;
        }
    };

    struct UniqueFn {
        Harness* harness;
        std::int64_t id;
        std::unique_ptr<std::int64_t> operator()() const {
            FnRun run(*harness, id);
            auto result = std::make_unique<std::int64_t>(expected_int(id));
            run.end = FnEnd::returned;
            return result;
        }
    };

    // Ends early (still returning its value) once the caller's cancellation requests a stop.
    struct StopFn {
        Harness* harness;
        std::int64_t id;
        std::int64_t operator()(std::stop_token stop) const {
            FnRun run(*harness, id);
            for (int i = 0; i < 20 && !stop.stop_requested(); ++i) std::this_thread::sleep_for(10us);
            run.end = FnEnd::returned;
            return expected_int(id);
        }
    };

    // The coroutine a from_thread_async fn runs on the loop: it offloads again, through a
    // limiter of its own (the outer call holds a token and a thread meanwhile).
    static anyio::Task<std::int64_t> nested_offload(Harness* harness, std::int64_t id) {
        co_await anyio::checkpoint();
        auto nested_fn = [harness](std::int64_t value) {
            harness->note_running_started(limiter_count);  // not one of the mix's limiters
            harness->nested_runs.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
            harness->note_running_ended(limiter_count);
            return expected_int(value);
        };
        co_return co_await run_sync({.limiter = harness->nested}, nested_fn, id);
    }

    // ---- the calling tasks (loop side) ----

    // One call, awaited in its record's mode; records how it ended.
    static anyio::Task<> one_call(Harness* harness, std::int64_t id) {
        CallRecord& record = harness->records[id];
        const RunSyncOptions options = harness->options_for(record);
        try {
            switch (record.kind) {
            case Kind::string_value: {
                std::string value = co_await run_sync(options, StringFn{harness, id});
                if (value.find("call " + std::to_string(id) + " ") != 0) record.wrong_result = true;
                break;
            }
            case Kind::unique_value: {
                std::unique_ptr<std::int64_t> value = co_await run_sync(options, UniqueFn{harness, id});
                if (!value || *value != expected_int(id)) record.wrong_result = true;
                break;
            }
            case Kind::stop_token: {
                const std::int64_t value = co_await run_sync(options, StopFn{harness, id});
                if (value != expected_int(id)) record.wrong_result = true;
                break;
            }
            default: {
                const std::int64_t value = co_await run_sync(options, IntFn{harness, id});
                if (value != expected_int(id)) record.wrong_result = true;
                break;
            }
            }
            record_outcome(record, Outcome::value);
        } catch (const anyio::Cancelled&) {
            record_outcome(record, Outcome::cancelled);
            throw;
        } catch (const Boom& boom) {
            if (boom.code != static_cast<int>(id)) record.wrong_result = true;
            record_outcome(record, Outcome::non_std_error);
        } catch (const std::exception& error) {
            const bool custom = dynamic_cast<const CustomError*>(&error) != nullptr;
            if (error.what() != "call " + std::to_string(id) ||
                custom != (record.kind == Kind::custom_error)) {
                record.wrong_result = true;
            }
            record_outcome(record, Outcome::std_error);
        }
    }

    // A call under a shield: a cancellation of the scope around it waits until it is done.
    static anyio::Task<> shielded_call(Harness* harness, std::int64_t id) {
        anyio::CancelScope shield(anyio::CancelScope::time_point::max(), true);
        (void)co_await shield.run(one_call(harness, id));
        co_await anyio::checkpoint();  // a cancellation that waited for the shield arrives here
    }

    // One of the thousands of calling tasks: `calls` calls one after the other, each in a
    // scope of its own that the driver may cancel, some with a short deadline.
    static anyio::Task<> caller(Harness* harness, int index, std::int64_t calls) {
        std::mt19937_64 rng(0x5eed0000u + static_cast<unsigned>(index));
        for (std::int64_t j = 0; j < calls; ++j) {
            const std::int64_t id = harness->next_id++;
            CallRecord& record = harness->records[id];
            record.kind = static_cast<Kind>(rng() % static_cast<unsigned>(Kind::count));
            record.mode = static_cast<Mode>(rng() % static_cast<unsigned>(Mode::count));
            record.limiter = static_cast<std::uint8_t>(rng() % limiter_count);
            // HOOK(context variables, API.md "Context variables"): when context.hpp lands, set
            // a ContextVar here to a value derived from `id`, and have every fn above (and the
            // from_thread callbacks and nested_offload) check that it sees exactly that value.
            auto deadline = anyio::CancelScope::time_point::max();
            if (rng() % 4 == 0) deadline = anyio::current_time() + std::chrono::microseconds(rng() % 400);
            anyio::CancelScope scope(deadline);
            harness->slots[static_cast<std::size_t>(index)] = &scope;
            if (record.mode == Mode::shield_scope) {
                (void)co_await scope.run(shielded_call(harness, id));
            } else {
                (void)co_await scope.run(one_call(harness, id));
            }
            harness->slots[static_cast<std::size_t>(index)] = nullptr;
            if (rng() % 8 == 0) co_await anyio::checkpoint();
        }
        --harness->callers_left;
    }

    // Cancels random calls in progress, moves limiter totals up and down, and checks the pool's
    // statistics, until every caller has finished; then restores the totals.
    static anyio::Task<> driver(Harness* harness) {
        std::mt19937_64 rng(0xd21e5u);
        for (std::uint64_t turn = 0; harness->callers_left > 0; ++turn) {
            co_await anyio::sleep(100us);
            for (int i = 0; i < 4; ++i) {
                anyio::CancelScope* scope = harness->slots[rng() % harness->slots.size()];
                if (scope != nullptr && !scope->cancel_called()) {
                    scope->cancel();
                    ++harness->cancels_sent;
                }
            }
            if (turn % 4 == 0) {
                const std::size_t which = rng() % limiter_count;
                const LimiterRange range = limiter_ranges[which];
                const std::int64_t total =
                    range.low + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(range.high - range.low + 1));
                harness->set_total(which, total);
            }
            if (turn % 64 == 0) harness->check_statistics();
        }
        for (std::size_t i = 0; i < limiter_count; ++i) harness->set_total(i, limiter_ranges[i].initial);
    }

    void set_total(std::size_t which, std::int64_t total) {
        // relaxed: fns compare against it after being granted a token, which the loop hands
        // out after this store (the dispatch to the worker orders it).
        if (total > max_total[which].load(std::memory_order_relaxed)) {
            max_total[which].store(total, std::memory_order_relaxed);
        }
        limiters[which]->set_total_tokens(total);
        ++resizes;
    }

    // What must hold at any moment: a busy worker holds a token; idle and busy workers are
    // workers; no more workers than threads ever started.
    void check_statistics() {
        const anyio::WorkerPoolStatistics stats = anyio::to_thread::statistics();
        std::int64_t borrowed = nested->borrowed_tokens();
        for (anyio::CapacityLimiter* limiter : limiters) borrowed += limiter->borrowed_tokens();
        if (static_cast<std::int64_t>(stats.busy_workers) > borrowed) ++stats_violations;
        if (stats.idle_workers + stats.busy_workers > stats.workers) ++stats_violations;
        if (stats.workers > stats.threads_created) ++stats_violations;
    }
};

FnRun::FnRun(Harness& harness, std::int64_t id) : harness(harness), record(harness.records[id]) {
    record.runs.fetch_add(1, std::memory_order_relaxed);  // relaxed: see CallRecord
    harness.note_running_started(record.limiter);
}

FnRun::~FnRun() {
    record.fn_end.store(end, std::memory_order_relaxed);  // relaxed: see CallRecord
    harness.note_running_ended(record.limiter);
}

// What one stress run found, checked by the test case on the main thread.
struct OffloadReport {
    std::int64_t calls = 0;
    std::int64_t unaccounted = 0;       // no outcome, or more than one
    std::int64_t double_runs = 0;       // fn ran more than once
    std::int64_t wrong_results = 0;
    std::int64_t inconsistent = 0;      // the outcome does not match how fn ended
    std::int64_t shielded_cancelled = 0;  // a call under a shield was cancelled
    std::int64_t values = 0, std_errors = 0, non_std_errors = 0, cancelled = 0;
    std::int64_t cancelled_unstarted = 0;  // cancelled before fn ran (waiting for a token...)
    std::int64_t abandoned_running = 0;    // abandoned while fn ran on
    std::int64_t cancelled_in_fn = 0;      // fn saw the cancellation (check_cancelled, from_thread)
    std::int64_t fn_runs = 0;
    std::int64_t nested_runs = 0;
    std::int64_t loop_side_calls = 0;
    std::int64_t cancels_sent = 0;
    std::int64_t resizes = 0;
    int over_limit = 0;
    int off_loop = 0;
    int stats_violations = 0;
    int peak_running = 0;
    std::int64_t max_threads = 0;  // the most the limiters ever allowed at once
    anyio::WorkerPoolStatistics stats;
    std::array<std::int64_t, limiter_count + 1> borrowed_left{};
    std::array<std::size_t, limiter_count + 1> waiting_left{};
    std::array<std::size_t, limiter_count + 1> borrowers_left{};
    bool busy_workers_drained = false;
};

anyio::Task<> run_mix(Harness& harness, OffloadReport& report) {
    harness.loop_thread = std::this_thread::get_id();
    std::array<std::unique_ptr<anyio::CapacityLimiter>, limiter_count> owned;
    harness.limiters[0] = &anyio::to_thread::current_default_thread_limiter();
    for (std::size_t i = 1; i < limiter_count; ++i) {
        owned[i] = std::make_unique<anyio::CapacityLimiter>(limiter_ranges[i].initial);
        harness.limiters[i] = owned[i].get();
    }
    for (std::size_t i = 0; i < limiter_count; ++i) {
        harness.max_total[i].store(limiter_ranges[i].initial, std::memory_order_relaxed);  // relaxed: before any worker
    }
    anyio::CapacityLimiter nested(nested_tokens);
    harness.nested = &nested;

    const std::int64_t per_task = harness.total_calls / harness.tasks;
    harness.callers_left = harness.tasks;
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon(&Harness::driver, &harness);
        for (int t = 0; t < harness.tasks; ++t) tg.start_soon(&Harness::caller, &harness, t, per_task);
        co_return;
    });

    // Abandoned fns may still run: wait for them (bounded), so their completions are counted.
    const auto until = anyio::current_time() + 10s;
    while (anyio::to_thread::statistics().busy_workers > 0 && anyio::current_time() < until) {
        co_await anyio::sleep(1ms);
    }
    report.busy_workers_drained = anyio::to_thread::statistics().busy_workers == 0;

    report.calls = harness.next_id;
    for (std::int64_t id = 0; id < harness.next_id; ++id) {
        const CallRecord& record = harness.records[id];
        const std::uint8_t runs = record.runs.load(std::memory_order_relaxed);  // relaxed: see CallRecord
        const FnEnd end = record.fn_end.load(std::memory_order_relaxed);
        report.fn_runs += runs;
        if (record.outcomes != 1) ++report.unaccounted;
        if (runs > 1) ++report.double_runs;
        if (record.wrong_result) ++report.wrong_results;
        if (end == FnEnd::cancelled) ++report.cancelled_in_fn;
        switch (record.outcome) {
        case Outcome::value:
        case Outcome::std_error:
        case Outcome::non_std_error: {
            if (record.outcome == Outcome::value) ++report.values;
            if (record.outcome == Outcome::std_error) ++report.std_errors;
            if (record.outcome == Outcome::non_std_error) ++report.non_std_errors;
            // A delivered outcome is fn's own: it ran once and ended the way it was told to.
            const bool throws = record.kind == Kind::std_error || record.kind == Kind::custom_error ||
                                record.kind == Kind::non_std_error;
            const Outcome expected = !throws ? Outcome::value
                                     : record.kind == Kind::non_std_error ? Outcome::non_std_error
                                                                          : Outcome::std_error;
            const FnEnd expected_end = throws ? FnEnd::threw : FnEnd::returned;
            if (runs != 1 || end != expected_end || record.outcome != expected) ++report.inconsistent;
            break;
        }
        case Outcome::cancelled:
            ++report.cancelled;
            if (record.mode == Mode::shield_scope) ++report.shielded_cancelled;
            if (runs == 0) {
                ++report.cancelled_unstarted;
            } else if (record.mode == Mode::abandon) {
                ++report.abandoned_running;
            } else if (end != FnEnd::cancelled) {
                // Shielded by default: a call whose fn ran returns fn's outcome, unless fn
                // itself raised the caller's cancellation (check_cancelled, from_thread::run).
                ++report.inconsistent;
            }
            break;
        case Outcome::none:
            break;
        }
    }
    report.nested_runs = harness.nested_runs.load(std::memory_order_relaxed);  // relaxed: workers are idle
    report.loop_side_calls = harness.loop_side_calls;
    report.cancels_sent = harness.cancels_sent;
    report.resizes = harness.resizes;
    report.over_limit = harness.over_limit.load(std::memory_order_relaxed);
    report.off_loop = harness.loop_callbacks_off_loop.load(std::memory_order_relaxed);
    report.stats_violations = harness.stats_violations;
    report.peak_running = harness.peak_running.load(std::memory_order_relaxed);
    for (std::size_t i = 0; i < limiter_count; ++i) {
        report.max_threads += harness.max_total[i].load(std::memory_order_relaxed);
    }
    report.max_threads += nested_tokens;
    report.stats = anyio::to_thread::statistics();
    for (std::size_t i = 0; i <= limiter_count; ++i) {
        anyio::CapacityLimiter& limiter = i < limiter_count ? *harness.limiters[i] : nested;
        const anyio::CapacityLimiterStatistics stats = limiter.statistics();
        report.borrowed_left[i] = stats.borrowed_tokens;
        report.waiting_left[i] = stats.tasks_waiting;
        report.borrowers_left[i] = stats.borrowers.size();
    }
}

}  // namespace

TEST_CASE("A million offloads from thousands of tasks, with every feature mixed at random, each "
          "end exactly once",
          "[stress][to_thread]") {
    // At scale 1: 1,000,000 calls from 4,000 tasks.
    const std::int64_t calls = scaled(1'000'000, 2'000);
    const int tasks = static_cast<int>(std::clamp<std::int64_t>(calls / 50, 200, 4'000));
    const std::size_t baseline = quiet_thread_count();
    Harness harness(calls - calls % tasks, tasks);
    OffloadReport report;
    const Stopwatch watch;
    anyio::run(anyio::fail_after(60s + std::chrono::seconds(calls / 5'000), run_mix(harness, report)),
               {.thread_name = worker_name});
    const auto elapsed = std::chrono::duration<double>(watch.elapsed()).count();
    WARN("offload mix: " << report.calls << " calls from " << tasks << " tasks in " << elapsed
                         << " s; " << report.values << " values, " << report.std_errors
                         << " std errors, " << report.non_std_errors << " non-std errors, "
                         << report.cancelled << " cancelled (" << report.cancelled_unstarted
                         << " before fn ran, " << report.abandoned_running << " abandoned while fn ran, "
                         << report.cancelled_in_fn << " seen by fn); " << report.nested_runs
                         << " nested offloads, " << report.loop_side_calls << " from_thread::run_sync, "
                         << report.cancels_sent << " cancels, " << report.resizes << " resizes; "
                         << report.stats.threads_created << " threads, peak " << report.peak_running
                         << " fns at once");

    // Every call accounted for exactly once, and each outcome is fn's own.
    CHECK(report.calls == harness.total_calls);
    CHECK(report.unaccounted == 0);
    CHECK(report.double_runs == 0);
    CHECK(report.wrong_results == 0);
    CHECK(report.inconsistent == 0);
    CHECK(report.shielded_cancelled == 0);
    CHECK(report.values + report.std_errors + report.non_std_errors + report.cancelled == report.calls);
    CHECK(report.off_loop == 0);
    CHECK(report.over_limit == 0);
    // The mix really mixed: every kind of ending happened.
    CHECK(report.values > 0);
    CHECK(report.std_errors > 0);
    CHECK(report.non_std_errors > 0);
    CHECK(report.cancelled_unstarted > 0);
    CHECK(report.abandoned_running > 0);
    CHECK(report.nested_runs > 0);
    CHECK(report.loop_side_calls > 0);
    CHECK(report.resizes > 0);
    // Limiters back to 0 borrowed and 0 waiting.
    for (std::size_t i = 0; i <= limiter_count; ++i) {
        INFO("limiter " << i);
        CHECK(report.borrowed_left[i] == 0);
        CHECK(report.waiting_left[i] == 0);
        CHECK(report.borrowers_left[i] == 0);
    }
    // Pool statistics add up: every fn that ran (outer and nested) was one completed job;
    // threads were bounded by the limiters and started only when none was idle.
    CHECK(report.busy_workers_drained);
    CHECK(report.stats_violations == 0);
    CHECK(report.stats.busy_workers == 0);
    CHECK(report.stats.jobs_completed ==
          static_cast<std::uint64_t>(report.fn_runs + report.nested_runs));
    CHECK(report.stats.threads_created >= static_cast<std::uint64_t>(report.peak_running));
    // threads_created counts the whole run: a worker idle for max_idle_time is stopped and a
    // later call may start another (runs longer than 10 s, at full scale). The threads alive at
    // once are bounded: they are those created and not pruned.
    CHECK(report.stats.threads_created - report.stats.threads_pruned <= static_cast<std::uint64_t>(report.max_threads));
    CHECK(report.stats.idle_workers + report.stats.busy_workers <= report.stats.workers);
    // After run() returns no worker thread is alive.
    CHECK(threads_named(worker_name) == 0);
    CHECK(eventually_true([&] { return thread_count() == baseline; }));
}

// =============================================================================================
// Shutdown under load: leaving run() with hundreds of calls in flight
// =============================================================================================

namespace {

// A result that counts its live copies: late completions that are dropped must still destroy
// their results exactly once.
struct Tracked {
    static inline std::atomic<int> alive{0};
    explicit Tracked(int value) : value(value) { alive.fetch_add(1, std::memory_order_relaxed); }  // relaxed: a counter
    Tracked(Tracked&& other) noexcept : value(other.value) { alive.fetch_add(1, std::memory_order_relaxed); }
    Tracked& operator=(Tracked&&) = delete;
    ~Tracked() { alive.fetch_sub(1, std::memory_order_relaxed); }
    int value;
};

// How a call back into the loop from a worker (or a plain thread) ended.
enum class Back : int { returned, run_finished, cancelled, other, count };

Back back_of(const std::string& outcome) {
    if (outcome == "returned") return Back::returned;
    if (outcome == "RunFinishedError") return Back::run_finished;
    if (outcome == "Cancelled") return Back::cancelled;
    return Back::other;
}

// Everything the threads of one scenario share. Held by shared_ptr: with shutdown_timeout,
// workers outlive run().
struct ShutdownState {
    bool with_timeout = false;
    anyio::LoopToken token;
    std::atomic<bool> main_done{false};  // set by the main task as its last statement
    std::promise<void> gate;             // with_timeout: opened by the test after run() returned
    std::shared_future<void> gate_open = gate.get_future().share();
    std::atomic<int> running{0};          // fns that have started
    std::atomic<int> finished{0};         // fns that have returned
    std::atomic<int> plain_running{0};    // plain threads' loop tasks that have started
    std::atomic<int> ran_after_main{0};   // user code run on the loop after main finished
    std::atomic<int> stop_seen{0};        // leftover calls whose fn saw the stop request
    // call_soon_threadsafe posts accepted although main_done was set: the main task had set
    // it but not yet returned (its last microseconds, on the loop thread). Their callbacks
    // must still never run (ran_after_main).
    std::atomic<int> posted_at_main_end{0};
    std::array<std::atomic<int>, static_cast<std::size_t>(Back::count)> worker_back{};
    std::array<std::atomic<int>, static_cast<std::size_t>(Back::count)> plain_back{};

    void note_if_after_main() {
        // acquire: pairs with the main task's release store, so "after" means after.
        if (main_done.load(std::memory_order_acquire)) ran_after_main.fetch_add(1, std::memory_order_relaxed);
    }
    bool wait_for_main(std::chrono::milliseconds limit = 10s) {
        const auto until = Clock::now() + limit;
        while (!main_done.load(std::memory_order_acquire)) {  // acquire: as above
            if (Clock::now() >= until) return false;
            std::this_thread::sleep_for(200us);
        }
        return true;
    }
};

constexpr int abandoned_calls = 200;   // through a limiter of abandon_tokens: the rest wait
constexpr int abandon_tokens = 120;
constexpr int awaited_calls = 60;      // shielded calls the main task waits for
constexpr int leftover_tasks = 40;     // tasks outside any group, in a shielded call at the end
constexpr int plain_threads = 8;       // blocked in from_thread::run when the loop ends

anyio::Task<> back_on_loop(std::shared_ptr<ShutdownState> state) {
    state->note_if_after_main();
    co_await anyio::checkpoint();
    state->note_if_after_main();
}

// An abandoned call's fn: it is still running when the main task finishes, then calls back
// into the loop (three ways), then returns a result nobody will take.
Tracked abandoned_fn(std::shared_ptr<ShutdownState> state, int i) {
    state->running.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    state->wait_for_main();
    if (state->with_timeout) {
        state->gate_open.wait_for(10s);  // past the timeout: the loop gives up on this worker
    } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(i % 20));
    }
    const std::string outcome = outcome_of([&] {
        switch (i % 3) {
        case 0:
            anyio::from_thread::run_sync([&] { state->note_if_after_main(); });
            break;
        case 1:
            anyio::from_thread::run(back_on_loop, state);
            break;
        default:
            state->token.call_soon_threadsafe([state] { state->note_if_after_main(); });
            state->posted_at_main_end.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
            break;
        }
    });
    state->worker_back[static_cast<std::size_t>(back_of(outcome))].fetch_add(1, std::memory_order_relaxed);
    state->finished.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    return Tracked(i);
}

// A leftover task's fn: blocks until leaving run() asks it to stop.
Tracked stoppable_fn(std::stop_token stop, std::shared_ptr<ShutdownState> state) {
    state->running.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    const auto until = Clock::now() + 10s;
    while (!stop.stop_requested() && Clock::now() < until) std::this_thread::sleep_for(200us);
    if (stop.stop_requested()) state->stop_seen.fetch_add(1, std::memory_order_relaxed);
    state->finished.fetch_add(1, std::memory_order_relaxed);
    return Tracked(-1);
}

anyio::Task<> leftover_task(std::shared_ptr<ShutdownState> state) {
    Tracked result = co_await run_sync(stoppable_fn, state);
    (void)result;
    state->note_if_after_main();  // a task resumed after main finished
}

// A plain thread's task: runs until the loop destroys it.
anyio::Task<> forever_on_loop(std::shared_ptr<ShutdownState> state) {
    state->plain_running.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    for (;;) {
        co_await anyio::sleep(1ms);
        state->note_if_after_main();
    }
}

struct ShutdownReport {
    int running_at_main_end = 0;    // fns started (and not finished) when main finished
    std::size_t busy_at_main_end = 0;
    std::chrono::steady_clock::duration leaving{};  // from main's end to run() returning
    int finished_at_return = 0;
    int started = 0;
    int finished = 0;
    int stop_seen = 0;
    int posted_at_main_end = 0;
    int ran_after_main = 0;
    std::array<int, static_cast<std::size_t>(Back::count)> worker_back{};
    std::array<int, static_cast<std::size_t>(Back::count)> plain_back{};
    int tracked_alive = 0;
    bool threads_gone = false;
    bool fns_all_finished = false;
};

ShutdownReport run_shutdown_scenario(bool with_timeout) {
    const std::size_t baseline = quiet_thread_count();
    auto state = std::make_shared<ShutdownState>();
    state->with_timeout = with_timeout;
    ShutdownReport report;
    std::vector<std::thread> plain;
    Clock::time_point main_end;
    anyio::EventLoop::Options options{.thread_name = worker_name};
    if (with_timeout) options.shutdown_timeout = 50ms;
    anyio::run(
        [&]() -> anyio::Task<> {
            state->token = anyio::lowlevel::current_token();
            anyio::CapacityLimiter abandon_limiter(abandon_tokens);
            // Room for every leftover call and every awaited one at once.
            anyio::to_thread::current_default_thread_limiter().set_total_tokens(leftover_tasks + awaited_calls);
            for (int i = 0; i < plain_threads; ++i) {
                plain.emplace_back([state] {
                    const std::string outcome = outcome_of([&] {
                        anyio::from_thread::run(state->token, forever_on_loop, state);
                    });
                    state->plain_back[static_cast<std::size_t>(back_of(outcome))].fetch_add(1, std::memory_order_relaxed);
                });
            }
            for (int i = 0; i < leftover_tasks; ++i) anyio::EventLoop::current()->spawn(leftover_task(state));
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                for (int i = 0; i < awaited_calls; ++i) {
                    tg.start_soon([&, i]() -> anyio::Task<> {
                        auto short_fn = [](std::shared_ptr<ShutdownState> shared, int ms) {
                            shared->running.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
                            std::this_thread::sleep_for(std::chrono::milliseconds(ms));
                            shared->finished.fetch_add(1, std::memory_order_relaxed);
                        };
                        co_await run_sync(short_fn, state, 2 + i % 5);
                    });
                }
                co_await anyio::task_group([&](anyio::TaskGroup& abandoning) -> anyio::Task<> {
                    for (int i = 0; i < abandoned_calls; ++i) {
                        abandoning.start_soon([&, i]() -> anyio::Task<> {
                            Tracked result = co_await run_sync(
                                {.limiter = &abandon_limiter, .abandon_on_cancel = true}, abandoned_fn, state, i);
                            (void)result;
                        });
                    }
                    // Everything in flight: abandon_tokens fns of abandoned calls, every
                    // leftover task's fn, every plain thread's task.
                    const auto until = anyio::current_time() + 10s;
                    while ((state->running.load(std::memory_order_relaxed) -
                                    state->finished.load(std::memory_order_relaxed) <
                                abandon_tokens + leftover_tasks ||
                            state->plain_running.load(std::memory_order_relaxed) < plain_threads) &&
                           anyio::current_time() < until) {
                        co_await anyio::sleep(1ms);
                    }
                    // 200 callers leave at once; 80 of them never got a token.
                    abandoning.cancel_scope().cancel();
                });
            });
            report.running_at_main_end = state->running.load(std::memory_order_relaxed) -
                                         state->finished.load(std::memory_order_relaxed);
            report.busy_at_main_end = anyio::to_thread::statistics().busy_workers;
            main_end = Clock::now();
            state->main_done.store(true, std::memory_order_release);  // release: see note_if_after_main
        }(),
        options);
    report.leaving = Clock::now() - main_end;
    report.finished_at_return = state->finished.load(std::memory_order_relaxed);
    state->gate.set_value();
    for (std::thread& thread : plain) thread.join();
    report.fns_all_finished = eventually_true([&] {
        return state->finished.load(std::memory_order_relaxed) == state->running.load(std::memory_order_relaxed);
    }, 10s);
    report.threads_gone = eventually_true([&] { return threads_named(worker_name) == 0 && thread_count() == baseline; });
    report.started = state->running.load(std::memory_order_relaxed);
    report.finished = state->finished.load(std::memory_order_relaxed);
    report.stop_seen = state->stop_seen.load(std::memory_order_relaxed);
    report.posted_at_main_end = state->posted_at_main_end.load(std::memory_order_relaxed);
    report.ran_after_main = state->ran_after_main.load(std::memory_order_relaxed);
    for (std::size_t i = 0; i < report.worker_back.size(); ++i) {
        report.worker_back[i] = state->worker_back[i].load(std::memory_order_relaxed);
        report.plain_back[i] = state->plain_back[i].load(std::memory_order_relaxed);
    }
    // Every worker has finished: the jobs they held (and their results) are gone once the
    // threads are; give the last one a moment to free its job after the count above.
    (void)eventually_true([] { return Tracked::alive.load(std::memory_order_relaxed) == 0; });
    report.tracked_alive = Tracked::alive.load(std::memory_order_relaxed);
    return report;
}

const ShutdownReport& without_timeout_report() {
    static const ShutdownReport report = run_shutdown_scenario(false);
    return report;
}
const ShutdownReport& with_timeout_report() {
    static const ShutdownReport report = run_shutdown_scenario(true);
    return report;
}

double milliseconds_of(Clock::duration duration) {
    return std::chrono::duration<double, std::milli>(duration).count();
}

constexpr int fns_in_scenario = abandon_tokens + awaited_calls + leftover_tasks;

void check_common(const ShutdownReport& report) {
    // Hundreds of calls were in flight when the main task finished.
    CHECK(report.running_at_main_end == abandon_tokens + leftover_tasks);
    CHECK(report.busy_at_main_end >= static_cast<std::size_t>(abandon_tokens + leftover_tasks));
    // The abandoned calls still waiting for a token never ran; every fn that started ended.
    CHECK(report.started == fns_in_scenario);
    CHECK(report.fns_all_finished);
    CHECK(report.finished == fns_in_scenario);
    // Leaving run() asked the leftover calls to stop.
    CHECK(report.stop_seen == leftover_tasks);
    // The plain threads blocked in from_thread::run were released with RunFinishedError.
    CHECK(report.plain_back[static_cast<std::size_t>(Back::run_finished)] == plain_threads);
    // Every worker's call back into the loop ended (a value, RunFinishedError, or the
    // cancellation of its abandoned caller), never anything else.
    CHECK(report.worker_back[static_cast<std::size_t>(Back::other)] == 0);
    int backs = 0;
    for (int count : report.worker_back) backs += count;
    CHECK(backs == abandon_tokens);
    // No result leaked or was destroyed twice; no worker thread is left.
    CHECK(report.tracked_alive == 0);
    CHECK(report.threads_gone);
}

}  // namespace

TEST_CASE("Leaving run with hundreds of calls in flight, some abandoned and some blocked in "
          "from_thread, waits for every worker and leaves nothing behind",
          "[stress][shutdown]") {
    const ShutdownReport& report = without_timeout_report();
    WARN("shutdown without timeout: " << report.running_at_main_end << " fns in flight at main's end, run() left after "
                                      << milliseconds_of(report.leaving) << " ms");
    check_common(report);
    // No shutdown_timeout: run() returned only after every fn had, and not much later.
    CHECK(report.finished_at_return == fns_in_scenario);
    CHECK(report.leaving < 5s);
}

TEST_CASE("Leaving run with hundreds of calls in flight and a shutdown_timeout returns after the "
          "timeout; late completions are dropped safely",
          "[stress][shutdown]") {
    const ShutdownReport& report = with_timeout_report();
    WARN("shutdown with a 50 ms timeout: " << report.running_at_main_end << " fns in flight at main's end, run() left after "
                                           << milliseconds_of(report.leaving) << " ms");
    check_common(report);
    // The abandoned fns were still blocked (their gate opens after run() returns): run()
    // gave up on them after the timeout instead of hanging, and their late calls into the
    // finished loop all got RunFinishedError.
    CHECK(report.leaving >= 50ms);
    CHECK(report.leaving < 2s);
    CHECK(report.finished_at_return == awaited_calls + leftover_tasks);
    CHECK(report.worker_back[static_cast<std::size_t>(Back::run_finished)] == abandon_tokens);
}

TEST_CASE("Once the main task has finished, no user code runs on the loop, even with hundreds of "
          "calls in flight",
          "[stress][shutdown]") {
    // API.md ("Running a loop"): from_thread calls and call_soon_threadsafe from workers that
    // run() is still joining throw RunFinishedError, and no task is resumed (issue 8 item 6).
    //
    // A worker that calls back the very moment main_done is set (before the main task has
    // returned, which the loop thread does next) may still get its call_soon_threadsafe
    // posted: that is allowed, as long as the callback never runs. Every other call back gets
    // RunFinishedError.
    for (const ShutdownReport* report : {&without_timeout_report(), &with_timeout_report()}) {
        CHECK(report->ran_after_main == 0);
        CHECK(report->worker_back[static_cast<std::size_t>(Back::run_finished)] + report->posted_at_main_end ==
              abandon_tokens);
        CHECK(report->posted_at_main_end <= abandon_tokens / 20);  // only workers that did not sleep
    }
}
