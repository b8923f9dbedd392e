// anyio-cpp: exception types.
//
// Cancelled deliberately does not derive from std::exception (it mirrors Python's
// BaseException-derived CancelledError), so `catch (const std::exception&)` cannot swallow a
// cancellation by accident. Every other error derives from std::exception and its message
// says what went wrong and what to do about it.
#pragma once

#include <cstddef>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace anyio {

/// Thrown at a cancellation point of a task whose enclosing cancel scope was cancelled.
/// Catch it only to clean up, then rethrow it: swallowing it leaves the scope that
/// cancelled the task waiting for a cancellation that never arrives (a bug, as in trio).
class Cancelled {
public:
    [[nodiscard]] const char* what() const noexcept {
        return "anyio::Cancelled: the enclosing cancel scope was cancelled (rethrow it after "
               "cleaning up)";
    }
};

/// Thrown by fail_after() when the deadline passes before the task finishes.
class TimeoutError : public std::runtime_error {
public:
    TimeoutError()
        : std::runtime_error("anyio::TimeoutError: the operation did not finish before its "
                             "deadline (raise the timeout or use move_on_after to continue)") {}
    using std::runtime_error::runtime_error;
};

/// Thrown by the non-blocking forms (acquire_nowait) when they would have to wait.
class WouldBlock : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Thrown when a loop primitive is used on a thread that runs no event loop.
class NoEventLoopError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Thrown when a LoopToken, a portal or call_soon_threadsafe is used after its loop finished.
class RunFinishedError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
    RunFinishedError()
        : std::runtime_error("anyio::RunFinishedError: the event loop has already finished; "
                             "keep the loop running while other threads still call into it") {}
};

/// Thrown by a receive when the other side has finished sending: every send end of a memory
/// object stream was closed and the buffer is empty, or a socket's peer sent EOF.
class EndOfStream : public std::runtime_error {
public:
    EndOfStream()
        : std::runtime_error("anyio::EndOfStream: the stream has ended (the sending side "
                             "closed it); stop receiving") {}
    using std::runtime_error::runtime_error;
};

/// Thrown when a resource (stream, socket, listener, file) is used after it was closed by its
/// own handle, and to a task blocked on it when it is closed.
class ClosedResourceError : public std::runtime_error {
public:
    ClosedResourceError()
        : std::runtime_error("anyio::ClosedResourceError: this resource has been closed; "
                             "do not use it after close()") {}
    using std::runtime_error::runtime_error;
};

/// Thrown when the other side of a resource is gone: every receive end of a memory object
/// stream is closed, or a socket's peer reset the connection.
class BrokenResourceError : public std::runtime_error {
public:
    BrokenResourceError()
        : std::runtime_error("anyio::BrokenResourceError: the other side of this resource "
                             "is gone (closed or reset); nothing more can be sent") {}
    using std::runtime_error::runtime_error;
};

/// Thrown when a second task tries to use a resource that allows one user at a time (two
/// receivers on one socket, two tasks receiving on one signal receiver).
class BusyResourceError : public std::runtime_error {
public:
    /// `action` completes anyio's message: "Another task is already <action> this resource".
    explicit BusyResourceError(const std::string& action)
        : std::runtime_error("anyio::BusyResourceError: Another task is already " + action +
                             " this resource; only one task may do so at a time") {}
};

/// Several exceptions raised together (by the children of a task group). Its message lists
/// each error, with the task that raised it when known ("task 'fetch_user' (id 7): ...").
class ExceptionGroup : public std::runtime_error {
public:
    explicit ExceptionGroup(std::vector<std::exception_ptr> exceptions)
        : ExceptionGroup(std::move(exceptions), {}) {}

    /// `sources[i]` says where `exceptions[i]` came from, for the message (a task group passes
    /// "task 'name' (id N)"); missing or empty entries say nothing.
    ExceptionGroup(std::vector<std::exception_ptr> exceptions, const std::vector<std::string>& sources)
        : std::runtime_error(describe(exceptions, sources)), exceptions_(std::move(exceptions)) {}

    /// The exceptions, in the order they were raised.
    [[nodiscard]] const std::vector<std::exception_ptr>& exceptions() const noexcept {
        return exceptions_;
    }

private:
    static std::string describe(const std::vector<std::exception_ptr>& exceptions,
                                const std::vector<std::string>& sources) {
        std::string message = "anyio::ExceptionGroup: " + std::to_string(exceptions.size()) +
                              " tasks failed (inspect exceptions() for each error):";
        for (std::size_t i = 0; i < exceptions.size(); ++i) {
            message += "\n  - ";
            if (i < sources.size() && !sources[i].empty()) {
                message += sources[i];
                message += ": ";
            }
            try {
                std::rethrow_exception(exceptions[i]);
            } catch (const std::exception& error) {
                message += error.what();
            } catch (const Cancelled& cancelled) {
                message += cancelled.what();
            } catch (...) {
                message += "(an exception not derived from std::exception)";
            }
        }
        return message;
    }

    std::vector<std::exception_ptr> exceptions_;
};

}  // namespace anyio
