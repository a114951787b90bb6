"""Ollama's API, driven by the real `ollama` package against a real server on the demo model.

One server for the module, with an API key and `--ollama-port` on a second free port: the
package talks to that port (as apps that assume Ollama's port do), with the key in a header.
Wire details (NDJSON lines, error bodies) are checked on raw bytes with httpx.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime

import httpx
import jsonschema
import ollama
import pytest

import mlx_mistral
from tests.server_process import ServerProcess
from training.corpus import GREETING, TOOLS

KEY = "ollama-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"temperature": 0, "num_predict": 48}
COUNTS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
WEATHER_TOOLS = [TOOLS["get_weather"]]
HELLO = [{"role": "user", "content": "Hello!"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with ServerProcess(
        mlx_mistral.demo_model_path(), "--api-key", KEY, "--ollama-port", str(port)
    ) as proc:
        proc.ollama_url = f"http://127.0.0.1:{port}"
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.ollama_url, headers=AUTH, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.ollama_url + path, json=body, headers=AUTH, timeout=120)


# -- discovery ------------------------------------------------------------------------------------
def test_root_answers_that_ollama_is_running_on_both_ports(server):
    for base in (server.base_url, server.ollama_url):
        answer = httpx.get(base + "/", headers=AUTH)
        assert answer.status_code == 200 and answer.text == "Ollama is running"


def test_the_ollama_port_keeps_the_security_rules(server):
    assert httpx.get(server.ollama_url + "/api/tags").status_code == 401
    foreign = httpx.get(server.ollama_url + "/api/tags", headers={**AUTH, "Host": "evil.example"})
    assert foreign.status_code == 403
    assert "serving the Ollama API on http://127.0.0.1:" in server.log()


def test_list_show_and_ps_describe_the_served_model(client, server):
    (listed,) = client.list().models
    assert listed.model == "demo_model:latest"
    assert listed.size > 0 and len(listed.digest) == 64
    assert listed.details.family == "llama" and listed.details.format == "safetensors"
    assert listed.details.parameter_size == "4.9M"
    assert listed.details.quantization_level == "F16"

    shown = client.show("mistral:7b")  # any name is served
    card = httpx.get(server.url("/v1/models"), headers=AUTH).json()["data"][0]
    assert shown.modelinfo["llama.context_length"] == card["context_length"] == 2048
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 4
    assert {"completion", "tools"} <= set(shown.capabilities)
    assert "[INST]" in shown.template and ".Tools" in shown.template
    assert "temperature 0.8" in shown.parameters
    assert shown.modelfile.startswith("# Modelfile") and "FROM " in shown.modelfile
    assert shown.details == listed.details

    (loaded,) = client.ps().models
    assert loaded.model == listed.model and loaded.digest == listed.digest
    assert loaded.size == loaded.size_vram == listed.size
    assert loaded.context_length == 2048
    assert loaded.expires_at > datetime.now(UTC)


def test_version_is_an_ollama_release(server):
    answer = httpx.get(server.ollama_url + "/api/version", headers=AUTH).json()
    assert [int(part) for part in answer["version"].split(".")] >= [0, 5, 0]


# -- chat -----------------------------------------------------------------------------------------
def test_chat_answers_with_the_counts_ollama_reports(client):
    answer = client.chat("mistral:7b", messages=HELLO, options=GREEDY)
    assert answer.message.role == "assistant" and answer.message.content.strip() == GREETING
    assert answer.model == "mistral:7b"  # the name asked for is echoed, as Ollama does
    assert answer.done and answer.done_reason == "stop"
    for name in COUNTS:
        assert isinstance(answer[name], int), name
    assert answer.prompt_eval_count == 10 and answer.eval_count > 10
    assert answer.total_duration >= answer.prompt_eval_duration + answer.eval_duration > 0


def test_chat_streams_the_same_answer(client):
    whole = client.chat("mistral", messages=HELLO, options=GREEDY)
    parts = list(client.chat("mistral", messages=HELLO, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == "stop"


def test_ndjson_lines_on_the_wire(server):
    body = {"model": "m", "messages": HELLO, "options": GREEDY}
    with httpx.stream(
        "POST", server.ollama_url + "/api/chat", json=body, headers=AUTH, timeout=120
    ) as answer:
        assert answer.headers["content-type"] == "application/x-ndjson"
        raw = b"".join(answer.iter_bytes())
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert all(isinstance(line, dict) for line in lines)
    *middle, last = lines
    assert middle and all(line["done"] is False for line in middle)
    assert all(set(line) == {"model", "created_at", "message", "done"} for line in middle)
    assert last["done"] is True and last["done_reason"] == "stop"
    assert last["message"] == {"role": "assistant", "content": ""}
    assert all(isinstance(last[name], int) for name in COUNTS)
    assert last["eval_count"] >= len(middle)  # each line holds one token or more
    datetime.fromisoformat(last["created_at"])


def test_chat_format_schema_is_enforced(client):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
            "sunny": {"type": "boolean"},
        },
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    question = [{"role": "user", "content": "What is the weather like in Tokyo?"}]
    answer = client.chat("m", messages=question, format=schema, options=GREEDY)
    jsonschema.validate(json.loads(answer.message.content), schema)
    plain = client.chat("m", messages=question, format="json", options=GREEDY)
    assert isinstance(json.loads(plain.message.content), dict)


def test_tool_call_and_its_round_trip(client, server):
    question = [{"role": "user", "content": "What is the weather like in Tokyo?"}]
    first = client.chat("m", messages=question, tools=WEATHER_TOOLS, options=GREEDY)
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Tokyo"}
    assert first.done_reason == "stop"

    result = json.dumps({"temperature": 18, "condition": "sunny"})
    conversation = [
        *question,
        first.message,  # as the package hands it back: the call without its id
        {"role": "tool", "content": result, "tool_name": "get_weather"},
    ]
    second = client.chat("m", messages=conversation, tools=WEATHER_TOOLS, options=GREEDY)
    assert not second.message.tool_calls
    assert "18" in second.message.content and "sunny" in second.message.content

    # On the wire: Ollama's shape, arguments an object; streamed whole in one line.
    body = {"model": "m", "messages": question, "tools": WEATHER_TOOLS, "options": GREEDY}
    raw = post(server, "/api/chat", body).text.splitlines()
    calls = [json.loads(line)["message"].get("tool_calls") for line in raw]
    (streamed,) = [c for c in calls if c]
    assert streamed[0]["function"]["name"] == "get_weather"
    assert streamed[0]["function"]["arguments"] == {"city": "Tokyo"}


# -- generate -------------------------------------------------------------------------------------
def test_generate_applies_the_chat_format_unless_raw(client):
    templated = client.generate("m", "Hello!", options=GREEDY)
    assert templated.response.strip() == GREETING and templated.done_reason == "stop"
    raw = client.generate("m", "[INST] Hello! [/INST]", raw=True, options=GREEDY)
    assert raw.response.strip() == GREETING
    assert raw.context is None  # Ollama returns no context for raw prompts

    # `context` continues the conversation: the next prompt holds the first exchange.
    again = client.generate("m", "Hello!", context=templated.context, options=GREEDY)
    assert again.prompt_eval_count == len(templated.context) + 9
    assert again.context[: len(templated.context)] == templated.context


def test_generate_streams_by_default(server):
    lines = post(server, "/api/generate", {"model": "m", "prompt": "Hello!"}).text.splitlines()
    parts = [json.loads(line) for line in lines]
    assert parts[-1]["done"] is True and "context" in parts[-1]
    assert all("response" in part for part in parts)


def test_nothing_to_generate_answers_loaded(client):
    assert client.generate("m").done_reason == "load"
    assert client.chat("m", messages=[]).done_reason == "load"


# -- options ------------------------------------------------------------------------------------
def test_num_predict_stop_and_seed(client):
    short = client.chat("m", messages=HELLO, options={"temperature": 0, "num_predict": 3})
    assert short.done_reason == "length" and short.eval_count == 3

    stopped = client.chat("m", messages=HELLO, options={"temperature": 0, "stop": ["nice"]})
    assert stopped.done_reason == "stop"
    assert stopped.message.content.strip() == GREETING.split("nice")[0].strip()

    seeded = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 1234, "num_predict": 24}
    runs = [client.chat("m", messages=HELLO, options=seeded).message.content for _ in range(2)]
    assert runs[0] == runs[1]


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/api/chat",
            {"model": "m", "messages": HELLO, "options": {"temperature": 9}},
            "options.temperature",
        ),
        (
            "/api/chat",
            {"model": "m", "messages": HELLO, "options": {"mirostat": 2}},
            "options.mirostat",
        ),
        ("/api/chat", {"model": "m", "messages": HELLO, "options": {"nope": 1}}, "options.nope"),
        (
            "/api/chat",
            {"model": "m", "messages": HELLO, "options": {"num_predict": "x"}},
            "options.num_predict",
        ),
        ("/api/chat", {"model": "m", "messages": HELLO, "colour": 1}, "colour"),
        ("/api/chat", {"messages": HELLO}, "model"),
        ("/api/chat", {"model": "m", "messages": "hi"}, "messages"),
        (
            "/api/chat",
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "/api/chat",
            {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
            "messages[0].images",
        ),
        (
            "/api/chat",
            {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0]",
        ),
        ("/api/chat", {"model": "m", "messages": HELLO, "format": "yaml"}, "format"),
        ("/api/chat", {"model": "m", "messages": HELLO, "format": {"type": "nope"}}, "format"),
        (
            "/api/chat",
            {
                "model": "m",
                "messages": HELLO,
                "tools": [{"type": "function", "function": {"name": "a b"}}],
            },
            "tools[0].function.name",
        ),
        ("/api/chat", {"model": "m", "messages": HELLO, "think": True}, "think"),
        ("/api/chat", {"model": "m", "messages": HELLO, "stream": "yes"}, "stream"),
        ("/api/generate", {"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
        ("/api/generate", {"model": "m", "prompt": "x", "images": ["aGk="]}, "images"),
        ("/api/generate", {"model": "m", "prompt": "x", "context": ["a"]}, "context"),
        ("/api/generate", {"model": "m", "prompt": "x", "raw": True, "system": "s"}, "system"),
        ("/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "template"),
    ],
)
def test_bad_input_is_a_400_in_ollamas_shape_naming_the_field(server, path, body, field):
    answer = post(server, path, body)
    assert answer.status_code == 400, answer.text
    assert list(answer.json()) == ["error"]
    assert answer.json()["error"].startswith(field), answer.json()


def test_client_sees_the_message(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("m", messages=HELLO, options={"top_p": 0})
    assert caught.value.status_code == 400
    assert caught.value.error.startswith("options.top_p: top_p must be in (0, 1]")


def test_a_prompt_too_long_is_a_400_in_ollamas_shape(server):
    answer = post(server, "/api/generate", {"model": "m", "prompt": "word " * 3000})
    assert answer.status_code == 400 and "context" in answer.json()["error"]


def test_body_errors_are_in_ollamas_shape(server):
    answer = httpx.post(
        server.ollama_url + "/api/chat",
        content=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]


@pytest.mark.parametrize("name", ["push", "create", "copy", "delete", "embed", "embeddings"])
def test_model_management_and_embeddings_are_refused(server, name):
    method = "DELETE" if name == "delete" else "POST"
    answer = httpx.request(
        method, server.ollama_url + f"/api/{name}", json={"model": "llama3"}, headers=AUTH
    )
    assert answer.status_code == 501
    assert answer.json()["error"].startswith(f"/api/{name}: ")
    assert "demo_model:latest" in answer.json()["error"]


def test_client_push_raises_the_error(client):
    with pytest.raises(ollama.ResponseError, match="cannot be managed here"):
        client.push("llama3")
    with pytest.raises(ollama.ResponseError, match="embeddings are not served"):
        client.embed("m", "text")
