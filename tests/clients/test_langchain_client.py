"""langchain-openai's ChatOpenAI, unchanged, against a real server on the demo model: invoke,
stream, bound tools, structured output, and what LangChain users send (its default model name,
two SystemMessages: issue 13).
"""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

from tests.clients.clients_common import GREETING, client_package, served_model

langchain_openai = client_package("langchain_openai")
messages = client_package("langchain_core.messages")


@pytest.fixture(scope="module")
def chat(demo_server):
    return langchain_openai.ChatOpenAI(
        model=served_model(demo_server),
        base_url=demo_server.url("/v1"),
        api_key="k",
        temperature=0,
        max_retries=0,
        timeout=120,
    )


def get_weather(city: str) -> str:
    """Get the current weather in a city

    Args:
        city: The city name
    """
    return "sunny"


def test_invoke(chat):
    assert chat.invoke("Hello!").content == GREETING


def test_stream(chat):
    assert "".join(chunk.content for chunk in chat.stream("Hello!")) == GREETING


def test_bound_tool_is_called(chat):
    answer = chat.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    (call,) = answer.tool_calls
    assert call["name"] == "get_weather"
    assert call["args"] == {"city": "Paris"}


def test_streamed_tool_call(chat):
    chunks = list(chat.bind_tools([get_weather]).stream("What's the weather in Paris?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    (call,) = merged.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris"})


class Capital(BaseModel):
    country: Literal["France", "Germany"]
    capital: Literal["Paris", "Berlin"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output(chat, method):
    answer = chat.with_structured_output(Capital, method=method).invoke(
        "What is the capital of France?"
    )
    assert isinstance(answer, Capital)


def test_default_model_name(demo_server):
    """ChatOpenAI without a model sends its default name (gpt-3.5-turbo)."""
    chat = langchain_openai.ChatOpenAI(
        base_url=demo_server.url("/v1"), api_key="k", temperature=0, max_retries=0
    )
    assert chat.invoke("Hello!").content == GREETING


def test_two_system_messages(chat):
    answer = chat.invoke(
        [
            messages.SystemMessage("You are a helpful assistant."),
            messages.SystemMessage("Answer briefly."),
            messages.HumanMessage("Hello!"),
        ]
    )
    assert answer.content == GREETING
