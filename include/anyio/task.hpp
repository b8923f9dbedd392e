// anyio-cpp: Task<T>, the coroutine type of the library: lazy, move-only, awaited once. Tasks run
// on an EventLoop (event_loop.hpp), run concurrently as children of task_group.hpp, and are
// cancelled through cancel_scope.hpp; debug.hpp gives them names.
#pragma once

#include <concepts>
#include <coroutine>
#include <exception>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "detail/foreign_await.hpp"
#include "detail/result.hpp"
#include "detail/root_task.hpp"
#include "detail/task_state.hpp"

namespace anyio {

template <class T = void>
class Task;

namespace detail {

/// What a Task<T> frame holds for its awaiter: a Result, or for Task<void> just the exception
/// (a void task's awaiter only needs to know whether it threw).
template <class T>
struct TaskResult : Result<T> {};
template <>
struct TaskResult<void> {
    void set_value() noexcept {}
    void set_exception(std::exception_ptr error) noexcept { error_ = std::move(error); }
    void take() {
        if (error_) std::rethrow_exception(error_);
    }
    [[nodiscard]] std::exception_ptr error() const noexcept { return error_; }
    std::exception_ptr error_;
};

template <class T>
class TaskPromiseBase : public FrameLink {
public:
    std::suspend_always initial_suspend() noexcept { return {}; }

    /// Goes on to whoever awaits this frame: the awaiting frame (a transfer), or, for a task's
    /// body, the root, which finishes the task and frees this frame.
    struct FinalAwaiter {
        bool await_ready() noexcept { return false; }
        template <class Promise>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> self) noexcept {
            Promise& promise = self.promise();
            Continuation* continuation = promise.awaited_by_;
            if (continuation == nullptr) return std::noop_coroutine();  // released, run by hand
            if (continuation->resume_) return transfer_to(continuation->resume_);
            finish_root(*continuation, promise.result_.error());  // destroys this frame
            return std::noop_coroutine();
        }
        void await_resume() noexcept {}
    };
    FinalAwaiter final_suspend() noexcept { return {}; }

    void unhandled_exception() noexcept { result_.set_exception(std::current_exception()); }

    // Every co_await in a Task coroutine comes here first (see detail/foreign_await.hpp).
    template <class U>
    auto await_transform(Task<U>&& task) noexcept {
        return std::move(task).operator co_await();
    }
    // Awaiting consumes the task: write co_await std::move(task).
    template <class U>
    void await_transform(Task<U>& task) = delete;
    template <class U>
    void await_transform(const Task<U>& task) = delete;
    template <class Awaitable>
    auto await_transform(Awaitable&& awaitable) {
        return await_from_task(std::forward<Awaitable>(awaitable));
    }

    TaskResult<T> result_;
};

// The name of the coroutine function a promise belongs to, where the compiler gives it: a
// default argument of get_return_object() is evaluated in the coroutine that calls it (GCC and
// Clang; std::source_location needs a builtin clang 14 lacks). A string literal: static.
#if defined(__has_builtin)
#if __has_builtin(__builtin_FUNCTION)
#define ANYIO_DETAIL_CALLER_FUNCTION() __builtin_FUNCTION()
#endif
#endif
#ifndef ANYIO_DETAIL_CALLER_FUNCTION
#define ANYIO_DETAIL_CALLER_FUNCTION() nullptr
#endif

template <class T>
class TaskPromise final : public TaskPromiseBase<T> {
public:
    Task<T> get_return_object(const char* function = ANYIO_DETAIL_CALLER_FUNCTION()) noexcept;

    template <class U = T>
        requires std::is_convertible_v<U&&, T>
    void return_value(U&& value) {
        this->result_.set_value(std::forward<U>(value));
    }
};

template <>
class TaskPromise<void> final : public TaskPromiseBase<void> {
public:
    Task<void> get_return_object(const char* function = ANYIO_DETAIL_CALLER_FUNCTION()) noexcept;
    void return_void() noexcept {}
};

}  // namespace detail

/// A lazily started coroutine producing a `T` (a value, a reference, a move-only type or
/// nothing). Nothing runs until the task is awaited; `co_await std::move(task)` (or
/// `co_await make_task()`) runs it inside the awaiting task (same cancel scopes) and yields
/// its value or rethrows its exception.
///
/// Move-only. Awaiting consumes the task: the frame moves into the awaiting frame, the Task
/// is left empty (valid() false), and awaiting it again, from this task or another, throws
/// std::logic_error; an lvalue Task cannot be awaited at all (it does not compile). So
/// destroying or reassigning a Task object never touches a frame being awaited. Destroying a
/// task that was never awaited destroys its frame without running it. Allocates its coroutine
/// frame once. Loop-thread only, like every coroutine of a loop.
///
/// A Task coroutine may co_await any C++20 awaitable; one that is not the loop's (say, one
/// that resumes the coroutine from a call_soon callback or a library's completion) is
/// resumed as the loop would resume it, so every primitive keeps working after it (see
/// lowlevel::current_task()).
///
/// A Task also carries the name of the coroutine function that made it (where the compiler
/// gives it), which a task started from it is named after by default (see debug.hpp).
template <class T>
class [[nodiscard]] Task {
public:
    using promise_type = detail::TaskPromise<T>;
    using value_type = T;

    Task() noexcept = default;
    explicit Task(std::coroutine_handle<promise_type> handle, const char* function = nullptr) noexcept
        : handle_(handle), function_(function) {}
    Task(Task&& other) noexcept
        : handle_(std::exchange(other.handle_, nullptr)), function_(other.function_) {}
    Task& operator=(Task&& other) noexcept {
        if (this != &other) {
            if (handle_) handle_.destroy();
            handle_ = std::exchange(other.handle_, nullptr);
            function_ = other.function_;
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

    /// The name of the coroutine function that made this task ("fetch_user"; "operator()" for
    /// a lambda), a string with static storage; nullptr where the compiler does not tell.
    [[nodiscard]] const char* function_name() const noexcept { return function_; }
    /// Low-level, for wrappers: a task that only runs another one (the library's own result
    /// delivery, say) takes that one's name, so a task started from it is named after it.
    /// `function` must have static storage (a string literal); nullptr: no name.
    void set_function_name(const char* function) noexcept { function_ = function; }

    /// Awaits the task's frame, which it owns from `co_await` on: it runs the frame (a
    /// transfer, see detail/task_state.hpp), yields its result, and destroys it afterwards.
    class Awaiter : detail::TaskAwaitLink {
    public:
        explicit Awaiter(std::coroutine_handle<promise_type> frame) noexcept { awaited_ = frame; }
        Awaiter(const Awaiter&) = delete;
        Awaiter& operator=(const Awaiter&) = delete;
        ~Awaiter() {
            if (!awaited_) return;
            if (resume_ && !awaited_.done() && detail::destroying_suspended_frames == 0) {
                // The awaiting frame is being destroyed while the task it awaits still runs
                // (is suspended somewhere below): that task would resume into freed memory.
                detail::fatal_error(
                    "anyio::Task: a coroutine frame was destroyed while the Task it awaits was "
                    "still running; a frame awaiting a Task must stay alive until the await "
                    "completes (destroy it only once the task has finished)");
            }
            awaited_.destroy();
        }

        bool await_ready() const {
            if (!awaited_) {
                throw std::logic_error(
                    "anyio::Task: co_await on an empty or already awaited task; awaiting "
                    "consumes a Task, so it can be awaited once, by one task (create a new "
                    "one to run the coroutine again)");
            }
            return false;
        }
        template <class AwaitingPromise>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<AwaitingPromise> awaiting) noexcept {
            promise_type& awaited = frame().promise();
            awaited.awaited_by_ = this;
            resume_ = awaiting;
            awaited_link_ = &awaited;
            if constexpr (std::is_base_of_v<detail::FrameLink, AwaitingPromise>) {
                parent_ = &awaiting.promise();
                parent_->awaiting_ = this;
            }
            return detail::transfer_to(awaited_);
        }
        T await_resume() {
            if (parent_ != nullptr) parent_->awaiting_ = nullptr;
            return frame().promise().result_.take();
        }

    private:
        std::coroutine_handle<promise_type> frame() const noexcept {
            return std::coroutine_handle<promise_type>::from_address(awaited_.address());
        }
    };

    /// Awaiting consumes the task: the awaiter takes the frame, this Task is left empty.
    Awaiter operator co_await() && noexcept { return Awaiter{std::exchange(handle_, nullptr)}; }

    /// The underlying handle, released: the caller now owns the frame (for the library's own
    /// task runner).
    std::coroutine_handle<promise_type> release() noexcept { return std::exchange(handle_, nullptr); }

private:
    std::coroutine_handle<promise_type> handle_;
    const char* function_ = nullptr;
};

namespace detail {
template <class T>
Task<T> TaskPromise<T>::get_return_object(const char* function) noexcept {
    return Task<T>{std::coroutine_handle<TaskPromise<T>>::from_promise(*this), function};
}
inline Task<void> TaskPromise<void>::get_return_object(const char* function) noexcept {
    return Task<void>{std::coroutine_handle<TaskPromise<void>>::from_promise(*this), function};
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
