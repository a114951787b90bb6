"""What Claude Code and other Anthropic agents send, on the raw wire of a real server.

Each test is one thing an agent's request holds that the server once refused or answered in
another API's words: a system message inside `messages`, a per-session attribution line in
`system`, Anthropic's "prompt is too long" wording, Anthropic's model objects, `toolu_` ids, one
usage in `message_start` and `message_delta`, the beta's `output_format`, and turns with no
content or thinking only. The demo model (a 2k window) answers; greedy decoding throughout.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import httpx
import pytest

import mlx_mistral
from tests.server_process import ServerProcess
from tests.test_anthropic import ANTHROPIC_TOOLS, raw_events

ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
WEATHER = [{"role": "user", "content": "What is the weather like in Tokyo?"}]
ATTRIBUTION = "x-anthropic-billing-header: cc_version=2.1.332.{}; cc_entrypoint=sdk-cli;"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(mlx_mistral.demo_model_path()) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def post(server: ServerProcess, body: dict[str, Any], path: str = "/v1/messages") -> httpx.Response:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 24, "temperature": 0, **body}
    return httpx.post(server.url(path), json=body, headers=ANTHROPIC_HEADERS, timeout=120)


def count(server: ServerProcess, body: dict[str, Any]) -> int:
    response = post(server, body, "/v1/messages/count_tokens")
    assert response.status_code == 200, response.text
    return response.json()["input_tokens"]


# -- system messages ---------------------------------------------------------------------------
def test_a_system_message_inside_messages_is_placed_as_the_system_prompt(server):
    inline = [WEATHER[0], {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    response = post(server, {"messages": inline})
    assert response.status_code == 200, response.text
    assert response.json()["content"]
    # The chat format folds it into the system prompt, as Chat Completions does.
    assert count(server, {"messages": inline}) == count(
        server, {"system": "Be brief.", "messages": WEATHER}
    )


def test_claude_codes_attribution_line_is_left_out_of_the_prompt(server):
    system = [
        {"type": "text", "text": ATTRIBUTION.format("a1")},
        {"type": "text", "text": "You are a helpful assistant.", "cache_control": {"type": "x"}},
    ]
    with_line = count(server, {"system": system, "messages": WEATHER})
    assert with_line == count(
        server, {"system": "You are a helpful assistant.", "messages": WEATHER}
    )
    # A second session's line differs: its prompt is read from the prefix cache all the same.
    first = post(server, {"system": system, "messages": WEATHER}).json()["usage"]
    system[0] = {"type": "text", "text": ATTRIBUTION.format("b2")}
    second = post(server, {"system": system, "messages": WEATHER}).json()["usage"]
    total = first["input_tokens"] + first["cache_read_input_tokens"]
    assert second["input_tokens"] + second["cache_read_input_tokens"] == total == with_line
    assert second["cache_read_input_tokens"] >= total - 1


# -- errors and models in Anthropic's words ----------------------------------------------------
def test_an_over_long_prompt_is_anthropics_prompt_is_too_long(server):
    long = [{"role": "user", "content": "the weather in Tokyo " * 1500}]
    response = post(server, {"messages": long})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    match = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", error["message"])
    assert match and int(match.group(1)) > int(match.group(2)) == 2048, error
    # Other dialects keep their own words.
    chat = httpx.post(
        server.url("/v1/chat/completions"), json={"model": "m", "messages": long}, timeout=60
    )
    assert chat.status_code == 400 and "maximum context length" in chat.json()["error"]["message"]


def test_models_answer_in_anthropics_shape_to_an_anthropic_client(server):
    listed = httpx.get(server.url("/v1/models"), headers=ANTHROPIC_HEADERS).json()
    (model,) = listed["data"]
    assert set(model) == {"type", "id", "display_name", "created_at"}
    assert model["type"] == "model" and datetime.fromisoformat(model["created_at"]).tzinfo
    assert listed["has_more"] is False
    assert listed["first_id"] == listed["last_id"] == model["id"]
    one = httpx.get(server.url(f"/v1/models/{model['id']}"), headers=ANTHROPIC_HEADERS).json()
    assert one == model
    # Without the header: OpenAI's shape, unchanged.
    openai = httpx.get(server.url("/v1/models")).json()
    assert openai["object"] == "list" and openai["data"][0]["object"] == "model"


# -- tool use ----------------------------------------------------------------------------------
def test_tool_use_ids_begin_with_toolu_and_come_back(server):
    tools = [ANTHROPIC_TOOLS["get_weather"]]
    body = {"messages": WEATHER, "tools": tools, "tool_choice": {"type": "any"}, "max_tokens": 64}
    message = post(server, body).json()
    (call,) = [block for block in message["content"] if block["type"] == "tool_use"]
    assert re.fullmatch(r"toolu_[A-Za-z0-9]{9}", call["id"])
    streamed = [e for _, e in raw_events(server, {**body, "model": "c"})]
    starts = [e["content_block"] for e in streamed if e["type"] == "content_block_start"]
    assert starts and all(b["id"].startswith("toolu_") for b in starts if b["type"] == "tool_use")
    result = {"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny, 22 C"}
    history = [*WEATHER, {"role": "assistant", "content": [call]}]
    answer = post(server, {"messages": [*history, {"role": "user", "content": [result]}]})
    assert answer.status_code == 200, answer.text


def test_message_start_and_message_delta_report_the_same_usage(server):
    body = {"model": "c", "max_tokens": 8, "temperature": 0, "messages": WEATHER}
    body["system"] = "You are a helpful assistant who answers questions about the weather. " * 8
    raw_events(server, body)  # the prompt is now in the prefix cache (it is long enough)
    events = dict(raw_events(server, body))
    start = events["message_start"]["message"]["usage"]
    delta = events["message_delta"]["usage"]
    for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert start[key] == delta[key], (start, delta)
    assert delta["cache_read_input_tokens"] > 0  # Anthropic's split: input excludes cached
    whole = post(server, body).json()["usage"]
    assert whole["input_tokens"] + whole["cache_read_input_tokens"] == (
        delta["input_tokens"] + delta["cache_read_input_tokens"]
    )


# -- the beta's output_format ------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Tokyo", "Paris"]}},
    "required": ["city"],
    "additionalProperties": False,
}


def test_output_format_is_output_config_format(server):
    fmt = {"type": "json_schema", "schema": SCHEMA}
    response = post(server, {"messages": WEATHER, "output_format": fmt, "max_tokens": 32})
    assert response.status_code == 200, response.text
    text = response.json()["content"][0]["text"]
    assert json.loads(text)["city"] in ("Tokyo", "Paris")
    both = post(
        server, {"messages": WEATHER, "output_format": fmt, "output_config": {"format": fmt}}
    )
    assert both.status_code == 400 and "output_format" in both.json()["error"]["message"]
    bad = post(server, {"messages": WEATHER, "output_format": {"type": "json_schema"}})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("output_format")


# -- turns with no content, or thinking only ---------------------------------------------------
def test_an_empty_user_message_is_named_as_such(server):
    response = post(server, {"messages": [{"role": "user", "content": []}]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "messages[0].content is empty" in message and "at least one message" not in message


def test_an_empty_final_assistant_message_is_no_prefill(server):
    empty = [*WEATHER, {"role": "assistant", "content": []}]
    assert count(server, {"messages": empty}) == count(server, {"messages": WEATHER})
    assert post(server, {"messages": empty}).status_code == 200


def test_an_assistant_turn_of_redacted_thinking_only_is_accepted(server):
    thinking = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}
    messages = [
        *WEATHER,
        {"role": "assistant", "content": [thinking]},
        {"role": "user", "content": "And in Paris?"},
    ]
    response = post(server, {"messages": messages})
    assert response.status_code == 200, response.text
    assert response.json()["content"]


def test_a_call_cut_short_by_max_tokens_is_a_max_tokens_answer(server):
    tools = [ANTHROPIC_TOOLS["get_weather"]]
    body = {"messages": WEATHER, "tools": tools, "tool_choice": {"type": "any"}, "max_tokens": 4}
    response = post(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["stop_reason"] == "max_tokens"
