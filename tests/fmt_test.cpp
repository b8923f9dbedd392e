#include <anyio/fmt.hpp>

#include <anyio/to_thread.hpp>

#include <string>

#include <fmt/format.h>

#include "catch.hpp"

TEST_CASE("CapacityLimiterStatistics formats every field", "[fmt]") {
    anyio::CapacityLimiterStatistics stats;
    stats.borrowed_tokens = 3;
    stats.total_tokens = 40;
    stats.borrowers = {nullptr, nullptr, nullptr};
    stats.tasks_waiting = 7;
    CHECK(fmt::format("{}", stats) ==
          "CapacityLimiterStatistics(borrowed_tokens=3, total_tokens=40, borrowers=3, "
          "tasks_waiting=7)");
}

TEST_CASE("WorkerPoolStatistics formats every field", "[fmt]") {
    anyio::WorkerPoolStatistics stats;
    stats.workers = 2;
    stats.idle_workers = 1;
    stats.busy_workers = 1;
    stats.threads_created = 5;
    stats.threads_pruned = 3;
    stats.jobs_completed = 11;
    CHECK(fmt::format("{}", stats) ==
          "WorkerPoolStatistics(workers=2, idle_workers=1, busy_workers=1, threads_created=5, "
          "threads_pruned=3, jobs_completed=11)");
}

TEST_CASE("live statistics of a running loop format", "[fmt]") {
    std::string text = anyio::run([]() -> anyio::Task<std::string> {
        co_await anyio::to_thread::run_sync([] {});
        co_return fmt::format("{}", anyio::to_thread::statistics());
    });
    CHECK(text.find("threads_created=1") != std::string::npos);
    CHECK(text.find("jobs_completed=1") != std::string::npos);
}
