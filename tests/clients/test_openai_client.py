"""The official openai package, unchanged, against a real server: create, the stream helpers,
`parse` with a pydantic model, AsyncOpenAI, and the request shapes other clients and IDEs send
through it (issue 13). Greedy decoding on the demo model, whose answers are known.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.clients.clients_common import GREETING, WEATHER_TOOL, served_model


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.url("/v1"), api_key="k", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(demo_server):
    return served_model(demo_server)


def hello(**extra):
    return {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0, **extra}


def weather(**extra):
    return {
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "temperature": 0,
        "max_tokens": 64,
        **extra,
    }


# -- what works today ---------------------------------------------------------------------------


def test_plain_chat(client, model):
    answer = client.chat.completions.create(model=model, **hello())
    assert answer.choices[0].message.content == GREETING
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == model


def test_streamed_chat_joins_to_the_same_answer(client, model):
    chunks = list(client.chat.completions.create(model=model, stream=True, **hello()))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == GREETING
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_call(client, model):
    (call,) = client.chat.completions.create(model=model, **weather()).choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


class Forecast(BaseModel):
    city: Literal["Paris", "London", "Berlin"]
    sunny: bool


def test_parse_returns_the_pydantic_model(client, model):
    answer = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        response_format=Forecast,
        temperature=0,
        max_tokens=64,
    )
    parsed = answer.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert Forecast.model_validate_json(answer.choices[0].message.content) == parsed


def test_parse_with_a_pydantic_tool(client, model):
    class get_weather(BaseModel):  # noqa: N801  the tool's name is the class name
        city: str

    answer = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[openai.pydantic_function_tool(get_weather)],
        temperature=0,
        max_tokens=64,
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.parsed_arguments == get_weather(city="Paris")


def test_stream_helper_text_events(client, model):
    with client.chat.completions.stream(model=model, **hello()) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [e.delta for e in events if e.type == "content.delta"]
    assert "".join(deltas) == GREETING
    assert [e.content for e in events if e.type == "content.done"] == [GREETING]
    assert final.choices[0].message.content == GREETING


def test_stream_helper_tool_call_fires_no_empty_content_event(client, model):
    """A stream answering with a tool call opens with `content: null` (issue 13), so the helper
    reports no content at all; the call's arguments arrive whole at the end."""
    with client.chat.completions.stream(model=model, **weather()) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert [e for e in events if e.type.startswith("content.")] == []
    (done,) = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert done.name == "get_weather"
    assert json.loads(done.arguments) == {"city": "Paris"}
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_async_client_answers_concurrent_requests(demo_server, model):
    async def run():
        async with openai.AsyncOpenAI(
            base_url=demo_server.url("/v1"), api_key="k", max_retries=0, timeout=120
        ) as aclient:
            plain = [aclient.chat.completions.create(model=model, **hello()) for _ in range(3)]
            stream = await aclient.chat.completions.create(model=model, stream=True, **hello())
            answers = await asyncio.gather(*plain)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
            return [a.choices[0].message.content for a in answers], streamed

    answers, streamed = asyncio.run(run())
    assert answers == [GREETING] * 3
    assert streamed == GREETING


# -- issue 13: requests real clients send --------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt-3.5-turbo", "gpt-4o", "mistral:latest", ""])
def test_any_model_name_is_served(client, model, name):
    answer = client.chat.completions.create(model=name, **hello())
    assert answer.choices[0].message.content == GREETING
    assert answer.model == model  # the response names what served it


def test_two_system_messages(client, model):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Hello!"},
    ]
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0)
    assert answer.choices[0].message.content == GREETING


def test_system_message_after_the_first_user_turn(client, model):
    messages = [
        {"role": "system", "content": "You are a friendly tutor."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": GREETING},
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
    ]
    answer = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=32
    )
    assert answer.choices[0].message.content


def test_trailing_assistant_message_is_continued(client, model):
    """Prefill: the answer continues the given start; the demo model knows the rest by heart."""
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! It's nice"},
    ]
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0)
    assert answer.choices[0].message.content == GREETING.removeprefix("Hello! It's nice")


def test_documented_openai_fields_are_accepted(client, model):
    answer = client.chat.completions.create(
        model=model,
        modalities=["text"],
        prediction={"type": "content", "content": GREETING},
        reasoning_effort="low",
        verbosity="low",
        prompt_cache_key="session-1",
        safety_identifier="user-1",
        store=False,
        metadata={"app": "tests"},
        seed=-1,
        **hello(),
    )
    assert answer.choices[0].message.content == GREETING


def test_base_url_without_v1(demo_server, model):
    client = openai.OpenAI(base_url=demo_server.base_url, api_key="k", max_retries=0)
    assert [m.id for m in client.models.list().data] == [model]
    answer = client.chat.completions.create(model=model, **hello())
    assert answer.choices[0].message.content == GREETING
