// The storage behind anyio::ContextVar: what a context is, how it is shared, and where the
// thread keeps the one it runs in.
//
// A context is an immutable map from variable to value (Python's contextvars.Context, with
// PEP 567's copy semantics). Immutable, so that copying one is sharing it: one reference
// count, from any thread, and no copy ever needs a lock. Setting a variable builds a new map
// (copy on write) and points the current slot at it; every other holder of the old map keeps
// seeing the old values. No variable set means no map at all (nullptr), so a task or an
// offload that never touches a variable pays one pointer copy and a null check.
//
//     ContextMap (one block)                     ContextValue<T> (one block per set())
//       refs_ (atomic)                             refs_ (atomic)
//       size_                                      destroy_
//       entries: key -> value ───────────────────► value (never modified)
//
// A value is a block of its own, shared by every map that holds it, so building a map for a
// set() copies pointers, never values. The map is a small array searched linearly: contexts
// hold a handful of variables, and a scan of a few cache-resident words beats a tree.
//
// Where the current context lives (the slot set() replaces): the running task's TaskState
// (task_state.hpp) while the loop runs a task, otherwise the calling thread's `thread_context`
// below (a plain thread, a worker running a job, the loop thread in a plain callback). A
// ContextScope installs a context in the thread slot for the length of a job or a callback.
//
// This is the ground floor: it includes no other header of the library.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

namespace anyio::detail {

/// One value of one variable, shared by every context that holds it; never modified.
struct ContextValueBase {
    using Destroy = void (*)(ContextValueBase* self) noexcept;
    explicit ContextValueBase(Destroy destroy) noexcept : destroy_(destroy) {}
    ContextValueBase(const ContextValueBase&) = delete;
    ContextValueBase& operator=(const ContextValueBase&) = delete;

    std::atomic<std::size_t> refs_{1};
    Destroy destroy_;
};

inline void retain(ContextValueBase* value) noexcept {
    // relaxed: a new reference is made from one the caller already holds (as shared_ptr).
    if (value != nullptr) value->refs_.fetch_add(1, std::memory_order_relaxed);
}
inline void release(ContextValueBase* value) noexcept {
    // acq_rel: the last holder frees the value, after every other holder's use of it (their
    // release) is visible to it (this acquire). The value itself is never written, but its
    // destructor must not race with a reader on another thread.
    if (value != nullptr && value->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        value->destroy_(value);
    }
}

template <class T>
struct ContextValue final : ContextValueBase {
    template <class... A>
    explicit ContextValue(A&&... args)
        : ContextValueBase(&destroy), value(std::forward<A>(args)...) {}
    static void destroy(ContextValueBase* self) noexcept { delete static_cast<ContextValue*>(self); }
    T value;  // const in spirit: other threads read it without synchronisation
};

/// An immutable map from variable key to value: one block, the header and then the entries.
class ContextMap {
public:
    struct Entry {
        std::uint64_t key;
        ContextValueBase* value;  // one reference held by this map
    };

    ContextMap(const ContextMap&) = delete;
    ContextMap& operator=(const ContextMap&) = delete;

    /// The value of `key` in `map` (which may be nullptr: the empty context), or nullptr.
    static ContextValueBase* find(const ContextMap* map, std::uint64_t key) noexcept {
        if (map == nullptr) return nullptr;
        const Entry* entries = map->entries();
        for (std::uint32_t i = 0; i < map->size_; ++i) {
            if (entries[i].key == key) return entries[i].value;
        }
        return nullptr;
    }

    /// A new map (one reference, the caller's): `base` with `key` bound to `value` (which it
    /// retains), or without `key` when `value` is nullptr; nullptr when that leaves nothing.
    /// `base` is not changed. Throws std::bad_alloc with nothing changed.
    static ContextMap* with(const ContextMap* base, std::uint64_t key, ContextValueBase* value) {
        const std::uint32_t base_size = base != nullptr ? base->size_ : 0;
        const bool present = find(base, key) != nullptr;
        if (value == nullptr && !present) {  // nothing to remove: the same contents as `base`
            retain(base);
            return const_cast<ContextMap*>(base);
        }
        const std::uint32_t size = value == nullptr ? base_size - 1 : base_size + (present ? 0 : 1);
        if (size == 0) return nullptr;
        void* block = ::operator new(sizeof(ContextMap) + size * sizeof(Entry));
        auto* map = ::new (block) ContextMap(size);
        Entry* out = map->entries();
        std::uint32_t n = 0;
        const Entry* in = base != nullptr ? base->entries() : nullptr;
        for (std::uint32_t i = 0; i < base_size; ++i) {
            if (in[i].key == key) {
                if (value != nullptr) out[n++] = Entry{key, value};
            } else {
                out[n++] = in[i];
            }
        }
        if (!present) out[n++] = Entry{key, value};
        for (std::uint32_t i = 0; i < n; ++i) anyio::detail::retain(out[i].value);
        return map;
    }

    friend void retain(const ContextMap* map) noexcept {
        // relaxed: as for values.
        if (map != nullptr) map->refs_.fetch_add(1, std::memory_order_relaxed);
    }
    friend void release(const ContextMap* map) noexcept {
        // acq_rel: as for values (the map's entries are read by other threads).
        if (map == nullptr || map->refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        ContextMap* owned = const_cast<ContextMap*>(map);
        Entry* entries = owned->entries();
        for (std::uint32_t i = 0; i < owned->size_; ++i) anyio::detail::release(entries[i].value);
        owned->~ContextMap();
        ::operator delete(static_cast<void*>(owned));
    }

    [[nodiscard]] std::uint32_t size() const noexcept { return size_; }

private:
    explicit ContextMap(std::uint32_t size) noexcept : size_(size) {
        Entry* entries = this->entries();
        for (std::uint32_t i = 0; i < size; ++i) ::new (&entries[i]) Entry{0, nullptr};
    }
    Entry* entries() noexcept { return reinterpret_cast<Entry*>(this + 1); }
    [[nodiscard]] const Entry* entries() const noexcept {
        return reinterpret_cast<const Entry*>(this + 1);
    }

    mutable std::atomic<std::size_t> refs_{1};
    std::uint32_t size_;
};
static_assert(sizeof(ContextMap) % alignof(ContextMap::Entry) == 0, "entries follow the header");

/// An owned reference to a context (nullptr: the empty context). Copying shares the map.
class ContextRef {
public:
    ContextRef() noexcept = default;
    ContextRef(const ContextRef& other) noexcept : map_(other.map_) { retain(map_); }
    ContextRef(ContextRef&& other) noexcept : map_(std::exchange(other.map_, nullptr)) {}
    ContextRef& operator=(ContextRef other) noexcept {
        std::swap(map_, other.map_);
        return *this;
    }
    ~ContextRef() { release(map_); }

    /// A new reference to `map` (retained).
    static ContextRef share(const ContextMap* map) noexcept {
        retain(map);
        return adopt(const_cast<ContextMap*>(map));
    }
    /// Takes over a reference the caller holds.
    static ContextRef adopt(ContextMap* map) noexcept {
        ContextRef ref;
        ref.map_ = map;
        return ref;
    }
    /// Gives up the reference to the caller.
    [[nodiscard]] ContextMap* take() noexcept { return std::exchange(map_, nullptr); }
    [[nodiscard]] ContextMap* get() const noexcept { return map_; }
    explicit operator bool() const noexcept { return map_ != nullptr; }

private:
    ContextMap* map_ = nullptr;
};

/// The context of code on this thread that runs outside a task: a plain thread's own, the one
/// a worker runs its job in, the one the loop thread runs a callback in. `serial` tells the
/// context instances this slot has held apart (a ContextVarToken is bound to one). Trivially
/// destructible and constant-initialised: a plain TLS access. A plain thread's map, if it ever
/// set a variable, is freed at thread exit by the cleanup ContextVar::set registers.
struct ThreadContext {
    ContextMap* map = nullptr;        // one reference
    std::uint64_t serial = 0;         // 0: the thread's own context
    std::uint64_t next_serial = 0;    // the last serial handed out on this thread
};
inline thread_local ThreadContext thread_context{};

/// Runs the code in its lifetime in `context` (a copy: what that code sets stays in it) on
/// this thread's slot, and restores the previous context after. For code that runs outside a
/// task: a worker's job, a callback on the loop thread. Allocates nothing.
class ContextScope {
public:
    explicit ContextScope(ContextRef context) noexcept
        : saved_map_(thread_context.map), saved_serial_(thread_context.serial) {
        thread_context.map = context.take();
        thread_context.serial = ++thread_context.next_serial;  // a new context instance
    }
    ContextScope(const ContextScope&) = delete;
    ContextScope& operator=(const ContextScope&) = delete;
    ~ContextScope() {
        ContextMap* inner = thread_context.map;  // what the code left (it may have set values)
        thread_context.map = saved_map_;
        thread_context.serial = saved_serial_;
        release(inner);
    }

private:
    ContextMap* saved_map_;
    std::uint64_t saved_serial_;
};

/// Each ContextVar's key: unique for the process, so a variable destroyed while contexts still
/// hold a value of it can never be confused with a new one built at the same address.
inline std::atomic<std::uint64_t> next_context_var_key{1};

}  // namespace anyio::detail
