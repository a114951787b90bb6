"""Request shapes that IDEs and chat front ends send (Continue, Zed, Cline, Open WebUI), as raw
HTTP on the tiny random model: what issue 13 asks the server to accept, and what it must keep
refusing.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.clients.clients_common import WEATHER_TOOL, served_model


def chat(server, timeout: float = 120, **body) -> httpx.Response:
    request = {
        "model": served_model(server),
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 4,
        **body,
    }
    return httpx.post(server.url("/v1/chat/completions"), json=request, timeout=timeout)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_seed_minus_one(tiny_server):
    ok(chat(tiny_server, seed=-1))


def test_more_than_four_stop_strings(tiny_server):
    """Continue's autocomplete sends about a dozen."""
    stops = ["\n\n", "```", "/src/", "#- coding", "function", "class", "def ", "\n}", "<fim"]
    ok(chat(tiny_server, stop=stops))


def context_length(server) -> int:
    return httpx.get(server.url("/v1/models"), timeout=10).json()["data"][0]["context_length"]


def test_max_tokens_beyond_the_context_is_clamped(tiny_server):
    """Continue sends max_tokens 4096 by default. The prompt nearly fills the context, so the
    room left (what the answer is clamped to) is small and quick to generate."""
    room = 24
    words = context_length(tiny_server) - room - 8  # ~1 token a word, ~8 of chat template
    answer = ok(chat(tiny_server, messages=[{"role": "user", "content": "hi " * words}],
                     max_tokens=4096, temperature=0))  # fmt: skip
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == context_length(tiny_server)
    assert answer["choices"][0]["finish_reason"] == "length"


def test_a_prompt_that_alone_overflows_stays_a_400(tiny_server):
    words = context_length(tiny_server) + 16
    response = chat(tiny_server, messages=[{"role": "user", "content": "hi " * words}])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "field",
    [
        {"modalities": ["text"]},
        {"prediction": {"type": "content", "content": "Hello"}},
        {"reasoning_effort": "low"},
        {"verbosity": "low"},
        {"prompt_cache_key": "session-1"},
        {"safety_identifier": "user-1"},
        {"store": False},
        {"metadata": {"app": "tests"}},
        {"service_tier": "auto"},
        {"keep_alive": "5m"},
        {"num_ctx": 2048},
        {"cache_prompt": True},
        {"chat_template_kwargs": {}},
    ],
    ids=lambda field: next(iter(field)),
)
def test_documented_fields_are_accepted(tiny_server, field):
    ok(chat(tiny_server, **field))


@pytest.mark.parametrize(
    "field",
    [{"modalities": ["text", "audio"]}, {"web_search_options": {"search_context_size": "low"}}],
    ids=lambda field: next(iter(field)),
)
def test_what_the_server_cannot_do_is_a_400_naming_it(tiny_server, field):
    response = chat(tiny_server, **field)
    assert response.status_code == 400
    assert next(iter(field)) in response.text


def test_an_undocumented_field_stays_a_400(tiny_server):
    response = chat(tiny_server, frobnicate=True)
    assert response.status_code == 400
    assert "frobnicate" in response.text


LEGACY_FUNCTION = WEATHER_TOOL["function"] | {
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
        "required": ["city"],
    }
}


def test_legacy_functions_and_function_call(tiny_server):
    answer = ok(
        chat(
            tiny_server,
            functions=[LEGACY_FUNCTION],
            function_call={"name": "get_weather"},
            max_tokens=64,
        )
    )
    message = answer["choices"][0]["message"]
    assert message["function_call"]["name"] == "get_weather"
    assert json.loads(message["function_call"]["arguments"])["city"] in ("Paris", "London")


def test_the_function_role(tiny_server):
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"temperature": 21}'},
    ]
    ok(chat(tiny_server, messages=messages, functions=[LEGACY_FUNCTION]))


def test_completions_with_a_list_of_prompts(tiny_server):
    body = {"model": served_model(tiny_server), "prompt": ["Hello", "Goodbye"], "max_tokens": 3}
    answer = ok(httpx.post(tiny_server.url("/v1/completions"), json=body, timeout=120))
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("length", "stop") for c in answer["choices"])


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/models", None),
        ("POST", "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("POST", "/completions", {"prompt": "Hi"}),
    ],
)
def test_paths_without_v1(tiny_server, method, path, body):
    if body is not None:
        body = {"model": served_model(tiny_server), "max_tokens": 2, **body}
    ok(httpx.request(method, tiny_server.url(path), json=body, timeout=120))


def with_host(server, host: str) -> httpx.Response:
    return httpx.get(server.url("/v1/models"), headers={"Host": host}, timeout=10)


@pytest.mark.parametrize("name", ["host.docker.internal", "mlx.localhost", "gateway.internal"])
def test_container_host_names_are_accepted(tiny_server, name):
    ok(with_host(tiny_server, f"{name}:{tiny_server.port}"))


@pytest.mark.parametrize("name", ["evil.example.com", "127.0.0.1.nip.io", "internal.evil.com"])
def test_other_host_names_stay_refused(tiny_server, name):
    """DNS rebinding: a page on another name must not reach the loopback server."""
    assert with_host(tiny_server, f"{name}:{tiny_server.port}").status_code in (400, 403)


def test_cors_preflight_is_answered_without_granting_access(tiny_server):
    response = httpx.options(
        tiny_server.url("/v1/chat/completions"),
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert response.status_code in (200, 204), response.text
    assert "access-control-allow-origin" not in response.headers
