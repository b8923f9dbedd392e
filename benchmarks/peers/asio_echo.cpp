// Peer: the TCP echo of net_bench.cpp written with standalone Asio (Debian libasio-dev, 1.22 =
// Boost.Asio 1.79) and C++20 coroutines: the server echoes with async_read_some + async_write,
// the client writes a message and async_reads the whole echo, one round trip at a time,
// TCP_NODELAY on both ends (as anyio-cpp sets it by default).
//
//   echo_64B_1loop / echo_64KiB_1loop     client and server coroutines on one io_context
//   echo_64B_2loops / echo_64KiB_2loops   server and client io_contexts on two threads
//
//   asio_echo [echo_64B_1loop|echo_64KiB_1loop|echo_64B_2loops|echo_64KiB_2loops|all] [--n N]
// Asio 1.22 enables its coroutine support only for compilers it recognises; clang++ with
// libstdc++ has C++20 coroutines too, so say so (g++ is detected on its own).
#if defined(__clang__) && defined(__cpp_impl_coroutine) && !defined(ASIO_HAS_CO_AWAIT)
#define ASIO_HAS_CO_AWAIT 1
#define ASIO_HAS_STD_COROUTINE 1
#endif
#include <asio.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include <fmt/core.h>

#include "../bench_common.hpp"

namespace {

/// User + system CPU time of this process so far, in microseconds.
double process_cpu_us() {
    rusage usage{};
    ::getrusage(RUSAGE_SELF, &usage);
    auto us = [](const timeval& t) { return static_cast<double>(t.tv_sec) * 1e6 + static_cast<double>(t.tv_usec); };
    return us(usage.ru_utime) + us(usage.ru_stime);
}

using asio::ip::tcp;
using bench::Clock;
constexpr std::string_view kSystem = "asio";

asio::awaitable<void> echo_server(tcp::socket socket) {
    socket.set_option(tcp::no_delay(true));
    std::vector<std::byte> buffer(65536);
    for (;;) {
        std::error_code error;
        std::size_t n = co_await socket.async_read_some(
            asio::buffer(buffer), asio::redirect_error(asio::use_awaitable, error));
        if (error) co_return;  // EOF (or reset): the client is done
        co_await asio::async_write(socket, asio::buffer(buffer.data(), n), asio::use_awaitable);
    }
}

asio::awaitable<void> round_trips(tcp::socket& client, std::size_t message, std::int64_t count,
                                  std::vector<double>* latency_us) {
    std::vector<std::byte> out(message, std::byte{'x'});
    std::vector<std::byte> in(message);
    for (std::int64_t i = 0; i < count; ++i) {
        auto t0 = Clock::now();
        co_await asio::async_write(client, asio::buffer(out), asio::use_awaitable);
        co_await asio::async_read(client, asio::buffer(in), asio::use_awaitable);
        if (latency_us != nullptr) latency_us->push_back(bench::to_us(Clock::now() - t0));
    }
}

asio::awaitable<void> measure(tcp::socket& client, std::string_view workload, std::size_t message,
                              std::int64_t n) {
    client.set_option(tcp::no_delay(true));
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

/// Runs `coroutine` on `io` to the end (and everything it started); rethrows what escaped.
void run(asio::io_context& io, asio::awaitable<void> coroutine) {
    std::exception_ptr error;
    asio::co_spawn(io, std::move(coroutine), [&](std::exception_ptr e) {
        if (e && !error) error = e;
    });
    io.run();
    io.restart();
    if (error) std::rethrow_exception(error);
}

tcp::acceptor loopback_acceptor(asio::io_context& io) {
    return tcp::acceptor(io, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
}

void one_loop(std::string_view workload, std::size_t message, std::int64_t n) {
    asio::io_context io{1};
    tcp::acceptor acceptor = loopback_acceptor(io);
    run(io, [&]() -> asio::awaitable<void> {
        tcp::socket client(io);
        co_await client.async_connect(acceptor.local_endpoint(), asio::use_awaitable);
        tcp::socket accepted = co_await acceptor.async_accept(asio::use_awaitable);
        asio::co_spawn(io, echo_server(std::move(accepted)), asio::detached);
        co_await measure(client, workload, message, n);
        client.close();  // the server sees EOF and ends
    }());
}

void two_loops(std::string_view workload, std::size_t message, std::int64_t n) {
    asio::io_context server_io{1};
    tcp::acceptor acceptor = loopback_acceptor(server_io);
    const tcp::endpoint endpoint = acceptor.local_endpoint();
    std::exception_ptr server_error;
    std::thread server([&] {
        try {
            run(server_io, [&]() -> asio::awaitable<void> {
                tcp::socket accepted = co_await acceptor.async_accept(asio::use_awaitable);
                co_await echo_server(std::move(accepted));
            }());
        } catch (...) {
            server_error = std::current_exception();
        }
    });
    asio::io_context client_io{1};
    run(client_io, [&]() -> asio::awaitable<void> {
        tcp::socket client(client_io);
        co_await client.async_connect(endpoint, asio::use_awaitable);
        co_await measure(client, workload, message, n);
        client.close();
    }());
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
        fmt::print(stderr, "asio_echo: {}\n", e.what());
        return 1;
    }
    return 0;
}
