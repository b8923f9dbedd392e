// The HTTP/1.1 message layer of the example server: Request, Response, the limits, and
// RequestParser / ResponseParser, thin wrappers around Node's http-parser (Debian's
// libhttp-parser-dev, the C parser uvicorn's httptools binds). Nothing here does I/O: the
// parsers are fed bytes and say what they saw, so the same code serves the server
// (server.hpp), its self-test client (main.cpp) and the fuzz target
// (tests/fuzz/http_request_fuzz.cpp).
//
// Memory: a parser owns its buffers and reuses them from one message to the next (the
// request line, the header names and values, the body), so a keep-alive connection parses
// its requests without allocating once the buffers have grown to the size of its requests.
#pragma once

#include <http_parser.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <anyio/task.hpp>

namespace http {

class Server;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// ASCII case-insensitive comparison (header names, tokens).
inline bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) {
            return false;
        }
    }
    return true;
}

/// Appends the decimal digits of `value` to `out`.
template <class Integer>
void append_number(std::string& out, Integer value) {
    char digits[24];
    auto [end, error] = std::to_chars(digits, digits + sizeof digits, value);
    (void)error;  // 24 characters hold any 64-bit integer
    out.append(digits, end);
}

/// Appends `text` to `out` as the inside of a JSON string (quotes, backslashes and control
/// characters escaped).
inline void append_json_escaped(std::string& out, std::string_view text) {
    for (char c : text) {
        auto byte = static_cast<unsigned char>(c);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += c;
        } else if (byte < 0x20) {
            static constexpr char hex[] = "0123456789abcdef";
            out += "\\u00";
            out += hex[byte >> 4];
            out += hex[byte & 15];
        } else {
            out += c;
        }
    }
}

/// Decodes %XX escapes (and '+' as a space, as in HTML forms) of a query component. Returns
/// nothing for a malformed escape.
inline std::optional<std::string> percent_decode(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
        char c = text[i];
        if (c == '+') {
            out += ' ';
        } else if (c != '%') {
            out += c;
        } else {
            if (i + 2 >= text.size()) return std::nullopt;  // needs two hex digits after '%'
            auto hex = [](char h) -> int {
                if (h >= '0' && h <= '9') return h - '0';
                if (h >= 'a' && h <= 'f') return h - 'a' + 10;
                if (h >= 'A' && h <= 'F') return h - 'A' + 10;
                return -1;
            };
            int high = hex(text[i + 1]);
            int low = hex(text[i + 2]);
            if (high < 0 || low < 0) return std::nullopt;
            out += static_cast<char>(high * 16 + low);
            i += 2;
        }
    }
    return out;
}

/// The reason phrase of a status code ("Not Found"), from http-parser's table.
inline std::string_view reason_phrase(int status) noexcept {
    const char* text = http_status_str(static_cast<enum http_status>(status));
    return text != nullptr ? std::string_view(text) : std::string_view("Unknown");
}

/// The current time as an HTTP date ("Sun, 06 Nov 1994 08:49:37 GMT"), formatted once per
/// second per thread.
inline std::string_view http_date() {
    struct Cache {
        std::time_t second = -1;
        char text[40] = {};
        std::size_t size = 0;
    };
    thread_local Cache cache;
    std::time_t now = std::time(nullptr);
    if (now != cache.second) {
        std::tm parts{};
        ::gmtime_r(&now, &parts);
        cache.size = std::strftime(cache.text, sizeof cache.text, "%a, %d %b %Y %H:%M:%S GMT", &parts);
        cache.second = now;
    }
    return {cache.text, cache.size};
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// What a request may be; beyond it the server answers with the status named here and closes
/// the connection.
struct Limits {
    /// The request line and header section in bytes as received (CRLFs included), and
    /// likewise each chunk-size line and the trailer section of a chunked body: 431 Request
    /// Header Fields Too Large beyond it, on the same byte however the request is split across
    /// reads. http-parser also stops at its own HTTP_MAX_HEADER_SIZE (80 KiB) with 431.
    std::size_t max_header_bytes = 16 * 1024;
    /// The decoded body (Content-Length or the sum of the chunks): 413 Content Too Large.
    std::size_t max_body_bytes = 1024 * 1024;
};

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

/// One header line, as views into the parser's buffer.
struct Header {
    std::string_view name;
    std::string_view value;
};

/// A parsed request, as a handler sees it. The views point into buffers of the connection's
/// parser: valid while the handler runs (a handler run through to_thread::run_sync reads them
/// on the worker thread while the connection waits for it), gone once the response is sent.
/// Copy what must outlive the request.
class Request {
public:
    /// "GET", "POST", ...
    [[nodiscard]] std::string_view method() const noexcept {
        return http_method_str(static_cast<enum http_method>(method_));
    }
    [[nodiscard]] enum http_method method_code() const noexcept { return static_cast<enum http_method>(method_); }
    /// The request target as sent ("/sync?ms=10").
    [[nodiscard]] std::string_view target() const noexcept { return target_; }
    /// The target up to '?' ("/sync").
    [[nodiscard]] std::string_view path() const noexcept { return path_; }
    /// The target after '?' without it ("ms=10"), empty when there is none.
    [[nodiscard]] std::string_view query() const noexcept { return query_; }
    [[nodiscard]] int version_major() const noexcept { return major_; }
    [[nodiscard]] int version_minor() const noexcept { return minor_; }
    /// Whether the client wants the connection kept open after this request (HTTP/1.1 unless
    /// "Connection: close"; HTTP/1.0 only with "Connection: keep-alive").
    [[nodiscard]] bool keep_alive() const noexcept { return keep_alive_; }
    [[nodiscard]] std::span<const Header> headers() const noexcept { return headers_; }
    [[nodiscard]] const std::string& body() const noexcept { return body_; }

    /// The first header called `name` (any case), if any.
    [[nodiscard]] std::optional<std::string_view> header(std::string_view name) const noexcept {
        for (const Header& h : headers_) {
            if (iequals(h.name, name)) return h.value;
        }
        return std::nullopt;
    }

    /// The value of query parameter `name` as sent (not decoded), if present ("" for a bare
    /// `name` or `name=`).
    [[nodiscard]] std::optional<std::string_view> raw_query_param(std::string_view name) const noexcept {
        std::string_view rest = query_;
        while (!rest.empty()) {
            std::size_t amp = rest.find('&');
            std::string_view pair = rest.substr(0, amp);
            rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
            std::size_t equals = pair.find('=');
            if (pair.substr(0, equals) != name) continue;
            return equals == std::string_view::npos ? std::string_view() : pair.substr(equals + 1);
        }
        return std::nullopt;
    }

    /// The value of query parameter `name`, percent-decoded; nothing when the parameter is
    /// absent or its escapes are malformed. Allocates the decoded string.
    [[nodiscard]] std::optional<std::string> query_param(std::string_view name) const {
        std::optional<std::string_view> raw = raw_query_param(name);
        if (!raw) return std::nullopt;
        return percent_decode(*raw);
    }

    /// The server that received the request (null outside a server, e.g. in unit tests).
    [[nodiscard]] Server* server() const noexcept { return server_; }

private:
    friend class RequestParser;
    friend class Server;

    std::string_view target_;
    std::string_view path_;
    std::string_view query_;
    std::vector<Header> headers_;
    std::string body_;
    Server* server_ = nullptr;
    unsigned method_ = HTTP_GET;
    int major_ = 1;
    int minor_ = 1;
    bool keep_alive_ = true;
};

// ---------------------------------------------------------------------------------------------
// Response
// ---------------------------------------------------------------------------------------------

/// Where a streamed body goes (the connection implements it). Each write returns once the
/// bytes are in the socket; a client gone away makes it throw anyio::BrokenResourceError.
class BodyWriter {
public:
    virtual anyio::Task<void> write(std::string_view data) = 0;
    /// A buffer the source may fill before passing it to write() (saves a copy). Valid until
    /// the next write.
    virtual std::span<std::byte> scratch() = 0;
    /// Bytes of the announced length not yet written.
    [[nodiscard]] virtual std::uint64_t remaining() const noexcept = 0;

protected:
    ~BodyWriter() = default;
};

/// A body produced while it is sent (a file, say). It must write exactly the length given
/// with it in the Response; fewer bytes make the connection close after them (the client
/// sees a short body), more are not sent.
class BodySource {
public:
    virtual ~BodySource() = default;
    virtual anyio::Task<void> write_to(BodyWriter& writer) = 0;
};

/// What a handler returns. The server adds the status line, content-length, date and
/// connection headers; `headers` holds any others, each as "name: value\r\n".
struct Response {
    int status = 200;
    /// Must outlive the response (a string literal, say); empty: no content-type header.
    std::string_view content_type = "application/json";
    std::string body;
    std::string headers;
    /// A streamed body of `source_length` bytes instead of `body` (see BodySource).
    std::unique_ptr<BodySource> source;
    std::uint64_t source_length = 0;

    static Response json(std::string body, int status = 200) {
        Response r;
        r.status = status;
        r.body = std::move(body);
        return r;
    }
    static Response text(std::string body, int status = 200) {
        Response r;
        r.status = status;
        r.content_type = "text/plain; charset=utf-8";
        r.body = std::move(body);
        return r;
    }
    /// {"detail":"..."} with `status`, as FastAPI answers errors.
    static Response error(int status, std::string_view detail) {
        Response r;
        r.status = status;
        r.body.reserve(detail.size() + 14);
        r.body = "{\"detail\":\"";
        append_json_escaped(r.body, detail);
        r.body += "\"}";
        return r;
    }
};

/// Appends the status line and headers of `response` to `out`. `body_length` is the
/// content-length to announce (for HEAD as for GET); `keep_alive` false adds "connection:
/// close"; an HTTP/1.0 client that asked to keep the connection gets "connection: keep-alive".
inline void append_head(std::string& out, const Response& response, std::uint64_t body_length,
                        bool keep_alive, bool http10) {
    out += "HTTP/1.1 ";
    append_number(out, response.status);
    out += ' ';
    out += reason_phrase(response.status);
    out += "\r\n";
    if (!response.content_type.empty()) {
        out += "content-type: ";
        out += response.content_type;
        out += "\r\n";
    }
    out += "content-length: ";
    append_number(out, body_length);
    out += "\r\ndate: ";
    out += http_date();
    out += "\r\n";
    if (!keep_alive) {
        out += "connection: close\r\n";
    } else if (http10) {
        out += "connection: keep-alive\r\n";
    }
    out += response.headers;
    out += "\r\n";
}

// ---------------------------------------------------------------------------------------------
// RequestParser
// ---------------------------------------------------------------------------------------------

/// Parses the requests of one connection, one message at a time: feed() it what the socket
/// gave; it stops after a complete request (so a pipelined next one waits until this one
/// is answered), before the body of a request that sent "Expect: 100-continue", or at an
/// error, and says how many bytes it used. resume() goes on after the first two.
///
/// Errors carry the status to answer: 400 for a malformed request (or an HTTP/1.1 request
/// without Host, as h11 requires), 413 for a body over Limits::max_body_bytes (as soon as
/// Content-Length shows it, or while the chunks add up), 431 for a header section over
/// Limits::max_header_bytes. After an error the parser accepts nothing more: close the
/// connection.
///
/// Not thread-safe (one connection's object); allocates only to grow its buffers.
class RequestParser {
public:
    enum class Event {
        need_more,        ///< every byte used, the request is not complete: feed more
        expect_continue,  ///< headers done, the client waits for "100 Continue" before the body
        complete,         ///< request() is a complete request; the bytes after it are not used
        error,            ///< malformed or over a limit: answer error_status and close
    };
    struct Outcome {
        std::size_t consumed = 0;
        Event event = Event::need_more;
        int error_status = 0;
    };

    explicit RequestParser(const Limits& limits) : limits_(limits) {
        http_parser_init(&parser_, HTTP_REQUEST);
        parser_.data = this;
    }
    RequestParser(const RequestParser&) = delete;
    RequestParser& operator=(const RequestParser&) = delete;

    /// Parses from the start of `data` (empty: the client sent EOF).
    Outcome feed(std::string_view data) {
        // http-parser counts the bytes of the head (and of each chunk-size line and the
        // trailers) in parser_.nread, one by one, and resets it for the body. Giving it no more
        // than the bytes left under the limit puts the 431 on the byte that would pass the
        // limit, before any syntax error further on, however the caller's reads split the
        // request (counting in the data callbacks decided at the end of each read instead, so
        // a split request could get 431 where the whole one got 400: the fuzzer found it).
        std::size_t used = 0;
        do {
            const std::size_t rest = data.size() - used;
            const std::size_t left = limits_.max_header_bytes - parser_.nread;  // nread <= limit until an error
            if (left == 0 && rest != 0) {  // the parser is in a head that has used the whole limit
                parser_.http_errno = HPE_HEADER_OVERFLOW;  // sticky, as http-parser's own errors are
                break;
            }
            const std::size_t n = std::min(rest, left);
            const std::size_t got = http_parser_execute(&parser_, &settings(), data.data() + used, n);
            used += got;
            if (parser_.http_errno != HPE_OK || got < n) break;
        } while (used < data.size());
        const auto error = static_cast<enum http_errno>(parser_.http_errno);
        if (error == HPE_OK) return {used, Event::need_more, 0};
        if (error == HPE_PAUSED) {
            if (complete_) return {used, Event::complete, 0};
            if (expect_continue_) return {used, Event::expect_continue, 0};
        }
        int status = error_status_ != 0 ? error_status_ : error == HPE_HEADER_OVERFLOW ? 431 : 400;
        return {used, Event::error, status};
    }

    /// Goes on after Event::complete (with the next request) or Event::expect_continue (with
    /// the body).
    void resume() noexcept {
        if (complete_) {
            complete_ = false;
            in_message_ = false;
        }
        // The head (or a chunked request's trailers) is over; http-parser resets its count only
        // when it next reads a byte, and a head of exactly the limit must not refuse that byte.
        parser_.nread = 0;
        expect_continue_ = false;
        http_parser_pause(&parser_, 0);
    }

    /// The request being parsed (complete after Event::complete).
    [[nodiscard]] Request& request() noexcept { return request_; }
    /// Some bytes of a request have been seen and it is not complete yet.
    [[nodiscard]] bool in_message() const noexcept { return in_message_; }
    /// The request asked for another protocol (Upgrade, CONNECT): the bytes after it are not
    /// HTTP, so the connection must close after the answer.
    [[nodiscard]] bool upgrade() const noexcept { return parser_.upgrade != 0; }
    /// A short description of the last parse error ("invalid HTTP method").
    [[nodiscard]] const char* error_description() const noexcept {
        return http_errno_description(static_cast<enum http_errno>(parser_.http_errno));
    }

    /// Gives back buffers that grew beyond `keep` bytes for one large request.
    void trim(std::size_t keep) {
        if (arena_.capacity() > keep) std::string().swap(arena_);
        if (request_.body_.capacity() > keep) std::string().swap(request_.body_);
    }

private:
    struct Span {
        std::uint32_t offset = 0;
        std::uint32_t length = 0;
    };
    struct HeaderSpan {
        Span name;
        Span value;
    };

    static RequestParser& self(http_parser* parser) noexcept { return *static_cast<RequestParser*>(parser->data); }

    static const http_parser_settings& settings() noexcept {
        static const http_parser_settings table = [] {
            http_parser_settings s;
            http_parser_settings_init(&s);
            s.on_message_begin = &on_message_begin;
            s.on_url = &on_url;
            s.on_header_field = &on_header_field;
            s.on_header_value = &on_header_value;
            s.on_headers_complete = &on_headers_complete;
            s.on_body = &on_body;
            s.on_message_complete = &on_message_complete;
            return s;
        }();
        return table;
    }

    // The callbacks return 0 to go on and -1 to stop with an error (error_status_ says which).
    // They run inside http_parser_execute, so nothing in them may throw: a failed allocation
    // ends the request with 400 rather than unwinding through C frames.

    static int on_message_begin(http_parser* parser) noexcept {
        RequestParser& p = self(parser);
        p.arena_.clear();
        p.spans_.clear();
        p.request_.headers_.clear();
        p.request_.body_.clear();
        p.url_ = {};
        p.error_status_ = 0;
        p.in_message_ = true;
        p.headers_done_ = false;
        p.last_was_value_ = false;
        p.expect_continue_ = false;
        return 0;
    }

    /// Appends to the arena; false if it cannot grow.
    bool append(const char* at, std::size_t length) noexcept {
        try {
            arena_.append(at, length);
            return true;
        } catch (...) {
            error_status_ = 400;
            return false;
        }
    }

    static int on_url(http_parser* parser, const char* at, std::size_t length) noexcept {
        RequestParser& p = self(parser);
        if (p.url_.length == 0) p.url_.offset = static_cast<std::uint32_t>(p.arena_.size());
        if (!p.append(at, length)) return -1;
        p.url_.length += static_cast<std::uint32_t>(length);
        return 0;
    }

    static int on_header_field(http_parser* parser, const char* at, std::size_t length) noexcept {
        RequestParser& p = self(parser);
        const bool starts = p.spans_.empty() || p.last_was_value_ || p.headers_done_;
        if (p.headers_done_) return 0;  // a trailer (after a chunked body): not kept
        if (starts) {
            try {
                p.spans_.push_back({{static_cast<std::uint32_t>(p.arena_.size()), 0}, {}});
            } catch (...) {
                p.error_status_ = 400;
                return -1;
            }
            p.last_was_value_ = false;
        }
        if (!p.append(at, length)) return -1;
        p.spans_.back().name.length += static_cast<std::uint32_t>(length);
        return 0;
    }

    static int on_header_value(http_parser* parser, const char* at, std::size_t length) noexcept {
        RequestParser& p = self(parser);
        if (p.headers_done_ || p.spans_.empty()) return 0;
        if (!p.last_was_value_) {
            p.spans_.back().value.offset = static_cast<std::uint32_t>(p.arena_.size());
            p.last_was_value_ = true;
        }
        if (!p.append(at, length)) return -1;
        p.spans_.back().value.length += static_cast<std::uint32_t>(length);
        return 0;
    }

    static int on_headers_complete(http_parser* parser) noexcept {
        RequestParser& p = self(parser);
        p.headers_done_ = true;
        Request& r = p.request_;
        // The arena no longer grows for this request, so views into it stay valid.
        const std::string_view arena(p.arena_);
        r.target_ = arena.substr(p.url_.offset, p.url_.length);
        std::size_t end = r.target_.find_first_of("?#");
        r.path_ = r.target_.substr(0, end);
        r.query_ = {};
        if (end != std::string_view::npos && r.target_[end] == '?') {
            std::string_view rest = r.target_.substr(end + 1);
            r.query_ = rest.substr(0, rest.find('#'));
        }
        try {
            r.headers_.reserve(p.spans_.size());
        } catch (...) {
            p.error_status_ = 400;
            return -1;
        }
        for (const HeaderSpan& span : p.spans_) {
            r.headers_.push_back({arena.substr(span.name.offset, span.name.length),
                                  arena.substr(span.value.offset, span.value.length)});
        }
        r.method_ = parser->method;
        r.major_ = parser->http_major;
        r.minor_ = parser->http_minor;
        r.keep_alive_ = http_should_keep_alive(parser) != 0;
        if ((r.major_ > 1 || (r.major_ == 1 && r.minor_ >= 1)) && !r.header("host")) {
            p.error_status_ = 400;  // RFC 9112 section 3.2: a server MUST answer 400
            return -1;
        }
        const bool chunked = (parser->flags & F_CHUNKED) != 0;
        if ((parser->flags & F_CONTENTLENGTH) != 0 && !chunked &&
            parser->content_length > p.limits_.max_body_bytes) {
            p.error_status_ = 413;  // refused before the body is read
            return -1;
        }
        const bool has_body = chunked || ((parser->flags & F_CONTENTLENGTH) != 0 && parser->content_length > 0);
        if (has_body && r.minor_ >= 1) {
            if (auto expect = r.header("expect"); expect && iequals(*expect, "100-continue")) {
                p.expect_continue_ = true;
                http_parser_pause(parser, 1);  // the connection sends "100 Continue", then resume()
            }
        }
        return 0;
    }

    static int on_body(http_parser* parser, const char* at, std::size_t length) noexcept {
        RequestParser& p = self(parser);
        std::string& body = p.request_.body_;
        if (length > p.limits_.max_body_bytes - body.size()) {
            p.error_status_ = 413;
            return -1;
        }
        try {
            body.append(at, length);
        } catch (...) {
            p.error_status_ = 413;
            return -1;
        }
        return 0;
    }

    static int on_message_complete(http_parser* parser) noexcept {
        RequestParser& p = self(parser);
        p.complete_ = true;
        http_parser_pause(parser, 1);  // stop here: a pipelined request waits for this answer
        return 0;
    }

    http_parser parser_{};
    Limits limits_;
    Request request_;
    std::string arena_;  // the target, then each header name and value, back to back
    std::vector<HeaderSpan> spans_;
    Span url_;
    int error_status_ = 0;
    bool in_message_ = false;
    bool headers_done_ = false;
    bool last_was_value_ = false;
    bool expect_continue_ = false;
    bool complete_ = false;
};

// ---------------------------------------------------------------------------------------------
// ResponseParser (the client side: the self-test and the fuzz target read the server with it)
// ---------------------------------------------------------------------------------------------

/// Parses a stream of responses. Tell it, before each response, whether the request was a
/// HEAD (no body follows then). Keeps only what a test needs: the status, a few headers and
/// the body. Interim 1xx responses are reported like the others.
class ResponseParser {
public:
    struct Message {
        int status = 0;
        std::string body;
        std::optional<std::uint64_t> content_length;
        bool connection_close = false;
        bool keep_alive = true;
    };
    enum class Event { need_more, complete, error };
    struct Outcome {
        std::size_t consumed = 0;
        Event event = Event::need_more;
    };

    ResponseParser() {
        http_parser_init(&parser_, HTTP_RESPONSE);
        parser_.data = this;
    }
    ResponseParser(const ResponseParser&) = delete;
    ResponseParser& operator=(const ResponseParser&) = delete;

    /// Whether the response now being parsed answers a HEAD request.
    void set_head_request(bool head) noexcept { head_ = head; }

    Outcome feed(std::string_view data) {
        std::size_t used = http_parser_execute(&parser_, &settings(), data.data(), data.size());
        const auto error = static_cast<enum http_errno>(parser_.http_errno);
        if (error == HPE_OK) return {used, Event::need_more};
        if (error == HPE_PAUSED && complete_) return {used, Event::complete};
        return {used, Event::error};
    }
    /// The peer closed: completes a body delimited by the end of the connection.
    Outcome finish() {
        http_parser_execute(&parser_, &settings(), nullptr, 0);
        const auto error = static_cast<enum http_errno>(parser_.http_errno);
        if (error == HPE_PAUSED && complete_) return {0, Event::complete};
        return {0, error == HPE_OK ? Event::need_more : Event::error};
    }
    /// After Event::complete: the next response.
    void resume() noexcept {
        complete_ = false;
        http_parser_pause(&parser_, 0);
    }
    [[nodiscard]] const Message& message() const noexcept { return message_; }
    [[nodiscard]] const char* error_description() const noexcept {
        return http_errno_description(static_cast<enum http_errno>(parser_.http_errno));
    }

private:
    static ResponseParser& self(http_parser* parser) noexcept { return *static_cast<ResponseParser*>(parser->data); }

    static const http_parser_settings& settings() noexcept {
        static const http_parser_settings table = [] {
            http_parser_settings s;
            http_parser_settings_init(&s);
            s.on_message_begin = [](http_parser* parser) noexcept -> int {
                ResponseParser& p = self(parser);
                p.message_ = {};
                p.field_.clear();
                p.value_.clear();
                p.last_was_value_ = false;
                return 0;
            };
            s.on_header_field = [](http_parser* parser, const char* at, std::size_t length) noexcept -> int {
                ResponseParser& p = self(parser);
                if (p.last_was_value_) p.take_header();
                p.field_.append(at, length);
                return 0;
            };
            s.on_header_value = [](http_parser* parser, const char* at, std::size_t length) noexcept -> int {
                ResponseParser& p = self(parser);
                p.last_was_value_ = true;
                p.value_.append(at, length);
                return 0;
            };
            s.on_headers_complete = [](http_parser* parser) noexcept -> int {
                ResponseParser& p = self(parser);
                if (p.last_was_value_ || !p.field_.empty()) p.take_header();
                p.message_.status = static_cast<int>(parser->status_code);
                p.message_.keep_alive = http_should_keep_alive(parser) != 0;
                return p.head_ ? 1 : 0;  // 1: no body follows (a HEAD answer)
            };
            s.on_body = [](http_parser* parser, const char* at, std::size_t length) noexcept -> int {
                self(parser).message_.body.append(at, length);
                return 0;
            };
            s.on_message_complete = [](http_parser* parser) noexcept -> int {
                self(parser).complete_ = true;
                http_parser_pause(parser, 1);
                return 0;
            };
            return s;
        }();
        return table;
    }

    void take_header() {
        if (iequals(field_, "content-length")) {
            std::uint64_t n = 0;
            auto [end, error] = std::from_chars(value_.data(), value_.data() + value_.size(), n);
            if (error == std::errc() && end == value_.data() + value_.size()) message_.content_length = n;
        } else if (iequals(field_, "connection") && iequals(value_, "close")) {
            message_.connection_close = true;
        }
        field_.clear();
        value_.clear();
        last_was_value_ = false;
    }

    http_parser parser_{};
    Message message_;
    std::string field_;
    std::string value_;
    bool last_was_value_ = false;
    bool head_ = false;
    bool complete_ = false;
};

}  // namespace http
