// anyio-cpp: Task<T>, the coroutine type of the library.
#pragma once

#include <concepts>
#include <coroutine>
#include <exception>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/result.hpp"

namespace anyio {

template <class T = void>
class Task;

namespace detail {

// Resumption trampoline.
//
// Awaiting a Task is a symmetric transfer: the awaiting coroutine suspends and the awaited
// one runs, and back again when it finishes. Returning the next handle from await_suspend
// would make that a tail call only where the compiler guarantees one (not g++ below -O2, not
// under some sanitizers), and a long chain of tasks that complete synchronously would then
// grow the stack without bound. So the transfer goes through this trampoline instead:
// await_suspend records the next handle and returns, the suspended coroutine's resume()
// returns here, and the loop below resumes the recorded handle. The stack stays flat in
// every build mode, for 1,000,000 sequential awaits as for 100,000 nested ones.
// Constant-initialised and trivially destructible, so access is a plain TLS load.
inline thread_local void* next_coroutine_address = nullptr;

/// Makes `next` the coroutine the current trampoline resumes once the running one suspends.
inline void transfer_to(std::coroutine_handle<> next) noexcept {
    next_coroutine_address = next.address();
}

/// Resumes `handle` and every coroutine it transfers to, until one suspends without naming
/// a successor. Only the loop (and the library's own drivers) call this.
inline void resume_chain(std::coroutine_handle<> handle) {
    void* address = handle.address();
    do {
        next_coroutine_address = nullptr;
        std::coroutine_handle<>::from_address(address).resume();
        address = next_coroutine_address;
    } while (address != nullptr);
}

/// Links a suspended coroutine to the Task frame it is awaiting, so that loop shutdown can
/// destroy a suspended chain innermost first, iteratively (destroying the outer frame first
/// would recurse through every ~Task and overflow the stack for deep chains).
struct FrameLink {
    FrameLink* awaited_ = nullptr;            // the promise of the frame awaited now
    std::coroutine_handle<> awaited_frame_;   // ... and that frame
    void* owner_slot_ = nullptr;              // where the awaiting Task keeps our handle
    void (*clear_owner_)(void* slot) noexcept = nullptr;
};

/// Destroys `frame` (whose promise is `link`) and every frame it is suspended on, innermost
/// first, without recursion.
inline void destroy_frame_chain(std::coroutine_handle<> frame, FrameLink* link) {
    std::vector<FrameLink*> chain;
    for (FrameLink* node = link; node->awaited_ != nullptr; node = node->awaited_) {
        chain.push_back(node);
    }
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
        FrameLink* parent = *it;
        FrameLink* child = parent->awaited_;
        std::coroutine_handle<> child_frame = parent->awaited_frame_;
        child->clear_owner_(child->owner_slot_);  // the parent's Task must not destroy it again
        parent->awaited_ = nullptr;
        child_frame.destroy();
    }
    frame.destroy();
}

template <class T>
class TaskPromiseBase : public FrameLink {
public:
    std::suspend_always initial_suspend() noexcept { return {}; }

    struct FinalAwaiter {
        bool await_ready() noexcept { return false; }
        template <class Promise>
        void await_suspend(std::coroutine_handle<Promise> self) noexcept {
            auto continuation = self.promise().continuation_;
            if (continuation) transfer_to(continuation);
        }
        void await_resume() noexcept {}
    };
    FinalAwaiter final_suspend() noexcept { return {}; }

    void unhandled_exception() noexcept { result_.set_exception(std::current_exception()); }

    std::coroutine_handle<> continuation_;
    Result<T> result_;
};

template <class T>
class TaskPromise final : public TaskPromiseBase<T> {
public:
    Task<T> get_return_object() noexcept;

    template <class U = T>
        requires std::is_convertible_v<U&&, T>
    void return_value(U&& value) {
        this->result_.set_value(std::forward<U>(value));
    }
};

template <>
class TaskPromise<void> final : public TaskPromiseBase<void> {
public:
    Task<void> get_return_object() noexcept;
    void return_void() noexcept { this->result_.set_value(); }
};

}  // namespace detail

/// A lazily started coroutine producing a `T` (a value, a reference, a move-only type or
/// nothing). Nothing runs until the task is awaited; `co_await task` runs it inside the
/// awaiting task (same cancel scopes) and yields its value or rethrows its exception.
///
/// Move-only; awaiting it consumes it (a second await throws std::logic_error). Destroying
/// a task that was never awaited destroys its frame without running it. Allocates its
/// coroutine frame once. Loop-thread only, like every coroutine of a loop.
template <class T>
class [[nodiscard]] Task {
public:
    using promise_type = detail::TaskPromise<T>;
    using value_type = T;

    Task() noexcept = default;
    explicit Task(std::coroutine_handle<promise_type> handle) noexcept : handle_(handle) {}
    Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Task& operator=(Task&& other) noexcept {
        if (this != &other) {
            if (handle_) handle_.destroy();
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    Task(const Task&) = delete;
    Task& operator=(const Task&) = delete;
    ~Task() {
        if (handle_) handle_.destroy();
    }

    /// True until the task has been awaited or moved from.
    [[nodiscard]] bool valid() const noexcept { return static_cast<bool>(handle_); }

    class Awaiter {
    public:
        explicit Awaiter(std::coroutine_handle<promise_type> handle) noexcept : handle_(handle) {}
        bool await_ready() const noexcept { return false; }
        template <class AwaitingPromise>
        void await_suspend(std::coroutine_handle<AwaitingPromise> awaiting) {
            if (!handle_ || handle_.done()) {
                throw std::logic_error(
                    "anyio::Task: co_await on an empty or already awaited task; a Task can be "
                    "awaited once (create a new one to run the coroutine again)");
            }
            promise_type& child = handle_.promise();
            child.continuation_ = awaiting;
            if constexpr (std::is_base_of_v<detail::FrameLink, AwaitingPromise>) {
                awaiting_ = &awaiting.promise();
                awaiting_->awaited_ = &child;
                awaiting_->awaited_frame_ = handle_;
                child.owner_slot_ = owner_;
                child.clear_owner_ = &clear_owner;
            }
            detail::transfer_to(handle_);
        }
        T await_resume() {
            if (awaiting_ != nullptr) awaiting_->awaited_ = nullptr;
            return handle_.promise().result_.take();
        }

    private:
        friend class Task;
        Awaiter(std::coroutine_handle<promise_type> handle,
                std::coroutine_handle<promise_type>* owner) noexcept
            : handle_(handle), owner_(owner) {}
        static void clear_owner(void* slot) noexcept {
            *static_cast<std::coroutine_handle<promise_type>*>(slot) = nullptr;
        }
        std::coroutine_handle<promise_type> handle_;
        std::coroutine_handle<promise_type>* owner_ = nullptr;
        detail::FrameLink* awaiting_ = nullptr;
    };

    Awaiter operator co_await() && noexcept { return Awaiter{handle_, &handle_}; }
    Awaiter operator co_await() & noexcept { return Awaiter{handle_, &handle_}; }

    /// The underlying handle, released: the caller now owns the frame (for the library's own
    /// task runner).
    std::coroutine_handle<promise_type> release() noexcept { return std::exchange(handle_, nullptr); }

private:
    std::coroutine_handle<promise_type> handle_;
};

namespace detail {
template <class T>
Task<T> TaskPromise<T>::get_return_object() noexcept {
    return Task<T>{std::coroutine_handle<TaskPromise<T>>::from_promise(*this)};
}
inline Task<void> TaskPromise<void>::get_return_object() noexcept {
    return Task<void>{std::coroutine_handle<TaskPromise<void>>::from_promise(*this)};
}

/// Awaits `task` and stores how it ended (a value, a reference, nothing, or an exception) in
/// `sink`: a detail::Result or a std::promise (the same set_value/set_exception shape).
/// Never throws, so the task running it always completes.
template <class T, class Sink>
Task<void> deliver_result(Task<T> task, Sink* sink) {
    std::exception_ptr error;
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(task);
            sink->set_value();
        } else if constexpr (std::is_reference_v<T>) {
            T value = co_await std::move(task);
            sink->set_value(value);
        } else {
            sink->set_value(co_await std::move(task));
        }
        co_return;
    } catch (...) {
        error = std::current_exception();
    }
    // Stored after the catch block has ended: another thread may rethrow it at once, and the
    // handler still references the exception object until then.
    sink->set_exception(std::move(error));
}

template <class>
inline constexpr bool is_task_v = false;
template <class T>
inline constexpr bool is_task_v<Task<T>> = true;
}  // namespace detail

/// Satisfied by a callable whose result is an anyio::Task (the `run(fn, args...)` forms).
template <class F, class... Args>
concept returns_task = std::invocable<F, Args...> &&
                       detail::is_task_v<std::remove_cvref_t<std::invoke_result_t<F, Args...>>>;

}  // namespace anyio
