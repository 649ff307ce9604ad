-- wrk script for the overhead benchmark: POST one JSON body, check every answer.
--
-- wrk -s post.lua URL -- BODY_FILE MARKERS [HEADER ...] [--count=N]
--   BODY_FILE  a file holding the JSON request body
--   MARKERS    strings that every good answer contains, separated by "|||";
--              a marker starting with "~" is a Lua pattern instead (e.g.
--              ~"type"%s*:%s*"message" accepts any JSON spacing)
--   HEADER     extra request headers, "Name: value"
--   --count=N  each thread stops after N answers and prints "WRKTHREAD_DONE"
--              (fixed-count runs: the harness sends wrk SIGINT once every
--              thread has said so, and wrk then reports at once)
--
-- A response counts as a failure unless its status is 200 and its body holds
-- every marker (a fast wrong answer is a failure). done() prints one line,
-- "WRKJSON {...}", with the counts and the latency percentiles in microseconds.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function split(s, sep)
  local out, i = {}, 1
  while true do
    local j = string.find(s, sep, i, true)
    if not j then table.insert(out, string.sub(s, i)); break end
    table.insert(out, string.sub(s, i, j - 1))
    i = j + #sep
  end
  return out
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  markers = {}
  if args[2] and #args[2] > 0 then markers = split(args[2], "|||") end
  quota = nil
  for k = 3, #args do
    local n = string.match(args[k], "^%-%-count=(%d+)$")
    if n then
      quota = tonumber(n)
    else
      local name, value = string.match(args[k], "^([^:]+):%s*(.*)$")
      if name then wrk.headers[name] = value end
    end
  end
  answered = 0
  failures = 0
  bad_status = 0
  good = 0
  sample = ""
end

local function has(body, m)
  if string.sub(m, 1, 1) == "~" then return string.find(body, string.sub(m, 2)) ~= nil end
  return string.find(body, m, 1, true) ~= nil
end

local function check(status, body)
  if status ~= 200 then
    failures = failures + 1
    bad_status = bad_status + 1
    if sample == "" then sample = "status " .. status .. ": " .. string.sub(body or "", 1, 200) end
    return
  end
  for _, m in ipairs(markers) do
    if not has(body, m) then
      failures = failures + 1
      if sample == "" then sample = "missing marker " .. m .. " in: " .. string.sub(body or "", 1, 200) end
      return
    end
  end
  good = good + 1
end

function response(status, headers, body)
  check(status, body)
  if quota then
    answered = answered + 1
    if answered == quota then
      io.write("WRKTHREAD_DONE\n")
      io.flush()
      wrk.thread:stop()
    end
  end
end

local function esc(s)
  s = string.gsub(s, "\\", "\\\\")
  s = string.gsub(s, '"', '\\"')
  s = string.gsub(s, "[%c]", " ")
  return s
end

function done(summary, latency, requests)
  local fails, bad, ok, smp = 0, 0, 0, ""
  for _, t in ipairs(threads) do
    fails = fails + (t:get("failures") or 0)
    bad = bad + (t:get("bad_status") or 0)
    ok = ok + (t:get("good") or 0)
    local s = t:get("sample") or ""
    if smp == "" then smp = s end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"good":%d,"failures":%d,"bad_status":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_p50_us":%d,"lat_p95_us":%d,"lat_p99_us":%d,"lat_max_us":%d,"lat_mean_us":%.1f,"sample":"%s"}\n',
    summary.requests, summary.duration, summary.bytes, ok, fails, bad,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean, esc(smp)))
end
