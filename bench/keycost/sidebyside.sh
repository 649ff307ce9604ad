#!/bin/bash
# A managed key against the master key in CPU time, measured side by side: two gateways of this
# checkout pinned to the same CPU, each loaded at once by its own wrk (C connections, D s, the bench's
# chat body), one with the master key and one with a managed key, the roles swapped every round.
# Both gateways share the CPU's time slices, so the host's drift (steal, frequency, a neighbour's
# cache) falls on both alike; per round, the ratio of their CPU per request (utime + stime from
# /proc) is the managed key's cost. N rounds; prints each round and the medians.
#
#   [N=8] [C=64] [D=6] [KEYBODY='{"name": ...}'] bash bench/keycost/sidebyside.sh
#
# Needs node (the mock), wrk and taskset; the gateways are pinned to CPU 0, mock and wrk to CPU 1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}; C=${C:-64}; D=${D:-6}; N=${N:-8}
W=$(mktemp -d /tmp/gomodel-keyside-XXXXXX)
. "$ROOT/bench/keycost/common.sh"
start_mock "taskset -c 1"
start_gateway a taskset -c 0; APORT=$GPORT; APID=$GPID; AKEY=$(managed_key "$KEYBODY")
start_gateway b taskset -c 0; BPORT=$GPORT; BPID=$GPID; BKEY=$(managed_key "$KEYBODY")
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # clock ticks
load() { # PORT KEY OUT
  taskset -c 1 wrk -t1 -c"$C" -d"${D}s" -s "$ROOT/bench/wrk/post.lua" "http://127.0.0.1:$1/v1/chat/completions" -- \
    "$W/body.json" 'choices' "Authorization: Bearer $2" "Content-Type: application/json" 2>&1 \
    | grep -o '"requests":[0-9]*' | head -1 | cut -d: -f2 > "$3"
}
round() { # A_KEY B_KEY A_ROLE B_ROLE
  local a0 b0 a1 b1 pa pb
  a0=$(cpu $APID); b0=$(cpu $BPID)
  load $APORT "$1" "$W/na" & pa=$!
  load $BPORT "$2" "$W/nb" & pb=$!
  wait $pa; wait $pb
  a1=$(cpu $APID); b1=$(cpu $BPID)
  echo "$3 $(cat "$W/na") $((a1 - a0)) $4 $(cat "$W/nb") $((b1 - b0))" >> "$W/rows"
}
round mk "$BKEY" warm warm; round "$AKEY" mk warm warm; : > "$W/rows"
for i in $(seq "$N"); do
  if [ $((i % 2)) = 1 ]; then round mk "$BKEY" master managed; else round "$AKEY" mk managed master; fi
done
"$PY" - "$W/rows" "$D" "$(getconf CLK_TCK)" <<'PY'
import sys, statistics
d, tck = float(sys.argv[2]), int(sys.argv[3])
ratios, rates = [], []
for line in open(sys.argv[1]):
    f = line.split()
    got = {f[0]: (int(f[1]), int(f[2])), f[3]: (int(f[4]), int(f[5]))}
    (nm, tm), (nk, tk) = got["master"], got["managed"]
    m, k = tm / tck / nm * 1e6, tk / tck / nk * 1e6
    ratios.append(k / m); rates.append(nk / nm)
    print(f"master {nm / d:6.0f} req/s {m:6.1f} us/req   managed {nk / d:6.0f} req/s {k:6.1f} us/req   "
          f"CPU ratio {k / m:.3f}  (gateway a was {f[0]})")
print(f"median CPU ratio managed/master {statistics.median(ratios):.3f}   "
      f"median req/s ratio {statistics.median(rates):.3f}   over {len(ratios)} rounds")
PY
