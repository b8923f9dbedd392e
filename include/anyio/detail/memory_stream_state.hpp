// The shared state of a memory object stream (memory_stream.hpp) and the awaiters of its
// send and receive: the buffer, the queues of waiting senders and receivers, and the
// counts of open handles. Stands on cancel_scope.hpp (through wait.hpp), so it lives beside
// the one public header that uses it. Loop-thread only; no synchronisation.
//
// The rules (anyio's _MemoryObjectStreamState, trio's MemoryChannelState):
// - a waiting receiver exists only while the buffer is empty and no sender waits; a waiting
//   sender only while the buffer is full and no receiver waits. So a send goes straight to
//   the oldest waiting receiver, and a receive takes the oldest item, refilling the buffer
//   from the oldest waiting sender;
// - everything that can throw (a copy of a const item, growing the buffer) happens before
//   any state changes, so an exception loses and duplicates nothing;
// - a waiter is woken at most once; once woken it is out of every queue and cancellation no
//   longer reaches it, so what was handed to it is returned (anyio's deferral rule).
#pragma once

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

#include "../cancel_scope.hpp"
#include "../errors.hpp"
#include "intrusive_list.hpp"
#include "loop_thread.hpp"
#include "ring_buffer.hpp"
#include "task_state.hpp"
#include "wait.hpp"

namespace anyio::detail {

struct StreamSendersTag {};
struct StreamReceiversTag {};

/// How a wait on a stream ended, as far as the stream is concerned.
enum class StreamOutcome : unsigned char { none, done, end_of_stream, broken, closed };

/// An item on its way in: the caller's object, moved from (or copied, for a const item) only
/// when the item is delivered, so a send that fails leaves it untouched.
template <class T>
struct ItemSource {
    T* item = nullptr;
    bool copy = false;

    /// Calls `sink(T&&)` with the item. A copy is made first, so a throwing copy
    /// constructor throws before `sink` (and any change it makes) runs.
    template <class Sink>
    void give(Sink&& sink) const {
        if constexpr (std::is_copy_constructible_v<T>) {
            if (copy) {
                T copied(std::as_const(*item));
                sink(std::move(copied));
                return;
            }
        }
        sink(std::move(*item));
    }
};

/// A task blocked in send(): its item, the handle it waits on, and how to wake it.
template <class T>
struct SenderNode : ListHook<StreamSendersTag> {
    using Wake = void (*)(SenderNode* self) noexcept;
    explicit SenderNode(Wake wake) noexcept : wake_(wake) {}
    ItemSource<T> source_;
    std::uint64_t handle_id_ = 0;
    StreamOutcome outcome_ = StreamOutcome::none;
    Wake wake_;
};

/// A task blocked in receive()/next(): the slot a sender fills, the handle it waits on.
template <class T>
struct ReceiverNode : ListHook<StreamReceiversTag> {
    using Wake = void (*)(ReceiverNode* self) noexcept;
    explicit ReceiverNode(Wake wake) noexcept : wake_(wake) {}
    std::optional<T> slot_;
    TaskState* waiting_task_ = nullptr;
    Wait* wait_ = nullptr;  // this awaiter as a cancellable wait
    std::uint64_t handle_id_ = 0;
    StreamOutcome outcome_ = StreamOutcome::none;
    Wake wake_;
};

template <class T>
class StreamState {
public:
    enum class Result : unsigned char { done, would_block, broken, end_of_stream };

    explicit StreamState(std::size_t max_buffer_size) noexcept
        : buffer_(max_buffer_size), max_buffer_size_(max_buffer_size) {}
    StreamState(const StreamState&) = delete;
    StreamState& operator=(const StreamState&) = delete;
    ~StreamState() = default;  // only once no handle is left, hence no waiter either

    // ---- Handles (open or closed); the last one to go deletes the state ----

    std::uint64_t add_handle(bool sender) noexcept {
        ++references_;
        ++(sender ? open_senders_ : open_receivers_);
        return next_handle_id_++;
    }
    void drop_reference() noexcept {
        if (--references_ == 0) delete this;
    }

    /// Closes one send handle: its own waiters get ClosedResourceError (trio); when it was
    /// the last one, waiting receivers get EndOfStream (they only wait on an empty buffer).
    void close_sender(std::uint64_t handle_id) noexcept {
        senders_.for_each([&](SenderNode<T>& sender) {
            if (sender.handle_id_ == handle_id) wake_sender(sender, StreamOutcome::closed);
        });
        if (--open_senders_ > 0) return;
        while (ReceiverNode<T>* receiver = receivers_.front()) {
            wake_receiver(*receiver, StreamOutcome::end_of_stream);
        }
    }
    /// Closes one receive handle: its own waiters get ClosedResourceError; when it was the
    /// last one, waiting senders get BrokenResourceError and buffered items are destroyed.
    void close_receiver(std::uint64_t handle_id) noexcept {
        receivers_.for_each([&](ReceiverNode<T>& receiver) {
            if (receiver.handle_id_ == handle_id) wake_receiver(receiver, StreamOutcome::closed);
        });
        if (--open_receivers_ > 0) return;
        while (SenderNode<T>* sender = senders_.front()) {
            wake_sender(*sender, StreamOutcome::broken);
        }
        // Moved out first: an item's destructor may use this stream again.
        RingBuffer<T> doomed(std::move(buffer_));
    }

    // ---- Sending and receiving (anyio's send_nowait / receive_nowait) ----

    /// Delivers `source` to the oldest waiting receiver, or into the buffer if there is room.
    Result try_send(const ItemSource<T>& source) {
        if (open_receivers_ == 0) return Result::broken;
        while (ReceiverNode<T>* receiver = receivers_.front()) {
            if (is_cancelled(*receiver->waiting_task_)) {
                // Its cancellation is pending: it must not be handed an item it would then
                // return (anyio checks has_pending_cancellation here). Let it go now.
                receiver->wait_->on_cancel_(receiver->wait_);
                continue;
            }
            source.give([&](T&& item) { receiver->slot_.emplace(std::move(item)); });
            wake_receiver(*receiver, StreamOutcome::done);
            return Result::done;
        }
        if (buffer_.size() >= max_buffer_size_) return Result::would_block;
        source.give([&](T&& item) { buffer_.push_back(std::move(item)); });
        return Result::done;
    }

    /// Takes the oldest item into `sink(T&&)` (which must not throw), refilling the buffer
    /// from the oldest waiting sender.
    template <class Sink>
    Result try_receive(Sink&& sink) {
        if (SenderNode<T>* sender = senders_.front()) {
            if (buffer_.empty()) {  // rendezvous: straight from the sender
                sender->source_.give(sink);
            } else {  // the buffer is full: its capacity is the limit, so no growth here
                sender->source_.give([&](T&& item) {
                    sink(std::move(buffer_.front()));
                    buffer_.pop_front();
                    buffer_.push_back(std::move(item));
                });
            }
            wake_sender(*sender, StreamOutcome::done);
            return Result::done;
        }
        if (!buffer_.empty()) {
            sink(std::move(buffer_.front()));
            buffer_.pop_front();
            return Result::done;
        }
        return open_senders_ == 0 ? Result::end_of_stream : Result::would_block;
    }

    void enqueue(SenderNode<T>& sender) noexcept {
        senders_.push_back(sender);
        ++waiting_senders_;
    }
    void enqueue(ReceiverNode<T>& receiver) noexcept {
        receivers_.push_back(receiver);
        ++waiting_receivers_;
    }
    /// Removes a waiter that gives up (cancellation); O(1), a no-op if not queued.
    void remove(SenderNode<T>& sender) noexcept {
        if (sender.ListHook<StreamSendersTag>::linked()) {
            sender.ListHook<StreamSendersTag>::unlink();
            --waiting_senders_;
        }
    }
    void remove(ReceiverNode<T>& receiver) noexcept {
        if (receiver.ListHook<StreamReceiversTag>::linked()) {
            receiver.ListHook<StreamReceiversTag>::unlink();
            --waiting_receivers_;
        }
    }

    [[nodiscard]] std::size_t buffer_used() const noexcept { return buffer_.size(); }
    [[nodiscard]] std::size_t max_buffer_size() const noexcept { return max_buffer_size_; }
    [[nodiscard]] std::size_t open_senders() const noexcept { return open_senders_; }
    [[nodiscard]] std::size_t open_receivers() const noexcept { return open_receivers_; }
    [[nodiscard]] std::size_t waiting_senders() const noexcept { return waiting_senders_; }
    [[nodiscard]] std::size_t waiting_receivers() const noexcept { return waiting_receivers_; }

    LoopAffinity affinity_;

private:
    void wake_sender(SenderNode<T>& sender, StreamOutcome outcome) noexcept {
        remove(sender);
        sender.outcome_ = outcome;
        sender.wake_(&sender);
    }
    void wake_receiver(ReceiverNode<T>& receiver, StreamOutcome outcome) noexcept {
        remove(receiver);
        receiver.outcome_ = outcome;
        receiver.wake_(&receiver);
    }

    RingBuffer<T> buffer_;
    IntrusiveList<SenderNode<T>, StreamSendersTag> senders_;
    IntrusiveList<ReceiverNode<T>, StreamReceiversTag> receivers_;
    std::size_t max_buffer_size_;
    std::size_t references_ = 0;
    std::size_t open_senders_ = 0;
    std::size_t open_receivers_ = 0;
    std::size_t waiting_senders_ = 0;
    std::size_t waiting_receivers_ = 0;
    std::uint64_t next_handle_id_ = 1;
};

/// `co_await tx.send(item)`. Like trio's send: a cancellation point first; then, if the item
/// can go at once (to a waiting receiver or into the buffer), it goes and the task yields
/// once without being cancellable (the item is delivered); otherwise the task waits here,
/// first in, first out, until a receiver takes the item (the send returns: delivered), the
/// receive side closes (BrokenResourceError), its own handle closes (ClosedResourceError)
/// or it is cancelled (the item was not delivered and stays with the caller).
template <class T>
class SendAwaiter final : public CancellableWait<SendAwaiter<T>>, public SenderNode<T> {
public:
    SendAwaiter(StreamState<T>* state, std::uint64_t handle_id, ItemSource<T> source) noexcept
        : SenderNode<T>(&on_woken), state_(state) {
        this->handle_id_ = handle_id;
        this->source_ = source;
    }
    SendAwaiter(const SendAwaiter&) = delete;
    SendAwaiter& operator=(const SendAwaiter&) = delete;
    ~SendAwaiter() { abort(); }

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!this->begin("MemoryObjectSendStream::send", handle)) return false;
        if (state_ == nullptr) {  // its handle was closed before the call
            this->outcome_ = StreamOutcome::closed;
            return false;
        }
        switch (state_->try_send(this->source_)) {
            case StreamState<T>::Result::done:
                this->outcome_ = StreamOutcome::done;
                this->wake();
                return true;
            case StreamState<T>::Result::would_block:
                state_->enqueue(*this);
                this->park();
                return true;
            default:
                this->outcome_ = StreamOutcome::broken;
                return false;
        }
    }
    void await_resume() const {
        this->throw_if_cancelled();
        if (this->outcome_ == StreamOutcome::broken) throw BrokenResourceError();
        if (this->outcome_ == StreamOutcome::closed) throw ClosedResourceError();
    }

    /// Leaves the queue (O(1)). Only a queued waiter touches the state: once woken, the
    /// stream may already be gone (its last handle closed it).
    void abort() noexcept {
        if (this->ListHook<StreamSendersTag>::linked()) state_->remove(*this);
    }

private:
    static void on_woken(SenderNode<T>* self) noexcept { static_cast<SendAwaiter*>(self)->wake(); }
    StreamState<T>* state_;
};

/// `co_await rx.receive()` (yields T, EndOfStream at the end) and `co_await rx.next()`
/// (yields std::optional<T>, empty at the end). Like trio's receive: a cancellation point
/// first; an item that is there is taken and returned after one uncancellable yield;
/// otherwise the task waits, first in, first out. An item handed to a waiting receiver is
/// returned even if the task is cancelled in the same turn (the cancellation then takes
/// effect at its next checkpoint).
template <class T, bool AsOptional>
class ReceiveAwaiter final : public CancellableWait<ReceiveAwaiter<T, AsOptional>>,
                             public ReceiverNode<T> {
public:
    ReceiveAwaiter(StreamState<T>* state, std::uint64_t handle_id) noexcept
        : ReceiverNode<T>(&on_woken), state_(state) {
        this->handle_id_ = handle_id;
        this->wait_ = this;
    }
    ReceiveAwaiter(const ReceiveAwaiter&) = delete;
    ReceiveAwaiter& operator=(const ReceiveAwaiter&) = delete;
    ~ReceiveAwaiter() { abort(); }

    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!this->begin(AsOptional ? "MemoryObjectReceiveStream::next"
                                    : "MemoryObjectReceiveStream::receive",
                         handle)) {
            return false;
        }
        if (state_ == nullptr) {
            this->outcome_ = StreamOutcome::closed;
            return false;
        }
        auto result =
            state_->try_receive([this](T&& item) { this->slot_.emplace(std::move(item)); });
        switch (result) {
            case StreamState<T>::Result::done:
                this->outcome_ = StreamOutcome::done;
                this->wake();
                return true;
            case StreamState<T>::Result::would_block:
                this->waiting_task_ = this->task_;
                state_->enqueue(*this);
                this->park();
                return true;
            default:
                this->outcome_ = StreamOutcome::end_of_stream;
                return false;
        }
    }
    std::conditional_t<AsOptional, std::optional<T>, T> await_resume() {
        this->throw_if_cancelled();
        switch (this->outcome_) {
            case StreamOutcome::done:
                if constexpr (AsOptional) {
                    return std::move(this->slot_);
                } else {
                    return std::move(*this->slot_);
                }
            case StreamOutcome::end_of_stream:
                if constexpr (AsOptional) {
                    return std::nullopt;
                } else {
                    throw EndOfStream();
                }
            default:
                throw ClosedResourceError();
        }
    }

    /// Leaves the queue (O(1)); see SendAwaiter::abort.
    void abort() noexcept {
        if (this->ListHook<StreamReceiversTag>::linked()) state_->remove(*this);
    }

private:
    static void on_woken(ReceiverNode<T>* self) noexcept {
        static_cast<ReceiveAwaiter*>(self)->wake();
    }
    StreamState<T>* state_;
};

}  // namespace anyio::detail
