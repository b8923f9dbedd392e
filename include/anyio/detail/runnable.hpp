// The loop's unit of work: an intrusive node with a function pointer, so scheduling never
// allocates and never goes through std::function.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

namespace anyio::detail {

struct Runnable {
    /// Runs the node (`run == true`) or disposes of it unrun, when the loop shuts down with
    /// the node still queued (`run == false`). The node may free itself in either case.
    using Invoke = void (*)(Runnable* self, bool run);

    explicit Runnable(Invoke invoke) noexcept : invoke_(invoke) {}

    Runnable* next_ = nullptr;
    Invoke invoke_;
};

/// FIFO of runnables: the loop's ready queue. Loop-thread only.
class RunQueue {
public:
    [[nodiscard]] bool empty() const noexcept { return head_ == nullptr; }
    void push(Runnable* node) noexcept {
        node->next_ = nullptr;
        if (tail_ != nullptr) {
            tail_->next_ = node;
        } else {
            head_ = node;
        }
        tail_ = node;
    }
    Runnable* pop() noexcept {
        Runnable* node = head_;
        if (node != nullptr) {
            head_ = node->next_;
            if (head_ == nullptr) tail_ = nullptr;
        }
        return node;
    }

private:
    Runnable* head_ = nullptr;
    Runnable* tail_ = nullptr;
};

/// A heap node around an arbitrary callable, for the public call_soon* functions (the
/// library's own hot paths use intrusive nodes instead and never come here).
template <class F>
struct CallbackNode final : Runnable {
    explicit CallbackNode(F&& fn) : Runnable(&invoke), fn_(std::move(fn)) {}
    static void invoke(Runnable* self, bool run) {
        std::unique_ptr<CallbackNode> node(static_cast<CallbackNode*>(self));
        if (run) node->fn_();
    }
    F fn_;
};

template <class F>
Runnable* make_callback(F&& fn) {
    return new CallbackNode<std::decay_t<F>>(std::decay_t<F>(std::forward<F>(fn)));
}

}  // namespace anyio::detail
