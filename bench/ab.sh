#!/usr/bin/env bash
# Interleaved latency A/B at concurrency 1: direct, another gomodel checkout, this one.
#
#   bash bench/ab.sh OTHER_CHECKOUT [ROUNDS=10] [SECONDS=5]
#
# e.g. git worktree add /tmp/gomodel-ref <rev> && bash bench/ab.sh /tmp/gomodel-ref
#
# On a host whose CPU speed drifts, two separate bench runs do not compare in
# time; here every round measures the mock directly, then gomodel from
# OTHER_CHECKOUT (PYTHONPATH), then this checkout's, back to back, each a fresh
# process pinned to CPU 0 (mock and load on CPU 1): wrk for the chat p50, the
# bench's stream client for the stream TTFT p50. Prints one line per
# measurement and the medians. Needs the tools bench/run.sh needs, and a Python
# with this checkout installed (GOMODEL_PYTHON, default python3; twistd beside it).
set -u
other=${1:?usage: bash bench/ab.sh OTHER_CHECKOUT [ROUNDS] [SECONDS]}
rounds=${2:-10}; secs=${3:-5}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py=${GOMODEL_PYTHON:-python3}
twistd="$(dirname "$(command -v "$py")")/twistd"
work=$(mktemp -d /tmp/gomodel-ab.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

taskset -c 1 node "$here/mock/mock.mjs" --port 0 > "$work/mock.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q LISTENING "$work/mock.out" && break; sleep 0.1; done
mock=$(awk '/LISTENING/{print $2}' "$work/mock.out")
model=meta-llama/Llama-3.1-8B-Instruct
printf '{"model":"%s","messages":[{"role":"user","content":"Say hello in twenty tokens."}],"max_tokens":20}' "$model" > "$work/direct.json"
printf '{"model":"vllm/%s","messages":[{"role":"user","content":"Say hello in twenty tokens."}],"max_tokens":20}' "$model" > "$work/gateway.json"
text=$(python3 -c 'print("mockchat" + "".join(" t%02d" % i for i in range(1, 20)))')

stream_cfg() {  # port body-file
  python3 - "$1" "$2" "$text" "$secs" <<'PY'
import json, sys
port, path, text, secs = sys.argv[1:]
body = json.load(open(path))
body.update(stream=True, stream_options={"include_usage": True})
print(json.dumps({"url": "http://127.0.0.1:%s/v1/chat/completions" % port,
                  "headers": {"Authorization": "Bearer ab", "Content-Type": "application/json"},
                  "body": json.dumps(body), "kind": "chat", "expect_text": text, "expect_usage": True,
                  "concurrency": 1, "warmup_s": 1, "duration_s": int(secs), "timeout_s": 30}))
PY
}

measure() {  # label port body-file
  local chat stream
  chat=$(taskset -c 1 wrk -t1 -c1 -d"${secs}s" -s "$here/wrk/post.lua" "http://127.0.0.1:$2/v1/chat/completions" \
         -- "$3" "" "Authorization: Bearer ab" 2>&1 | sed -n 's/^WRKJSON //p' |
         python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["lat_p50_us"], d["failures"])')
  stream=$(taskset -c 1 node "$here/streamload.mjs" "$(stream_cfg "$2" "$3")" | sed -n 's/^STREAMJSON //p' |
           python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["ttft_p50_ms"]*1000), d["errors"])')
  echo "AB $1 chat_p50_us=${chat% *} stream_ttft_us=${stream% *} errors=${chat#* }/${stream#* }"
}

gateway() {  # label pythonpath
  local port pid
  port=$(free_port)
  env -i PATH="$PATH" HOME="$HOME" ${2:+PYTHONPATH=$2} VLLM_BASE_URL="http://127.0.0.1:$mock/v1" \
    GOMODEL_ACCESS_LOG=false GOMODEL_MASTER_KEY=ab GOMODEL_DATA_DIR="$work/data-$1" \
    taskset -c 0 "$twistd" -n --pidfile= gomodel --listen "tcp:$port:interface=127.0.0.1" > "$work/gw-$1.log" 2>&1 &
  pid=$!; pids+=($pid)
  for _ in $(seq 150); do
    curl -sf -H 'Authorization: Bearer ab' "http://127.0.0.1:$port/v1/models" | grep -q "$model" && break; sleep 0.1
  done
  taskset -c 1 wrk -t1 -c1 -d1s -s "$here/wrk/post.lua" "http://127.0.0.1:$port/v1/chat/completions" \
    -- "$work/gateway.json" "" "Authorization: Bearer ab" > /dev/null 2>&1
  measure "$1" "$port" "$work/gateway.json"
  kill "$pid"; wait "$pid" 2>/dev/null
}

for r in $(seq "$rounds"); do
  measure direct "$mock" "$work/direct.json"
  gateway other "$other"
  gateway this "$(cd "$here/.." && pwd)"  # on PYTHONPATH too: an editable install does not expose the twistd plugin
done | tee "$work/lines"
python3 - "$work/lines" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"AB (\w+) chat_p50_us=(\d+) stream_ttft_us=(\d+)", line)
    if m:
        rows.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3))))
med = {k: (statistics.median(c for c, _ in v), statistics.median(s for _, s in v)) for k, v in rows.items()}
d = med.get("direct", (0, 0))
for k in ("direct", "other", "this"):
    if k in med:
        c, s = med[k]
        print("median %-6s chat p50 %.2f ms (+%.2f)  stream TTFT %.2f ms (+%.2f)  over %d rounds"
              % (k, c / 1000, (c - d[0]) / 1000, s / 1000, (s - d[1]) / 1000, len(rows[k])))
PY
