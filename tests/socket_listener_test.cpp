#include <anyio/socket_listener.hpp>

#include "catch.hpp"

#include <anyio/cancel_scope.hpp>
#include <anyio/event.hpp>
#include <anyio/task_group.hpp>
#include <anyio/tcp.hpp>
#include <anyio/unix_socket.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "net_test_support.hpp"

// Tests for include/anyio/socket_listener.hpp: accept() and serve() (the listeners are made
// by tcp.hpp and unix_socket.hpp, tested in their own files).

using namespace std::chrono_literals;
using namespace anyio_test;

namespace {

struct HandlerFailed : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace

TEST_CASE("accept returns a stream connected to the client", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
        anyio::SocketStream server = co_await listener.accept();
        CHECK(server.remote_address() == client.local_address());
        co_await client.send(std::string_view("ping"));
        std::string received = co_await server.receive();
        CHECK(received == "ping");
    });
}

TEST_CASE("serve runs the handler for each connection until it is cancelled", "[net]") {
    run_loop([]() -> anyio::Task<> {
        TempDir dir;
        anyio::UnixListener listener = co_await anyio::create_unix_listener(dir.file("serve.sock"));
        int handled = 0;
        anyio::CancelScope serving;
        auto handler = [&](anyio::SocketStream stream) -> anyio::Task<> {
            ++handled;
            co_await echo_until_eof(std::move(stream));
        };
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                bool completed = co_await serving.run(listener.serve(handler));
                CHECK_FALSE(completed);  // serve() ends only by cancellation
            });
            for (int i = 0; i < 3; ++i) {
                anyio::SocketStream client = co_await anyio::connect_unix(listener.path());
                std::string message = "message " + std::to_string(i);
                co_await client.send(message);
                co_await client.send_eof();
                std::string echoed = co_await receive_all(client);
                CHECK(echoed == message);
            }
            serving.cancel();
        });
        CHECK(handled == 3);
    });
}

TEST_CASE("serve with a task group starts each handler in that group", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        anyio::Event handler_started;
        bool handler_still_running_after_serve = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            auto handler = [&](anyio::SocketStream stream) -> anyio::Task<> {
                handler_started.set();
                co_await anyio::sleep(50ms);
                handler_still_running_after_serve = true;
                co_await stream.send(std::string_view("done"));
            };
            anyio::CancelScope serving;
            tg.start_soon([&]() -> anyio::Task<> { (void)co_await serving.run(listener.serve(handler, tg)); });
            anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
            co_await handler_started.wait();
            serving.cancel();  // serve() stops; the handler belongs to tg and goes on
            std::string reply = co_await client.receive();
            CHECK(reply == "done");
        });
        CHECK(handler_still_running_after_serve);
    });
}

TEST_CASE("a handler that fails ends serve with its error", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        bool failed = false;
        auto handler = [](anyio::SocketStream) -> anyio::Task<> {
            co_await anyio::checkpoint();
            throw HandlerFailed("handler failed");
        };
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                try {
                    co_await listener.serve(handler);
                } catch (const HandlerFailed&) {
                    failed = true;
                }
            });
            anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
            co_await settle(8);
        });
        CHECK(failed);
    });
}

TEST_CASE("a second concurrent accept gets BusyResourceError", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { (void)co_await listener.accept(); });
            co_await settle();
            bool busy = false;
            try {
                (void)co_await listener.accept();
            } catch (const anyio::BusyResourceError& error) {
                busy = true;
                CHECK(std::string(error.what()).find("accepting connections from") != std::string::npos);
            }
            CHECK(busy);
            anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
        });
    });
}

TEST_CASE("closing a listener wakes a blocked accept with ClosedResourceError", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        bool closed = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                try {
                    (void)co_await listener.accept();
                } catch (const anyio::ClosedResourceError&) {
                    closed = true;
                }
            });
            co_await settle();
            listener.close();
        });
        CHECK(closed);
        CHECK(listener.is_closed());
        CHECK_THROWS_AS(co_await listener.accept(), anyio::ClosedResourceError);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
    });
}

TEST_CASE("a cancelled accept takes no connection and leaves the listener usable", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        bool completed = co_await anyio::move_on_after(20ms, [&]() -> anyio::Task<> {
            (void)co_await listener.accept();
        }());
        CHECK_FALSE(completed);
        CHECK_FALSE(anyio::EventLoop::current()->poller().has_waiters());
        anyio::SocketStream client = co_await anyio::connect_tcp("127.0.0.1", listener.local_port());
        anyio::SocketStream server = co_await listener.accept();
        CHECK(server.remote_address() == client.local_address());
    });
}

TEST_CASE("a flood of ready connections still lets the other tasks run", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        constexpr int connections = 100;
        std::vector<anyio::SocketStream> clients;
        for (int i = 0; i < connections; ++i) {
            clients.push_back(co_await anyio::connect_tcp("127.0.0.1", listener.local_port()));
        }
        int other_task_turns = 0;
        bool done = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                while (!done) {
                    ++other_task_turns;
                    co_await anyio::checkpoint();
                }
            });
            co_await anyio::checkpoint();
            std::vector<anyio::SocketStream> accepted;
            for (int i = 0; i < connections; ++i) accepted.push_back(co_await listener.accept());
            CHECK(other_task_turns >= 2);  // every accept was ready; some yielded
            done = true;
        });
    });
}

TEST_CASE("on_accept_error replaces the report and accept_errors starts at zero", "[net]") {
    run_loop([]() -> anyio::Task<> {
        anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
        CHECK(listener.accept_errors() == 0);
        listener.on_accept_error([](std::error_code) {});
        CHECK(listener.native_handles().size() == 1);
        listener.close();
        CHECK_THROWS_AS(listener.on_accept_error({}), anyio::ClosedResourceError);
    });
}
