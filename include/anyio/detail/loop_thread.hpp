// Which loop the calling thread runs, and the check that keeps loop-thread objects on their
// loop's thread.
//
// Loop objects (Event, CapacityLimiter, Lock, streams, sockets, ...) are not synchronised:
// touching one from another thread while its loop sleeps loses wake-ups and races with the
// loop. Each such object binds to the loop that first uses it and then refuses calls from any
// other thread with a std::logic_error that names the fix. The check is one thread-local load
// and a compare. An object not bound yet may be used with no loop running (set-up code before
// anyio::run): nothing of a loop can depend on it yet, since waiting on it binds it.
#pragma once

#include <stdexcept>
#include <string>

namespace anyio {
class EventLoop;
}

namespace anyio::detail {

/// The loop running on this thread (set by EventLoop::run for its duration), or nullptr.
/// Constant-initialised and trivially destructible: access is a plain TLS load.
inline thread_local EventLoop* current_loop = nullptr;

[[noreturn]] inline void throw_wrong_thread(const char* what) {
    throw std::logic_error(std::string("anyio::") + what +
                           ": this object belongs to an event loop running on another "
                           "thread and is not thread-safe; from a worker thread use "
                           "anyio::from_thread::run_sync, from other threads "
                           "LoopToken::call_soon_threadsafe or a BlockingPortal");
}

/// Binds an object to the loop that uses it first. Embed it and call `check(what)` at the
/// top of every public mutator and wait.
class LoopAffinity {
public:
    /// Throws std::logic_error when called on a thread other than the bound loop's. Binds the
    /// object when it is not bound yet and a loop runs on this thread.
    void check(const char* what) const {
        EventLoop* here = current_loop;
        if (loop_ == here) return;
        if (loop_ == nullptr) {
            loop_ = here;
            return;
        }
        throw_wrong_thread(what);
    }
    /// The loop the object is bound to (nullptr: not used on a loop yet).
    [[nodiscard]] EventLoop* loop() const noexcept { return loop_; }

private:
    mutable EventLoop* loop_ = nullptr;
};

}  // namespace anyio::detail
