// The loop half of AsyncFile (file.hpp): the file's turn, which lets one call at a time use
// the FILE*, the calls themselves, and the background close of a file nobody holds any more.
// Loop-thread only.
#pragma once

#include <coroutine>
#include <memory>
#include <string>
#include <type_traits>

#include "../errors.hpp"
#include "../event_loop.hpp"
#include "../task.hpp"
#include "../to_thread.hpp"
#include "file_io.hpp"
#include "intrusive_list.hpp"
#include "wait.hpp"

namespace anyio::detail {

/// A call waiting for its file's turn. The node lives in the call's frame (no allocation);
/// waiting is a cancellation point and a cancelled waiter leaves the queue in O(1). A waiter
/// granted the turn keeps it even if it is cancelled in the same loop turn (its run_sync then
/// raises Cancelled before starting anything, and the turn moves on).
class FileTurnWaiter final : public CancellableWait<FileTurnWaiter>,
                             public ListHook<FileTurnTag> {
public:
    FileTurnWaiter(FileState& file, bool& held) noexcept : file_(&file), held_(&held) {}
    FileTurnWaiter(const FileTurnWaiter&) = delete;
    FileTurnWaiter& operator=(const FileTurnWaiter&) = delete;
    ~FileTurnWaiter() { abort(); }

    bool await_ready() noexcept {
        if (file_->busy) return false;
        file_->busy = *held_ = true;  // free: taken without suspending
        return true;
    }
    bool await_suspend(std::coroutine_handle<> handle) {
        if (!begin("AsyncFile", handle)) return false;
        file_->waiters.push_back(*this);
        park();
        return true;
    }
    void await_resume() const { throw_if_cancelled(); }

    void abort() noexcept {
        if (ListHook<FileTurnTag>::linked()) ListHook<FileTurnTag>::unlink();
    }
    void grant() noexcept {
        *held_ = true;
        wake();
    }

private:
    FileState* file_;
    bool* held_;
};

/// Runs in a task of its own: the close of a file nobody holds any more, on a worker.
inline Task<void> close_in_background_task(std::shared_ptr<FileState> file) {
    try {
        co_await to_thread::run_sync(&file_close_quietly, file);
    } catch (...) {
        // run_sync refused (the loop is shutting down): the last reference, dropped with
        // this frame, closes the file. The task has no cancel scope: never Cancelled.
    }
}

/// Closes a file nobody will use any more without blocking the loop: a background task
/// hands the fclose to a worker. With no loop on this thread, or a loop shutting down, the
/// last owner's ~FileState closes it instead: usually right here, or, if a worker detached
/// at shutdown still runs a call on it, that worker when the call returns. Only when no
/// call holds the turn.
inline void close_in_background(std::shared_ptr<FileState> file) noexcept {
    file->closed = true;
    file->close_when_idle = false;
    EventLoop* loop = EventLoop::current();
    if (loop == nullptr || loop->token().finished() || file->fp == nullptr) return;
    try {
        loop->spawn(close_in_background_task(std::move(file)));
    } catch (...) {
        // Out of memory for the task: `file`, if still ours, closes it on the way out.
    }
}

/// Passes the turn to the next waiter, or frees it (and runs a close left for this moment).
inline void release_turn(const std::shared_ptr<FileState>& file) noexcept {
    if (FileTurnWaiter* next = file->waiters.pop_front()) {
        next->grant();
        return;
    }
    file->busy = false;
    if (file->close_when_idle) close_in_background(file);
}

/// One call's hold on its file's turn, released when the call's frame ends however it ends
/// (a value, an exception, or destroyed at loop shutdown).
class FileTurn {
public:
    explicit FileTurn(const std::shared_ptr<FileState>& file) noexcept : file_(file) {}
    FileTurn(const FileTurn&) = delete;
    FileTurn& operator=(const FileTurn&) = delete;
    ~FileTurn() {
        if (held_) release_turn(file_);
    }
    [[nodiscard]] FileTurnWaiter acquire() noexcept { return FileTurnWaiter{*file_, held_}; }

private:
    const std::shared_ptr<FileState>& file_;  // the call's own reference, in its frame
    bool held_ = false;
};

[[noreturn]] inline void throw_closed(const char* what, const FileState* file) {
    throw ClosedResourceError(
        std::string("anyio::") + what + ": " +
        (file != nullptr ? "the file \"" + file->path + "\" has been closed"
                         : std::string("this AsyncFile holds no file (moved from or "
                                       "default-constructed)")) +
        "; open the file again with anyio::open_file");
}

template <class Fn, class... Args>
using file_result_t = std::invoke_result_t<Fn, const std::shared_ptr<FileState>&, Args...>;

/// One AsyncFile call: the file's turn, then `fn(file, args...)` on a worker. The job holds
/// a reference to the file too, so a worker never outlives what it reads.
template <class Fn, class... Args>
Task<file_result_t<Fn, Args...>> file_call(std::shared_ptr<FileState> file, const char* what,
                                           Fn fn, Args... args) {
    if (file == nullptr || file->closed) throw_closed(what, file.get());
    FileTurn turn(file);
    co_await turn.acquire();
    if (file->closed) throw_closed(what, file.get());  // aclose() came first
    co_return co_await to_thread::run_sync(to_thread::RunSyncOptions{.limiter = file->limiter},
                                           fn, file, args...);
}

inline Task<void> file_aclose(std::shared_ptr<FileState> file) {
    if (file == nullptr || file->closed) co_return;  // closing twice is fine (Python)
    FileTurn turn(file);
    try {
        co_await turn.acquire();
    } catch (const Cancelled&) {
        // trio's rule: a cancelled aclose still closes, once the calls ahead are done.
        file->closed = file->close_when_idle = true;
        throw;
    }
    if (file->closed) co_return;  // another aclose() came first
    file->closed = true;          // calls queued behind this one fail from now on
    try {
        co_await to_thread::run_sync(to_thread::RunSyncOptions{.limiter = file->limiter},
                                     &file_close, file);
    } catch (const Cancelled&) {
        file->close_when_idle = true;  // never started: closes in the background instead
        throw;
    }
}

}  // namespace anyio::detail
