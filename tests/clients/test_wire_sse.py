"""The streamed wire format as OpenAI sends it, asserted on the raw SSE bytes (no client library
in between to smooth it over): one entry per tool-call index per chunk, `content: null` opening
a tool-call answer, and logprob tokens that join to the content (issue 13).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.clients.clients_common import GREETING, WEATHER_TOOL, served_model


def sse_chunks(server, body: dict) -> list[dict]:
    """POST a streamed chat request; every `data:` event's JSON, checking the framing."""
    with httpx.stream(
        "POST", server.url("/v1/chat/completions"), json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    events = [e for e in raw.split(b"\n\n") if e.strip() and not e.startswith(b":")]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events), raw
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]


# The city as an enum, so the random tiny model's call ends within max_tokens as well.
CITY_TOOL = {
    "type": "function",
    "function": {
        **WEATHER_TOOL["function"],
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
            "required": ["city"],
        },
    },
}


def tool_stream(server, **extra) -> list[dict]:
    return sse_chunks(
        server,
        {
            "model": served_model(server),
            "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
            "tools": [CITY_TOOL],
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 64,
            **extra,
        },
    )


@pytest.fixture(params=["tiny", "demo"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def test_one_entry_per_tool_call_index_per_chunk(server):
    chunks = tool_stream(server, parallel_tool_calls=True)
    for chunk in chunks:
        for choice in chunk["choices"]:
            indices = [part["index"] for part in choice["delta"].get("tool_calls") or []]
            assert len(indices) == len(set(indices)), chunk


def test_streamed_tool_call_arguments_join_to_schema_valid_json(server):
    calls: dict[int, dict] = {}
    for chunk in tool_stream(server):
        for choice in chunk["choices"]:
            for part in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(part["index"], {"name": "", "arguments": "", "ids": []})
                call["name"] += part.get("function", {}).get("name") or ""
                call["arguments"] += part.get("function", {}).get("arguments") or ""
                call["ids"] += [part["id"]] if part.get("id") else []
    assert sorted(calls) == list(range(len(calls))) and calls
    for call in calls.values():
        assert call["name"] == "get_weather"
        assert json.loads(call["arguments"])["city"] in ("Paris", "London")
        assert len(call["ids"]) == 1  # the id comes once, with the header


def test_tool_call_stream_opens_with_null_content(server):
    first = tool_stream(server)[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert "content" in first and first["content"] is None, first


def test_tool_call_stream_never_sends_empty_content(server):
    for chunk in tool_stream(server):
        for choice in chunk["choices"]:
            assert choice["delta"].get("content") in (None,), chunk


def test_finish_reason_of_a_tool_call_stream(server):
    reasons = [c["finish_reason"] for k in tool_stream(server) for c in k["choices"]]
    assert [r for r in reasons if r] == ["tool_calls"]


# -- logprobs (demo model: its answer starts with a word whose token has a leading space) --------


def hello(demo_server, **extra) -> dict:
    return {
        "model": served_model(demo_server),
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        **extra,
    }


def assert_tokens_join(content: str, entries: list[dict]) -> None:
    assert "".join(e["token"] for e in entries) == content
    for entry in entries:
        assert entry["bytes"] == list(entry["token"].encode("utf-8")), entry
        for alternative in entry["top_logprobs"]:
            assert alternative["bytes"] == list(alternative["token"].encode("utf-8"))


def test_logprob_tokens_join_to_the_content(demo_server):
    response = httpx.post(
        demo_server.url("/v1/chat/completions"), json=hello(demo_server), timeout=120
    )
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["message"]["content"] == GREETING
    assert_tokens_join(GREETING, choice["logprobs"]["content"])


def test_streamed_logprob_tokens_join_to_the_content(demo_server):
    text, entries = "", []
    for chunk in sse_chunks(demo_server, hello(demo_server)):
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            entries += (choice.get("logprobs") or {}).get("content") or []
    assert text == GREETING
    assert_tokens_join(GREETING, entries)
