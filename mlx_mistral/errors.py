"""Typed errors shared by the library, the converter and the server.

Each error carries what an OpenAI-style error body needs (status, type, param, code), so the
server renders every one of them in a single exception handler and the library never has to
know about HTTP.
"""

from __future__ import annotations


class MistralError(Exception):
    """Base class: a user-facing error with a clear one-line message."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(MistralError, ValueError):
    """A field or value the caller sent is wrong (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window.

    `prompt_tokens` and `context_length` are set when the prompt alone is too long
    (`prompt_tokens` may be a lower bound: a huge prompt is refused before it is tokenized).
    """

    code = "context_length_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        prompt_tokens: int | None = None,
        context_length: int | None = None,
    ):
        super().__init__(message, param=param)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class AuthenticationError(MistralError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(MistralError):
    status = 403
    type = "permission_error"


class ModelNotFoundError(MistralError):
    """A model (or its weights) that cannot be found or fetched (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class EngineOverloadedError(MistralError):
    """The engine cannot take the request now; the caller should retry later (HTTP 503)."""

    status = 503
    type = "server_error"
    code = "engine_overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class EngineDeadError(MistralError):
    """The engine thread stopped; no request can be served."""

    status = 503
    type = "server_error"
    code = "engine_dead"


class StructuredOutputError(MistralError):
    """The grammar engine that enforces tools or a JSON format failed mid-answer (HTTP 500):
    the answer can no longer follow the format, so the request ends with this error."""

    status = 500
    type = "server_error"
    code = "structured_output_failed"


class ModelLoadError(MistralError):
    """A checkpoint that exists but cannot be read as a Mistral model."""

    status = 500
    type = "server_error"
    code = "model_load_error"


class ConversionError(MistralError):
    """The converter refuses a source or a setting (one clear line)."""

    status = 400
    type = "invalid_request_error"
