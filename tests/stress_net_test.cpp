// Stress for the network layer (issue 15, "Stress"): thousands of loopback connections opened,
// used, reset and cancelled, from both ends, at once. Each client picks a script; the server
// reads the script's first byte and plays its part. At the end every connection ended the way
// its script says, on both sides, every handler ran once and ended, and every descriptor is
// closed again.
//
// net_test has the echo sizes and 1,000 plain concurrent connections; socket_stream_test and
// socket_listener_test each behaviour once. Size: ANYIO_STRESS_SCALE (tests/test_support.hpp);
// 1.0 opens 20,000 connections (never fewer than 1,000).
#include <anyio/net.hpp>

#include <anyio/anyio.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <sys/resource.h>
#include <sys/socket.h>

#include "catch.hpp"
#include "net_test_support.hpp"
#include "test_support.hpp"

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;

// What a connection does. The client sends the script's letter first (except `cancel_connect`).
//   E echo         the client sends a payload and EOF; the server echoes it back, then EOF
//   R reset        the server resets the connection; the client's receive is broken
//   C client reset the server acknowledges, the client resets; the server's receive is broken
//   W wait         the client's receive is cancelled, then the stream is used again
//   S server stop  the server's receive is cancelled and the server closes: the client gets EOF
//   X cut send     the client's large send is cancelled part way and the client closes
//   K cancel connect  connect_tcp is cancelled after a few microseconds (or connects, and closes)
constexpr std::string_view scripts = "EEEERRCCWWSSXKKK";
constexpr int concurrency = 200;  // clients connected at once (each holds two descriptors here)

void reset_on_close(anyio::SocketStream& stream) {
    linger abort_on_close{1, 0};  // close() then sends RST instead of FIN
    ::setsockopt(stream.native_handle(), SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof abort_on_close);
}

struct NetWorld {
    std::uint16_t port = 0;
    std::vector<std::string> hosts;
    std::string pattern = pattern_bytes(1 << 17);
    const std::string big = std::string(8 << 20, 'x');  // more than the socket buffers hold
    anyio::CapacityLimiter clients_at_once{concurrency};
    std::int64_t connected = 0;          // clients whose connect returned a stream
    std::int64_t accepted = 0;           // handlers started
    std::int64_t handled = 0;            // handlers ended
    std::int64_t clients_done = 0;
    std::map<std::string, std::int64_t> client_outcomes;  // "<script>: <outcome>" -> count
    std::map<std::string, std::int64_t> server_outcomes;
    std::int64_t bytes_echoed = 0;
};

// ---- the server's part ----

anyio::Task<std::string> serve_script(NetWorld& world, anyio::SocketStream& stream, char script) {
    std::vector<std::byte> buffer(65536);
    switch (script) {
    case 'E':
        co_await anyio_test::echo_all(stream);
        co_return "echoed";
    case 'R':
        reset_on_close(stream);
        stream.close();
        co_return "reset";
    case 'C':
        co_await stream.send(std::string_view("k"));
        for (;;) (void)co_await stream.receive();  // until the client's reset
    case 'W': {
        std::string bang = co_await stream.receive(1);
        co_await stream.send(bang);
        (void)co_await stream.receive();  // EndOfStream
        co_return "unexpected data";
    }
    case 'S': {
        const bool completed = co_await anyio::move_on_after(std::chrono::microseconds(world.accepted % 500),
                                                             [&]() -> anyio::Task<> { (void)co_await stream.receive(); }());
        stream.close();
        co_return completed ? "received" : "cancelled and closed";
    }
    case 'X':
        co_await anyio::sleep(5ms);  // the client's send fills the buffers meanwhile
        for (;;) (void)co_await stream.receive(65536);  // until EOF
    default:
        co_return std::string("unknown script ") + script;
    }
}

anyio::Task<> handler(NetWorld& world, anyio::SocketStream stream) {
    ++world.accepted;
    char script = '?';
    std::string outcome;
    try {
        script = (co_await stream.receive(1))[0];
        outcome = co_await serve_script(world, stream, script);
    } catch (const anyio::EndOfStream&) {
        outcome = "EndOfStream";
    } catch (const anyio::BrokenResourceError&) {
        outcome = "BrokenResourceError";
    } catch (const std::exception& error) {
        outcome = std::string("error: ") + error.what();
    }
    ++world.server_outcomes[std::string(1, script) + ": " + outcome];
    ++world.handled;
}

// ---- the client's part ----

anyio::Task<std::string> play_script(NetWorld& world, anyio::SocketStream& stream, char script, std::int64_t id) {
    if (script != 'K') co_await stream.send(std::string_view(&script, 1));
    switch (script) {
    case 'E': {
        const std::size_t size = 1 + static_cast<std::size_t>(id * 7919 % 65536);
        const std::string_view payload(world.pattern.data() + id % 4096, size);
        std::string echoed;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                co_await stream.send(payload);
                co_await stream.send_eof();
            });
            echoed = co_await receive_all(stream);
        });
        world.bytes_echoed += static_cast<std::int64_t>(echoed.size());
        co_return echoed == payload ? "echoed" : "echo differs";
    }
    case 'R':
        (void)co_await stream.receive();
        co_return "received data";
    case 'C': {
        std::string ack = co_await stream.receive(1);
        reset_on_close(stream);
        stream.close();
        co_return ack == "k" ? "reset" : "no ack";
    }
    case 'W': {
        const bool received = co_await anyio::move_on_after(
            std::chrono::microseconds(100 + id % 900), [&]() -> anyio::Task<> { (void)co_await stream.receive(); }());
        if (received) co_return "received before the server sent";
        co_await stream.send(std::string_view("!"));
        std::string bang = co_await stream.receive(1);
        co_await stream.send_eof();
        try {
            (void)co_await stream.receive();
        } catch (const anyio::EndOfStream&) {
            co_return bang == "!" ? "usable after a cancelled receive" : "wrong answer";
        }
        co_return "data after the answer";
    }
    case 'S':
        (void)co_await stream.receive();
        co_return "received data";
    case 'X': {
        const bool sent = co_await anyio::move_on_after(
            std::chrono::microseconds(id % 1000), [&]() -> anyio::Task<> { co_await stream.send(world.big); }());
        stream.close();
        co_return sent ? "sent" : "cut";
    }
    case 'K':
        stream.close();
        co_return "connected";
    default:
        co_return "unknown script";
    }
}

anyio::Task<> client(NetWorld& world, std::int64_t id, char script, std::string host) {
    auto slot = co_await world.clients_at_once.scoped();
    std::string outcome;
    try {
        std::optional<anyio::SocketStream> stream;
        if (script == 'K') {
            stream = co_await anyio::move_on_after(std::chrono::microseconds(id % 40),
                                                   anyio::connect_tcp(host, world.port));
        } else {
            stream = co_await anyio::connect_tcp(host, world.port);
        }
        if (stream) {
            ++world.connected;
            outcome = co_await play_script(world, *stream, script, id);
        } else {
            outcome = "cancelled";
        }
    } catch (const anyio::EndOfStream&) {
        outcome = "EndOfStream";
    } catch (const anyio::BrokenResourceError&) {
        outcome = "BrokenResourceError";
    } catch (const std::exception& error) {
        outcome = std::string("error: ") + error.what();
    }
    ++world.client_outcomes[std::string(1, script) + ": " + outcome];
    ++world.clients_done;
}

// The outcomes each script may end in, on each side.
const std::map<char, std::vector<std::string>> client_expected{
    {'E', {"echoed"}},
    {'R', {"BrokenResourceError"}},
    {'C', {"reset"}},
    {'W', {"usable after a cancelled receive"}},
    {'S', {"EndOfStream"}},
    {'X', {"sent", "cut"}},
    {'K', {"connected", "cancelled"}},
};
const std::map<char, std::vector<std::string>> server_expected{
    {'E', {"echoed"}},
    {'R', {"reset"}},
    {'C', {"BrokenResourceError"}},
    {'W', {"EndOfStream"}},
    {'S', {"cancelled and closed"}},
    {'X', {"EndOfStream"}},  // the server only reads: the client's close is a FIN
    // No script byte: a 'K' client that connected and closed (EOF), or whose connect was
    // cancelled after the kernel had completed the handshake (EOF, or a reset when the
    // handshake was still under way on the client's side).
    {'?', {"EndOfStream", "BrokenResourceError"}},
};

// Counts of outcomes that their script does not allow, with a line describing each.
std::int64_t unexpected(const std::map<std::string, std::int64_t>& outcomes,
                        const std::map<char, std::vector<std::string>>& expected, std::string& description) {
    std::int64_t count = 0;
    for (const auto& [key, n] : outcomes) {
        const auto allowed = expected.find(key[0]);
        const std::string outcome = key.substr(3);
        if (allowed == expected.end() ||
            std::find(allowed->second.begin(), allowed->second.end(), outcome) == allowed->second.end()) {
            count += n;
            description += "\n  " + key + " (x" + std::to_string(n) + ")";
        }
    }
    return count;
}

std::int64_t count_of(const std::map<std::string, std::int64_t>& outcomes, std::string_view prefix) {
    std::int64_t count = 0;
    for (const auto& [key, n] : outcomes) {
        if (key.rfind(prefix, 0) == 0) count += n;
    }
    return count;
}

// True once the server has seen every connection the clients made, and every handler ended.
bool caught_up(const NetWorld& world) {
    for (char script : std::string_view("ERCWSX")) {
        if (count_of(world.server_outcomes, std::string(1, script) + ":") <
            count_of(world.client_outcomes, std::string(1, script) + ":")) {
            return false;
        }
    }
    return count_of(world.server_outcomes, "?:") >= count_of(world.client_outcomes, "K: connected") &&
           world.handled == world.accepted;
}

}  // namespace

TEST_CASE("Thousands of loopback connections opened, used, reset and cancelled at once each end "
          "as their script says, and leave no descriptor behind",
          "[stress][net]") {
    const std::int64_t connections = scaled(20'000, 1'000);
    rlimit limit{};
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &limit) == 0);
    const rlim_t needed = 2 * concurrency + 200;
    if (limit.rlim_cur < needed) {
        rlimit raised = limit;
        raised.rlim_cur = limit.rlim_max == RLIM_INFINITY ? needed : std::min(needed, limit.rlim_max);
        REQUIRE(::setrlimit(RLIMIT_NOFILE, &raised) == 0);
    }
    const std::size_t fds_before = open_fd_count();
    const std::size_t threads_before = quiet_thread_count();
    NetWorld world;
    const Stopwatch watch;
    anyio::run(
        anyio::fail_after(60s + std::chrono::seconds(connections / 200), [&]() -> anyio::Task<> {
            const bool ipv6 = has_ipv6_loopback();
            anyio::TcpListener listener =
                co_await anyio::create_tcp_listener({.local_host = ipv6 ? "" : "127.0.0.1"});  // "": both families
            world.port = listener.local_port();
            world.hosts = {"127.0.0.1", "localhost"};  // "localhost": getaddrinfo on a worker, Happy Eyeballs
            if (ipv6) world.hosts.emplace_back("::1");
            anyio::CancelScope serving;
            co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
                tg.start_soon([&]() -> anyio::Task<> {
                    auto serve_one = [&world](anyio::SocketStream stream) { return handler(world, std::move(stream)); };
                    (void)co_await serving.run(listener.serve(serve_one));
                });
                co_await anyio::task_group([&](anyio::TaskGroup& clients) -> anyio::Task<> {
                    std::mt19937_64 rng(0x7cb);
                    for (std::int64_t id = 0; id < connections; ++id) {
                        const char script = scripts[rng() % scripts.size()];
                        // One in eight through "localhost"; the others by address.
                        const std::string& host = rng() % 8 == 0 ? world.hosts[1]
                                                  : world.hosts.size() > 2 && rng() % 2 == 0 ? world.hosts[2]
                                                                                            : world.hosts[0];
                        clients.start_soon(client, std::ref(world), id, script, host);
                    }
                    co_return;
                });
                // Every connection a client made reaches a handler, and every handler ends.
                const auto until = anyio::current_time() + 10s;
                while (!caught_up(world) && anyio::current_time() < until) co_await anyio::sleep(1ms);
                serving.cancel();
            });
        }()),
        {.thread_name = "net worker"});
    ::setrlimit(RLIMIT_NOFILE, &limit);
    const double elapsed = std::chrono::duration<double>(watch.elapsed()).count();
    WARN("net: " << world.clients_done << " connections (" << world.connected << " connected, "
                 << count_of(world.client_outcomes, "K: cancelled") << " cancelled connects, "
                 << count_of(world.client_outcomes, "R: ") + count_of(world.client_outcomes, "C: ")
                 << " resets, " << world.bytes_echoed << " bytes echoed) in " << elapsed << " s");

    std::string client_surprises;
    std::string server_surprises;
    CHECK(unexpected(world.client_outcomes, client_expected, client_surprises) == 0);
    INFO("client outcomes no script allows:" << client_surprises);
    CHECK(client_surprises.empty());
    CHECK(unexpected(world.server_outcomes, server_expected, server_surprises) == 0);
    INFO("server outcomes no script allows:" << server_surprises);
    CHECK(server_surprises.empty());
    CHECK(world.clients_done == connections);
    // Every connection a client made was accepted and handled exactly once: each script's
    // connections reached the server's part of that script.
    CHECK(caught_up(world));
    CHECK(world.handled == world.accepted);
    for (char script : std::string_view("ERCWSX")) {
        INFO("script " << script);
        CHECK(count_of(world.server_outcomes, std::string(1, script) + ":") ==
              count_of(world.client_outcomes, std::string(1, script) + ":"));
    }
    CHECK(count_of(world.server_outcomes, "?:") >= count_of(world.client_outcomes, "K: connected"));
    // The scripts really happened.
    CHECK(count_of(world.client_outcomes, "K: cancelled") > 0);
    CHECK(count_of(world.client_outcomes, "X: cut") > 0);
    CHECK(count_of(world.client_outcomes, "R: BrokenResourceError") > 0);
    // Nothing leaked: every socket, the listener and the loop's own descriptors are closed,
    // and the resolver's worker threads are gone.
    CHECK(open_fd_count() == fds_before);
    CHECK(eventually_true([&] { return threads_named("net worker") == 0 && thread_count() == threads_before; }));
}
