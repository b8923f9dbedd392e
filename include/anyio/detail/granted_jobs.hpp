// Jobs whose token the loop has granted and that wait for the spinning worker: the pool's
// shared queue (as Tokio's blocking pool has one), bounded and fed by the loop alone.
//
// Why: with 40 calls in flight on 2 vCPUs, handing each job to "its" worker means waking a
// sleeping thread per job (tens of microseconds on a VM). The worker that finished a job last
// is awake; it can run the next granted jobs one after the other while the workers they were
// meant for sleep on. The loop still names a worker for every job it queues here (its backup,
// held for it), so blocking jobs keep one thread each: if the spinning worker does not take a
// job soon enough (it runs a blocking job, or it stopped spinning), the loop takes the job back
// and hands it to its backup (worker_pool.hpp).
//
// One atomic word says everything the two sides race on:
//
//   bits  0..31  head   index of the oldest waiting job (the next to claim or take back)
//   bits 32..47  last   id of the worker that finished a job last (0: none)
//   bits 48..49  phase  of that worker: parked (not looking here: about to sleep or asleep),
//                       free (spinning, or checking once more before it sleeps: claims the
//                       jobs here), busy (running a job; looks here again when done), woken
//                       (the loop woke it with a job; busy once it starts it). Whenever it
//                       starts a job it is busy; whenever it finishes one, free.
//   bits 50..63  runs   jobs `last` has started while being last (wraps; lets the loop tell
//                       a busy period that lasts from one that ended and began again)
//
// Only `last`, while free, may claim, and a claim is one compare-and-swap of the word: it
// checks that it is still last and free and takes the oldest job in the same step. The loop
// takes a job back with a compare-and-swap of the head too, so each job is taken exactly once,
// oldest first. `tail` (how many jobs were ever pushed) has one writer, the loop.
//
// Indices are 32-bit and wrap: head and tail are compared for equality and subtracted only,
// and never more than `capacity` apart. A claimer whose compare-and-swap read the word before
// 2^32 later pushes could be confused; no thread is preempted that long.
//
// Worker-visible side: `word_`, `tail_` and `slots_`. The rest (pushed_at, the loop's copy of
// tail) is the loop's own bookkeeping and lives in WorkerPool.
#pragma once

#include <atomic>
#include <cstdint>

namespace anyio::detail {

struct JobBase;

class GrantedJobs {
public:
    static constexpr std::uint32_t capacity = 64;
    enum class Phase : std::uint8_t { parked = 0, free = 1, busy = 2, woken = 3 };

    /// The word, decoded.
    struct State {
        std::uint32_t head = 0;
        std::uint16_t last = 0;
        Phase phase = Phase::parked;
        std::uint16_t runs = 0;

        [[nodiscard]] bool someone_looks() const noexcept {
            return last != 0 && phase != Phase::parked;
        }
        [[nodiscard]] bool is_free(std::uint16_t me) const noexcept {
            return last == me && phase == Phase::free;
        }
    };

    GrantedJobs() = default;
    GrantedJobs(const GrantedJobs&) = delete;
    GrantedJobs& operator=(const GrantedJobs&) = delete;

    static State decode(std::uint64_t word) noexcept {
        State s;
        s.head = static_cast<std::uint32_t>(word);
        s.last = static_cast<std::uint16_t>(word >> 32);
        s.phase = static_cast<Phase>((word >> 48) & 3u);
        s.runs = static_cast<std::uint16_t>(word >> 50);
        return s;
    }
    static std::uint64_t encode(const State& s) noexcept {
        return static_cast<std::uint64_t>(s.head) | (static_cast<std::uint64_t>(s.last) << 32) |
               (static_cast<std::uint64_t>(s.phase) << 48) |
               (static_cast<std::uint64_t>(s.runs & 0x3fffu) << 50);
    }

    [[nodiscard]] State load(std::memory_order order) const noexcept {
        return decode(word_.load(order));
    }

    // ---- Loop side ----

    /// Publishes `job` at index `tail` (the loop's count of pushes); the caller checked that
    /// fewer than `capacity` indices are unresolved. Returns the new tail.
    std::uint32_t push(std::uint32_t tail, JobBase* job) noexcept {
        slots_[tail % capacity] = job;
        // seq_cst, not only release (which publishes the slot and the job to the claimer's
        // acquire load): the loop then reads the word (seq_cst) to see whether anyone still
        // looks here, and a worker that stops looking does the opposite (park(), then a
        // seq_cst load of tail). One of the two sees the other: no job is left unseen.
        tail_.store(tail + 1, std::memory_order_seq_cst);
        return tail + 1;
    }

    /// Takes back the job at `index` if it is still the oldest waiting one. False: a worker
    /// claimed it (or the head is elsewhere).
    bool take_back(std::uint32_t index) noexcept {
        // relaxed: the loop reads back only the slot it wrote itself; who claimed a job is
        // learnt from the job (JobBase::runner_, acquire), not from this word.
        std::uint64_t word = word_.load(std::memory_order_relaxed);
        for (;;) {
            State s = decode(word);
            if (s.head != index) return false;
            ++s.head;
            // relaxed: as above; the compare-and-swap only has to be atomic.
            if (word_.compare_exchange_weak(word, encode(s), std::memory_order_relaxed,
                                            std::memory_order_relaxed)) {
                return true;
            }
        }
    }

    /// The loop is about to wake worker `id`, asleep, with a job: if it is last (and parked),
    /// it counts as looking here again, and takes the waiting jobs once that job is done.
    /// Called before the job is handed over, so that the worker, starting it, turns woken
    /// into busy (never the other way round).
    void wake_last(std::uint16_t id) noexcept { (void)set_phase(id, Phase::parked, Phase::woken); }

    /// The job pushed at `index` (the loop reads its own writes; nullptr once resolved).
    [[nodiscard]] JobBase* slot(std::uint32_t index) const noexcept {
        return slots_[index % capacity];
    }
    /// Marks `index` resolved: its job was taken back, or the loop knows who claimed it.
    void clear(std::uint32_t index) noexcept { slots_[index % capacity] = nullptr; }

    // ---- Worker side (`me`: the calling worker's id, never 0) ----

    /// The calling worker has finished a job: it is last now, and free (before it posts the
    /// completion, so the loop, when it handles that completion, finds it last).
    void finished(std::uint16_t me) noexcept {
        // relaxed load: the compare-and-swap below re-reads the word anyway.
        std::uint64_t word = word_.load(std::memory_order_relaxed);
        for (;;) {
            State s = decode(word);
            if (s.last == me && s.phase == Phase::free) return;  // nothing to change
            s.last = me;
            s.phase = Phase::free;
            // relaxed: the loop reads the word only after taking the completion this worker
            // posts next (release/acquire), which orders this before that read; a job queued
            // meanwhile is not lost, since a worker stops looking only through park().
            if (word_.compare_exchange_weak(word, encode(s), std::memory_order_relaxed,
                                            std::memory_order_relaxed)) {
                return;
            }
        }
    }

    /// True if jobs wait here.
    [[nodiscard]] bool has_waiting(std::memory_order order) const noexcept {
        const std::uint32_t head = load(order).head;
        return tail_.load(order) != head;  // `order`: acquire for a hint, seq_cst after park()
    }

    /// Claims the oldest waiting job if the caller is last and free; it is busy afterwards.
    JobBase* claim(std::uint16_t me) noexcept {
        // relaxed: the compare-and-swap decides; the slot is published through tail below.
        std::uint64_t word = word_.load(std::memory_order_relaxed);
        for (;;) {
            State s = decode(word);
            if (!s.is_free(me)) return nullptr;
            // acquire: the slot (and the job in it) were written before the loop published
            // tail with its store.
            if (tail_.load(std::memory_order_acquire) == s.head) return nullptr;
            const std::uint32_t index = s.head;
            ++s.head;
            s.phase = Phase::busy;
            ++s.runs;
            // relaxed: the claim only has to be atomic. The slot cannot be reused before the
            // loop has resolved this index, which it does only after reading the claimer's
            // release store of JobBase::runner_, made after the read below.
            if (word_.compare_exchange_weak(word, encode(s), std::memory_order_relaxed,
                                            std::memory_order_relaxed)) {
                return slots_[index % capacity];
            }
        }
    }

    /// The caller, last, starts a job handed to it directly: it is busy meanwhile (whatever
    /// its phase was: free, woken, or parked if the job reached it between park() and sleep).
    void begin_direct(std::uint16_t me) noexcept {
        // relaxed: a hint for the loop's "is it stuck" check; the compare-and-swap re-reads.
        std::uint64_t word = word_.load(std::memory_order_relaxed);
        for (;;) {
            State s = decode(word);
            if (s.last != me || s.phase == Phase::busy) return;
            s.phase = Phase::busy;
            ++s.runs;
            // relaxed: only the loop's stuck heuristic reads this; no data depends on it.
            if (word_.compare_exchange_weak(word, encode(s), std::memory_order_relaxed,
                                            std::memory_order_relaxed)) {
                return;
            }
        }
    }

    /// The caller, last and free, stops looking here (it is about to sleep). Returns false if
    /// it was not last and free (nothing changed).
    bool park(std::uint16_t me) noexcept { return set_phase(me, Phase::free, Phase::parked); }
    /// The caller, last and parked, looks here again (it found jobs after park()).
    bool unpark(std::uint16_t me) noexcept { return set_phase(me, Phase::parked, Phase::free); }

    /// The caller exits: if it is last, nobody is.
    void leave(std::uint16_t me) noexcept {
        // relaxed: the compare-and-swap re-reads.
        std::uint64_t word = word_.load(std::memory_order_relaxed);
        for (;;) {
            State s = decode(word);
            if (s.last != me) return;
            s.last = 0;
            s.phase = Phase::parked;
            // seq_cst: as park(); nobody looks here any more.
            if (word_.compare_exchange_weak(word, encode(s), std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
                return;
            }
        }
    }

private:
    bool set_phase(std::uint16_t me, Phase from, Phase to) noexcept {
        // relaxed: the compare-and-swap re-reads.
        std::uint64_t word = word_.load(std::memory_order_relaxed);
        for (;;) {
            State s = decode(word);
            if (s.last != me || s.phase != from) return false;
            s.phase = to;
            // seq_cst: park() and the worker's following seq_cst load of tail are its half of
            // the pattern described at push(); unpark() and wake_last() are ordered with it
            // the same way (the loop then reads the word again before relying on it).
            if (word_.compare_exchange_weak(word, encode(s), std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
                return true;
            }
        }
    }

    alignas(64) std::atomic<std::uint64_t> word_{0};
    alignas(64) std::atomic<std::uint32_t> tail_{0};
    // Written by the loop before it publishes tail; read by the claimer of the index.
    alignas(64) JobBase* slots_[capacity] = {};
};

}  // namespace anyio::detail
