// A tiny router in the manner of Starlette: routes map (method, path) to a handler, and the
// kind of handler decides where it runs, at compile time, as Starlette's request_response()
// decides at run time with is_async_callable():
//
//   router.get("/async", [](http::Request&) -> anyio::Task<http::Response> {   // on the loop
//       co_return http::Response::json(R"({"ok":true})");
//   });
//   router.get("/sync", [](http::Request& request) {                          // on a worker
//       std::this_thread::sleep_for(10ms);   // blocking is fine here
//       return http::Response::json(R"({"ok":true})");
//   });
//
// A handler returning anyio::Task<Response> is awaited on the loop (Starlette's `async def`):
// it must not block. A handler returning Response runs through
// anyio::to_thread::run_sync on the loop's default limiter (40 tokens; Starlette's
// run_in_threadpool for a plain `def`), so it may block, and it runs on several worker threads
// at once: it must be safe to call concurrently. Either kind may throw: the server answers
// 500 and logs the message.
#pragma once

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <anyio/task.hpp>
#include <anyio/to_thread.hpp>

#include "http.hpp"

namespace http {

/// The type-erased handler of a route: call it to get the response task.
class Handler {
public:
    virtual ~Handler() = default;
    [[nodiscard]] virtual anyio::Task<Response> operator()(Request& request) const = 0;
    /// True for a plain handler (run on a worker thread).
    [[nodiscard]] virtual bool offloaded() const noexcept = 0;
};

namespace detail {

template <class F>
inline constexpr bool is_async_handler =
    std::is_invocable_v<const F&, Request&> &&
    std::is_same_v<std::invoke_result_t<const F&, Request&>, anyio::Task<Response>>;

template <class F>
inline constexpr bool is_sync_handler =
    std::is_invocable_v<const F&, Request&> &&
    std::is_same_v<std::remove_cvref_t<std::invoke_result_t<const F&, Request&>>, Response>;

/// `async def`: the handler's task runs in the connection's task, on the loop.
template <class F>
class AsyncHandler final : public Handler {
public:
    explicit AsyncHandler(F fn) : fn_(std::move(fn)) {}
    anyio::Task<Response> operator()(Request& request) const override { return fn_(request); }
    bool offloaded() const noexcept override { return false; }

private:
    F fn_;  // lives in the router, so a coroutine lambda's captures outlive its calls
};

/// `def`: the handler runs on a worker thread through the default limiter; the connection's
/// task waits for a token first (FIFO), then for the call (shielded from cancellation, as
/// Starlette's run_in_threadpool: a cancelled request still waits for its thread).
template <class F>
class SyncHandler final : public Handler {
public:
    explicit SyncHandler(F fn) : fn_(std::move(fn)) {}
    anyio::Task<Response> operator()(Request& request) const override { return offload(fn_, request); }
    bool offloaded() const noexcept override { return true; }

private:
    static anyio::Task<Response> offload(const F& fn, Request& request) {
        // References only (trivially destructible wrappers): nothing is copied per call, and
        // nothing with a destructor is written inside the co_await (the g++ 12 pitfall).
        co_return co_await anyio::to_thread::run_sync(std::cref(fn), std::ref(request));
    }
    F fn_;
};

}  // namespace detail

/// Routes requests by exact path, then method. Build it before serving; afterwards it is
/// only read, so one router may serve several loops (threads) at once.
///
/// match(): the handler; or no handler with path_found true (405, with the methods the path
/// accepts in `allow`); or path_found false (404). A GET route also answers HEAD (the server
/// drops the body), as Starlette does.
class Router {
public:
    struct Match {
        const Handler* handler = nullptr;
        bool path_found = false;
        std::string allow;  ///< for 405: "GET, HEAD"
    };

    /// Adds a route; `handler` is Task<Response>(Request&) (run on the loop) or
    /// Response(Request&) (run on a worker thread). Throws std::logic_error for a duplicate.
    template <class F>
    Router& route(std::string_view method, std::string path, F handler) {
        static_assert(detail::is_async_handler<F> || detail::is_sync_handler<F>,
                      "a route handler must be callable as anyio::Task<http::Response>(http::Request&) "
                      "(run on the loop) or http::Response(http::Request&) (run on a worker thread)");
        for (const Route& r : routes_) {
            if (r.method == method && r.path == path) {
                throw std::logic_error("http::Router: " + std::string(method) + " " + path +
                                       " is already routed; give each method and path one handler");
            }
        }
        std::unique_ptr<Handler> erased;
        if constexpr (detail::is_async_handler<F>) {
            erased = std::make_unique<detail::AsyncHandler<F>>(std::move(handler));
        } else {
            erased = std::make_unique<detail::SyncHandler<F>>(std::move(handler));
        }
        routes_.push_back({std::string(method), std::move(path), std::move(erased)});
        return *this;
    }
    template <class F>
    Router& get(std::string path, F handler) {
        return route("GET", std::move(path), std::move(handler));
    }
    template <class F>
    Router& post(std::string path, F handler) {
        return route("POST", std::move(path), std::move(handler));
    }

    [[nodiscard]] Match match(std::string_view method, std::string_view path) const {
        Match result;
        const Route* head_fallback = nullptr;
        for (const Route& r : routes_) {
            if (r.path != path) continue;
            result.path_found = true;
            if (r.method == method) {
                result.handler = r.handler.get();
                return result;
            }
            if (method == "HEAD" && r.method == "GET") head_fallback = &r;
        }
        if (head_fallback != nullptr) {
            result.handler = head_fallback->handler.get();
            return result;
        }
        if (result.path_found) {
            for (const Route& r : routes_) {
                if (r.path != path) continue;
                if (!result.allow.empty()) result.allow += ", ";
                result.allow += r.method;
                if (r.method == "GET") result.allow += ", HEAD";
            }
        }
        return result;
    }

    /// "GET /async", one per route, for a listing.
    [[nodiscard]] std::vector<std::string> describe() const {
        std::vector<std::string> lines;
        for (const Route& r : routes_) {
            lines.push_back(r.method + " " + r.path + (r.handler->offloaded() ? "  (worker thread)" : "  (loop)"));
        }
        return lines;
    }

private:
    struct Route {
        std::string method;
        std::string path;
        std::unique_ptr<Handler> handler;
    };
    std::vector<Route> routes_;
};

}  // namespace http
