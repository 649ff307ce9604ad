#!/bin/bash
# CPU per request of each thread of one gateway process under closed-loop load (wrk, 10 connections),
# beside its req/s, latency and peak RSS: the reactor's thread apart from the others (the store's:
# SQLite's writes of stored responses) and from the store's writer process (the usage ledger's rows, a
# child of each gateway process, gomodel/store/sqlite/writer.py). Instruction counts (bench/instructions.sh)
# leave those writes out and see neither thread's waits for the interpreter lock nor the switches between
# them; this sees what each thread took, kernel time included, as /proc counts it (ticks, 10 ms each:
# hence 8 s windows); all threads' user and system time are also given apart.
#
#   [WINDOW=8] [ROUNDS=2] [WORKLOAD=chat|responses-stream] [WORKERS=N] [PYTHON=python3] \
#     bash bench/threadcpu.sh NAME=CHECKOUT[:ENV=VALUE,...] [NAME=CHECKOUT...]
#
# e.g. git worktree add /tmp/gomodel-ref <rev>
#      bash bench/threadcpu.sh ref=/tmp/gomodel-ref here=. here-no-usage=.:USAGE_ENABLED=false
#      bash bench/threadcpu.sh bare=. features=.:FEATURES=1
#
# FEATURES=1 (a setting of this script, not the gateway's) runs that configuration with everything on,
# as bench/run.sh's gomodel-features target: four replicas (four mocks), the access log (to a file), and
# the load sent with a managed key that has a rate limit, a concurrency limit, a model allowlist and a
# daily budget, all far above the load. With it, ONE_REPLICA=1 keeps one replica, MASTER_KEY=1 sends the
# load with the master key (no managed key, no limits) and GOMODEL_ACCESS_LOG=false turns the access log
# off: each feature's cost, apart (features=.:FEATURES=1,MASTER_KEY=1 is everything on but the key).
#
# Each round starts every configuration in turn afresh (every other round in the reverse order, so that
# none always runs first or last; one process, its own data directory; the
# CHECKOUT on PYTHONPATH; master key, one mock replica, access log off), sends 2 s of warm-up, then
# WINDOW seconds of load, and prints one line per configuration. WORKERS=N runs the gateway with
# --workers N: its processes' threads are summed by kind, and the peak RSS is the largest process's.
# The mock (bench/mock/mock.mjs) and wrk share the machine with the gateway, unpinned; PIN=1 runs the
# gateway on CPU 1 and the mocks and wrk on CPU 0 (less spread between rounds). Needs node, wrk, curl,
# taskset with PIN=1, and a Python with the gateway's requirements.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}; SECS=${WINDOW:-8}; ROUNDS=${ROUNDS:-2}; WORKLOAD=${WORKLOAD:-chat}
[ "$#" -gt 0 ] || { sed -n 2,20p "$0"; exit 2; }
W=$(mktemp -d /tmp/gomodel-threadcpu-XXXXXX)
PIDS=""
trap 'kill $PIDS 2>/dev/null || true; rm -rf "$W"' EXIT
port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
MOCK_URLS=()  # the first one's for every configuration; FEATURES=1 adds three
for i in 1 2 3 4; do
  [ "$i" = 1 ] || [[ " $* " == *FEATURES=1* ]] || break
  mport=$(port); MOCK_URLS+=("http://127.0.0.1:$mport/v1")
  ${PIN:+taskset -c 0} node "$ROOT/bench/mock/mock.mjs" --port "$mport" > "$W/mock$i.log" 2>&1 & PIDS="$PIDS $!"
done
KEY_BODY='{"name":"bench","user_path":"/bench/features","models":["vllm/"],"rpm":1000000000,"tpm":1000000000000,
  "max_concurrency":100000,"budgets":[{"period":"daily","max_tokens":10000000000000}]}'
MODEL=vllm/meta-llama/Llama-3.1-8B-Instruct
if [ "$WORKLOAD" = responses-stream ]; then
  URLPATH=/v1/responses; MARKER=response.completed
  printf '{"model":"%s","input":"Say hello.","stream":true,"max_output_tokens":20}' "$MODEL" > "$W/body.json"
else
  URLPATH=/v1/chat/completions; MARKER=mockchat
  printf '{"model":"%s","messages":[{"role":"user","content":"Say hello."}],"max_tokens":20}' "$MODEL" > "$W/body.json"
fi
TICK=$(getconf CLK_TCK)
tree() {  # process $1 and every process below it (--workers' workers, each one's store writer)
  echo "$1"
  for c in $(pgrep -P "$1" || true); do tree "$c"; done
}
ticks() {  # "pid tid user-ticks system-ticks role" for each thread of process $1 and below; role: gateway, writer
  for p in $(tree "$1"); do
    role=gateway; grep -q "store/sqlite/rows.py" /proc/"$p"/cmdline 2>/dev/null && role=writer
    for t in /proc/"$p"/task/*; do echo "$p $(basename "$t") $(awk '{print $14, $15}' "$t/stat") $role"; done
  done
}
load() {  # port seconds key -> wrk's WRKJSON line
  ${PIN:+taskset -c 0} wrk -t2 -c10 -d"$2"s -s "$ROOT/bench/wrk/post.lua" "http://127.0.0.1:$1$URLPATH" -- "$W/body.json" "$MARKER" \
    "Authorization: Bearer $3" 2>&1 | grep WRKJSON || true
}
for round in $(seq "$ROUNDS"); do
  specs=("$@")
  if [ $((round % 2)) = 0 ]; then  # every other round in the reverse order: no configuration always runs first
    specs=(); for ((i = $#; i >= 1; i--)); do specs+=("${!i}"); done
  fi
  for spec in "${specs[@]}"; do
    name=${spec%%=*}; rest=${spec#*=}; checkout=${rest%%:*}; envs=(); [ "$rest" != "$checkout" ] && IFS=, read -ra envs <<< "${rest#*:}"
    checkout=$(cd "$checkout" && pwd); gport=$(port); data="$W/data-$name-$round"
    upstreams=${MOCK_URLS[0]}; access=false; features=0; one=0; master=0; settings=()
    for e in "${envs[@]}"; do
      case "$e" in FEATURES=1) features=1;; ONE_REPLICA=1) one=1;; MASTER_KEY=1) master=1;; *) settings+=("$e");; esac
    done
    envs=("${settings[@]}")
    if [ "$features" = 1 ]; then
      access=true; envs=(METRICS_ENABLED=true "${envs[@]}")
      [ "$one" = 1 ] || upstreams=$(IFS=,; echo "${MOCK_URLS[*]}")
    fi
    (cd "$W" && exec env PYTHONPATH="$checkout" VLLM_BASE_URL="$upstreams" GOMODEL_MASTER_KEY=mk \
      GOMODEL_DATA_DIR="$data" GOMODEL_ACCESS_LOG=$access "${envs[@]}" \
      ${PIN:+taskset -c 1} "$PY" -c 'from gomodel.cli import main; main()' --listen "tcp:$gport:interface=127.0.0.1" \
      ${WORKERS:+--workers "$WORKERS"} > "$W/$name-$round.log" 2>&1) &
    gpid=$!; PIDS="$PIDS $gpid"
    for _ in $(seq 300); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gport/health")" = 200 ] && break; sleep 0.1
    done
    key=mk
    if [ "$features" = 1 ] && [ "$master" = 0 ]; then
      key=$(curl -sf "http://127.0.0.1:$gport/admin/api/v1/auth-keys" -H 'Authorization: Bearer mk' \
        -H 'Content-Type: application/json' -d "$KEY_BODY" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["value"])')
    fi
    load "$gport" 2 "$key" > /dev/null
    before=$(ticks "$gpid")
    result=$(load "$gport" "$SECS" "$key")
    after=$(ticks "$gpid")
    peak=$(for p in $(tree "$gpid"); do awk '/^VmHWM/ {print $2}' /proc/"$p"/status; done | sort -n | tail -1)
    kill "$gpid"; wait "$gpid" 2>/dev/null || true
    "$PY" - "$name" "$round" "$gpid" "$TICK" "$SECS" "$before" "$after" "$result" "$peak" <<'PY'
import json, sys
name, round_, pid, tick, secs, before, after, result, peak = sys.argv[1:]
if not result:
    sys.exit(f"{name}: no answer from wrk")
run = json.loads(result.split(" ", 1)[1])
if run["failures"] or not run["good"]:
    sys.exit(f"{name}: {run['failures']} of {run['requests']} answers were wrong")
start = {tuple(line.split()[:2]): tuple(map(int, line.split()[2:4])) for line in before.splitlines()}
used = {}  # per kind of thread, over the processes: the reactors' threads, the others', the store writers'
modes = [0, 0]  # all threads' user and system ticks
for line in after.splitlines():
    process, tid, user, system, role = line.split()
    kind = "writer process" if role == "writer" else "reactor" if tid == process else "other threads"
    user0, system0 = start.get((process, tid), (0, 0))
    modes[0] += int(user) - user0
    modes[1] += int(system) - system0
    used[kind] = used.get(kind, 0) + int(user) - user0 + int(system) - system0
used["all"] = sum(used.values())
per = lambda n: f"{n / int(tick) / run['good'] * 1e6:.1f}"
threads = [f"{kind} {per(n)}" for kind, n in used.items() if n]
threads[-1] += f" (user {per(modes[0])}, system {per(modes[1])})"
print(f"{name} round {round_}: {run['good'] / float(secs):,.0f} req/s, p50 {run['lat_p50_us'] / 1000:.2f} ms, "
      f"p99 {run['lat_p99_us'] / 1000:.2f} ms, peak RSS {int(peak) / 1024:.1f} MiB; CPU us per request: "
      + ", ".join(threads))
PY
  done
done
