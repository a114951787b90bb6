"""The real Codex CLI (`@openai/codex`) completes a turn against a real server, run as its users
run it: `codex exec` with a `[model_providers.local]` (`wire_api = "responses"`) in its
`config.toml`, and `codex exec --oss` pointed at the server's Ollama port.

Codex's first request holds ~9k prompt tokens, a namespace tool, a hosted web_search tool and
`client_metadata`: the served model is the demo model's weights with a 32k window. The answer's
words are not checked (the demo weights know nothing past 2k positions); the turn must end with
exit status 0 and every request the server saw must have succeeded. On a busy 2-core machine a
turn's prefill takes about half a minute, so the timeouts are generous.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.agents.conftest import agent_cli
from tests.server_process import ServerProcess

TURN_TIMEOUT = 900  # seconds for one `codex exec` turn, prefill of ~9k tokens included
PROMPT = "Say hello in one short sentence. Do not run any command."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(long_window_demo):
    port = free_port()
    with ServerProcess(long_window_demo, "--ollama-port", str(port), timeout=120) as proc:
        proc.ollama_port = port
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def codex_home(tmp_path: Path, config: str) -> Path:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(config)
    return home


def run_codex(tmp_path: Path, home: Path, *args: str, env: dict[str, str] | None = None):
    """One non-interactive turn; returns (the finished process, seconds it took)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    started = time.monotonic()
    done = subprocess.run(
        [agent_cli("codex"), "exec", "--skip-git-repo-check", "-C", str(workdir), *args, PROMPT],
        env={**os.environ, "CODEX_HOME": str(home), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TURN_TIMEOUT,
    )
    elapsed = time.monotonic() - started
    print(f"codex {' '.join(args)}: exit {done.returncode} in {elapsed:.1f}s")
    print("stdout:", done.stdout, sep="\n")
    print("stderr:", done.stderr[-4000:], sep="\n")
    return done, elapsed


def requests_seen(server: ServerProcess, since: int) -> list[tuple[str, int]]:
    """(request line, status) of each access-log line written after `since` characters."""
    found = re.findall(r'"([A-Z]+ /\S*)" (\d{3})', server.log()[since:])
    return [(line, int(status)) for line, status in found if not line.endswith("/health")]


def test_codex_exec_with_a_responses_provider_completes_a_turn(server, tmp_path):
    config = f"""
model = "mistral"
model_provider = "local"

[model_providers.local]
name = "mlx-mistral"
base_url = "{server.url("/v1")}"
wire_api = "responses"
# A failed request must fail the test, not be retried away; a slow prefill is not a failure.
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = {TURN_TIMEOUT * 1000}
"""
    home = codex_home(tmp_path, config)
    since = len(server.log())
    done, _ = run_codex(tmp_path, home, "-c", "model_provider=local")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "codex printed no answer"
    seen = requests_seen(server, since)
    assert ("POST /v1/responses", 200) in seen, seen
    assert all(status < 400 for _, status in seen), seen
    # Its hosted web_search tool was left out of the prompt, and the log said so.
    assert "('web_search') is not offered to the model" in server.log()


def test_codex_oss_against_the_ollama_port_completes_a_turn(server, tmp_path):
    # Codex's built-in Ollama provider cannot be redefined: the config picks it, the
    # environment gives its port.
    config = 'oss_provider = "ollama"\n'
    home = codex_home(tmp_path, config)
    since = len(server.log())
    env = {"CODEX_OSS_PORT": str(server.ollama_port)}
    done, _ = run_codex(tmp_path, home, "--oss", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "codex printed no answer"
    seen = requests_seen(server, since)
    # --oss checks the Ollama version, pulls its default model (gpt-oss:20b: served by the one
    # model, so the pull answers `success` without downloading), then talks Responses.
    for request in ("GET /api/version", "POST /api/pull", "POST /v1/responses"):
        assert (request, 200) in seen, seen
    assert all(status < 400 for _, status in seen), seen
