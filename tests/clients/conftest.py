"""One real server per model for every client test: the bundled demo model (answers that mean
something: greetings, tool calls, a city in the arguments) and the tiny random model (fast, for
wire-format rules where the text does not matter). Both start once per session, on free ports.
"""

from __future__ import annotations

import pytest

import mlx_mistral
from tests.server_process import ServerProcess


def _serve(model) -> ServerProcess:
    return ServerProcess(model, "--max-batch", "16", timeout=120)


@pytest.fixture(scope="session")
def demo_server():
    with _serve(mlx_mistral.demo_model_path()) as server:
        yield server
        assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="session")
def tiny_server(tiny_hf_checkpoint):
    with _serve(tiny_hf_checkpoint) as server:
        yield server
        assert "Traceback" not in server.log(), server.log()
