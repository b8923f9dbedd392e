// Peer: libuv (Debian libuv1-dev) for W1, W2 and W3 of BENCH.md: uv_queue_work on libuv's
// threadpool with UV_THREADPOOL_SIZE=40 (set before the first libuv call).
//   W1: sequential, the next work is queued from the previous one's after-work callback.
//   W2: N works queued at once; latency of one: from uv_queue_work to its after-work callback.
//   W3: 400 works of sleep(10 ms); a uv_timer (1 ms, restarted from its callback) measures
//       how late the loop wakes up.
// The first warm-up round trip checks that the work really ran on another thread.
//
//   libuv_offload [W1|W2|W3|all] [--n N]
#include <uv.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "../bench_common.hpp"

using namespace std::chrono_literals;
using bench::Clock;

namespace {

constexpr std::string_view kSystem = "libuv";
using bench::kWarmUpRoundTrips;

void check(int rc, const char* what) {
    if (rc != 0) {
        fmt::print(stderr, "libuv_offload: {} failed: {}\n", what, uv_strerror(rc));
        std::exit(1);
    }
}

void noop_work(uv_work_t*) {}
void sleep_work(uv_work_t*) { std::this_thread::sleep_for(10ms); }

/// A fresh loop per workload (the threadpool is process-wide and starts on first use).
struct Loop {
    uv_loop_t loop{};
    Loop() { check(uv_loop_init(&loop), "uv_loop_init"); }
    ~Loop() {
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
    }
    void run() { uv_run(&loop, UV_RUN_DEFAULT); }
};

// ---------------------------------------------------------------------------------------------
// Sequential round trips (warm-up and W1): the next work is queued from the after-work callback.
// ---------------------------------------------------------------------------------------------
struct Sequential {
    uv_work_t req{};
    uv_loop_t* loop = nullptr;
    std::int64_t n = 0;
    std::int64_t done = 0;
    std::vector<double> latency_us;  // empty: don't record
    Clock::time_point start{};
    Clock::time_point previous{};
    // Warm-up check: which thread ran the first work.
    std::thread::id loop_thread = std::this_thread::get_id();
    std::thread::id first_work_thread{};

    static void first_work(uv_work_t* req) {
        static_cast<Sequential*>(req->data)->first_work_thread = std::this_thread::get_id();
    }

    static void after(uv_work_t* req, int status) {
        check(status, "work");
        auto* self = static_cast<Sequential*>(req->data);
        auto now = Clock::now();
        if (!self->latency_us.empty()) {
            self->latency_us[static_cast<std::size_t>(self->done)] = bench::to_us(now - self->previous);
        }
        self->previous = now;
        if (++self->done < self->n) self->queue(noop_work);
    }

    void queue(uv_work_cb work) {
        req.data = this;
        check(uv_queue_work(loop, &req, work, &after), "uv_queue_work");
    }

    void run(Loop& l, std::int64_t count, bool record, bool verify_thread = false) {
        loop = &l.loop;
        n = count;
        done = 0;
        latency_us.assign(record ? static_cast<std::size_t>(count) : 0, 0.0);
        start = previous = Clock::now();
        queue(verify_thread ? &first_work : noop_work);
        l.run();
        if (done != n) {
            fmt::print(stderr, "libuv_offload: the loop stopped after {} of {} works\n", done, n);
            std::exit(1);
        }
    }
};

void warm_up(Loop& loop) {
    Sequential seq;
    seq.run(loop, kWarmUpRoundTrips, false, true);
    if (seq.first_work_thread == std::thread::id{} || seq.first_work_thread == seq.loop_thread) {
        fmt::print(stderr, "libuv_offload: uv_queue_work ran the work on the loop thread\n");
        std::exit(1);
    }
}

void add_resources(bench::JsonLine& line) {
    // libuv starts all its threadpool threads at once; count what the process really has.
    line.num("threads_created", bench::thread_count() - 1).num("max_rss_kb", bench::max_rss_kb());
}

void w1(std::int64_t n) {
    Loop loop;
    warm_up(loop);
    Sequential seq;
    seq.run(loop, n, true);
    auto wall = seq.previous - seq.start;
    auto line = bench::base_line(kSystem, "W1", n, static_cast<double>(n) / bench::to_s(wall),
                                 seq.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    add_resources(line);
    line.print();
}

// ---------------------------------------------------------------------------------------------
// Many works queued at once (W2, W3).
// ---------------------------------------------------------------------------------------------
struct Many;

struct Call {
    uv_work_t req{};
    Many* many = nullptr;
    std::size_t index = 0;
    Clock::time_point queued_at{};
};

struct Many {
    std::vector<Call> calls;
    std::vector<double> latency_us;
    std::int64_t remaining = 0;
    Clock::time_point last_done{};
    // W3's lag probe.
    uv_timer_t timer{};
    Clock::time_point timer_requested_at{};
    std::vector<double> lag_us;

    static void after(uv_work_t* req, int status) {
        check(status, "work");
        auto* call = static_cast<Call*>(req->data);
        Many* self = call->many;
        auto now = Clock::now();
        self->latency_us[call->index] = bench::to_us(now - call->queued_at);
        if (--self->remaining == 0) self->last_done = now;
    }

    void arm_timer() {
        uv_update_time(timer.loop);  // libuv caches the loop time; start from the real now
        timer_requested_at = Clock::now();
        check(uv_timer_start(&timer, &on_timer, 1, 0), "uv_timer_start");
    }

    static void on_timer(uv_timer_t* timer) {
        auto* self = static_cast<Many*>(timer->data);
        self->lag_us.push_back(bench::to_us(Clock::now() - (self->timer_requested_at + 1ms)));
        if (self->remaining > 0) {
            self->arm_timer();
        } else {
            uv_close(reinterpret_cast<uv_handle_t*>(timer), nullptr);
        }
    }

    Clock::duration run(Loop& loop, std::int64_t n, uv_work_cb work, bool probe) {
        calls.resize(static_cast<std::size_t>(n));
        latency_us.resize(static_cast<std::size_t>(n));
        remaining = n;
        auto start = Clock::now();
        if (probe) {
            check(uv_timer_init(&loop.loop, &timer), "uv_timer_init");
            timer.data = this;
            arm_timer();
        }
        for (std::size_t i = 0; i < calls.size(); ++i) {
            Call& call = calls[i];
            call.req.data = &call;
            call.many = this;
            call.index = i;
            call.queued_at = Clock::now();
            check(uv_queue_work(&loop.loop, &call.req, work, &after), "uv_queue_work");
        }
        loop.run();
        if (remaining != 0) {
            fmt::print(stderr, "libuv_offload: the loop stopped with {} works pending\n", remaining);
            std::exit(1);
        }
        return last_done - start;
    }
};

void w2(std::int64_t n) {
    Loop loop;
    warm_up(loop);
    Many many;
    auto wall = many.run(loop, n, noop_work, false);
    auto line = bench::base_line(kSystem, "W2", n, static_cast<double>(n) / bench::to_s(wall),
                                 many.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    add_resources(line);
    line.print();
}

void w3(std::int64_t n) {
    Loop loop;
    warm_up(loop);
    Many many;
    many.lag_us.reserve(100000);
    auto wall = many.run(loop, n, sleep_work, true);
    auto line = bench::base_line(kSystem, "W3", n, static_cast<double>(n) / bench::to_s(wall),
                                 many.latency_us);
    line.num("wall_ms", bench::to_ms(wall), 2);
    std::size_t samples = many.lag_us.size();
    line.num("loop_lag_p50_us", bench::percentile(many.lag_us, 0.50), 2)
        .num("loop_lag_p99_us", bench::percentile(many.lag_us, 0.99), 2)
        .num("loop_lag_max_us", many.lag_us.empty() ? 0.0 : many.lag_us.back(), 2)
        .num("lag_samples", samples);
    add_resources(line);
    line.print();
}

}  // namespace

int main(int argc, char** argv) {
    // Before any libuv call: the threadpool reads it once, when it starts.
    ::setenv("UV_THREADPOOL_SIZE", "40", 1);
    bench::Args args = bench::parse_args(argc, argv, {"W1", "W2", "W3"});
    if (bench::selected(args, "W1")) w1(args.n.value_or(20000));
    if (bench::selected(args, "W2")) w2(args.n.value_or(200000));
    if (bench::selected(args, "W3")) w3(args.n.value_or(400));
    return 0;
}
