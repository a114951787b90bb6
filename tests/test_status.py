"""GET /v1/status against a real server, and the per-second token counts behind its chart."""

from __future__ import annotations

import httpx
import pytest

from mlx_mistral.demo import demo_model_path
from mlx_mistral.server.activity import Activity
from tests.server_process import ServerProcess

KEY = "status-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(demo_model_path(), "--api-key", KEY, "--max-memory", "1GiB") as server:
        yield server


def test_status_reports_the_model_memory_queue_and_addresses(server):
    status = httpx.get(server.url("/v1/status"), headers=AUTH).json()
    assert status["model"]["name"] == "demo_model"
    assert status["model"]["demo"] is True
    assert status["model"]["context_length"] > 0
    assert status["state"] == "loaded"
    assert status["memory"]["limit_bytes"] == 2**30
    assert status["memory"]["weights_bytes"] > 0
    assert status["disk_cache"] is None  # ServerProcess turns it off
    assert status["requests"]["active"] == 0
    assert len(status["tokens_per_second"]["counts"]) == 180
    assert status["served"]["base_urls"]["openai"] == server.url("/v1")
    assert status["served"]["api_key_required"] is True


def test_status_counts_the_tokens_a_request_generated(server):
    before = httpx.get(server.url("/v1/status"), headers=AUTH).json()
    answer = httpx.post(
        server.url("/v1/chat/completions"),
        headers=AUTH,
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12},
        timeout=60,
    ).json()
    after = httpx.get(server.url("/v1/status"), headers=AUTH).json()
    generated = answer["usage"]["completion_tokens"]
    assert after["tokens"]["generated"] - before["tokens"]["generated"] == generated
    assert (
        after["tokens"]["prompt"] - before["tokens"]["prompt"] == answer["usage"]["prompt_tokens"]
    )
    counted = sum(after["tokens_per_second"]["counts"]) - sum(before["tokens_per_second"]["counts"])
    assert counted == generated
    assert 0 <= after["prefix_cache"]["hit_rate"] <= 1


def test_status_is_behind_the_key_and_the_host_check(server):
    assert httpx.get(server.url("/v1/status")).status_code == 401
    wrong = httpx.get(server.url("/v1/status"), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    foreign = httpx.get(server.url("/v1/status"), headers={**AUTH, "Host": "evil.example"})
    assert foreign.status_code == 403


def test_status_reports_the_disk_prompt_cache(tmp_path):
    with ServerProcess(demo_model_path(), "--prompt-cache-dir", str(tmp_path)) as server:
        httpx.post(
            server.url("/v1/chat/completions"),
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
            timeout=60,
        ).raise_for_status()
        disk = httpx.get(server.url("/v1/status")).json()["disk_cache"]
    assert disk["directory"] == str(tmp_path)
    assert disk["limit_bytes"] == 10 * 2**30
    assert disk["entries"] >= 0  # written in the background: may not be counted yet


def test_activity_keeps_per_second_counts_for_its_window():
    now = [1000.5]
    activity = Activity(window=5, clock=lambda: now[0])
    activity.record(prompt=7, cached=3, generated=2)
    activity.record(generated=1)
    now[0] = 1002.2
    activity.record(generated=4)
    assert activity.per_second() == (1002, [0, 0, 3, 0, 4])
    now[0] = 1006.0  # the window is 1002..1006: the first second has left it
    assert activity.per_second() == (1006, [4, 0, 0, 0, 0])
    now[0] = 1007.0
    assert activity.per_second() == (1007, [0, 0, 0, 0, 0])
    assert (activity.prompt_tokens, activity.cached_tokens, activity.generated_tokens) == (7, 3, 7)
