#!/usr/bin/env bash
# The overhead benchmark in one command. See bench/README.md.
#
#   bash bench/run.sh [--targets direct,gomodel,litellm,portkey] [--workloads chat,stream,...]
#                     [--concurrency 1,8,64] [--duration 10] [--warmup 3] [--quick] [--soak 600] ...
#   bash bench/run.sh --variant features      # everything on vs bare, vllm-router, Portkey
#   bash bench/run.sh --protocol gomodel      # GoModel's own benchmark method
#   bash bench/run.sh --help
#
# Installs what it needs, idempotently: wrk (apt), a Python venv for the bench
# with gomodel installed editable from this checkout (BENCH_VENV, default
# /tmp/bench-venv), LiteLLM in /tmp/bench-litellm-venv, Portkey in
# /tmp/bench-portkey and vllm-router in /tmp/vllm-router-venv (only for the
# targets asked for). Writes bench/results/<date>[-tag].md and .jsonl.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH_VENV="${BENCH_VENV:-/tmp/bench-venv}"
# The CPython that gomodel (and LiteLLM) run on: by default the system's /usr/bin/python3 when it is
# 3.11 or newer and can make a venv, a distribution's optimised build as the Docker image's
# python:3.11-slim is; else python3 on PATH. pyenv's default build (first on PATH on some machines) is
# unoptimised: the gateway takes about 1.2x the CPU per request on it (bench/README.md). PYTHON=... picks
# another.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if /usr/bin/python3 -c 'import ensurepip, sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PYTHON=/usr/bin/python3
  fi
fi

command -v node >/dev/null || { echo "bench: node (18+) is required" >&2; exit 2; }
if ! command -v wrk >/dev/null; then
  case " $* " in *" --no-install "*) ;; *)
    echo "bench: installing wrk (apt)" >&2
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null ;;
  esac
fi

# The bench's own Python env: stdlib only for the harness, plus gomodel
# (installed by the harness on first use, editable, from this checkout).
# (Made again when it was made from another interpreter.)
base="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
if [ -z "${GOMODEL_PYTHON:-}" ] && [ "$(cat "$BENCH_VENV/.gomodel-base" 2>/dev/null)" != "$base" ]; then
  if [ -e "$BENCH_VENV/pyvenv.cfg" ]; then rm -rf "$BENCH_VENV"; fi
  "$PYTHON" -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/python" -m pip install -q -U pip >/dev/null
  echo "$base" > "$BENCH_VENV/.gomodel-base"
fi
py="${GOMODEL_PYTHON:-$BENCH_VENV/bin/python}"
exec "$py" "$here/bench.py" "$@"
