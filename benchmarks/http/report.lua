-- wrk script for benchmarks/http/run.sh: at the end of a run, prints one JSON line (prefixed
-- "WRK_JSON ") with the request count, the rate, exact nearest-rank latency percentiles
-- (the ceil(q*n)-th smallest latency, in ms; wrk keeps latencies at 1 us resolution) and the
-- error counts. wrk's own percentile(p) takes rank round(p/100*n + 0.5); asking it for
-- p = 100*(r - 0.5)/n makes that rank exactly r. n is the number of completed requests,
-- which is the number of recorded latencies as long as no request outlived --timeout
-- (errors.timeout = 0; run.sh passes a generous --timeout).

local function nearest_rank(latency, q, n)
   if n == 0 then return 0 end
   local r = math.ceil(q * n)
   if r < 1 then r = 1 end
   if r > n then r = n end
   return latency:percentile(100 * (r - 0.5) / n)
end

function done(summary, latency, requests)
   local n = summary.requests
   local seconds = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_s":%.3f,"req_per_s":%.1f,' ..
      '"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f,' ..
      '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_timeout":%d,' ..
      '"non_2xx":%d,"bytes":%d}\n',
      n, seconds, seconds > 0 and n / seconds or 0,
      nearest_rank(latency, 0.50, n) / 1000, nearest_rank(latency, 0.99, n) / 1000,
      latency.max / 1000, latency.mean / 1000,
      e.connect, e.read, e.write, e.timeout, e.status, summary.bytes))
end
