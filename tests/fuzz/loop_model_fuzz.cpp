// loop_model_fuzz: a libFuzzer target that reads its input as a sequence of operations on
// CapacityLimiters, a Lock, a Semaphore, a memory object stream and to_thread::run_sync, runs
// them on a real anyio loop, and checks after every step that the library's observable state
// equals the state of a small reference model written here, independently of the library.
//
// How to run it
// -------------
//   tests/fuzz/run.sh [seconds]        # clang++ build with ASan+UBSan+libFuzzer, runs every
//                                      # target over a scratch copy of its seed corpus
//   tests/fuzz/run.sh --regress        # the seeds only (what ctest's "fuzz" label runs)
// By hand:
//   cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
//         -DCMAKE_CXX_COMPILER=clang++ -DANYIO_SANITIZE=address,undefined
//         -DANYIO_BUILD_FUZZERS=ON -DANYIO_BUILD_EXAMPLES=OFF -DANYIO_BUILD_BENCHMARKS=OFF
//   (one command line)
//   cmake --build build-fuzz --target loop_model_fuzz
//   mkdir -p /tmp/corpus && cp tests/fuzz/corpus/loop_model_fuzz/* /tmp/corpus/
//   build-fuzz/tests/fuzz/loop_model_fuzz -timeout=10 -max_total_time=60 /tmp/corpus
//   build-fuzz/tests/fuzz/loop_model_fuzz crash-<hash>          # replay one input
//   LOOP_MODEL_FUZZ_TRACE=1 build-fuzz/tests/fuzz/loop_model_fuzz crash-<hash>  # every step
// Built with a compiler without libFuzzer (g++), the same source gets a small main() that
// replays the files and directories named on its command line.
//
// Input format
// ------------
// The first kConfigBytes bytes configure the run (limiter totals, the loop's default thread
// tokens, Lock/Semaphore fast_acquire, the Semaphore's initial and max values, the stream's
// buffer size, the number of actor tasks, how the run ends). Every later byte starts a step:
// byte % Step::count picks the operation, and the operation reads its arguments (which
// actor, which limiter, which handle...) from the following bytes. Missing bytes read as 0.
// At most kMaxSteps steps run per input.
//
// How it works
// ------------
// The driver (the main task) owns the primitives and runs the steps. Blocking operations are
// carried out by "actors": long-lived child tasks that wait for a command, run it inside a
// fresh CancelScope (so the driver can cancel it at any time, even before it starts), record
// how it ended (value, WouldBlock, Cancelled, ...) and wait for the next one; an actor that
// holds nothing can be replaced by a new task (respawn), so waits also start in new tasks
// and tasks end between operations. Operations that
// do not block (set_total_tokens, nowait forms on behalf of the driver, close, clone,
// cancel) run in the driver itself, so several of them can happen in one loop turn: a token
// handed to a waiter and the waiter cancelled before it runs, a lock released and its next
// owner cancelled, and so on.
//
// The model mirrors each primitive (holders, FIFO queues, values, buffer, open handles, jobs
// and worker threads) and the loop's ready queue as one FIFO of pending actor resumptions.
// A "settle" step lets the real loop run until no actor makes progress for two turns, and
// lets the model run its FIFO until it is empty; the two must then agree on everything.
// Offloaded functions are no-ops that block on a gate the driver opens, one at a time, only
// when the loop has settled, and the driver then waits for that one completion: worker
// threads can never race with the model, so every run is deterministic (loop turns, never
// times, decide the outcome; the wall clock only bounds how long a hang may last).
//
// Checked after every step (a mismatch aborts with a message naming the step):
// - each limiter: borrowed, total, available, tasks_waiting and the exact set of borrowers
//   (actor tasks, driver borrowers, one anonymous per-call borrower per running job) equal
//   the model's; borrowed <= total unless the total was lowered below the tokens in use;
// - the Lock: locked, owner (the exact task) and tasks_waiting; the owner is never queued;
// - the Semaphore: value in [0, max_value], no waiter while value > 0, tasks_waiting,
//   permits conserved (value + permits held == initial + extra releases);
// - the stream: every field of statistics() on every open or closed handle;
// - to_thread::statistics(): workers, idle, busy, threads_created (== peak concurrency: the
//   pool never prunes here), jobs_completed;
// and after every settle, in addition:
// - every actor's outcome of its last command and number of commands finished, and the order
//   in which all actors finished (FIFO grants, FIFO hand-off, delivery order);
// - no actor both waits and holds; an idle actor is really parked waiting for a command;
// - stream items: every receive got exactly the item the model says (so FIFO delivery, and
//   in order per sender); independently of the model, each received item was sent and is
//   received once, each receiver gets one sender's items in the order they were sent, a send
//   that returned gave its item away, and the number of live items equals buffered + held by
//   blocked senders.
// The run ends by cancelling everything left (the task group's scope) and opening every gate;
// then the loop must return, no worker thread may be left, no item may be alive, and
// LeakSanitizer (on under run.sh) reports any leak.

#include <anyio/anyio.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

constexpr std::size_t kConfigBytes = 6;
constexpr int kMaxSteps = 2000;
constexpr int kMaxActors = 8;
constexpr int kLimiters = 3;          // two of our own, and the loop's default thread limiter
constexpr int kDefaultLimiter = 2;
constexpr int kSlots = 3;             // handles per stream end
constexpr int kMaxOutstandingJobs = 5;  // offloads not yet completed (bounds worker threads)
constexpr int kMaxSettleTurns = 20000;
constexpr auto kHangBound = std::chrono::seconds(5);
constexpr int kDriverSender = 99;     // the driver's sender identity in item ids
constexpr int kItemStride = 100000;   // item id = sender * kItemStride + sequence

// ---------------------------------------------------------------------------------------------
// Steps and outcomes
// ---------------------------------------------------------------------------------------------

enum class Step : std::uint8_t {
    lim_acquire,      // actor: co_await limiter.acquire()
    lim_nowait,       // actor: limiter.acquire_nowait()
    lim_try,          // actor: limiter.try_acquire()
    lim_release,      // actor: limiter.release()
    drv_lim_take,     // driver: acquire_on_behalf_of_nowait / try_acquire_on_behalf_of
    drv_lim_release,  // driver: release_on_behalf_of
    set_total,        // driver: set_total_tokens (up, down, or negative: invalid_argument)
    cancel,           // driver: cancel an actor's current command scope
    lock_acquire,     // actor: co_await lock.acquire()
    lock_nowait,      // actor: lock.acquire_nowait()
    lock_release,     // actor: lock.release()
    drv_lock,         // driver: lock.acquire_nowait() or lock.release() as the driver task
    sem_acquire,      // actor: co_await semaphore.acquire()
    sem_nowait,       // actor: semaphore.acquire_nowait()
    sem_release,      // actor: semaphore.release()
    drv_sem,          // driver: semaphore.acquire_nowait() or release()
    send,             // actor: co_await tx.send(item)
    send_nowait,      // actor: tx.send_nowait(item)
    receive,          // actor: co_await rx.receive()
    receive_nowait,   // actor: rx.receive_nowait()
    drv_send,         // driver: tx.send_nowait(item)
    drv_receive,      // driver: rx.receive_nowait()
    close,            // driver: close a send or receive handle
    clone,            // driver: clone a send or receive handle into a free slot
    destroy,          // driver: destroy a handle (closes it)
    new_stream,       // driver: a new stream once every handle of the old one is gone
    offload,          // actor: co_await to_thread::run_sync({limiter, abandon}, gated no-op)
    open_gate,        // driver: settle, let one running offload return, wait for it
    checkpoint,       // actor: co_await anyio::checkpoint()
    settle,           // driver: checkpoint until nothing moves
    settle_sleep,     // driver: sleep(0) until nothing moves
    respawn,          // driver: an idle actor holding nothing ends; a new task takes its place
    count,
    quit,             // not decoded: ends an actor
};

const char* step_name(Step step) {
    static constexpr const char* names[] = {
        "lim_acquire", "lim_nowait",   "lim_try",       "lim_release",    "drv_lim_take",
        "drv_lim_release", "set_total", "cancel",       "lock_acquire",   "lock_nowait",
        "lock_release", "drv_lock",    "sem_acquire",   "sem_nowait",     "sem_release",
        "drv_sem",      "send",        "send_nowait",   "receive",        "receive_nowait",
        "drv_send",     "drv_receive", "close",         "clone",          "destroy",
        "new_stream",   "offload",     "open_gate",     "checkpoint",     "settle",
        "settle_sleep", "respawn",     "count",         "quit"};
    return names[static_cast<int>(step)];
}

enum class Kind : std::uint8_t {
    none,
    ok,
    value,  // ok, with a value (an item id, a job's result)
    no,     // try_acquire returned false
    would_block,
    cancelled,
    runtime_error,
    invalid_argument,
    logic_error,
    closed,
    broken,
    end_of_stream,
    no_handle,  // the harness found no handle in the slot (not a library outcome)
    other,
};

const char* kind_name(Kind kind) {
    static constexpr const char* names[] = {
        "none",      "ok",     "value",  "false",         "WouldBlock", "Cancelled",
        "runtime_error", "invalid_argument", "logic_error", "ClosedResourceError",
        "BrokenResourceError", "EndOfStream", "no handle", "other exception"};
    return names[static_cast<int>(kind)];
}

struct Outcome {
    Kind kind = Kind::none;
    long value = 0;
    friend bool operator==(const Outcome&, const Outcome&) = default;
};

std::string describe(const Outcome& outcome) {
    std::string text = kind_name(outcome.kind);
    if (outcome.kind == Kind::value) text += " " + std::to_string(outcome.value);
    return text;
}

// What an exception means, in the model's terms (Cancelled is handled by the callers).
Outcome classify(std::exception_ptr error) {
    try {
        std::rethrow_exception(std::move(error));
    } catch (const anyio::WouldBlock&) {
        return {Kind::would_block};
    } catch (const anyio::ClosedResourceError&) {
        return {Kind::closed};
    } catch (const anyio::BrokenResourceError&) {
        return {Kind::broken};
    } catch (const anyio::EndOfStream&) {
        return {Kind::end_of_stream};
    } catch (const std::invalid_argument&) {
        return {Kind::invalid_argument};
    } catch (const std::logic_error&) {
        return {Kind::logic_error};
    } catch (const std::runtime_error&) {
        return {Kind::runtime_error};
    } catch (...) {
        return {Kind::other};
    }
}

struct Command {
    Step step = Step::quit;
    int arg = 0;        // limiter index or handle slot
    bool flag = false;  // offload: abandon_on_cancel
    int item = 0;       // send: the item's id
    int job = -1;       // offload: the job (and gate) index
};

// ---------------------------------------------------------------------------------------------
// Failure reporting
// ---------------------------------------------------------------------------------------------

struct StepInfo {
    int index = -1;
    Step step = Step::count;
    std::string detail;
} current_step;

bool trace_enabled = false;

[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void fail(const char* format, ...) {
    std::fprintf(stderr, "\nloop_model_fuzz: MODEL MISMATCH at step %d (%s%s%s): ",
                 current_step.index, step_name(current_step.step),
                 current_step.detail.empty() ? "" : " ", current_step.detail.c_str());
    va_list args;
    va_start(args, format);
    std::vfprintf(stderr, format, args);
    va_end(args);
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
    std::abort();
}

#define FZ_EXPECT_EQ(actual, expected, what)                                                 \
    do {                                                                                     \
        const auto fz_a = (actual);                                                          \
        const auto fz_e = (expected);                                                        \
        if (!(fz_a == fz_e)) {                                                               \
            fail("%s: library says %lld, model says %lld", (what), static_cast<long long>(fz_a), \
                 static_cast<long long>(fz_e));                                              \
        }                                                                                    \
    } while (false)

// ---------------------------------------------------------------------------------------------
// Items: move-only, counted while they hold a value
// ---------------------------------------------------------------------------------------------

long live_items = 0;  // loop thread only (items never reach a worker)

struct Item {
    int id = -1;
    explicit Item(int value) : id(value) { ++live_items; }
    Item(Item&& other) noexcept : id(std::exchange(other.id, -1)) {}
    Item& operator=(Item&&) = delete;
    Item(const Item&) = delete;
    Item& operator=(const Item&) = delete;
    ~Item() {
        if (id >= 0) --live_items;
    }
};

// ---------------------------------------------------------------------------------------------
// Offloaded work: a no-op that returns once the driver opens its gate
// ---------------------------------------------------------------------------------------------

struct Gate {
    std::atomic<bool> open{false};
};

int gated_noop(Gate* gate, int value) {
    // acquire: pairs with the driver's release store, which is all this ordering protects.
    while (!gate->open.load(std::memory_order_acquire)) {
        gate->open.wait(false, std::memory_order_acquire);
    }
    return value;
}

void open_gate(Gate& gate) {
    // release: the worker's acquire load sees the gate open (no data is handed over).
    gate.open.store(true, std::memory_order_release);
    gate.open.notify_all();
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

namespace model {

constexpr int kNobody = -2;
constexpr int kDriver = -1;

struct Holder {
    enum class Kind : std::uint8_t { actor, driver, job } kind;
    int index;
    friend bool operator==(const Holder&, const Holder&) = default;
};

struct Limiter {
    struct Waiter {
        bool job;   // an offload waiting for its token (else an actor in acquire())
        int index;  // the job or the actor
    };
    std::int64_t total = 0;
    std::vector<Holder> holders;
    std::deque<Waiter> queue;
    bool lowered = false;  // the total went below the tokens in use at some point

    [[nodiscard]] std::int64_t borrowed() const { return static_cast<std::int64_t>(holders.size()); }
    [[nodiscard]] bool holds(Holder holder) const {
        return std::find(holders.begin(), holders.end(), holder) != holders.end();
    }
    void erase(Holder holder) { holders.erase(std::find(holders.begin(), holders.end(), holder)); }
};

struct Lock {
    int owner = kNobody;
    bool fast = false;
    std::deque<int> queue;
};

struct Semaphore {
    std::int64_t value = 0;
    std::optional<std::int64_t> max;
    bool fast = false;
    std::deque<int> queue;
    std::int64_t capacity = 0;      // value + permits held, always
    std::int64_t driver_permits = 0;
    std::int64_t handed = 0;        // permits handed to waiters that have not resumed yet
};

struct Stream {
    struct Slot {
        bool exists = false;
        bool closed = false;
    };
    struct SendWaiter {
        int actor;
        int slot;
        int item;
    };
    struct ReceiveWaiter {
        int actor;
        int slot;
    };
    std::size_t max = 0;
    std::deque<int> buffer;
    std::array<Slot, kSlots> tx{};
    std::array<Slot, kSlots> rx{};
    std::size_t open_senders = 0;
    std::size_t open_receivers = 0;
    std::deque<SendWaiter> senders;
    std::deque<ReceiveWaiter> receivers;

    [[nodiscard]] bool any_handle() const {
        for (int i = 0; i < kSlots; ++i) {
            if (tx[i].exists || rx[i].exists) return true;
        }
        return false;
    }
};

struct Job {
    enum class State : std::uint8_t { waiting, running, done, dropped };
    int actor;
    int limiter;
    bool abandon;
    State state = State::waiting;
    bool abandoned = false;
    int value;
};

struct Pool {
    std::uint64_t busy = 0;
    std::uint64_t created = 0;
    std::uint64_t completed = 0;
};

enum class Resume : std::uint8_t { start, fixed, granted_limiter, granted_lock, granted_sem, checkpoint };

struct Pending {
    int actor;
    Resume kind;
    Outcome outcome;  // fixed: the outcome
    int index;        // granted_limiter: the limiter
};

struct Actor {
    enum class Phase : std::uint8_t { idle, commanded, blocked, resuming };
    enum class On : std::uint8_t { none, limiter, lock, sem, send, receive, offload_token, offload_running };
    Phase phase = Phase::idle;
    On on = On::none;
    int on_index = 0;
    int job = -1;
    Command cmd;
    bool cancelled = false;
    std::array<bool, kLimiters> holds{};
    std::int64_t permits = 0;
    std::uint64_t done = 0;
    Outcome last;
};

class Model {
public:
    std::array<Limiter, kLimiters> lim;
    Lock lock;
    Semaphore sem;
    Stream stream;
    Pool pool;
    std::vector<Actor> actors;
    std::vector<Job> jobs;
    std::deque<Pending> pending;
    std::vector<int> log;  // actors, in the order they finished their commands

    static Holder actor_holder(int actor) { return {Holder::Kind::actor, actor}; }
    static Holder driver_holder(int k) { return {Holder::Kind::driver, k}; }
    static Holder job_holder(int job) { return {Holder::Kind::job, job}; }

    [[nodiscard]] int outstanding_jobs() const {
        int n = 0;
        for (const Job& job : jobs) {
            if (job.state == Job::State::waiting || job.state == Job::State::running) ++n;
        }
        return n;  // (a commanded offload's job exists already, as waiting)
    }

    // ---- Commands and the FIFO of resumptions ----

    void command(int a, const Command& cmd) {
        Actor& actor = actors[a];
        actor.cmd = cmd;
        actor.cancelled = false;
        actor.phase = Actor::Phase::commanded;
        pending.push_back({a, Resume::start, {}, 0});
    }

    void schedule(int a, Resume kind, Outcome outcome = {}, int index = 0) {
        Actor& actor = actors[a];
        actor.phase = Actor::Phase::resuming;
        actor.on = Actor::On::none;
        pending.push_back({a, kind, outcome, index});
    }

    void finish(int a, Outcome outcome) {
        Actor& actor = actors[a];
        actor.phase = Actor::Phase::idle;
        actor.on = Actor::On::none;
        actor.last = outcome;
        ++actor.done;
        log.push_back(a);
    }

    void block(int a, Actor::On on, int index = 0) {
        Actor& actor = actors[a];
        actor.phase = Actor::Phase::blocked;
        actor.on = on;
        actor.on_index = index;
    }

    /// Runs every pending resumption, and what they schedule, first in first out.
    void run_pending() {
        int guard = 0;
        while (!pending.empty()) {
            if (++guard > 100000) fail("model: resumptions never end (harness bug)");
            Pending p = pending.front();
            pending.pop_front();
            Actor& actor = actors[p.actor];
            switch (p.kind) {
                case Resume::start:
                    start(p.actor);
                    break;
                case Resume::fixed:
                    finish(p.actor, p.outcome);
                    break;
                case Resume::granted_limiter:
                    if (actor.cancelled) {
                        // Cancelled in the turn the token arrived: it passes the token on.
                        limiter_release(p.index, actor_holder(p.actor));
                        finish(p.actor, {Kind::cancelled});
                    } else {
                        finish(p.actor, {Kind::ok});
                    }
                    break;
                case Resume::granted_lock:
                    if (actor.cancelled) {
                        if (lock.owner == p.actor) lock_hand_over();
                        finish(p.actor, {Kind::cancelled});
                    } else {
                        finish(p.actor, {Kind::ok});
                    }
                    break;
                case Resume::granted_sem:
                    --sem.handed;
                    if (actor.cancelled) {
                        --actor.permits;
                        give_permit();
                        finish(p.actor, {Kind::cancelled});
                    } else {
                        finish(p.actor, {Kind::ok});
                    }
                    break;
                case Resume::checkpoint:
                    finish(p.actor, {actor.cancelled ? Kind::cancelled : Kind::ok});
                    break;
            }
        }
    }

    // ---- Limiters ----

    Outcome limiter_take_nowait(int l, Holder holder, bool try_form) {
        Limiter& limiter = lim[l];
        if (limiter.holds(holder)) return {Kind::runtime_error};
        if (!limiter.queue.empty() || limiter.borrowed() >= limiter.total) {
            return {try_form ? Kind::no : Kind::would_block};
        }
        take(l, holder);
        return {Kind::ok};
    }

    Outcome limiter_release(int l, Holder holder) {
        Limiter& limiter = lim[l];
        if (!limiter.holds(holder)) return {Kind::runtime_error};
        limiter.erase(holder);
        if (holder.kind == Holder::Kind::actor) actors[holder.index].holds[l] = false;
        hand_over(l);
        return {Kind::ok};
    }

    Outcome set_total(int l, std::int64_t total) {
        if (total < 0) return {Kind::invalid_argument};
        lim[l].total = total;
        if (lim[l].borrowed() > total) lim[l].lowered = true;
        hand_over(l);
        return {Kind::ok};
    }

    void take(int l, Holder holder) {
        lim[l].holders.push_back(holder);
        if (holder.kind == Holder::Kind::actor) actors[holder.index].holds[l] = true;
    }

    void hand_over(int l) {
        Limiter& limiter = lim[l];
        while (limiter.borrowed() < limiter.total && !limiter.queue.empty()) {
            Limiter::Waiter waiter = limiter.queue.front();
            limiter.queue.pop_front();
            if (waiter.job) {
                take(l, job_holder(waiter.index));
                dispatch(waiter.index);
            } else {
                take(l, actor_holder(waiter.index));
                schedule(waiter.index, Resume::granted_limiter, {}, l);
            }
        }
    }

    void dispatch(int j) {
        Job& job = jobs[j];
        job.state = Job::State::running;
        if (pool.created == pool.busy) ++pool.created;  // no idle worker: a new thread
        ++pool.busy;
        block(job.actor, Actor::On::offload_running, j);
        actors[job.actor].job = j;
    }

    /// The gate of running job `j` opened and its completion reached the loop.
    void complete(int j) {
        Job& job = jobs[j];
        --pool.busy;
        ++pool.completed;
        job.state = Job::State::done;
        // release_hold, then the caller: the token's next owner is scheduled first.
        Limiter& limiter = lim[job.limiter];
        limiter.erase(job_holder(j));
        hand_over(job.limiter);
        if (!job.abandoned) schedule(job.actor, Resume::fixed, {Kind::value, job.value});
    }

    // ---- Lock ----

    Outcome lock_nowait(int who) {
        if (lock.owner == who) return {Kind::runtime_error};
        if (lock.owner != kNobody) return {Kind::would_block};
        lock.owner = who;
        return {Kind::ok};
    }
    Outcome lock_release(int who) {
        if (lock.owner == kNobody || lock.owner != who) return {Kind::runtime_error};
        lock_hand_over();
        return {Kind::ok};
    }
    void lock_hand_over() {
        if (lock.queue.empty()) {
            lock.owner = kNobody;
            return;
        }
        int next = lock.queue.front();
        lock.queue.pop_front();
        lock.owner = next;
        schedule(next, Resume::granted_lock);
    }

    // ---- Semaphore ----

    Outcome sem_nowait(int who) {
        if (sem.value == 0) return {Kind::would_block};
        --sem.value;
        if (who == kDriver) {
            ++sem.driver_permits;
        } else {
            ++actors[who].permits;
        }
        return {Kind::ok};
    }
    Outcome sem_release(int who) {
        // A permit handed to a waiter that has not resumed yet is still out (it counts).
        if (sem.max && sem.value + sem.handed >= *sem.max) return {Kind::invalid_argument};
        std::int64_t& permits = who == kDriver ? sem.driver_permits : actors[who].permits;
        if (permits > 0) {
            --permits;  // gives back one it holds
        } else {
            ++sem.capacity;  // a release beyond what was acquired (allowed below max_value)
        }
        give_permit();
        return {Kind::ok};
    }
    void give_permit() {
        if (sem.queue.empty()) {
            ++sem.value;
            return;
        }
        int next = sem.queue.front();
        sem.queue.pop_front();
        ++actors[next].permits;
        ++sem.handed;
        schedule(next, Resume::granted_sem);
    }

    // ---- Stream ----

    enum class Try : std::uint8_t { done, would_block, broken, end_of_stream };

    Try try_send(int item) {
        if (stream.open_receivers == 0) return Try::broken;
        while (!stream.receivers.empty()) {
            Stream::ReceiveWaiter receiver = stream.receivers.front();
            stream.receivers.pop_front();
            if (actors[receiver.actor].cancelled) {
                schedule(receiver.actor, Resume::fixed, {Kind::cancelled});
                continue;
            }
            schedule(receiver.actor, Resume::fixed, {Kind::value, item});
            return Try::done;
        }
        if (stream.buffer.size() >= stream.max) return Try::would_block;
        stream.buffer.push_back(item);
        return Try::done;
    }

    Try try_receive(int& item) {
        if (!stream.senders.empty()) {
            Stream::SendWaiter sender = stream.senders.front();
            stream.senders.pop_front();
            if (stream.buffer.empty()) {
                item = sender.item;
            } else {
                item = stream.buffer.front();
                stream.buffer.pop_front();
                stream.buffer.push_back(sender.item);
            }
            schedule(sender.actor, Resume::fixed, {Kind::ok});
            return Try::done;
        }
        if (!stream.buffer.empty()) {
            item = stream.buffer.front();
            stream.buffer.pop_front();
            return Try::done;
        }
        return stream.open_senders == 0 ? Try::end_of_stream : Try::would_block;
    }

    Outcome send_nowait(int slot, int item) {
        if (!stream.tx[slot].exists) return {Kind::no_handle};
        if (stream.tx[slot].closed) return {Kind::closed};
        switch (try_send(item)) {
            case Try::done:
                return {Kind::ok};
            case Try::broken:
                return {Kind::broken};
            default:
                return {Kind::would_block};
        }
    }

    Outcome receive_nowait(int slot) {
        if (!stream.rx[slot].exists) return {Kind::no_handle};
        if (stream.rx[slot].closed) return {Kind::closed};
        int item = -1;
        switch (try_receive(item)) {
            case Try::done:
                return {Kind::value, item};
            case Try::end_of_stream:
                return {Kind::end_of_stream};
            default:
                return {Kind::would_block};
        }
    }

    Outcome close(bool send_side, int slot) {
        Stream::Slot& handle = send_side ? stream.tx[slot] : stream.rx[slot];
        if (!handle.exists) return {Kind::no_handle};
        if (handle.closed) return {Kind::ok};
        handle.closed = true;
        if (send_side) {
            for (auto it = stream.senders.begin(); it != stream.senders.end();) {
                if (it->slot == slot) {
                    int actor = it->actor;
                    it = stream.senders.erase(it);
                    schedule(actor, Resume::fixed, {Kind::closed});
                } else {
                    ++it;
                }
            }
            if (--stream.open_senders == 0) {
                while (!stream.receivers.empty()) {
                    int actor = stream.receivers.front().actor;
                    stream.receivers.pop_front();
                    schedule(actor, Resume::fixed, {Kind::end_of_stream});
                }
            }
        } else {
            for (auto it = stream.receivers.begin(); it != stream.receivers.end();) {
                if (it->slot == slot) {
                    int actor = it->actor;
                    it = stream.receivers.erase(it);
                    schedule(actor, Resume::fixed, {Kind::closed});
                } else {
                    ++it;
                }
            }
            if (--stream.open_receivers == 0) {
                while (!stream.senders.empty()) {
                    int actor = stream.senders.front().actor;
                    stream.senders.pop_front();
                    schedule(actor, Resume::fixed, {Kind::broken});
                }
                stream.buffer.clear();
            }
        }
        return {Kind::ok};
    }

    Outcome destroy(bool send_side, int slot) {
        Stream::Slot& handle = send_side ? stream.tx[slot] : stream.rx[slot];
        if (!handle.exists) return {Kind::no_handle};
        close(send_side, slot);
        handle = {};
        return {Kind::ok};
    }

    /// Clones the handle in `slot` into the first free slot of that side (`*into`), or says
    /// there is no free slot (`*into` stays -1, nothing happens).
    Outcome clone(bool send_side, int slot, int* into) {
        auto& side = send_side ? stream.tx : stream.rx;
        *into = -1;
        if (!side[slot].exists) return {Kind::no_handle};
        for (int i = 0; i < kSlots; ++i) {
            if (!side[i].exists) {
                *into = i;
                break;
            }
        }
        if (*into < 0) return {Kind::no_handle};
        if (side[slot].closed) return {Kind::closed};
        side[*into] = {true, false};
        ++(send_side ? stream.open_senders : stream.open_receivers);
        return {Kind::ok};
    }

    void new_stream(std::size_t max) {
        stream = Stream{};
        stream.max = max;
        stream.tx[0] = {true, false};
        stream.rx[0] = {true, false};
        stream.open_senders = 1;
        stream.open_receivers = 1;
    }

    // ---- Cancellation ----

    void cancel(int a) {
        Actor& actor = actors[a];
        // An idle actor's scope has exited (cancelling it changes nothing); a scope is
        // cancelled once (a second cancel() is a no-op).
        if (actor.phase == Actor::Phase::idle || actor.cancelled) return;
        actor.cancelled = true;
        if (actor.phase != Actor::Phase::blocked) return;  // takes effect when it runs
        auto remove_from = [a](std::deque<int>& queue) {
            queue.erase(std::find(queue.begin(), queue.end(), a));
        };
        switch (actor.on) {
            case Actor::On::limiter: {
                auto& queue = lim[actor.on_index].queue;
                queue.erase(std::find_if(queue.begin(), queue.end(), [a](const Limiter::Waiter& w) {
                    return !w.job && w.index == a;
                }));
                schedule(a, Resume::fixed, {Kind::cancelled});
                break;
            }
            case Actor::On::lock:
                remove_from(lock.queue);
                schedule(a, Resume::fixed, {Kind::cancelled});
                break;
            case Actor::On::sem:
                remove_from(sem.queue);
                schedule(a, Resume::fixed, {Kind::cancelled});
                break;
            case Actor::On::send:
                stream.senders.erase(std::find_if(stream.senders.begin(), stream.senders.end(),
                                                  [a](const auto& w) { return w.actor == a; }));
                schedule(a, Resume::fixed, {Kind::cancelled});
                break;
            case Actor::On::receive:
                stream.receivers.erase(std::find_if(stream.receivers.begin(),
                                                    stream.receivers.end(),
                                                    [a](const auto& w) { return w.actor == a; }));
                schedule(a, Resume::fixed, {Kind::cancelled});
                break;
            case Actor::On::offload_token: {
                int j = actor.on_index;
                auto& queue = lim[jobs[j].limiter].queue;
                queue.erase(std::find_if(queue.begin(), queue.end(), [j](const Limiter::Waiter& w) {
                    return w.job && w.index == j;
                }));
                jobs[j].state = Job::State::dropped;
                schedule(a, Resume::fixed, {Kind::cancelled});
                break;
            }
            case Actor::On::offload_running:
                if (jobs[actor.on_index].abandon) {
                    jobs[actor.on_index].abandoned = true;
                    schedule(a, Resume::fixed, {Kind::cancelled});
                }
                // Otherwise shielded: fn runs on and the call returns its value.
                break;
            case Actor::On::none:
                break;
        }
    }

    // ---- What a command does when its actor first runs ----

    void start(int a) {
        Actor& actor = actors[a];
        const Command& cmd = actor.cmd;
        const bool cancelled = actor.cancelled;
        switch (cmd.step) {
            case Step::lim_acquire: {
                Limiter& limiter = lim[cmd.arg];
                if (cancelled) return finish(a, {Kind::cancelled});
                if (limiter.holds(actor_holder(a))) return finish(a, {Kind::runtime_error});
                if (limiter.queue.empty() && limiter.borrowed() < limiter.total) {
                    take(cmd.arg, actor_holder(a));
                    return schedule(a, Resume::fixed, {Kind::ok});  // yields once
                }
                limiter.queue.push_back({false, a});
                return block(a, Actor::On::limiter, cmd.arg);
            }
            case Step::lim_nowait:
                return finish(a, limiter_take_nowait(cmd.arg, actor_holder(a), false));
            case Step::lim_try:
                return finish(a, limiter_take_nowait(cmd.arg, actor_holder(a), true));
            case Step::lim_release:
                return finish(a, limiter_release(cmd.arg, actor_holder(a)));
            case Step::lock_acquire:
                if (cancelled) return finish(a, {Kind::cancelled});
                if (lock.owner == a) return finish(a, {Kind::runtime_error});
                if (lock.owner == kNobody) {
                    lock.owner = a;
                    if (lock.fast) return finish(a, {Kind::ok});
                    return schedule(a, Resume::fixed, {Kind::ok});
                }
                lock.queue.push_back(a);
                return block(a, Actor::On::lock);
            case Step::lock_nowait:
                return finish(a, lock_nowait(a));
            case Step::lock_release:
                return finish(a, lock_release(a));
            case Step::sem_acquire:
                if (cancelled) return finish(a, {Kind::cancelled});
                if (sem.value > 0) {
                    --sem.value;
                    ++actor.permits;
                    if (sem.fast) return finish(a, {Kind::ok});
                    return schedule(a, Resume::fixed, {Kind::ok});
                }
                sem.queue.push_back(a);
                return block(a, Actor::On::sem);
            case Step::sem_nowait:
                return finish(a, sem_nowait(a));
            case Step::sem_release:
                return finish(a, sem_release(a));
            case Step::send: {
                if (!stream.tx[cmd.arg].exists) return finish(a, {Kind::no_handle});
                if (cancelled) return finish(a, {Kind::cancelled});
                if (stream.tx[cmd.arg].closed) return finish(a, {Kind::closed});
                switch (try_send(cmd.item)) {
                    case Try::done:
                        return schedule(a, Resume::fixed, {Kind::ok});
                    case Try::broken:
                        return finish(a, {Kind::broken});
                    default:
                        stream.senders.push_back({a, cmd.arg, cmd.item});
                        return block(a, Actor::On::send);
                }
            }
            case Step::send_nowait:
                return finish(a, send_nowait(cmd.arg, cmd.item));
            case Step::receive: {
                if (!stream.rx[cmd.arg].exists) return finish(a, {Kind::no_handle});
                if (cancelled) return finish(a, {Kind::cancelled});
                if (stream.rx[cmd.arg].closed) return finish(a, {Kind::closed});
                int item = -1;
                switch (try_receive(item)) {
                    case Try::done:
                        return schedule(a, Resume::fixed, {Kind::value, item});
                    case Try::end_of_stream:
                        return finish(a, {Kind::end_of_stream});
                    default:
                        stream.receivers.push_back({a, cmd.arg});
                        return block(a, Actor::On::receive);
                }
            }
            case Step::receive_nowait:
                return finish(a, receive_nowait(cmd.arg));
            case Step::offload: {
                if (cancelled) {  // run_sync's checkpoint: nothing starts, no token is taken
                    jobs[cmd.job].state = Job::State::dropped;
                    return finish(a, {Kind::cancelled});
                }
                Job& job = jobs[cmd.job];
                Limiter& limiter = lim[job.limiter];
                actor.job = cmd.job;
                if (limiter.queue.empty() && limiter.borrowed() < limiter.total) {
                    take(job.limiter, job_holder(cmd.job));
                    return dispatch(cmd.job);
                }
                limiter.queue.push_back({true, cmd.job});
                return block(a, Actor::On::offload_token, cmd.job);
            }
            case Step::checkpoint:
                if (cancelled) return finish(a, {Kind::cancelled});
                return schedule(a, Resume::checkpoint);
            case Step::quit:
                // The task ends (no outcome); the new task spawned after it waits for commands.
                actor.phase = Actor::Phase::idle;
                return;
            default:
                fail("model: actor %d was given a driver step (harness bug)", a);
        }
    }

    // ---- Self-consistency ----

    void check_self() const {
        for (int l = 0; l < kLimiters; ++l) {
            const Limiter& limiter = lim[l];
            if (limiter.borrowed() > limiter.total && !limiter.lowered) {
                fail("model: limiter %d over its total without a lowering (harness bug)", l);
            }
            for (const Limiter::Waiter& w : limiter.queue) {
                if (!w.job && limiter.holds(actor_holder(w.index))) {
                    fail("model: actor %d waits for limiter %d while holding it", w.index, l);
                }
            }
        }
        for (int a : lock.queue) {
            if (lock.owner == a) fail("model: actor %d waits for the lock it owns", a);
        }
        std::int64_t permits = sem.value + sem.driver_permits;
        for (const Actor& actor : actors) permits += actor.permits;
        if (permits != sem.capacity) fail("model: semaphore permits not conserved (harness bug)");
    }
};

}  // namespace model

// ---------------------------------------------------------------------------------------------
// The real side
// ---------------------------------------------------------------------------------------------

const void* current_task_id() {
    anyio::EventLoop* loop = anyio::EventLoop::current();
    return loop != nullptr ? static_cast<const void*>(loop->current_task()) : nullptr;
}

struct Actor {
    int index = 0;
    const void* task_id = nullptr;
    std::optional<anyio::Event> go;           // set by the driver when a command is ready
    std::optional<anyio::CancelScope> scope;  // the current command's scope
    Command cmd;
    bool idle = false;  // parked waiting for a command
    std::uint64_t done = 0;
    Outcome last;
};

struct Config {
    std::int64_t totals[kLimiters] = {1, 1, 1};
    bool lock_fast = false;
    std::int64_t sem_initial = 1;
    std::optional<std::int64_t> sem_max;
    bool sem_fast = false;
    std::size_t stream_size = 0;
    int actors = 4;
    bool cancel_before_gates = false;  // end: cancel everything while offloads still run
};

std::size_t stream_size_from(std::uint8_t byte) {
    static constexpr std::size_t sizes[] = {0, 1, 2, 3, anyio::unbounded};
    return sizes[byte % 5];
}

struct World {
    Config config;
    std::deque<Gate> gates;  // outlives the loop: workers may still read them at shutdown
    std::array<std::unique_ptr<Actor>, kMaxActors> actors;
    std::optional<anyio::CapacityLimiter> own_limiters[2];
    anyio::CapacityLimiter* limiters[kLimiters] = {};
    std::optional<anyio::Lock> lock;
    std::optional<anyio::Semaphore> sem;
    std::array<std::optional<anyio::MemoryObjectSendStream<Item>>, kSlots> tx;
    std::array<std::optional<anyio::MemoryObjectReceiveStream<Item>>, kSlots> rx;
    int driver_borrowers[2] = {};
    const void* driver_id = nullptr;
    std::uint64_t progress = 0;  // bumped whenever an actor runs
    std::vector<int> log;        // actors, in the order they finished their commands
    // Items: the next sequence number per sender, and what receivers saw (exactly once, in
    // order per sender), over the whole run.
    std::array<int, kDriverSender + 1> next_sequence{};
    std::array<std::array<int, kDriverSender + 1>, kMaxActors + 1> last_received{};  // [receiver]
    std::vector<bool> received;
    model::Model model;
};

// Checks a received item independently of the model: it holds a value, it was sent, it was
// not received before, and it comes after every earlier item from its sender that this same
// receiver got. (Across receivers, the order in which receivers *run* is not the order in
// which they *took* their items: one may take an item, yield, and run after another that
// took the next one; the model checks the exact item of every receive instead.)
void note_received(World& w, int receiver, long id) {
    if (id < 0) fail("received an item that holds no value");
    auto sender = static_cast<std::size_t>(id / kItemStride);
    int sequence = static_cast<int>(id % kItemStride);
    if (sender >= w.next_sequence.size() || sequence > w.next_sequence[sender] || sequence == 0) {
        fail("received item %ld that nobody sent", id);
    }
    auto slot = static_cast<std::size_t>(id);
    if (w.received.size() <= slot) w.received.resize(slot + 1, false);
    if (w.received[slot]) fail("item %ld was received twice", id);
    w.received[slot] = true;
    int& last = w.last_received[static_cast<std::size_t>(receiver)][sender];
    if (sequence <= last) {
        fail("receiver %d got item %ld from sender %zu after that sender's later item %d",
             receiver, id, sender, last);
    }
    last = sequence;
}

int next_item(World& w, int sender) {
    return sender * kItemStride + ++w.next_sequence[static_cast<std::size_t>(sender)];
}

// Runs a command inside the actor's scope and records how it ended in `out`.
anyio::Task<> run_op(World* w, Actor* a, Outcome* out) {
    const Command& cmd = a->cmd;
    try {
        switch (cmd.step) {
            case Step::lim_acquire:
                co_await w->limiters[cmd.arg]->acquire();
                *out = {Kind::ok};
                break;
            case Step::lim_nowait:
                w->limiters[cmd.arg]->acquire_nowait();
                *out = {Kind::ok};
                break;
            case Step::lim_try:
                *out = {w->limiters[cmd.arg]->try_acquire() ? Kind::ok : Kind::no};
                break;
            case Step::lim_release:
                w->limiters[cmd.arg]->release();
                *out = {Kind::ok};
                break;
            case Step::lock_acquire:
                co_await w->lock->acquire();
                *out = {Kind::ok};
                break;
            case Step::lock_nowait:
                w->lock->acquire_nowait();
                *out = {Kind::ok};
                break;
            case Step::lock_release:
                w->lock->release();
                *out = {Kind::ok};
                break;
            case Step::sem_acquire:
                co_await w->sem->acquire();
                *out = {Kind::ok};
                break;
            case Step::sem_nowait:
                w->sem->acquire_nowait();
                *out = {Kind::ok};
                break;
            case Step::sem_release:
                w->sem->release();
                *out = {Kind::ok};
                break;
            case Step::send: {
                auto& tx = w->tx[static_cast<std::size_t>(cmd.arg)];
                if (!tx) {
                    *out = {Kind::no_handle};
                    break;
                }
                Item item(cmd.item);
                co_await tx->send(std::move(item));
                if (item.id != -1) fail("a send that returned did not take its item");
                *out = {Kind::ok};
                break;
            }
            case Step::send_nowait: {
                auto& tx = w->tx[static_cast<std::size_t>(cmd.arg)];
                if (!tx) {
                    *out = {Kind::no_handle};
                    break;
                }
                Item item(cmd.item);
                tx->send_nowait(std::move(item));
                *out = {Kind::ok};
                break;
            }
            case Step::receive: {
                auto& rx = w->rx[static_cast<std::size_t>(cmd.arg)];
                if (!rx) {
                    *out = {Kind::no_handle};
                    break;
                }
                Item item = co_await rx->receive();
                note_received(*w, a->index, item.id);
                *out = {Kind::value, item.id};
                break;
            }
            case Step::receive_nowait: {
                auto& rx = w->rx[static_cast<std::size_t>(cmd.arg)];
                if (!rx) {
                    *out = {Kind::no_handle};
                    break;
                }
                Item item = rx->receive_nowait();
                note_received(*w, a->index, item.id);
                *out = {Kind::value, item.id};
                break;
            }
            case Step::offload: {
                const int limiter = w->model.jobs[static_cast<std::size_t>(cmd.job)].limiter;
                const int expected = w->model.jobs[static_cast<std::size_t>(cmd.job)].value;
                // The default limiter through limiter = nullptr, the others by address.
                anyio::to_thread::RunSyncOptions options{
                    limiter == kDefaultLimiter ? nullptr : w->limiters[limiter], cmd.flag};
                Gate* gate = &w->gates[static_cast<std::size_t>(cmd.job)];
                int value = co_await anyio::to_thread::run_sync(options, &gated_noop, gate,
                                                                expected);
                *out = {Kind::value, value};
                break;
            }
            case Step::checkpoint:
                co_await anyio::checkpoint();
                *out = {Kind::ok};
                break;
            default:
                fail("actor %d was given step %s (harness bug)", a->index, step_name(cmd.step));
        }
    } catch (const anyio::Cancelled&) {
        *out = {Kind::cancelled};
        throw;
    } catch (...) {
        *out = classify(std::current_exception());
    }
    ++w->progress;
}

anyio::Task<> actor_main(World* w, int index) {
    Actor& a = *w->actors[static_cast<std::size_t>(index)];
    a.task_id = current_task_id();
    for (;;) {
        a.go.emplace();
        a.idle = true;
        co_await a.go->wait();
        a.idle = false;
        ++w->progress;
        if (a.cmd.step == Step::quit) co_return;
        Outcome out;
        anyio::Task<> op = run_op(w, &a, &out);
        anyio::Task<bool> scoped = a.scope->run(std::move(op));
        bool completed = co_await std::move(scoped);
        (void)completed;
        ++w->progress;
        a.last = out;
        ++a.done;
        w->log.push_back(index);
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing the real state with the model
// ---------------------------------------------------------------------------------------------

void check_limiter(World& w, int l) {
    const anyio::CapacityLimiter& real = *w.limiters[l];
    const model::Limiter& m = w.model.lim[l];
    std::string what = "limiter " + std::to_string(l);
    anyio::CapacityLimiterStatistics stats = real.statistics();
    FZ_EXPECT_EQ(stats.borrowed_tokens, m.borrowed(), (what + " borrowed_tokens").c_str());
    FZ_EXPECT_EQ(real.borrowed_tokens(), m.borrowed(), (what + " borrowed_tokens()").c_str());
    FZ_EXPECT_EQ(stats.total_tokens, m.total, (what + " total_tokens").c_str());
    FZ_EXPECT_EQ(real.total_tokens(), m.total, (what + " total_tokens()").c_str());
    FZ_EXPECT_EQ(real.available_tokens(), std::max<std::int64_t>(0, m.total - m.borrowed()),
                 (what + " available_tokens()").c_str());
    FZ_EXPECT_EQ(stats.tasks_waiting, m.queue.size(), (what + " tasks_waiting").c_str());
    if (stats.borrowed_tokens > stats.total_tokens && !m.lowered) {
        fail("%s: %lld borrowed of %lld without the total ever being lowered", what.c_str(),
             static_cast<long long>(stats.borrowed_tokens),
             static_cast<long long>(stats.total_tokens));
    }
    FZ_EXPECT_EQ(stats.borrowers.size(), m.holders.size(), (what + " borrowers.size()").c_str());
    // Every borrower once; the model's named holders exactly; the rest are per-call borrowers.
    std::vector<const void*> borrowers = stats.borrowers;
    std::sort(borrowers.begin(), borrowers.end());
    if (std::adjacent_find(borrowers.begin(), borrowers.end()) != borrowers.end()) {
        fail("%s: a borrower is listed twice", what.c_str());
    }
    std::size_t anonymous = borrowers.size();
    for (const model::Holder& holder : m.holders) {
        const void* id = nullptr;
        if (holder.kind == model::Holder::Kind::actor) {
            id = w.actors[static_cast<std::size_t>(holder.index)]->task_id;
        } else if (holder.kind == model::Holder::Kind::driver) {
            id = &w.driver_borrowers[holder.index];
        } else {
            continue;
        }
        if (!std::binary_search(borrowers.begin(), borrowers.end(), id)) {
            fail("%s: the model's holder (%s %d) is not among the borrowers", what.c_str(),
                 holder.kind == model::Holder::Kind::actor ? "actor" : "driver", holder.index);
        }
        --anonymous;
    }
    std::size_t jobs = 0;
    for (const model::Holder& holder : m.holders) {
        if (holder.kind == model::Holder::Kind::job) ++jobs;
    }
    FZ_EXPECT_EQ(anonymous, jobs, (what + " per-call (run_sync) borrowers").c_str());
}

void check_lock(World& w) {
    const model::Lock& m = w.model.lock;
    anyio::LockStatistics stats = w.lock->statistics();
    FZ_EXPECT_EQ(stats.locked, m.owner != model::kNobody, "Lock statistics().locked");
    FZ_EXPECT_EQ(w.lock->locked(), m.owner != model::kNobody, "Lock::locked()");
    FZ_EXPECT_EQ(stats.tasks_waiting, m.queue.size(), "Lock tasks_waiting");
    const void* owner = nullptr;
    if (m.owner == model::kDriver) {
        owner = w.driver_id;
    } else if (m.owner >= 0) {
        owner = w.actors[static_cast<std::size_t>(m.owner)]->task_id;
    }
    if (stats.owner != owner) {
        fail("Lock owner: the library names a different task than the model (model: %s %d)",
             m.owner == model::kDriver ? "driver" : "actor", m.owner);
    }
}

void check_semaphore(World& w) {
    const model::Semaphore& m = w.model.sem;
    FZ_EXPECT_EQ(w.sem->value(), m.value, "Semaphore value()");
    FZ_EXPECT_EQ(w.sem->statistics().tasks_waiting, m.queue.size(), "Semaphore tasks_waiting");
    FZ_EXPECT_EQ(w.sem->max_value().has_value(), m.max.has_value(), "Semaphore has max_value");
    if (m.max) FZ_EXPECT_EQ(*w.sem->max_value(), *m.max, "Semaphore max_value()");
    if (w.sem->value() < 0 || (m.max && w.sem->value() > *m.max)) {
        fail("Semaphore value %lld out of range", static_cast<long long>(w.sem->value()));
    }
    if (w.sem->value() > 0 && w.sem->statistics().tasks_waiting > 0) {
        fail("Semaphore has a free permit while tasks wait");
    }
}

void check_stream(World& w) {
    const model::Stream& m = w.model.stream;
    auto check = [&](const anyio::MemoryObjectStreamStatistics& stats, const char* end, int slot) {
        std::string what = std::string("stream ") + end + "[" + std::to_string(slot) + "] ";
        FZ_EXPECT_EQ(stats.current_buffer_used, m.buffer.size(), (what + "current_buffer_used").c_str());
        FZ_EXPECT_EQ(stats.max_buffer_size, m.max, (what + "max_buffer_size").c_str());
        FZ_EXPECT_EQ(stats.open_send_streams, m.open_senders, (what + "open_send_streams").c_str());
        FZ_EXPECT_EQ(stats.open_receive_streams, m.open_receivers,
                     (what + "open_receive_streams").c_str());
        FZ_EXPECT_EQ(stats.tasks_waiting_send, m.senders.size(), (what + "tasks_waiting_send").c_str());
        FZ_EXPECT_EQ(stats.tasks_waiting_receive, m.receivers.size(),
                     (what + "tasks_waiting_receive").c_str());
    };
    for (int i = 0; i < kSlots; ++i) {
        auto slot = static_cast<std::size_t>(i);
        FZ_EXPECT_EQ(w.tx[slot].has_value(), m.tx[slot].exists, "stream tx slot in use");
        FZ_EXPECT_EQ(w.rx[slot].has_value(), m.rx[slot].exists, "stream rx slot in use");
        if (w.tx[slot]) check(w.tx[slot]->statistics(), "tx", i);
        if (w.rx[slot]) check(w.rx[slot]->statistics(), "rx", i);
    }
}

void check_pool(World& w) {
    const model::Pool& m = w.model.pool;
    anyio::WorkerPoolStatistics stats = anyio::to_thread::statistics();
    FZ_EXPECT_EQ(stats.busy_workers, m.busy, "to_thread busy_workers");
    FZ_EXPECT_EQ(stats.threads_created, m.created, "to_thread threads_created (peak concurrency)");
    FZ_EXPECT_EQ(stats.idle_workers, m.created - m.busy, "to_thread idle_workers");
    FZ_EXPECT_EQ(stats.workers, m.created, "to_thread workers");
    FZ_EXPECT_EQ(stats.threads_pruned, 0u, "to_thread threads_pruned");
    FZ_EXPECT_EQ(stats.jobs_completed, m.completed, "to_thread jobs_completed");
}

void check_primitives(World& w) {
    w.model.check_self();
    for (int l = 0; l < kLimiters; ++l) check_limiter(w, l);
    check_lock(w);
    check_semaphore(w);
    check_stream(w);
    check_pool(w);
}

// After a settle: also the actors, the order they finished in, and the live items.
void check_settled(World& w) {
    check_primitives(w);
    const model::Model& m = w.model;
    if (!m.pending.empty()) fail("model: resumptions left after settling (harness bug)");
    for (int i = 0; i < w.config.actors; ++i) {
        const Actor& real = *w.actors[static_cast<std::size_t>(i)];
        const model::Actor& expected = m.actors[static_cast<std::size_t>(i)];
        if (real.done != expected.done) {
            fail("actor %d finished %llu commands, the model %llu (its command: %s; the model "
                 "expected it %s)",
                 i, static_cast<unsigned long long>(real.done),
                 static_cast<unsigned long long>(expected.done), step_name(expected.cmd.step),
                 expected.phase == model::Actor::Phase::idle ? "to be done" : "to wait");
        }
        if (real.last != expected.last) {
            fail("actor %d: its %s ended with %s, the model says %s", i,
                 step_name(expected.cmd.step), describe(real.last).c_str(),
                 describe(expected.last).c_str());
        }
        if (real.idle != (expected.phase == model::Actor::Phase::idle)) {
            fail("actor %d is %s, the model says it %s", i,
                 real.idle ? "waiting for a command" : "busy",
                 expected.phase == model::Actor::Phase::idle ? "is idle" : "waits");
        }
    }
    if (w.log != m.log) {
        std::string real_log;
        std::string model_log;
        for (int a : w.log) real_log += std::to_string(a) + " ";
        for (int a : m.log) model_log += std::to_string(a) + " ";
        fail("actors finished in the order [%s], the model says [%s]", real_log.c_str(),
             model_log.c_str());
    }
    FZ_EXPECT_EQ(live_items,
                 static_cast<long>(m.stream.buffer.size() + m.stream.senders.size()),
                 "live items (buffered + held by blocked senders)");
}

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

struct Input {
    const std::uint8_t* data;
    std::size_t size;
    std::size_t pos = 0;
    std::uint8_t next() { return pos < size ? data[pos++] : 0; }
    [[nodiscard]] bool empty() const { return pos >= size; }
};

// Lets the loop run until no actor has run for two turns in a row, and the model run its
// queue of resumptions to the end.
anyio::Task<> settle(World& w, bool by_sleep) {
    int quiet = 0;
    for (int turn = 0; quiet < 2; ++turn) {
        if (turn > kMaxSettleTurns) fail("the loop never settled (actors keep running)");
        std::uint64_t before = w.progress;
        if (by_sleep) {
            co_await anyio::sleep(std::chrono::seconds(0));
        } else {
            co_await anyio::checkpoint();
        }
        quiet = w.progress == before ? quiet + 1 : 0;
    }
    w.model.run_pending();
}

// Lets running job `j` return and waits (loop turns, bounded by the wall clock) for its
// completion to reach the loop. The loop has settled, so nothing else runs meanwhile.
anyio::Task<> complete_job(World& w, int j) {
    std::uint64_t expected = w.model.pool.completed + 1;
    open_gate(w.gates[static_cast<std::size_t>(j)]);
    auto deadline = std::chrono::steady_clock::now() + kHangBound;
    while (anyio::to_thread::statistics().jobs_completed < expected) {
        if (std::chrono::steady_clock::now() > deadline) {
            fail("job %d returned but its completion never reached the loop", j);
        }
        std::this_thread::yield();
        co_await anyio::checkpoint();
    }
    w.model.complete(j);
}

void trace(const World& w) {
    if (!trace_enabled) return;
    std::fprintf(stderr, "step %d: %s %s\n", current_step.index, step_name(current_step.step),
                 current_step.detail.c_str());
    (void)w;
}

// Sends `cmd` to actor `a` if the model says it waits for one (else the step does nothing).
bool command(World& w, int a, Command cmd) {
    model::Actor& m = w.model.actors[static_cast<std::size_t>(a)];
    Actor& real = *w.actors[static_cast<std::size_t>(a)];
    current_step.detail = "actor " + std::to_string(a) + " arg " + std::to_string(cmd.arg);
    if (m.phase != model::Actor::Phase::idle) return false;
    if (!real.idle) fail("actor %d is not waiting for a command, the model says it is", a);
    trace(w);
    real.cmd = cmd;
    real.scope.emplace();
    real.go->set();
    w.model.command(a, cmd);
    return true;
}

// Runs a driver operation on the real side and the model, and compares their outcomes.
template <class Real, class Predict>
void both(const char* what, Real&& real, Predict&& predict) {
    Outcome got;
    try {
        got = real();
    } catch (...) {
        got = classify(std::current_exception());
    }
    Outcome expected = predict();
    if (got != expected) {
        fail("%s: the library says %s, the model %s", what, describe(got).c_str(),
             describe(expected).c_str());
    }
}

void make_stream(World& w, std::size_t size) {
    auto streams = anyio::create_memory_object_stream<Item>(size);
    w.tx[0].emplace(std::move(streams.first));
    w.rx[0].emplace(std::move(streams.second));
    w.model.new_stream(size);
    // Item ids stay unique over the whole run (never reset here): a command given before
    // the old stream went away may still send into the new one.
}

anyio::Task<> run_steps(World& w, Input& in, anyio::TaskGroup& tg) {
    model::Model& m = w.model;
    const int n = w.config.actors;
    for (int i = 0; i < n; ++i) tg.start_soon(actor_main, &w, i);
    co_await settle(w, false);
    for (int i = 0; i < n; ++i) {
        if (w.actors[static_cast<std::size_t>(i)]->task_id == nullptr) fail("actor %d never ran", i);
    }
    check_settled(w);

    for (int index = 0; index < kMaxSteps && !in.empty(); ++index) {
        auto step = static_cast<Step>(in.next() % static_cast<int>(Step::count));
        current_step = {index, step, {}};
        auto actor = [&] { return in.next() % n; };
        auto limiter = [&] { return in.next() % kLimiters; };
        auto slot = [&] { return in.next() % kSlots; };
        bool settled = false;
        switch (step) {
            case Step::lim_acquire:
            case Step::lim_nowait:
            case Step::lim_try:
            case Step::lim_release: {
                int a = actor();
                command(w, a, {step, limiter()});
                break;
            }
            case Step::drv_lim_take: {
                int l = limiter();
                std::uint8_t b = in.next();
                int k = b & 1;
                bool try_form = (b & 2) != 0;
                current_step.detail = "limiter " + std::to_string(l) + " borrower " +
                                      std::to_string(k) + (try_form ? " try" : " nowait");
                trace(w);
                const void* borrower = &w.driver_borrowers[k];
                both("driver acquire on behalf of",
                     [&]() -> Outcome {
                         if (try_form) {
                             return {w.limiters[l]->try_acquire_on_behalf_of(borrower) ? Kind::ok
                                                                                       : Kind::no};
                         }
                         w.limiters[l]->acquire_on_behalf_of_nowait(borrower);
                         return {Kind::ok};
                     },
                     [&] { return m.limiter_take_nowait(l, model::Model::driver_holder(k), try_form); });
                break;
            }
            case Step::drv_lim_release: {
                int l = limiter();
                int k = in.next() & 1;
                current_step.detail = "limiter " + std::to_string(l) + " borrower " + std::to_string(k);
                trace(w);
                both("driver release on behalf of",
                     [&]() -> Outcome {
                         w.limiters[l]->release_on_behalf_of(&w.driver_borrowers[k]);
                         return {Kind::ok};
                     },
                     [&] { return m.limiter_release(l, model::Model::driver_holder(k)); });
                break;
            }
            case Step::set_total: {
                int l = limiter();
                static constexpr std::int64_t totals[] = {0, 1, 2, 3, 4, 5, anyio::infinite_tokens, -1};
                std::int64_t total = totals[in.next() % 8];
                current_step.detail = "limiter " + std::to_string(l) + " to " + std::to_string(total);
                trace(w);
                both("set_total_tokens",
                     [&]() -> Outcome {
                         w.limiters[l]->set_total_tokens(total);
                         return {Kind::ok};
                     },
                     [&] { return m.set_total(l, total); });
                break;
            }
            case Step::cancel: {
                int a = actor();
                current_step.detail = "actor " + std::to_string(a);
                trace(w);
                Actor& real = *w.actors[static_cast<std::size_t>(a)];
                if (real.scope) real.scope->cancel();
                m.cancel(a);
                break;
            }
            case Step::lock_acquire:
            case Step::lock_nowait:
            case Step::lock_release:
            case Step::sem_acquire:
            case Step::sem_nowait:
            case Step::sem_release:
            case Step::checkpoint:
                command(w, actor(), {step});
                break;
            case Step::drv_lock: {
                bool release = (in.next() & 1) != 0;
                current_step.detail = release ? "release" : "acquire_nowait";
                trace(w);
                both("driver Lock",
                     [&]() -> Outcome {
                         if (release) {
                             w.lock->release();
                         } else {
                             w.lock->acquire_nowait();
                         }
                         return {Kind::ok};
                     },
                     [&] { return release ? m.lock_release(model::kDriver) : m.lock_nowait(model::kDriver); });
                break;
            }
            case Step::drv_sem: {
                bool release = (in.next() & 1) != 0;
                current_step.detail = release ? "release" : "acquire_nowait";
                trace(w);
                both("driver Semaphore",
                     [&]() -> Outcome {
                         if (release) {
                             w.sem->release();
                         } else {
                             w.sem->acquire_nowait();
                         }
                         return {Kind::ok};
                     },
                     [&] { return release ? m.sem_release(model::kDriver) : m.sem_nowait(model::kDriver); });
                break;
            }
            case Step::send:
            case Step::send_nowait: {
                int a = actor();
                int s = slot();
                if (m.actors[static_cast<std::size_t>(a)].phase != model::Actor::Phase::idle) break;
                command(w, a, {step, s, false, next_item(w, a)});
                break;
            }
            case Step::receive:
            case Step::receive_nowait: {
                int a = actor();
                command(w, a, {step, slot()});
                break;
            }
            case Step::drv_send: {
                int s = slot();
                int item = next_item(w, kDriverSender);
                current_step.detail = "tx " + std::to_string(s) + " item " + std::to_string(item);
                trace(w);
                both("driver send_nowait",
                     [&]() -> Outcome {
                         auto& tx = w.tx[static_cast<std::size_t>(s)];
                         if (!tx) return {Kind::no_handle};
                         Item value(item);
                         tx->send_nowait(std::move(value));
                         return {Kind::ok};
                     },
                     [&] { return m.send_nowait(s, item); });
                break;
            }
            case Step::drv_receive: {
                int s = slot();
                current_step.detail = "rx " + std::to_string(s);
                trace(w);
                both("driver receive_nowait",
                     [&]() -> Outcome {
                         auto& rx = w.rx[static_cast<std::size_t>(s)];
                         if (!rx) return {Kind::no_handle};
                         Item value = rx->receive_nowait();
                         note_received(w, kMaxActors, value.id);  // the driver
                         return {Kind::value, value.id};
                     },
                     [&] { return m.receive_nowait(s); });
                break;
            }
            case Step::close:
            case Step::destroy: {
                std::uint8_t b = in.next();
                bool send_side = (b & 1) != 0;
                int s = (b >> 1) % kSlots;
                current_step.detail = std::string(send_side ? "tx " : "rx ") + std::to_string(s);
                trace(w);
                both(step == Step::close ? "close" : "destroy",
                     [&]() -> Outcome {
                         auto idx = static_cast<std::size_t>(s);
                         if (send_side ? !w.tx[idx] : !w.rx[idx]) return {Kind::no_handle};
                         if (step == Step::close) {
                             if (send_side) {
                                 w.tx[idx]->close();
                             } else {
                                 w.rx[idx]->close();
                             }
                         } else if (send_side) {
                             w.tx[idx].reset();
                         } else {
                             w.rx[idx].reset();
                         }
                         return {Kind::ok};
                     },
                     [&] { return step == Step::close ? m.close(send_side, s) : m.destroy(send_side, s); });
                break;
            }
            case Step::clone: {
                std::uint8_t b = in.next();
                bool send_side = (b & 1) != 0;
                int s = (b >> 1) % kSlots;
                current_step.detail = std::string(send_side ? "tx " : "rx ") + std::to_string(s);
                trace(w);
                int into = -1;
                Outcome expected = m.clone(send_side, s, &into);
                if (expected.kind == Kind::no_handle) break;  // nothing to clone, or no free slot
                Outcome got;
                try {
                    auto idx = static_cast<std::size_t>(s);
                    auto to = static_cast<std::size_t>(into);
                    if (send_side) {
                        w.tx[to].emplace(w.tx[idx]->clone());
                    } else {
                        w.rx[to].emplace(w.rx[idx]->clone());
                    }
                    got = {Kind::ok};
                } catch (...) {
                    got = classify(std::current_exception());
                }
                if (got != expected) {
                    fail("clone: the library says %s, the model %s", describe(got).c_str(),
                         describe(expected).c_str());
                }
                break;
            }
            case Step::new_stream: {
                std::size_t size = stream_size_from(in.next());
                current_step.detail = "size " + std::to_string(size);
                if (m.stream.any_handle()) break;
                trace(w);
                make_stream(w, size);
                break;
            }
            case Step::offload: {
                int a = actor();
                std::uint8_t b = in.next();
                int l = b % kLimiters;
                bool abandon = ((b / kLimiters) & 1) != 0;
                if (m.actors[static_cast<std::size_t>(a)].phase != model::Actor::Phase::idle) break;
                if (m.outstanding_jobs() >= kMaxOutstandingJobs) break;
                int j = static_cast<int>(m.jobs.size());
                m.jobs.push_back({a, l, abandon, model::Job::State::waiting, false, 1000 + j});
                w.gates.emplace_back();
                command(w, a, {step, l, abandon, 0, j});
                current_step.detail += abandon ? " abandon_on_cancel" : " shielded";
                break;
            }
            case Step::open_gate: {
                std::uint8_t b = in.next();
                co_await settle(w, false);
                check_settled(w);
                std::vector<int> running;
                for (std::size_t j = 0; j < m.jobs.size(); ++j) {
                    if (m.jobs[j].state == model::Job::State::running) running.push_back(static_cast<int>(j));
                }
                settled = true;
                if (running.empty()) break;
                int j = running[b % running.size()];
                current_step.detail = "job " + std::to_string(j);
                trace(w);
                co_await complete_job(w, j);
                settled = false;
                break;
            }
            case Step::settle:
            case Step::settle_sleep:
                trace(w);
                co_await settle(w, step == Step::settle_sleep);
                settled = true;
                break;
            case Step::respawn: {
                int a = actor();
                const model::Actor& ma = m.actors[static_cast<std::size_t>(a)];
                bool holds = m.lock.owner == a;
                for (bool held : ma.holds) holds = holds || held;
                // A task that ends holding a token would stay a borrower, and a new task may
                // be allocated at its address: only actors that hold nothing are replaced.
                if (ma.phase != model::Actor::Phase::idle || holds) break;
                if (!command(w, a, {Step::quit})) break;
                tg.start_soon(actor_main, &w, a);  // runs after the old task has ended (FIFO)
                break;
            }
            case Step::count:
            case Step::quit:
                break;
        }
        if (settled) {
            check_settled(w);
        } else {
            check_primitives(w);
        }
    }

    // The end: settle, then either let every offload return first (everything checked), or
    // cancel everything while some still run (only the shutdown path is checked).
    current_step = {-1, Step::settle, "end of input"};
    co_await settle(w, false);
    check_settled(w);
    if (!w.config.cancel_before_gates) {
        for (;;) {
            int running = -1;
            for (std::size_t j = 0; j < m.jobs.size(); ++j) {
                if (m.jobs[j].state == model::Job::State::running) {
                    running = static_cast<int>(j);
                    break;
                }
            }
            if (running < 0) break;
            current_step = {-1, Step::open_gate, "end of input, job " + std::to_string(running)};
            co_await complete_job(w, running);
            co_await settle(w, false);
            check_settled(w);
        }
    }
    current_step = {-1, Step::cancel, "everything, at the end"};
    tg.cancel_scope().cancel();
    for (Gate& gate : w.gates) open_gate(gate);
    // No co_await from here on: this body is inside the scope just cancelled.
}

anyio::Task<> fuzz_main(World& w, Input& in) {
    w.driver_id = current_task_id();
    w.own_limiters[0].emplace(w.config.totals[0]);
    w.own_limiters[1].emplace(w.config.totals[1]);
    w.limiters[0] = &*w.own_limiters[0];
    w.limiters[1] = &*w.own_limiters[1];
    w.limiters[kDefaultLimiter] = &anyio::to_thread::current_default_thread_limiter();
    w.lock.emplace(w.config.lock_fast);
    w.sem.emplace(w.config.sem_initial, w.config.sem_max, w.config.sem_fast);
    make_stream(w, w.config.stream_size);

    model::Model& m = w.model;
    m.actors.resize(static_cast<std::size_t>(w.config.actors));
    for (int l = 0; l < kLimiters; ++l) m.lim[l].total = w.config.totals[l];
    m.lock.fast = w.config.lock_fast;
    m.sem.value = m.sem.capacity = w.config.sem_initial;
    m.sem.max = w.config.sem_max;
    m.sem.fast = w.config.sem_fast;
    m.stream.max = w.config.stream_size;

    co_await anyio::task_group(
        [&](anyio::TaskGroup& tg) -> anyio::Task<> { co_await run_steps(w, in, tg); });

    // Every actor has ended: nobody waits on anything any more.
    current_step = {-1, Step::quit, "after the task group"};
    for (int l = 0; l < kLimiters; ++l) {
        FZ_EXPECT_EQ(w.limiters[l]->statistics().tasks_waiting, 0u, "limiter tasks_waiting at the end");
    }
    FZ_EXPECT_EQ(w.lock->statistics().tasks_waiting, 0u, "Lock tasks_waiting at the end");
    FZ_EXPECT_EQ(w.sem->statistics().tasks_waiting, 0u, "Semaphore tasks_waiting at the end");
    for (auto& tx : w.tx) {
        if (!tx) continue;
        FZ_EXPECT_EQ(tx->statistics().tasks_waiting_send, 0u, "stream tasks_waiting_send at the end");
        FZ_EXPECT_EQ(tx->statistics().tasks_waiting_receive, 0u,
                     "stream tasks_waiting_receive at the end");
    }
    if (!w.config.cancel_before_gates) {
        // Nothing ran since the last check but cancelled waits: the holders are unchanged.
        std::int64_t semaphore_value = m.sem.value;
        FZ_EXPECT_EQ(w.sem->value(), semaphore_value, "Semaphore value at the end");
        for (int l = 0; l < kLimiters; ++l) {
            FZ_EXPECT_EQ(w.limiters[l]->borrowed_tokens(), m.lim[l].borrowed(),
                         "limiter borrowed_tokens at the end");
        }
        FZ_EXPECT_EQ(anyio::to_thread::statistics().busy_workers, 0u, "busy workers at the end");
    }
    // Destroyed on the loop, with tokens and the lock possibly still held by ended tasks.
    for (auto& tx : w.tx) tx.reset();
    for (auto& rx : w.rx) rx.reset();
    w.sem.reset();
    w.lock.reset();
    w.own_limiters[0].reset();
    w.own_limiters[1].reset();
}

Config read_config(Input& in) {
    std::array<std::uint8_t, kConfigBytes> b{};
    for (auto& byte : b) byte = in.next();
    Config c;
    c.totals[0] = b[0] % 4;
    c.totals[1] = (b[0] >> 2) % 4;
    c.totals[kDefaultLimiter] = (b[0] >> 4) % 4;
    c.lock_fast = (b[1] & 1) != 0;
    c.sem_fast = (b[1] & 2) != 0;
    c.cancel_before_gates = (b[1] & 4) != 0;
    c.sem_initial = b[2] % 4;
    if ((b[2] >> 2) % 4 != 0) c.sem_max = c.sem_initial + (b[2] >> 4) % 3;
    c.stream_size = stream_size_from(b[3]);
    c.actors = 2 + b[4] % (kMaxActors - 1);
    // b[5] is reserved (inputs keep their meaning when a setting is added).
    return c;
}

std::size_t thread_count() {
    std::size_t count = 0;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
        (void)entry;
        ++count;
    }
    return count;
}

std::size_t baseline_threads = 0;

void run_one(const std::uint8_t* data, std::size_t size) {
    // Taken at the first input, not at initialisation: libFuzzer starts its own helper thread
    // (the RSS watcher) in between.
    if (baseline_threads == 0) baseline_threads = thread_count();
    Input in{data, size};
    World w;
    w.config = read_config(in);
    for (int i = 0; i < kMaxActors; ++i) {
        w.actors[static_cast<std::size_t>(i)] = std::make_unique<Actor>();
        w.actors[static_cast<std::size_t>(i)]->index = i;
    }
    live_items = 0;
    anyio::EventLoop::Options options;
    options.default_thread_tokens = w.config.totals[kDefaultLimiter];
    options.max_idle_time = std::chrono::hours(1);  // never prune: threads_created is exact
    anyio::run(fuzz_main(w, in), options);
    current_step = {-1, Step::quit, "after run() returned"};
    if (live_items != 0) fail("%ld items are still alive after the loop finished", live_items);
    // A joined thread can linger in /proc for a moment while the kernel reaps it.
    auto deadline = std::chrono::steady_clock::now() + kHangBound;
    while (thread_count() != baseline_threads) {
        if (std::chrono::steady_clock::now() > deadline) {
            fail("%zu threads are alive after run() returned, %zu before", thread_count(),
                 baseline_threads);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    // Give the step description's buffer back: libFuzzer re-runs every input that ends with
    // more mallocs than frees (to look for leaks), which would halve the executions.
    std::string().swap(current_step.detail);
    current_step = {};
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    trace_enabled = std::getenv("LOOP_MODEL_FUZZ_TRACE") != nullptr;
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    run_one(data, size);
    return 0;
}

#if defined(ANYIO_FUZZ_STANDALONE_MAIN)
// Without libFuzzer: replay every file named on the command line (directories: every file
// in them), as a regression run.
int main(int argc, char** argv) {
    LLVMFuzzerInitialize(&argc, &argv);
    std::vector<std::filesystem::path> files;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (!arg.empty() && arg[0] == '-') continue;  // libFuzzer flags, ignored
        std::filesystem::path path(arg);
        if (std::filesystem::is_directory(path)) {
            for (const auto& entry : std::filesystem::directory_iterator(path)) {
                if (entry.is_regular_file()) files.push_back(entry.path());
            }
        } else {
            files.push_back(path);
        }
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
        std::ifstream stream(file, std::ios::binary);
        std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
        LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    }
    std::printf("loop_model_fuzz: %zu inputs replayed, no mismatch\n", files.size());
    return 0;
}
#endif
