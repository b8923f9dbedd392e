#include <anyio/file.hpp>

#include <anyio/cancel_scope.hpp>
#include <anyio/capacity_limiter.hpp>
#include <anyio/errors.hpp>
#include <anyio/event.hpp>
#include <anyio/event_loop.hpp>
#include <anyio/task.hpp>
#include <anyio/task_group.hpp>
#include <anyio/to_thread.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <latch>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catch.hpp"
#include "test_support.hpp"

// Catch's assertion macros must not contain co_await: the assertion would stay open across a
// suspension while other tasks assert, and the macro repeats its expression. Await first:
// AWAIT_CHECK(file.read(3), == "abc") checks `co_await file.read(3) == "abc"`.
#define AWAIT_CHECK(awaitable, ...)               \
    do {                                          \
        auto&& awaited_ = co_await(awaitable);    \
        CHECK(awaited_ __VA_ARGS__);              \
    } while (false)
#define AWAIT_CHECK_FALSE(awaitable)              \
    do {                                          \
        auto&& awaited_ = co_await(awaitable);    \
        CHECK_FALSE(awaited_);                    \
    } while (false)

namespace {

using namespace std::chrono_literals;
using namespace anyio_test;
namespace fs = std::filesystem;
using anyio::AsyncFile;
using anyio::open_file;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

// A fresh directory under the system's temp directory, removed with everything in it.
class TempDir {
public:
    TempDir() {
        static std::atomic<int> counter{0};
        path_ = fs::temp_directory_path() /
                ("anyio-file-test-" + std::to_string(::getpid()) + "-" + std::to_string(++counter));
        fs::remove_all(path_);
        fs::create_directories(path_);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        std::error_code ignored;
        fs::remove_all(path_, ignored);
    }
    [[nodiscard]] const fs::path& path() const { return path_; }
    [[nodiscard]] fs::path operator/(const std::string& name) const { return path_ / name; }

private:
    fs::path path_;
};

// `size` bytes of every value, in an order that catches shifted or reordered chunks.
std::string make_bytes(std::size_t size) {
    std::string data(size, '\0');
    std::uint64_t state = 0x9e3779b97f4a7c15ULL;
    for (std::size_t i = 0; i < size; i += sizeof state) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        const std::uint64_t word = state >> 7 ^ state;
        std::memcpy(data.data() + i, &word, std::min(sizeof word, size - i));
    }
    return data;
}

void write_file(const fs::path& path, const std::string& data) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    REQUIRE(out.good());
}

std::string read_file(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Open file descriptors of this process.
std::size_t fd_count() {
    std::size_t count = 0;
    for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
        (void)entry;
        ++count;
    }
    return count - 1;  // the directory iterator's own descriptor
}

// Polls `done()` on the loop every millisecond until it holds (true) or `limit` passes. For
// what happens on worker threads (a background close), which the loop cannot wait on.
template <class Predicate>
anyio::Task<bool> eventually(Predicate done, std::chrono::milliseconds limit = 5000ms) {
    const auto until = anyio::current_time() + limit;
    while (!done()) {
        if (anyio::current_time() >= until) co_return false;
        co_await anyio::sleep(1ms);
    }
    co_return true;
}

// The errno a std::system_error (or filesystem_error) carries.
template <class F>
int error_of(F&& fn) {
    try {
        fn();
    } catch (const std::system_error& error) {
        return error.code().value();
    }
    return 0;
}

bool running_as_root() { return ::geteuid() == 0; }

// A named pipe: reads from it block until the test feeds it, which gives file calls that
// stay in flight for as long as a test needs. A safety thread feeds every reader and closes
// the write end after `safety_timeout` if the test has not finished by then, so a failing
// test cannot hang in a blocked worker.
class Fifo {
public:
    static constexpr auto safety_timeout = 10s;

    explicit Fifo(fs::path path) : path_(std::move(path)) {
        REQUIRE(::mkfifo(path_.c_str(), 0600) == 0);
        // O_RDWR: opening does not wait for a reader (Linux); O_NONBLOCK: feeding never blocks.
        writer_ = ::open(path_.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
        REQUIRE(writer_ >= 0);
        safety_ = std::jthread([this](std::stop_token stop) {
            std::mutex mutex;
            std::condition_variable_any wake;
            std::unique_lock lock(mutex);
            wake.wait_for(lock, stop, safety_timeout, [] { return false; });
            if (stop.stop_requested()) return;
            feed(std::string(32 * 1024, '!'));
            close_writer();
            write_to_next_reader("!", 1s);  // a reader stuck in open() gets data and EOF
        });
    }
    Fifo(const Fifo&) = delete;
    Fifo& operator=(const Fifo&) = delete;
    ~Fifo() {
        safety_.request_stop();
        safety_.join();
        close_writer();
    }

    [[nodiscard]] const fs::path& path() const { return path_; }
    void feed(const std::string& data) {
        const int fd = writer_.load();
        if (fd >= 0) REQUIRE(::write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
    }
    // Readers that read to the end see it once every write end is closed.
    void close_writer() {
        const int fd = writer_.exchange(-1);
        if (fd >= 0) ::close(fd);
    }
    // Waits (at most `limit`) until a reader has the pipe open, writes `data` and closes
    // that write end: the reader sees the data, then EOF once no other writer is left.
    // Opening for writing without blocking fails with ENXIO until a reader is there, so this
    // polls the kernel's state, which offers nothing to wait on.
    bool write_to_next_reader(const std::string& data, Clock::duration limit = safety_timeout) {
        const auto until = Clock::now() + limit;
        int fd = -1;
        while ((fd = ::open(path_.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)) < 0) {
            if (errno != ENXIO || Clock::now() >= until) return false;
            std::this_thread::sleep_for(1ms);
        }
        const bool written = ::write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size());
        ::close(fd);
        return written;
    }

private:
    fs::path path_;
    std::atomic<int> writer_{-1};
    std::jthread safety_;
};

// A one-shot gate a blocking function waits on (at most 10 s) until the test opens it.
class Gate {
public:
    Gate() = default;
    Gate(const Gate&) = delete;
    Gate& operator=(const Gate&) = delete;
    ~Gate() { open(); }
    void open() {
        if (!opened_.exchange(true)) promise_.set_value();
    }
    [[nodiscard]] std::shared_future<void> future() const { return future_; }

private:
    std::promise<void> promise_;
    std::shared_future<void> future_{promise_.get_future().share()};
    std::atomic<bool> opened_{false};
};

void wait_for_gate(const std::shared_future<void>& gate) { gate.wait_for(10s); }

anyio::Task<std::string> read_all(const fs::path& path) {
    AsyncFile file = co_await open_file(path, "rb");
    std::string data = co_await file.read();
    co_await file.aclose();
    co_return data;
}

anyio::Task<> write_all(const fs::path& path, const std::string& data) {
    AsyncFile file = co_await open_file(path, "wb");
    const std::size_t written = co_await file.write(data);
    CHECK(written == data.size());
    co_await file.aclose();
}

// ---------------------------------------------------------------------------------------------
// Round trips and reading
// ---------------------------------------------------------------------------------------------

TEST_CASE("Files of 0 bytes, 1 byte and 1 MiB round-trip through write and read", "[file]") {
    TempDir dir;
    run_loop([&]() -> anyio::Task<> {
        for (const std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{1} << 20}) {
            const fs::path path = dir / ("data-" + std::to_string(size));
            const std::string data = make_bytes(size);
            co_await write_all(path, data);
            CHECK(read_file(path) == data);
            AWAIT_CHECK(read_all(path), == data);
            // And through Path, both ways.
            const anyio::Path other(dir / ("path-" + std::to_string(size)));
            AWAIT_CHECK(other.write_bytes(data), == size);
            AWAIT_CHECK(other.read_bytes(), == data);
        }
    });
}

TEST_CASE("A 64 MiB file round-trips through write and read", "[file]") {
#ifdef ANYIO_TEST_SANITIZED
    constexpr std::size_t size = std::size_t{4} << 20;  // sanitizers copy memory slowly
#else
    constexpr std::size_t size = std::size_t{64} << 20;
#endif
    TempDir dir;
    const fs::path path = dir / "large";
    const std::string data = make_bytes(size);
    run_loop([&]() -> anyio::Task<> {
        co_await write_all(path, data);
        CHECK(fs::file_size(path) == size);
        const std::string back = co_await read_all(path);
        CHECK(back.size() == size);
        CHECK(back == data);
    });
}

TEST_CASE("read with a count reads that many bytes, fewer at end of file", "[file]") {
    TempDir dir;
    write_file(dir / "f", "abcdefgh");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(dir / "f");
        AWAIT_CHECK(file.read(0), == "");
        AWAIT_CHECK(file.read(3), == "abc");
        AWAIT_CHECK(file.read(100), == "defgh");
        AWAIT_CHECK(file.read(3), == "");
        AWAIT_CHECK(file.read(), == "");
        co_await file.aclose();
    });
}

TEST_CASE("readline returns each line with its newline and an empty string at end of file",
          "[file]") {
    TempDir dir;
    write_file(dir / "no-trailing", "first\n\nthird\nlast");
    write_file(dir / "trailing", "one\ntwo\n");
    write_file(dir / "empty", "");
    write_file(dir / "binary", std::string("a\0b\n\0\n", 6));
    run_loop([&]() -> anyio::Task<> {
        auto lines_of = [](fs::path path) -> anyio::Task<std::vector<std::string>> {
            AsyncFile file = co_await open_file(path);
            std::vector<std::string> lines;
            for (;;) {
                std::string line = co_await file.readline();
                if (line.empty()) break;
                lines.push_back(std::move(line));
            }
            AWAIT_CHECK(file.readline(), == "");  // end of file stays the end
            co_await file.aclose();
            co_return lines;
        };
        AWAIT_CHECK(lines_of(dir / "no-trailing"), ==
              std::vector<std::string>{"first\n", "\n", "third\n", "last"});
        AWAIT_CHECK(lines_of(dir / "trailing"), == std::vector<std::string>{"one\n", "two\n"});
        AWAIT_CHECK(lines_of(dir / "empty"), .empty());
        AWAIT_CHECK(lines_of(dir / "binary"), ==
              std::vector<std::string>{std::string("a\0b\n", 4), std::string("\0\n", 2)});
    });
}

TEST_CASE("seek and tell move and report the position", "[file]") {
    TempDir dir;
    write_file(dir / "f", "0123456789");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(dir / "f");
        AWAIT_CHECK(file.tell(), == 0);
        AWAIT_CHECK(file.seek(4), == 4);
        AWAIT_CHECK(file.read(2), == "45");
        AWAIT_CHECK(file.tell(), == 6);
        AWAIT_CHECK(file.seek(-3, SEEK_CUR), == 3);
        AWAIT_CHECK(file.read(1), == "3");
        AWAIT_CHECK(file.seek(-2, SEEK_END), == 8);
        AWAIT_CHECK(file.read(), == "89");
        AWAIT_CHECK(file.seek(0, SEEK_SET), == 0);
        AWAIT_CHECK(file.readline(), == "0123456789");
        // A position before the start is EINVAL, and the file stays usable.
        std::optional<int> error;
        try {
            co_await file.seek(-1);
        } catch (const std::system_error& e) {
            error = e.code().value();
            CHECK(std::string(e.what()).find((dir / "f").string()) != std::string::npos);
        }
        CHECK(error == EINVAL);
        AWAIT_CHECK(file.seek(1), == 1);
        co_await file.aclose();
    });
}

TEST_CASE("read_into fills the buffer and reports a short read at end of file", "[file]") {
    TempDir dir;
    write_file(dir / "f", "abcdefghij");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(dir / "f");
        std::vector<std::byte> buffer(4);
        AWAIT_CHECK(file.read_into(buffer), == 4);
        CHECK(std::string(reinterpret_cast<const char*>(buffer.data()), 4) == "abcd");
        AWAIT_CHECK(file.read_into(buffer), == 4);
        CHECK(std::string(reinterpret_cast<const char*>(buffer.data()), 4) == "efgh");
        AWAIT_CHECK(file.read_into(buffer), == 2);
        CHECK(std::string(reinterpret_cast<const char*>(buffer.data()), 2) == "ij");
        AWAIT_CHECK(file.read_into(buffer), == 0);
        AWAIT_CHECK(file.read_into(std::span<std::byte>()), == 0);
        co_await file.aclose();
    });
}

TEST_CASE("Writes, flushes and update modes read back what was written", "[file]") {
    TempDir dir;
    const fs::path path = dir / "f";
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(path, "w+b");
        AWAIT_CHECK(file.write("hello "), == 6);
        const std::string world = "world";
        AWAIT_CHECK(file.write(std::as_bytes(std::span(world.data(), world.size()))), == 5);
        co_await file.flush();
        CHECK(read_file(path) == "hello world");  // flushed: visible to others
        AWAIT_CHECK(file.seek(0), == 0);
        AWAIT_CHECK(file.read(), == "hello world");
        co_await file.aclose();

        // "r+b": a write right after a read, and a read right after a write (C needs a
        // flush or seek in between; AsyncFile does it).
        AsyncFile update = co_await open_file(path, "r+b");
        AWAIT_CHECK(update.read(2), == "he");
        co_await update.write("LL");
        AWAIT_CHECK(update.read(3), == "o w");
        co_await update.aclose();
        CHECK(read_file(path) == "heLLo world");

        AsyncFile append = co_await open_file(path, "ab");
        co_await append.write("!");
        co_await append.aclose();
        CHECK(read_file(path) == "heLLo world!");
    });
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

// Runs open_file and returns the std::system_error it threw (fails if it did not throw).
anyio::Task<std::optional<std::system_error>> open_error(fs::path path, std::string mode) {
    try {
        AsyncFile file = co_await open_file(path, mode);
    } catch (const std::system_error& error) {
        co_return error;
    }
    co_return std::nullopt;
}

TEST_CASE("open_file on a missing file throws std::system_error naming the path and the mode",
          "[file]") {
    TempDir dir;
    run_loop([&]() -> anyio::Task<> {
        const auto error = co_await open_error(dir / "missing", "rb");
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        const std::string message = error->what();
        CHECK(message.find((dir / "missing").string()) != std::string::npos);
        CHECK(message.find("\"rb\"") != std::string::npos);
        CHECK(message.find("open_file") != std::string::npos);
        // In a missing directory, for writing.
        const auto nested = co_await open_error(dir / "no-dir" / "f", "wb");
        REQUIRE(nested.has_value());
        CHECK(nested->code() == std::errc::no_such_file_or_directory);
    });
}

TEST_CASE("open_file on a directory throws EISDIR, for reading as for writing", "[file]") {
    TempDir dir;
    run_loop([&]() -> anyio::Task<> {
        for (const char* mode : {"rb", "r", "wb", "r+b"}) {
            const auto error = co_await open_error(dir.path(), mode);
            REQUIRE(error.has_value());
            CHECK(error->code() == std::errc::is_a_directory);
        }
    });
}

TEST_CASE("open_file with an invalid mode throws EINVAL", "[file]") {
    TempDir dir;
    write_file(dir / "f", "x");
    run_loop([&]() -> anyio::Task<> {
        const auto error = co_await open_error(dir / "f", "zz");
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::invalid_argument);
        CHECK(std::string(error->what()).find("\"zz\"") != std::string::npos);
    });
}

TEST_CASE("A file without permissions fails with EACCES (skipped when running as root)",
          "[file]") {
    if (running_as_root()) {
        WARN("skipped: root bypasses file permissions");
        return;
    }
    TempDir dir;
    const fs::path path = dir / "locked";
    write_file(path, "secret");
    fs::permissions(path, fs::perms::none);
    run_loop([&]() -> anyio::Task<> {
        const auto error = co_await open_error(path, "rb");
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::permission_denied);
        std::optional<fs::filesystem_error> path_error;
        try {
            (void)co_await anyio::Path(path).read_bytes();
        } catch (const fs::filesystem_error& e) {
            path_error = e;
        }
        REQUIRE(path_error.has_value());
        CHECK(path_error->code() == std::errc::permission_denied);
        CHECK(path_error->path1() == path);
    });
}

TEST_CASE("A failing call throws std::system_error naming the call and the path", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile reader = co_await open_file(dir / "f", "rb");
        std::optional<std::system_error> error;
        try {
            co_await reader.write("x");  // not open for writing
        } catch (const std::system_error& e) {
            error = e;
        }
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::bad_file_descriptor);
        CHECK(std::string(error->what()).find("AsyncFile::write") != std::string::npos);
        CHECK(std::string(error->what()).find((dir / "f").string()) != std::string::npos);
        AWAIT_CHECK(reader.read(), == "data");  // still usable after the error
        co_await reader.aclose();

        AsyncFile writer = co_await open_file(dir / "g", "wb");
        error.reset();
        try {
            (void)co_await writer.read();
        } catch (const std::system_error& e) {
            error = e;
        }
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::bad_file_descriptor);
        co_await writer.aclose();
    });
}

TEST_CASE("Calls on a closed or empty file throw ClosedResourceError; aclose twice is fine",
          "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(dir / "f");
        CHECK_FALSE(file.closed());
        co_await file.aclose();
        CHECK(file.closed());
        co_await file.aclose();  // a no-op, as in Python
        int failures = 0;
        auto expect_closed = [&](auto task) -> anyio::Task<> {
            try {
                co_await std::move(task);
            } catch (const anyio::ClosedResourceError& error) {
                ++failures;
                CHECK(std::string(error.what()).find((dir / "f").string()) != std::string::npos);
            }
        };
        co_await expect_closed(file.read());
        co_await expect_closed(file.readline());
        co_await expect_closed(file.write("x"));
        co_await expect_closed(file.seek(0));
        co_await expect_closed(file.tell());
        co_await expect_closed(file.flush());
        CHECK(failures == 6);

        // Moved from: empty, closed, and its calls fail the same way.
        AsyncFile source = co_await open_file(dir / "f");
        AsyncFile target = std::move(source);
        CHECK(source.closed());  // NOLINT(bugprone-use-after-move): that is the test
        bool threw = false;
        try {
            (void)co_await source.read();
        } catch (const anyio::ClosedResourceError& error) {
            threw = std::string(error.what()).find("moved from") != std::string::npos;
        }
        CHECK(threw);
        co_await source.aclose();
        AWAIT_CHECK(target.read(), == "data");
        co_await target.aclose();
        AsyncFile empty;
        CHECK(empty.closed());
        CHECK(empty.name().empty());
    });
}

TEST_CASE("An AsyncFile reports its name, mode and limiter", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        AsyncFile file = co_await open_file(dir / "f", "r+b", &limiter);
        CHECK(file.name() == (dir / "f").string());
        CHECK(file.mode() == "r+b");
        CHECK(file.limiter() == &limiter);
        co_await file.aclose();
        AsyncFile plain = co_await anyio::Path(dir / "f").open();
        CHECK(plain.mode() == "rb");
        CHECK(plain.limiter() == nullptr);
        co_await plain.aclose();
    });
}

TEST_CASE("AsyncFile calls from another thread throw std::logic_error", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(dir / "f");
        auto from_worker = [](AsyncFile* f) {
            try {
                auto task = f->tell();
            } catch (const std::logic_error& error) {
                return std::string(error.what());
            }
            return std::string();
        };
        const std::string message = co_await anyio::to_thread::run_sync(from_worker, &file);
        CHECK(message.find("AsyncFile::tell") != std::string::npos);
        CHECK(message.find("from_thread::run_sync") != std::string::npos);
        co_await file.aclose();
    });
}

// ---------------------------------------------------------------------------------------------
// Two tasks, one file; cancellation; limiters
// ---------------------------------------------------------------------------------------------

TEST_CASE("Calls on one file from several tasks run one at a time, in call order", "[file]") {
    TempDir dir;
    Fifo fifo(dir / "fifo");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(fifo.path(), "r+b");
        std::vector<std::string> got(3);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < 3; ++i) {
                tg.start_soon([&, i]() -> anyio::Task<> { got[i] = co_await file.read(5); });
            }
            co_await settle();  // all three called: the first reads, two wait their turn
            fifo.feed("aaaaabbbbbccccc");
        });
        CHECK(got == std::vector<std::string>{"aaaaa", "bbbbb", "ccccc"});
        co_await file.aclose();
    });
}

TEST_CASE("A call waiting for its file's turn is cancelled at once; the call in flight is "
          "shielded", "[file]") {
    TempDir dir;
    Fifo fifo(dir / "fifo");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(fifo.path(), "r+b");
        anyio::CancelScope first_scope;
        anyio::CancelScope second_scope;
        std::optional<std::string> first_got;
        bool second_cancelled = false;
        Stopwatch second_clock;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                auto body = [&]() -> anyio::Task<> {
                    first_got = co_await file.read(4);  // in flight on a worker
                    co_await anyio::checkpoint();       // the cancellation arrives here
                };
                co_await first_scope.run(body());
            });
            tg.start_soon([&]() -> anyio::Task<> {
                auto body = [&]() -> anyio::Task<> {
                    (void)co_await file.read(4);  // waits for the file's turn
                };
                co_await anyio::checkpoint();
                const bool finished = co_await second_scope.run(body());
                second_cancelled = !finished && second_scope.cancelled_caught();
            });
            co_await settle();
            second_clock = Stopwatch{};
            second_scope.cancel();
            first_scope.cancel();
            co_await settle();
            CHECK(second_cancelled);  // at once, while the first call still blocks
            CHECK(second_clock.elapsed() < prompt_bound);
            CHECK_FALSE(first_got.has_value());  // shielded: still waiting for its data
            fifo.feed("data");
        });
        CHECK(first_got == "data");  // the call completed, then the task was cancelled
        CHECK(first_scope.cancelled_caught());
        // The turn moved on: the file is usable.
        fifo.feed("more");
        AWAIT_CHECK(file.read(4), == "more");
        co_await file.aclose();
    });
}

TEST_CASE("A file call waiting for a limiter token is cancelled at once", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        AsyncFile file = co_await open_file(dir / "f", "rb", &limiter);
        const anyio::Path path(dir / "f", &limiter);
        Gate gate;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            // The only token, held by a blocked call.
            tg.start_soon([&]() -> anyio::Task<> {
                co_await anyio::to_thread::run_sync(anyio::to_thread::RunSyncOptions{&limiter},
                                                    &wait_for_gate, gate.future());
            });
            co_await settle();
            REQUIRE(limiter.borrowed_tokens() == 1);
            // Each of these waits for that token and is cancelled by a deadline.
            Stopwatch clock;
            AWAIT_CHECK_FALSE(anyio::move_on_after(50ms, file.read()));
            AWAIT_CHECK_FALSE(anyio::move_on_after(50ms, path.read_bytes()));
            AWAIT_CHECK_FALSE(anyio::move_on_after(50ms, path.exists()));
            auto open_it = [&]() -> anyio::Task<> {
                AsyncFile other = co_await open_file(dir / "f", "rb", &limiter);
            };
            AWAIT_CHECK_FALSE(anyio::move_on_after(50ms, open_it()));
            CHECK(clock.elapsed() < prompt_bound);
            CHECK(limiter.borrowed_tokens() == 1);
            CHECK(limiter.statistics().tasks_waiting == 0);
            gate.open();
        });
        // Nothing was lost: the token came back, and the file and the path still work.
        CHECK(limiter.borrowed_tokens() == 0);
        AWAIT_CHECK(file.read(), == "data");
        AWAIT_CHECK(path.read_text(), == "data");
        co_await file.aclose();
    });
}

TEST_CASE("File and Path calls borrow from their own limiter, not the default one", "[file]") {
    TempDir dir;
    Fifo fifo(dir / "fifo");
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(3);
        anyio::CapacityLimiter& fallback = anyio::to_thread::current_default_thread_limiter();
        AsyncFile file = co_await open_file(fifo.path(), "r+b", &limiter);
        std::string from_file;
        std::string from_path;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { from_file = co_await file.read(3); });
            co_await settle();
            CHECK(limiter.borrowed_tokens() == 1);
            CHECK(fallback.borrowed_tokens() == 0);
            fifo.feed("abc");
        });
        CHECK(from_file == "abc");
        co_await file.aclose();
        // read_bytes reads to the end: with no writer left, its open() waits for one.
        fifo.close_writer();
        std::atomic<bool> fed{false};  // Catch's macros are for the test's own thread
        std::jthread writer;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                from_path = co_await anyio::Path(fifo.path(), &limiter).read_bytes();
            });
            co_await settle();
            CHECK(limiter.borrowed_tokens() == 1);
            CHECK(fallback.borrowed_tokens() == 0);
            writer = std::jthread([&] { fed = fifo.write_to_next_reader("xyz"); });
        });
        writer.join();
        CHECK(fed);
        CHECK(from_path == "xyz");
        CHECK(limiter.borrowed_tokens() == 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Closing
// ---------------------------------------------------------------------------------------------

TEST_CASE("The destructor of an unclosed file closes it on a worker thread", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    run_loop([&]() -> anyio::Task<> {
        const std::size_t fds_before = fd_count();
        std::optional<AsyncFile> file(co_await open_file(dir / "f"));
        AWAIT_CHECK(file->read(2), == "da");
        CHECK(fd_count() == fds_before + 1);
        const std::uint64_t jobs_before = anyio::to_thread::statistics().jobs_completed;
        file.reset();  // returns at once; the close runs as a pool job
        // The worker closes the descriptor before the loop has processed the job's
        // completion (which counts it): wait for both.
        AWAIT_CHECK(eventually([&] {
            return fd_count() == fds_before &&
                   anyio::to_thread::statistics().jobs_completed > jobs_before;
        }));
        CHECK(fd_count() == fds_before);
        CHECK(anyio::to_thread::statistics().jobs_completed == jobs_before + 1);
    });
}

TEST_CASE("A file destroyed during another task's call is closed after that call", "[file]") {
    TempDir dir;
    Fifo fifo(dir / "fifo");
    run_loop([&]() -> anyio::Task<> {
        const std::size_t fds_before = fd_count();
        std::optional<AsyncFile> file(co_await open_file(fifo.path(), "r+b"));
        std::string got;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&](AsyncFile* f) -> anyio::Task<> { got = co_await f->read(3); },
                          &*file);
            co_await settle();
            file.reset();  // the read in flight keeps the file open
            CHECK(fd_count() == fds_before + 1);
            fifo.feed("abc");
        });
        CHECK(got == "abc");
        AWAIT_CHECK(eventually([&] { return fd_count() == fds_before; }));
    });
}

TEST_CASE("A cancelled aclose still closes the file", "[file]") {
    TempDir dir;
    Fifo fifo(dir / "fifo");
    run_loop([&]() -> anyio::Task<> {
        const std::size_t fds_before = fd_count();
        AsyncFile file = co_await open_file(fifo.path(), "r+b");
        std::string got;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { got = co_await file.read(2); });
            co_await settle();
            // aclose waits for the read's turn; cancelled there, it still closes afterwards.
            AWAIT_CHECK_FALSE(anyio::move_on_after(20ms, file.aclose()));
            CHECK(file.closed());
            CHECK(fd_count() == fds_before + 1);
            fifo.feed("ok");
        });
        CHECK(got == "ok");
        AWAIT_CHECK(eventually([&] { return fd_count() == fds_before; }));
        bool refused = false;
        try {
            (void)co_await file.read();
        } catch (const anyio::ClosedResourceError&) {
            refused = true;
        }
        CHECK(refused);
    });
}

TEST_CASE("A call queued behind aclose fails with ClosedResourceError", "[file]") {
    TempDir dir;
    Fifo fifo(dir / "fifo");
    run_loop([&]() -> anyio::Task<> {
        AsyncFile file = co_await open_file(fifo.path(), "r+b");
        std::string first;
        bool late_refused = false;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> { first = co_await file.read(2); });
            tg.start_soon([&]() -> anyio::Task<> { co_await file.aclose(); });
            tg.start_soon([&]() -> anyio::Task<> {
                try {
                    (void)co_await file.read(2);
                } catch (const anyio::ClosedResourceError&) {
                    late_refused = true;
                }
            });
            co_await settle();
            fifo.feed("okno");
        });
        CHECK(first == "ok");
        CHECK(late_refused);
        CHECK(file.closed());
    });
}

TEST_CASE("A file that outlives its loop is closed directly by its destructor", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    const std::size_t fds_before = fd_count();
    std::optional<AsyncFile> file(anyio::run([&]() -> anyio::Task<AsyncFile> {
        co_return co_await open_file(dir / "f");
    }));
    CHECK(fd_count() == fds_before + 1);
    file.reset();  // no loop runs on this thread: fclose here
    CHECK(fd_count() == fds_before);
}

TEST_CASE("Files left open by tasks still alive at loop shutdown are closed", "[file]") {
    TempDir dir;
    write_file(dir / "f", "data");
    const std::size_t fds_before = fd_count();
    anyio::run([&]() -> anyio::Task<> {
        const std::size_t fds_in_loop = fd_count();  // the loop's own descriptors included
        // A task nobody waits for, holding an open file when the loop ends.
        auto holder = [](fs::path path) -> anyio::Task<> {
            AsyncFile file = co_await open_file(path);
            co_await anyio::sleep(forever);
        };
        anyio::EventLoop::current()->spawn(holder(dir / "f"));
        AWAIT_CHECK(eventually([&] { return fd_count() == fds_in_loop + 1; }));
    });
    CHECK(fd_count() == fds_before);
}

// ---------------------------------------------------------------------------------------------
// The loop keeps running
// ---------------------------------------------------------------------------------------------

// The reads go into buffers allocated beforehand. A fresh multi-MiB result per read (read())
// would measure memory management instead: 40 workers page-faulting fresh buffers hold
// glibc's arena locks and the kernel's mmap lock, which the loop's own malloc/free then waits
// for, and freeing a 16 MiB result on the loop costs ~2 ms of munmap (measured: 40 x 16 MiB
// read() gives 60-130 ms of lateness on two loaded CPUs, mostly in free/munmap and in
// __lll_lock_wait_private). If the loop did these reads itself, all 40 would run in one
// loop turn: 80+ ms for 4 MiB each, more in Debug.
TEST_CASE("The loop keeps ticking while 40 large reads run", "[file][stress]") {
#ifdef ANYIO_TEST_SANITIZED
    constexpr std::size_t size = std::size_t{1} << 20;
    constexpr auto bound = 100ms;
#else
    constexpr std::size_t size = std::size_t{4} << 20;
    constexpr auto bound = 50ms;
#endif
    constexpr int readers = 40;
    TempDir dir;
    const std::string data = make_bytes(size);
    write_file(dir / "big", data);
    std::vector<std::vector<std::byte>> buffers(readers, std::vector<std::byte>(size + 1));
    Clock::duration worst{};
    int ticks = 0;
    Stopwatch total;
    // Page-cache reads are memory copies: 40 of them keep every CPU busy, and a fair
    // scheduler then makes the loop wait its turn among 40 busy threads (tens of ms on two
    // CPUs), whoever does the reading. Workers at the lowest priority take that out of the
    // measurement, which is left with what the test is about: whether the loop itself reads.
    anyio::EventLoop::Options options;
    options.on_thread_start = [] { ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19); };
    run_loop([&]() -> anyio::Task<> {
        // 40 workers first: starting 40 threads in one loop turn is a burst of its own.
        std::latch all_started(readers);
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            for (int i = 0; i < readers; ++i) {
                tg.start_soon([&]() -> anyio::Task<> {
                    co_await anyio::to_thread::run_sync([](std::latch* latch) { latch->arrive_and_wait(); },
                                                        &all_started);
                });
            }
            co_return;
        });
        total = Stopwatch{};
        bool reading = true;
        int finished = 0;
        co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
            tg.start_soon([&]() -> anyio::Task<> {
                while (reading) {
                    const auto due = Clock::now() + 1ms;
                    co_await anyio::sleep(1ms);
                    worst = std::max(worst, Clock::now() - due);
                    ++ticks;
                }
            });
            co_await anyio::task_group([&](anyio::TaskGroup& inner) -> anyio::Task<> {
                for (auto& buffer : buffers) {
                    inner.start_soon([&]() -> anyio::Task<> {
                        AsyncFile file = co_await open_file(dir / "big");
                        const std::size_t got = co_await file.read_into(buffer);
                        co_await file.aclose();
                        CHECK(got == size);
                        ++finished;  // the contents are checked once the clock stops
                    });
                }
                co_return;
            });
            reading = false;
        });
        CHECK(finished == readers);
    }, options);
    const auto worst_ms = std::chrono::duration<double, std::milli>(worst).count();
    INFO("worst lateness " << worst_ms << " ms over " << ticks << " ticks in "
                           << std::chrono::duration<double>(total.elapsed()).count() << " s");
    CHECK(worst < bound);
    CHECK(ticks > 0);
    const auto intact = std::count_if(buffers.begin(), buffers.end(), [&](const auto& buffer) {
        return std::memcmp(buffer.data(), data.data(), size) == 0;
    });
    CHECK(intact == readers);
}

// ---------------------------------------------------------------------------------------------
// Path
// ---------------------------------------------------------------------------------------------

// Runs `task` and returns the std::filesystem::filesystem_error it threw, if any.
template <class T>
anyio::Task<std::optional<fs::filesystem_error>> path_error(anyio::Task<T> task) {
    try {
        (void)co_await std::move(task);
    } catch (const fs::filesystem_error& error) {
        co_return error;
    }
    co_return std::nullopt;
}
anyio::Task<std::optional<fs::filesystem_error>> path_error(anyio::Task<void> task) {
    try {
        co_await std::move(task);
    } catch (const fs::filesystem_error& error) {
        co_return error;
    }
    co_return std::nullopt;
}

TEST_CASE("Path reads and writes bytes and text", "[file][path]") {
    TempDir dir;
    run_loop([&]() -> anyio::Task<> {
        const anyio::Path file(dir / "f");
        AWAIT_CHECK(file.write_text("some longer text\nline two\n"), == 26);
        AWAIT_CHECK(file.read_text(), == "some longer text\nline two\n");
        CHECK(read_file(file.path()) == "some longer text\nline two\n");
        const std::vector<std::byte> bytes{std::byte{0}, std::byte{255}, std::byte{10}};
        AWAIT_CHECK(file.write_bytes(bytes), == 3);  // truncates what was there
        AWAIT_CHECK(file.read_bytes(), == std::string("\0\xff\n", 3));
        AWAIT_CHECK(file.write_bytes(""), == 0);
        AWAIT_CHECK(file.read_bytes(), == "");
    });
}

TEST_CASE("Path read_bytes and write_bytes throw filesystem_error naming the path",
          "[file][path]") {
    TempDir dir;
    run_loop([&]() -> anyio::Task<> {
        const anyio::Path missing(dir / "missing");
        auto error = co_await path_error(missing.read_bytes());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        CHECK(error->path1() == missing.path());
        CHECK(std::string(error->what()).find("Path::read_bytes") != std::string::npos);

        error = co_await path_error(anyio::Path(dir.path()).read_text());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::is_a_directory);

        const anyio::Path orphan(dir / "no-dir" / "f");
        error = co_await path_error(orphan.write_bytes("x"));
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        CHECK(error->path1() == orphan.path());

        error = co_await path_error(anyio::Path(dir.path()).write_text("x"));
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::is_a_directory);
    });
}

TEST_CASE("Path::exists, is_file and is_dir tell files, directories and missing paths apart",
          "[file][path]") {
    TempDir dir;
    write_file(dir / "f", "x");
    run_loop([&]() -> anyio::Task<> {
        const anyio::Path file(dir / "f");
        const anyio::Path folder(dir.path());
        const anyio::Path missing(dir / "missing");
        AWAIT_CHECK(file.exists());
        AWAIT_CHECK(folder.exists());
        AWAIT_CHECK_FALSE(missing.exists());
        AWAIT_CHECK(file.is_file());
        AWAIT_CHECK_FALSE(folder.is_file());
        AWAIT_CHECK_FALSE(missing.is_file());
        AWAIT_CHECK(folder.is_dir());
        AWAIT_CHECK_FALSE(file.is_dir());
        AWAIT_CHECK_FALSE(missing.is_dir());
        AWAIT_CHECK_FALSE((file / "below").exists());  // ENOTDIR counts as missing
        // A loop of symbolic links is an error, not "missing".
        fs::create_symlink(dir / "loop-a", dir / "loop-b");
        fs::create_symlink(dir / "loop-b", dir / "loop-a");
        const auto error = co_await path_error(anyio::Path(dir / "loop-a").exists());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::too_many_symbolic_link_levels);
        CHECK(error->path1() == dir / "loop-a");
    });
}

TEST_CASE("Path::stat reports size and type, and throws for a missing path", "[file][path]") {
    TempDir dir;
    write_file(dir / "f", "12345");
    run_loop([&]() -> anyio::Task<> {
        const struct ::stat file_info = co_await anyio::Path(dir / "f").stat();
        CHECK(file_info.st_size == 5);
        CHECK(S_ISREG(file_info.st_mode));
        const struct ::stat dir_info = co_await anyio::Path(dir.path()).stat();
        CHECK(S_ISDIR(dir_info.st_mode));
        const auto error = co_await path_error(anyio::Path(dir / "missing").stat());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        CHECK(error->path1() == dir / "missing");
    });
}

TEST_CASE("Path::unlink removes a file; a missing path or a directory throws", "[file][path]") {
    TempDir dir;
    write_file(dir / "f", "x");
    fs::create_directory(dir / "sub");
    run_loop([&]() -> anyio::Task<> {
        const anyio::Path file(dir / "f");
        co_await file.unlink();
        CHECK_FALSE(fs::exists(file.path()));
        auto error = co_await path_error(file.unlink());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        CHECK(error->path1() == file.path());
        co_await file.unlink(/*missing_ok=*/true);  // no error
        error = co_await path_error(anyio::Path(dir / "sub").unlink());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::is_a_directory);
        CHECK(fs::is_directory(dir / "sub"));
    });
}

TEST_CASE("Path::rename moves a file and yields the new path; a missing source throws",
          "[file][path]") {
    TempDir dir;
    write_file(dir / "a", "contents");
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(1);
        const anyio::Path source(dir / "a", &limiter);
        const anyio::Path moved = co_await source.rename(dir / "b");
        CHECK(moved.path() == dir / "b");
        CHECK(moved.limiter() == &limiter);
        CHECK_FALSE(fs::exists(dir / "a"));
        CHECK(read_file(dir / "b") == "contents");
        const anyio::Path back = co_await moved.rename(anyio::Path(dir / "c"));
        CHECK(back.path() == dir / "c");
        const auto error = co_await path_error(source.rename(dir / "d"));
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        CHECK(error->path1() == dir / "a");
        CHECK(error->path2() == dir / "d");
    });
}

TEST_CASE("Path::mkdir follows Python's parents and exist_ok rules", "[file][path]") {
    TempDir dir;
    write_file(dir / "file", "x");
    run_loop([&]() -> anyio::Task<> {
        const anyio::Path plain(dir / "plain");
        co_await plain.mkdir();
        CHECK(fs::is_directory(plain.path()));
        auto error = co_await path_error(plain.mkdir());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::file_exists);
        CHECK(error->path1() == plain.path());
        co_await plain.mkdir(false, /*exist_ok=*/true);

        const anyio::Path deep(dir / "a" / "b" / "c");
        error = co_await path_error(deep.mkdir());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        co_await deep.mkdir(/*parents=*/true);
        CHECK(fs::is_directory(deep.path()));
        error = co_await path_error(deep.mkdir(true));
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::file_exists);
        co_await deep.mkdir(true, true);
        co_await anyio::Path(dir / "x" / "y" / "").mkdir(true);  // a trailing separator
        CHECK(fs::is_directory(dir / "x" / "y"));

        // An existing file is never acceptable, whatever the flags.
        error = co_await path_error(anyio::Path(dir / "file").mkdir(true, true));
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::file_exists);
        error = co_await path_error(anyio::Path(dir / "file" / "sub").mkdir(true, true));
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::not_a_directory);
    });
}

TEST_CASE("Path::iterdir lists a directory's entries; a missing path or a file throws",
          "[file][path]") {
    TempDir dir;
    write_file(dir / "one", "1");
    write_file(dir / "two", "2");
    fs::create_directory(dir / "sub");
    run_loop([&]() -> anyio::Task<> {
        anyio::CapacityLimiter limiter(2);
        const std::vector<anyio::Path> entries = co_await anyio::Path(dir.path(), &limiter).iterdir();
        std::vector<std::string> names;
        for (const auto& entry : entries) {
            names.push_back(entry.name());
            CHECK(entry.parent() == anyio::Path(dir.path()));
            CHECK(entry.limiter() == &limiter);
        }
        std::sort(names.begin(), names.end());
        CHECK(names == std::vector<std::string>{"one", "sub", "two"});
        AWAIT_CHECK(anyio::Path(dir / "sub").iterdir(), .empty());
        auto error = co_await path_error(anyio::Path(dir / "missing").iterdir());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::no_such_file_or_directory);
        CHECK(error->path1() == dir / "missing");
        error = co_await path_error(anyio::Path(dir / "one").iterdir());
        REQUIRE(error.has_value());
        CHECK(error->code() == std::errc::not_a_directory);
    });
}

TEST_CASE("Path accessors compose paths without touching the file system", "[file][path]") {
    // No loop runs here: none of these offload anything.
    anyio::CapacityLimiter limiter(1);
    const anyio::Path root("/srv/data", &limiter);
    const anyio::Path child = root / "logs" / "today.txt";
    CHECK(child.path() == fs::path("/srv/data/logs/today.txt"));
    CHECK(child.string() == "/srv/data/logs/today.txt");
    CHECK(child.name() == "today.txt");
    CHECK(child.parent() == anyio::Path("/srv/data/logs"));
    CHECK(child.limiter() == &limiter);
    CHECK(child.parent().limiter() == &limiter);
    CHECK((root / anyio::Path("x")).path() == fs::path("/srv/data/x"));
    CHECK(anyio::Path("a") == anyio::Path("a", &limiter));  // limiters are not compared
    CHECK_FALSE(anyio::Path("a") == anyio::Path("b"));
    CHECK(anyio::Path().path().empty());
}

TEST_CASE("Path and AsyncFile calls are lazy: nothing runs until the task is awaited",
          "[file][path]") {
    TempDir dir;
    {
        // Outside any loop: creating (and dropping) a call needs no loop and does nothing.
        auto task = anyio::Path(dir / "lazy").write_text("x");
    }
    CHECK_FALSE(fs::exists(dir / "lazy"));
    run_loop([&]() -> anyio::Task<> {
        const std::uint64_t jobs_before = anyio::to_thread::statistics().jobs_completed;
        {
            auto never_awaited = anyio::Path(dir / "lazy").write_text("x");
            auto never_opened = open_file(dir / "lazy", "wb");
        }
        co_await settle();
        CHECK(anyio::to_thread::statistics().jobs_completed == jobs_before);
        CHECK_FALSE(fs::exists(dir / "lazy"));
    });
}

// ---------------------------------------------------------------------------------------------
// The g++ 12 pitfall: temporaries with destructors inside the co_await expression
// ---------------------------------------------------------------------------------------------

TEST_CASE("User-facing calls with temporaries in the co_await expression are safe", "[file]") {
    TempDir dir;
    // Longer than any small-string buffer, so a double destruction is a double free that the
    // sanitizers (and glibc) report.
    const std::string long_text(100, 'q');
    run_loop([&]() -> anyio::Task<> {
        AWAIT_CHECK(anyio::Path(dir / "a-rather-long-file-name-for-the-heap").write_text(
                  std::string(long_text)), == long_text.size());
        AWAIT_CHECK((anyio::Path(dir.path()) / std::string("a-rather-long-file-name-for-the-heap"))
                  .read_text(), == long_text);
        AsyncFile file = co_await open_file(dir / std::string("another-long-file-name-on-the-heap"),
                                            std::string("w+b"));
        AWAIT_CHECK(file.write(std::string(long_text)), == long_text.size());
        AWAIT_CHECK(file.seek(0), == 0);
        AWAIT_CHECK(file.read(), == long_text);
        co_await file.aclose();
        AWAIT_CHECK(anyio::Path(dir.path()).iterdir(), .size() == 2);
        AWAIT_CHECK(anyio::Path(dir / "a-rather-long-file-name-for-the-heap")
                        .rename(anyio::Path(dir / std::string("renamed-with-a-long-name"))),
                    == anyio::Path(dir / "renamed-with-a-long-name"));
    });
}

}  // namespace
