# Sourced by run.sh, alternate.sh and sidebyside.sh (with ROOT, PY and W set): the bench's Node mock
# and gateways of this checkout, access log off as in the main benchmark's `gomodel` and `gomodel-key`
# targets, on free ports, stopped at exit; managed keys made through the admin API with the master key
# `mk`.
#
#   start MOCK_PREFIX GATEWAY_PREFIX...   the mock and one gateway (GPORT, GPID); the prefixes are the
#                                         commands each runs under ("", "taskset -c 1", "valgrind ...")
#   start_mock PREFIX                     the mock alone (MPORT, MPID)
#   start_gateway NAME PREFIX...          one more gateway on the mock, data in $W/NAME (GPORT, GPID)
#   KEY=$(managed_key BODY [PORT])        a new key's secret, made on GPORT or PORT
#   KEYBODY                               the managed key of the CPU scripts: the environment's, else an
#                                         rpm, a tpm and a daily token budget far above the load
#   $W/body.json                          the bench's chat body, for wrk
PIDS=""
KEYBODY=${KEYBODY:-'{"name":"bench","user_path":"/bench/key","rpm":1000000000,"tpm":1000000000000,"budgets":[{"period":"daily","max_tokens":10000000000000}]}'}
echo '{"model":"vllm/meta-llama/Llama-3.1-8B-Instruct","max_tokens":16,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}' > "$W/body.json"
trap 'kill $PIDS 2>/dev/null || true' EXIT
port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
start_mock() {
  MPORT=$(port)
  $1 node "$ROOT/bench/mock/mock.mjs" --port "$MPORT" > "$W/mock.log" 2>&1 & MPID=$!
  PIDS="$PIDS $MPID"
}
start_gateway() {
  local name=$1; shift
  GPORT=$(port)
  env PYTHONPATH="$ROOT" VLLM_BASE_URL="http://127.0.0.1:$MPORT/v1" GOMODEL_MASTER_KEY=mk GOMODEL_DATA_DIR="$W/$name" \
    GOMODEL_ACCESS_LOG=false "$@" "$PY" -m gomodel --listen "tcp:$GPORT:interface=127.0.0.1" > "$W/$name.log" 2>&1 & GPID=$!
  PIDS="$PIDS $GPID"
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$GPORT/v1/models" -H 'Authorization: Bearer mk' >/dev/null && break; sleep 0.5; done
}
start() {
  start_mock "$1"; shift
  start_gateway data "$@"
}
managed_key() {
  curl -sf -X POST "http://127.0.0.1:${2:-$GPORT}/admin/api/v1/auth-keys" -H 'Authorization: Bearer mk' -d "$1" \
    | "$PY" -c 'import json,sys;print(json.load(sys.stdin)["value"])'
}
