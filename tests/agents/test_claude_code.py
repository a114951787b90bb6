"""Claude Code, run as its users run it (`claude -p`), against a real server.

The real CLI (`@anthropic-ai/claude-code`, installed by .ci/run) sends what it sends Anthropic:
~20 tools with schemas written for a hosted model, a three-block `system` whose first block is a
per-session attribution line, a system message inside `messages`, `thinking`, `context_management`
and `output_config.effort`. Its turn must complete (exit status 0), and a second session must
read the first one's prompt from the prefix cache (the attribution line is left out of it).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.agents.conftest import CLAUDE_TIMEOUT_SECONDS, agent_cli, claude_code_env
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(long_window_demo):
    with ServerProcess(long_window_demo) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def run_claude(server: ServerProcess, home: Path, workdir: Path) -> dict:
    """One non-interactive session; its JSON result (usage summed over its requests)."""
    started = time.monotonic()
    done = subprocess.run(
        [agent_cli("claude"), "-p", "Say hello.", "--output-format", "json"],
        cwd=workdir,
        env=claude_code_env(server.base_url, home),
        capture_output=True,
        text=True,
        timeout=CLAUDE_TIMEOUT_SECONDS,
    )
    print(f"claude -p took {time.monotonic() - started:.1f} s, exit status {done.returncode}")
    print(done.stdout, done.stderr)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log()[-5000:]}"
    result = json.loads(done.stdout)
    assert result["subtype"] == "success" and not result["is_error"], result
    return result


def test_claude_code_completes_a_turn_and_a_second_session_reads_the_cache(server, tmp_path):
    home, workdir = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    workdir.mkdir()
    first = run_claude(server, home, workdir)
    assert isinstance(first["result"], str)
    prompt = first["usage"]["input_tokens"] + first["usage"]["cache_read_input_tokens"]
    assert prompt > 5000  # the real agent's prompt, not a stand-in

    second = run_claude(server, home, workdir)  # a new session: a new attribution line
    usage = second["usage"]
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert usage["cache_read_input_tokens"] > 0.9 * prompt, usage
    assert '"POST /v1/messages" 200' in server.log()
