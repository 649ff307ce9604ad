# Sourced by run.sh and alternate.sh (with ROOT, PY and W set): the bench's Node mock and one gateway
# of this checkout, access log off as in the main benchmark's `gomodel` and `gomodel-key` targets, on
# free ports, stopped at exit; then a managed key made through the admin API with the master key `mk`.
#
#   start MOCK_PREFIX GATEWAY_PREFIX...   the commands each runs under ("" or "taskset -c 1"; "valgrind ...")
#   KEY=$(managed_key BODY)               the new key's secret
port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
start() {
  local mock_prefix=$1; shift
  MPORT=$(port); GPORT=$(port)
  $mock_prefix node "$ROOT/bench/mock/mock.mjs" --port "$MPORT" > "$W/mock.log" 2>&1 & MPID=$!
  env PYTHONPATH="$ROOT" VLLM_BASE_URL="http://127.0.0.1:$MPORT/v1" GOMODEL_MASTER_KEY=mk GOMODEL_DATA_DIR="$W/data" \
    GOMODEL_ACCESS_LOG=false "$@" "$PY" -m gomodel --listen "tcp:$GPORT:interface=127.0.0.1" > "$W/gw.log" 2>&1 & GPID=$!
  trap 'kill $GPID $MPID 2>/dev/null || true' EXIT
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$GPORT/v1/models" -H 'Authorization: Bearer mk' >/dev/null && break; sleep 0.5; done
}
managed_key() {
  curl -sf -X POST "http://127.0.0.1:$GPORT/admin/api/v1/auth-keys" -H 'Authorization: Bearer mk' -d "$1" \
    | "$PY" -c 'import json,sys;print(json.load(sys.stdin)["value"])'
}
