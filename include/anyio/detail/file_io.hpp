// The blocking half of file.hpp: what runs on a worker thread inside to_thread::run_sync.
// Nothing here touches the loop. An open file's FILE* is used by one call at a time (the
// file's turn, file.hpp, serialises them), and each call is handed from the loop to a worker
// and back through run_sync, which orders one call's effects before the next call's.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "intrusive_list.hpp"
#include "loop_thread.hpp"

namespace anyio {
class CapacityLimiter;
}

namespace anyio::detail {

struct FileTurnTag {};
class FileTurnWaiter;

/// One open file, shared by its AsyncFile, the calls in flight on it and a pending
/// background close (each holds a shared_ptr, so none can free it under the others).
struct FileState {
    FileState(std::string path_, std::string mode_, CapacityLimiter* limiter_)
        : path(std::move(path_)), mode(std::move(mode_)), limiter(limiter_) {}
    FileState(const FileState&) = delete;
    FileState& operator=(const FileState&) = delete;
    // The last resort (no loop to hand the close to, or it never ran the background close):
    // the last owner closes the file on its own thread. Errors cannot be reported here.
    ~FileState() {
        if (fp != nullptr) std::fclose(fp);
    }

    // Worker side, used only by the call holding the turn.
    std::FILE* fp = nullptr;
    enum class Direction : unsigned char { none, reading, writing };
    Direction last = Direction::none;  // C requires a flush/seek between writes and reads

    // Immutable after open.
    const std::string path;
    const std::string mode;
    CapacityLimiter* const limiter;  // nullptr: the loop's default limiter

    // Loop side (the thread the file was opened on).
    LoopAffinity affinity;
    IntrusiveList<FileTurnWaiter, FileTurnTag> waiters;  // FIFO, after the holder
    bool busy = false;              // a call holds the turn
    bool closed = false;            // aclose() began, or the file was given up: calls fail
    bool close_when_idle = false;   // close in the background when the turn is released
};

[[noreturn]] inline void throw_file_error(int error, const char* what, const std::string& path) {
    throw std::system_error(error, std::generic_category(),
                            std::string("anyio::") + what + " \"" + path + "\"");
}

[[noreturn]] inline void throw_path_error(int error, const char* what,
                                          const std::filesystem::path& path) {
    throw std::filesystem::filesystem_error(std::string("anyio::") + what, path,
                                            std::error_code(error, std::generic_category()));
}

/// fopen with close-on-exec (Python opens files non-inheritable). A directory opened for
/// reading fails with EISDIR here, as Python's open() does, rather than at the first read.
inline void file_open(const std::shared_ptr<FileState>& file) {
    std::string mode = file->mode;
    if (mode.find('e') == std::string::npos) mode += 'e';  // glibc: O_CLOEXEC
    std::FILE* fp = std::fopen(file->path.c_str(), mode.c_str());
    if (fp == nullptr) {
        throw_file_error(errno, "open_file: cannot open", file->path + "\" with mode \"" +
                                                              file->mode);
    }
    struct ::stat info {};
    if (::fstat(::fileno(fp), &info) == 0 && S_ISDIR(info.st_mode)) {
        std::fclose(fp);
        throw_file_error(EISDIR, "open_file: cannot open", file->path + "\" with mode \"" +
                                                               file->mode);
    }
    file->fp = fp;
}

/// The FILE* for a call going in `direction`, after the flush or seek C requires when a
/// read follows a write or a write follows a read ("r+", "w+", "a+" modes).
inline std::FILE* file_for(FileState& file, FileState::Direction direction) {
    if (file.last != direction && file.last != FileState::Direction::none) {
        if (direction == FileState::Direction::reading) {
            std::fflush(file.fp);
        } else {
            ::fseeko(file.fp, 0, SEEK_CUR);  // fails harmlessly on pipes
        }
    }
    file.last = direction;
    return file.fp;
}

[[noreturn]] inline void throw_stream_error(FileState& file, int error, const char* what) {
    std::clearerr(file.fp);  // the next call starts afresh, as Python's would
    throw_file_error(error != 0 ? error : EIO, what, file.path);
}

/// Reads up to `count` bytes (all that is left when count is SIZE_MAX): fewer only at EOF.
inline std::string file_read(const std::shared_ptr<FileState>& file, std::size_t count) {
    std::FILE* fp = file_for(*file, FileState::Direction::reading);
    // Start with the rest of a regular file (+1 to see EOF in the same read), else 64 KiB.
    std::size_t capacity = 64 * 1024;
    struct ::stat info {};
    if (::fstat(::fileno(fp), &info) == 0 && S_ISREG(info.st_mode)) {
        const ::off_t position = ::ftello(fp);
        if (position >= 0 && info.st_size >= position) {
            capacity = static_cast<std::size_t>(info.st_size - position) + 1;
        }
    }
    std::string data(std::min(count, capacity), '\0');
    std::size_t used = 0;
    while (used < count) {
        if (used == data.size()) {
            data.resize(std::min(count, std::max<std::size_t>(data.size() * 2, 4096)));
        }
        const std::size_t wanted = data.size() - used;
        errno = 0;
        const std::size_t got = std::fread(data.data() + used, 1, wanted, fp);
        used += got;
        if (got < wanted) {
            if (std::ferror(fp)) throw_stream_error(*file, errno, "AsyncFile::read: reading");
            break;  // end of file
        }
    }
    data.resize(used);
    return data;
}

inline std::size_t file_read_into(const std::shared_ptr<FileState>& file,
                                  std::span<std::byte> buffer) {
    std::FILE* fp = file_for(*file, FileState::Direction::reading);
    errno = 0;
    const std::size_t got = std::fread(buffer.data(), 1, buffer.size(), fp);
    if (got < buffer.size() && std::ferror(fp)) {
        throw_stream_error(*file, errno, "AsyncFile::read_into: reading");
    }
    return got;
}

/// One line with its '\n' (the last line may have none); empty at end of file.
inline std::string file_readline(const std::shared_ptr<FileState>& file) {
    std::FILE* fp = file_for(*file, FileState::Direction::reading);
    char* line = nullptr;
    std::size_t capacity = 0;
    errno = 0;
    const ::ssize_t length = ::getline(&line, &capacity, fp);
    const std::unique_ptr<char, decltype(&std::free)> owned(line, &std::free);
    if (length < 0) {
        if (std::ferror(fp)) throw_stream_error(*file, errno, "AsyncFile::readline: reading");
        return {};
    }
    return std::string(line, static_cast<std::size_t>(length));
}

inline std::size_t file_write(const std::shared_ptr<FileState>& file,
                              std::span<const std::byte> data) {
    std::FILE* fp = file_for(*file, FileState::Direction::writing);
    errno = 0;
    if (std::fwrite(data.data(), 1, data.size(), fp) != data.size()) {
        throw_stream_error(*file, errno, "AsyncFile::write: writing");
    }
    return data.size();
}

inline std::int64_t file_seek(const std::shared_ptr<FileState>& file, std::int64_t offset,
                              int whence) {
    if (::fseeko(file->fp, static_cast<::off_t>(offset), whence) != 0) {
        throw_stream_error(*file, errno, "AsyncFile::seek: seeking in");
    }
    file->last = FileState::Direction::none;  // a seek satisfies C's flush/seek rule
    const ::off_t position = ::ftello(file->fp);
    if (position < 0) throw_stream_error(*file, errno, "AsyncFile::seek: seeking in");
    return position;
}

inline std::int64_t file_tell(const std::shared_ptr<FileState>& file) {
    const ::off_t position = ::ftello(file->fp);
    if (position < 0) throw_stream_error(*file, errno, "AsyncFile::tell: querying");
    return position;
}

inline void file_flush(const std::shared_ptr<FileState>& file) {
    if (std::fflush(file->fp) != 0) throw_stream_error(*file, errno, "AsyncFile::flush: flushing");
    file->last = FileState::Direction::none;
}

/// Closes the file; an error (a failed final flush) is reported, the file is closed anyway.
inline void file_close(const std::shared_ptr<FileState>& file) {
    std::FILE* fp = std::exchange(file->fp, nullptr);
    if (fp != nullptr && std::fclose(fp) != 0) {
        throw_file_error(errno, "AsyncFile::aclose: closing", file->path);
    }
}

/// The background close of an abandoned file: nobody is left to see an error.
inline void file_close_quietly(const std::shared_ptr<FileState>& file) noexcept {
    if (std::FILE* fp = std::exchange(file->fp, nullptr)) std::fclose(fp);
}

// ---- anyio::Path's blocking calls: errors are std::filesystem::filesystem_error ----

/// A file descriptor closed on scope exit (the read/write helpers below).
class Descriptor {
public:
    explicit Descriptor(int fd) noexcept : fd_(fd) {}
    Descriptor(const Descriptor&) = delete;
    Descriptor& operator=(const Descriptor&) = delete;
    ~Descriptor() {
        if (fd_ >= 0) ::close(fd_);
    }
    [[nodiscard]] int get() const noexcept { return fd_; }
    int release() noexcept { return std::exchange(fd_, -1); }

private:
    int fd_;
};

inline std::string path_read(const std::filesystem::path& path) {
    Descriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) throw_path_error(errno, "Path::read_bytes", path);
    struct ::stat info {};
    std::size_t capacity = 64 * 1024;
    if (::fstat(fd.get(), &info) == 0 && S_ISREG(info.st_mode)) {
        capacity = static_cast<std::size_t>(info.st_size) + 1;  // +1: EOF in the same read
    }
    std::string data(capacity, '\0');
    std::size_t used = 0;
    for (;;) {
        if (used == data.size()) data.resize(data.size() * 2);
        const ::ssize_t got = ::read(fd.get(), data.data() + used, data.size() - used);
        if (got < 0) {
            if (errno == EINTR) continue;
            throw_path_error(errno, "Path::read_bytes", path);
        }
        if (got == 0) break;
        used += static_cast<std::size_t>(got);
    }
    data.resize(used);
    return data;
}

/// Creates or truncates `path` and writes `data` (Python's write_bytes); returns its size.
inline std::size_t path_write(const std::filesystem::path& path, std::string_view data) {
    Descriptor fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666));
    if (fd.get() < 0) throw_path_error(errno, "Path::write_bytes", path);
    for (std::size_t done = 0; done < data.size();) {
        const ::ssize_t put = ::write(fd.get(), data.data() + done, data.size() - done);
        if (put < 0) {
            if (errno == EINTR) continue;
            throw_path_error(errno, "Path::write_bytes", path);
        }
        done += static_cast<std::size_t>(put);
    }
    if (::close(fd.release()) != 0) throw_path_error(errno, "Path::write_bytes", path);
    return data.size();
}

inline bool path_exists(const std::filesystem::path& path) { return std::filesystem::exists(path); }
inline bool path_is_file(const std::filesystem::path& path) {
    return std::filesystem::is_regular_file(path);
}
inline bool path_is_dir(const std::filesystem::path& path) {
    return std::filesystem::is_directory(path);
}

inline struct ::stat path_stat(const std::filesystem::path& path) {
    struct ::stat info {};
    if (::stat(path.c_str(), &info) != 0) throw_path_error(errno, "Path::stat", path);
    return info;
}

inline void path_unlink(const std::filesystem::path& path, bool missing_ok) {
    if (::unlink(path.c_str()) != 0 && !(missing_ok && errno == ENOENT)) {
        throw_path_error(errno, "Path::unlink", path);
    }
}

inline void path_rename(const std::filesystem::path& from, const std::filesystem::path& to) {
    std::filesystem::rename(from, to);
}

/// Python's Path.mkdir: missing parents are created only with `parents`; an existing
/// directory is an error unless `exist_ok` (an existing non-directory always is).
inline void path_mkdir(const std::filesystem::path& given, bool parents, bool exist_ok) {
    // "a/b/" names "a/b" (its parent is "a", not "a/b").
    const std::filesystem::path path = given.has_filename() ? given : given.parent_path();
    if (::mkdir(path.c_str(), 0777) == 0) return;
    const int error = errno;
    if (error == ENOENT && parents && path.has_relative_path() &&
        path.parent_path() != path) {
        path_mkdir(path.parent_path(), true, true);
        path_mkdir(path, false, exist_ok);
        return;
    }
    struct ::stat info {};
    if (error == EEXIST && exist_ok && ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) {
        return;
    }
    throw_path_error(error, "Path::mkdir", path);
}

inline std::vector<std::filesystem::path> path_list(const std::filesystem::path& path) {
    std::vector<std::filesystem::path> entries;
    for (const auto& entry : std::filesystem::directory_iterator(path)) {
        entries.push_back(entry.path());
    }
    return entries;
}

}  // namespace anyio::detail
