// A small HTTP server on the loop: accepts and reads with wait_readable, answers with
// wait_writable, and does its "database query" (a blocking call) through to_thread::run_sync
// under a limiter of its own, so a slow query never stalls other connections.
//
//   ./http_server            serves 20 requests made by a built-in client on 127.0.0.1, exits
//   ./http_server 8080       serves on 127.0.0.1:8080 until interrupted (try curl)
#include <anyio/anyio.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/core.h>

using namespace std::chrono_literals;

namespace {

struct Fd {
    explicit Fd(int fd) : fd(fd) {}
    Fd(Fd&& other) noexcept : fd(std::exchange(other.fd, -1)) {}
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
    int fd;
};

[[noreturn]] void fail(const char* what) { throw std::system_error(errno, std::generic_category(), what); }

Fd listen_on(std::uint16_t port) {
    Fd server(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (server.fd < 0) fail("socket");
    int one = 1;
    ::setsockopt(server.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(server.fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) fail("bind");
    if (::listen(server.fd, 128) != 0) fail("listen");
    return server;
}

std::uint16_t port_of(const Fd& socket) {
    sockaddr_in address{};
    socklen_t length = sizeof address;
    ::getsockname(socket.fd, reinterpret_cast<sockaddr*>(&address), &length);
    return ntohs(address.sin_port);
}

std::string query_database(std::string path) {
    std::this_thread::sleep_for(5ms);  // a blocking driver call: never on the loop
    return "you asked for " + path + "\n";
}

anyio::Task<> serve(Fd connection, anyio::CapacityLimiter& db_limiter) {
    std::string request;
    char buffer[4096];
    while (request.find("\r\n\r\n") == std::string::npos) {
        co_await anyio::wait_readable(connection.fd);
        ssize_t got = ::read(connection.fd, buffer, sizeof buffer);
        if (got == 0) co_return;
        if (got < 0) {
            if (errno == EAGAIN) continue;
            co_return;
        }
        request.append(buffer, static_cast<std::size_t>(got));
    }
    auto start = request.find(' ') + 1;
    std::string path = request.substr(start, request.find(' ', start) - start);
    std::string body = co_await anyio::to_thread::run_sync({.limiter = &db_limiter},
                                                           query_database, path);
    std::string response = fmt::format(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.size(), body);
    std::size_t sent = 0;
    while (sent < response.size()) {
        co_await anyio::wait_writable(connection.fd);
        ssize_t wrote = ::write(connection.fd, response.data() + sent, response.size() - sent);
        if (wrote < 0 && errno != EAGAIN) co_return;
        if (wrote > 0) sent += static_cast<std::size_t>(wrote);
    }
}

anyio::Task<> accept_loop(const Fd& server, int max_requests, anyio::TaskGroup& tg,
                          anyio::CapacityLimiter& db_limiter) {
    for (int served = 0; max_requests < 0 || served < max_requests;) {
        co_await anyio::wait_readable(server.fd);
        int client = ::accept4(server.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (client < 0) continue;
        tg.start_soon(serve, Fd(client), std::ref(db_limiter));
        ++served;
    }
}

// A plain blocking client on its own thread, so the example checks itself.
std::string http_get(std::uint16_t port, const std::string& path) {
    Fd socket(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(socket.fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) fail("connect");
    std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
    if (::write(socket.fd, request.data(), request.size()) < 0) fail("write");
    std::string reply;
    char buffer[4096];
    for (ssize_t got; (got = ::read(socket.fd, buffer, sizeof buffer)) > 0;) {
        reply.append(buffer, static_cast<std::size_t>(got));
    }
    return reply.substr(reply.find("\r\n\r\n") + 4);
}

}  // namespace

int main(int argc, char** argv) {
    const bool self_test = argc < 2;
    const int requests = self_test ? 20 : -1;
    Fd server = listen_on(self_test ? 0 : static_cast<std::uint16_t>(std::atoi(argv[1])));
    const std::uint16_t port = port_of(server);
    fmt::print("listening on 127.0.0.1:{}\n", port);

    std::vector<std::string> replies(static_cast<std::size_t>(std::max(requests, 0)));
    std::vector<std::thread> clients;
    for (int i = 0; i < requests; ++i) {
        clients.emplace_back([&, i] { replies[static_cast<std::size_t>(i)] = http_get(port, "/item/" + std::to_string(i)); });
    }

    auto started = std::chrono::steady_clock::now();
    anyio::run([&]() -> anyio::Task<> {
        anyio::CapacityLimiter db_limiter(4);  // at most 4 queries at once
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            co_await accept_loop(server, requests, tg, db_limiter);
        });
    });
    for (auto& client : clients) client.join();
    auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started);
    for (const auto& reply : replies) fmt::print("{}", reply);
    fmt::print("{} requests, 5 ms blocking query each, 4 at a time: {} ms\n", requests, elapsed.count());
    return 0;
}
