// The connection layer of the example server: http::Server serves HTTP/1.1 on one loop, with
// keep-alive, pipelining, "Expect: 100-continue", the limits of http.hpp, a keep-alive idle
// timeout, --limit-concurrency and uvicorn's graceful shutdown.
//
//   http::Server server(router, {.keep_alive_timeout = 5s});
//   co_await server.serve(listener);          // until server.shutdown() and the drain
//   co_await server.serve_connection(stream);  // or: one connection, any SocketStream
//
// How one connection runs (Server::Connection::run): read into the connection's buffer, feed
// the parser; at a complete request, find its handler, await it (on the loop, or on a worker
// for a plain handler), write the answer with one send, and go on with the bytes after the
// request (pipelining) or read again. Requests on one connection are answered one at a time,
// in order. While the connection waits for a request, a deadline on its cancel scope closes
// it after keep_alive_timeout of silence; that is the only time a connection is cancelled
// short of shutdown.
//
// Shutdown (uvicorn's Server.shutdown): shutdown() stops accepting (the listener is closed at
// once, so new connections are refused), closes every connection that waits for a request,
// and lets the others finish the request they are on: its answer says "connection: close".
// serve() returns when the last connection has closed, or when graceful_timeout has passed;
// then the connections left are cancelled (a plain handler on a worker thread still runs to
// its end: to_thread::run_sync is shielded, as Starlette's run_in_threadpool).
//
// A client that disconnects, resets, or stops reading costs one exception on its own task and
// is not reported; only a failing handler (500) or an unexpected system error is logged.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <anyio/cancel_scope.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/socket_listener.hpp>
#include <anyio/socket_stream.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>

#include "http.hpp"
#include "router.hpp"

namespace http {

/// How a Server behaves. An aggregate; every member has a sensible default.
struct ServerOptions {
    Limits limits{};
    /// A connection silent this long while the server waits for a request (or for the rest
    /// of one) is closed without an answer (uvicorn's --timeout-keep-alive, 5 s).
    std::chrono::steady_clock::duration keep_alive_timeout = std::chrono::seconds(5);
    /// How long shutdown lets requests in flight finish before cancelling them.
    std::chrono::steady_clock::duration graceful_timeout = std::chrono::seconds(10);
    /// After an answer that closes the connection, how long to read and drop what the client
    /// still sends (so that closing does not reset the connection before the answer is read).
    std::chrono::steady_clock::duration linger_timeout = std::chrono::seconds(1);
    /// Requests in flight beyond which new ones are answered 503 (0: no limit). Counted from
    /// the moment a request is complete until its answer is written; a request never counts
    /// itself, so at most this many run at once.
    std::int64_t limit_concurrency = 0;
    /// Shared by the servers of several loops so the limit holds for the process; null: this
    /// server counts alone.
    std::atomic<std::int64_t>* shared_in_flight = nullptr;
    /// Which loop this server runs on (reported by /stats).
    std::size_t loop_index = 0;
    /// Receives the server's error messages (one line, no newline); null: stderr.
    void (*log)(std::string_view message) = nullptr;
};

/// What statistics() reports.
struct ServerStatistics {
    std::size_t connections = 0;          ///< open now
    std::int64_t requests_in_flight = 0;  ///< complete requests not yet answered
    std::uint64_t requests_total = 0;     ///< answered (any status) since the start
    std::uint64_t requests_rejected = 0;  ///< answered 503 by limit_concurrency
    std::size_t loop_index = 0;
    bool draining = false;
};

/// An HTTP/1.1 server on the loop that runs it. Construct it on the loop thread; every
/// member is loop-thread only (another loop gets its own Server; see ServerOptions for the
/// shared limit). The Router must outlive it. Costs per connection: its task and frames, the
/// parser's buffers, a read buffer (16 KiB) and an output buffer, all reused from request to
/// request. serve() may be called once; shutdown() any number of times.
class Server {
public:
    Server(const Router& router, ServerOptions options) : router_(router), options_(options) {}
    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    /// Accepts connections from `listener` and serves each one until shutdown() has been
    /// called and the drain has ended (see the header comment). Closes the listener. Throws
    /// only what the listener's accept throws apart from lack of descriptors (which it
    /// survives) and Cancelled.
    anyio::Task<void> serve(anyio::SocketListener& listener) {
        auto handler = [this](anyio::SocketStream stream) { return serve_connection(std::move(stream)); };
        co_await anyio::task_group([this, &listener, &handler](anyio::TaskGroup& group) -> anyio::Task<void> {
            group.start_soon(accept_connections(listener, handler, group));
            co_await shutdown_requested_.wait();
            accept_scope_.cancel();
            listener.close();  // refuse new connections from now on
            if (connections_ > 0) {
                anyio::CancelScope grace(anyio::current_time() + options_.graceful_timeout);
                anyio::Task<void> drain = wait_until_drained();
                co_await grace.run(std::move(drain));
            }
            group.cancel_scope().cancel();  // what is left after the grace period
        });
    }

    /// Serves one connection until the client closes it, an error or the idle timeout closes
    /// it, or shutdown ends it. Never throws but Cancelled (a broken connection ends it
    /// quietly; other errors are logged).
    anyio::Task<void> serve_connection(anyio::SocketStream stream);

    /// Starts the graceful shutdown: stop accepting, close idle connections, finish the
    /// requests in flight. Idempotent. Loop thread only (from another thread:
    /// LoopToken::call_soon_threadsafe).
    void shutdown();

    [[nodiscard]] ServerStatistics statistics() const noexcept {
        return {connections_, in_flight_, requests_total_, requests_rejected_, options_.loop_index, draining_};
    }
    [[nodiscard]] const ServerOptions& options() const noexcept { return options_; }
    [[nodiscard]] bool draining() const noexcept { return draining_; }

private:
    class Connection;
    friend class Connection;

    template <class Handler>
    anyio::Task<void> accept_connections(anyio::SocketListener& listener, Handler& handler, anyio::TaskGroup& group) {
        anyio::Task<void> accepting = listener.serve(handler, group);
        co_await accept_scope_.run(std::move(accepting));
    }

    anyio::Task<void> wait_until_drained() {
        if (connections_ > 0) co_await drained_.wait();
    }

    /// Admits one more request in flight, or counts a refusal (limit_concurrency).
    bool admit() noexcept {
        if (options_.limit_concurrency > 0) {
            if (options_.shared_in_flight != nullptr) {
                // relaxed: the counter only admits or refuses; nothing is published through it.
                std::int64_t before = options_.shared_in_flight->fetch_add(1, std::memory_order_relaxed);
                if (before >= options_.limit_concurrency) {
                    options_.shared_in_flight->fetch_sub(1, std::memory_order_relaxed);  // relaxed: as above
                    ++requests_rejected_;
                    return false;
                }
            } else if (in_flight_ >= options_.limit_concurrency) {
                ++requests_rejected_;
                return false;
            }
        }
        ++in_flight_;
        return true;
    }
    void release() noexcept {
        --in_flight_;
        if (options_.limit_concurrency > 0 && options_.shared_in_flight != nullptr) {
            options_.shared_in_flight->fetch_sub(1, std::memory_order_relaxed);  // relaxed: see admit
        }
    }

    void log_error(std::string_view what, std::string_view detail) const {
        std::string line = "http_server: ";
        line += what;
        line += detail;
        if (options_.log != nullptr) {
            options_.log(line);
        } else {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }

    const Router& router_;
    ServerOptions options_;
    anyio::Event shutdown_requested_;
    anyio::Event drained_;
    anyio::CancelScope accept_scope_;
    Connection* first_ = nullptr;  // the open connections (intrusive list, for shutdown)
    std::size_t connections_ = 0;
    std::int64_t in_flight_ = 0;
    std::uint64_t requests_total_ = 0;
    std::uint64_t requests_rejected_ = 0;
    bool draining_ = false;
};

/// One connection's state, in the frame of serve_connection(). It is the BodyWriter of a
/// streamed answer.
class Server::Connection final : public BodyWriter {
public:
    Connection(Server& server, anyio::SocketStream& stream) : server_(server), stream_(stream), parser_(server.options_.limits) {
        next_ = server_.first_;
        if (next_ != nullptr) next_->prev_ = this;
        server_.first_ = this;
        ++server_.connections_;
    }
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;
    ~Connection() {
        if (prev_ != nullptr) prev_->next_ = next_;
        else server_.first_ = next_;
        if (next_ != nullptr) next_->prev_ = prev_;
        if (--server_.connections_ == 0 && server_.draining_) server_.drained_.set();
    }

    [[nodiscard]] anyio::CancelScope& scope() noexcept { return scope_; }

    /// Shutdown began: close now if waiting for a request, else after the current answer.
    void on_shutdown() {
        closing_ = true;
        if (idle_) scope_.cancel();
    }

    anyio::Task<void> run() {
        const std::span<char> buffer = read_buffer();
        for (;;) {
            std::string_view input;
            const bool buffered = pending_offset_ < pending_.size();
            if (buffered) {
                input = std::string_view(pending_).substr(pending_offset_);
            } else {
                const bool between_requests = !parser_.in_message();
                if (between_requests && (closing_ || server_.draining_)) co_return;
                idle_ = between_requests;
                scope_.set_deadline(anyio::current_time() + server_.options_.keep_alive_timeout);
                std::size_t received = 0;
                try {
                    received = co_await stream_.receive_into(std::as_writable_bytes(buffer));
                } catch (const anyio::EndOfStream&) {
                    co_return;  // the client closed: between requests the normal end
                }
                idle_ = false;
                scope_.set_deadline(anyio::CancelScope::time_point::max());
                // The deadline fired in the turn the bytes came: the scope is cancelled, so
                // close now rather than fail at the handler's first await.
                if (scope_.cancel_called()) co_return;
                input = std::string_view(buffer.data(), received);
            }

            const RequestParser::Outcome outcome = parser_.feed(input);
            if (buffered) {
                pending_offset_ += outcome.consumed;
            } else if (outcome.consumed < input.size()) {
                // The read buffer is reused by the next read: keep the rest (a pipelined
                // request) here.
                pending_.assign(input.substr(outcome.consumed));
                pending_offset_ = 0;
            }

            switch (outcome.event) {
            case RequestParser::Event::need_more:
                continue;
            case RequestParser::Event::error:
                co_await refuse(outcome.error_status);
                co_return;
            case RequestParser::Event::expect_continue:
                co_await stream_.send(std::string_view("HTTP/1.1 100 Continue\r\n\r\n"));
                parser_.resume();
                continue;
            case RequestParser::Event::complete:
                break;
            }

            const bool keep_alive = co_await answer();
            parser_.trim(large_buffer);
            if (!keep_alive) {
                co_await linger();
                co_return;
            }
            parser_.resume();
            if (pending_offset_ >= pending_.size()) {
                pending_offset_ = 0;
                if (pending_.capacity() > large_buffer) std::string().swap(pending_);
                else pending_.clear();
            }
        }
    }

    // BodyWriter: the bytes of a streamed body, capped at the announced length.
    anyio::Task<void> write(std::string_view data) override {
        if (data.size() > remaining_) data = data.substr(0, static_cast<std::size_t>(remaining_));
        remaining_ -= data.size();
        if (!data.empty()) co_await stream_.send(data);
    }
    std::span<std::byte> scratch() override {
        if (!stream_buffer_) stream_buffer_ = std::make_unique<std::byte[]>(stream_buffer_size);
        return {stream_buffer_.get(), stream_buffer_size};
    }
    std::uint64_t remaining() const noexcept override { return remaining_; }

private:
    static constexpr std::size_t read_buffer_size = 16 * 1024;
    static constexpr std::size_t stream_buffer_size = 64 * 1024;
    static constexpr std::size_t large_buffer = 64 * 1024;   // buffers beyond it are given back
    static constexpr std::size_t inline_body_limit = 16 * 1024;  // bodies up to it share the head's send

    /// The connection's read buffer. Its own, not the loop's: a parked receive reads in the
    /// poller's callback, before its task runs, so two connections woken in one loop turn
    /// would overwrite a shared buffer. Pages are touched only as far as reads fill them.
    std::span<char> read_buffer() {
        if (!read_buffer_) read_buffer_ = std::make_unique<char[]>(read_buffer_size);
        return {read_buffer_.get(), read_buffer_size};
    }

    /// Runs the handler of the complete request and writes its answer. Returns whether the
    /// connection stays open.
    anyio::Task<bool> answer() {
        Request& request = parser_.request();
        request.server_ = &server_;
        const bool head_only = request.method_code() == HTTP_HEAD;
        const bool http10 = request.version_major() == 1 && request.version_minor() == 0;
        if (!server_.admit()) {
            Response refused = Response::error(503, "Service Unavailable: too many requests in flight");
            co_await send_response(refused, false, head_only, http10);
            ++server_.requests_total_;
            co_return false;
        }
        struct InFlight {
            Server& server;
            ~InFlight() { server.release(); }
        } in_flight{server_};

        Response response;
        Router::Match match = server_.router_.match(request.method(), request.path());
        if (match.handler == nullptr && match.path_found) {
            response = Response::error(405, "Method Not Allowed");
            response.headers = "allow: " + match.allow + "\r\n";
        } else if (match.handler == nullptr) {
            response = Response::error(404, "Not Found");
        } else {
            try {
                response = co_await (*match.handler)(request);
            } catch (const anyio::Cancelled&) {
                throw;
            } catch (const std::exception& error) {
                server_.log_error(handler_label(request), error.what());
                response = Response::error(500, "Internal Server Error");
            } catch (...) {
                server_.log_error(handler_label(request), "an exception not derived from std::exception");
                response = Response::error(500, "Internal Server Error");
            }
        }
        // Shutdown may have begun while the handler ran: then this is the last answer.
        const bool keep_alive = request.keep_alive() && !parser_.upgrade() && !closing_ && !server_.draining_;
        const bool complete = co_await send_response(response, keep_alive, head_only, http10);
        ++server_.requests_total_;
        co_return keep_alive && complete;
    }

    static std::string handler_label(const Request& request) {
        std::string label(request.method());
        label += ' ';
        label += request.path();
        label += ": the handler threw: ";
        return label;
    }

    /// Writes `response`; with a body in memory, head and body go out in one send. Returns
    /// false if a streamed body came out short (the connection must close).
    anyio::Task<bool> send_response(Response& response, bool keep_alive, bool head_only, bool http10) {
        const bool streamed = response.source != nullptr;
        const std::uint64_t length = streamed ? response.source_length : response.body.size();
        out_.clear();
        append_head(out_, response, length, keep_alive, http10);
        if (head_only || (!streamed && response.body.size() <= inline_body_limit)) {
            if (!head_only) out_ += response.body;
            co_await stream_.send(out_);
        } else if (!streamed) {
            co_await stream_.send(out_);
            co_await stream_.send(response.body);
        } else {
            co_await stream_.send(out_);
            remaining_ = length;
            co_await response.source->write_to(*this);
            stream_buffer_.reset();
            if (remaining_ != 0) co_return false;
        }
        if (out_.capacity() > large_buffer) std::string().swap(out_);
        co_return true;
    }

    /// Answers a request the parser refused (400, 413, 431), then closes.
    anyio::Task<void> refuse(int status) {
        Response response = Response::error(status, reason_phrase(status));
        co_await send_response(response, false, false, false);
        ++server_.requests_total_;
        co_await linger();
    }

    /// Closes the sending side, then reads and drops what the client still sends, for at most
    /// linger_timeout: closing with unread bytes would reset the connection, and the client
    /// could lose the answer (nginx's lingering_close).
    anyio::Task<void> linger() {
        try {
            co_await stream_.send_eof();
            anyio::CancelScope deadline(anyio::current_time() + server_.options_.linger_timeout);
            anyio::Task<void> drain = drain_input();
            co_await deadline.run(std::move(drain));
        } catch (const anyio::EndOfStream&) {
        } catch (const anyio::BrokenResourceError&) {
        }
    }

    anyio::Task<void> drain_input() {
        const std::span<char> buffer = read_buffer();
        for (std::size_t dropped = 0; dropped < 64 * read_buffer_size;) {
            dropped += co_await stream_.receive_into(std::as_writable_bytes(buffer));
        }
    }

    Server& server_;
    anyio::SocketStream& stream_;
    RequestParser parser_;
    std::string out_;                       // the answer's head (and body) being written
    std::string pending_;                   // bytes after a complete request (pipelining)
    std::size_t pending_offset_ = 0;        // how much of pending_ the parser has used
    std::unique_ptr<char[]> read_buffer_;         // see read_buffer()
    std::unique_ptr<std::byte[]> stream_buffer_;  // a streamed body's chunks (BodyWriter::scratch)
    std::uint64_t remaining_ = 0;           // bytes of the streamed body still to write
    anyio::CancelScope scope_;              // the keep-alive deadline and shutdown act on it
    Connection* prev_ = nullptr;
    Connection* next_ = nullptr;
    bool idle_ = false;     // waiting for the first byte of a request
    bool closing_ = false;  // shutdown: this answer is the last

    friend class Server;
};

// Defined here, where Connection is complete.

inline anyio::Task<void> Server::serve_connection(anyio::SocketStream stream) {
    Connection connection(*this, stream);
    try {
        anyio::Task<void> body = connection.run();
        co_await connection.scope().run(std::move(body));
    } catch (const anyio::Cancelled&) {
        throw;
    } catch (const anyio::BrokenResourceError&) {
        // reset or gone: the client's business, not an error of the server
    } catch (const anyio::EndOfStream&) {
    } catch (const std::exception& error) {
        log_error("connection closed after an error: ", error.what());
    } catch (...) {
        log_error("connection closed after an error: ", "an exception not derived from std::exception");
    }
}

inline void Server::shutdown() {
    if (draining_) return;
    draining_ = true;
    shutdown_requested_.set();
    for (Connection* c = first_; c != nullptr; c = c->next_) c->on_shutdown();
}

}  // namespace http
