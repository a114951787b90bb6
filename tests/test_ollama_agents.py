"""What agents and libraries send to the Ollama port, on the raw wire and through the `ollama`
package: Codex's `--oss` checks `/api/version` and pulls its model, litellm and `curl -d` post
bodies without `Content-Type: application/json`.

Two servers on the demo model: one as users run it (any model name served), one with
`--strict-model-names` and a browser origin allowed by `--cors-origins`.
"""

from __future__ import annotations

import json
import os
import socket

import httpx
import ollama
import pytest

import mlx_mistral
from tests.server_process import ServerProcess
from training.corpus import GREETING

HELLO = [{"role": "user", "content": "Hello!"}]
ALLOWED_ORIGIN = "http://localhost:5173"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ollama_server(*args: str):
    port = free_port()
    proc = ServerProcess(mlx_mistral.demo_model_path(), "--ollama-port", str(port), *args)
    proc.ollama_url = f"http://127.0.0.1:{port}"
    return proc


@pytest.fixture(scope="module")
def server():
    with ollama_server() as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def strict():
    with ollama_server("--strict-model-names", "--cors-origins", ALLOWED_ORIGIN) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def ndjson(answer: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in answer.text.splitlines() if line.strip()]


# -- /api/version -----------------------------------------------------------------------------
def test_version_is_new_enough_for_codex_oss(server):
    answer = httpx.get(server.ollama_url + "/api/version", timeout=30).json()
    # Codex's --oss refuses an Ollama older than 0.13.4 (the Responses API it talks).
    assert tuple(int(part) for part in answer["version"].split(".")) >= (0, 13, 4)


# -- /api/pull ----------------------------------------------------------------------------------
def test_pull_of_any_name_streams_ollamas_status_lines_ending_in_success(server):
    answer = httpx.post(
        server.ollama_url + "/api/pull", json={"model": "gpt-oss:20b", "stream": True}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(answer)
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    assert all(set(line) == {"status"} for line in lines)


def test_pull_without_stream_and_through_the_client(server):
    answer = httpx.post(
        server.ollama_url + "/api/pull", json={"model": "llama3", "stream": False}, timeout=30
    )
    assert answer.status_code == 200 and answer.json() == {"status": "success"}
    client = ollama.Client(host=server.ollama_url, timeout=60)
    assert client.pull("mistral").status == "success"
    assert [p.status for p in client.pull("mistral", stream=True)][-1] == "success"


def test_pull_needs_a_model_name(server):
    answer = httpx.post(server.ollama_url + "/api/pull", json={"stream": False}, timeout=30)
    assert answer.status_code == 400 and "model" in answer.json()["error"]


def test_pull_with_strict_model_names_is_ollamas_unknown_model_error(strict):
    url = strict.ollama_url + "/api/pull"
    streamed = httpx.post(url, json={"model": "gpt-oss:20b"}, timeout=30)
    assert streamed.status_code == 200  # as Ollama: the failure is a line of the stream
    (line,) = ndjson(streamed)
    assert line["error"].startswith("pull model manifest: file does not exist")
    whole = httpx.post(url, json={"model": "gpt-oss:20b", "stream": False}, timeout=30)
    assert whole.status_code == 404
    assert whole.json()["error"].startswith("pull model manifest: file does not exist")
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        ollama.Client(host=strict.ollama_url, timeout=60).pull("gpt-oss:20b")
    served = httpx.get(strict.ollama_url + "/api/tags", timeout=30).json()["models"][0]["name"]
    assert httpx.post(url, json={"model": served, "stream": False}, timeout=30).json() == {
        "status": "success"
    }


# -- bodies without a JSON Content-Type -------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_is_read_as_json_whatever_its_type(server, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"model": "m", "messages": HELLO, "stream": False})
    answer = httpx.post(
        server.ollama_url + "/api/chat",
        content=body.encode(),
        headers=headers,
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True
    shown = httpx.post(server.ollama_url + "/api/show", content=b'{"model": "m"}', timeout=30)
    assert shown.status_code == 200, shown.text


def test_an_allowed_browser_origin_may_send_any_type(strict):
    body = json.dumps(
        {"model": "m", "prompt": "Hi", "stream": False, "options": {"num_predict": 4}}
    )
    answer = httpx.post(
        strict.ollama_url + "/api/generate",
        content=body.encode(),
        headers={"Content-Type": "text/plain", "Origin": ALLOWED_ORIGIN},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True


@pytest.mark.parametrize("origin", ["http://evil.example", "null"])
def test_a_browser_page_of_another_origin_still_needs_a_json_type(server, origin):
    body = json.dumps({"model": "m", "messages": HELLO, "stream": False}).encode()
    answer = httpx.post(
        server.ollama_url + "/api/chat",
        content=body,
        headers={"Content-Type": "text/plain", "Origin": origin},
        timeout=30,
    )
    assert answer.status_code == 415, answer.text
    assert "Content-Type" in answer.json()["error"]


def test_the_openai_routes_still_need_a_json_type(server):
    body = json.dumps({"model": "m", "messages": HELLO}).encode()
    answer = httpx.post(server.url("/v1/chat/completions"), content=body, timeout=30)
    assert answer.status_code == 415


@pytest.mark.parametrize("provider", ["ollama_chat", "ollama"])
def test_litellms_ollama_providers_get_an_answer(server, provider):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    litellm = pytest.importorskip("litellm")
    answer = litellm.completion(
        model=f"{provider}/mistral",
        api_base=server.ollama_url,
        messages=HELLO,
        temperature=0,
        max_tokens=48,
        timeout=120,
    )
    assert answer.choices[0].message.content == GREETING
