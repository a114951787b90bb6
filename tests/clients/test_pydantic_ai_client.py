"""pydantic-ai, unchanged, against a real server on the demo model through its chat-completions
model (OpenAIChatModel): text, streaming, a tool round trip, structured output, and the
system_prompt + instructions pair that sends two system messages (issue 13). The Responses API
(pydantic-ai's default OpenAI model) is issue 14's.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest
from pydantic import BaseModel

from tests.clients.clients_common import GREETING, client_package, served_model

pydantic_ai = client_package("pydantic_ai")
openai_models = client_package("pydantic_ai.models.openai")
openai_provider = client_package("pydantic_ai.providers.openai")


@pytest.fixture  # per test: its AsyncOpenAI client is bound to the event loop of its first run
def model(demo_server):
    provider = openai_provider.OpenAIProvider(base_url=demo_server.url("/v1"), api_key="k")
    return openai_models.OpenAIChatModel(served_model(demo_server), provider=provider)


GREEDY = {"temperature": 0, "max_tokens": 64}


def test_text(model):
    agent = pydantic_ai.Agent(model, model_settings=GREEDY)
    assert agent.run_sync("Hello!").output == GREETING


def test_stream(model):
    agent = pydantic_ai.Agent(model, model_settings=GREEDY)

    async def run():
        async with agent.run_stream("Hello!") as result:
            return [text async for text in result.stream_text(delta=True)]

    assert "".join(asyncio.run(run())) == GREETING


def test_tool_round_trip(model):
    agent = pydantic_ai.Agent(model, model_settings=GREEDY)
    asked = []

    @agent.tool_plain
    def get_weather(city: str) -> dict:
        """Get the current weather in a city

        Args:
            city: The city name
        """
        asked.append(city)
        return {"temperature": 21, "condition": "sunny"}

    result = agent.run_sync("What's the weather in Paris?")
    assert asked == ["Paris"]
    # The tool's result reached the model: it answers with its condition (the small demo
    # model copies a number's digits, and repeats the city, less reliably).
    assert "sunny" in result.output


class Capital(BaseModel):
    country: Literal["France", "Germany"]
    capital: Literal["Paris", "Berlin"]


@pytest.mark.parametrize("mode", ["tool", "native"])
def test_structured_output(model, mode):
    output_type = Capital if mode == "tool" else pydantic_ai.NativeOutput(Capital)
    agent = pydantic_ai.Agent(model, output_type=output_type, model_settings=GREEDY)
    assert isinstance(agent.run_sync("What is the capital of France?").output, Capital)


def test_system_prompt_and_instructions(model):
    agent = pydantic_ai.Agent(
        model,
        system_prompt="You are a helpful assistant.",
        instructions="Answer briefly.",
        model_settings=GREEDY,
    )
    assert agent.run_sync("Hello!").output == GREETING
