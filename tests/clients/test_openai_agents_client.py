"""The OpenAI Agents SDK, unchanged, against a real server on the demo model through its
chat-completions model: a run, a streamed run, a function tool round trip, structured output,
and the SDK's default model name (issue 13). Its default Responses model is issue 14's.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.clients.clients_common import GREETING, client_package, served_model

agents = client_package("agents")
agents_models = client_package("agents.models")

# The SDK exports traces to OpenAI by default; nothing here should leave the machine.
agents.set_tracing_disabled(True)
GREEDY = agents.ModelSettings(temperature=0, max_tokens=64)


def chat_model(server, name: str | None = None):
    client = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="k", max_retries=0)
    return agents.OpenAIChatCompletionsModel(
        model=name if name is not None else served_model(server), openai_client=client
    )


@pytest.fixture  # per test: an AsyncOpenAI client is bound to the event loop of its first run
def model(demo_server):
    return chat_model(demo_server)


def test_run(model):
    agent = agents.Agent(name="greeter", model=model, model_settings=GREEDY)
    assert agents.Runner.run_sync(agent, "Hello!").final_output == GREETING


def test_streamed_run(model):
    agent = agents.Agent(name="greeter", model=model, model_settings=GREEDY)

    async def run():
        result = agents.Runner.run_streamed(agent, "Hello!")
        deltas = [
            event.data.delta
            async for event in result.stream_events()
            if event.type == "raw_response_event"
            and event.data.type == "response.output_text.delta"
        ]
        return deltas, result.final_output

    deltas, final = asyncio.run(run())
    assert "".join(deltas) == GREETING
    assert final == GREETING


def test_function_tool_round_trip(model):
    asked = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city

        Args:
            city: The city name
        """
        asked.append(city)
        return '{"temperature": 21, "condition": "sunny"}'

    agent = agents.Agent(name="weather", model=model, tools=[get_weather], model_settings=GREEDY)
    result = agents.Runner.run_sync(agent, "What's the weather in Paris?")
    assert asked == ["Paris"]
    # The tool's result reached the model: it answers with its condition (the small demo
    # model copies a number's digits, and repeats the city, less reliably).
    assert "sunny" in result.final_output


class Capital(BaseModel):
    country: Literal["France", "Germany"]
    capital: Literal["Paris", "Berlin"]


def test_structured_output(model):
    agent = agents.Agent(name="facts", model=model, output_type=Capital, model_settings=GREEDY)
    result = agents.Runner.run_sync(agent, "What is the capital of France?")
    assert isinstance(result.final_output, Capital)


def test_default_model_name(demo_server):
    """The name the SDK picks when the user names none (get_default_model())."""
    model = chat_model(demo_server, agents_models.get_default_model())
    agent = agents.Agent(name="greeter", model=model, model_settings=GREEDY)
    assert agents.Runner.run_sync(agent, "Hello!").final_output == GREETING
