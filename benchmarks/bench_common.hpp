// Helpers shared by the benchmark programs (anyio-cpp and its peers): timing, nearest-rank
// percentiles, resource usage and the one-JSON-object-per-line output of BENCH.md.
// Depends only on the standard library, POSIX and fmt, so the peer programs can use it too.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include <fmt/core.h>

namespace bench {

/// BENCH.md: every run does this many sequential round trips first, and nothing else.
constexpr int kWarmUpRoundTrips = 1000;

/// The offloaded jobs of the workloads: a no-op (W1, W2, W5) and a blocking sleep (W3, W6).
struct Noop {
    void operator()() const noexcept {}
};
struct SleepFor {
    std::chrono::milliseconds duration;
    void operator()() const { std::this_thread::sleep_for(duration); }
};


using Clock = std::chrono::steady_clock;

inline double to_us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
inline double to_ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
inline double to_s(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

/// Nearest-rank percentile: the ceil(q*n)-th smallest sample (sorts `samples`).
inline double percentile(std::vector<double>& samples, double q) {
    if (samples.empty()) return 0.0;
    std::sort(samples.begin(), samples.end());
    auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(samples.size())));
    rank = std::clamp<std::size_t>(rank, 1, samples.size());
    return samples[rank - 1];
}

/// Peak resident set size of this process so far, in KiB.
inline long max_rss_kb() {
    rusage usage{};
    ::getrusage(RUSAGE_SELF, &usage);
    return usage.ru_maxrss;
}

/// Resident set size right now, in bytes (/proc/self/statm, second field).
inline std::int64_t current_rss_bytes() {
    std::ifstream statm("/proc/self/statm");
    std::int64_t size = 0;
    std::int64_t resident = 0;
    statm >> size >> resident;
    return resident * static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));
}

/// Threads of this process right now (/proc/self/status "Threads:"), the main thread included.
inline long thread_count() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.rfind("Threads:", 0) == 0) return std::strtol(line.c_str() + 8, nullptr, 10);
    }
    return -1;
}

/// One JSON object, printed on one line. Keys keep their insertion order.
class JsonLine {
public:
    JsonLine& str(std::string_view key, std::string_view value) {
        add_key(key);
        body_ += '"';
        for (char c : value) {
            if (c == '"' || c == '\\') body_ += '\\';
            body_ += c;
        }
        body_ += '"';
        return *this;
    }
    template <class Int>
        requires std::is_integral_v<Int>
    JsonLine& num(std::string_view key, Int value) {
        add_key(key);
        body_ += fmt::format("{}", value);
        return *this;
    }
    /// A floating-point value with `digits` decimals (NaN/inf become null).
    JsonLine& num(std::string_view key, double value, int digits = 3) {
        add_key(key);
        if (std::isfinite(value)) {
            body_ += fmt::format("{:.{}f}", value, digits);
        } else {
            body_ += "null";
        }
        return *this;
    }
    JsonLine& boolean(std::string_view key, bool value) {
        add_key(key);
        body_ += value ? "true" : "false";
        return *this;
    }
    void print() const {
        fmt::print("{{{}}}\n", body_);
        std::fflush(stdout);
    }

private:
    void add_key(std::string_view key) {
        if (!body_.empty()) body_ += ',';
        body_ += '"';
        body_ += key;
        body_ += "\":";
    }
    std::string body_;
};

/// The fields every workload line starts with.
inline JsonLine base_line(std::string_view system, std::string_view workload, std::int64_t n,
                          double ops_per_s, std::vector<double>& latencies_us) {
    JsonLine line;
    line.str("system", system).str("workload", workload).num("n", n);
    line.num("ops_per_s", ops_per_s, 1);
    double p50 = percentile(latencies_us, 0.50);
    double p99 = percentile(latencies_us, 0.99);
    line.num("p50_us", p50, 2).num("p99_us", p99, 2);
    return line;
}

/// Command line: `prog [WORKLOAD] [--n N]`.
struct Args {
    std::string workload = "all";
    std::optional<std::int64_t> n;
};

inline Args parse_args(int argc, char** argv, const std::vector<std::string>& workloads) {
    Args args;
    auto usage = [&](const std::string& why) {
        std::string list;
        for (const auto& w : workloads) list += (list.empty() ? "" : "|") + w;
        fmt::print(stderr, "{}\nusage: {} [{}|all] [--n N]\n", why, argv[0], list);
        std::exit(2);
    };
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--n" || arg == "-n") {
            if (i + 1 >= argc) usage("--n needs a value");
            char* end = nullptr;
            long long value = std::strtoll(argv[++i], &end, 10);
            if (end == argv[i] || *end != '\0' || value <= 0) usage("--n needs a positive integer");
            args.n = value;
        } else if (arg.rfind("--n=", 0) == 0) {
            args.n = std::strtoll(arg.c_str() + 4, nullptr, 10);
            if (*args.n <= 0) usage("--n needs a positive integer");
        } else if (arg == "-h" || arg == "--help") {
            usage("");
        } else if (arg == "all" ||
                   std::find(workloads.begin(), workloads.end(), arg) != workloads.end()) {
            args.workload = arg;
        } else {
            usage("unknown argument: " + arg);
        }
    }
    return args;
}

inline bool selected(const Args& args, std::string_view workload) {
    return args.workload == "all" || args.workload == workload;
}

}  // namespace bench
