"""Tool schemas the grammar cannot enforce in full, on the three dialects that take tools.

Agents (Claude Code first) send schemas with `propertyNames`, `maxLength: 524288`, look-around
patterns, `format`, `$schema` 2020-12: a tool that is not `strict` is served with those relaxed
(`mlx_mistral.tools.relaxing`) and its calls checked against the full schema afterwards; a
`strict` tool keeps the 400 naming the keyword. Raw bodies on a real server with the demo model,
which calls get_weather with a city for "What is the weather like in Tokyo?".
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

import mlx_mistral
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.tools.relaxing import relax_schema
from mlx_mistral.tools.validation import parse_tools
from tests.server_process import ServerProcess

QUESTION = "What is the weather like in Tokyo?"
# get_weather as an agent would write it: every keyword here is one Claude Code's tools use.
AGENT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "city": {
            "type": "string",
            "description": "The city name",
            "maxLength": 524288,
            "pattern": "^(?!\\s)",
        },
        "source": {"type": "string", "format": "uri"},
        "days": {"type": "integer", "exclusiveMinimum": 0},
        "units": {"anyOf": [{"const": "celsius"}, {"const": "fahrenheit"}]},
    },
    "required": ["city"],
    "additionalProperties": False,
    "propertyNames": {"enum": ["city", "source", "days", "units"]},
}
AGENT_RELAXATIONS = (
    "properties.city.maxLength 524288: no bound",
    "properties.city.pattern '^(?!\\\\s)': not enforced",
    "propertyNames: not enforced",
)
# A pattern the grammar cannot enforce (look-ahead) and the model does not meet ("Tokyo").
UNMET_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^(?=zz)zz[0-9]{3}$"}},
    "required": ["city"],
}
DESCRIPTION = "Get the current weather in a city"
RELAXED_LOG = "tool 'get_weather' is not strict"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(mlx_mistral.demo_model_path()) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


# -- each dialect's request and where its call is --------------------------------------------
def chat_body(schema: dict[str, Any], strict: bool | None) -> dict[str, Any]:
    fn = {"name": "get_weather", "description": DESCRIPTION, "parameters": schema}
    if strict is not None:
        fn["strict"] = strict
    return {
        "model": "any",
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [{"type": "function", "function": fn}],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 48,
    }


def chat_call(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = body["choices"][0]["message"]["tool_calls"][0]["function"]
    return fn["name"], json.loads(fn["arguments"])


def responses_body(schema: dict[str, Any], strict: bool | None) -> dict[str, Any]:
    tool = {"type": "function", "name": "get_weather", "description": DESCRIPTION}
    tool["parameters"] = schema
    if strict is not None:
        tool["strict"] = strict
    return {
        "model": "any",
        "input": QUESTION,
        "tools": [tool],
        "tool_choice": "required",
        "temperature": 0,
        "max_output_tokens": 48,
    }


def responses_call(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (call,) = [item for item in body["output"] if item["type"] == "function_call"]
    return call["name"], json.loads(call["arguments"])


def anthropic_body(schema: dict[str, Any], strict: bool | None) -> dict[str, Any]:
    tool = {"name": "get_weather", "description": DESCRIPTION, "input_schema": schema}
    if strict is not None:
        tool["strict"] = strict
    return {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [tool],
        "tool_choice": {"type": "any"},
        "temperature": 0,
        "max_tokens": 48,
    }


def anthropic_call(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (block,) = [block for block in body["content"] if block["type"] == "tool_use"]
    return block["name"], block["input"]


DIALECTS = {
    "chat": ("/v1/chat/completions", chat_body, chat_call),
    "responses": ("/v1/responses", responses_body, responses_call),
    "anthropic": ("/v1/messages", anthropic_body, anthropic_call),
}


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url(path), json=body, timeout=120)


# -- the schema side ---------------------------------------------------------------------------
def test_relax_schema_names_what_the_grammar_leaves_out():
    relaxed = relax_schema(AGENT_SCHEMA)
    assert relaxed.relaxations == AGENT_RELAXATIONS
    city = relaxed.schema["properties"]["city"]
    assert (
        "maxLength" not in city and "pattern" not in city and "propertyNames" not in relaxed.schema
    )
    # What the grammar can enforce stays: format, exclusiveMinimum, anyOf/const, $schema.
    assert relaxed.schema["properties"]["source"]["format"] == "uri"
    assert relaxed.schema["properties"]["days"]["exclusiveMinimum"] == 0
    assert relaxed.schema["properties"]["units"] == AGENT_SCHEMA["properties"]["units"]
    assert AGENT_SCHEMA["properties"]["city"]["maxLength"] == 524288  # the argument is unchanged


def test_unknown_keywords_and_formats_are_dropped_at_any_depth():
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "uniqueItems": True, "items": {"not": {"type": "null"}}},
            "when": {"type": "string", "format": "not-a-format"},
        },
    }
    relaxed = relax_schema(schema)
    assert set(relaxed.relaxations) == {
        "properties.tags.uniqueItems: not enforced",
        "properties.tags.items.not: not enforced",
        "properties.when.format 'not-a-format': not enforced",
    }
    assert relaxed.schema["properties"]["tags"] == {"type": "array", "items": {}}


def test_a_tool_keeps_its_full_schema_for_the_prompt_and_the_check():
    (spec,) = parse_tools([chat_body(AGENT_SCHEMA, None)["tools"][0]])
    assert spec.parameters == AGENT_SCHEMA and not spec.strict
    assert spec.relaxations == AGENT_RELAXATIONS
    assert spec.enforced_parameters == relax_schema(AGENT_SCHEMA).schema


@pytest.mark.parametrize("keyword", ["maxLength", "propertyNames", "pattern"])
def test_a_strict_tool_is_refused_naming_the_keyword(keyword):
    schema = {
        "maxLength": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5000}}},
        "propertyNames": {"type": "object", "propertyNames": {"enum": ["a"]}},
        "pattern": {"type": "object", "properties": {"s": {"type": "string", "pattern": "(a)\\1"}}},
    }[keyword]
    with pytest.raises(InvalidRequestError) as info:
        parse_tools(
            [{"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}]
        )
    assert "tools[0].function.parameters" in info.value.message
    assert keyword in info.value.message or "backreferences" in info.value.message


# -- on the wire -------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_tool_that_is_not_strict_is_served_relaxed(server, dialect):
    path, body_of, call_of = DIALECTS[dialect]
    response = post(server, path, body_of(AGENT_SCHEMA, None))
    assert response.status_code == 200, response.text
    name, arguments = call_of(response.json())
    # The demo model names a city (which one depends on the schema it is shown).
    assert name == "get_weather" and isinstance(arguments["city"], str) and arguments["city"]
    # Logged once for the process, however many requests and dialects send the tool.
    assert server.log().count(RELAXED_LOG) == 1
    assert "properties.city.maxLength 524288: no bound" in server.log()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_strict_tool_keeps_the_400_naming_the_keyword(server, dialect):
    path, body_of, _ = DIALECTS[dialect]
    response = post(server, path, body_of(AGENT_SCHEMA, True))
    assert response.status_code == 400, response.text
    message = json.dumps(response.json())
    field = {
        "anthropic": "tools[0].input_schema",
        "responses": "tools[0].parameters",
        "chat": "tools[0].function.parameters",
    }[dialect]
    assert field in message and "properties.city.maxLength" in message


@pytest.mark.parametrize("dialect", DIALECTS)
def test_strict_false_is_relaxed_too(server, dialect):
    path, body_of, call_of = DIALECTS[dialect]
    response = post(server, path, body_of(AGENT_SCHEMA, False))
    assert response.status_code == 200, response.text
    assert call_of(response.json())[0] == "get_weather"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_call_that_breaks_a_relaxed_keyword_is_returned_and_logged(server, dialect):
    path, body_of, call_of = DIALECTS[dialect]
    before = server.log().count("breaks its schema where the grammar relaxed it")
    response = post(server, path, body_of(UNMET_SCHEMA, None))
    assert response.status_code == 200, response.text
    name, arguments = call_of(response.json())
    assert name == "get_weather" and not arguments["city"].startswith("zz")
    log = server.log()
    assert log.count("breaks its schema where the grammar relaxed it") == before + 1
    assert f"at city: {arguments['city']!r} does not match '^(?=zz)zz[0-9]{{3}}$'" in log


def test_a_strict_tool_is_refused_on_a_stream_before_it_starts(server):
    body = {**anthropic_body({"type": "object", "propertyNames": {"enum": ["a"]}}, True)}
    response = post(server, "/v1/messages", {**body, "stream": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "propertyNames" in error["message"]
    assert "tools[0].input_schema" in error["message"]
