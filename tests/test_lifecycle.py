"""The model's stay in memory on a real server: idle unload, reload, `keep_alive`, memory caps.

The unload test serves a checkpoint with ~100 MB of weights, so that the memory given back is
well above the process's RSS noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from mlx_mistral.errors import InvalidRequestError, ModelLoadError
from mlx_mistral.memory import plan_budgets, weights_bytes
from server.units import NEVER, parse_duration, parse_size
from tests.checkpoints import write_hf_checkpoint
from tests.server_process import ServerProcess

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
BLAS_FIX = "apt-get install libopenblas0-pthread"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def health(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(server.url("/health"), timeout=10).json()


def chat(server: ServerProcess, **extra: Any) -> httpx.Response:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 12, **extra}
    return httpx.post(server.url(CHAT), json=body, timeout=60)


# -- units -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, seconds",
    [
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("30s", 30),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        (300, 300),
        ("300", 300),
        (0, 0),
        ("0", 0),
        (-1, NEVER),
        ("-1", NEVER),
        ("-5m", NEVER),
    ],
)
def test_keep_alive_durations_as_ollama_reads_them(value, seconds):
    assert parse_duration(value, name="keep_alive") == seconds


@pytest.mark.parametrize("value", ["", "5x", "m", "5m3", "five", True, None, [], "nan", math.nan])
def test_a_bad_keep_alive_is_refused_naming_the_field(value):
    with pytest.raises(InvalidRequestError) as err:
        parse_duration(value, name="keep_alive")
    assert err.value.param == "keep_alive" and "5m" in err.value.message


@pytest.mark.parametrize(
    "value, size",
    [
        ("8GB", 8 * 10**9),
        ("8GiB", 8 * 2**30),
        ("8G", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512mb", 512 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("4096", 4096),
    ],
)
def test_memory_sizes(value, size):
    assert parse_size(value, name="--max-memory") == size


@pytest.mark.parametrize("value", ["", "8 gigs", "GB", "0", "8iB", "-1GB"])
def test_a_bad_size_is_refused_naming_the_flag(value):
    with pytest.raises(InvalidRequestError) as err:
        parse_size(value, name="--max-memory")
    assert err.value.param == "--max-memory"


# -- idle unload -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heavy_checkpoint(tmp_path_factory):
    """~100 MB of float32 weights (almost all of it the embeddings and the output layer)."""
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("heavy"),
        hidden_size=384,
        intermediate_size=768,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
    )


def test_idle_unload_returns_the_memory_and_the_next_request_reloads(heavy_checkpoint):
    with ServerProcess(heavy_checkpoint, "--keep-alive", "1") as server:
        pid = server.proc.pid
        assert BLAS_FIX not in server.log()  # OpenBLAS is installed on the test machines
        # Nothing asked for within a second of the start: the weights go.
        wait_for(lambda: not health(server)["loaded"], 15, "the unload after start-up")
        idle = health(server)
        assert idle["memory"]["weights_bytes"] == idle["memory"]["total_bytes"] == 0
        assert idle["unloads_at"] is None
        assert httpx.get(server.url("/api/ps")).json() == {"models": []}

        # A request with its own keep_alive loads them again and keeps them for an hour.
        first = chat(server, keep_alive="1h")
        assert first.status_code == 200, first.text
        assert "loading the model again" in server.log()
        loaded = health(server)
        weights = loaded["memory"]["weights_bytes"]
        assert loaded["loaded"] and weights > 90 * 2**20
        assert loaded["memory"]["prefix_cache_bytes"] > 0  # the conversation, for its next turn
        assert loaded["memory"]["total_bytes"] >= weights + loaded["memory"]["prefix_cache_bytes"]
        unloads_at = datetime.fromisoformat(loaded["unloads_at"])
        left = (unloads_at - datetime.now(UTC)).total_seconds()
        assert 3500 < left <= 3600
        (process,) = httpx.get(server.url("/api/ps")).json()["models"]
        assert abs((datetime.fromisoformat(process["expires_at"]) - unloads_at).total_seconds()) < 5
        time.sleep(1.5)  # longer than --keep-alive: the request's hour holds
        assert health(server)["loaded"]
        rss_loaded = rss_bytes(pid)

        # keep_alive 0: unloaded as soon as it is answered; the memory goes back to the system.
        second = httpx.post(
            server.url("/v1/completions"),
            json={"prompt": "Once upon a time", "max_tokens": 4, "keep_alive": 0},
            timeout=60,
        )
        assert second.status_code == 200, second.text
        wait_for(lambda: not health(server)["loaded"], 10, "the unload after keep_alive 0")
        freed = rss_loaded - rss_bytes(pid)
        assert health(server)["memory"]["total_bytes"] == 0  # the prefix cache went too
        assert freed > 0.7 * weights, (freed, weights)

        # The next request (the server's 1 s default again) reloads: the same greedy answer.
        third = chat(server)
        assert third.status_code == 200, third.text
        assert third.json()["choices"][0] == first.json()["choices"][0]
        wait_for(lambda: not health(server)["loaded"], 10, "the unload after the default 1 s")
        wait_for(lambda: server.log().count("model unloaded") == 3, 5, "three unloads logged")
        assert server.alive


def test_ollama_keep_alive_loads_and_unloads(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint, "--keep-alive", "-1") as server:
        assert health(server)["loaded"] and health(server)["unloads_at"] is None
        # Ollama's empty request with keep_alive 0 unloads the model; with another value, loads.
        unload = {"model": "mistral", "messages": [], "keep_alive": 0}
        assert httpx.post(server.url("/api/chat"), json=unload).status_code == 200
        wait_for(lambda: not health(server)["loaded"], 10, "the Ollama unload")
        assert httpx.get(server.url("/api/ps")).json() == {"models": []}
        load = {"model": "mistral", "prompt": "", "keep_alive": "10m"}
        assert httpx.post(server.url("/api/generate"), json=load).status_code == 200
        wait_for(lambda: health(server)["loaded"], 10, "the Ollama load")
        (process,) = httpx.get(server.url("/api/ps")).json()["models"]
        left = (datetime.fromisoformat(process["expires_at"]) - datetime.now(UTC)).total_seconds()
        assert 500 < left <= 600
        bad = {"model": "mistral", "prompt": "Hi", "keep_alive": "soon"}
        refused = httpx.post(server.url("/api/generate"), json=bad)
        assert refused.status_code == 400 and "keep_alive" in refused.json()["error"]
        refused = chat(server, keep_alive="soon")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "keep_alive"


# -- memory cap --------------------------------------------------------------------------------
def test_budgets_split_what_the_cap_leaves_beside_the_weights():
    def split(**kwargs: Any) -> tuple[int, int]:
        budgets = plan_budgets(100, kv_budget_bytes=None, **{"prefix_cache_bytes": None, **kwargs})
        return budgets.kv_bytes, budgets.prefix_cache_bytes

    assert split(max_memory_bytes=500) == (300, 100)  # a quarter of the 400 left
    assert split(max_memory_bytes=500, prefix_cache_bytes=10) == (390, 10)
    assert split(max_memory_bytes=500, prefix_cache_bytes=0) == (400, 0)
    assert split(max_memory_bytes=500, prefix_cache_bytes=10**6) == (300, 100)  # at most 1/4
    with pytest.raises(ModelLoadError, match="raise --max-memory"):
        split(max_memory_bytes=100)


def test_max_memory_refuses_what_cannot_fit_and_queues_or_503s_the_rest(
    tiny_hf_checkpoint, tiny_model
):
    model, tokenizer = tiny_model
    weights = weights_bytes(model)
    per_token = model.args.kv_bytes_per_token(4)  # float32 KV on the CPU backend
    # KV room for ~400 tokens: a quarter more goes to the prefix cache.
    cap = weights + 400 * per_token * 4 // 3
    args = ("--max-memory", str(cap), "--max-queue", "1", "--prefix-cache-mib", "0")
    with ServerProcess(tiny_hf_checkpoint, *args) as server:
        memory = health(server)["memory"]
        assert memory["limit_bytes"] == cap and memory["weights_bytes"] == weights
        # Never fits: a 400 naming max_tokens, whatever else runs.
        never = chat(server, max_tokens=1000)
        assert never.status_code == 400, never.text
        error = never.json()["error"]
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        assert "KV cache" in error["message"]
        # A prompt that alone needs more than the budget: the prompt is named, not max_tokens.
        alone = chat(server, messages=[{"role": "user", "content": "hello " * 800}], max_tokens=1)
        assert alone.status_code == 400, alone.text
        error = alone.json()["error"]
        assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
        assert error["message"].startswith("the prompt's ") and "max_tokens" not in error["message"]

        # Each fits alone, two do not fit together: one runs, one waits, the rest get 503.
        body = {"max_tokens": 300, "logit_bias": {str(tokenizer.eos_id): -100}}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: chat(server, **body), range(8)))
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) == {200, 503}, statuses
        assert statuses.count(200) >= 2  # the one waiting for memory ran after the first
        for answer in answers:
            if answer.status_code == 503:
                assert int(answer.headers["Retry-After"]) >= 1
            else:
                assert answer.json()["usage"]["completion_tokens"] == 300
        assert server.alive and health(server)["memory"]["total_bytes"] <= cap


def test_a_cap_below_the_weights_is_one_clear_line(tiny_hf_checkpoint):
    server = ServerProcess(tiny_hf_checkpoint, "--max-memory", "1MiB")
    with pytest.raises(RuntimeError, match="raise --max-memory"):
        server.start()
    assert server.proc.returncode == 1 and "Traceback" not in server.log()


def test_the_reference_blas_is_named_with_its_fix(tiny_hf_checkpoint):
    env = {"MLX_MISTRAL_BLAS": "/nonexistent/libopenblas.so.0"}  # as if none were installed
    with ServerProcess(tiny_hf_checkpoint, env=env) as server:
        assert BLAS_FIX in server.log()
