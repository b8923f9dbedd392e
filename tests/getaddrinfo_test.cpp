#include <anyio/getaddrinfo.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <atomic>
#include <chrono>
#include <future>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <netdb.h>

#include "test_support.hpp"

// Tests for include/anyio/getaddrinfo.hpp: getaddrinfo on a worker thread under its own
// limiter, AddrInfo, and the substitute resolver for tests.

using namespace std::chrono_literals;
using namespace anyio_test;

TEST_CASE("getaddrinfo resolves localhost on a worker thread", "[net]") {
    run_loop([]() -> anyio::Task<> {
        std::vector<anyio::AddrInfo> found =
            co_await anyio::getaddrinfo("localhost", 8080, {.type = SOCK_STREAM});
        REQUIRE_FALSE(found.empty());
        bool loopback = false;
        for (const auto& entry : found) {
            CHECK(entry.type == SOCK_STREAM);
            CHECK(entry.address().port == 8080);
            if (entry.address().host == "127.0.0.1" || entry.address().host == "::1") loopback = true;
        }
        CHECK(loopback);
        CHECK(anyio::to_thread::statistics().threads_created >= 1);  // it went to a worker
    });
}

TEST_CASE("getaddrinfo takes a service name or a port number", "[net]") {
    run_loop([]() -> anyio::Task<> {
        std::vector<anyio::AddrInfo> by_port =
            co_await anyio::getaddrinfo("127.0.0.1", 443, {.type = SOCK_STREAM, .flags = AI_NUMERICHOST});
        REQUIRE(by_port.size() == 1);
        CHECK(by_port.front().address().to_string() == "127.0.0.1:443");
        std::vector<anyio::AddrInfo> by_number = co_await anyio::getaddrinfo(
            "::1", "8443", {.type = SOCK_STREAM, .flags = AI_NUMERICHOST | AI_NUMERICSERV});
        REQUIRE(by_number.size() == 1);
        CHECK(by_number.front().address().to_string() == "[::1]:8443");
        CHECK(by_number.front().family == AF_INET6);
    });
}

TEST_CASE("a failed lookup names the host and says why", "[net]") {
    run_loop([]() -> anyio::Task<> {
        std::string message;
        try {
            // AI_NUMERICHOST: a name fails at once (EAI_NONAME), no DNS traffic.
            (void)co_await anyio::getaddrinfo("not-a-number", 80, {.flags = AI_NUMERICHOST});
        } catch (const std::system_error& error) {
            message = error.what();
            CHECK(error.code().category().name() == std::string("getaddrinfo"));
            CHECK(error.code().value() == EAI_NONAME);
        }
        CHECK(message.find("not-a-number") != std::string::npos);
        CHECK(message.find(::gai_strerror(EAI_NONAME)) != std::string::npos);
    });
}

TEST_CASE("getaddrinfo uses its own 8-token limiter, not the default one", "[net]") {
    run_loop([]() -> anyio::Task<> {
        CHECK(anyio::getaddrinfo_limiter().total_tokens() == 8);
        // With no default tokens at all, ordinary run_sync calls would wait for ever.
        anyio::to_thread::current_default_thread_limiter().set_total_tokens(0);
        std::vector<anyio::AddrInfo> found = co_await anyio::getaddrinfo("localhost", 80);
        CHECK_FALSE(found.empty());
        anyio::to_thread::current_default_thread_limiter().set_total_tokens(40);
    });
}

TEST_CASE("at most 8 lookups run at once; the others wait for a token", "[net]") {
    std::promise<void> release_promise;
    std::shared_future<void> release = release_promise.get_future().share();
    std::atomic<int> running{0};
    std::atomic<int> peak{0};
    run_loop([&]() -> anyio::Task<> {
        anyio::lowlevel::ScopedResolver slow([&, release](const std::string&, const std::string&,
                                                        const anyio::AddrInfoHints&) {
            // relaxed: counters read after the lookups have finished (run_sync's hand-off
            // back to the loop orders them).
            int now = running.fetch_add(1, std::memory_order_relaxed) + 1;
            int seen = peak.load(std::memory_order_relaxed);
            while (now > seen && !peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
            }
            release.wait();
            running.fetch_sub(1, std::memory_order_relaxed);
            return std::vector<anyio::AddrInfo>{anyio::AddrInfo::numeric("127.0.0.1", 1)};
        });
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 10; ++i) {
                tg.start_soon([]() -> anyio::Task<> { (void)co_await anyio::getaddrinfo("slow.test", 1); });
            }
            while (anyio::getaddrinfo_limiter().borrowed_tokens() < 8) co_await anyio::sleep(1ms);
            co_await anyio::sleep(20ms);
            CHECK(anyio::getaddrinfo_limiter().borrowed_tokens() == 8);
            CHECK(anyio::getaddrinfo_limiter().statistics().tasks_waiting == 2);
            CHECK(anyio::to_thread::current_default_thread_limiter().borrowed_tokens() == 0);
            release_promise.set_value();
        });
    });
    CHECK(peak.load() == 8);
}

TEST_CASE("a cancelled lookup returns at once while its thread finishes in the background", "[net]") {
    std::promise<void> release_promise;
    std::shared_future<void> release = release_promise.get_future().share();
    run_loop([&]() -> anyio::Task<> {
        anyio::lowlevel::ScopedResolver stuck([release](const std::string&, const std::string&,
                                                        const anyio::AddrInfoHints&) {
            release.wait();  // a DNS server that does not answer
            return std::vector<anyio::AddrInfo>{};
        });
        Stopwatch watch;
        auto result = co_await anyio::move_on_after(20ms, anyio::getaddrinfo("stuck.test", 80));
        CHECK_FALSE(result.has_value());
        CHECK(watch.elapsed() < prompt_bound);
        // The abandoned thread keeps its token until it returns (trio), then gives it back.
        CHECK(anyio::getaddrinfo_limiter().borrowed_tokens() == 1);
        release_promise.set_value();
        while (anyio::getaddrinfo_limiter().borrowed_tokens() != 0) co_await anyio::sleep(1ms);
    });
}

TEST_CASE("ScopedResolver substitutes the resolver and restores it", "[net]") {
    run_loop([]() -> anyio::Task<> {
        {
            anyio::lowlevel::ScopedResolver substitute(
                [](const std::string& host, const std::string& service, const anyio::AddrInfoHints&) {
                    CHECK(host == "example.test");
                    CHECK(service == "80");
                    return std::vector<anyio::AddrInfo>{anyio::AddrInfo::numeric("192.0.2.7", 80)};
                });
            std::vector<anyio::AddrInfo> found = co_await anyio::getaddrinfo("example.test", 80);
            REQUIRE(found.size() == 1);
            CHECK(found.front().address().host == "192.0.2.7");
        }
        // The real resolver again: a numeric-only lookup of a name fails.
        CHECK_THROWS_AS(co_await anyio::getaddrinfo("example.test", 80, {.flags = AI_NUMERICHOST}),
                        std::system_error);
    });
}

TEST_CASE("AddrInfo::numeric parses IPv4 and IPv6 addresses and refuses names", "[net]") {
    anyio::AddrInfo v4 = anyio::AddrInfo::numeric("10.1.2.3", 7);
    CHECK(v4.family == AF_INET);
    CHECK(v4.address().to_string() == "10.1.2.3:7");
    anyio::AddrInfo v6 = anyio::AddrInfo::numeric("::ffff:1.2.3.4", 9);
    CHECK(v6.family == AF_INET6);
    CHECK(v6.address().port == 9);
    anyio::AddrInfo scoped = anyio::AddrInfo::numeric("fe80::1%1", 5);
    CHECK(scoped.address().host == "fe80::1%1");
    CHECK_THROWS_AS(anyio::AddrInfo::numeric("localhost", 1), std::invalid_argument);
    anyio::AddrInfo ignored;
    CHECK_FALSE(anyio::AddrInfo::parse_numeric("300.1.1.1", 1, SOCK_STREAM, ignored));
}

TEST_CASE("getaddrinfo without a running loop throws NoEventLoopError", "[net]") {
    CHECK_THROWS_AS(anyio::getaddrinfo("localhost", 80), anyio::NoEventLoopError);
    CHECK_THROWS_AS(anyio::getaddrinfo_limiter(), anyio::NoEventLoopError);
}
