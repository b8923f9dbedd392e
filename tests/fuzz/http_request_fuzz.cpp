// http_request_fuzz: a libFuzzer target that feeds arbitrary bytes to the example HTTP
// server's request handling (examples/http_server: http-parser, the router, the limits, the
// app's routes) over a socketpair, and checks that the server answers or closes: never
// crashes, never hangs, never resets the connection, never answers what it was not asked.
//
// How to run it
// -------------
//   tests/fuzz/run.sh [seconds]        # every target, clang++ + ASan + UBSan + libFuzzer
//   ANYIO_FUZZ_TARGETS=http_request_fuzz tests/fuzz/run.sh 60
//   build-fuzz/tests/fuzz/http_request_fuzz crash-<hash>      # replay one input
//   HTTP_REQUEST_FUZZ_TRACE=1 build-fuzz/tests/fuzz/http_request_fuzz crash-<hash>
// Needs http-parser (Debian: libhttp-parser-dev), as the example does; without it the
// target is skipped (tests/fuzz/CMakeLists.txt). With g++ the same source gets a small main()
// that replays the files named on its command line (ANYIO_FUZZ_STANDALONE_MAIN).
//
// Input format
// ------------
// Byte 0 says how the client writes the rest: 0 all at once; n > 0 in pieces of n bytes with
// a loop turn between pieces (so the server sees a request cut anywhere, across reads). The
// rest is what the client sends on its end of the socketpair, followed by EOF (shutdown of its
// sending side). Seeds are plain requests behind one such byte (tests/fuzz/corpus/
// http_request_fuzz/).
//
// The server is http::Server::serve_connection() with app::make_router() (every route of the
// example: /async, /sync on a worker thread, /sleep, /stats, /file over a small temporary
// directory, /blocking-in-async, /echo, /) and limits small enough for fuzz inputs to reach
// (1 KiB of header section, 512 bytes of body, ms=N at most 1).
//
// Checked for every input
// -----------------------
// An independent replay of the input through a second RequestParser (fed the whole input at
// once, as the server's loop would handle it: stop after an error, after a request that does
// not keep the connection, or when the bytes run out) predicts the answers: one "100
// Continue" per Expect: 100-continue that reaches its body, one final answer per complete
// request (HEAD: no body), and the error's status (400/413/431) for a refused request. Then:
// - the server's bytes parse as exactly those answers, in that order, with nothing after
//   them; each error answer has the predicted status and "connection: close"; the last
//   answer says "connection: close" exactly when the replay says the connection ends after
//   it; no answer is a 500 (a handler threw) or a 503;
// - the server closes the connection (the client reads EOF, not a reset) and its task ends
//   within 5 s of the last byte sent (a hang fails the input: "HANG");
// - the server logs nothing (it logs only handler failures and unexpected errors);
// - the loop returns (no task left), every worker thread is joined, and LeakSanitizer (on
//   under run.sh) reports nothing.
// A failed check prints "HTTP FUZZ MISMATCH: ..." and aborts, so libFuzzer keeps the input.

#include <anyio/anyio.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "app.hpp"
#include "http.hpp"
#include "router.hpp"
#include "server.hpp"

#if defined(ANYIO_FUZZ_STANDALONE_MAIN)
#include <iterator>
#endif

using namespace std::chrono_literals;

namespace {

bool trace_enabled = false;

void trace(const char* format, const std::string& text) {
    if (trace_enabled) std::fprintf(stderr, format, text.c_str());
}

std::string printable(std::string_view bytes, std::size_t max = 200) {
    std::string out;
    for (char c : bytes.substr(0, max)) {
        auto byte = static_cast<unsigned char>(c);
        if (c == '\r') out += "\\r";
        else if (c == '\n') out += "\\n";
        else if (byte < 0x20 || byte >= 0x7f) {
            char hex[8];
            std::snprintf(hex, sizeof hex, "\\x%02x", byte);
            out += hex;
        } else out += c;
    }
    if (bytes.size() > max) out += "...";
    return out;
}

[[noreturn]] void fail(const std::string& what, std::string_view input, std::string_view output) {
    std::fprintf(stderr, "HTTP FUZZ MISMATCH: %s\n  input:  %s\n  output: %s\n", what.c_str(),
                 printable(input, 400).c_str(), printable(output, 400).c_str());
    std::fflush(stderr);
    std::abort();
}

// ---------------------------------------------------------------------------------------------
// The fixture shared by all inputs: limits, a router, a file directory
// ---------------------------------------------------------------------------------------------

http::Limits fuzz_limits() {
    http::Limits limits;
    limits.max_header_bytes = 1024;
    limits.max_body_bytes = 512;
    return limits;
}

std::filesystem::path file_root;

const http::Router& router() {
    static const http::Router instance = [] {
        app::Options options;
        options.file_root = file_root;
        options.max_ms = 1;  // /sync, /sleep, /blocking-in-async: at most 1 ms per request
        return app::make_router(options);
    }();
    return instance;
}

void make_file_root() {
    std::error_code error;
    std::filesystem::path base = std::filesystem::temp_directory_path(error);
    if (error) base = "/tmp";
    std::string pattern = (base / "anyio-http-fuzz-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) return;  // /file then answers 404: still fuzzed
    std::filesystem::path root(pattern);
    std::filesystem::create_directory(root / "sub", error);
    std::ofstream(root / "hello.txt") << "hello, file\n";
    std::ofstream(root / "sub" / "inner.txt") << "inner\n";
    std::ofstream(root / "big.bin") << std::string(100 * 1024, 'b');  // several 64 KiB chunks
    file_root = app::canonical_root(root);
    std::atexit([] {
        std::error_code ignored;
        std::filesystem::remove_all(file_root, ignored);
    });
}

// ---------------------------------------------------------------------------------------------
// The replay: which answers the input asks for
// ---------------------------------------------------------------------------------------------

struct Expected {
    int status = 0;          // 0: any final status; 100: the interim answer; else this status
    bool head = false;       // the answer to a HEAD request: no body follows its head
    bool closes = false;     // the connection ends after this answer
};

std::vector<Expected> replay(std::string_view input) {
    std::vector<Expected> answers;
    http::RequestParser parser(fuzz_limits());
    while (true) {
        const http::RequestParser::Outcome outcome = parser.feed(input);
        input.remove_prefix(outcome.consumed);
        switch (outcome.event) {
        case http::RequestParser::Event::need_more:
            return answers;  // the bytes ran out mid-request (or between requests): no answer
        case http::RequestParser::Event::error:
            answers.push_back({outcome.error_status, false, true});
            return answers;
        case http::RequestParser::Event::expect_continue:
            answers.push_back({100, false, false});
            parser.resume();
            continue;
        case http::RequestParser::Event::complete: {
            const http::Request& request = parser.request();
            const bool keep = request.keep_alive() && !parser.upgrade();
            answers.push_back({0, request.method_code() == HTTP_HEAD, !keep});
            if (!keep) return answers;
            parser.resume();
            continue;
        }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One exchange over a socketpair
// ---------------------------------------------------------------------------------------------

std::string logged;  // what the server logged during this input

struct Exchange {
    std::string output;      // every byte the server sent
    bool eof = false;        // the client read EOF
    std::string client_error;
    bool server_done = false;
};

anyio::Task<void> write_input(anyio::SocketStream& client, std::string_view input, std::size_t piece, Exchange& x) {
    try {
        while (!input.empty()) {
            const std::size_t n = piece == 0 ? input.size() : std::min(piece, input.size());
            co_await client.send(input.substr(0, n));
            input.remove_prefix(n);
            if (piece != 0) co_await anyio::checkpoint();
        }
        co_await client.send_eof();
    } catch (const anyio::BrokenResourceError& error) {
        x.client_error = std::string("the client's send failed: ") + error.what();
    }
}

anyio::Task<void> read_output(anyio::SocketStream& client, Exchange& x) {
    std::vector<std::byte> buffer(16 * 1024);
    try {
        for (;;) {
            const std::size_t got = co_await client.receive_into(buffer);
            x.output.append(reinterpret_cast<const char*>(buffer.data()), got);
        }
    } catch (const anyio::EndOfStream&) {
        x.eof = true;
    } catch (const anyio::BrokenResourceError& error) {
        x.client_error = std::string("the server reset the connection: ") + error.what();
    }
}

anyio::Task<void> serve(http::Server& server, anyio::SocketStream stream, Exchange& x) {
    co_await server.serve_connection(std::move(stream));
    x.server_done = true;
}

anyio::Task<void> exchange(std::string_view input, std::size_t piece, Exchange& x, bool& hung) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        throw std::system_error(errno, std::generic_category(), "socketpair");
    }
    anyio::SocketStream server_side = anyio::SocketStream::from_fd(fds[0]);
    anyio::SocketStream client = anyio::SocketStream::from_fd(fds[1]);

    http::ServerOptions options;
    options.limits = fuzz_limits();
    // Long enough never to decide an outcome: the client always ends with EOF, so the server
    // must close on its own well within the 5 s deadline below.
    options.keep_alive_timeout = 30s;
    options.linger_timeout = 30s;
    options.log = [](std::string_view message) {
        logged += message;
        logged += '\n';
    };
    http::Server server(router(), options);

    anyio::CancelScope deadline(anyio::current_time() + 5s);
    anyio::Task<void> body = anyio::task_group([&](anyio::TaskGroup& group) -> anyio::Task<void> {
        group.start_soon(serve(server, std::move(server_side), x));
        group.start_soon(read_output(client, x));
        co_await write_input(client, input, piece, x);
    });
    co_await deadline.run(std::move(body));
    hung = deadline.cancelled_caught();
}

void run_one(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return;
    const std::size_t piece = data[0];
    const std::string input(reinterpret_cast<const char*>(data + 1), size - 1);
    trace("input: %s\n", printable(input, 4000));
    const std::vector<Expected> expected = replay(input);

    logged.clear();
    Exchange x;
    bool hung = false;
    try {
        anyio::run(exchange(input, piece, x, hung));
    } catch (const std::exception& error) {
        fail(std::string("the exchange threw: ") + error.what(), input, x.output);
    }
    trace("output: %s\n", printable(x.output, 4000));

    if (hung) fail("HANG: the server did not close the connection within 5 s", input, x.output);
    if (!x.client_error.empty()) fail(x.client_error, input, x.output);
    if (!x.eof || !x.server_done) fail("the server did not close the connection", input, x.output);
    if (!logged.empty()) fail("the server logged: " + logged, input, x.output);

    // The answers, one by one, as the replay predicts them.
    http::ResponseParser parser;
    std::string_view rest = x.output;
    for (std::size_t i = 0; i < expected.size(); ++i) {
        const Expected& want = expected[i];
        const std::string which = "answer " + std::to_string(i + 1) + " of " + std::to_string(expected.size());
        parser.set_head_request(want.head);
        http::ResponseParser::Outcome outcome = parser.feed(rest);
        rest.remove_prefix(outcome.consumed);
        if (outcome.event == http::ResponseParser::Event::need_more && rest.empty()) outcome = parser.finish();
        if (outcome.event == http::ResponseParser::Event::error) {
            fail(which + " is malformed (" + parser.error_description() + ")", input, x.output);
        }
        if (outcome.event != http::ResponseParser::Event::complete) fail(which + " is missing or cut short", input, x.output);
        const http::ResponseParser::Message& got = parser.message();
        if (want.status != 0 && got.status != want.status) {
            fail(which + ": status " + std::to_string(got.status) + ", expected " + std::to_string(want.status), input,
                     x.output);
        }
        if (want.status == 0 && (got.status < 200 || got.status == 500 || got.status == 503)) {
            fail(which + ": status " + std::to_string(got.status), input, x.output);
        }
        if (want.status != 100 && got.connection_close != want.closes) {
            fail(which + (want.closes ? " does not say connection: close" : " says connection: close but the "
                                                                               "connection should stay open"),
                     input, x.output);
        }
        if (!want.head && want.status != 100 && got.content_length && *got.content_length != got.body.size()) {
            fail(which + ": its body does not match its content-length", input, x.output);
        }
        parser.resume();
    }
    if (!rest.empty()) fail("the server sent more than the predicted answers", input, x.output);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    trace_enabled = std::getenv("HTTP_REQUEST_FUZZ_TRACE") != nullptr;
    make_file_root();
    (void)router();
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    run_one(data, size);
    return 0;
}

#if defined(ANYIO_FUZZ_STANDALONE_MAIN)
// Without libFuzzer: replay every file named on the command line (directories: every file in
// them), as a regression run.
int main(int argc, char** argv) {
    LLVMFuzzerInitialize(&argc, &argv);
    std::vector<std::filesystem::path> files;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (!arg.empty() && arg[0] == '-') continue;  // libFuzzer flags, ignored
        std::filesystem::path path(arg);
        if (std::filesystem::is_directory(path)) {
            for (const auto& entry : std::filesystem::directory_iterator(path)) {
                if (entry.is_regular_file()) files.push_back(entry.path());
            }
        } else {
            files.push_back(path);
        }
    }
    for (const std::filesystem::path& file : files) {
        std::ifstream in(file, std::ios::binary);
        std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        std::printf("Running: %s\n", file.string().c_str());
        LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
        std::printf("Executed %s\n", file.string().c_str());
    }
    std::printf("http_request_fuzz: %zu inputs replayed, no mismatch\n", files.size());
    return 0;
}
#endif
