// anyio-cpp: context variables (Python's contextvars, with anyio's rules for threads).
//
//     inline anyio::ContextVar<std::string> request_id{"request_id"};
//
//     anyio::Task<> handle(Request r) {
//         request_id.set(r.id);                                        // this task's context
//         co_await anyio::to_thread::run_sync([] { log(request_id.get()); });  // sees r.id
//     }
//
// Where a context comes from (each one a copy: what code sets in it never flows back):
// - a task starts with a copy of the context of the code that started it, taken at the
//   start_soon call (later sets in the parent are not seen by the child, nor the child's by
//   the parent or its siblings); a loop's main task starts with a copy of the context of the
//   thread that called run();
// - to_thread::run_sync's fn runs in a copy of the awaiting task's context, on the worker;
//   from_thread::run / run_sync called from that worker run in a copy of the worker's (so they
//   see what the task had, plus what fn set before the call);
// - a BlockingPortal call (call, start_task_soon) runs in a copy of the calling thread's;
// - a call_soon / call_soon_threadsafe / call_at callback runs in a copy of the context of the
//   code that scheduled it (asyncio);
// - a plain thread starts with an empty context; threads, and loops on different threads,
//   never share one.
//
// Cost: a context is an immutable shared map (detail/context_data.hpp): copying one (every
// start_soon, every run_sync) is one reference count when some variable is set and nothing at
// all when none is; reading a variable is a short scan of the map; set() and reset() allocate
// the value and a new map (copy on write). run_sync still allocates nothing.
#pragma once

#include <cstdint>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "detail/context_data.hpp"
#include "detail/task_state.hpp"

namespace anyio {

template <class T>
class ContextVar;

namespace detail {

/// The slot holding the current context (what set() replaces) and which context instance it
/// holds now: the running task's, or this thread's (a plain thread's own, a worker's job, a
/// callback's copy). A token is bound to the instance.
struct ContextSlot {
    ContextMap** map;
    const void* owner;     // the TaskState, or this thread's ThreadContext
    std::uint64_t serial;  // the task's id, or the thread slot's current serial
};

inline ContextSlot current_context_slot() noexcept {
    if (TaskState* task = running_task) return {&task->context_, task, task->id_};
    return {&thread_context.map, &thread_context, thread_context.serial};
}

/// Frees a plain thread's own context when the thread exits. Registered by the first set()
/// in it (a thread that never sets a variable pays nothing).
struct ThreadContextCleanup {
    ThreadContextCleanup() noexcept = default;
    ThreadContextCleanup(const ThreadContextCleanup&) = delete;
    ThreadContextCleanup& operator=(const ThreadContextCleanup&) = delete;
    ~ThreadContextCleanup() { release(std::exchange(thread_context.map, nullptr)); }
};
inline void clean_thread_context_at_exit() noexcept {
    static thread_local ThreadContextCleanup cleanup;
    (void)cleanup;
}

/// Swaps `map` (a reference the caller holds) into `slot` and drops the slot's old one.
inline void replace_context(const ContextSlot& slot, ContextMap* map) noexcept {
    ContextMap* old = std::exchange(*slot.map, map);
    release(old);
}

}  // namespace detail

/// What ContextVar::set() returns: the means to undo that set() with reset(token), once, in
/// the same context, before any later set() of the same variable there is undone (last in,
/// first out). Move-only; holds a reference to the value it replaced and to the one it set
/// (freed with the token, on any thread). A token that is never used is simply dropped.
class ContextVarToken {
public:
    ContextVarToken() noexcept = default;
    ContextVarToken(ContextVarToken&& other) noexcept { take(other); }
    ContextVarToken& operator=(ContextVarToken&& other) noexcept {
        if (this != &other) {
            drop_values();
            take(other);
        }
        return *this;
    }
    ContextVarToken(const ContextVarToken&) = delete;
    ContextVarToken& operator=(const ContextVarToken&) = delete;
    ~ContextVarToken() { drop_values(); }

    /// True once reset() has used it.
    [[nodiscard]] bool used() const noexcept { return used_; }

private:
    template <class>
    friend class ContextVar;

    void take(ContextVarToken& other) noexcept {
        var_key_ = std::exchange(other.var_key_, 0);
        owner_ = std::exchange(other.owner_, nullptr);
        serial_ = std::exchange(other.serial_, 0);
        previous_ = std::exchange(other.previous_, nullptr);
        installed_ = std::exchange(other.installed_, nullptr);
        used_ = std::exchange(other.used_, false);
    }
    void drop_values() noexcept {
        detail::release(std::exchange(previous_, nullptr));
        detail::release(std::exchange(installed_, nullptr));
    }

    std::uint64_t var_key_ = 0;  // 0: empty (default-constructed or moved from)
    const void* owner_ = nullptr;
    std::uint64_t serial_ = 0;
    detail::ContextValueBase* previous_ = nullptr;   // the value before; nullptr: unset
    detail::ContextValueBase* installed_ = nullptr;  // the value set() installed
    bool used_ = false;
};

/// A context variable (Python's contextvars.ContextVar): a value per context, where a context
/// follows the code that runs as the top of this file says. Declare it at namespace scope
/// (`inline` in a header) or as a static: it is the key to its values, and a value set in a
/// context lives as long as that context, however the variable is copied around.
///
/// Thread-safe: the variable itself never changes, and get/set/reset act on the context of
/// the calling code (a task, a worker running a job, a plain thread), which only that code
/// touches. Values are shared between contexts, and so between threads (a worker reads the
/// value its caller set): T is read through const access only, and must allow that from
/// several threads at once (every standard type does). Nothing here is a cancellation point.
template <class T>
class ContextVar {
public:
    using value_type = T;

    /// A variable called `name` (used in error messages), with an optional default that get()
    /// returns where no value is set.
    explicit ContextVar(std::string name, std::optional<T> default_value = std::nullopt)
        : name_(std::move(name)),
          default_(std::move(default_value)),
          // relaxed: a unique number is all that is needed.
          key_(detail::next_context_var_key.fetch_add(1, std::memory_order_relaxed)) {}
    ContextVar(const ContextVar&) = delete;
    ContextVar& operator=(const ContextVar&) = delete;

    [[nodiscard]] const std::string& name() const noexcept { return name_; }

    /// The value in the current context, else the default. Throws std::out_of_range (naming
    /// the variable) when there is neither. The reference stays valid until this variable is
    /// set or reset again in this context, or this context ends (its task, its job).
    [[nodiscard]] const T& get() const {
        if (const T* value = find()) return *value;
        throw std::out_of_range("anyio::ContextVar '" + name_ +
                                "': no value is set in this context and the variable has no "
                                "default; set() it first (in this task or before the task, "
                                "run_sync or portal call that copied this context), or use "
                                "get_or() or find()");
    }

    /// The value in the current context, else `fallback` (which takes precedence over the
    /// variable's default, as Python's var.get(default) does). A copy.
    [[nodiscard]] T get_or(T fallback) const {
        if (const T* value = find_set()) return *value;
        return fallback;
    }

    /// A pointer to what get() would return, or nullptr instead of throwing. Valid as get()'s
    /// reference is. Never throws.
    [[nodiscard]] const T* find() const noexcept {
        if (const T* value = find_set()) return value;
        return default_ ? &*default_ : nullptr;
    }

    /// Sets the variable in the current context (a task's, a job's, a thread's), for the code
    /// that runs in it from now on and for every context copied from it later. Returns the
    /// token that undoes it (reset). Allocates the value and the context's new map; throws
    /// std::bad_alloc (or what T's move constructor throws) with nothing changed.
    ContextVarToken set(T value) {
        const detail::ContextSlot slot = detail::current_context_slot();
        // Our reference to the value is the token's (installed_); the new map takes its own.
        auto* installed = new detail::ContextValue<T>(std::move(value));
        detail::ContextMap* updated = nullptr;
        try {
            updated = detail::ContextMap::with(*slot.map, key_, installed);
        } catch (...) {
            detail::release(installed);
            throw;
        }
        if (slot.owner == &detail::thread_context && slot.serial == 0) {
            detail::clean_thread_context_at_exit();  // a plain thread's own context
        }
        ContextVarToken token;
        token.var_key_ = key_;
        token.owner_ = slot.owner;
        token.serial_ = slot.serial;
        token.previous_ = detail::ContextMap::find(*slot.map, key_);
        detail::retain(token.previous_);
        token.installed_ = installed;
        detail::replace_context(slot, updated);
        return token;
    }

    /// Gives the variable back the value it had before the set() that returned `token` (or
    /// makes it unset again), in the current context. Throws std::invalid_argument, with
    /// nothing changed, for a token that is empty, was made by another variable, was already
    /// used, was made in another context (another task, or the copy a task or run_sync call
    /// got), or is used out of order (the variable was set again after it, and that set() was
    /// not reset first): Python raises ValueError (or RuntimeError) for these. Allocates the
    /// context's new map (std::bad_alloc: nothing changed).
    void reset(ContextVarToken& token) {
        if (token.var_key_ == 0) fail("the token is empty (default-constructed or moved from)");
        if (token.var_key_ != key_) {
            fail("the token was returned by another ContextVar's set(); reset it through that "
                 "variable");
        }
        if (token.used_) fail("the token has already been used; a token resets its set() once");
        const detail::ContextSlot slot = detail::current_context_slot();
        if (slot.owner != token.owner_ || slot.serial != token.serial_) {
            fail("the token was created in another context (another task, or the copy of the "
                 "context a task, a run_sync call or a callback started with); reset a variable "
                 "in the context whose set() returned the token");
        }
        if (detail::ContextMap::find(*slot.map, key_) != token.installed_) {
            fail("tokens used out of order: the variable was set again after this token's "
                 "set() and that later set() was not reset; reset the later tokens first "
                 "(last in, first out)");
        }
        detail::ContextMap* updated = detail::ContextMap::with(*slot.map, key_, token.previous_);
        detail::replace_context(slot, updated);
        token.used_ = true;
        token.drop_values();
    }
    void reset(ContextVarToken&& token) { reset(token); }

private:
    [[noreturn]] void fail(const char* what) const {
        throw std::invalid_argument("anyio::ContextVar '" + name_ + "'::reset: " + what);
    }

    /// The value set in the current context (ignoring the default), or nullptr.
    [[nodiscard]] const T* find_set() const noexcept {
        detail::ContextValueBase* value = detail::ContextMap::find(detail::current_context(), key_);
        return value != nullptr ? &static_cast<detail::ContextValue<T>*>(value)->value : nullptr;
    }

    std::string name_;
    std::optional<T> default_;
    std::uint64_t key_;
};

}  // namespace anyio
