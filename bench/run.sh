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
PYTHON="${PYTHON:-python3}"

command -v node >/dev/null || { echo "bench: node (18+) is required" >&2; exit 2; }
if ! command -v wrk >/dev/null; then
  case " $* " in *" --no-install "*) ;; *)
    echo "bench: installing wrk (apt)" >&2
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null ;;
  esac
fi

# The bench's own Python env: stdlib only for the harness, plus gomodel
# (installed by the harness on first use, editable, from this checkout).
if [ -z "${GOMODEL_PYTHON:-}" ] && [ ! -x "$BENCH_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/python" -m pip install -q -U pip >/dev/null
fi
py="${GOMODEL_PYTHON:-$BENCH_VENV/bin/python}"
exec "$py" "$here/bench.py" "$@"
