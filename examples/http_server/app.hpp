// The example's routes: the seeds' scenario (BENCH.md's /async, /sync and /stats) plus a few
// that show the rest of the library at work.
//
//   GET  /                        this list (text)
//   GET  /async                   {"ok":true}, answered on the loop (Starlette's async def)
//   GET  /sync?ms=N               a plain handler that sleeps N ms, run on a worker thread
//                                 through the default 40-token limiter (run_in_threadpool)
//   GET  /sleep?ms=N              an async handler that awaits anyio::sleep: no thread held
//   GET  /stats                   the default limiter, the worker pool and this server, JSON
//   GET  /file?path=P             streams file P under the --files directory through
//                                 anyio::open_file (reads on worker threads)
//   GET  /blocking-in-async?ms=N  an async handler that blocks the loop on purpose: every
//                                 other request waits meanwhile (the mistake the blocked-loop
//                                 detector exists to name; see the route's comment)
//   POST /echo                    answers the request body (Content-Length or chunked)
#pragma once

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include <anyio/capacity_limiter.hpp>
#include <anyio/event.hpp>
#include <anyio/file.hpp>
#include <anyio/to_thread.hpp>

#include "http.hpp"
#include "router.hpp"
#include "server.hpp"

namespace app {

struct Options {
    /// The directory /file serves from (canonical; see canonical_root()); empty: /file is 404.
    std::filesystem::path file_root;
    /// The largest ms= that /sync, /sleep and /blocking-in-async accept.
    std::int64_t max_ms = 60'000;
};

/// `path` made absolute and free of symbolic links, or a std::filesystem_error (at startup).
inline std::filesystem::path canonical_root(const std::filesystem::path& path) {
    std::filesystem::path root = std::filesystem::canonical(path);
    if (!std::filesystem::is_directory(root)) {
        throw std::filesystem::filesystem_error("--files wants a directory", root,
                                                std::make_error_code(std::errc::not_a_directory));
    }
    return root;
}

namespace detail {

inline const char* const ok_body = R"({"ok":true})";

/// ms=N of the query: 0 when absent; nothing when malformed or out of [0, max].
inline std::optional<std::int64_t> milliseconds(const http::Request& request, std::int64_t max) {
    std::optional<std::string_view> text = request.raw_query_param("ms");
    if (!text) return 0;
    std::int64_t value = 0;
    auto [end, error] = std::from_chars(text->data(), text->data() + text->size(), value);
    if (error != std::errc() || end != text->data() + text->size() || value < 0 || value > max) return std::nullopt;
    return value;
}

inline http::Response bad_ms(std::int64_t max) {
    return http::Response::error(400, "ms must be an integer from 0 to " + std::to_string(max));
}

/// A file found under the root: its canonical path and size.
struct FoundFile {
    std::filesystem::path path;
    std::uint64_t size = 0;
    bool found = false;
};

/// A relative path without "..", "." tricks, NUL or a leading '/': checked on the loop before
/// any file system call.
inline bool plausible_relative_path(std::string_view name) {
    if (name.empty() || name.front() == '/' || name.find('\0') != std::string_view::npos) return false;
    std::size_t start = 0;
    while (start <= name.size()) {
        std::size_t slash = name.find('/', start);
        std::string_view part = name.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
        if (part == "..") return false;
        if (slash == std::string_view::npos) break;
        start = slash + 1;
    }
    return true;
}

/// Blocking (run on a worker): resolves `name` under `root` following symbolic links, and
/// accepts it only if the result is a regular file still inside `root`.
inline FoundFile find_under(const std::filesystem::path& root, const std::string& name) {
    std::error_code error;
    std::filesystem::path candidate = std::filesystem::canonical(root / name, error);
    if (error) return {};
    auto [root_end, rest] = std::mismatch(root.begin(), root.end(), candidate.begin(), candidate.end());
    (void)rest;
    if (root_end != root.end()) return {};  // a link led outside the root
    if (!std::filesystem::is_regular_file(candidate, error) || error) return {};
    std::uint64_t size = std::filesystem::file_size(candidate, error);
    if (error) return {};
    return {std::move(candidate), size, true};
}

inline std::string_view content_type_for(const std::filesystem::path& path) {
    const std::string extension = path.extension().string();
    if (extension == ".txt" || extension == ".md") return "text/plain; charset=utf-8";
    if (extension == ".html" || extension == ".htm") return "text/html; charset=utf-8";
    if (extension == ".json") return "application/json";
    if (extension == ".css") return "text/css";
    if (extension == ".js") return "text/javascript";
    if (extension == ".png") return "image/png";
    if (extension == ".jpg" || extension == ".jpeg") return "image/jpeg";
    return "application/octet-stream";
}

/// Streams an open file: each chunk is read on a worker straight into the connection's
/// buffer, then sent; the file is closed at the end (or by its destructor, off the loop, if
/// the client went away).
class FileSource final : public http::BodySource {
public:
    explicit FileSource(anyio::AsyncFile file) : file_(std::move(file)) {}
    anyio::Task<void> write_to(http::BodyWriter& writer) override {
        while (writer.remaining() > 0) {
            std::span<std::byte> buffer = writer.scratch();
            std::size_t got = co_await file_.read_into(buffer);
            if (got == 0) break;  // shorter than announced: the server closes the connection
            co_await writer.write(std::string_view(reinterpret_cast<const char*>(buffer.data()), got));
        }
        co_await file_.aclose();
    }

private:
    anyio::AsyncFile file_;
};

inline anyio::Task<http::Response> serve_file(http::Request& request, const std::filesystem::path& root) {
    if (root.empty()) {
        co_return http::Response::error(404, "no file directory: start the server with --files DIR");
    }
    std::optional<std::string> name = request.query_param("path");
    if (!name) co_return http::Response::error(400, "path=NAME is required");
    if (!plausible_relative_path(*name)) co_return http::Response::error(404, "Not Found");
    FoundFile found = co_await anyio::to_thread::run_sync(&find_under, std::cref(root), std::cref(*name));
    if (!found.found) co_return http::Response::error(404, "Not Found");
    http::Response response;
    response.content_type = content_type_for(found.path);
    anyio::AsyncFile file = co_await anyio::open_file(found.path);
    response.source = std::make_unique<FileSource>(std::move(file));
    response.source_length = found.size;
    co_return response;
}

inline std::string stats_json(const http::Request& request) {
    anyio::CapacityLimiter& limiter = anyio::to_thread::current_default_thread_limiter();
    const anyio::CapacityLimiterStatistics tokens = limiter.statistics();
    const anyio::WorkerPoolStatistics pool = anyio::to_thread::statistics();
    const http::ServerStatistics server = request.server() != nullptr ? request.server()->statistics() : http::ServerStatistics{};
    std::string out;
    out.reserve(400);
    auto field = [&out](std::string_view name, auto value) {
        out += out.empty() ? "{\"" : ",\"";
        out += name;
        out += "\":";
        http::append_number(out, value);
    };
    field("borrowed_tokens", tokens.borrowed_tokens);
    field("total_tokens", tokens.total_tokens);
    field("tasks_waiting", tokens.tasks_waiting);
    field("workers", pool.workers);
    field("idle_workers", pool.idle_workers);
    field("busy_workers", pool.busy_workers);
    field("threads_created", pool.threads_created);
    field("threads_pruned", pool.threads_pruned);
    field("jobs_completed", pool.jobs_completed);
    field("loop", server.loop_index);
    field("connections", server.connections);
    field("requests_in_flight", server.requests_in_flight);
    field("requests_total", server.requests_total);
    field("requests_rejected", server.requests_rejected);
    out += '}';
    return out;
}

}  // namespace detail

/// The router of the example (see the list at the top). `options` is copied.
inline http::Router make_router(Options options) {
    http::Router router;
    const std::int64_t max_ms = options.max_ms;

    router.get("/async", [](http::Request&) -> anyio::Task<http::Response> {
        co_return http::Response::json(detail::ok_body);
    });

    // A plain function: the router sees it returns Response and runs it on a worker thread.
    router.get("/sync", [max_ms](http::Request& request) -> http::Response {
        std::optional<std::int64_t> ms = detail::milliseconds(request, max_ms);
        if (!ms) return detail::bad_ms(max_ms);
        std::this_thread::sleep_for(std::chrono::milliseconds(*ms));  // blocking: fine here
        return http::Response::json(detail::ok_body);
    });

    router.get("/sleep", [max_ms](http::Request& request) -> anyio::Task<http::Response> {
        std::optional<std::int64_t> ms = detail::milliseconds(request, max_ms);
        if (!ms) co_return detail::bad_ms(max_ms);
        co_await anyio::sleep(std::chrono::milliseconds(*ms));  // waits on the loop, holds no thread
        co_return http::Response::json(detail::ok_body);
    });

    router.get("/blocking-in-async", [max_ms](http::Request& request) -> anyio::Task<http::Response> {
        std::optional<std::int64_t> ms = detail::milliseconds(request, max_ms);
        if (!ms) co_return detail::bad_ms(max_ms);
        // The mistake this route exists to show: a blocking call in an async handler stalls
        // the loop and every connection on it. Use a plain handler (or to_thread::run_sync).
        // Run the server with ANYIO_DEBUG=1 (the blocked-loop detector at 100 ms, off by
        // default as asyncio's debug mode is) and this stall is reported on stderr, naming
        // the connection's task and how long it held the loop.
        std::this_thread::sleep_for(std::chrono::milliseconds(*ms));
        std::string body = R"({"ok":true,"blocked_ms":)";
        http::append_number(body, *ms);
        body += '}';
        co_return http::Response::json(std::move(body));
    });

    router.get("/stats", [](http::Request& request) -> anyio::Task<http::Response> {
        co_return http::Response::json(detail::stats_json(request));
    });

    router.get("/file", [root = options.file_root](http::Request& request) -> anyio::Task<http::Response> {
        return detail::serve_file(request, root);
    });

    router.post("/echo", [](http::Request& request) -> anyio::Task<http::Response> {
        http::Response response;
        response.content_type = "application/octet-stream";
        response.body = request.body();
        co_return response;
    });

    // Built last, so it lists every route.
    std::string listing = "anyio-cpp example server; routes:\n";
    for (const std::string& line : router.describe()) listing += "  " + line + "\n";
    listing += "  GET /  (loop)\n";
    router.get("/", [listing](http::Request&) -> anyio::Task<http::Response> {
        co_return http::Response::text(listing);
    });
    return router;
}

}  // namespace app
