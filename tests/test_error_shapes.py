"""Every dialect answers every error in its own shape, from a real server process (issue 14).

The guards (key, Host, body limit), the handlers (415), the router (404, 405) and the HTTP
parser (414) pick the shape from the path: OpenAI's `{"error": {message, type, param, code}}`,
Anthropic's `{"type": "error", "error": {type, message}}` on `/v1/messages...`, Ollama's
`{"error": "..."}` on `/api/...`. A grammar engine failure mid-answer ends the request with an
error in the same shapes: a 500, or the dialect's error event at the end of a stream.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_process import ServerProcess

KEY = "shape-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096

# API -> (its error shape, a generation endpoint, an unknown path under the API's prefix)
APIS = {
    "chat": ("openai", "/v1/chat/completions", "/v1/nothing/here"),
    "responses": ("openai", "/v1/responses", "/v1/responses/x/nothing"),
    "anthropic": ("anthropic", "/v1/messages", "/v1/messages/nothing"),
    "ollama": ("ollama", "/api/chat", "/api/nothing"),
}
ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    414: "invalid_request_error",
    415: "invalid_request_error",
    500: "api_error",
}
OPENAI_CODES = {
    401: "invalid_api_key",
    403: "host_not_allowed",
    404: "unknown_url",
    405: "method_not_allowed",
    413: "request_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    500: "structured_output_failed",
}

# A required self-reference: the grammar compiles, then exceeds the parser's item limit a few
# tokens into the answer (tests/test_structured.py shows it at the batch level).
ENDLESS = {
    "$defs": {
        "a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}
    },
    "$ref": "#/$defs/a",
}
HELLO = [{"role": "user", "content": "Hi"}]
ENGINE_FAILED = "grammar engine failed mid-answer"


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(
        tiny_hf_checkpoint, "--api-key", KEY, "--max-body-bytes", str(LIMIT)
    ) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def error_message(dialect: str, response: httpx.Response, status: int) -> str:
    """The message of an error answer, after checking its status and `dialect`'s shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    if dialect == "openai":
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] == OPENAI_CODES[status], body
        message = body["error"]["message"]
    elif dialect == "anthropic":
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == ANTHROPIC_TYPES[status], body
        message = body["error"]["message"]
    else:
        assert set(body) == {"error"}, body
        message = body["error"]
    assert isinstance(message, str) and message, body
    return message


# -- the guards, the handlers, the router, the parser ---------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_a_missing_or_wrong_key_is_401_in_the_dialects_shape(server, api):
    dialect, path, _ = APIS[api]
    missing = httpx.post(server.url(path), json={})
    assert "missing API key" in error_message(dialect, missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(server.url(path), json={}, headers={"x-api-key": "nope"})
    assert error_message(dialect, wrong, 401) == "invalid API key"


@pytest.mark.parametrize("api", APIS)
def test_a_foreign_host_is_403_in_the_dialects_shape(server, api):
    dialect, path, _ = APIS[api]
    headers = {**AUTH, "Host": "evil.example"}
    response = httpx.post(server.url(path), json={}, headers=headers)
    assert "'evil.example' is not allowed" in error_message(dialect, response, 403)


@pytest.mark.parametrize("how", ["declared", "chunked"])
@pytest.mark.parametrize("api", APIS)
def test_a_body_over_the_limit_is_413_in_the_dialects_shape(server, api, how):
    """Refused by its Content-Length (the guard), or counted as it streams in (the handler)."""
    dialect, path, _ = APIS[api]
    body = b'{"pad": "' + b"x" * LIMIT + b'"}'
    content = body if how == "declared" else iter([body[:100], body[100:]])
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(server.url(path), content=content, headers=headers)
    assert f"limit of {LIMIT} bytes" in error_message(dialect, response, 413)


@pytest.mark.parametrize("api", APIS)
def test_a_body_not_declared_as_json_is_415_in_the_dialects_shape(server, api):
    dialect, path, _ = APIS[api]
    headers = {**AUTH, "Content-Type": "text/plain"}
    if api == "ollama":  # as Ollama, any type is read as JSON unless a browser page sent it
        headers["Origin"] = "http://page.example"
    response = httpx.post(server.url(path), content=b"{}", headers=headers)
    assert "text/plain" in error_message(dialect, response, 415)


@pytest.mark.parametrize("api", APIS)
def test_an_unknown_path_is_404_and_a_wrong_method_405_in_the_dialects_shape(server, api):
    dialect, path, unknown = APIS[api]
    missing = httpx.post(server.url(unknown), json={}, headers=AUTH)
    assert unknown in error_message(dialect, missing, 404)
    wrong = httpx.get(server.url(path), headers=AUTH)
    assert "use POST" in error_message(dialect, wrong, 405)


@pytest.mark.parametrize("api", APIS)
def test_a_target_over_the_parsers_limit_is_414_in_the_dialects_shape(server, api):
    """Refused by the HTTP parser, before any middleware: the target's start names the path."""
    dialect, path, _ = APIS[api]
    url = server.url(path + "?pad=" + "x" * 9000)
    response = httpx.post(url, json={}, headers=AUTH)
    assert "request target is longer" in error_message(dialect, response, 414)


def test_the_ollama_root_answers_errors_in_ollamas_shape(server):
    response = httpx.post(server.url("/"), json={}, headers=AUTH)
    assert "POST is not allowed on /" in error_message("ollama", response, 405)


# -- a grammar engine failure mid-answer ----------------------------------------------------------
# API -> (path, a body whose answer must follow ENDLESS)
FAILING = {
    "chat": (
        "/v1/chat/completions",
        {
            "messages": HELLO,
            "max_tokens": 40,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "endless", "schema": ENDLESS},
            },
        },
    ),
    "responses": (
        "/v1/responses",
        {
            "input": "Hi",
            "max_output_tokens": 40,
            "text": {"format": {"type": "json_schema", "name": "endless", "schema": ENDLESS}},
        },
    ),
    "anthropic": (
        "/v1/messages",
        {
            "model": "claude-x",
            "messages": HELLO,
            "max_tokens": 40,
            "tools": [{"name": "endless", "input_schema": ENDLESS}],
            "tool_choice": {"type": "any"},
        },
    ),
    "ollama": (
        "/api/chat",
        {"model": "m", "messages": HELLO, "format": ENDLESS, "options": {"num_predict": 40}},
    ),
}


def engine_failures(server: ServerProcess) -> int:
    return server.log().count(ENGINE_FAILED)


@pytest.mark.parametrize("api", FAILING)
def test_a_grammar_failure_is_a_500_in_the_dialects_shape_logged_once(server, api):
    path, body = FAILING[api]
    dialect = APIS[api][0]
    before = engine_failures(server)
    response = httpx.post(server.url(path), json={**body, "stream": False}, headers=AUTH)
    assert "structured-output engine failed" in error_message(dialect, response, 500)
    assert engine_failures(server) == before + 1, server.log()


def sse_events(text: str) -> list[tuple[str | None, dict]]:
    """(event name, data) of each SSE event with JSON data."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: {"):
                data = json.loads(line.removeprefix("data: "))
        if data is not None:
            events.append((name, data))
    return events


@pytest.mark.parametrize("api", FAILING)
def test_a_grammar_failure_mid_stream_ends_with_the_dialects_error_event(server, api):
    path, body = FAILING[api]
    before = engine_failures(server)
    response = httpx.post(server.url(path), json={**body, "stream": True}, headers=AUTH)
    assert response.status_code == 200, response.text
    if api == "chat":
        assert response.text.endswith("data: [DONE]\n\n"), response.text
        error = sse_events(response.text)[-1][1]
        assert set(error) == {"error"} and error["error"]["code"] == "structured_output_failed"
        message = error["error"]["message"]
    elif api == "responses":
        (error_name, error), (failed_name, failed) = sse_events(response.text)[-2:]
        assert (error_name, failed_name) == ("error", "response.failed"), response.text
        assert error["code"] == "structured_output_failed"
        assert failed["response"]["status"] == "failed"
        assert "response.completed" not in response.text
        message = error["message"]
    elif api == "anthropic":
        name, error = sse_events(response.text)[-1]
        assert name == "error" and error["type"] == "error", response.text
        assert error["error"]["type"] == "api_error"
        assert "message_stop" not in response.text  # a failed stream does not claim to finish
        message = error["error"]["message"]
    else:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert set(lines[-1]) == {"error"}, lines
        assert all(line.get("done") is False for line in lines[:-1]), lines
        message = lines[-1]["error"]
    assert "structured-output engine failed" in message, message
    assert engine_failures(server) == before + 1, server.log()
