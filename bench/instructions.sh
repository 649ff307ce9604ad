#!/bin/bash
# Instructions per relayed chat request, counted by valgrind's callgrind: the same figure for the same
# code whatever else the machine does (wall and CPU time on these shared 2-core machines drift by tens
# of percent within a minute). Each checkout's gateway runs under callgrind with instrumentation off,
# takes 200 warm-up requests, then N sequential chat requests (bench/keycost/nreq.py, one keep-alive
# connection) with instrumentation on; user-space instructions of the whole process (Python, its C
# extensions, libc; not the kernel) divided by N. Replica health probes and metrics scrapes are off:
# under callgrind a run takes about a minute, and their work would count in proportion to that time.
# So are the usage ledger's timed writes (USAGE_FLUSH_INTERVAL=1h): one write of the rows buffered so far
# fell inside the window in some runs and not in others (about 80 k instructions per request apart); the
# ledger writes 1,000 rows at once, so with N up to 799 none is written. Idle upstream connections are
# kept (HTTP_POOL_IDLE_TIMEOUT=1h), so that the pause between warm-up and window (2 s, and callgrind's
# own start of counting) can never let the pool's sweep close them: a new connection inside the window
# costs about 460 k instructions. For the same reason the mock replicas keep theirs (--keepalive-timeout-s 3600,
# not uvicorn's 5 s): with FEAT's four replicas the load strategy may leave one idle for PACE_REFRESH (30 s) when
# the gateway's own delays under callgrind make its learned pace look clearly slower, and its connections, closed
# by the mock meanwhile, were made again once it took requests (16 new upstream connections in one window, some
# 25 k instructions a request: FEAT=1 counts of one tree were 502 k and 545 k; 488 k and 491 k with them kept).
# A row costs about 56 k
# instructions to write on SQLite (bench/results/2026-12-03-lean-features.md), not in the figure.
#
#   [N=300] [FEAT=1] [STREAM=1] [CONC=64] [COUNT=bytecodes] bash bench/instructions.sh CHECKOUT [CHECKOUT...]
#
# CONC=K sends them on K connections at once (bench/keycost/nreq.py), the warm-up too: the work per
# request with K in flight (under callgrind the gateway is the slow side, so all K wait on it). The
# warm-up is then 20 K requests (WARMUP overrides it; 200 one by one otherwise): with 200, the upstream
# pool was still growing inside the window (at 64, some 30 new connections in 640 requests, ~460 k
# instructions each), which a steady load never pays.
#
# STREAM=1 sends streamed chat requests instead (the mock's 24-event stream, read to its end); with
# MODEL=paced, the mock's paced model (an event every 25 ms, each its own upstream read, as a model
# generates them; about 0.5 s a stream, so use a smaller N).
#
# WORKLOAD=responses sends Responses requests (/v1/responses, stored as by default) instead of chat.
# WORKLOAD=messages sends Anthropic Messages requests instead (POST /v1/messages, the protocol run's messages
# body: bench/harness/workloads.py; anthropic-version: 2023-06-01, the key as x-api-key; with STREAM=1, streamed
# and read to their message_stop): natively to the mock's /v1/messages, as to a vLLM.
#
# CACHE=1 turns on callgrind's cache and branch simulation (--cache-sim=yes --branch-sim=yes) and also
# prints, per request, the first-level instruction and data misses, the last-level instruction and data
# misses and the mispredicted conditional and indirect branches: the part of a CPU-time gap that
# instruction counts do not show. valgrind models two levels, its last one the host's last-level cache;
# CACHE_LL=SIZE,WAYS,LINE (e.g. 1048576,8,64, this host's L2) models that level instead.
#
# KEEP=DIR keeps callgrind's output files there (for callgrind_annotate).
#
# COUNT=bytecodes counts Python bytecodes instead (bench/bytecodes.py, no valgrind needed), and leaves
# the count per function in /tmp/gomodel-bytecodes-NAME.json (NAME: the checkout's directory name), and also
# untimed_per_request: the count less what the reactor's timers ran (metrics flushes, sweeps, key refreshes:
# work by the second, whose share grows with the window's length on a busy machine, +-300 a request between
# runs of the same code; bench/bytecodes.py), the steadier figure for comparing request paths;
# COUNTER_SCRIPT names another counter script taking the same arguments; BYTECODES_LINES=1 adds the count per
# source line ("lines" in that file: where a function's count goes).
#
# UNTIMED=1 leaves out of the count what the reactor's timers run (calls below ReactorBase.runUntilCurrent: metrics
# flushes, sweeps, key refreshes, as bench/bytecodes.py's untimed_per_request) and the other threads (the store's,
# which run its jobs by the second: key and budget refreshes): work by the second, whose share of a window grows with
# its wall time, so that on a busy machine the same tree's count moved by 10-25 k a request between runs (at CONC=10;
# about 1-3 k with UNTIMED=1). The gateway then runs under bench/untimed.py, which starts and stops callgrind's
# instrumentation itself (SIGUSR1, SIGUSR2) and leaves each runUntilCurrent out of the collection (through a tiny C
# library made with cc from valgrind's callgrind.h); callgrind counts each thread apart, and the main one is summed.
#
# FEAT=1: everything on (four mock replicas, the access log, a managed key with a rate limit, a
# concurrency limit, a model allowlist and a daily budget: bench/run.sh's gomodel-features key);
# otherwise one replica, the master key, access log off; ACCESS_LOG=true/false overrides the access
# log either way, REPLICAS=N the number of mock replicas, MANAGED_KEY=1/0 whether the load is sent with
# that managed key or the master key. Needs valgrind, node and curl, and a Python with the gateway's requirements
# (PYTHON, default python3); each CHECKOUT goes on PYTHONPATH.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}; N=${N:-300}; WARMUP=${WARMUP:-$(( ${CONC:-1} > 1 ? 20 * ${CONC:-1} : 200 ))}; FEAT=${FEAT:-0}; COUNT=${COUNT:-instructions}
STREAM_ARG=(); [ "${STREAM:-0}" = 1 ] && STREAM_ARG=(stream)
send() { "$PY" "$ROOT/bench/keycost/nreq.py" "$GPORT" "$KEY" "$1" "${STREAM_ARG[@]}"; }  # N requests, one by one
W=$(mktemp -d /tmp/gomodel-instr-XXXXXX)
PIDS=""
trap 'kill $PIDS 2>/dev/null || true; rm -rf "$W"' EXIT
port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
URLS=""; REPLICAS=${REPLICAS:-$([ "$FEAT" = 1 ] && echo 4 || echo 1)}; MANAGED_KEY=${MANAGED_KEY:-$FEAT}
for i in $(seq $REPLICAS); do
  P=$(port); node "$ROOT/bench/mock/mock.mjs" --port "$P" --keepalive-timeout-s 3600 > "$W/mock$i.log" 2>&1 & PIDS="$PIDS $!"
  URLS="$URLS${URLS:+,}http://127.0.0.1:$P/v1"
done
BODY='{"model":"vllm/meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"hello"}]}'
for checkout in "$@"; do
  checkout=$(cd "$checkout" && pwd); name=$(basename "$checkout"); GPORT=$(port); LOG=false; [ "$FEAT" = 1 ] && LOG=true; LOG=${ACCESS_LOG:-$LOG}
  # The gomodel command's runner in this process: twistd would exec it when it has no plugin cache.
  if [ "$COUNT" = bytecodes ]; then
    rm -f "/tmp/gomodel-bytecodes-$name.json"; COUNTER=("$PY" "${COUNTER_SCRIPT:-$ROOT/bench/bytecodes.py}" "/tmp/gomodel-bytecodes-$name.json")
  else
    SIM=(); [ "${CACHE:-0}" = 1 ] && SIM=(--cache-sim=yes --branch-sim=yes ${CACHE_LL:+--LL=$CACHE_LL})
    RUNNER=(-c 'from gomodel.cli import main; main()')
    if [ "${UNTIMED:-0}" = 1 ]; then
      [ -f "$W/cgcontrol.so" ] || printf '%s\n' '#include <valgrind/callgrind.h>' \
        'void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }' 'void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }' \
        'void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }' | cc -shared -fPIC -O2 -x c -o "$W/cgcontrol.so" -
      RUNNER=("$ROOT/bench/untimed.py" "$W/cgcontrol.so")
      SIM+=(--separate-threads=yes)  # (the main thread's count alone is summed: its files end in -01)
    fi
    COUNTER=(valgrind --tool=callgrind "${SIM[@]}" --instr-atstart=no --callgrind-out-file="$W/$name.cg" "$PY" "${RUNNER[@]}")
  fi
  (cd "$W" && exec env PYTHONPATH="$checkout" VLLM_BASE_URL="$URLS" GOMODEL_MASTER_KEY=mk GOMODEL_DATA_DIR="$W/$name.d" \
    GOMODEL_ACCESS_LOG=$LOG REPLICA_HEALTH_INTERVAL=1h REPLICA_METRICS_INTERVAL=0 USAGE_FLUSH_INTERVAL=1h HTTP_POOL_IDLE_TIMEOUT=1h \
    "${COUNTER[@]}" \
    --listen "tcp:$GPORT:interface=127.0.0.1" > "$W/$name.log" 2>&1) & GPID=$!; PIDS="$PIDS $GPID"
  for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GPORT/v1/chat/completions" -H 'Authorization: Bearer mk' \
         -H 'Content-Type: application/json' -d "$BODY")" = 200 ] && break; sleep 1
  done
  KEY=mk
  if [ "$MANAGED_KEY" = 1 ]; then
    KEY=$(curl -sf "http://127.0.0.1:$GPORT/admin/api/v1/auth-keys" -H 'Authorization: Bearer mk' -H 'Content-Type: application/json' \
      -d '{"name":"bench","user_path":"/bench/features","models":["vllm/"],"rpm":1000000000,"tpm":1000000000000,"max_concurrency":100000,"budgets":[{"period":"daily","max_tokens":10000000000000}]}' \
      | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d.get("value") or d.get("key") or d.get("secret"))')
  fi
  send "$WARMUP"
  sleep 2  # the metrics' first flush of the warm-up (every second) makes their series: outside the window
  if [ "$COUNT" = bytecodes ]; then
    kill -USR1 "$GPID"; send "$N"; kill -USR2 "$GPID"
    for _ in $(seq 20); do [ -s "/tmp/gomodel-bytecodes-$name.json" ] && break; sleep 0.5; done
    "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); n = int(sys.argv[3])
print("BYTECODES %s FEAT=%s STREAM=%s requests=%d bytecodes_per_request=%d untimed_per_request=%d exceptions_per_request=%.2f" % (
    sys.argv[2], sys.argv[4], sys.argv[5], n, d["total"] // n, (d["total"] - d.get("timers", 0)) // n,
    sum(d.get("exceptions", {}).values()) / n))' \
      "/tmp/gomodel-bytecodes-$name.json" "$name" "$N" "$FEAT" "${STREAM:-0}"
    kill "$GPID" 2>/dev/null || true
    continue
  fi
  if [ "${UNTIMED:-0}" = 1 ]; then
    kill -USR1 "$GPID"; sleep 1; send "$N"; kill -USR2 "$GPID"; sleep 1  # (bench/untimed.py: once out of its timers)
  else
    callgrind_control -i on "$GPID" > /dev/null
    send "$N"
    callgrind_control -i off "$GPID" > /dev/null
  fi
  callgrind_control -d "$GPID" > /dev/null
  for _ in $(seq 20); do grep -qh "^totals:" "$W/$name.cg"* 2>/dev/null && break; sleep 0.5; done
  total=$(grep -h "^totals:" "$W/$name.cg"*${UNTIMED:+-01} | awk '{s += $2} END {print s}')
  [ -n "${KEEP:-}" ] && cp "$W/$name.cg"* "$KEEP/"
  echo "INSTR $name FEAT=$FEAT STREAM=${STREAM:-0} WORKLOAD=${WORKLOAD:-chat} requests=$N instructions_per_request=$((total / N))${UNTIMED:+ untimed=$UNTIMED}"
  if [ "${CACHE:-0}" = 1 ]; then  # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim
    grep -h "^totals:" "$W/$name.cg"*${UNTIMED:+-01} | awk -v n="$N" -v name="$name" '{for (i = 2; i <= 14; i++) t[i] += $i}
      END {printf "CACHE %s I1_misses=%d D1_misses=%d LL_instruction_misses=%d LL_data_misses=%d branches=%d mispredicted=%d indirect=%d mispredicted_indirect=%d (per request)\n",
        name, t[5] / n, (t[6] + t[7]) / n, t[8] / n, (t[9] + t[10]) / n, (t[11] + t[13]) / n, t[12] / n, t[13] / n, t[14] / n}'
  fi
  kill "$GPID" 2>/dev/null || true
done
