// Bounded, adaptive spinning: the loop waiting for an imminent completion and a worker waiting
// for its next job both spin briefly before sleeping, because waking a sleeping thread on
// another vCPU costs tens of microseconds on a VM. Spinning only pays when the other party
// runs at the same time on another CPU; when it cannot (one CPU, or a loaded machine) every
// spin times out, so after a timeout the spinner backs off exponentially and sleeps at once.
#pragma once

#include <chrono>
#include <cstdint>

#include <sched.h>

namespace anyio::detail {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

/// The CPU the calling thread runs on now (-1 if unknown).
inline int current_cpu() noexcept { return ::sched_getcpu(); }

/// Decides whether to spin, and learns from how spins end. Owned by one thread.
class SpinPolicy {
public:
    // About the cost of a cross-vCPU wake-up (BENCH.md): a spin never costs more than the
    // wake-up it saves.
    static constexpr std::chrono::microseconds budget{50};

    /// Spins until `ready()` or the budget (or `limit`) runs out. Returns whether ready.
    template <class Ready>
    bool spin(Ready&& ready,
              std::chrono::steady_clock::time_point limit =
                  std::chrono::steady_clock::time_point::max()) noexcept {
        if (skip_ > 0) {
            --skip_;
            return ready();
        }
        auto until = std::chrono::steady_clock::now() + budget;
        if (limit < until) until = limit;
        for (unsigned i = 1;; ++i) {
            if (ready()) {
                failures_ = 0;
                return true;
            }
            if ((i & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
            cpu_relax();
        }
        // Timed out: the other side was not running. Sleep straight away for the next
        // 2, 4, 8 ... 256 waits before trying again.
        if (failures_ < 8) ++failures_;
        skip_ = 1u << failures_;
        return false;
    }

private:
    std::uint32_t failures_ = 0;
    std::uint32_t skip_ = 0;
};

}  // namespace anyio::detail
