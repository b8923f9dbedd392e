// anyio-cpp: open_file, AsyncFile and Path (anyio's _fileio): files through the worker pool.
//
//   co_await f.read(n)
//     -> the file's turn: one call at a time per file, FIFO; waiting is cancellable
//     -> to_thread::run_sync on the file's limiter (the default one unless given): waiting
//        for a token is cancellable, the blocking call itself is shielded
//     -> fread on a worker thread; the result or the error comes back to the loop
//
// The loop thread never touches the disk: every call that does is one run_sync. The blocking
// half lives in detail/file_io.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/stat.h>

#include "capacity_limiter.hpp"
#include "detail/file_io.hpp"
#include "detail/file_turn.hpp"
#include "errors.hpp"
#include "event_loop.hpp"
#include "task.hpp"
#include "to_thread.hpp"

namespace anyio {

class AsyncFile;

namespace detail {
Task<AsyncFile> open_file_task(std::shared_ptr<FileState> file);

}  // namespace detail

/// An open file whose calls run on worker threads (anyio.AsyncFile). Obtain one from
/// `co_await anyio::open_file(...)`. Bytes in, bytes out: text modes are the same as binary
/// ones on POSIX, and nothing is decoded.
///
/// Loop-thread only (the thread of the loop that opened it; other threads get
/// std::logic_error). Move-only; a moved-from or default-constructed AsyncFile is empty and
/// its calls throw ClosedResourceError, like those of a closed file.
///
/// Concurrency: calls on one file are serialised, first come first served: a second task's
/// call waits until the first one's has returned (Python's file lock does the same on the
/// threads). Waiting for the file's turn or for a limiter token is a cancellation point that
/// takes effect at once; the blocking call itself is shielded (a cancelled caller waits for
/// it and gets Cancelled at its next checkpoint).
///
/// Allocates: each call's coroutine frame, and what it returns; the file's state once.
/// Buffers passed to write/read_into are borrowed: keep them alive until the call returns.
/// Errors: std::system_error naming the call and the path, with the errno of the failure
/// (the stream's error flag is cleared so the next call starts afresh).
///
/// Closing: `co_await aclose()` closes it (a failed final flush is reported; the file is
/// closed anyway). The destructor of an unclosed file never blocks the loop: on the loop
/// thread it hands the close to a worker (a background task, on the default limiter, after
/// any calls still in flight or queued on it); with no loop running on the destroying thread
/// (for instance after anyio::run returned) or while the loop shuts down, it closes the file
/// directly. Errors of that close are dropped. Destroy it on its loop's thread or after the
/// loop has finished.
class AsyncFile {
public:
    /// read()'s default: everything up to the end of the file.
    static constexpr std::size_t all = std::numeric_limits<std::size_t>::max();

    AsyncFile() noexcept = default;
    AsyncFile(AsyncFile&&) noexcept = default;
    AsyncFile& operator=(AsyncFile&& other) noexcept {
        if (this != &other) {
            discard();
            file_ = std::move(other.file_);
        }
        return *this;
    }
    AsyncFile(const AsyncFile&) = delete;
    AsyncFile& operator=(const AsyncFile&) = delete;
    ~AsyncFile() { discard(); }

    /// Reads `count` bytes, fewer only at end of file ("" at end of file).
    Task<std::string> read(std::size_t count = all) {
        return call("AsyncFile::read", &detail::file_read, count);
    }
    /// Reads into `buffer` (filled unless end of file comes first); yields the byte count.
    Task<std::size_t> read_into(std::span<std::byte> buffer) {
        return call("AsyncFile::read_into", &detail::file_read_into, buffer);
    }
    /// The next line with its "\n" (the last one may have none); "" at end of file.
    Task<std::string> readline() { return call("AsyncFile::readline", &detail::file_readline); }
    /// Writes all of `data` (buffered: see flush); yields its size.
    Task<std::size_t> write(std::span<const std::byte> data) {
        return call("AsyncFile::write", &detail::file_write, data);
    }
    Task<std::size_t> write(std::string_view data) {
        return write(std::as_bytes(std::span(data.data(), data.size())));
    }
    /// Moves the position (`whence`: SEEK_SET, SEEK_CUR, SEEK_END); yields the new one.
    Task<std::int64_t> seek(std::int64_t offset, int whence = SEEK_SET) {
        return call("AsyncFile::seek", &detail::file_seek, offset, whence);
    }
    Task<std::int64_t> tell() { return call("AsyncFile::tell", &detail::file_tell); }
    /// Hands buffered writes to the OS (fflush; not fsync).
    Task<void> flush() { return call("AsyncFile::flush", &detail::file_flush); }

    /// Closes the file after the calls ahead of it; later calls throw ClosedResourceError.
    /// Closing a closed or empty file does nothing. If cancelled, the file is still closed
    /// (in the background) and Cancelled propagates.
    Task<void> aclose() {
        if (file_ != nullptr) file_->affinity.check("AsyncFile::aclose");
        return detail::file_aclose(file_);
    }

    /// True once aclose() has begun, and for an empty AsyncFile.
    [[nodiscard]] bool closed() const noexcept { return file_ == nullptr || file_->closed; }
    /// The path and mode given to open_file ("" for an empty AsyncFile).
    [[nodiscard]] std::string_view name() const noexcept {
        return file_ != nullptr ? std::string_view(file_->path) : std::string_view();
    }
    [[nodiscard]] std::string_view mode() const noexcept {
        return file_ != nullptr ? std::string_view(file_->mode) : std::string_view();
    }
    /// The limiter the calls borrow from (nullptr: the loop's default).
    [[nodiscard]] CapacityLimiter* limiter() const noexcept {
        return file_ != nullptr ? file_->limiter : nullptr;
    }

private:
    friend Task<AsyncFile> detail::open_file_task(std::shared_ptr<detail::FileState>);
    explicit AsyncFile(std::shared_ptr<detail::FileState> file) noexcept : file_(std::move(file)) {}

    template <class Fn, class... Args>
    Task<detail::file_result_t<Fn, Args...>> call(const char* what, Fn fn, Args... args) {
        if (file_ != nullptr) file_->affinity.check(what);
        return detail::file_call(file_, what, fn, args...);
    }

    void discard() noexcept {
        std::shared_ptr<detail::FileState> file = std::move(file_);
        if (file == nullptr) return;
        if (file->busy) {
            file->close_when_idle = true;  // after the calls in flight and queued on it
        } else if (!file->closed) {
            detail::close_in_background(std::move(file));
        }
    }

    std::shared_ptr<detail::FileState> file_;
};

namespace detail {
inline Task<AsyncFile> open_file_task(std::shared_ptr<FileState> file) {
    co_await to_thread::run_sync(to_thread::RunSyncOptions{.limiter = file->limiter}, &file_open,
                                 file);
    file->affinity.check("open_file");  // binds the file to this loop
    co_return AsyncFile(std::move(file));
}
}  // namespace detail

/// Opens `path` on a worker (anyio.open_file): `mode` as for fopen ("rb", "wb", "ab", "r+b",
/// "w+b", ...; "x" after the first letter for exclusive creation), close-on-exec always.
/// Every call on the file borrows from `limiter` (nullptr: the loop's default); the limiter
/// must outlive the file's calls. Throws std::system_error naming the path and the mode
/// (ENOENT, EACCES, EISDIR, EINVAL for a bad mode ...), NoEventLoopError with no loop, and
/// Cancelled if cancelled while waiting for a token (nothing is opened then).
inline Task<AsyncFile> open_file(const std::filesystem::path& path, std::string_view mode = "rb",
                                 CapacityLimiter* limiter = nullptr) {
    return detail::open_file_task(
        std::make_shared<detail::FileState>(path.string(), std::string(mode), limiter));
}

/// A path whose file-system calls run on worker threads (anyio.Path), each one
/// to_thread::run_sync on the Path's limiter (nullptr: the loop's default; it must outlive
/// the calls). The pure accessors (path(), string(), name(), parent(), operator/) do not
/// touch the file system and run inline.
///
/// A value type: copy it freely, use it on any thread that runs a loop (calls throw
/// NoEventLoopError elsewhere). Each call allocates its coroutine frame and a copy of the
/// path for the worker. Cancellation: waiting for a token is cancelled at once; the blocking
/// call itself is shielded. Errors are the std::filesystem::filesystem_error the blocking
/// call threw, with the path in it (path1(); for rename also path2()). Buffers given to
/// write_bytes/write_text are borrowed until the call returns.
class Path {
public:
    Path() = default;
    Path(std::filesystem::path path, CapacityLimiter* limiter = nullptr)  // NOLINT: implicit
        : path_(std::move(path)), limiter_(limiter) {}

    [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
    [[nodiscard]] std::string string() const { return path_.string(); }
    [[nodiscard]] std::string name() const { return path_.filename().string(); }
    [[nodiscard]] Path parent() const { return {path_.parent_path(), limiter_}; }
    [[nodiscard]] CapacityLimiter* limiter() const noexcept { return limiter_; }
    /// A child path, with the same limiter.
    friend Path operator/(const Path& base, const std::filesystem::path& child) {
        return {base.path_ / child, base.limiter_};
    }
    friend Path operator/(const Path& base, const Path& child) { return base / child.path_; }
    /// Compares the paths (not the limiters), as anyio does.
    friend bool operator==(const Path& a, const Path& b) noexcept { return a.path_ == b.path_; }

    /// The file's contents (read_text: the same bytes; nothing is decoded).
    [[nodiscard]] Task<std::string> read_bytes() const { return call(&detail::path_read); }
    [[nodiscard]] Task<std::string> read_text() const { return call(&detail::path_read); }
    /// Creates or truncates the file and writes `data`; yields its size.
    [[nodiscard]] Task<std::size_t> write_bytes(std::string_view data) const {
        return call(&detail::path_write, data);
    }
    [[nodiscard]] Task<std::size_t> write_bytes(std::span<const std::byte> data) const {
        return write_bytes(std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
    }
    [[nodiscard]] Task<std::size_t> write_text(std::string_view text) const {
        return call(&detail::path_write, text);
    }
    /// False for a missing path; other failures (EACCES on a parent, ELOOP) throw.
    [[nodiscard]] Task<bool> exists() const { return call(&detail::path_exists); }
    [[nodiscard]] Task<bool> is_file() const { return call(&detail::path_is_file); }
    [[nodiscard]] Task<bool> is_dir() const { return call(&detail::path_is_dir); }
    /// stat(2), following symbolic links (os.stat_result is this struct in Python).
    [[nodiscard]] Task<struct ::stat> stat() const { return call(&detail::path_stat); }
    /// Removes a file or symbolic link (not a directory: EISDIR). A missing path throws
    /// unless `missing_ok`.
    [[nodiscard]] Task<void> unlink(bool missing_ok = false) const {
        return call(&detail::path_unlink, missing_ok);
    }
    /// Renames to `target` (replacing a file there, as rename(2)); yields the new path.
    [[nodiscard]] Task<Path> rename(const Path& target) const {
        return rename_task(limiter_, path_, target.path_);
    }
    [[nodiscard]] Task<Path> rename(const std::filesystem::path& target) const {
        return rename_task(limiter_, path_, target);
    }
    /// Creates the directory (Python's mkdir: `parents` creates missing parents,
    /// `exist_ok` accepts an existing directory, never an existing file).
    [[nodiscard]] Task<void> mkdir(bool parents = false, bool exist_ok = false) const {
        return call(&detail::path_mkdir, parents, exist_ok);
    }
    /// The directory's entries (not "." and ".."), in no particular order.
    [[nodiscard]] Task<std::vector<Path>> iterdir() const { return iterdir_task(limiter_, path_); }
    /// open_file(path(), mode, limiter()).
    [[nodiscard]] Task<AsyncFile> open(std::string_view mode = "rb") const {
        return open_file(path_, mode, limiter_);
    }

private:
    template <class Fn, class... Args>
    using result_t = std::invoke_result_t<Fn, const std::filesystem::path&, Args...>;

    template <class Fn, class... Args>
    Task<result_t<Fn, Args...>> call(Fn fn, Args... args) const {
        return call_task(limiter_, fn, path_, args...);
    }
    // Coroutines take their arguments by value: a Path (even a temporary) may go away while
    // its call runs.
    template <class Fn, class... Args>
    static Task<result_t<Fn, Args...>> call_task(CapacityLimiter* limiter, Fn fn,
                                                 std::filesystem::path path, Args... args) {
        co_return co_await to_thread::run_sync(to_thread::RunSyncOptions{.limiter = limiter}, fn,
                                               path, args...);
    }
    static Task<Path> rename_task(CapacityLimiter* limiter, std::filesystem::path from,
                                  std::filesystem::path to) {
        co_await to_thread::run_sync(to_thread::RunSyncOptions{.limiter = limiter},
                                     &detail::path_rename, from, to);
        co_return Path(std::move(to), limiter);
    }
    static Task<std::vector<Path>> iterdir_task(CapacityLimiter* limiter,
                                                std::filesystem::path path) {
        std::vector<std::filesystem::path> names = co_await to_thread::run_sync(
            to_thread::RunSyncOptions{.limiter = limiter}, &detail::path_list, path);
        std::vector<Path> entries;
        entries.reserve(names.size());
        for (auto& name : names) entries.emplace_back(std::move(name), limiter);
        co_return entries;
    }

    std::filesystem::path path_;
    CapacityLimiter* limiter_ = nullptr;
};

}  // namespace anyio
