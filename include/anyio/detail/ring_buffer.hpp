// A FIFO ring buffer of T that grows (doubling) up to a fixed limit: the buffer of a memory
// object stream. One allocation per growth step, none per item; storage is raw, so T needs
// no default constructor. Loop-thread only; no synchronisation.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

namespace anyio::detail {

template <class T>
class RingBuffer {
    static_assert(std::is_nothrow_move_constructible_v<T> && std::is_nothrow_destructible_v<T>,
                  "anyio: items of a memory object stream must be nothrow move constructible "
                  "(a throwing move could lose or duplicate an item on its way through)");

public:
    /// `limit`: the most items it will ever hold (it never allocates room for more).
    explicit RingBuffer(std::size_t limit) noexcept : limit_(limit) {}
    RingBuffer(RingBuffer&& other) noexcept
        : slots_(std::exchange(other.slots_, nullptr)),
          capacity_(std::exchange(other.capacity_, 0)),
          head_(std::exchange(other.head_, 0)),
          size_(std::exchange(other.size_, 0)),
          limit_(other.limit_) {}
    RingBuffer(const RingBuffer&) = delete;
    RingBuffer& operator=(const RingBuffer&) = delete;
    RingBuffer& operator=(RingBuffer&&) = delete;
    ~RingBuffer() {
        clear();
        if (slots_ != nullptr) std::allocator<T>{}.deallocate(slots_, capacity_);
    }

    [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }

    /// The oldest item (the buffer must not be empty).
    [[nodiscard]] T& front() noexcept { return slots_[head_]; }

    /// Destroys the oldest item (the buffer must not be empty).
    void pop_front() noexcept {
        std::destroy_at(slots_ + head_);
        head_ = head_ + 1 == capacity_ ? 0 : head_ + 1;
        --size_;
    }

    /// Appends an item moved from `item` (size() must be below the limit). May throw
    /// std::bad_alloc when it grows, before `item` is touched.
    void push_back(T&& item) {
        if (size_ == capacity_) grow();
        std::size_t tail = head_ + size_;
        if (tail >= capacity_) tail -= capacity_;
        std::construct_at(slots_ + tail, std::move(item));
        ++size_;
    }

    /// Destroys every item (the storage stays for reuse).
    void clear() noexcept {
        while (size_ > 0) pop_front();
        head_ = 0;
    }

private:
    void grow() {
        constexpr std::size_t first_capacity = 8;
        std::size_t capacity = capacity_ == 0 ? first_capacity
                               : capacity_ > limit_ / 2 ? limit_
                                                        : capacity_ * 2;
        if (capacity > limit_) capacity = limit_;
        T* slots = std::allocator<T>{}.allocate(capacity);
        // Nothrow moves (asserted above): the old slots are emptied in order, oldest first.
        for (std::size_t i = 0; i < size_; ++i) {
            std::size_t from = head_ + i;
            if (from >= capacity_) from -= capacity_;
            std::construct_at(slots + i, std::move(slots_[from]));
            std::destroy_at(slots_ + from);
        }
        if (slots_ != nullptr) std::allocator<T>{}.deallocate(slots_, capacity_);
        slots_ = slots;
        capacity_ = capacity;
        head_ = 0;
    }

    T* slots_ = nullptr;
    std::size_t capacity_ = 0;
    std::size_t head_ = 0;
    std::size_t size_ = 0;
    std::size_t limit_;
};

}  // namespace anyio::detail
