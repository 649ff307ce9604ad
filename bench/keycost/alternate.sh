#!/bin/bash
# A managed key against the master key in CPU time, in ONE gateway: N pairs of wrk windows (D s each,
# C connections, the bench's chat body), master and managed in turn (every other pair managed first),
# the gateway's CPU (utime, stime from /proc) per request. One process, so both keys see the same
# heap, data directory and background work; the host's drift still shows as the spread of the pairs.
#
#   [N=6] [C=64] [D=8] [KEYBODY='{"name": ...}'] bash bench/keycost/alternate.sh
#
# Needs node (the mock), wrk and taskset; the gateway is pinned to CPU 0, mock and wrk to CPU 1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}; C=${C:-64}; D=${D:-8}; N=${N:-6}
W=$(mktemp -d /tmp/gomodel-keycpu-XXXXXX)
. "$ROOT/bench/keycost/common.sh"
start "taskset -c 1" taskset -c 0
KEY=$(managed_key "$KEYBODY")
cpu() { awk "{print \$14 * 100000 + \$15}" /proc/$GPID/stat; }
load() { taskset -c 1 wrk -t1 -c$C -d${D}s -s $ROOT/bench/wrk/post.lua http://127.0.0.1:$GPORT/v1/chat/completions -- $W/body.json 'choices' "Authorization: Bearer $1" "Content-Type: application/json" 2>&1 | grep -o '"requests":[0-9]*' | head -1 | cut -d: -f2; }
load mk >/dev/null; load $KEY > /dev/null
for i in $(seq $N); do
  order="master managed"; [ $((i % 2)) = 0 ] && order="managed master"
  for who in $order; do
    k=mk; [ $who = managed ] && k=$KEY
    a=$(cpu); n=$(load $k); b=$(cpu)
    echo "$who $n $(( (b / 100000) - (a / 100000) )) $(( (b % 100000) - (a % 100000) ))" >> $W/rows
  done
done
$PY - $W/rows $D <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
d = float(sys.argv[2])
pairs = []
for i in range(0, len(rows), 2):
    (w1, n1, u1, s1), (_, n2, u2, s2) = rows[i], rows[i + 1]
    if w1 == "managed":
        (_, n1, u1, s1), (_, n2, u2, s2) = rows[i + 1], rows[i]
    c1, c2 = int(u1) + int(s1), int(u2) + int(s2)
    print(f"   user {int(u1)*10/int(n1)*1000:.0f}/{int(u2)*10/int(n2)*1000:.0f} us  sys {int(s1)*10/int(n1)*1000:.0f}/{int(s2)*10/int(n2)*1000:.0f} us")
    m = c1 * 10 / int(n1); k = c2 * 10 / int(n2)  # ms CPU per request (clock ticks of 10 ms)
    pairs.append((int(n1) / d, int(n2) / d, m * 1000, k * 1000, k / m))
    print(f"master {int(n1)/d:7.0f} req/s {m*1000:6.1f} us/req   managed {int(n2)/d:7.0f} req/s {k*1000:6.1f} us/req   ratio {k/m:.3f}")
print("median CPU ratio", round(statistics.median(p[4] for p in pairs), 3), " median req/s ratio", round(statistics.median(p[1] / p[0] for p in pairs), 3))
PY
