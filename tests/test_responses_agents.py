"""What coding agents (Codex) and agent SDKs send to `/v1/responses`, on the raw wire.

Codex sends `client_metadata`, a `namespace` tool (a named group of function tools) and a hosted
`web_search` tool; the Agents SDK sends `"tools": []`. Each is checked with httpx (or the openai
package) against a real server on the tiny random model: these are wire checks, not answers.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.server_process import ServerProcess

AGENTS = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for managing sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "close_agent",
            "description": "Close an agent.",
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {"target": {"type": "string", "enum": ["a1", "a2"]}},
                "required": ["target"],
                "additionalProperties": False,
            },
        }
    ],
}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}
SHORT = {"max_output_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def tiny(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def create(server: ServerProcess, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(server.url("/v1/responses"), json=body, headers=headers, timeout=120)


def events_of(answer: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]


def assert_400(answer: httpx.Response, param: str, *words: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


# -- client_metadata, tools: [] ---------------------------------------------------------------
def test_client_metadata_is_accepted_as_a_no_op(tiny):
    metadata = {"session_id": "s-1", "x-codex-turn-metadata": '{"turn_id": "t"}'}
    answer = create(tiny, {"input": "Hi", "client_metadata": metadata, **SHORT})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("completed", "incomplete")


def test_client_metadata_must_be_an_object(tiny):
    assert_400(create(tiny, {"input": "Hi", "client_metadata": "x"}), "client_metadata")


def test_an_empty_tools_list_is_no_tools(tiny):
    answer = create(tiny, {"input": "Hi", "tools": [], **SHORT})
    assert answer.status_code == 200, answer.text
    assert answer.json()["tools"] == []
    assert all(item["type"] == "message" for item in answer.json()["output"])


# -- namespace tools ----------------------------------------------------------------------------
def test_a_namespaced_call_comes_back_with_its_namespace_and_round_trips(tiny):
    body = {"input": "Close agent a1.", "tools": [AGENTS], "tool_choice": "required", **SHORT}
    body["max_output_tokens"] = 200  # the call's few tokens; the grammar ends the answer there
    answer = create(tiny, body)
    assert answer.status_code == 200, answer.text
    calls = [item for item in answer.json()["output"] if item["type"] == "function_call"]
    assert calls, answer.json()["output"]
    call = calls[0]
    assert (call["namespace"], call["name"]) == ("multi_agent_v1", "close_agent")
    assert "target" in json.loads(call["arguments"])

    # Fed back as Codex does (the call items as given, then their outputs), the prompt is the
    # one a stored conversation continues with: the calls read as the model wrote them.
    def outputs_of(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"type": "function_call_output", "call_id": c["call_id"], "output": "closed"}
            for c in calls
        ]

    user = {"role": "user", "content": "Close agent a1."}
    fed_back = {"input": [user, *calls, *outputs_of(calls)], "tools": [AGENTS], **SHORT}
    replayed = create(tiny, fed_back)
    assert replayed.status_code == 200, replayed.text
    stored = create(tiny, {**body, "store": True}).json()
    stored_calls = [item for item in stored["output"] if item["type"] == "function_call"]
    outputs = outputs_of(stored_calls)
    continued = {"previous_response_id": stored["id"], "input": outputs, "tools": [AGENTS]}
    fed_back = {"input": [user, *stored_calls, *outputs], "tools": [AGENTS]}
    count = tiny.url("/v1/responses/input_tokens")
    by_history = httpx.post(count, json=continued, timeout=60).json()["input_tokens"]
    by_items = httpx.post(count, json=fed_back, timeout=60).json()["input_tokens"]
    assert by_history == by_items


def test_a_streamed_namespaced_call_carries_its_namespace(tiny):
    body = {"input": "Close a1.", "tools": [AGENTS], "tool_choice": "required", "stream": True}
    answer = create(tiny, {**body, "max_output_tokens": 64, "temperature": 0})
    assert answer.status_code == 200, answer.text
    added = [
        e["item"]
        for e in events_of(answer)
        if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"
    ]
    assert added and added[0]["namespace"] == "multi_agent_v1"
    assert added[0]["name"] == "close_agent"


def test_a_namespace_tool_is_checked_field_by_field(tiny):
    no_name = {**AGENTS, "name": ""}
    assert_400(create(tiny, {"input": "x", "tools": [no_name]}), "tools[0].name")
    bad_fn = {**AGENTS, "tools": [{"type": "function", "name": "a b"}]}
    assert_400(
        create(tiny, {"input": "x", "tools": [WEB_SEARCH, bad_fn]}), "tools[1].tools[0].name"
    )
    unservable = {**AGENTS, "tools": [{**AGENTS["tools"][0], "parameters": {"$ref": "#"}}]}
    answer = create(tiny, {"input": "x", "tools": [WEB_SEARCH, unservable]})
    assert_400(answer, "tools[1].tools[0].parameters", "constrained decoding")
    clash = {**AGENTS["tools"][0], "name": "multi_agent_v1__close_agent"}
    answer = create(tiny, {"input": "x", "tools": [AGENTS, WEB_SEARCH, clash]})
    assert_400(answer, "tools[2].name", "already the name of tools[0].tools[0]")
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    answer = create(tiny, {"input": [{**call, "namespace": 5}]})
    assert_400(answer, "input[0].namespace")


# -- hosted tools ---------------------------------------------------------------------------------
def test_hosted_tools_are_not_offered_and_the_answer_says_so(tiny):
    weather = {**AGENTS["tools"][0], "name": "get_weather"}
    for _ in range(2):
        answer = create(tiny, {"input": "Hi", "tools": [WEB_SEARCH, weather], **SHORT})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tools-not-offered"] == "web_search"
        assert answer.json()["tools"][0] == WEB_SEARCH  # stated back as sent
    streamed = create(tiny, {"input": "Hi", "tools": [{"type": "file_search"}], "stream": True})
    assert streamed.headers["x-tools-not-offered"] == "file_search"
    plain = create(tiny, {"input": "Hi", "tools": [weather], **SHORT})
    assert "x-tools-not-offered" not in plain.headers
    log = tiny.log()
    assert log.count("'web_search') is not offered to the model") == 1, log


@pytest.mark.parametrize("kind", ["code_interpreter", "computer_use_preview", "web_search"])
def test_a_hosted_tool_alone_with_tool_choice_none_is_a_plain_answer(tiny, kind):
    answer = create(
        tiny, {"input": "Hi", "tools": [{"type": kind}], "tool_choice": "none", **SHORT}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tools-not-offered"] == kind


def test_a_tool_choice_that_requires_a_hosted_tool_is_a_400_naming_it(tiny):
    answer = create(tiny, {"input": "x", "tools": [WEB_SEARCH], "tool_choice": "required"})
    assert_400(answer, "tool_choice", "web_search")
    answer = create(tiny, {"input": "x", "tools": [WEB_SEARCH], "tool_choice": WEB_SEARCH})
    assert_400(answer, "tool_choice", "web_search")


# -- the issue-23 names -------------------------------------------------------------------------
def test_an_unservable_text_format_schema_names_text_format_schema(tiny):
    fmt = {"type": "json_schema", "name": "x", "schema": {"$ref": "#"}}
    answer = create(tiny, {"input": "x", "text": {"format": fmt}})
    assert_400(answer, "text.format.schema", "cannot serve")
    assert "response_format" not in answer.json()["error"]["message"]


def test_max_output_tokens_zero_is_a_400(tiny):
    assert_400(create(tiny, {"input": "x", "max_output_tokens": 0}), "max_output_tokens")


# -- /v1/responses/input_tokens -------------------------------------------------------------------
def test_input_tokens_counts_what_a_response_reads(tiny):
    client = openai.OpenAI(base_url=tiny.url("/v1"), api_key="k", max_retries=0, timeout=60)
    body = {"instructions": "Be brief.", "input": "Hello there", "tools": [AGENTS, WEB_SEARCH]}
    counted = client.responses.input_tokens.count(**body)
    assert counted.object == "response.input_tokens"
    made = client.responses.create(**body, max_output_tokens=4, store=False)
    assert counted.input_tokens == made.usage.input_tokens > 0
    bare = client.responses.input_tokens.count(input="Hello there")
    assert bare.input_tokens < counted.input_tokens


def test_input_tokens_refuses_a_bad_body_by_field(tiny):
    answer = httpx.post(tiny.url("/v1/responses/input_tokens"), json={"input": 5}, timeout=30)
    assert_400(answer, "input")


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/responses/no_such_thing"),
        ("PUT", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/input_tokens/x"),
        ("POST", "/v1/responses/resp_1/cancel"),
    ],
)
def test_an_unknown_path_under_responses_is_a_404(tiny, method, path):
    answer = httpx.request(method, tiny.url(path), json={"input": "x"}, timeout=30)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "unknown_url"
