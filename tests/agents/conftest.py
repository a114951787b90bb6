"""What the coding-agent tests share: a model whose window holds an agent's prompt, the CLIs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mlx_mistral.demo import demo_model_path

ROOT = Path(__file__).resolve().parents[2]
# .ci/run installs the agents' npm packages here (the folder is git-ignored).
AGENTS_BIN = ROOT / "build" / "agents" / "node_modules" / ".bin"
# Claude Code's first request holds ~20k tokens and Codex's ~7k: the demo model's weights with a
# 32k window in a copied config (the weights know nothing of positions past 2k, so the answers
# are short and odd, which is not what these tests look at).
AGENT_WINDOW = 32768


def agent_cli(name: str) -> str:
    """Path of an agent's CLI: build/agents first (as CI installs it), then PATH.

    On CI a missing CLI fails the test instead of skipping it, so a broken install step shows.
    """
    found = AGENTS_BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (.ci/run installs it into build/agents)")
    pytest.skip(f"{name} is not installed: npm install --prefix build/agents (see .ci/run)")


@pytest.fixture(scope="session")
def long_window_demo(tmp_path_factory) -> Path:
    """The demo model's weights with a 32k-token context window."""
    out = tmp_path_factory.mktemp("demo-32k")
    for item in demo_model_path().iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = AGENT_WINDOW
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# -- Claude Code ------------------------------------------------------------------------------
# Claude Code's first request on a cold server prefills ~13-20k tokens: ~45 s on a quiet 2-core
# CPU, minutes on a busy one. Its own request timeout (API_TIMEOUT_MS) and the tests' waits are
# set far above that.
CLAUDE_TIMEOUT_SECONDS = 1200


def claude_code_env(base_url: str, home: Path) -> dict[str, str]:
    """The environment Claude Code runs in as a user of this server has it: the server's URL
    and a key, its configuration in `home`, and nothing that calls Anthropic's services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    return {
        **env,
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-local",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry, updates, error reports
        "DISABLE_AUTOUPDATER": "1",
        "API_TIMEOUT_MS": str(CLAUDE_TIMEOUT_SECONDS * 1000),
    }
