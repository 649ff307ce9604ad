#!/bin/bash
# What a managed key with a rate limit and a budget costs per chat request, against the master key:
# the gateway's instructions per request counted by valgrind's callgrind (exact, whatever else the
# machine does), less what the idle gateway runs in the same wall time (its timers run about 50x
# more often per request under valgrind).
#
#   [PAIRS=2] bash bench/keycost/run.sh [N=400]   # needs valgrind (apt install valgrind) and node (the mock)
#
# One gateway (this checkout, on PYTHON or the python on PATH), access log off as in the main
# benchmark's `gomodel` and `gomodel-key` targets, the bench's Node mock, N sequential keep-alive chat
# requests per window: master, managed, PAIRS times. Prints a line per window and the ratio
# managed / master (the smaller of each kind; the windows still differ by the usage ledger's and key
# ring's background work that falls in them, so N=1000 with PAIRS=3 is steadier).
set -euo pipefail
N=${1:-400}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
W=$(mktemp -d /tmp/gomodel-keycost-XXXXXX)
. "$ROOT/bench/keycost/common.sh"
start "" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/cg.out"
KEY=$(managed_key '{"name":"bench","user_path":"/team/a","rpm":100000000,"tpm":100000000000,"budgets":[{"period":"daily","max_tokens":100000000000}]}')
total() { callgrind_annotate "$1" 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{print $1}' | tr -d ,; }
window() { # name command...
  local name=$1; shift
  callgrind_control -z $GPID >/dev/null; callgrind_control -i on $GPID >/dev/null
  local t0 t1 f; t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N)
  callgrind_control -i off $GPID >/dev/null; callgrind_control -d $GPID >/dev/null; sleep 1
  f=$(ls -t "$W"/cg.out.[0-9]* | head -1)
  echo "$name $(total "$f") $("$PY" -c "print($t1-$t0)")" | tee -a "$W/windows"; mv "$f" "$f.read"
}
"$PY" "$ROOT/bench/keycost/nreq.py" "$GPORT" mk 100; "$PY" "$ROOT/bench/keycost/nreq.py" "$GPORT" "$KEY" 100
window idle sleep 10
for _ in $(seq "${PAIRS:-2}"); do
  window master "$PY" "$ROOT/bench/keycost/nreq.py" "$GPORT" mk "$N"
  window managed "$PY" "$ROOT/bench/keycost/nreq.py" "$GPORT" "$KEY" "$N"
done
"$PY" - "$W/windows" "$N" <<'PY'
import sys
rows = [line.split() for line in open(sys.argv[1])]
n = int(sys.argv[2])
idle = next(r for r in rows if r[0] == "idle")
rate = int(idle[1]) / float(idle[2])
per = {}
for name, ir, seconds in rows:
    if name != "idle":
        per.setdefault(name, []).append((int(ir) - rate * float(seconds)) / n)
for name, values in per.items():
    print(f"{name:8s} " + "  ".join(f"{v / 1e3:.0f}k" for v in values) + " instructions/request")
print(f"managed / master = {min(per['managed']) / min(per['master']):.3f}")
PY
