"""A real agent client: Claude Code's CLI runs one `-p` prompt through the gateway to the real vLLM.

tests/integration/claude_code.sh installs the CLI (npm C{@anthropic-ai/claude-code}, pinned, once,
into a cache directory) and runs it offline with C{ANTHROPIC_BASE_URL} at the gateway, a throwaway
HOME and nothing inherited from this environment. The request is what Claude Code sends (streamed
C{/v1/messages?beta=true}, its headers, betas, thinking, metadata) cut to fit the tiny model: no
tools, a one-line system prompt, max_tokens 32, and a structured output that makes the random
model answer exactly C{"hello"} and stop (see the script and tests/integration/CLAUDE_CODE.md).

Skipped, with the reason, when the CLI cannot be installed (no npm, or no registry).
"""

import json
import os
import subprocess

import pytest

from tests.integration.support import CHAT_MODEL

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "claude_code.sh")
MODEL = f"vllm/{CHAT_MODEL}"
INSTALL_TIMEOUT = 300
RUN_TIMEOUT = 180
# Settings of the script that would change what is tested, were they set in this environment.
_SCRIPT_SETTINGS = ("CLAUDE_CODE_BASE_URL", "CLAUDE_CODE_KEY", "CLAUDE_CODE_MODEL", "CLAUDE_CODE_PROMPT",
                    "CLAUDE_CODE_AUTH", "CLAUDE_CODE_FULL", "CLAUDE_CODE_MAX_OUTPUT_TOKENS",
                    "CLAUDE_CODE_EXTRA_BODY", "CLAUDE_CODE_MAX_RETRIES")


def _script_env(**settings):
    env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_SETTINGS}
    env.update(settings)
    return env


@pytest.fixture(scope="module")
def claude_code():
    """The CLI's version, once it is installed (C{claude_code.sh --install})."""
    proc = subprocess.run(["bash", SCRIPT, "--install"], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT, env=_script_env(), stdin=subprocess.DEVNULL)
    if proc.returncode == 3:
        pytest.skip(f"Claude Code's CLI cannot be installed: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def run_claude(base_url, key, model=MODEL, auth="x-api-key"):
    """One C{claude -p} through the script: (its exit status, the CLI's JSON result, its stderr)."""
    proc = subprocess.run(["bash", SCRIPT, base_url, key, model], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=_script_env(CLAUDE_CODE_AUTH=auth),
                          stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result from the CLI (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


@pytest.fixture(scope="module")
def direct(claude_code, vllm):
    """The same prompt sent by the CLI straight to the keyless chat vLLM, for comparison."""
    rc, result, stderr = run_claude(vllm.chat_root, "unused", model=CHAT_MODEL)
    assert rc == 0, (result, stderr)
    return result


@pytest.mark.parametrize("auth", ["x-api-key", "bearer"])
def test_one_shot_prompt_through_the_gateway(claude_code, direct, gateway, auth):
    rc, result, stderr = run_claude(gateway.root, gateway.master_key, auth=auth)
    assert rc == 0, (result, stderr)
    assert result["type"] == "result" and result["is_error"] is False, result
    assert result["num_turns"] == 1, result
    # The structured output made vLLM's random model answer exactly this, then end its turn.
    assert result["result"] == '"hello"', result
    assert result["stop_reason"] == "end_turn", result
    assert list(result["modelUsage"]) == [MODEL], result
    # Counted by vLLM: the same prompt as sent straight to vLLM, so the same number of tokens.
    assert result["usage"]["input_tokens"] == direct["usage"]["input_tokens"] > 0, (result, direct)
    assert result["usage"]["output_tokens"] > 0, result


def test_wrong_key_is_an_authentication_error_for_claude_code(claude_code, gateway):
    rc, result, stderr = run_claude(gateway.root, "sk-not-a-gateway-key")
    assert rc == 1, (result, stderr)
    assert result["is_error"] is True and result["api_error_status"] == 401, result
