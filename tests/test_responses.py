"""The Responses API (`/v1/responses`) against real server processes, through the real clients:
the openai SDK (`responses.create`, `.stream`, `.parse`, retrieve, delete), the OpenAI Agents
SDK with its default Responses model, and pydantic-ai's default OpenAI model.

The demo model gives meaningful answers (greedy: "Hello!" gets the trained greeting, a weather
question a get_weather call), so plain, streamed and chained answers can be compared. The tiny
random model serves the wire-format checks: event sequences read from raw bytes and validated
against the SDK's own types, structured output, bad inputs.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

import mlx_mistral
from tests.server_process import ServerProcess
from tests.tool_samples import PERSON
from training.corpus import GREETING

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name"}},
        "required": ["city"],
    },
}
ASK_WEATHER = "What is the weather in Paris?"
EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def demo():
    with ServerProcess(mlx_mistral.demo_model_path()) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def tiny(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="k", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(demo):
    return client_of(demo)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def raw_events(server: ServerProcess, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streamed request; each SSE event's data, its `event:` line checked against its
    type and its data validated against the SDK's event types (not merely constructed)."""
    events = []
    with httpx.stream("POST", server.url("/v1/responses"), json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes()).decode()
    assert "[DONE]" not in raw  # a chat completions habit; Responses streams end with the event
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1].removeprefix("data: "))
        assert lines[0].removeprefix("event: ") == data["type"]
        EVENTS.validate_python(data)
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def sequence(events: list[dict[str, Any]]) -> str:
    """The event types as one line, deltas of one kind collapsed (`delta*`)."""
    names = [e["type"].removeprefix("response.") for e in events]
    return re.sub(r"(\S+\.delta)( \1)+", r"\1*", " ".join(names))


# -- openai: responses.create ------------------------------------------------------------------
def test_plain_response(client, model):
    response = client.responses.create(model=model, input="Hello!", temperature=0)
    assert response.output_text == GREETING
    assert response.status == "completed" and response.object == "response"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text"
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    Response.model_validate(response.model_dump(by_alias=True))  # every required field is there
    assert client.responses.retrieve(response.id).output_text == GREETING


def test_streamed_response_matches_plain(client, model):
    stream = client.responses.create(model=model, input="Hello!", temperature=0, stream=True)
    events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == GREETING
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == GREETING
    assert events[-1].response.usage.output_tokens > 0
    # The streamed response is stored too, as it ended.
    assert client.responses.retrieve(events[-1].response.id).output_text == GREETING


def test_stream_helper(client, model):
    with client.responses.stream(model=model, input="Hello!", temperature=0) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == GREETING


def test_instructions_are_the_system_prompt(client, model):
    """The demo model was trained with system prompts; the answer is still the greeting, and
    the prompt holds more tokens than without instructions."""
    bare = client.responses.create(model=model, input="Hello!", temperature=0)
    with_system = client.responses.create(
        model=model, input="Hello!", instructions="You are a helpful assistant.", temperature=0
    )
    assert with_system.output_text == GREETING
    assert with_system.instructions == "You are a helpful assistant."
    assert with_system.usage.input_tokens > bare.usage.input_tokens


def test_function_tool_round_trip(client, model):
    first = client.responses.create(
        model=model, input=ASK_WEATHER, tools=[WEATHER_TOOL], temperature=0
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert re.fullmatch(r"call_[A-Za-z0-9]{9}", calls[0].call_id)
    assert first.status == "completed"
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "22 C"}

    # Stateless: the client sends the whole conversation back, our output items included.
    history = [{"role": "user", "content": ASK_WEATHER}, *first.output, result]
    stateless = client.responses.create(
        model=model, input=history, tools=[WEATHER_TOOL], temperature=0
    )
    assert stateless.output_text and stateless.output[0].type == "message"

    # Chained: the server replays the stored conversation; the same prompt, so the same answer,
    # and the prompt's head is served from the prefix cache.
    chained = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[result],
        tools=[WEATHER_TOOL],
        temperature=0,
    )
    assert chained.output_text == stateless.output_text
    assert chained.usage.input_tokens == stateless.usage.input_tokens
    assert chained.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert chained.previous_response_id == first.id


def test_streamed_function_call(client, model):
    stream = client.responses.create(
        model=model, input=ASK_WEATHER, tools=[WEATHER_TOOL], temperature=0, stream=True
    )
    events = list(stream)
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert json.loads(arguments) == {"city": "Paris"}
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == arguments
    (call,) = events[-1].response.output
    assert call.type == "function_call" and call.arguments == arguments


def test_previous_response_chain_keeps_the_conversation(client, model):
    first = client.responses.create(model=model, input="Hello!", temperature=0)
    second = client.responses.create(
        model=model, input="What is 2 + 3?", previous_response_id=first.id, temperature=0
    )
    assert "5" in second.output_text
    # The second prompt is the first prompt, the greeting, and the new question.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1


def test_store_false_and_delete(client, model):
    kept = client.responses.create(model=model, input="Hello!", max_output_tokens=2)
    unkept = client.responses.create(model=model, input="Hello!", max_output_tokens=2, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError, match="store: false"):
        client.responses.retrieve(unkept.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=model, input="Hi", previous_response_id=unkept.id)
    assert caught.value.body["param"] == "previous_response_id"
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)


def test_input_items_list_what_was_sent(client, model):
    """`responses.input_items.list`: the request's own input (not the chain's), newest first by
    default, as the SDK's item types, paged by `limit` and `after`."""
    said = client.responses.create(model=model, input="Hello!", max_output_tokens=2)
    items = client.responses.input_items.list(said.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [
        ("message", "user", "Hello!")
    ]
    sent = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?", "id": "msg_mine"},
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "5"},
    ]
    chained = client.responses.create(
        model=model, input=sent, previous_response_id=said.id, max_output_tokens=2
    )
    listed = client.responses.input_items.list(chained.id, order="asc").data
    assert [i.type for i in listed] == [
        "message",
        "message",
        "function_call",
        "function_call_output",
    ]
    assert listed[1].id == "msg_mine" and listed[2].call_id == "c1" and listed[3].output == "5"
    assert len({i.id for i in listed}) == 4
    newest = client.responses.input_items.list(chained.id, limit=2)
    assert [i.type for i in newest.data] == ["function_call_output", "function_call"]
    assert newest.has_more and newest.last_id == listed[2].id
    rest = client.responses.input_items.list(chained.id, limit=2, after=newest.last_id)
    assert [i.id for i in rest.data] == ["msg_mine", listed[0].id] and not rest.has_more
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.input_items.list(chained.id, limit=0)
    assert caught.value.body["param"] == "limit"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")


def test_incomplete_at_the_token_limit(client, model):
    response = client.responses.create(model=model, input="Hello!", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    assert response.output[0].status == "incomplete"


def test_parse_with_a_pydantic_model(client, model):
    class City(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=12)
        sunny: bool

    parsed = client.responses.parse(
        model=model, input=ASK_WEATHER, text_format=City, temperature=0, max_output_tokens=60
    )
    assert isinstance(parsed.output_parsed, City)


def test_json_schema_format_is_enforced(tiny, tiny_hf_checkpoint):
    """A random model's answers parse and validate: the grammar, not the model, shapes them."""
    client = client_of(tiny)
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON}
    for question in ("Describe someone.", "Another one.", "A third."):
        response = client.responses.create(
            model=tiny_hf_checkpoint.name,
            input=question,
            text={"format": fmt},
            max_output_tokens=200,
        )
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), PERSON)
        assert response.text.format.type == "json_schema"


def test_logprobs_when_included(tiny, tiny_hf_checkpoint):
    client = client_of(tiny)
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    response = client.responses.create(
        model=tiny_hf_checkpoint.name, input="Hi", max_output_tokens=4, **asked
    )
    logprobs = response.output[0].content[0].logprobs
    assert len(logprobs) == 4 and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    assert all(lp.logprob <= 0 for lp in logprobs)
    events = raw_events(tiny, {"input": "Hi", "max_output_tokens": 4, "stream": True, **asked})
    streamed = [lp for e in events if e["type"].endswith("text.delta") for lp in e["logprobs"]]
    assert len(streamed) == 4
    plain = client.responses.create(model=tiny_hf_checkpoint.name, input="Hi", max_output_tokens=4)
    assert plain.output[0].content[0].logprobs == []


# -- raw bytes -------------------------------------------------------------------------------
def test_event_sequence_for_text_on_raw_bytes(tiny):
    events = raw_events(tiny, {"input": "Hi", "stream": True, "max_output_tokens": 8})
    assert sequence(events) == (
        "created in_progress output_item.added content_part.added output_text.delta* "
        "output_text.done content_part.done output_item.done incomplete"
    )
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert (
        events[-2]["item"]["content"][0]["text"]
        == text
        == events[-1]["response"]["output"][0]["content"][0]["text"]
    )
    assert events[0]["response"]["status"] == "in_progress"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    item_ids = {e["item_id"] for e in events if "item_id" in e}
    assert item_ids == {events[2]["item"]["id"]}


def test_event_sequence_for_a_call_on_raw_bytes(tiny):
    body = {
        "input": ASK_WEATHER,
        "tools": [{**WEATHER_TOOL, "parameters": {**WEATHER_TOOL["parameters"]}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stream": True,
        "max_output_tokens": 200,
    }
    # A random model under a closed schema: the call is short and always ends.
    body["tools"][0]["parameters"]["properties"] = {"city": {"enum": ["Paris", "Rome"]}}
    body["tools"][0]["parameters"]["additionalProperties"] = False
    events = raw_events(tiny, body)
    assert sequence(events) == (
        "created in_progress output_item.added function_call_arguments.delta* "
        "function_call_arguments.done output_item.done completed"
    )
    done = events[-2]["item"]
    assert done["type"] == "function_call" and done["name"] == "get_weather"
    assert json.loads(done["arguments"])["city"] in ("Paris", "Rome")
    assert events[-1]["response"]["output"] == [done]
    Response.model_validate(events[-1]["response"])


# -- bad inputs ------------------------------------------------------------------------------
BAD = [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    # Hosted tools are left out of an "auto" answer (tests/test_responses_agents.py); required,
    # they are a 400.
    ({"input": "x", "tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "frobnicator"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    (
        {"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools[0].function",
    ),
    ({"input": "x", "tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    (
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "p", "schema": 3}}},
        "text.format.schema",
    ),
    ({"input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "x", "temperature": 9}, "temperature"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "frobnicate": 1}, "frobnicate"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0].type",
    ),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    (
        {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
        "input[0].call_id",
    ),
    (
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
        "input[0].arguments",
    ),
    ({"input": [{"role": "tool", "content": "Hi"}]}, "input[0].role"),
    ({"input": [{"role": "system", "content": "Be brief."}]}, "input"),
    ({"input": "x", "previous_response_id": 5}, "previous_response_id"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(tiny, body, param):
    response = httpx.post(tiny.url("/v1/responses"), json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"], error


def test_forgotten_previous_response_is_a_404(tiny):
    body = {"input": "x", "previous_response_id": "resp_0123"}
    response = httpx.post(tiny.url("/responses"), json=body, timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "previous_response_id"
    assert httpx.get(tiny.url("/v1/responses/resp_0123")).status_code == 404


# -- agent frameworks ------------------------------------------------------------------------
def test_openai_agents_sdk_with_a_function_tool(demo, model):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=demo.url("/v1"), api_key="k", max_retries=0)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city

        Args:
            city: The city name
        """
        asked.append(city)
        return "22 C, sunny"

    agent = agents.Agent(
        name="weather",
        instructions="You are a helpful assistant.",
        model=model,
        tools=[get_weather],
        model_settings=agents.ModelSettings(temperature=0),
    )
    # The SDK's default provider, pointed here: a model name becomes its Responses model.
    provider = agents.OpenAIProvider(openai_client=client)
    assert isinstance(provider.get_model(model), agents.OpenAIResponsesModel)
    config = agents.RunConfig(model_provider=provider)
    result = agents.Runner.run_sync(agent, ASK_WEATHER, run_config=config)
    assert asked == ["Paris"]
    assert isinstance(result.final_output, str) and result.final_output


def test_pydantic_ai_default_openai_model(demo, model, monkeypatch):
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIResponsesModel

    monkeypatch.setenv("OPENAI_BASE_URL", demo.url("/v1"))
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    agent = pydantic_ai.Agent(f"openai:{model}", model_settings={"temperature": 0})
    assert isinstance(agent.model, OpenAIResponsesModel)  # "openai:" speaks Responses
    assert agent.run_sync("Hello!").output == GREETING

    asked: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather in a city"""
        asked.append(city)
        return "22 C, sunny"

    result = agent.run_sync(ASK_WEATHER, instructions="You are a helpful assistant.")
    # The agent's first call asks for Paris; whether the tiny demo model then asks for another
    # city turns on near-tied logits (a prefix-cache hit can tip them), not on the server.
    assert asked[:1] == ["Paris"] and isinstance(result.output, str) and result.output
