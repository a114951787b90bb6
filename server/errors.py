"""Every error the server answers, rendered in one place, in the shape of the path's dialect.

The path decides the dialect (`dialect_of`), so the guards, the router's 404/405, the handlers
and an unexpected 500 all answer a client in the shape its SDK parses:

- OpenAI (every path but the two below): `{"error": {"message", "type", "param", "code"}}`;
- Anthropic (`/v1/messages...`): `{"type": "error", "error": {"type", "message"}}` with
  Anthropic's error type names;
- Ollama (`/api/...` and `/`): `{"error": "<message>"}`.

The status is the error class's in every dialect. Library errors (`mlx_mistral.errors`) carry
their own status; the few that only HTTP knows about (413, 415, 404/405 for paths) are defined
here. Nothing internal (a traceback, an exception's repr) ever reaches a response body: an
unexpected exception becomes a bare 500 and a log line.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope, Send

from mlx_mistral.errors import ContextLengthExceededError, EngineOverloadedError, MistralError

log = logging.getLogger("mlx_mistral.server")


class PayloadTooLargeError(MistralError):
    """The request body is over the server's limit (HTTP 413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaTypeError(MistralError):
    """The request body is not declared as JSON (HTTP 415)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class PathNotFoundError(MistralError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowedError(MistralError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class InternalServerError(MistralError):
    status = 500
    type = "server_error"
    code = "internal_error"


Dialect = Literal["openai", "anthropic", "ollama"]


def dialect_of(path: str) -> Dialect:
    """The API a request path belongs to, which decides the shape of its errors."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path in ("/", "/api") or path.startswith("/api/"):
        return "ollama"
    return "openai"


# Anthropic's error types by HTTP status (its API answers overload as 529; ours stays 503).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def _message_naming_the_field(exc: MistralError) -> str:
    """The message, led by the field at fault: shapes without a `param` carry it here."""
    if exc.param and exc.param not in exc.message:
        return f"{exc.param}: {exc.message}"
    return exc.message


def anthropic_error_body(exc: MistralError) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`; the message names the field.

    A prompt over the context window is said in Anthropic's words ("prompt is too long: N
    tokens > M maximum"): agents such as Claude Code match them to compact their history.
    """
    default = "api_error" if exc.status >= 500 else "invalid_request_error"
    kind = ANTHROPIC_ERROR_TYPES.get(exc.status, default)
    message = _message_naming_the_field(exc)
    if isinstance(exc, ContextLengthExceededError) and exc.prompt_tokens is not None:
        message = f"prompt is too long: {exc.prompt_tokens} tokens > {exc.context_length} maximum"
    return {"type": "error", "error": {"type": kind, "message": message}}


def ollama_error_body(exc: MistralError) -> dict[str, str]:
    """Ollama's error shape: the message (naming the field) is all there is."""
    return {"error": _message_naming_the_field(exc)}


def error_body(exc: MistralError, dialect: Dialect = "openai") -> dict[str, Any]:
    """The body that reports `exc` in `dialect`'s shape."""
    if dialect == "anthropic":
        return anthropic_error_body(exc)
    if dialect == "ollama":
        return ollama_error_body(exc)
    return exc.to_dict()


def error_headers(exc: MistralError) -> dict[str, str]:
    """Headers that go with an error: Retry-After for an overloaded (or draining) engine."""
    if isinstance(exc, EngineOverloadedError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return {}


def error_response(
    exc: MistralError, headers: dict[str, str] | None = None, *, dialect: Dialect = "openai"
) -> JSONResponse:
    """The JSON response for a typed error, in `dialect`'s shape."""
    return JSONResponse(
        error_body(exc, dialect),
        status_code=exc.status,
        headers={**error_headers(exc), **(headers or {})},
    )


def error_event(exc: MistralError) -> bytes:
    """The SSE event that reports an error in the middle of an OpenAI stream."""
    return b"data: " + json.dumps(exc.to_dict()).encode() + b"\n\n"


async def send_error(
    scope: Scope, send: Send, exc: MistralError, headers: dict[str, str] | None = None
) -> None:
    """Answer with `exc` straight from ASGI middleware (which runs outside the handlers), in
    the shape of the dialect of the request's path."""
    body = json.dumps(error_body(exc, dialect_of(scope.get("path", "")))).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [
        (k.lower().encode(), v.encode())
        for k, v in {**error_headers(exc), **(headers or {})}.items()
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path or method), in the path's dialect's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: MistralError = PathNotFoundError(
            f"no such endpoint: {request.method} {request.url.path}"
        )
    elif exc.status_code == 405:
        error = MethodNotAllowedError(
            f"{request.method} is not allowed on {request.url.path}"
            + (f"; use {exc.headers['Allow']}" if exc.headers and "Allow" in exc.headers else "")
        )
    else:
        error = MistralError(str(exc.detail))
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    dialect = dialect_of(request.scope["path"])
    return error_response(error, headers=dict(exc.headers or {}), dialect=dialect)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: log it with its traceback, answer without internals."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    error = InternalServerError("the server hit an internal error; see its log")
    return error_response(error, dialect=dialect_of(request.scope["path"]))


# No MistralError reaches these: every route renders its own (`app.guarded`).
EXCEPTION_HANDLERS = {
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
