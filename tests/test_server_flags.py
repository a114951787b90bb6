"""Start-up flags that could hurt the machine or its user: a --warm-prompt that never ends or
could not fit, and CORS open to every origin without a key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mlx_mistral
from tests.server_process import ServerProcess


def serve(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlx_mistral.server", "--port", "0", "--prompt-cache-dir", "off"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=False)


def test_warm_prompt_from_a_device_or_fifo_is_refused_unread(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block for ever: it must not even be opened
    for path in ("/dev/zero", str(fifo), str(tmp_path)):
        result = serve("--warm-prompt", path)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"--warm-prompt: {path} is not a regular file" in result.stderr


def test_warm_prompt_larger_than_the_context_could_hold_is_refused(tmp_path):
    demo = str(mlx_mistral.demo_model_path())  # a 2,048-token context
    big = tmp_path / "big.txt"
    big.write_text("word " * 40_000)  # 200 KB: more than 2,048 tokens of any text
    result = serve("--model", demo, "--warm-prompt", str(big))
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1
    assert "more than the model's context could hold" in result.stderr
    small = tmp_path / "small.txt"
    small.write_text("You are a helpful assistant.")
    with ServerProcess(demo, "--warm-prompt", str(small)) as server:
        assert "warm prompt:" in server.log()


@pytest.mark.parametrize("key", [None, "k"])
def test_cors_open_to_every_origin_without_a_key_is_warned_of(tiny_hf_checkpoint, key):
    env = {"MLX_MISTRAL_API_KEY": key} if key else None
    with ServerProcess(tiny_hf_checkpoint, "--cors-origins", "*", env=env) as server:
        warned = "--cors-origins '*' without an API key" in server.log()
    assert warned == (key is None)
