// http_server: the seeds' scenario as a program. uvicorn's loop parses requests, Starlette's
// request_response runs `async def` handlers on the loop and plain `def` ones through
// anyio's 40-token thread limiter; here the same, on anyio-cpp (see app.hpp for the routes,
// server.hpp for connections and shutdown, router.hpp for the handler kinds).
//
//   http_server [--host 127.0.0.1] [--port 8000] [--tokens N] [--loops N]
//               [--graceful-timeout 10] [--keep-alive-timeout 5] [--limit-concurrency N]
//               [--max-body BYTES] [--files DIR]
//   http_server --self-test        serve on a free port, query itself, print a summary
//
// Once listening it prints `listening on http://HOST:PORT ...` on stdout (--port 0 picks a
// free port). SIGINT or SIGTERM starts a graceful shutdown (stop accepting, finish what is in
// flight for at most --graceful-timeout seconds, cancel the rest, exit 0); a second SIGINT
// during it exits at once with status 1. Exit status 2: bad command line; 1: cannot listen.
//
// --loops N runs N event loops on N threads, each with its own SO_REUSEPORT listener on the
// same port, its own default limiter (--tokens each) and worker pool: uvicorn's --workers, in
// one process. --limit-concurrency counts requests in flight over all loops.
#include <anyio/anyio.hpp>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <unistd.h>

#include "app.hpp"
#include "http.hpp"
#include "router.hpp"
#include "server.hpp"

using namespace std::chrono_literals;

namespace {

// Sanitizers make the loop several times slower (ThreadSanitizer above all, when the pool
// starts its threads): the self-test's latency bound is widened for such builds.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr bool sanitized_build = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
constexpr bool sanitized_build = true;
#else
constexpr bool sanitized_build = false;
#endif
#else
constexpr bool sanitized_build = false;
#endif

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

struct Config {
    std::string host = "127.0.0.1";
    std::uint16_t port = 8000;
    std::optional<std::int64_t> tokens;
    std::size_t loops = 1;
    std::chrono::steady_clock::duration graceful_timeout = 10s;
    std::chrono::steady_clock::duration keep_alive_timeout = 5s;
    std::int64_t limit_concurrency = 0;
    std::size_t max_body = 1024 * 1024;
    std::filesystem::path files;
    bool self_test = false;
};

constexpr const char* usage_text =
    "usage: http_server [--host ADDR] [--port N] [--tokens N] [--loops N]\n"
    "                   [--graceful-timeout SECONDS] [--keep-alive-timeout SECONDS]\n"
    "                   [--limit-concurrency N] [--max-body BYTES] [--files DIR]\n"
    "       http_server --self-test\n"
    "  --host ADDR               interface to listen on (default 127.0.0.1)\n"
    "  --port N                  port (default 8000; 0: any free port, printed)\n"
    "  --tokens N                total tokens of each loop's default thread limiter (40)\n"
    "  --loops N                 event loops (threads), each with a SO_REUSEPORT listener (1)\n"
    "  --graceful-timeout S      on SIGINT/SIGTERM, how long requests in flight may finish (10)\n"
    "  --keep-alive-timeout S    close connections silent this long between requests (5)\n"
    "  --limit-concurrency N     answer 503 beyond N requests in flight (0: no limit)\n"
    "  --max-body BYTES          largest request body, else 413 (1048576)\n"
    "  --files DIR               the directory GET /file?path=NAME serves from\n"
    "  --self-test               serve on a free port, query itself, print a summary\n";

[[noreturn]] void usage_error(const std::string& message) {
    std::fprintf(stderr, "http_server: %s\n%s", message.c_str(), usage_text);
    std::exit(2);
}

template <class Integer>
Integer parse_integer(std::string_view option, std::string_view text, Integer min, Integer max) {
    Integer value{};
    auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size() || value < min || value > max) {
        usage_error(std::string(option) + " wants an integer from " + std::to_string(min) + " to " +
                    std::to_string(max) + ", not '" + std::string(text) + "'");
    }
    return value;
}

std::chrono::steady_clock::duration parse_seconds(std::string_view option, std::string_view text) {
    char* end = nullptr;
    std::string copy(text);
    errno = 0;
    double seconds = std::strtod(copy.c_str(), &end);
    if (copy.empty() || end != copy.c_str() + copy.size() || errno != 0 || !(seconds >= 0) || seconds > 1e6) {
        usage_error(std::string(option) + " wants a number of seconds (0 to 1e6), not '" + copy + "'");
    }
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
}

Config parse_command_line(int argc, char** argv) {
    Config config;
    std::vector<std::string_view> args(argv + 1, argv + argc);
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string_view arg = args[i];
        std::string_view value;
        bool has_inline_value = false;
        if (std::size_t equals = arg.find('='); arg.starts_with("--") && equals != std::string_view::npos) {
            value = arg.substr(equals + 1);
            arg = arg.substr(0, equals);
            has_inline_value = true;
        }
        auto next = [&]() -> std::string_view {
            if (has_inline_value) return value;
            if (i + 1 >= args.size()) usage_error(std::string(arg) + " needs a value");
            return args[++i];
        };
        if (arg == "--help" || arg == "-h") {
            std::fputs(usage_text, stdout);
            std::exit(0);
        } else if (arg == "--self-test") {
            config.self_test = true;
        } else if (arg == "--host") {
            config.host = std::string(next());
        } else if (arg == "--port") {
            config.port = parse_integer<std::uint16_t>(arg, next(), 0, 65535);
        } else if (arg == "--tokens") {
            config.tokens = parse_integer<std::int64_t>(arg, next(), 0, 1'000'000);
        } else if (arg == "--loops") {
            config.loops = parse_integer<std::size_t>(arg, next(), 1, 256);
        } else if (arg == "--graceful-timeout") {
            config.graceful_timeout = parse_seconds(arg, next());
        } else if (arg == "--keep-alive-timeout") {
            config.keep_alive_timeout = parse_seconds(arg, next());
        } else if (arg == "--limit-concurrency") {
            config.limit_concurrency = parse_integer<std::int64_t>(arg, next(), 0, 1'000'000'000);
        } else if (arg == "--max-body") {
            config.max_body = parse_integer<std::size_t>(arg, next(), 0, std::size_t{1} << 32);
        } else if (arg == "--files") {
            config.files = std::string(next());
        } else {
            usage_error("unknown option '" + std::string(arg) + "'");
        }
    }
    return config;
}

/// "127.0.0.1", or "[::1]" for an IPv6 address.
std::string url_host(const std::string& host) { return host.find(':') != std::string::npos ? "[" + host + "]" : host; }

// ---------------------------------------------------------------------------------------------
// What the loops share
// ---------------------------------------------------------------------------------------------

/// One secondary loop (--loops > 1), as the primary loop sees it.
struct LoopSlot {
    std::size_t index = 0;
    // Written by the slot's thread before it posts "ready" to the primary loop, read by the
    // primary loop after that post ran: call_soon_threadsafe orders the two.
    anyio::LoopToken token;
    http::Server* server = nullptr;
};

/// The primary loop's view of the secondary loops: they report through
/// call_soon_threadsafe, so these fields are only touched on the primary loop thread.
struct Secondaries {
    std::size_t count = 0;
    std::size_t settled = 0;  // ready or failed before ready
    std::size_t done = 0;
    std::vector<bool> ready;
    std::string first_error;
    anyio::Event all_settled;
    anyio::Event all_done;

    void on_ready(std::size_t index) {
        ready[index] = true;
        if (++settled == count) all_settled.set();
    }
    void on_done(std::size_t index, const std::string& error) {
        if (!error.empty() && first_error.empty()) first_error = error;
        if (!ready[index] && ++settled == count) all_settled.set();
        if (++done == count) all_done.set();
    }
};

struct Shared {
    explicit Shared(const Config& c) : config(c) {}
    const Config& config;
    app::Options app_options;
    std::optional<http::Router> router;
    std::atomic<std::int64_t> in_flight{0};  // --limit-concurrency over all loops
    std::uint16_t port = 0;                  // the primary's, before the secondaries start
    anyio::LoopToken primary;
    std::vector<std::unique_ptr<LoopSlot>> slots;  // index 0 unused (the primary)
    Secondaries* secondaries = nullptr;

    [[nodiscard]] http::ServerOptions server_options(std::size_t loop_index) {
        http::ServerOptions options;
        options.limits.max_body_bytes = config.max_body;
        options.keep_alive_timeout = config.keep_alive_timeout;
        options.graceful_timeout = config.graceful_timeout;
        options.limit_concurrency = config.limit_concurrency;
        options.shared_in_flight = &in_flight;
        options.loop_index = loop_index;
        return options;
    }
};

void apply_tokens(const Config& config) {
    if (config.tokens) anyio::to_thread::current_default_thread_limiter().set_total_tokens(*config.tokens);
}

// ---------------------------------------------------------------------------------------------
// Secondary loops
// ---------------------------------------------------------------------------------------------

anyio::Task<void> secondary_main(Shared& shared, LoopSlot& slot) {
    apply_tokens(shared.config);
    http::Server server(*shared.router, shared.server_options(slot.index));
    anyio::TcpListener listener = co_await anyio::create_tcp_listener(
        {.local_host = shared.config.host, .local_port = shared.port, .reuse_port = true});
    slot.token = anyio::lowlevel::current_token();
    slot.server = &server;
    Secondaries* secondaries = shared.secondaries;
    const std::size_t index = slot.index;
    shared.primary.call_soon_threadsafe([secondaries, index] { secondaries->on_ready(index); });
    co_await server.serve(listener);
}

void secondary_thread(Shared& shared, LoopSlot& slot) {
    std::string error;
    try {
        anyio::run(secondary_main(shared, slot));
    } catch (const std::exception& e) {
        error = "loop " + std::to_string(slot.index) + ": " + e.what();
    } catch (...) {
        error = "loop " + std::to_string(slot.index) + " failed";
    }
    try {
        Secondaries* secondaries = shared.secondaries;
        const std::size_t index = slot.index;
        shared.primary.call_soon_threadsafe([secondaries, index, error] { secondaries->on_done(index, error); });
    } catch (const anyio::RunFinishedError&) {
        // the primary loop is gone (it only finishes after every secondary reported)
    }
}

/// Asks every secondary loop that is serving to shut down.
void shutdown_secondaries(Shared& shared) {
    for (std::size_t i = 1; i < shared.slots.size(); ++i) {
        if (!shared.secondaries->ready[i]) continue;
        http::Server* server = shared.slots[i]->server;
        try {
            shared.slots[i]->token.call_soon_threadsafe([server] { server->shutdown(); });
        } catch (const anyio::RunFinishedError&) {
            // that loop has already ended
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The primary loop: signals, the first listener, the secondary threads
// ---------------------------------------------------------------------------------------------

const char* signal_name(int signal_number) { return signal_number == SIGINT ? "SIGINT" : "SIGTERM"; }

anyio::Task<void> watch_signals(anyio::SignalReceiver& signals, http::Server& server, Shared& shared) {
    const int first = co_await signals.receive();
    const http::ServerStatistics stats = server.statistics();
    std::printf("received %s: shutting down; finishing %lld request(s) in flight on loop 0 (at most %.3g s); "
                "press Ctrl+C again to exit at once\n",
                signal_name(first), static_cast<long long>(stats.requests_in_flight),
                std::chrono::duration<double>(shared.config.graceful_timeout).count());
    std::fflush(stdout);
    server.shutdown();
    shutdown_secondaries(shared);
    for (;;) {
        const int again = co_await signals.receive();
        if (again == SIGINT) {
            // uvicorn's force_exit: do not wait for anything (a plain handler may be blocked in
            // a worker thread, and joining it could take arbitrarily long).
            std::fprintf(stderr, "http_server: received SIGINT again: exiting now, %lld request(s) unanswered\n",
                         static_cast<long long>(server.statistics().requests_in_flight));
            std::fflush(stdout);
            std::fflush(stderr);
            std::_Exit(1);
        }
        std::printf("received %s again: already shutting down (SIGINT exits at once)\n", signal_name(again));
        std::fflush(stdout);
    }
}

anyio::Task<int> primary_main(Shared& shared, std::vector<std::thread>& threads) {
    const Config& config = shared.config;
    // First: the loop thread blocks SIGINT/SIGTERM here, and the threads started below
    // inherit that mask, so the signals always come to this receiver.
    anyio::SignalReceiver signals = anyio::open_signal_receiver({SIGINT, SIGTERM});
    apply_tokens(config);
    http::Server server(*shared.router, shared.server_options(0));
    anyio::TcpListener listener = co_await anyio::create_tcp_listener(
        {.local_host = config.host, .local_port = config.port, .reuse_port = config.loops > 1});
    shared.port = listener.local_port();
    shared.primary = anyio::lowlevel::current_token();

    Secondaries secondaries;
    secondaries.count = config.loops - 1;
    secondaries.ready.assign(config.loops, false);
    shared.secondaries = &secondaries;
    for (std::size_t i = 1; i < config.loops; ++i) {
        shared.slots[i]->index = i;
        threads.emplace_back(secondary_thread, std::ref(shared), std::ref(*shared.slots[i]));
    }
    if (secondaries.count > 0) co_await secondaries.all_settled.wait();
    if (!secondaries.first_error.empty()) {
        std::fprintf(stderr, "http_server: cannot start: %s\n", secondaries.first_error.c_str());
        shutdown_secondaries(shared);
        server.shutdown();
        co_await server.serve(listener);
        co_await secondaries.all_done.wait();
        co_return 1;
    }

    std::printf("listening on http://%s:%u (%zu loop%s, %lld thread tokens per loop, pid %d)\n",
                url_host(config.host).c_str(), static_cast<unsigned>(shared.port), config.loops,
                config.loops == 1 ? "" : "s",
                static_cast<long long>(anyio::to_thread::current_default_thread_limiter().total_tokens()),
                static_cast<int>(::getpid()));
    std::fflush(stdout);

    co_await anyio::task_group([&](anyio::TaskGroup& group) -> anyio::Task<void> {
        group.start_soon(watch_signals, std::ref(signals), std::ref(server), std::ref(shared));
        co_await server.serve(listener);
        if (secondaries.count > 0) co_await secondaries.all_done.wait();
        group.cancel_scope().cancel();  // the signal watcher
    });
    if (!secondaries.first_error.empty()) {
        std::fprintf(stderr, "http_server: %s\n", secondaries.first_error.c_str());
        co_return 1;
    }
    std::printf("stopped: %llu request(s) answered on loop 0\n",
                static_cast<unsigned long long>(server.statistics().requests_total));
    std::fflush(stdout);
    co_return 0;
}

int run_server(const Config& config) {
    Shared shared(config);
    shared.app_options.max_ms = 60'000;
    if (!config.files.empty()) {
        try {
            shared.app_options.file_root = app::canonical_root(config.files);
        } catch (const std::exception& error) {
            usage_error(std::string("--files: ") + error.what());
        }
    }
    shared.router.emplace(app::make_router(shared.app_options));
    for (std::size_t i = 0; i < config.loops; ++i) shared.slots.push_back(std::make_unique<LoopSlot>());

    std::vector<std::thread> threads;
    int status = 1;
    try {
        status = anyio::run(primary_main(shared, threads));
    } catch (const std::exception& error) {
        std::fprintf(stderr, "http_server: %s\n", error.what());
    }
    // Each secondary reported "done" just before its thread returns.
    for (std::thread& thread : threads) thread.join();
    return status;
}

// ---------------------------------------------------------------------------------------------
// --self-test: serve on a free port and check the answers with a client on the same loop
// ---------------------------------------------------------------------------------------------

struct Reply {
    int status = 0;
    std::string body;
    bool connection_close = false;
};

/// Sends `request` (raw bytes, any number of pipelined requests) on a new connection and
/// reads `expected` answers (`head`: the answers have no body).
anyio::Task<std::vector<Reply>> exchange(std::uint16_t port, std::string_view request, std::size_t expected,
                                         bool head = false) {
    anyio::SocketStream stream = co_await anyio::connect_tcp("127.0.0.1", port);
    co_await stream.send(request);
    http::ResponseParser parser;
    parser.set_head_request(head);
    std::vector<Reply> replies;
    std::vector<char> buffer(16 * 1024);
    while (replies.size() < expected) {
        std::size_t got = 0;
        try {
            got = co_await stream.receive_into(std::as_writable_bytes(std::span(buffer)));
        } catch (const anyio::EndOfStream&) {
            break;
        }
        std::string_view input(buffer.data(), got);
        while (!input.empty()) {
            http::ResponseParser::Outcome outcome = parser.feed(input);
            input.remove_prefix(outcome.consumed);
            if (outcome.event == http::ResponseParser::Event::error) {
                throw std::runtime_error(std::string("malformed answer: ") + parser.error_description());
            }
            if (outcome.event != http::ResponseParser::Event::complete) break;
            replies.push_back({parser.message().status, parser.message().body, parser.message().connection_close});
            parser.resume();
        }
    }
    co_return replies;
}

struct SelfTest {
    int checks = 0;
    int failures = 0;

    void check(bool ok, const std::string& what) {
        ++checks;
        if (!ok) ++failures;
        std::printf("  %s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
        std::fflush(stdout);
    }
    void expect(const std::vector<Reply>& replies, std::size_t index, int status, std::string_view body,
                const std::string& what) {
        const bool ok = index < replies.size() && replies[index].status == status &&
                        (body.empty() || replies[index].body == body);
        std::string got = index < replies.size()
                              ? std::to_string(replies[index].status) + " " + replies[index].body.substr(0, 60)
                              : std::string("no answer");
        check(ok, what + " -> " + got);
    }
};

anyio::Task<void> run_checks(std::uint16_t port, SelfTest& t) {
    constexpr std::string_view ok = R"({"ok":true})";
    std::vector<Reply> r = co_await exchange(port, "GET /async HTTP/1.1\r\nHost: self\r\n\r\n", 1);
    t.expect(r, 0, 200, ok, "GET /async (an async handler, on the loop)");
    r = co_await exchange(port, "GET /sync?ms=5 HTTP/1.1\r\nHost: self\r\n\r\n", 1);
    t.expect(r, 0, 200, ok, "GET /sync?ms=5 (a plain handler, on a worker thread)");
    r = co_await exchange(port, "GET /sleep?ms=5 HTTP/1.1\r\nHost: self\r\n\r\n", 1);
    t.expect(r, 0, 200, ok, "GET /sleep?ms=5 (awaits anyio::sleep)");
    r = co_await exchange(port, "GET /stats HTTP/1.1\r\nHost: self\r\n\r\n", 1);
    t.check(!r.empty() && r[0].status == 200 && r[0].body.find("\"total_tokens\":40") != std::string::npos,
            "GET /stats reports the default limiter's 40 tokens -> " + (r.empty() ? std::string("no answer") : r[0].body.substr(0, 60) + "..."));
    r = co_await exchange(port, "GET /nope HTTP/1.1\r\nHost: self\r\n\r\n", 1);
    t.expect(r, 0, 404, "", "GET /nope");
    r = co_await exchange(port, "POST /async HTTP/1.1\r\nHost: self\r\nContent-Length: 0\r\n\r\n", 1);
    t.expect(r, 0, 405, "", "POST /async");
    r = co_await exchange(port, "HEAD /async HTTP/1.1\r\nHost: self\r\n\r\n", 1, true);
    t.expect(r, 0, 200, "", "HEAD /async (no body)");
    r = co_await exchange(port, "BREW /pot HTCPCP/1.0\r\n\r\n", 1);
    t.expect(r, 0, 400, "", "a malformed request");
    r = co_await exchange(port,
                          "POST /echo HTTP/1.1\r\nHost: self\r\nTransfer-Encoding: chunked\r\n\r\n"
                          "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                          1);
    t.expect(r, 0, 200, "hello world", "POST /echo with a chunked body");
    r = co_await exchange(port,
                          "GET /async HTTP/1.1\r\nHost: self\r\n\r\n"
                          "GET /nope HTTP/1.1\r\nHost: self\r\n\r\n"
                          "GET /async HTTP/1.1\r\nHost: self\r\nConnection: close\r\n\r\n",
                          3);
    t.check(r.size() == 3 && r[0].status == 200 && r[1].status == 404 && r[2].status == 200 && r[2].connection_close,
            "three pipelined requests on one connection -> " + std::to_string(r.size()) + " answers, in order");

    // The seeds' point: 80 blocking calls through 40 tokens take two rounds, and the loop
    // stays free meanwhile.
    constexpr int calls = 80;
    constexpr auto call_ms = 50ms;
    // Warm-up: 40 concurrent calls make the pool start its 40 threads first (it starts them on
    // the loop thread, which is slow under ThreadSanitizer), so that the timed part below
    // measures the steady state.
    co_await anyio::task_group([&](anyio::TaskGroup& group) -> anyio::Task<void> {
        for (int i = 0; i < 40; ++i) {
            group.start_soon([&]() -> anyio::Task<void> {
                std::vector<Reply> replies = co_await exchange(port, "GET /sync?ms=20 HTTP/1.1\r\nHost: self\r\n\r\n", 1);
                (void)replies;  // only the threads matter here
            });
        }
        co_return;  // (a coroutine: the group waits for the children)
    });
    int answered = 0;
    double async_worst_ms = 0;
    const auto started = std::chrono::steady_clock::now();
    co_await anyio::task_group([&](anyio::TaskGroup& group) -> anyio::Task<void> {
        for (int i = 0; i < calls; ++i) {
            group.start_soon([&]() -> anyio::Task<void> {
                std::vector<Reply> replies = co_await exchange(port, "GET /sync?ms=50 HTTP/1.1\r\nHost: self\r\n\r\n", 1);
                if (!replies.empty() && replies[0].status == 200) ++answered;
            });
        }
        co_await anyio::sleep(10ms);
        for (int i = 0; i < 5; ++i) {
            const auto sent = std::chrono::steady_clock::now();
            std::vector<Reply> replies = co_await exchange(port, "GET /async HTTP/1.1\r\nHost: self\r\n\r\n", 1);
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - sent).count();
            if (replies.empty() || replies[0].status != 200) async_worst_ms = 1e9;
            async_worst_ms = std::max(async_worst_ms, ms);
            co_await anyio::sleep(10ms);
        }
    });
    const double elapsed_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    const double rounds = static_cast<double>(calls) / 40.0;
    char line[256];
    std::snprintf(line, sizeof line, "%d concurrent GET /sync?ms=50 through 40 tokens: %d answered in %.0f ms (>= %.0f ms: %.0f rounds)",
                  calls, answered, elapsed_ms, rounds * 50, rounds);
    t.check(answered == calls && elapsed_ms >= rounds * std::chrono::duration<double, std::milli>(call_ms).count() * 0.95, line);
    const double async_bound_ms = sanitized_build ? 1000 : 50;
    std::snprintf(line, sizeof line, "meanwhile GET /async answered in at most %.1f ms (bound %.0f ms)", async_worst_ms,
                  async_bound_ms);
    t.check(async_worst_ms < async_bound_ms, line);
}

anyio::Task<int> self_test_main() {
    app::Options options;
    options.max_ms = 1000;
    const http::Router router = app::make_router(options);
    http::ServerOptions server_options;
    server_options.keep_alive_timeout = 2s;
    http::Server server(router, server_options);
    anyio::TcpListener listener = co_await anyio::create_tcp_listener({.local_host = "127.0.0.1"});
    const std::uint16_t port = listener.local_port();
    std::printf("self-test: serving on http://127.0.0.1:%u, querying it:\n", static_cast<unsigned>(port));
    std::fflush(stdout);
    SelfTest t;
    const auto started = std::chrono::steady_clock::now();
    co_await anyio::task_group([&](anyio::TaskGroup& group) -> anyio::Task<void> {
        group.start_soon(server.serve(listener));
        try {
            co_await run_checks(port, t);
        } catch (const std::exception& error) {
            t.check(false, std::string("the checks stopped: ") + error.what());
        }
        server.shutdown();
    });
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    const anyio::WorkerPoolStatistics pool = anyio::to_thread::statistics();
    std::printf("self-test %s: %d of %d checks passed, %llu requests answered in %.2f s; "
                "%llu worker threads created for %llu offloaded calls\n",
                t.failures == 0 ? "passed" : "FAILED", t.checks - t.failures, t.checks,
                static_cast<unsigned long long>(server.statistics().requests_total), elapsed,
                static_cast<unsigned long long>(pool.threads_created),
                static_cast<unsigned long long>(pool.jobs_completed));
    co_return t.failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    const Config config = parse_command_line(argc, argv);
    if (config.self_test) {
        try {
            return anyio::run(self_test_main());
        } catch (const std::exception& error) {
            std::fprintf(stderr, "http_server: self-test: %s\n", error.what());
            return 1;
        }
    }
    return run_server(config);
}
