"""The OpenAPI 3.1 document of the server, served at GET /openapi.json.

It describes every endpoint and the request bodies as the validators in `schemas` and
`mlx_mistral.sampling.params` accept them: the sampling fields, their ranges, defaults and other
names come from `SamplingParams`' table of fields, so OpenAPI tools (client generators,
schemathesis) see the same contract the server enforces. Responses are described
by their shape; every error is OpenAI's `{"error": {message, type, param, code}}`.

The document is static: nothing in it comes from a request, and it is built once.
"""

from __future__ import annotations

import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_mistral.sampling.params import LOGIT_BIAS, MAX_N, MAX_STOP, SamplingField

from .request_fields import CHAT_ONLY, NO_OP_FIELDS
from .schemas import CHAT_SAMPLING, COMPLETION_SAMPLING, MAX_COMPLETION_LOGPROBS

OPENAPI_VERSION = "3.1.0"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_INTEGER_OR_NULL = ["integer", "null"]

# The sampling fields whose values are not a number in a range or a boolean: their shapes, with
# the limits their validators use.
_SHAPED: dict[str, dict[str, Any]] = {
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}},
            {"type": "null"},
        ]
    },
    "logit_bias": {
        "type": ["object", "null"],
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {
            "type": "number",
            "minimum": LOGIT_BIAS.lo,
            "maximum": LOGIT_BIAS.hi,
        },
    },
}


def _plain(x: Any) -> Any:
    """1.0 -> 1: numbers as a person writes them (JSON does not tell 1 from 1.0)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _field_schema(field: SamplingField) -> dict[str, Any]:
    """One sampling field's schema (null counts as not given), from its declaration."""
    if field.bounds is not None:
        bounds = field.bounds
        schema: dict[str, Any] = {
            "type": [field.kind, "null"],
            "exclusiveMinimum" if bounds.lo_open else "minimum": _plain(bounds.lo),
            "exclusiveMaximum" if bounds.hi_open else "maximum": _plain(bounds.hi),
        }
    elif field.kind == "boolean":
        schema = {"type": ["boolean", "null"]}
    else:
        schema = dict(_SHAPED[field.name])
    if field.default not in (None, ()):
        schema["default"] = _plain(field.default)
    needs = f" Needs {field.needs}: true." if field.needs else ""
    return {**schema, "description": field.doc + needs}


def _sampling_properties(fields: tuple[SamplingField, ...]) -> dict[str, Any]:
    """The request properties of these sampling fields and of their other names."""
    properties = {}
    for field in fields:
        schema = _field_schema(field)
        properties[field.name] = schema
        alias = {k: v for k, v in schema.items() if k != "default"}
        for name in field.aliases:
            properties[name] = {**alias, "description": f"another name for {field.name}"}
    return properties


# The no-op fields' shapes (`request_fields.NO_OP_FIELDS`), by what their check asks for.
_NO_OP_SHAPES: dict[str, dict[str, Any]] = {
    "a string": {"type": ["string", "null"]},
    "a boolean": {"type": ["boolean", "null"]},
    "an object": {"type": ["object", "null"]},
    "a positive integer": {"type": _INTEGER_OR_NULL, "minimum": 1},
}


def _no_op_properties(*, chat: bool) -> dict[str, Any]:
    return {
        name: {**_NO_OP_SHAPES[shape], "description": "accepted; changes nothing here"}
        for name, (_, shape) in NO_OP_FIELDS.items()
        if chat or name not in CHAT_ONLY
    }


# Fields both generation endpoints take besides the sampling fields.
_COMMON: dict[str, Any] = {
    "stream": {"type": ["boolean", "null"], "default": False},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}},
    },
    "prediction": {
        "type": ["object", "null"],
        "required": ["type", "content"],
        "properties": {"type": {"const": "content"}, "content": {}},
        "description": "the expected answer, a draft for speculative decoding",
    },
    "keep_alive": {
        "type": ["string", "number", "null"],
        "description": 'how long the model stays loaded afterwards (Ollama\'s: "5m", seconds)',
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "additionalProperties": False,
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": _TEXT_PART}]}
_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [_CONTENT, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": _TOOL_CALL},
        "tool_call_id": {"type": "string"},
    },
}
_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
            },
        },
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": ["string", "null"]},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        **_sampling_properties(CHAT_SAMPLING),
        **_COMMON,
        "tools": {"type": ["array", "null"], "items": _TOOL},
        "tool_choice": {
            "oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}, {"type": "null"}]
        },
        "response_format": {"type": ["object", "null"]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "functions": {
            "type": ["array", "null"],
            "items": _TOOL["properties"]["function"],
            "description": "legacy tools: the answer holds one call as message.function_call",
        },
        "function_call": {
            "oneOf": [
                {"enum": ["none", "auto"]},
                {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}},
                },
                {"type": "null"},
            ],
            "description": "legacy tool_choice",
        },
        "modalities": {
            "type": ["array", "null"],
            "items": {"const": "text"},
            "description": "only text: this model writes text",
        },
        **_no_op_properties(chat=True),
    },
}

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": ["string", "null"]},
        "prompt": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                _TOKEN_IDS,
                {  # a list of prompts: choice n * p + i is choice i of prompt p
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_N,
                    "items": {"oneOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS]},
                },
            ]
        },
        **_sampling_properties(COMPLETION_SAMPLING),
        **_COMMON,
        "logprobs": {
            "type": _INTEGER_OR_NULL,
            "minimum": 0,
            "maximum": MAX_COMPLETION_LOGPROBS,
            "description": "alternatives returned per token",
        },
        "echo": {"type": ["boolean", "null"], "enum": [False, None]},
        "best_of": {"type": _INTEGER_OR_NULL, "enum": [1, None]},
        "suffix": {"type": ["string", "null"], "enum": ["", None]},
        **_no_op_properties(chat=False),
    },
}

_GENERATION_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
    },
}
_MODEL_CARD = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "context_length": {"type": "integer"},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Error"}
    return {
        str(s): {"description": "an error in OpenAI's shape", "content": _json(ref)}
        for s in statuses
    }


def _generation(summary: str, request: str) -> dict[str, Any]:
    ok = {
        "description": "the answer (JSON), or an event stream when stream is true",
        "content": {
            **_json({"$ref": "#/components/schemas/GenerationResponse"}),
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": _json({"$ref": f"#/components/schemas/{request}"}),
            },
            "responses": {"200": ok, **_errors(400, 401, 403, 404, 413, 415, 503)},
        }
    }


def _get(
    summary: str,
    schema: dict[str, Any],
    *errors: int,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": _json(schema)},
            **_errors(401, 403, *errors),
        },
    }
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (built once; treat it as read-only).

    Returns:
        A JSON-serialisable dict: OpenAPI 3.1 with every endpoint of the server.
    """
    from mlx_mistral import __version__

    chat = _generation("Chat completion (OpenAI-compatible)", "ChatCompletionRequest")
    text = _generation("Text completion (OpenAI-compatible, no chat template)", "CompletionRequest")
    models = _get(
        "The served model",
        {
            "type": "object",
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _MODEL_CARD},
            },
        },
    )
    model = _get(
        "One model by name",
        _MODEL_CARD,
        404,
        parameters=[
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
    )
    health = {
        "get": {
            "summary": "Liveness (needs no API key)",
            "security": [],
            "responses": {
                "200": {
                    "description": "the engine is running",
                    "content": _json({"type": "object"}),
                },
                "503": {
                    "description": "the engine is down or the server is shutting down",
                    "content": _json({"type": "object"}),
                },
            },
        }
    }
    spec = _get("This document", {"type": "object"})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "mlx-mistral",
            "version": __version__,
            "description": "OpenAI-compatible local server for Mistral-7B-Instruct-v0.2",
        },
        "paths": {
            "/v1/chat/completions": chat,
            "/v1/openai/chat/completions": chat,
            "/v1/completions": text,
            "/v1/openai/completions": text,
            "/v1/models": models,
            "/v1/openai/models": models,
            "/v1/models/{model}": model,
            "/health": health,
            "/openapi.json": spec,
        },
        "components": {
            "schemas": {
                "ChatCompletionRequest": _CHAT_REQUEST,
                "CompletionRequest": _COMPLETION_REQUEST,
                "GenerationResponse": _GENERATION_RESPONSE,
                "Error": _ERROR,
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "needed when the server has --api-key",
                }
            },
        },
        "security": [{"bearer": []}, {}],
    }


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json: the document above."""
    return JSONResponse(openapi_document())
