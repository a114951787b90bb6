"""instructor, unchanged, against a real server on the demo model: a response_model through a
forced tool call (TOOLS) and through response_format (JSON_SCHEMA), AsyncOpenAI, and
`create_partial`, which rebuilds the model from streamed tool-call fragments (issue 13: it
loses the opening `{"` when a chunk carries two entries for one index).

instructor holds openai below what the other clients need, so `.ci/run` runs this module in its
own virtual environment (the clients-instructor extra).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.clients.clients_common import client_package, served_model

instructor = client_package("instructor")


class get_weather(BaseModel):  # noqa: N801  the tool's name is the class name, as trained
    """Get the current weather in a city"""

    city: str = Field(description="The city name")


QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 64, "max_retries": 0}


def patched(server, mode):
    raw = openai.OpenAI(base_url=server.url("/v1"), api_key="k", max_retries=0, timeout=120)
    return instructor.from_openai(raw, mode=mode)


@pytest.fixture(scope="module")
def model(demo_server):
    return served_model(demo_server)


class Forecast(BaseModel):
    # The demo model never learned free JSON, so the schema bounds what it can write: an enum,
    # and no extra properties (without additionalProperties false it invents keys till the end).
    model_config = ConfigDict(extra="forbid")

    city: Literal["Paris", "London", "Berlin"]
    sunny: bool


def test_response_model_through_a_tool_call(demo_server, model):
    client = patched(demo_server, instructor.Mode.TOOLS)
    answer = client.chat.completions.create(
        model=model, messages=QUESTION, response_model=get_weather, **GREEDY
    )
    assert isinstance(answer, get_weather)
    assert answer.city == "Paris"  # the forced call is what the demo model learned


def test_response_model_through_response_format(demo_server, model):
    client = patched(demo_server, instructor.Mode.JSON_SCHEMA)
    answer = client.chat.completions.create(
        model=model, messages=QUESTION, response_model=Forecast, **GREEDY
    )
    assert isinstance(answer, Forecast)


def test_async_client(demo_server, model):
    async def run():
        raw = openai.AsyncOpenAI(base_url=demo_server.url("/v1"), api_key="k", max_retries=0)
        client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
        return await client.chat.completions.create(
            model=model, messages=QUESTION, response_model=get_weather, **GREEDY
        )

    assert asyncio.run(run()).city == "Paris"


def test_create_partial_builds_up_to_the_answer(demo_server, model):
    client = patched(demo_server, instructor.Mode.TOOLS)
    partials = list(
        client.chat.completions.create_partial(
            model=model, messages=QUESTION, response_model=get_weather, **GREEDY
        )
    )
    assert partials, "no partial objects streamed"
    assert partials[-1].city == "Paris"
    # Each partial extends the previous one: the city only ever grows.
    cities = [p.city or "" for p in partials]
    assert all(b.startswith(a) for a, b in zip(cities, cities[1:])), cities
