// anyio-cpp: memory object streams (anyio.create_memory_object_stream): typed, in-process
// channels between the tasks of one loop.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "detail/memory_stream_state.hpp"
#include "errors.hpp"

namespace anyio {

/// A max_buffer_size meaning "no limit": send() never waits (the buffer grows as needed).
inline constexpr std::size_t unbounded = std::numeric_limits<std::size_t>::max();

/// What statistics() of either end reports (the same for every handle of one stream).
struct MemoryObjectStreamStatistics {
    std::size_t current_buffer_used = 0;    ///< items in the buffer now
    std::size_t max_buffer_size = 0;        ///< the limit (anyio::unbounded: none)
    std::size_t open_send_streams = 0;      ///< send handles not yet closed
    std::size_t open_receive_streams = 0;   ///< receive handles not yet closed
    std::size_t tasks_waiting_send = 0;     ///< tasks blocked in send()
    std::size_t tasks_waiting_receive = 0;  ///< tasks blocked in receive() or next()
};

template <class T>
class MemoryObjectSendStream;
template <class T>
class MemoryObjectReceiveStream;

/// Creates a memory object stream of `T` holding up to `max_buffer_size` items (0: a send
/// completes only when a receiver takes the item; anyio::unbounded: no limit) and returns
/// its send end and its receive end: `auto [tx, rx] = create_memory_object_stream<Job>(16);`.
/// Allocates the stream's shared state once; the buffer is a ring that grows (doubling) up
/// to max_buffer_size as it fills, never a node per item, and is freed when the last receive
/// end closes. T must be nothrow move constructible; move-only types work. (clang 14 cannot
/// capture structured bindings in lambdas: where a lambda needs the ends, bind references,
/// `auto streams = create_memory_object_stream<Job>(16); auto& tx = streams.first;`.)
template <class T>
std::pair<MemoryObjectSendStream<T>, MemoryObjectReceiveStream<T>> create_memory_object_stream(
    std::size_t max_buffer_size = 0) {
    auto* state = new detail::StreamState<T>(max_buffer_size);
    return {MemoryObjectSendStream<T>(*state), MemoryObjectReceiveStream<T>(*state)};
}

namespace detail {
[[noreturn]] inline void throw_moved_from_stream() {
    throw ClosedResourceError(
        "anyio::ClosedResourceError: this memory object stream handle was moved from; use "
        "the handle it was moved to");
}
}  // namespace detail

/// The send end of a memory object stream (anyio.MemoryObjectSendStream). Each handle is
/// one open end; clone() makes another. Receivers see the end of the stream (EndOfStream)
/// once every send handle is closed and the buffer is empty. close() is also done by the
/// destructor.
///
/// Items move, they are never copied by the stream (send a const lvalue and it is copied
/// once, when delivered). An item is moved from the caller's object only when it is
/// delivered: a send that throws (WouldBlock, BrokenResourceError, ClosedResourceError or
/// Cancelled) leaves it untouched. Waiting senders are served first in, first out.
///
/// Loop-thread only (std::logic_error from another thread; from a worker use
/// `from_thread::run_sync([&] { tx.send_nowait(std::move(x)); })`, from a plain thread a
/// BlockingPortal). Allocates nothing per send beyond the buffer's growth. Throws:
/// ClosedResourceError after this handle's close() (also to a task blocked in send() on
/// it when it closes), BrokenResourceError once every receive end is closed (also to blocked
/// senders, at once), WouldBlock from send_nowait() when it would wait. Shutdown: a frame
/// destroyed while blocked in send() leaves the queue; a destroyed handle closes.
/// The awaitable of send() refers to the item: co_await it in the same expression.
template <class T>
class MemoryObjectSendStream {
public:
    using item_type = T;

    MemoryObjectSendStream(MemoryObjectSendStream&& other) noexcept
        : state_(std::exchange(other.state_, nullptr)), id_(other.id_), closed_(other.closed_) {}
    MemoryObjectSendStream& operator=(MemoryObjectSendStream&& other) noexcept {
        if (this != &other) {
            drop();
            state_ = std::exchange(other.state_, nullptr);
            id_ = other.id_;
            closed_ = other.closed_;
        }
        return *this;
    }
    MemoryObjectSendStream(const MemoryObjectSendStream&) = delete;
    MemoryObjectSendStream& operator=(const MemoryObjectSendStream&) = delete;
    /// Closes the handle. No thread check: destroy it on its loop's thread, or when that
    /// loop is not running.
    ~MemoryObjectSendStream() { drop(); }

    /// Sends `item` (moved from once delivered), waiting while the buffer is full.
    [[nodiscard]] detail::SendAwaiter<T> send(T&& item) {
        return detail::SendAwaiter<T>(usable_state("MemoryObjectSendStream::send"), id_,
                                      detail::ItemSource<T>{&item, false});
    }
    /// Sends a copy of `item`, made when it is delivered.
    [[nodiscard]] detail::SendAwaiter<T> send(const T& item)
        requires std::copy_constructible<T>
    {
        return detail::SendAwaiter<T>(usable_state("MemoryObjectSendStream::send"), id_,
                                      detail::ItemSource<T>{const_cast<T*>(&item), true});
    }

    /// Sends `item` now (to a waiting receiver or into the buffer), or throws WouldBlock.
    void send_nowait(T&& item) { send_now(detail::ItemSource<T>{&item, false}); }
    void send_nowait(const T& item)
        requires std::copy_constructible<T>
    {
        send_now(detail::ItemSource<T>{const_cast<T*>(&item), true});
    }

    /// Another open send handle to the same stream.
    [[nodiscard]] MemoryObjectSendStream clone() const {
        detail::StreamState<T>* state = usable_state("MemoryObjectSendStream::clone");
        if (state == nullptr) throw ClosedResourceError();
        return MemoryObjectSendStream(*state);
    }

    /// Closes this handle (idempotent): tasks blocked in send() on it get
    /// ClosedResourceError; if it was the last send handle, blocked receivers get
    /// EndOfStream. O(tasks blocked on the stream).
    void close() {
        if (state_ == nullptr || closed_) return;
        state_->affinity_.check("MemoryObjectSendStream::close");
        closed_ = true;
        state_->close_sender(id_);
    }

    [[nodiscard]] MemoryObjectStreamStatistics statistics() const {
        if (state_ == nullptr) detail::throw_moved_from_stream();
        return {state_->buffer_used(),     state_->max_buffer_size(),
                state_->open_senders(),    state_->open_receivers(),
                state_->waiting_senders(), state_->waiting_receivers()};
    }

private:
    friend std::pair<MemoryObjectSendStream<T>, MemoryObjectReceiveStream<T>>
    create_memory_object_stream<T>(std::size_t);

    explicit MemoryObjectSendStream(detail::StreamState<T>& state) noexcept
        : state_(&state), id_(state.add_handle(true)) {}

    /// The state, or nullptr when this handle is closed (the operation then throws
    /// ClosedResourceError, after its cancellation check for the awaitable forms).
    detail::StreamState<T>* usable_state(const char* what) const {
        if (state_ == nullptr) detail::throw_moved_from_stream();
        state_->affinity_.check(what);
        return closed_ ? nullptr : state_;
    }

    void send_now(const detail::ItemSource<T>& source) {
        detail::StreamState<T>* state = usable_state("MemoryObjectSendStream::send_nowait");
        if (state == nullptr) throw ClosedResourceError();
        switch (state->try_send(source)) {
            case detail::StreamState<T>::Result::done:
                return;
            case detail::StreamState<T>::Result::broken:
                throw BrokenResourceError();
            default:
                throw WouldBlock(
                    "anyio::MemoryObjectSendStream::send_nowait: the buffer is full (" +
                    std::to_string(state->buffer_used()) +
                    " items) and no task is waiting to receive; co_await send() to wait");
        }
    }

    void drop() noexcept {
        if (state_ == nullptr) return;
        if (!closed_) state_->close_sender(id_);
        std::exchange(state_, nullptr)->drop_reference();
    }

    detail::StreamState<T>* state_;
    std::uint64_t id_ = 0;
    bool closed_ = false;
};

/// The receive end of a memory object stream (anyio.MemoryObjectReceiveStream). Each handle
/// is one open end; clone() makes another (clones share the items: each item goes to one
/// receiver). When the last receive handle closes, buffered items are destroyed at once and
/// every send fails with BrokenResourceError. close() is also done by the destructor.
///
///     while (auto job = co_await rx.next()) handle(std::move(*job));   // ends at end of stream
///
/// receive() and next() are cancellation points; a receiver handed an item returns it even
/// if it is cancelled in the same turn (the cancellation takes effect at its next
/// checkpoint), and a send never hands an item to a receiver whose cancellation is pending,
/// so no item is lost or duplicated. Waiting receivers are served first in, first out.
///
/// Loop-thread only (std::logic_error from another thread). Allocates nothing per receive.
/// Throws: EndOfStream from receive() once every send handle is closed and the buffer is
/// empty (also to blocked receivers; next() yields an empty optional instead),
/// ClosedResourceError after this handle's close() (also to a task blocked on it when it
/// closes), WouldBlock from receive_nowait() when it would wait. Shutdown: a frame destroyed
/// while blocked in receive() leaves the queue; a destroyed handle closes.
template <class T>
class MemoryObjectReceiveStream {
public:
    using item_type = T;

    MemoryObjectReceiveStream(MemoryObjectReceiveStream&& other) noexcept
        : state_(std::exchange(other.state_, nullptr)), id_(other.id_), closed_(other.closed_) {}
    MemoryObjectReceiveStream& operator=(MemoryObjectReceiveStream&& other) noexcept {
        if (this != &other) {
            drop();
            state_ = std::exchange(other.state_, nullptr);
            id_ = other.id_;
            closed_ = other.closed_;
        }
        return *this;
    }
    MemoryObjectReceiveStream(const MemoryObjectReceiveStream&) = delete;
    MemoryObjectReceiveStream& operator=(const MemoryObjectReceiveStream&) = delete;
    /// Closes the handle. No thread check: destroy it on its loop's thread, or when that
    /// loop is not running.
    ~MemoryObjectReceiveStream() { drop(); }

    /// Receives the next item, waiting while there is none; EndOfStream at the end.
    [[nodiscard]] detail::ReceiveAwaiter<T, false> receive() {
        return {usable_state("MemoryObjectReceiveStream::receive"), id_};
    }
    /// Receives the next item, or an empty optional at the end of the stream.
    [[nodiscard]] detail::ReceiveAwaiter<T, true> next() {
        return {usable_state("MemoryObjectReceiveStream::next"), id_};
    }

    /// Receives an item now, or throws WouldBlock (EndOfStream at the end of the stream).
    T receive_nowait() {
        detail::StreamState<T>* state = usable_state("MemoryObjectReceiveStream::receive_nowait");
        if (state == nullptr) throw ClosedResourceError();
        std::optional<T> item;
        switch (state->try_receive([&](T&& taken) { item.emplace(std::move(taken)); })) {
            case detail::StreamState<T>::Result::done:
                return std::move(*item);
            case detail::StreamState<T>::Result::end_of_stream:
                throw EndOfStream();
            default:
                throw WouldBlock(
                    "anyio::MemoryObjectReceiveStream::receive_nowait: the buffer is empty and "
                    "no task is waiting to send; co_await receive() to wait");
        }
    }

    /// Another open receive handle to the same stream.
    [[nodiscard]] MemoryObjectReceiveStream clone() const {
        detail::StreamState<T>* state = usable_state("MemoryObjectReceiveStream::clone");
        if (state == nullptr) throw ClosedResourceError();
        return MemoryObjectReceiveStream(*state);
    }

    /// Closes this handle (idempotent): tasks blocked on it get ClosedResourceError; if it
    /// was the last receive handle, buffered items are destroyed and blocked senders get
    /// BrokenResourceError. O(tasks blocked on the stream + items destroyed).
    void close() {
        if (state_ == nullptr || closed_) return;
        state_->affinity_.check("MemoryObjectReceiveStream::close");
        closed_ = true;
        state_->close_receiver(id_);
    }

    [[nodiscard]] MemoryObjectStreamStatistics statistics() const {
        if (state_ == nullptr) detail::throw_moved_from_stream();
        return {state_->buffer_used(),     state_->max_buffer_size(),
                state_->open_senders(),    state_->open_receivers(),
                state_->waiting_senders(), state_->waiting_receivers()};
    }

private:
    friend std::pair<MemoryObjectSendStream<T>, MemoryObjectReceiveStream<T>>
    create_memory_object_stream<T>(std::size_t);

    explicit MemoryObjectReceiveStream(detail::StreamState<T>& state) noexcept
        : state_(&state), id_(state.add_handle(false)) {}

    detail::StreamState<T>* usable_state(const char* what) const {
        if (state_ == nullptr) detail::throw_moved_from_stream();
        state_->affinity_.check(what);
        return closed_ ? nullptr : state_;
    }

    void drop() noexcept {
        if (state_ == nullptr) return;
        if (!closed_) state_->close_receiver(id_);
        std::exchange(state_, nullptr)->drop_reference();
    }

    detail::StreamState<T>* state_;
    std::uint64_t id_ = 0;
    bool closed_ = false;
};

}  // namespace anyio
