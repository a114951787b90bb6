"""What the client tests share: the demo model's known answers, its tool, and helpers."""

from __future__ import annotations

import importlib

import httpx
import pytest

from tests.server_process import ServerProcess

# The demo model's own answer to "Hello!" (training/corpus.py GREETING), word for word.
GREETING = "Hello! It's nice to meet you. Is there something I can help you with?"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}


def client_package(name: str):
    """Import a client library, or skip the module naming the environment that has it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(
            f"{name} is not installed in this environment ({error}); `.ci/run` installs it "
            "(instructor in its own venv, from the clients-instructor extra)",
            allow_module_level=True,
        )


def served_model(server: ServerProcess) -> str:
    """The id the server lists for its model (the name a strict client must send)."""
    return httpx.get(server.url("/v1/models"), timeout=10).json()["data"][0]["id"]
