"""Every error the server answers, rendered in one place as OpenAI's error body.

`{"error": {"message", "type", "param", "code"}}` with the status of the error's class. Library
errors (`mlx_mistral.errors`) carry their own status; the few that only HTTP knows about (413,
415, 404/405 for paths) are defined here. Nothing internal (a traceback, an exception's repr)
ever reaches a response body: an unexpected exception becomes a bare 500 and a log line.
"""

from __future__ import annotations

import json
import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from mlx_mistral.errors import EngineOverloadedError, MistralError

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


def error_headers(exc: MistralError) -> dict[str, str]:
    """Headers that go with an error: Retry-After for an overloaded (or draining) engine."""
    if isinstance(exc, EngineOverloadedError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return {}


def error_response(exc: MistralError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response for a typed error."""
    return JSONResponse(
        exc.to_dict(), status_code=exc.status, headers={**error_headers(exc), **(headers or {})}
    )


def error_event(exc: MistralError) -> bytes:
    """The SSE event that reports an error in the middle of a stream."""
    return b"data: " + json.dumps(exc.to_dict()).encode() + b"\n\n"


async def send_error(send: Send, exc: MistralError, headers: dict[str, str] | None = None) -> None:
    """Answer with `exc` straight from ASGI middleware (which runs outside the handlers)."""
    body = json.dumps(exc.to_dict()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [
        (k.lower().encode(), v.encode())
        for k, v in {**error_headers(exc), **(headers or {})}.items()
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path or method), in OpenAI's shape."""
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
    return error_response(error, headers=dict(exc.headers or {}))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: log it with its traceback, answer without internals."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalServerError("the server hit an internal error; see its log"))


# No MistralError reaches these: every route renders its own (`app.guarded`).
EXCEPTION_HANDLERS = {
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
