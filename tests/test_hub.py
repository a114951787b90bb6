"""Checkpoint resolution: local paths, repo ids from the HF cache, and clear errors offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_mistral.errors import ModelNotFoundError
from mlx_mistral.hub import resolve_model_path

PROBE = """
import json, sys
from mlx_mistral.hub import resolve_model_path
from mlx_mistral.errors import ModelNotFoundError
try:
    print(json.dumps({"path": str(resolve_model_path(sys.argv[1]))}))
except ModelNotFoundError as exc:
    print(json.dumps({"error": exc.message}))
"""


def fake_hub_cache(root, repo: str, checkpoint) -> str:
    """Lay out a checkpoint as huggingface_hub's cache does (models--org--name/snapshots/<rev>)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(checkpoint, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return str(snapshot)


def resolve_in_subprocess(name: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, name],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_directory(tiny_hf_checkpoint, tmp_path):
    assert resolve_model_path(tiny_hf_checkpoint) == tiny_hf_checkpoint
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither a local directory"):
        resolve_model_path(str(tmp_path / "missing" / "deeper"))


def test_repo_id_from_the_local_cache_offline(tiny_hf_checkpoint, tmp_path):
    snapshot = fake_hub_cache(tmp_path, "mistralai/Mistral-7B-Instruct-v0.2", tiny_hf_checkpoint)
    result = resolve_in_subprocess(
        "mistralai/Mistral-7B-Instruct-v0.2", HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1"
    )
    assert result == {"path": snapshot}


def test_missing_repo_offline_says_what_to_run(tmp_path):
    result = resolve_in_subprocess(
        "mistralai/Mistral-7B-Instruct-v0.2", HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1"
    )
    message = result["error"]
    assert "mistralai/Mistral-7B-Instruct-v0.2" in message and "HF_HUB_OFFLINE" in message
    assert "hf download mistralai/Mistral-7B-Instruct-v0.2" in message
    assert "\n" not in message


def test_unreachable_hub_is_one_clear_sentence(tmp_path):
    # A closed port on this machine: the download fails at once, as with no network.
    result = resolve_in_subprocess(
        "someone/some-model",
        HF_HUB_CACHE=str(tmp_path),
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_OFFLINE="0",
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    message = result["error"]
    assert message.startswith("could not get model 'someone/some-model' from the Hugging Face hub")
    assert "\n" not in message
