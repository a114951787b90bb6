"""With no --model: Mistral-7B-Instruct-v0.2 when found locally, else the bundled demo model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

PROBE = (
    "import json; from mlx_mistral.demo import default_model; print(json.dumps(default_model()))"
)


def default_model_with(**env) -> tuple[str, bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**{k: v for k, v in os.environ.items() if k != "MLX_MISTRAL_MODEL"}, **env},
    )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_demo_model_when_nothing_is_found(tmp_path):
    path, is_demo = default_model_with(
        HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"
    )
    assert is_demo and path.endswith("demo_model")


def test_converted_copy_is_found(tmp_path, tiny_hf_checkpoint):
    converted = tmp_path / ".cache" / "mlx-mistral" / "Mistral-7B-Instruct-v0.2-4bit"
    shutil.copytree(tiny_hf_checkpoint, converted)
    path, is_demo = default_model_with(
        HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"
    )
    assert (path, is_demo) == (str(converted), False)
    (converted / "model.safetensors").unlink()  # incomplete: not served
    assert (
        default_model_with(
            HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"
        )[1]
        is True
    )


def test_hf_cache_is_found(tmp_path, tiny_hf_checkpoint):
    from tests.test_hub import fake_hub_cache

    snapshot = fake_hub_cache(
        tmp_path / "hub", "mistralai/Mistral-7B-Instruct-v0.2", tiny_hf_checkpoint
    )
    path, is_demo = default_model_with(
        HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"
    )
    assert (path, is_demo) == (snapshot, False)


def test_environment_variable_wins(tmp_path, tiny_hf_checkpoint):
    path, is_demo = default_model_with(
        HOME=str(tmp_path), MLX_MISTRAL_MODEL=str(tiny_hf_checkpoint)
    )
    assert (path, is_demo) == (str(tiny_hf_checkpoint), False)
