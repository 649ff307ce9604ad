#!/usr/bin/env bash
# The routing benchmark in one command. See bench/README.md ("Routing benchmark").
#
#   bash bench/routing/run.sh [--routers gomodel-load,gomodel-rr,vllm-router-cache_aware,...]
#                             [--repeats 2] [--duration 45] [--session-id none|user|header] [--quick] ...
#   bash bench/routing/run.sh --help
#
# Installs what it needs, idempotently and outside the repository: vllm-router
# (pip) in /tmp/vllm-router-venv, LiteLLM (litellm[proxy]) in /tmp/litellm-venv,
# and, for gomodel, the main benchmark's env /tmp/bench-venv (BENCH_VENV) with
# gomodel installed editable from this checkout, unless GOMODEL_PYTHON names a
# Python that has gomodel's dependencies (gomodel itself is always taken from
# this checkout: PYTHONPATH). Writes bench/results/<date>-routing[-tag].md and .jsonl.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
BENCH_VENV="${BENCH_VENV:-/tmp/bench-venv}"
PYTHON="${PYTHON:-python3}"
command -v taskset >/dev/null || { echo "routing bench: taskset (util-linux) is required" >&2; exit 2; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "routing bench: Python 3.11+ is required ($PYTHON)" >&2; exit 2; }
if [ -z "${GOMODEL_PYTHON:-}" ]; then
  if [ ! -x "$BENCH_VENV/bin/twistd" ]; then
    "$PYTHON" -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/python" -m pip install -q -U pip >/dev/null
    "$BENCH_VENV/bin/python" -m pip install -q -e "$repo" --config-settings editable_mode=compat
  fi
  export GOMODEL_PYTHON="$BENCH_VENV/bin/python"
fi
exec "$PYTHON" "$here/run.py" "$@"
