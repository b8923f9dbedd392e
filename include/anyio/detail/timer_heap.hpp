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

    void push(TimerNode* node, std::chrono::steady_clock::time_point when) {
        node->when_ = when;
        node->sequence_ = next_sequence_++;
        node->index_ = heap_.size();
        heap_.push_back(node);
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
};

}  // namespace anyio::detail
