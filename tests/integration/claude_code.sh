#!/usr/bin/env bash
# Claude Code's CLI, offline, one `-p` prompt against an Anthropic Messages endpoint (the gateway).
#
#   bash tests/integration/claude_code.sh BASE_URL KEY [MODEL] [PROMPT]
#   bash tests/integration/claude_code.sh --install        only install the CLI; print its version
#
# BASE_URL is the server root as Claude Code wants it in ANTHROPIC_BASE_URL (http://127.0.0.1:PORT;
# a trailing /v1 is dropped). Arguments may come from the environment instead:
#   CLAUDE_CODE_BASE_URL, CLAUDE_CODE_KEY, CLAUDE_CODE_MODEL (default vllm/meta-llama/Llama-3.1-8B-Instruct),
#   CLAUDE_CODE_PROMPT.
# Other settings:
#   CLAUDE_CODE_AUTH=x-api-key|bearer   how the key travels: ANTHROPIC_API_KEY (x-api-key header,
#                                       the default) or ANTHROPIC_AUTH_TOKEN (Authorization: Bearer)
#   CLAUDE_CODE_VERSION=2.1.197         npm version of @anthropic-ai/claude-code (pinned: bump on purpose)
#   CLAUDE_CODE_DIR=~/.cache/gomodel/claude-code-VERSION   where the CLI is installed (npm --prefix)
#   CLAUDE_CODE_FULL=1                  what Claude Code sends by default: its own system prompt
#                                       and 24 tools (~20k tokens), max_tokens 32000, no structured
#                                       output: for a real model. Without it (the default), the
#                                       request fits the tiny random-weight test model (see below)
#                                       and its answer is exactly "hello", quotes included.
#   CLAUDE_CODE_MAX_OUTPUT_TOKENS, CLAUDE_CODE_EXTRA_BODY   passed to the CLI when set (they replace
#                                       the tiny-model defaults, 32 and the structured output)
#   CLAUDE_CODE_MAX_RETRIES=0           retries of a failed API call (Claude Code's default is 10)
#   CLAUDE_CODE_TIMEOUT=120             seconds before the CLI is killed
#
# Nothing is started here: point it at a running gateway. The CLI runs with a throwaway HOME in an
# empty throwaway directory, with only the variables below in its environment (nothing inherited
# such as a developer's ANTHROPIC_* or a proxy), and non-essential traffic, telemetry, error
# reporting and the auto-updater off: the only connections it makes are to BASE_URL.
#
# Prints the CLI's JSON result on stdout. Exit status: 0 when the CLI exited 0 with a result that is
# not an error; 1 otherwise (the CLI's stderr and result are shown); 2 on bad usage; 3 when the CLI
# could not be installed (npm missing, or the registry unreachable).
set -euo pipefail

VERSION="${CLAUDE_CODE_VERSION:-2.1.197}"
DIR="${CLAUDE_CODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gomodel/claude-code-$VERSION}"
PKG="@anthropic-ai/claude-code"

log() { echo "[claude_code] $*" >&2; }

install_cli() { # -> sets CLAUDE (array: the command that runs the CLI) and CLAUDE_VERSION
  local bin="$DIR/node_modules/.bin/claude" wrapper="$DIR/node_modules/$PKG/cli-wrapper.cjs"
  if [[ ! -e "$bin" ]]; then
    command -v npm >/dev/null || { log "npm not found: cannot install $PKG"; return 3; }
    log "installing $PKG@$VERSION into $DIR"
    mkdir -p "$DIR"
    npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "$PKG@$VERSION" >&2 \
      || { log "npm install $PKG@$VERSION failed"; return 3; }
  fi
  # The package's postinstall puts the native binary in place of bin/claude.exe; where npm did not
  # run it (install scripts refused), the package's own wrapper finds the binary instead.
  if CLAUDE_VERSION=$("$bin" --version 2>/dev/null); then
    CLAUDE=("$bin")
  elif command -v node >/dev/null && CLAUDE_VERSION=$(node "$wrapper" --version 2>/dev/null); then
    CLAUDE=(node "$wrapper")
  else
    log "$PKG in $DIR does not run (remove the directory to reinstall)"
    return 3
  fi
}

if [[ "${1:-}" == "--install" ]]; then
  install_cli || exit $?
  echo "$CLAUDE_VERSION"
  exit 0
fi

BASE_URL="${1:-${CLAUDE_CODE_BASE_URL:-}}"
KEY="${2:-${CLAUDE_CODE_KEY:-}}"
MODEL="${3:-${CLAUDE_CODE_MODEL:-vllm/meta-llama/Llama-3.1-8B-Instruct}}"
PROMPT="${4:-${CLAUDE_CODE_PROMPT:-Say hello in five words.}}"
if [[ -z "$BASE_URL" || -z "$KEY" ]]; then
  sed -n '2,4p' "$0" >&2
  exit 2
fi
BASE_URL="${BASE_URL%/}"
BASE_URL="${BASE_URL%/v1}"

case "${CLAUDE_CODE_AUTH:-x-api-key}" in
  x-api-key) auth=(ANTHROPIC_API_KEY="$KEY") ;;
  bearer) auth=(ANTHROPIC_AUTH_TOKEN="$KEY") ;;
  *) log "CLAUDE_CODE_AUTH must be x-api-key or bearer"; exit 2 ;;
esac

install_cli || exit $?

scratch=$(mktemp -d "${TMPDIR:-/tmp}/claude-code-run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/home" "$scratch/work"

args=(-p "$PROMPT" --model "$MODEL" --output-format json --max-turns 1 --no-session-persistence)
# The environment is built from nothing (env -i): a developer's own ANTHROPIC_*, CLAUDE_* or proxy
# variables must not change what is tested.
env_vars=(
  PATH="$PATH" HOME="$scratch/home" TMPDIR="$scratch" LANG=C.UTF-8 TERM=dumb
  ANTHROPIC_BASE_URL="$BASE_URL" "${auth[@]}"
  ANTHROPIC_MODEL="$MODEL" ANTHROPIC_SMALL_FAST_MODEL="$MODEL" ANTHROPIC_DEFAULT_HAIKU_MODEL="$MODEL"
  CLAUDE_CODE_MAX_RETRIES="${CLAUDE_CODE_MAX_RETRIES:-0}"
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_TELEMETRY=1 DISABLE_ERROR_REPORTING=1
  DISABLE_AUTOUPDATER=1 DISABLE_BUG_COMMAND=1 DISABLE_COST_WARNINGS=1
)
max_output="${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-}"
extra_body="${CLAUDE_CODE_EXTRA_BODY:-}"
if [[ "${CLAUDE_CODE_FULL:-0}" != 1 ]]; then
  # The tiny random-weight test model (context 2048 tokens):
  # - Claude Code's own system prompt and 24 tool definitions are ~76 kB (~20k tokens): without
  #   tools and with a one-line system prompt the request is ~1.2 kB (~190 tokens);
  # - its max_tokens (32000) is more than the whole context, which vLLM refuses (400);
  # - a random model seldom emits end-of-turn, and an answer that stops at max_tokens is an error
  #   for Claude Code (after three "continue" retries); an empty answer is one too. A structured
  #   output (Anthropic's output_config.format, which vLLM turns into a grammar) makes the answer
  #   exactly "hello" (quotes included) and then end_turn. A JSON *object* would not do: this
  #   vLLM drops object-shaped text from a streamed Messages answer (its llama3_json tool parser
  #   takes it for a tool call), so the schema is a string. effort is what Claude Code sends; the
  #   body's output_config is replaced whole by CLAUDE_CODE_EXTRA_BODY's.
  # Everything else (headers, betas, thinking, metadata, streaming) is what Claude Code sends.
  args+=(--tools "" --system-prompt "You are a terse assistant. Answer in one short sentence.")
  max_output="${max_output:-32}"
  hello='{"output_config": {"effort": "high", "format": {"type": "json_schema", "schema": {"type": "string", "enum": ["hello"]}}}}'
  extra_body="${extra_body:-$hello}"
fi
[[ -n "$max_output" ]] && env_vars+=(CLAUDE_CODE_MAX_OUTPUT_TOKENS="$max_output")
[[ -n "$extra_body" ]] && env_vars+=(CLAUDE_CODE_EXTRA_BODY="$extra_body")

log "$CLAUDE_VERSION -> $BASE_URL model=$MODEL auth=${CLAUDE_CODE_AUTH:-x-api-key}"
set +e
(cd "$scratch/work" && env -i "${env_vars[@]}" timeout "${CLAUDE_CODE_TIMEOUT:-120}" \
  "${CLAUDE[@]}" "${args[@]}" </dev/null >"$scratch/out" 2>"$scratch/err")
rc=$?
set -e
cat "$scratch/out"
echo
if [[ $rc -ne 0 ]]; then
  log "the CLI exited $rc; its stderr:"
  cat "$scratch/err" >&2
  exit 1
fi
# One JSON object on one line: {"type":"result",...,"is_error":false,...,"result":"..."}.
if ! grep -q '"type":"result"' "$scratch/out" || ! grep -q '"is_error":false' "$scratch/out"; then
  log "the CLI exited 0 but did not print a result that is not an error; its stderr:"
  cat "$scratch/err" >&2
  exit 1
fi
