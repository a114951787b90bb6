"""Anthropic's Messages API on a real server, through the anthropic SDK and on raw bytes.

The demo model answers meaningfully (a greeting, arithmetic, a weather tool round trip), so the
tests can check what the SDK makes of the answers; greedy decoding throughout (this SDK version
has no `temperature` argument: it goes in `extra_body`). A second server, on the tiny random
model with an API key, checks the `x-api-key` header.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

import mlx_mistral
from tests.server_process import ServerProcess
from training.corpus import GREETING, TOOLS

GREEDY = {"temperature": 0}
HELLO = [{"role": "user", "content": "Hello"}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Tokyo?"}]
# The corpus's OpenAI tools in Anthropic's shape.
ANTHROPIC_TOOLS = {
    name: {
        "name": name,
        "description": tool["function"]["description"],
        "input_schema": tool["function"]["parameters"],
    }
    for name, tool in TOOLS.items()
}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(mlx_mistral.demo_model_path()) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0, timeout=60)


def create(client: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    kwargs.setdefault("model", "claude-sonnet-4-5")
    kwargs.setdefault("max_tokens", 48)
    return client.messages.create(extra_body=GREEDY, **kwargs)


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def raw_events(server: ServerProcess, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """POST a streamed request; the (event name, data) pairs exactly as the bytes say them."""
    with httpx.stream("POST", server.url("/v1/messages"), json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for chunk in raw.split("\n\n"):
        if not chunk:
            continue
        name, data = chunk.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), chunk
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        events.append((payload["type"], payload))
    return events


# -- messages.create / messages.stream / count_tokens -----------------------------------------
def test_create_answers_a_claude_model_name_with_the_served_model(client, server):
    message = create(
        client, system=[{"type": "text", "text": "You are a helpful assistant."}], messages=HELLO
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert text_of(message).strip() == GREETING
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    served = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]
    assert message.model == served  # not the claude-* name that was asked for


def test_count_tokens_is_the_prompt_the_answer_reports(client):
    for kwargs in (
        {"messages": HELLO},
        {"messages": HELLO, "system": "Answer briefly."},
        {"messages": WEATHER_QUESTION, "tools": [ANTHROPIC_TOOLS["get_weather"]]},
    ):
        counted = client.messages.count_tokens(model="claude-haiku-4-5", **kwargs)
        usage = create(client, **kwargs).usage
        # Anthropic's split: prompt tokens read from the (prefix) cache are not input_tokens.
        assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens
        assert usage.input_tokens > 0 and usage.output_tokens > 0
    plain = client.messages.count_tokens(model="m", messages=WEATHER_QUESTION).input_tokens
    tooled = client.messages.count_tokens(
        model="m", messages=WEATHER_QUESTION, tools=[ANTHROPIC_TOOLS["get_weather"]]
    ).input_tokens
    assert tooled > plain  # the tool definitions are part of the prompt


def test_a_final_assistant_message_is_continued(client):
    # Anthropic's "prefill": the answer goes on from the given text and holds only what is new.
    start = GREETING.split(" ")[0]
    message = create(client, messages=[*HELLO, {"role": "assistant", "content": start}])
    assert (start + text_of(message)).strip() == GREETING
    assert not text_of(message).strip().startswith(start)


def test_stream_text_and_final_message_match_the_whole_answer(client):
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = create(client, messages=question)
    with client.messages.stream(
        model="claude-x", max_tokens=48, messages=question, extra_body=GREEDY
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(whole) == text_of(final)
    assert "5" in text_of(final)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_and_max_tokens(client):
    stopped = create(client, messages=HELLO, stop_sequences=["zzz", "meet"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "meet"
    assert GREETING.startswith(text_of(stopped)) and "meet" not in text_of(stopped)
    with client.messages.stream(
        model="c", max_tokens=48, messages=HELLO, stop_sequences=["nice"], extra_body=GREEDY
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "nice"

    cut = create(client, messages=HELLO, max_tokens=3)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    # Claude Code asks for 32000 tokens as a ceiling: lowered to what the context leaves.
    assert create(client, messages=HELLO, max_tokens=10**6).stop_reason == "end_turn"


# -- tools -------------------------------------------------------------------------------------
def test_tool_use_round_trip(client):
    tools = [ANTHROPIC_TOOLS["get_weather"]]
    first = create(client, messages=WEATHER_QUESTION, tools=tools, tool_choice={"type": "auto"})
    assert first.stop_reason == "tool_use", first
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Tokyo"}

    conversation = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": json.dumps({"temperature": 18, "condition": "sunny"}),
                }
            ],
        },
    ]
    second = create(client, messages=conversation, tools=tools)
    assert second.stop_reason == "end_turn" and not any(
        block.type == "tool_use" for block in second.content
    )
    assert "18" in text_of(second) and "sunny" in text_of(second), text_of(second)


def test_tool_choice_any_and_tool_force_a_call(client):
    tools = list(ANTHROPIC_TOOLS.values())
    forced = create(client, messages=HELLO, tools=tools, tool_choice={"type": "any"})
    assert forced.stop_reason == "tool_use"
    assert forced.content and all(block.type == "tool_use" for block in forced.content)
    named = create(
        client,
        messages=WEATHER_QUESTION,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
    )
    calls = [block for block in named.content if block.type == "tool_use"]
    assert named.stop_reason == "tool_use" and [c.name for c in calls] == ["get_time"]
    assert set(calls[0].input) == {"city"}
    plain = create(client, messages=HELLO, tools=tools, tool_choice={"type": "none"})
    assert plain.stop_reason == "end_turn" and text_of(plain).strip() == GREETING


# -- the event stream on raw bytes --------------------------------------------------------------
def test_text_stream_event_sequence(server):
    events = raw_events(
        server, {"model": "claude-x", "max_tokens": 48, "messages": HELLO, **GREEDY}
    )
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas > 1
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ], names
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 0 and start["usage"]["input_tokens"] > 0
    assert events[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta")
    assert all(e["delta"]["type"] == "text_delta" for n, e in events if n == "content_block_delta")
    assert text.strip() == GREETING
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0


def test_tool_stream_event_sequence(server):
    body = {
        "model": "claude-x",
        "max_tokens": 48,
        "messages": WEATHER_QUESTION,
        "tools": [ANTHROPIC_TOOLS["get_weather"]],
        "tool_choice": {"type": "any"},
        **GREEDY,
    }
    events = raw_events(server, body)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == [
        "message_delta",
        "message_stop",
    ]
    starts = [e for n, e in events if n == "content_block_start"]
    assert len(starts) == names.count("content_block_stop") >= 1
    tool = starts[-1]
    assert tool["content_block"]["type"] == "tool_use" and tool["content_block"]["input"] == {}
    assert tool["content_block"]["name"] == "get_weather"
    partial = [
        e["delta"]["partial_json"]
        for n, e in events
        if n == "content_block_delta" and e["index"] == tool["index"]
    ]
    assert len(partial) > 1 and json.loads("".join(partial)) == {"city": "Tokyo"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


# -- other fields --------------------------------------------------------------------------------
def test_no_op_fields_thinking_and_output_format(client):
    message = create(
        client,
        messages=HELLO,
        metadata={"user_id": "u1"},
        service_tier="auto",
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert text_of(message).strip() == GREETING  # no thinking block: the model has none
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    answer = create(
        client,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert set(json.loads(text_of(answer))) == {"answer"}


# -- errors --------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"messages": HELLO}, "max_tokens"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "iVBORw0KGgo=",
                            },
                        },
                    ],
                }
            ]
        },
        "messages[0].content[1]",
    ),
    ({"messages": [{"role": "tool", "content": "x"}, *HELLO]}, "messages[0].role"),
    ({"messages": HELLO, "top_k": -1}, "top_k"),
    ({"messages": HELLO, "stop_sequences": [""]}, "stop_sequences"),
    ({"messages": HELLO, "frequency_penalty": 1}, "frequency_penalty"),
    ({"messages": HELLO, "mcp_servers": [{"type": "url", "url": "x"}]}, "mcp_servers"),
    (
        {"messages": HELLO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        "tools[0].type",
    ),
    (
        {"messages": HELLO, "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
        "tools[0].input_schema",
    ),
    ({"messages": HELLO, "tool_choice": {"type": "any"}}, "tool_choice"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}
            ]
        },
        "messages[0].content[0].tool_use_id",
    ),
]


@pytest.mark.parametrize("body, field", BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_requests_are_anthropic_errors_naming_the_field(server, body, field):
    body = {"model": "claude-x", "max_tokens": 8, **body}
    if field == "max_tokens":
        del body["max_tokens"]
    response = httpx.post(server.url("/v1/messages"), json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and set(error) == {"type", "error"}
    assert error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"], error


def test_the_sdk_raises_the_anthropic_error(client):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="claude-x",
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/cat.png"},
                        }
                    ],
                }
            ],
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    message = caught.value.message
    assert "messages[0].content[0] has type 'image'" in message and "text only" in message


# -- the API key ---------------------------------------------------------------------------------
def test_x_api_key_authenticates(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint, "--api-key", "sekrit") as proc:
        good = anthropic.Anthropic(base_url=proc.base_url, api_key="sekrit", max_retries=0)
        assert good.messages.count_tokens(model="claude-x", messages=HELLO).input_tokens > 0
        message = good.messages.create(model="claude-x", max_tokens=2, messages=HELLO)
        assert message.usage.output_tokens <= 2
        bad = anthropic.Anthropic(base_url=proc.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model="claude-x", max_tokens=2, messages=HELLO)
        bearer = httpx.get(proc.url("/v1/models"), headers={"Authorization": "Bearer sekrit"})
        assert bearer.status_code == 200  # the OpenAI clients' header still works
        assert httpx.get(proc.url("/v1/models")).status_code == 401
