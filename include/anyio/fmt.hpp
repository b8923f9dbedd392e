// anyio-cpp: opt-in fmt formatters for the statistics structs (needs {fmt}; the core never
// includes this header).
#pragma once

#include <fmt/format.h>

#include "capacity_limiter.hpp"
#include "detail/worker_pool.hpp"

template <>
struct fmt::formatter<anyio::CapacityLimiterStatistics> {
    constexpr auto parse(fmt::format_parse_context& context) { return context.begin(); }
    template <class FormatContext>
    auto format(const anyio::CapacityLimiterStatistics& stats, FormatContext& context) const {
        return fmt::format_to(context.out(),
                              "CapacityLimiterStatistics(borrowed_tokens={}, total_tokens={}, "
                              "borrowers={}, tasks_waiting={})",
                              stats.borrowed_tokens, stats.total_tokens, stats.borrowers.size(),
                              stats.tasks_waiting);
    }
};

template <>
struct fmt::formatter<anyio::WorkerPoolStatistics> {
    constexpr auto parse(fmt::format_parse_context& context) { return context.begin(); }
    template <class FormatContext>
    auto format(const anyio::WorkerPoolStatistics& stats, FormatContext& context) const {
        return fmt::format_to(context.out(),
                              "WorkerPoolStatistics(workers={}, idle_workers={}, busy_workers={}, "
                              "threads_created={}, threads_pruned={}, jobs_completed={})",
                              stats.workers, stats.idle_workers, stats.busy_workers,
                              stats.threads_created, stats.threads_pruned, stats.jobs_completed);
    }
};
