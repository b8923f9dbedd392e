// Intrusive doubly linked list: the node lives inside the object (usually an awaiter in a
// coroutine frame), so linking and unlinking never allocate and unlinking is O(1) from the
// node alone. Loop-thread only; no synchronisation.
#pragma once

#include <cstddef>

namespace anyio::detail {

/// A list hook. `Tag` lets one object sit in several lists at once (one base per list).
template <class Tag>
struct ListHook {
    ListHook* prev = nullptr;
    ListHook* next = nullptr;

    ListHook() = default;
    ListHook(const ListHook&) = delete;
    ListHook& operator=(const ListHook&) = delete;

    [[nodiscard]] bool linked() const noexcept { return next != nullptr; }

    /// Unlinks this node from whatever list holds it. The list needs no notice: it is
    /// circular around a sentinel, so a node's neighbours are all it takes.
    void unlink() noexcept {
        prev->next = next;
        next->prev = prev;
        prev = next = nullptr;
    }
};

/// A circular list of `T`s that derive from `ListHook<Tag>`. It does not own its elements.
template <class T, class Tag>
class IntrusiveList {
    using Hook = ListHook<Tag>;

public:
    IntrusiveList() noexcept { head_.prev = head_.next = &head_; }
    IntrusiveList(const IntrusiveList&) = delete;
    IntrusiveList& operator=(const IntrusiveList&) = delete;
    ~IntrusiveList() = default;

    [[nodiscard]] bool empty() const noexcept { return head_.next == &head_; }

    void push_back(T& item) noexcept { insert_before(&head_, hook(item)); }
    void push_front(T& item) noexcept { insert_before(head_.next, hook(item)); }

    [[nodiscard]] T* front() noexcept { return empty() ? nullptr : element(head_.next); }
    [[nodiscard]] T* back() noexcept { return empty() ? nullptr : element(head_.prev); }

    /// The element after `item` (which must be in this list), or nullptr at the end.
    [[nodiscard]] T* next(T& item) noexcept {
        Hook* node = hook(item)->next;
        return node == &head_ ? nullptr : element(node);
    }

    T* pop_front() noexcept {
        T* item = front();
        if (item != nullptr) hook(*item)->unlink();
        return item;
    }
    T* pop_back() noexcept {
        T* item = back();
        if (item != nullptr) hook(*item)->unlink();
        return item;
    }

    /// Calls `fn(T&)` for each element; `fn` may unlink the element it is given (the next
    /// node is read before the call, because the call may invalidate the current one).
    template <class F>
    void for_each(F&& fn) {
        Hook* node = head_.next;
        while (node != &head_) {
            Hook* next = node->next;
            fn(*element(node));
            node = next;
        }
    }

private:
    static Hook* hook(T& item) noexcept { return static_cast<Hook*>(&item); }
    static T* element(Hook* node) noexcept { return static_cast<T*>(node); }

    static void insert_before(Hook* position, Hook* node) noexcept {
        node->next = position;
        node->prev = position->prev;
        position->prev->next = node;
        position->prev = node;
    }

    Hook head_;
};

}  // namespace anyio::detail
