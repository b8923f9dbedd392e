// TCP echo over loopback with anyio-cpp's SocketStream (benchmarks/peers/asio_echo.cpp is the
// same with Asio). A client sends a message, the server echoes it back (receive_into + send
// of what it got), the client waits for the whole echo; one round trip at a time.
//
//   echo_64B_1loop     64-byte messages, client and server are two tasks of one loop
//   echo_64KiB_1loop   64 KiB messages, one loop
//   echo_64B_2loops    64-byte messages, server loop and client loop on two threads
//   echo_64KiB_2loops  64 KiB messages, two loops
//
// ops_per_s = round trips per second; mib_per_s = MiB echoed per second (one direction);
// p50/p99 = per round trip. Each run does 1000 warm-up round trips first (BENCH.md).
//
//   net_bench [echo_64B_1loop|echo_64KiB_1loop|echo_64B_2loops|echo_64KiB_2loops|all] [--n N]
#include <anyio/anyio.hpp>
#include <anyio/net.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <span>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include <fmt/core.h>

#include "bench_common.hpp"

namespace {

/// User + system CPU time of this process so far, in microseconds.
double process_cpu_us() {
    rusage usage{};
    ::getrusage(RUSAGE_SELF, &usage);
    auto us = [](const timeval& t) { return static_cast<double>(t.tv_sec) * 1e6 + static_cast<double>(t.tv_usec); };
    return us(usage.ru_utime) + us(usage.ru_stime);
}

using bench::Clock;
constexpr std::string_view kSystem = "anyio-cpp";

anyio::Task<> echo_server(anyio::SocketStream stream) {
    std::vector<std::byte> buffer(65536);
    for (;;) {
        std::size_t n = 0;
        try {
            n = co_await stream.receive_into(buffer);
        } catch (const anyio::EndOfStream&) {
            co_return;
        }
        co_await stream.send(std::span<const std::byte>(buffer.data(), n));
    }
}

/// `count` round trips of `message` bytes; records each one's latency when `latency_us`.
anyio::Task<> round_trips(anyio::SocketStream& client, std::size_t message, std::int64_t count,
                          std::vector<double>* latency_us) {
    std::vector<std::byte> out(message, std::byte{'x'});
    std::vector<std::byte> in(message);
    for (std::int64_t i = 0; i < count; ++i) {
        auto t0 = Clock::now();
        co_await client.send(out);
        std::size_t got = 0;
        while (got < message) got += co_await client.receive_into(std::span(in).subspan(got));
        if (latency_us != nullptr) latency_us->push_back(bench::to_us(Clock::now() - t0));
    }
}

anyio::Task<> measure(anyio::SocketStream& client, std::string_view workload, std::size_t message,
                      std::int64_t n) {
    co_await round_trips(client, message, bench::kWarmUpRoundTrips, nullptr);
    std::vector<double> latency_us;
    latency_us.reserve(static_cast<std::size_t>(n));
    const double cpu_start = process_cpu_us();
    auto start = Clock::now();
    co_await round_trips(client, message, n, &latency_us);
    auto wall = Clock::now() - start;
    const double cpu_us = process_cpu_us() - cpu_start;
    const double seconds = bench::to_s(wall);
    auto line = bench::base_line(kSystem, workload, n, static_cast<double>(n) / seconds, latency_us);
    line.num("message_bytes", static_cast<std::int64_t>(message));
    line.num("mib_per_s", static_cast<double>(n) * static_cast<double>(message) / (1024.0 * 1024.0) / seconds, 1);
    line.num("wall_ms", bench::to_ms(wall), 2);
    // CPU time (user + system, every thread) per round trip: what a loaded machine changes
    // least, so it compares systems better than ops/s there.
    line.num("cpu_us_per_op", cpu_us / static_cast<double>(n), 2);
    line.num("threads_created", bench::thread_count() - 1).num("max_rss_kb", bench::max_rss_kb());
    line.print();
}

void one_loop(std::string_view workload, std::size_t message, std::int64_t n) {
    anyio::run([&]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
            anyio::SocketStream accepted = co_await listener.accept();
            tg.start_soon(echo_server(std::move(accepted)));
            co_await measure(client, workload, message, n);
            client.close();  // the server sees EOF and ends
        });
    });
}

void two_loops(std::string_view workload, std::size_t message, std::int64_t n) {
    std::promise<std::uint16_t> port_promise;
    std::future<std::uint16_t> port = port_promise.get_future();
    std::exception_ptr server_error;
    std::thread server([&] {
        try {
            anyio::run([&]() -> anyio::Task<> {
                anyio::TcpListener listener =
                    co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
                port_promise.set_value(listener.local_port());
                anyio::SocketStream accepted = co_await listener.accept();
                co_await echo_server(std::move(accepted));
            });
        } catch (...) {
            server_error = std::current_exception();
        }
    });
    anyio::run([&]() -> anyio::Task<> {
        anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", port.get());
        co_await measure(client, workload, message, n);
    });
    server.join();
    if (server_error) std::rethrow_exception(server_error);
}

}  // namespace

int main(int argc, char** argv) {
    bench::Args args = bench::parse_args(
        argc, argv, {"echo_64B_1loop", "echo_64KiB_1loop", "echo_64B_2loops", "echo_64KiB_2loops"});
    try {
        if (bench::selected(args, "echo_64B_1loop")) one_loop("echo_64B_1loop", 64, args.n.value_or(100000));
        if (bench::selected(args, "echo_64KiB_1loop")) one_loop("echo_64KiB_1loop", 65536, args.n.value_or(10000));
        if (bench::selected(args, "echo_64B_2loops")) two_loops("echo_64B_2loops", 64, args.n.value_or(50000));
        if (bench::selected(args, "echo_64KiB_2loops")) two_loops("echo_64KiB_2loops", 65536, args.n.value_or(10000));
    } catch (const std::exception& e) {
        fmt::print(stderr, "net_bench: {}\n", e.what());
        return 1;
    }
    return 0;
}
