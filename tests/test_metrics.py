"""`GET /metrics` on a real server: Prometheus' text format, counters that move with traffic."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_mistral.server import ServerConfig, create_app
from tests.server_process import ServerProcess

KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by (name, sorted labels), parsed by prometheus-client's parser."""
    response = httpx.get(server.url("/metrics"), headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint, "--api-key", KEY, "--keep-alive", "-1") as proc:
        yield proc


def test_metrics_need_the_key_when_one_is_set(server):
    assert httpx.get(server.url("/metrics")).status_code == 401
    wrong = httpx.get(server.url("/metrics"), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}  # liveness stays public


def test_counters_move_with_traffic(server):
    before = scrape(server)
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Tell me a long story about a cat. " * 4}],
        "temperature": 0,
        "max_tokens": 6,
    }
    answers = [httpx.post(server.url(CHAT), json=body, headers=AUTH, timeout=60) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers)
    usage = [a.json()["usage"] for a in answers]
    refused = httpx.post(server.url(CHAT), json={**body, "top_p": 7}, headers=AUTH)
    assert refused.status_code == 400
    assert httpx.post(server.url(CHAT), json=body).status_code == 401  # no key
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "mlx_mistral_requests_total"
    assert moved(requests, endpoint=CHAT, status="200") == 3
    assert moved(requests, endpoint=CHAT, status="400") == 1
    assert moved(requests, endpoint=CHAT, status="401") == 1
    assert moved(requests, endpoint="/metrics", status="200") == 1  # the first scrape
    assert moved("mlx_mistral_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    generated = sum(u["completion_tokens"] for u in usage)
    assert moved("mlx_mistral_generated_tokens_total") == generated
    assert moved("mlx_mistral_time_to_first_token_seconds_count") == 3
    assert moved("mlx_mistral_time_to_first_token_seconds_sum") > 0
    assert moved("mlx_mistral_time_per_output_token_seconds_count") == 3
    # Every chat repeats the same prompt: the prefix cache serves all but the first's.
    assert moved("mlx_mistral_prefix_cache_hit_tokens_total") > 0
    assert value(after, "mlx_mistral_model_loaded") == 1
    assert value(after, "mlx_mistral_model_loads_total") == 1
    assert value(after, "mlx_mistral_model_unloads_total") == 0
    assert value(after, "mlx_mistral_weights_bytes") > 0
    assert value(after, "mlx_mistral_queue_depth") == 0
    assert value(after, "mlx_mistral_running_sequences") == 0
    assert value(after, "mlx_mistral_kv_cache_bytes") == 0
    # A scanner's paths share one label instead of growing the set.
    httpx.get(server.url("/no/such/path"), headers=AUTH)
    assert value(scrape(server), requests, endpoint="other", status="404") >= 1


def test_two_apps_in_one_process_count_separately(tiny_hf_checkpoint):
    config = ServerConfig(model=str(tiny_hf_checkpoint), model_name="tiny")
    first, second = create_app(config), create_app(config)  # a global registry would clash
    first.state.metrics.requests.labels("/health", "200").inc()
    assert b'endpoint="/health"' in first.state.metrics.render()
    assert b'endpoint="/health"' not in second.state.metrics.render()


@pytest.mark.parametrize(
    "settings, enabled",
    [
        ({}, True),  # loopback
        ({"metrics": False}, False),
        ({"host": "0.0.0.0", "allow_public": True}, False),  # public and no key: off
        ({"host": "0.0.0.0", "api_key": KEY}, True),  # behind the key
    ],
)
def test_metrics_are_on_by_default_on_loopback_or_behind_a_key(
    tiny_hf_checkpoint, settings, enabled
):
    config = ServerConfig(model=str(tiny_hf_checkpoint), model_name="tiny", **settings)
    assert config.metrics_enabled is enabled
    paths = {getattr(route, "path", None) for route in create_app(config).routes}
    assert ("/metrics" in paths) is enabled
