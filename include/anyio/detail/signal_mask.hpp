// Threads the library starts (workers, portal loops) block every asynchronous signal from
// their first instruction: a signal is then never delivered to a worker (where a handler
// would interrupt a user's blocking call, and where a signalfd receiver on the loop would
// never see it). The mask is set in the starting thread around the thread's creation, since a
// new thread inherits it; the starting thread's own mask is restored at once.
#pragma once

#include <csignal>
#include <initializer_list>

#include <pthread.h>

namespace anyio::detail {

/// Blocks asynchronous signals in the calling thread while alive; restores the mask after.
class BlockAsyncSignals {
public:
    BlockAsyncSignals() noexcept {
        sigset_t all;
        ::sigfillset(&all);
        // Synchronous signals (a fault in this very thread) must stay deliverable: blocking
        // them is undefined behaviour when the fault happens.
        for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS}) ::sigdelset(&all, sig);
        ::pthread_sigmask(SIG_BLOCK, &all, &previous_);
    }
    ~BlockAsyncSignals() { ::pthread_sigmask(SIG_SETMASK, &previous_, nullptr); }
    BlockAsyncSignals(const BlockAsyncSignals&) = delete;
    BlockAsyncSignals& operator=(const BlockAsyncSignals&) = delete;

private:
    sigset_t previous_{};
};

}  // namespace anyio::detail
