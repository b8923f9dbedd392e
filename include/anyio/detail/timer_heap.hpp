// The loop's timers: a binary min-heap of intrusive nodes that know their own index, so a
// cancelled sleep or a moved deadline leaves the heap in O(log n) and nothing stays behind.
// Loop-thread only.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace anyio::detail {

struct TimerNode {
    /// Fires the timer (`run == true`) or disposes of it unfired at loop shutdown.
    using Fire = void (*)(TimerNode* self, bool run);
    static constexpr std::size_t not_queued = static_cast<std::size_t>(-1);

    explicit TimerNode(Fire fire) noexcept : fire_(fire) {}
    TimerNode(const TimerNode&) = delete;
    TimerNode& operator=(const TimerNode&) = delete;

    [[nodiscard]] bool queued() const noexcept { return index_ != not_queued; }

    std::chrono::steady_clock::time_point when_{};
    std::uint64_t sequence_ = 0;  // ties broken first come, first served
    std::size_t index_ = not_queued;
    Fire fire_;
};

/// `now + delay`, saturated: a delay too large for the clock gives time_point::max() (no
/// deadline) instead of overflowing into the past; a negative one gives `now`.
template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(std::chrono::steady_clock::time_point now,
                                                     std::chrono::duration<Rep, Period> delay) {
    using time_point = std::chrono::steady_clock::time_point;
    using Delay = std::chrono::duration<Rep, Period>;
    if (delay <= Delay::zero()) return now;
    // Compare in the caller's unit: converting the (nanosecond) headroom to a coarser unit
    // cannot overflow, converting a huge delay to nanoseconds could.
    if (delay >= std::chrono::duration_cast<Delay>(time_point::max() - now)) {
        return time_point::max();
    }
    return now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(delay);
}

class TimerHeap {
public:
    [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }
    [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
    [[nodiscard]] TimerNode* top() const noexcept { return heap_.empty() ? nullptr : heap_[0]; }

    /// Queues `node` to fire at `when`. Exception-safe: if the heap cannot grow (bad_alloc),
    /// the node is left unqueued and the heap unchanged. A `when` before the start of the
    /// current firing pass counts as that start (see begin_pass).
    void push(TimerNode* node, std::chrono::steady_clock::time_point when) {
        heap_.push_back(node);  // the only step that can throw: nothing is changed before it
        node->when_ = when < pass_start_ ? pass_start_ : when;
        node->sequence_ = next_sequence_++;
        node->index_ = heap_.size() - 1;
        sift_up(node->index_);
    }

    void remove(TimerNode* node) noexcept {
        std::size_t index = node->index_;
        if (index == TimerNode::not_queued) return;
        node->index_ = TimerNode::not_queued;
        TimerNode* last = heap_.back();
        heap_.pop_back();
        if (last == node) return;
        heap_[index] = last;
        last->index_ = index;
        sift_down(index);
        sift_up(last->index_);
    }

    /// Starts a firing pass at `now`: pass_due() then accepts only the timers queued before
    /// this call, and a timer queued during the pass for a time before `now` counts as due at
    /// `now` (after every timer that was due already). So a timer that re-arms itself in the
    /// past while it fires waits for the next pass instead of starving the loop, and it cannot
    /// overtake (and so hold back) the timers that were due when the pass began.
    void begin_pass(std::chrono::steady_clock::time_point now) noexcept {
        if (now > pass_start_) pass_start_ = now;
        pass_limit_ = next_sequence_;
    }
    /// The earliest timer if it was due at the start of the pass and queued before it.
    [[nodiscard]] TimerNode* pass_due() const noexcept {
        TimerNode* timer = top();
        if (timer == nullptr || timer->when_ > pass_start_ || timer->sequence_ >= pass_limit_) {
            return nullptr;
        }
        return timer;
    }

    /// Frees the vector's spare capacity once the heap has shrunk a lot, so a burst of
    /// timers does not pin its peak memory for ever.
    void shrink_if_sparse() {
        if (heap_.capacity() > 1024 && heap_.size() < heap_.capacity() / 8) heap_.shrink_to_fit();
    }

private:
    static bool earlier(const TimerNode* a, const TimerNode* b) noexcept {
        return a->when_ < b->when_ || (a->when_ == b->when_ && a->sequence_ < b->sequence_);
    }
    void place(std::size_t index, TimerNode* node) noexcept {
        heap_[index] = node;
        node->index_ = index;
    }
    void sift_up(std::size_t index) noexcept {
        TimerNode* node = heap_[index];
        while (index > 0) {
            std::size_t parent = (index - 1) / 2;
            if (!earlier(node, heap_[parent])) break;
            place(index, heap_[parent]);
            index = parent;
        }
        place(index, node);
    }
    void sift_down(std::size_t index) noexcept {
        TimerNode* node = heap_[index];
        const std::size_t count = heap_.size();
        for (;;) {
            std::size_t child = 2 * index + 1;
            if (child >= count) break;
            if (child + 1 < count && earlier(heap_[child + 1], heap_[child])) ++child;
            if (!earlier(heap_[child], node)) break;
            place(index, heap_[child]);
            index = child;
        }
        place(index, node);
    }

    std::vector<TimerNode*> heap_;
    std::uint64_t next_sequence_ = 0;
    std::uint64_t pass_limit_ = 0;                         // sequence of the first timer not in the pass
    std::chrono::steady_clock::time_point pass_start_{};  // `now` of the latest pass (never decreases)
};

}  // namespace anyio::detail
