"""The code paths only a GPU takes, run here with the device's answers forced, and `--dtype`.

Every Mac runs the `on_gpu()` branches (half precision by default, Metal's memory figures, the
wired limit, no CPU row padding); the suite runs on MLX's CPU backend. The `on_a_mac` fixture
makes MLX answer as a Mac's does (the default device is a GPU, Metal is available, the device
reports a Mac's working set) and records the wired-limit calls, so a mistake in those branches
fails here before it reaches a Mac. The arithmetic itself still runs on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import mlx.core as mx
import pytest

from mlx_mistral import _blas
from mlx_mistral.demo import demo_model_path
from mlx_mistral.device import DTYPE_ENV, default_compute_dtype
from mlx_mistral.engine import EngineConfig
from mlx_mistral.lifecycle import ModelSlot
from mlx_mistral.loader import load
from mlx_mistral.memory import available_memory_bytes, unwire, wire
from mlx_mistral.padded_linear import PaddedLinear
from tests.server_process import ServerProcess

GiB = 2**30
MAC_INFO = {
    "architecture": "applegpu_g15s",
    "device_name": "Apple M3 Pro",
    "memory_size": 18 * GiB,
    "max_recommended_working_set_size": 12 * GiB,
}
ACTIVE = 5 * GiB


@pytest.fixture
def wired_limits(monkeypatch) -> list[int]:
    """The values passed to `mx.set_wired_limit` (recorded, never applied)."""
    calls: list[int] = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    return calls


@pytest.fixture
def on_a_mac(monkeypatch, wired_limits) -> list[int]:
    """MLX answers as on an Apple-Silicon Mac; returns the recorded wired limits."""
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: dict(MAC_INFO))
    monkeypatch.setattr(mx, "get_active_memory", lambda: ACTIVE)
    return wired_limits


# -- default_compute_dtype --------------------------------------------------------------------
@pytest.mark.parametrize(
    "checkpoint, expected",
    [
        (None, mx.float16),
        (mx.float16, mx.float16),
        (mx.float32, mx.float16),  # an fp32 original still computes in half precision on a Mac
        (mx.bfloat16, mx.bfloat16),  # bf16 weights keep their range
    ],
)
def test_a_gpu_computes_in_half_precision(on_a_mac, checkpoint, expected):
    assert default_compute_dtype(checkpoint) == expected


def test_the_cpu_computes_in_float32(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert default_compute_dtype(mx.float16) == mx.float32


@pytest.mark.parametrize("name, dtype", [("float32", mx.float32), ("bfloat16", mx.bfloat16)])
def test_the_environment_overrides_the_device(on_a_mac, monkeypatch, name, dtype):
    monkeypatch.setenv(DTYPE_ENV, name)
    assert default_compute_dtype(mx.float16) == dtype


def test_an_unknown_dtype_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(DTYPE_ENV, "float64")
    with pytest.raises(ValueError, match=DTYPE_ENV):
        default_compute_dtype()


# -- memory.py: Metal's figures and the wired limit ---------------------------------------------
def test_a_gpu_sizes_the_kv_from_the_recommended_working_set(on_a_mac):
    assert available_memory_bytes() == 12 * GiB - ACTIVE


def test_a_gpu_with_no_room_left_reports_none(on_a_mac, monkeypatch):
    monkeypatch.setattr(mx, "get_active_memory", lambda: 13 * GiB)
    assert available_memory_bytes() == 0


def test_the_wired_limit_is_capped_by_the_working_set(on_a_mac):
    wire(20 * GiB)
    wire(3 * GiB)
    unwire()
    assert on_a_mac == [12 * GiB, 3 * GiB, 0]


def test_the_wired_limit_is_left_alone_off_metal(wired_limits):
    wire(3 * GiB)
    unwire()
    assert wired_limits == []


def test_a_model_slot_on_a_mac_wires_its_memory_and_gives_it_back(on_a_mac):
    """The whole load path on a 'Mac': half-precision weights, budgets from Metal's figures,
    the wired limit set at load and cleared at unload."""
    slot = ModelSlot(lambda: load(demo_model_path()), EngineConfig(prompt_cache=None))
    slot.load()
    assert slot.compute_dtype == "float16"
    assert slot.model.model.embed_tokens.weight.dtype == mx.float16
    # 60% of the working set left after the weights, split between the KV and the prefix cache.
    budgets = slot.budgets
    assert budgets.kv_bytes + budgets.prefix_cache_bytes == int((12 * GiB - ACTIVE) * 0.6)
    slot.unload()
    assert len(on_a_mac) == 2 and 0 < on_a_mac[0] <= 12 * GiB and on_a_mac[1] == 0


# -- padded_linear.py -----------------------------------------------------------------------
def test_a_gpu_never_pads_rows(on_a_mac):
    layer = PaddedLinear(1024, 1024)
    assert not layer.pad_rows
    x = mx.random.normal((8, 1024))
    assert mx.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-4).item()


@pytest.mark.skipif(_blas.loaded is None, reason="row padding is on with OpenBLAS only")
def test_the_cpu_pads_rows_and_keeps_each_rows_product():
    layer = PaddedLinear(1024, 1024)
    assert layer.pad_rows
    x = mx.random.normal((8, 1024))
    assert mx.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-4).item()


# -- --dtype on the command line ----------------------------------------------------------------
def cli(*args: str, env_dtype: str | None = None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != DTYPE_ENV}
    if env_dtype is not None:
        env[DTYPE_ENV] = env_dtype
    return subprocess.run(
        [sys.executable, "-m", "mlx_mistral.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_generate_runs_in_float16_when_asked():
    done = cli(
        "generate",
        "--model",
        str(demo_model_path()),
        "--dtype",
        "float16",
        "--prompt",
        "What is 2 + 2?",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_bad_dtype_is_one_line_naming_its_source(command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    done = cli(command, *extra, env_dtype="int8")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"mlx-mistral: error: {DTYPE_ENV} 'int8' is not a dtype "
        "(choose from float16, bfloat16, float32)"
    )
    assert "Traceback" not in done.stderr


def test_serve_computes_in_the_dtype_asked_and_says_so():
    with ServerProcess(demo_model_path(), "--dtype", "bfloat16") as server:
        health = httpx.get(server.url("/health"), timeout=10).json()
        assert health["dtype"] == "bfloat16"
        answer = httpx.post(
            server.url("/v1/chat/completions"),
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert "computing in bfloat16" in server.log()


def test_serve_takes_the_dtype_from_the_environment():
    with ServerProcess(demo_model_path(), env={DTYPE_ENV: "float16"}) as server:
        assert httpx.get(server.url("/health"), timeout=10).json()["dtype"] == "float16"


def test_serve_refuses_a_bad_dtype_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "mlx_mistral.server", "--dtype", "float8", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--dtype" in done.stderr and "Traceback" not in done.stderr


# -- _blas.py: the reference-BLAS advice is for the CPU backend only -----------------------------
def test_a_gpu_gets_no_blas_advice(on_a_mac, monkeypatch):
    monkeypatch.setattr(_blas, "loaded", None)  # as on a machine without OpenBLAS
    monkeypatch.setattr(sys, "platform", "linux")  # CUDA machines are Linux ones
    monkeypatch.delenv("MLX_MISTRAL_BLAS", raising=False)
    assert _blas.reference_blas_warning() is None
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert "OpenBLAS" in _blas.reference_blas_warning()
