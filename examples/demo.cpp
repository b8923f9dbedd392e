// The demo: why to_thread::run_sync exists, and what the default limiter's 40 tokens do.
//
// One event loop serves 100 "requests"; each makes one blocking call of 40 ms (a stand-in for a
// database driver call, a file read, a CPU-heavy function). A heartbeat task on the same loop
// asks to wake every 10 ms; how late it wakes is how long every other task had to wait.
//   Act 1: the calls are made directly in the request tasks, on the loop thread: the loop runs
//          them one after the other and the heartbeat stalls for the whole 4 s.
//   Act 2: the same calls through to_thread::run_sync and the default limiter (40 tokens):
//          at most 40 run at once on worker threads, the other 60 wait in FIFO order, and the
//          heartbeat stays on time.
//   Act 3: current_default_thread_limiter().set_total_tokens(100): one wave instead of three;
//          then the idle worker threads are stopped after max_idle_time.
// Each act has a status line that redraws in place on a terminal, and prints plain lines when
// stdout is not one (CI, `demo | cat`). Colour only on a terminal whose TERM is not "dumb", and
// never with NO_COLOR set.
#include <anyio/anyio.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <unistd.h>

#include <fmt/color.h>
#include <fmt/core.h>

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kRequests = 100;
constexpr auto kWork = 40ms;          // each blocking call
constexpr auto kBeat = 10ms;          // the heartbeat's period
constexpr auto kSlowStep = 30ms;      // the blocked-loop detector's threshold (< kWork)
constexpr auto kMaxIdle = 300ms;      // the pool's max_idle_time (10 s by default)
constexpr int kWidth = 98;            // no output line is wider

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---- The terminal ---------------------------------------------------------------------------

struct Terminal {
    bool live = false;   // stdout is a terminal: status lines redraw in place
    bool color = false;  // ... whose TERM is not "dumb", and NO_COLOR is not set
    bool utf8 = false;   // the locale says UTF-8: the progress bar uses block characters
};
Terminal term;

Terminal detect_terminal() {
    Terminal t;
    t.live = ::isatty(STDOUT_FILENO) == 1;
    const char* term_name = std::getenv("TERM");
    const char* no_color = std::getenv("NO_COLOR");  // https://no-color.org: any non-empty value
    t.color = t.live && !(term_name != nullptr && std::string_view(term_name) == "dumb") &&
              !(no_color != nullptr && *no_color != '\0');
    for (const char* name : {"LC_ALL", "LC_CTYPE", "LANG"}) {
        if (const char* value = std::getenv(name); value != nullptr && *value != '\0') {
            std::string_view v(value);
            t.utf8 = v.find("UTF-8") != v.npos || v.find("utf8") != v.npos ||
                     v.find("utf-8") != v.npos || v.find("UTF8") != v.npos;
            break;
        }
    }
    return t;
}

std::string paint(std::string_view text, fmt::text_style style) {
    return term.color ? fmt::format(style, "{}", text) : std::string(text);
}
const fmt::text_style kTitle = fmt::emphasis::bold;
const fmt::text_style kBad = fmt::fg(fmt::terminal_color::red) | fmt::emphasis::bold;
const fmt::text_style kGood = fmt::fg(fmt::terminal_color::green) | fmt::emphasis::bold;

/// Strips the escape sequences paint() adds, for measuring what a line shows.
std::size_t visible_size(std::string_view s) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\x1b') {
            while (i < s.size() && s[i] != 'm') ++i;
        } else if ((s[i] & 0xC0) != 0x80) {
            ++n;
        }
    }
    return n;
}

/// Joins words that must stay on one line ("40 ms"): say() prints kGlue as a space.
constexpr char kGlue = '\x01';
std::string glued(std::string text) {
    std::replace(text.begin(), text.end(), ' ', kGlue);
    return text;
}

/// Prints `text` word-wrapped to kWidth columns, every line indented by `indent` spaces.
void say(std::string_view text, int indent = 2) {
    std::string line;
    auto flush = [&] {
        std::replace(line.begin(), line.end(), kGlue, ' ');
        fmt::print("{:{}}{}\n", "", indent, line);
        line.clear();
    };
    while (!text.empty()) {
        const auto space = text.find(' ');
        const std::string_view word = text.substr(0, space);
        text = space == text.npos ? std::string_view{} : text.substr(space + 1);
        if (!line.empty() && indent + visible_size(line) + 1 + visible_size(word) > kWidth) {
            flush();
        }
        if (!line.empty()) line += ' ';
        line += word;
    }
    if (!line.empty()) flush();
}

/// One status line. On a terminal it redraws in place (at most every 15 ms); otherwise it
/// prints a plain line when the progress enters a new quarter, and once at the end.
class StatusLine {
public:
    void show(int done, const std::string& rest, bool final = false) {
        const auto now = Clock::now();
        if (term.live) {
            if (!final && now - last_draw_ < 15ms) return;
        } else {
            const int quarter = done * 4 / kRequests;
            if (!final && quarter == last_quarter_) return;
            if (final && done == last_done_) return;  // the last plain line already says it
            last_quarter_ = quarter;
        }
        last_draw_ = now;
        last_done_ = done;
        std::string bar;
        constexpr int cells = 20;
        const int full = done * cells / kRequests;
        for (int i = 0; i < cells; ++i) {
            bar += i < full ? (term.utf8 ? "█" : "#") : (term.utf8 ? "░" : "-");
        }
        const std::string plain = fmt::format("  [{}] {:3}/{} | {}", bar, done, kRequests, rest);
        if (term.live) {
            const std::size_t width = visible_size(plain);
            fmt::print("\r{}{:{}}", plain, "", width < width_ ? width_ - width : 0);
            width_ = std::max(width_, width);
            if (final) fmt::print("\n");
            std::fflush(stdout);
        } else {
            fmt::print("{}\n", plain);
        }
    }

    /// A line that is not about progress (the reaper's countdown): redrawn on a terminal,
    /// printed when `key` changes otherwise.
    void show_text(const std::string& text, long key, bool final = false) {
        if (term.live) {
            const std::size_t width = visible_size(text);
            fmt::print("\r{}{:{}}", text, "", width < width_ ? width_ - width : 0);
            width_ = std::max(width_, width);
            if (final) fmt::print("\n");
            std::fflush(stdout);
        } else if (key != last_key_) {
            fmt::print("{}\n", text);
        }
        last_key_ = key;
    }

private:
    Clock::time_point last_draw_{};
    int last_quarter_ = -1;
    int last_done_ = -1;
    std::size_t width_ = 0;
    long last_key_ = -1;
};

// ---- The work and what we measure about it --------------------------------------------------

/// What the blocking calls record, on whichever thread they run. The timestamps of a call are
/// read on the loop only after its run_sync has returned (the completion is the handoff).
struct Probe {
    std::atomic<int> in_flight{0};
    std::atomic<int> peak{0};
    std::atomic<int> done{0};
    std::array<Clock::time_point, kRequests + 1> started{};
    std::array<Clock::time_point, kRequests + 1> ended{};
};

/// The blocking call: must never run on the loop thread (act 1 shows why).
void blocking_query(Probe& probe, int id) {
    probe.started[static_cast<std::size_t>(id)] = Clock::now();
    // relaxed: a statistic; nothing else is published through these counters.
    const int now_running = probe.in_flight.fetch_add(1, std::memory_order_relaxed) + 1;
    int peak = probe.peak.load(std::memory_order_relaxed);
    // relaxed: only the maximum matters, not its order with anything else.
    while (now_running > peak &&
           !probe.peak.compare_exchange_weak(peak, now_running, std::memory_order_relaxed)) {
    }
    std::this_thread::sleep_for(kWork);  // a database driver call, a file read...
    // relaxed: a statistic, as above.
    probe.in_flight.fetch_sub(1, std::memory_order_relaxed);
    probe.ended[static_cast<std::size_t>(id)] = Clock::now();
    // relaxed: the status line's progress count; the timestamps travel with the completion.
    probe.done.fetch_add(1, std::memory_order_relaxed);
}

/// A task that asks to wake every kBeat and records how late it wakes.
struct Heartbeat {
    Clock::time_point due{};
    Clock::duration worst{};
    /// The worst lag so far, counting a wake-up that is overdue right now.
    Clock::duration lag_so_far() const {
        const auto overdue = Clock::now() - due;
        return std::max(worst, due == Clock::time_point{} ? Clock::duration{} : overdue);
    }
};

anyio::Task<> heartbeat(Heartbeat& beat) {
    for (;;) {
        beat.due = Clock::now() + kBeat;
        co_await anyio::sleep_until(beat.due);
        beat.worst = std::max(beat.worst, Clock::now() - beat.due);
    }
}

// ---- The blocked-loop detector --------------------------------------------------------------
// LoopOptions::slow_callback_duration turns it on; on_slow_callback receives its reports, on
// the loop thread, or on the detector's watchdog thread for a step still running (hence the
// mutex). The demo keeps the first report of each act and counts the others.
struct SlowReports {
    std::mutex mutex;
    int act = 0;
    std::array<int, 4> ended{};          // steps reported once they ended
    std::array<int, 4> still_running{};  // the watchdog's reports of steps still running
    std::array<std::string, 4> first;
};
SlowReports slow_reports;

void on_slow_callback(const anyio::SlowCallbackInfo& info) {
    std::lock_guard lock(slow_reports.mutex);
    const auto act = static_cast<std::size_t>(slow_reports.act);
    if (slow_reports.ended[act] + slow_reports.still_running[act] == 0) {
        slow_reports.first[act] = info.message();
    }
    ++(info.still_running ? slow_reports.still_running : slow_reports.ended)[act];
}

/// Prints what the detector reported during `act`, if anything.
void tell_slow_reports(int act, bool expected) {
    std::lock_guard lock(slow_reports.mutex);
    const auto i = static_cast<std::size_t>(act);
    const int ended = slow_reports.ended[i];
    const int running = slow_reports.still_running[i];
    if (ended + running == 0) return;
    std::string watchdog;
    if (running > 0) {
        watchdog = fmt::format(" (and {} from its watchdog, while a step was still running)",
                               running);
    }
    if (expected) {
        say(fmt::format("The blocked-loop detector reported {} task step{} of {} or longer{}{}; "
                        "the first:",
                        ended, ended == 1 ? "" : "s",
                        glued(fmt::format("{} ms", kSlowStep.count())),
                        ended == kRequests ? ", one per request" : "", watchdog));
    } else {
        say(fmt::format("On this run the detector also flagged {} step{} of {} or longer{} (on a "
                        "busy machine any step can be delayed); the first:",
                        ended, ended == 1 ? "" : "s",
                        glued(fmt::format("{} ms", kSlowStep.count())), watchdog));
    }
    say(slow_reports.first[i], 4);
}

// ---- One act --------------------------------------------------------------------------------

enum class Mode { on_the_loop, run_sync };

struct Act {
    int number = 0;
    Mode mode = Mode::on_the_loop;
    Probe probe;
    Heartbeat beat;
    StatusLine status;
    Clock::duration wall{};
    std::int64_t peak_borrowed = 0;
    std::size_t peak_threads = 0;
    std::uint64_t threads_created = 0;  // by this act

    std::string status_text() {
        const auto pool = anyio::to_thread::statistics();
        peak_threads = std::max(peak_threads, pool.workers);
        std::string middle;
        if (mode == Mode::on_the_loop) {
            middle = "1 at a time, on the loop";
        } else {
            const auto limiter = anyio::to_thread::current_default_thread_limiter().statistics();
            peak_borrowed = std::max(peak_borrowed, limiter.borrowed_tokens);
            middle = fmt::format("running {:3}  waiting {:3}", limiter.borrowed_tokens,
                                 limiter.tasks_waiting);
        }
        const auto lag = beat.lag_so_far();
        return fmt::format("{:<24} | threads {:3} | heartbeat lag {}", middle, pool.workers,
                           paint(fmt::format("{:>7}", lag_text(lag)), lag > 50ms ? kBad : kGood));
    }
    void draw(bool final = false) {
        // relaxed: a progress count (see blocking_query).
        status.show(probe.done.load(std::memory_order_relaxed), status_text(), final);
    }

    static std::string lag_text(Clock::duration lag) {
        if (ms(lag) < 1) return fmt::format("{:.2f} ms", ms(lag));
        return ms(lag) < 10 ? fmt::format("{:.1f} ms", ms(lag))
                            : fmt::format("{:.0f} ms", ms(lag));
    }
    /// lag_text for prose: never split across lines.
    static std::string lag_words(Clock::duration lag) { return glued(lag_text(lag)); }
};

anyio::Task<> request(Act& act, int id) {
    if (act.mode == Mode::on_the_loop) {
        blocking_query(act.probe, id);  // the mistake act 1 shows
        act.draw();  // the loop's own redraw task cannot run: it is blocked too
    } else {
        co_await anyio::to_thread::run_sync(blocking_query, std::ref(act.probe), id);
    }
}

anyio::Task<> redraw(Act& act) {
    for (;;) {
        co_await anyio::sleep(term.live ? 15ms : 2ms);
        act.draw();
    }
}

anyio::Task<> run_act(Act& act) {
    {
        std::lock_guard lock(slow_reports.mutex);
        slow_reports.act = act.number;
    }
    const auto created_before = anyio::to_thread::statistics().threads_created;
    const auto start = Clock::now();
    co_await anyio::task_group([&](anyio::TaskGroup& tg) -> anyio::Task<> {
        tg.start_soon(heartbeat(act.beat));
        tg.start_soon(redraw(act));
        co_await anyio::task_group([&](anyio::TaskGroup& requests) -> anyio::Task<> {
            for (int id = 1; id <= kRequests; ++id) {
                const std::string name = fmt::format("request {}", id);  // in the reports
                requests.start_soon(anyio::named(name), request, std::ref(act), id);
            }
            co_return;
        });
        act.wall = Clock::now() - start;
        act.draw(true);
        tg.cancel_scope().cancel();  // the heartbeat and the redraw task
    });
    act.threads_created = anyio::to_thread::statistics().threads_created - created_before;
}

/// The requests' waves, from when each call started and ended: a call is in wave 1 if it
/// started before any call ended, else one wave after the latest wave that had a call end
/// before it started. Returns the ids of each wave as text, e.g. "1-40".
std::vector<std::string> waves(const Probe& probe) {
    std::vector<int> wave(kRequests + 1, 0);
    std::vector<int> order;
    for (int id = 1; id <= kRequests; ++id) order.push_back(id);
    std::sort(order.begin(), order.end(), [&](int a, int b) {
        return probe.started[static_cast<std::size_t>(a)] <
               probe.started[static_cast<std::size_t>(b)];
    });
    int waves_seen = 0;
    for (int id : order) {
        int before = 0;
        for (int other : order) {
            if (wave[static_cast<std::size_t>(other)] != 0 &&
                probe.ended[static_cast<std::size_t>(other)] <
                    probe.started[static_cast<std::size_t>(id)]) {
                before = std::max(before, wave[static_cast<std::size_t>(other)]);
            }
        }
        wave[static_cast<std::size_t>(id)] = before + 1;
        waves_seen = std::max(waves_seen, before + 1);
    }
    std::vector<std::string> text;
    for (int w = 1; w <= waves_seen; ++w) {
        std::string ids;
        for (int id = 1; id <= kRequests;) {
            if (wave[static_cast<std::size_t>(id)] != w) {
                ++id;
                continue;
            }
            int last = id;
            while (last + 1 <= kRequests && wave[static_cast<std::size_t>(last + 1)] == w) ++last;
            ids += fmt::format("{}{}", ids.empty() ? "" : ",",
                               last == id ? fmt::format("{}", id) : fmt::format("{}-{}", id, last));
            id = last + 1;
        }
        text.push_back(ids);
    }
    return text;
}

std::string waves_sentence(const std::vector<std::string>& w) {
    if (w.size() == 3) {
        return fmt::format("requests {} ran first, {} took the tokens they freed, then {} "
                           "(three waves)",
                           w[0], w[1], w[2]);
    }
    std::string s;
    for (std::size_t i = 0; i < w.size(); ++i) {
        s += fmt::format("{}wave {}: {}", i == 0 ? "" : "; ", i + 1, w[i]);
    }
    return s;
}

void act_title(int number, std::string_view what) {
    fmt::print("\n{}\n", paint(fmt::format("Act {}: {}", number, what), kTitle));
}

std::string count_word(std::size_t n) {
    constexpr std::array<std::string_view, 6> words{"no", "one", "two", "three", "four", "five"};
    return n < words.size() ? std::string(words[n]) : fmt::format("{}", n);
}

anyio::Task<int> amain() {
    const auto demo_start = Clock::now();
    fmt::print("{}\n\n", paint("anyio-cpp demo: one event loop, 100 requests, blocking calls",
                               kTitle));
    say(fmt::format("Each request makes one blocking call: {} of std::this_thread::sleep_for, "
                    "standing in for a database driver, a file read or a CPU-heavy function. A "
                    "heartbeat task shares the loop: it asks to wake every {}, and its lag (how "
                    "late it wakes) is how long every other task on the loop had to wait. The "
                    "blocked-loop detector is on (Options::slow_callback_duration = {}).",
                    glued(fmt::format("{} ms", kWork.count())),
                    glued(fmt::format("{} ms", kBeat.count())),
                    glued(fmt::format("{} ms", kSlowStep.count()))),
        0);

    // ---- Act 1: the mistake ----
    Act one;
    one.number = 1;
    one.mode = Mode::on_the_loop;
    act_title(1, "the blocking call made directly in each request task, on the loop");
    co_await run_act(one);
    say(fmt::format("{:.2f} s. The loop ran the {} calls one after the other ({} x {} ms) and "
                    "nothing else meanwhile: the heartbeat, due every {}, woke {} late (this "
                    "line was redrawn by the requests themselves). Every other request, timer "
                    "and socket on the loop would have waited as long.",
                    seconds(one.wall), kRequests, kRequests, kWork.count(),
                    glued(fmt::format("{} ms", kBeat.count())),
                    paint(Act::lag_words(one.beat.worst), kBad)));
    tell_slow_reports(1, true);

    // ---- Act 2: the fix ----
    Act two;
    two.number = 2;
    two.mode = Mode::run_sync;
    act_title(2, "the same calls through co_await to_thread::run_sync, default 40 tokens");
    co_await run_act(two);
    // The peaks below are read with relaxed loads: every call's completion, which run_sync
    // hands to the loop with acquire/release, came before this point.
    const auto tokens = anyio::to_thread::current_default_thread_limiter().total_tokens();
    const std::vector<std::string> waves_two = waves(two.probe);
    say(fmt::format("{:.2f} s. Each call borrowed one of the default limiter's {} tokens for as "
                    "long as it ran on a worker thread, so at most {} ran at once (peak {}) and "
                    "the other {} waited in line for a token, first come first served: {}. The "
                    "loop stayed free: the heartbeat's worst lag was {}, against {} in act 1. "
                    "The tokens bound how many threads block at once: 10,000 requests would "
                    "still use {} threads, and queue the rest.",
                    seconds(two.wall), tokens, tokens,
                    paint(fmt::format("{}", two.probe.peak.load(std::memory_order_relaxed)), kGood), kRequests - tokens,
                    waves_sentence(waves_two), paint(Act::lag_words(two.beat.worst), kGood),
                    Act::lag_words(one.beat.worst), tokens));
    tell_slow_reports(2, false);  // none, unless the machine stalled the loop

    // ---- Act 3: tuning ----
    Act three;
    three.number = 3;
    three.mode = Mode::run_sync;
    act_title(3, "current_default_thread_limiter().set_total_tokens(100), the same calls");
    anyio::to_thread::current_default_thread_limiter().set_total_tokens(100);
    const auto alive_before = anyio::to_thread::statistics().workers;
    co_await run_act(three);
    const std::vector<std::string> waves_three = waves(three.probe);
    say(fmt::format("{:.2f} s. With 100 tokens all {} calls ran at once (peak {}): {} wave{} "
                    "instead of {}. The {} idle threads of act 2 were reused and {} more "
                    "started. Raise the tokens when the calls mostly wait (network, disk, "
                    "sleep); keep them near the core count for CPU-heavy calls; give a "
                    "resource with its own bound (10 database connections) its own "
                    "CapacityLimiter(10).",
                    seconds(three.wall), kRequests,
                    paint(fmt::format("{}", three.probe.peak.load(std::memory_order_relaxed)), kGood),
                    count_word(waves_three.size()), waves_three.size() == 1 ? "" : "s",
                    count_word(waves_two.size()), alive_before, three.threads_created));
    tell_slow_reports(3, false);
    say(fmt::format("Idle worker threads stop after max_idle_time (10 s by default, {} in "
                    "this demo):",
                    glued(fmt::format("{} ms", kMaxIdle.count()))));
    const auto idle_since = Clock::now();
    Clock::duration all_stopped{};
    StatusLine reaper;
    for (;;) {
        const auto pool = anyio::to_thread::statistics();
        const bool stopped = pool.workers == 0;
        if (stopped) all_stopped = Clock::now() - idle_since;
        reaper.show_text(fmt::format("  {:4.2f} s idle | threads alive {:3} | stopped {:3}",
                                     seconds(Clock::now() - idle_since), pool.workers,
                                     pool.threads_pruned),
                         static_cast<long>(pool.workers), stopped);
        if (stopped || Clock::now() - idle_since > 3s) break;
        co_await anyio::sleep(term.live ? 15ms : 5ms);
    }

    // ---- Summary ----
    const auto total = Clock::now() - demo_start;
    auto row = [](std::string_view what, const std::string& a, const std::string& b,
                  const std::string& c) {
        return fmt::format("{:<17}  {:<18}  {:<18}  {}", what, a, b, c);
    };
    fmt::print("\n{}\n", paint(row(fmt::format("Summary ({:.1f} s)", seconds(total)),
                                   "act 1: on the loop", "act 2: 40 tokens", "act 3: 100 tokens"),
                               kTitle));
    fmt::print("{}\n", row("  wall time", fmt::format("{:.3f} s", seconds(one.wall)),
                           fmt::format("{:.3f} s", seconds(two.wall)),
                           fmt::format("{:.3f} s", seconds(three.wall))));
    fmt::print("{}\n", row("  heartbeat lag", Act::lag_text(one.beat.worst),
                           Act::lag_text(two.beat.worst), Act::lag_text(three.beat.worst)));
    fmt::print("{}\n",
               row("  threads used", fmt::format("{}", one.peak_threads),
                   fmt::format("{}", two.peak_threads),
                   all_stopped != Clock::duration{}
                       ? fmt::format("{} ({} new), all stopped {:.2f} s after",
                                     three.peak_threads, three.threads_created,
                                     seconds(all_stopped))
                       : fmt::format("{} ({} new)", three.peak_threads, three.threads_created)));
    co_return 0;
}

}  // namespace

int main() {
    term = detect_terminal();
    anyio::EventLoop::Options options;
    options.max_idle_time = kMaxIdle;  // so act 3 can show the reaping within the demo
    options.slow_callback_duration = kSlowStep;  // the blocked-loop detector, for act 1
    options.on_slow_callback = on_slow_callback;
    return anyio::run(amain(), options);
}
