// The outcome of an operation: nothing yet, a value (or a reference), or an exception.
// Shared by Task<T>, the offload job and the cross-thread calls so that every started call
// ends in exactly one of them.
#pragma once

#include <exception>
#include <memory>
#include <type_traits>
#include <utility>
#include <variant>

namespace anyio::detail {

template <class T>
class Result {
    // References are stored as pointers; void as monostate.
    using Stored = std::conditional_t<std::is_void_v<T>, std::monostate,
                                      std::conditional_t<std::is_reference_v<T>,
                                                         std::add_pointer_t<T>, T>>;

public:
    template <class... Args>
    void set_value(Args&&... args) {
        if constexpr (std::is_reference_v<T>) {
            storage_.template emplace<1>(std::addressof(args)...);
        } else {
            storage_.template emplace<1>(std::forward<Args>(args)...);
        }
    }
    void set_exception(std::exception_ptr error) noexcept {
        storage_.template emplace<2>(std::move(error));
    }

    /// Stores the result of invoking `fn()`, or the exception it throws (of any type).
    template <class F>
    void capture(F&& fn) noexcept {
        try {
            if constexpr (std::is_void_v<T>) {
                std::forward<F>(fn)();
                storage_.template emplace<1>();
            } else {
                set_value(std::forward<F>(fn)());
            }
        } catch (...) {
            set_exception(std::current_exception());
        }
    }

    [[nodiscard]] bool ready() const noexcept { return storage_.index() != 0; }
    /// The stored exception, or nullptr.
    [[nodiscard]] std::exception_ptr error() const noexcept {
        return storage_.index() == 2 ? std::get<2>(storage_) : nullptr;
    }
    [[nodiscard]] bool has_exception() const noexcept { return storage_.index() == 2; }

    /// Returns the value (moved out) or rethrows the exception.
    T take() {
        if (storage_.index() == 2) std::rethrow_exception(std::get<2>(storage_));
        if constexpr (std::is_void_v<T>) {
            return;
        } else if constexpr (std::is_reference_v<T>) {
            return static_cast<T>(*std::get<1>(storage_));
        } else {
            return std::move(std::get<1>(storage_));
        }
    }

private:
    std::variant<std::monostate, Stored, std::exception_ptr> storage_;
};

}  // namespace anyio::detail
