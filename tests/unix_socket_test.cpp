#include <anyio/unix_socket.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/task_group.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include <sys/stat.h>

#include "net_test_support.hpp"

// Tests for include/anyio/unix_socket.hpp: connect_unix, create_unix_listener, UnixListener.

using namespace std::chrono_literals;
using namespace anyio_test;

TEST_CASE("connect_unix reaches a UNIX listener and both ends have addresses", "[net]") {
    run_loop([]() -> anyio::Task<> {
        TempDir dir;
        const std::string path = dir.file("echo.sock");
        anyio::UnixListener listener = co_await anyio::create_unix_listener(path);
        CHECK(listener.path() == path);
        anyio::SocketStream client = co_await anyio::connect_unix(path);
        anyio::SocketStream server = co_await listener.accept();
        CHECK(client.remote_address().path == path);
        CHECK(client.remote_address().is_unix());
        CHECK(server.local_address().path == path);
        CHECK(server.remote_address().path.empty());  // the client's socket has no name
        co_await client.send(std::string_view("over unix"));
        co_await client.send_eof();
        std::string received = co_await receive_all(server);
        CHECK(received == "over unix");
    });
}

TEST_CASE("create_unix_listener replaces a stale socket file but nothing else", "[net]") {
    run_loop([]() -> anyio::Task<> {
        TempDir dir;
        const std::string path = dir.file("stale.sock");
        {
            anyio::UnixListener first = co_await anyio::create_unix_listener(path);
        }  // closed, the socket file stays behind
        struct stat status {};
        REQUIRE(::lstat(path.c_str(), &status) == 0);
        anyio::UnixListener second = co_await anyio::create_unix_listener(path);
        anyio::SocketStream client = co_await anyio::connect_unix(path);
        CHECK_FALSE(client.is_closed());

        const std::string regular = dir.file("regular-file");
        std::ofstream(regular) << "keep me";
        bool refused = false;
        try {
            (void)co_await anyio::create_unix_listener(regular);
        } catch (const std::system_error& error) {
            refused = true;
            CHECK(std::string(error.what()).find(regular) != std::string::npos);
        }
        CHECK(refused);
        CHECK(std::filesystem::is_regular_file(regular));
    });
}

TEST_CASE("connect_unix to a missing path fails with a message naming it", "[net]") {
    run_loop([]() -> anyio::Task<> {
        TempDir dir;
        const std::string path = dir.file("nobody-here.sock");
        std::string message;
        try {
            (void)co_await anyio::connect_unix(path);
        } catch (const std::system_error& error) {
            message = error.what();
            CHECK(error.code() == std::errc::no_such_file_or_directory);
        }
        CHECK(message.find(path) != std::string::npos);
    });
}

TEST_CASE("a UNIX socket path longer than sun_path is refused", "[net]") {
    run_loop([]() -> anyio::Task<> {
        const std::string path = "/tmp/" + std::string(200, 'x');
        CHECK_THROWS_AS(co_await anyio::connect_unix(path), std::system_error);
        CHECK_THROWS_AS(co_await anyio::create_unix_listener(path), std::system_error);
    });
}

TEST_CASE("an abstract UNIX address works without a file", "[net]") {
    run_loop([]() -> anyio::Task<> {
        const std::string name = std::string(1, '\0') + "anyio-test-" + std::to_string(::getpid());
        anyio::UnixListener listener = co_await anyio::create_unix_listener(name);
        anyio::SocketStream client = co_await anyio::connect_unix(name);
        anyio::SocketStream server = co_await listener.accept();
        CHECK(listener.path() == name);
        co_await client.send(std::string_view("abstract"));
        std::string received = co_await server.receive();
        CHECK(received == "abstract");
    });
}

TEST_CASE("a UNIX connect waits while the listener's backlog is full, and can be cancelled", "[net]") {
    run_loop([]() -> anyio::Task<> {
        TempDir dir;
        const std::string path = dir.file("full.sock");
        anyio::UnixListener listener = co_await anyio::create_unix_listener(path, 0);
        // Fill the backlog (a UNIX listener with backlog 0 queues one connection).
        std::vector<anyio::SocketStream> queued;
        for (int i = 0; i < 2; ++i) {
            auto attempt = co_await anyio::move_on_after(100ms, anyio::connect_unix(path));
            if (!attempt) break;
            queued.push_back(std::move(*attempt));
        }
        const std::size_t fds_before = open_fd_count();
        bool completed = co_await anyio::move_on_after(50ms, [&]() -> anyio::Task<> {
            (void)co_await anyio::connect_unix(path);
        }());
        CHECK_FALSE(completed);  // still waiting for room when cancelled
        CHECK(open_fd_count() == fds_before);
        // Room again: the next connect gets through.
        (void)co_await listener.accept();
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { (void)co_await anyio::connect_unix(path); });
            (void)co_await listener.accept();
        });
    });
}
