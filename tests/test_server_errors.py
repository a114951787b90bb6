"""Every error status of the server, in OpenAI's shape, from a real server process.

The module's server has an API key, a small body limit, one extra allowed host, one CORS origin,
and `--max-queue 1`, its one place taken for the whole module by a stream whose client reads
nothing (`queue_holder`: the engine has finished that answer, and an answer still unread counts
as waiting), so every request that passes validation ends in the engine's 503; validation
errors (400, including the context window) come first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.server_process import ServerProcess

KEY = "s3cret-key"
LIMIT = 65536
ORIGIN = "http://allowed.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(
        tiny_hf_checkpoint,
        "--api-key",
        KEY,
        "--max-queue",
        "1",
        "--send-timeout",
        "3600",
        "--max-body-bytes",
        str(LIMIT),
        "--cors-origins",
        ORIGIN,
        "--allowed-hosts",
        "api.internal",
        "--strict-model-names",  # the 404s below are about unknown names
    ) as proc:
        with queue_holder(proc):
            yield proc
        assert proc.alive
        assert "Traceback" not in proc.log(), proc.log()
        assert httpx.get(proc.url("/health")).status_code == 200


@contextlib.contextmanager
def queue_holder(server: ServerProcess):
    """Take the server's one queue place: a stream of over a MB (4 choices with logprobs)
    whose client never reads, so the answer stays unread in the server once the engine has
    made it. Yields once the engine is idle and a request is refused for the full queue."""
    body = {
        **GOOD,
        "stream": True,
        "n": 4,
        "max_tokens": 300,
        "temperature": 1.0,
        "logprobs": True,
        "top_logprobs": 20,
    }
    raw = json.dumps(body).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (KEY.encode(), len(raw))
    ) + raw
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        holder.connect(("127.0.0.1", server.port))
        holder.sendall(request)
        holder.settimeout(60)
        status = holder.recv(12)  # sent with the first token: the generation is under way
        assert status == b"HTTP/1.1 200", status
        deadline = time.monotonic() + 60
        while True:
            if httpx.get(server.url("/health"), headers=AUTH).json()["active"] == 0:
                probe = httpx.post(server.url(CHAT), json=GOOD, headers=AUTH, timeout=30)
                assert probe.status_code == 503, probe.text
                break
            assert time.monotonic() < deadline, "the holder's answer took over 60 s"
            time.sleep(0.1)
        yield


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    """The error object, after checking the status and the OpenAI shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# -- 401 / 403: the guards ------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
    ],
)
def test_missing_or_wrong_key_is_401(server, headers):
    response = httpx.post(server.url(CHAT), json=GOOD, headers=headers)
    error = error_of(response, 401)
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_key(server):
    assert httpx.get(server.url("/health")).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil:80", "192.168.1.10:8000", ""]
)
def test_foreign_host_is_403_before_anything(http, host):
    error = error_of(http.post(CHAT, content=b"not even json", headers={"Host": host}), 403)
    assert error["type"] == "permission_error" and error["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:8000",
        "127.0.0.1:1",
        "[::1]:8000",
        "[::1]",
        "api.internal",
        "api.internal:443",
    ],
)
def test_allowed_hosts(http, host):
    assert http.get("/v1/models", headers={"Host": host}).status_code == 200


def test_cors_only_for_the_configured_origin(http):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    ok = http.options(CHAT, headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    foreign = http.options(CHAT, headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in foreign.headers
    simple = http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


# -- 404 / 405 ----------------------------------------------------------------------------
def test_unknown_path_and_model_are_404(http):
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "unknown_url"
    assert error_of(http.get("/../../etc/passwd"), 404)["code"] == "unknown_url"
    error = error_of(http.post(CHAT, json={**GOOD, "model": "gpt-4"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4" in error["message"]
    traversal = http.get("/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd")
    assert error_of(traversal, 404)["code"] == "model_not_found"


def test_wrong_method_is_405(http):
    response = http.get(CHAT)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]
    error_of(http.delete("/v1/models"), 405)


# -- 413 / 415 ----------------------------------------------------------------------------
def test_body_over_the_limit_is_413(http):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * LIMIT + b'"}]}'
    error = error_of(
        http.post(CHAT, content=big, headers={"Content-Type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():  # no Content-Length: the server has to count
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 4096 + 2):
            yield b"a" * 4096
        yield b'"}]}'

    response = http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    error_of(response, 413)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_body_not_declared_json_is_415(http, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.post(CHAT, content=b'{"messages": []}', headers=headers)
    if content_type is None:
        assert "content-type" not in response.request.headers
    assert error_of(response, 415)["code"] == "unsupported_media_type"


# -- 400: bodies and fields ---------------------------------------------------------------
def post_raw(http, body: bytes, path: str = CHAT) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "empty"),
        (b"{", "not valid JSON"),
        (b"[1, 2]", "JSON object, got a JSON array"),
        (b'"text"', "got a JSON string"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"a": NaN}', "NaN"),
        (b'{"max_tokens": Infinity}', "Infinity"),
        (b"[" * 30_000 + b"]" * 30_000, "nested"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["empty", "truncated", "array", "string", "utf8", "nan", "infinity", "nested", "bigint"],
)
def test_malformed_bodies_are_400(http, body, words):
    error = error_of(post_raw(http, body), 400)
    assert words in error["message"] and error["type"] == "invalid_request_error"


NUMERIC = [
    "temperature",
    "top_p",
    "min_p",
    "top_k",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "n",
    "top_logprobs",
]


@pytest.mark.parametrize("field", NUMERIC)
@pytest.mark.parametrize("value", [-1, 2**63, "x", True, [1], {"a": 1}])
def test_bad_numbers_are_400_naming_the_field(http, field, value):
    if value == -1 and field in ("top_k", "presence_penalty", "frequency_penalty"):
        value = -3  # -1 is inside these ranges
    body = (
        {**GOOD, field: value, "logprobs": True}
        if field == "top_logprobs"
        else {**GOOD, field: value}
    )
    error = error_of(http.post(CHAT, json=body), 400)
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"max_tokens": 10**9}, "max_tokens", "max_tokens"),
        ({"max_tokens": 2045}, "max_tokens", "too many"),
        ({"logit_bias": {"32000": 5}}, "logit_bias", "31999"),
        ({"logit_bias": {"-1": 5}}, "logit_bias", "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop"),
        ({"stream": "yes"}, "stream", "boolean"),
        ({"frobnicate": 1}, "frobnicate", "frobnicate"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools[0].function.parameters",
            "object",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "not both"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "wizard"),
        ({"messages": "hello"}, "messages", "messages"),
        ({"model": 7}, "model", "model"),
    ],
)
def test_bad_fields_are_400(http, body, param, words):
    error = error_of(http.post(CHAT, json={**GOOD, **body}), 400)
    assert error["param"] == param and words in error["message"], error


def test_missing_messages_is_400(http):
    assert error_of(http.post(CHAT, json={"max_tokens": 3}), 400)["param"] == "messages"


def test_prompt_over_the_context_says_by_how_much(http):
    words = " ".join(["hello"] * 2100)
    error = error_of(http.post(CHAT, json={"messages": [{"role": "user", "content": words}]}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "2048" in error["message"] and "too many" in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "logprobs": 9}, "logprobs"),
        ({"prompt": [1, 99999]}, "prompt"),
    ],
)
def test_completions_bad_fields_are_400(http, body, param):
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == param


def test_fields_that_change_nothing_are_accepted(http):
    body = {
        **GOOD,
        "user": "u1",
        "metadata": {"a": "b"},
        "service_tier": "auto",
        "top_p": None,
        "stream_options": None,
    }
    response = http.post(CHAT, json=body)
    assert error_of(response, 503)["code"] == "engine_overloaded"  # got as far as the queue


# -- 503 -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, body",
    [(CHAT, GOOD), (CHAT, {**GOOD, "stream": True}), ("/v1/completions", {"prompt": "Hi"})],
)
def test_full_queue_is_503_with_retry_after(http, path, body):
    response = http.post(path, json=body)
    error = error_of(response, 503)
    assert error["type"] == "server_error" and error["code"] == "engine_overloaded"
    assert int(response.headers["retry-after"]) >= 1


# -- the openai client sees each status as its exception class ----------------------------
def test_openai_exception_classes(server):
    def client(**kwargs):
        return openai.OpenAI(
            base_url=server.url("/v1"), max_retries=0, **{"api_key": KEY, **kwargs}
        )

    messages = GOOD["messages"]
    cases = [
        (client(), {"temperature": 3}, openai.BadRequestError),
        (client(api_key="nope"), {}, openai.AuthenticationError),
        (client(default_headers={"Host": "evil.example"}), {}, openai.PermissionDeniedError),
        (client(), {"model": "gpt-4"}, openai.NotFoundError),
        (client(), {}, openai.InternalServerError),  # 503: the queue is full
    ]
    for api, kwargs, expected in cases:
        with pytest.raises(expected) as info:
            api.chat.completions.create(
                **{"model": "mistralai/Mistral-7B-Instruct-v0.2", "messages": messages, **kwargs}
            )
        assert info.value.body["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client().chat.completions.create(
            model="x", messages=[{"role": "user", "content": "a" * LIMIT}]
        )
    assert info.value.status_code == 413


# -- start-up refusals: one line on stderr, exit 1, before the model loads ---------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["--host", "0.0.0.0"], "--allow-public"),
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "0"], "--max-queue must be at least 1"),
        (["--model", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
    ],
)
def test_refused_at_start_up(tiny_hf_checkpoint, args, words):
    argv = [
        sys.executable,
        "-m",
        "mlx_mistral.server",
        "--model",
        str(tiny_hf_checkpoint),
        "--port",
        "0",
        *args,
    ]
    result = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-mistral serve: error:"), result.stderr
    assert words in lines[0]


@pytest.mark.parametrize(
    "path, body, param",
    [
        (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (CHAT, b'{"messages": [{"role": "user", "content": "a"}], "stop": ["\\udfff"]}', "stop[0]"),
        ("/v1/completions", b'{"prompt": "\\udc00"}', "prompt"),
    ],
)
def test_lone_surrogate_escapes_are_400_naming_the_field(http, path, body, param):
    error = error_of(post_raw(http, body, path), 400)
    assert error["param"] == param and "surrogate" in error["message"]
