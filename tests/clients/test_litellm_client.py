"""litellm, unchanged, against a real server on the demo model through its `openai/` provider:
completion, streaming, tools, response_format and acompletion.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.clients.clients_common import GREETING, WEATHER_TOOL, client_package, served_model

# litellm fetches its model price map from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = client_package("litellm")


@pytest.fixture(scope="module")
def ask(demo_server):
    settings = {
        "model": f"openai/{served_model(demo_server)}",
        "api_base": demo_server.url("/v1"),
        "api_key": "k",
        "temperature": 0,
        "timeout": 120,
    }

    def ask(content: str, **extra):
        return litellm.completion(
            messages=[{"role": "user", "content": content}], **settings, **extra
        )

    ask.settings = settings
    return ask


def test_completion(ask):
    answer = ask("Hello!")
    assert answer.choices[0].message.content == GREETING
    assert answer.choices[0].finish_reason == "stop"


def test_stream(ask):
    chunks = list(ask("Hello!", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == GREETING


def test_tool_call(ask):
    answer = ask("What's the weather in Paris?", tools=[WEATHER_TOOL], max_tokens=64)
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_call(ask):
    chunks = list(ask("What's the weather in Paris?", tools=[WEATHER_TOOL], stream=True))
    rebuilt = litellm.stream_chunk_builder(chunks)
    (call,) = rebuilt.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_response_format_json_schema(ask):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "enum": ["Paris", "Berlin"]}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    answer = ask(
        "What is the capital of France?",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": schema, "strict": True},
        },
        max_tokens=32,
    )
    assert json.loads(answer.choices[0].message.content)["capital"] in ("Paris", "Berlin")


def test_acompletion(ask):
    async def run():
        messages = [{"role": "user", "content": "Hello!"}]
        answers = await asyncio.gather(
            *(litellm.acompletion(messages=messages, **ask.settings) for _ in range(2))
        )
        return [a.choices[0].message.content for a in answers]

    assert asyncio.run(run()) == [GREETING, GREETING]
