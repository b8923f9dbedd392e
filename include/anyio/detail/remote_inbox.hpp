// The only loop state other threads touch: the remote inbox that call_soon_threadsafe pushes
// onto, and the word that says whether the loop is parked and how to wake it.
//
// It lives in a small reference-counted block apart from the loop (LoopToken and every worker
// hold a reference), so a thread that posts after the loop has finished finds a closed inbox
// and gets RunFinishedError instead of touching freed memory.
//
// The inbox is two lock-free stacks that the loop takes together: one for user work
// (call_soon_threadsafe, from_thread calls, portal spawns: post_user) and one for the
// library's own work (a job's completion, a worker's "exited" node: post). When the main task
// finishes the loop closes the user stack (close_to_user): from then on no user code runs on
// the loop, so a user post fails at its CAS (RunFinishedError), while completions still come
// in until run() has joined its workers and closes the other stack too (close). Each stack is
// closed by exchanging in the same marker its CAS checks, so there is no window in which a
// user post can slip in after the close: a post is either taken by the close (and disposed of
// unrun) or refused.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <system_error>

#include <linux/futex.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "runnable.hpp"

namespace anyio::detail {

inline void futex_wait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
                       const std::timespec* relative_timeout) noexcept {
    // Returns at once if *word != expected: the kernel compares under its own lock, which is
    // what makes "store parked, re-check, sleep" free of lost wake-ups.
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected,
              relative_timeout, nullptr, 0);
}

inline void futex_wake(std::atomic<std::uint32_t>* word) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE_PRIVATE, 1, nullptr,
              nullptr, 0);
}

class LoopShared {
public:
    enum ParkState : std::uint32_t { running = 0, parked_on_futex = 1, parked_in_poller = 2 };

    LoopShared()
        : event_fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)),
          inherited_timer_slack_(::prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)) {
        if (event_fd_ < 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "anyio: eventfd() failed while creating an event loop");
        }
    }
    ~LoopShared() { ::close(event_fd_); }
    LoopShared(const LoopShared&) = delete;
    LoopShared& operator=(const LoopShared&) = delete;

    /// Pushes library work (a job's completion, a worker's "exited" node; any thread). Returns
    /// false, leaving the node untouched, once the loop has closed the inbox for good (close).
    /// Lock-free: one CAS, plus a wake-up only if the loop is parked.
    bool post(Runnable* node) noexcept { return push(head_, node); }

    /// Pushes user work (call_soon_threadsafe, from_thread calls, portal spawns; any thread).
    /// Returns false, leaving the node untouched, once the main task has finished
    /// (close_to_user): no user code runs on the loop after that. Costs as post().
    bool post_user(Runnable* node) noexcept { return push(user_head_, node); }

    /// Takes every posted node (loop thread): the library's, oldest first, then the user's,
    /// oldest first. Returns {first, last} or nulls.
    struct Chain {
        Runnable* first = nullptr;
        Runnable* last = nullptr;
    };
    Chain take_all() noexcept { return join(take(head_), take(user_head_)); }

    /// True when something is waiting in the inbox (a hint for spinning; loop thread).
    [[nodiscard]] bool has_posts() const noexcept {
        // relaxed: only a hint; take_all's acquire exchange does the synchronising.
        return pending(head_.load(std::memory_order_relaxed)) ||
               pending(user_head_.load(std::memory_order_relaxed));
    }

    /// Closes the inbox to user work (loop thread, when the main task has finished) and
    /// returns the user work still in it, to be disposed of unrun. Library posts still come in.
    Chain close_to_user() noexcept {
        // acq_rel: acquire as in take(); release so that a poster that finds the marker sees
        // what the loop did before closing (see closed()).
        return reverse(user_head_.exchange(closed_marker(), std::memory_order_acq_rel));
    }

    /// Closes the inbox for good and returns what was still in it (loop thread, at the very
    /// end of run()).
    Chain close() noexcept {
        // acq_rel: as in close_to_user; every later post of either kind sees the marker and fails.
        Chain library = reverse(head_.exchange(closed_marker(), std::memory_order_acq_rel));
        return join(library, close_to_user());
    }

    /// True once the inbox refuses user work: the loop's main task has finished.
    [[nodiscard]] bool closed() const noexcept {
        // acquire: a thread that sees the loop closed also sees everything it did before.
        return user_head_.load(std::memory_order_acquire) == closed_marker();
    }

    /// Loop thread: announce that it is about to sleep, then re-check the inbox. Returns false
    /// (and stays running) when a post arrived in between.
    bool prepare_to_park(ParkState how) noexcept {
        // seq_cst store then seq_cst load: the loop's half of the Dekker pattern with post().
        park_state_.store(how, std::memory_order_seq_cst);
        if (pending(head_.load(std::memory_order_seq_cst)) ||
            pending(user_head_.load(std::memory_order_seq_cst))) {
            park_state_.store(running, std::memory_order_relaxed);  // nobody waits on this value
            return false;
        }
        return true;
    }
    void park_on_futex(const std::timespec* timeout) noexcept {
        futex_wait(&park_state_, parked_on_futex, timeout);
        // relaxed: only the loop reads this for decisions; producers only compare to running.
        park_state_.store(running, std::memory_order_relaxed);
    }
    void unparked() noexcept {
        park_state_.store(running, std::memory_order_relaxed);  // relaxed: as in park_on_futex
    }

    /// Empties the eventfd after the poller reported it readable (loop thread).
    void drain_event_fd() noexcept {
        std::uint64_t count = 0;
        [[maybe_unused]] auto ignored = ::read(event_fd_, &count, sizeof count);
    }
    [[nodiscard]] int event_fd() const noexcept { return event_fd_; }

    /// The CPU the loop last ran on before waiting for a completion: a worker on the same CPU
    /// does not spin (the loop could not run while it spins).
    void note_loop_cpu(int cpu) noexcept {
        loop_cpu_.store(cpu, std::memory_order_relaxed);  // relaxed: a scheduling hint
    }
    [[nodiscard]] int loop_cpu() const noexcept {
        return loop_cpu_.load(std::memory_order_relaxed);  // relaxed: a scheduling hint
    }

    /// The timer slack (ns) of the thread that created the loop, read before the loop lowers
    /// its own to 1 ns while it runs: threads the loop starts go back to it (-1 if unknown).
    [[nodiscard]] int inherited_timer_slack() const noexcept { return inherited_timer_slack_; }

    /// Statistics for benchmarks: how many wake-ups were actually sent.
    [[nodiscard]] std::uint64_t wakeups_sent() const noexcept {
        return wakeups_sent_.load(std::memory_order_relaxed);  // relaxed: a counter
    }

private:
    static Runnable* closed_marker() noexcept {
        static Runnable marker{nullptr};
        return &marker;
    }

    static bool pending(const Runnable* head) noexcept {
        return head != nullptr && head != closed_marker();
    }

    bool push(std::atomic<Runnable*>& stack, Runnable* node) noexcept {
        // seq_cst (not release) on the CAS: it pairs with the loop's seq_cst store of
        // park_state_ followed by its loads of both stacks (a Dekker pattern), so either the
        // loop sees this node before sleeping or we see it parked and wake it.
        // acquire on the loads: a poster that finds the stack closed also sees everything the
        // loop did before closing it (e.g. marking a detached worker's job as orphaned).
        Runnable* head = stack.load(std::memory_order_acquire);
        do {
            if (head == closed_marker()) return false;
            node->next_ = head;
        } while (!stack.compare_exchange_weak(head, node, std::memory_order_seq_cst,
                                              std::memory_order_acquire));
        // seq_cst: the other half of the Dekker pattern above.
        if (park_state_.load(std::memory_order_seq_cst) != running) wake();
        return true;
    }

    /// Takes one stack, unless it is empty or closed (only the loop closes a stack, so a
    /// closed one stays closed and is never reopened here).
    static Chain take(std::atomic<Runnable*>& stack) noexcept {
        // relaxed check first so an empty stack costs no RMW; acquire on the exchange makes
        // the producers' writes to the nodes (made before their CAS) visible here.
        if (!pending(stack.load(std::memory_order_relaxed))) return {};
        return reverse(stack.exchange(nullptr, std::memory_order_acquire));
    }

    static Chain join(Chain first, Chain second) noexcept {
        if (first.first == nullptr) return second;
        if (second.first == nullptr) return first;
        first.last->next_ = second.first;
        return {first.first, second.last};
    }

    static Chain reverse(Runnable* stack) noexcept {
        if (stack == nullptr || stack == closed_marker()) return {};
        Runnable* last = stack;
        Runnable* reversed = nullptr;
        while (stack != nullptr) {
            Runnable* next = stack->next_;
            stack->next_ = reversed;
            reversed = stack;
            stack = next;
        }
        return {reversed, last};
    }

    void wake() noexcept {
        // acq_rel exchange: only the first poster to see the loop parked sends the wake-up;
        // those after it read `running` and send nothing.
        std::uint32_t state = park_state_.exchange(running, std::memory_order_acq_rel);
        if (state == running) return;
        wakeups_sent_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
        if (state == parked_on_futex) {
            futex_wake(&park_state_);
        } else {
            std::uint64_t one = 1;
            [[maybe_unused]] auto ignored = ::write(event_fd_, &one, sizeof one);
        }
    }

    std::atomic<Runnable*> head_{nullptr};       // library work (post)
    std::atomic<Runnable*> user_head_{nullptr};  // user work (post_user)
    std::atomic<std::uint32_t> park_state_{running};
    std::atomic<std::uint64_t> wakeups_sent_{0};
    std::atomic<int> loop_cpu_{-1};
    int event_fd_;
    const int inherited_timer_slack_;
};

}  // namespace anyio::detail
