-- wrk script: POST a fixed JSON body; print one machine-readable line when done.
-- The body and the Authorization header come from the environment (set by bench/run.py).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

-- Mixed load (the RSS soak): with BENCH_BODY_ALT set, requests alternate between the two bodies
-- on the same path, e.g. chat and streaming chat, which differ only in the model and "stream".
local alt = os.getenv("BENCH_BODY_ALT")
if alt ~= nil and alt ~= "" then
  local bodies = {wrk.body, alt}
  local sent = 0
  function request()
    sent = sent + 1
    return wrk.format(nil, nil, nil, bodies[sent % 2 + 1])
  end
end

-- Steady-state window (peers): with BENCH_COUNT_FROM set to a Unix second, responses are also
-- counted from that second on, so run.py can divide the CPU used after the warm-up part of the
-- same run by the requests completed in it.
local count_from = tonumber(os.getenv("BENCH_COUNT_FROM") or "")
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

if count_from then
  counted = 0
  function response(status, headers, body)
    if os.time() >= count_from then
      counted = counted + 1
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local n = -1
  if count_from then
    n = 0
    for _, thread in ipairs(threads) do
      n = n + thread:get("counted")
    end
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"counted":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, n, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
