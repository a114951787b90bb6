"""Ollama's API over the one engine: the routes and their handlers.

`/api/chat` and `/api/generate` run through the same chat prompt path, engine and constrained
decoding as `/v1/chat/completions` (`handling.chat_prompt`, `handling.run_plan`); `ollama_protocol`
validates their bodies and `ollama_writer` renders Ollama's NDJSON. `/api/tags`, `/api/show`,
`/api/ps` describe the served model (`ollama_models`); `/api/pull` answers as for a model Ollama
already has. The other model-management endpoints (push, create, copy, delete) and embeddings
answer a clear error: this server serves one chat model.

Every error is Ollama's `{"error": "<message>"}` with the HTTP status of the typed error: the
guards, the router and `app.guarded` pick that shape for `/api/...` and `/`
(`errors.dialect_of`).

Model names: any name is served (Ollama clients send names such as "mistral:7b" that they were
configured with); answers echo the name asked for, as Ollama does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mlx_mistral.errors import EngineDeadError, InvalidRequestError, MistralError

from .handling import (
    RequestPlan,
    ServerState,
    guarded,
    run_plan,
    stats_of,
    tool_call_ids,
)
from .ollama_models import OLLAMA_VERSION, ModelDescription, describe, ollama_name
from .ollama_protocol import OllamaRequest
from .ollama_writer import (
    NDJSON,
    OllamaChatWriter,
    OllamaGenerateWriter,
    load_response,
    ndjson_line,
)
from .schemas import ChatCompletionRequest, check_content_type, parse_body

RUNNING = "Ollama is running"
"""What `GET /` answers: apps probe for exactly this text to find a running server."""

MODEL_MANAGEMENT = ("push", "create", "copy", "delete")
# What Ollama streams while pulling a model it already has, up to its final line.
PULL_STATUSES = ("pulling manifest", "verifying sha256 digest", "writing manifest", "success")
EMBEDDINGS = ("embed", "embeddings")


class NotServedError(MistralError):
    """An Ollama endpoint this server does not serve (HTTP 501)."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"


class UnknownModelError(MistralError):
    """A pull of a name this server does not serve, with --strict-model-names (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


def state_of(request: Request) -> ServerState:
    return request.app.state.server


async def read_json(request: Request) -> dict[str, Any]:
    """The body as JSON, as Ollama reads it: whatever its Content-Type (clients such as litellm
    and `curl -d` send none, or a form type), unless the request comes from a browser page whose
    origin is not allowed. Such a page may send a form-typed POST without asking first (no CORS
    preflight), so for it the body must still be declared JSON: a 415, which keeps web pages from
    driving the server."""
    origin = request.headers.get("origin")
    allowed = state_of(request).config.cors_origins
    if origin is not None and origin not in allowed and "*" not in allowed:
        check_content_type(request.headers.get("content-type"))
    return parse_body(await request.body())


async def _description(request: Request) -> ModelDescription:
    """The served model's description, built on first use (it reads the checkpoint's files)."""
    cached = getattr(request.app.state, "ollama_model", None)
    if cached is not None:
        return cached
    state = state_of(request)
    engine = state.engine
    generator = None if engine is None else engine.generator  # outlives an idle unload
    if generator is None:
        raise EngineDeadError("the engine is not running; restart the server")
    config = state.config
    description = await asyncio.to_thread(
        describe, config.model, config.model_name, generator.args, generator.context_length
    )
    request.app.state.ollama_model = description
    return description


# -- the model's description ----------------------------------------------------------------------
async def running(request: Request) -> Response:
    return PlainTextResponse(RUNNING)


@guarded
async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


@guarded
async def tags(request: Request) -> Response:
    return JSONResponse({"models": [(await _description(request)).tag()]})


@guarded
async def ps(request: Request) -> Response:
    engine = state_of(request).engine
    if engine is None or not engine.loaded:  # unloaded after idling: nothing runs, as Ollama
        return JSONResponse({"models": []})
    description = await _description(request)
    return JSONResponse({"models": [description.process(engine.slot.unloads_at)]})


@guarded
async def show(request: Request) -> Response:
    body = await read_json(request)
    name = body.get("model", body.get("name"))  # "name": Ollama's older spelling
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("model: is required (the name /api/tags lists)", param="model")
    # Every name is served (see the module docstring); `verbose` adds nothing here.
    return JSONResponse((await _description(request)).show())


@guarded
async def not_served(request: Request) -> Response:
    what = request.url.path.rsplit("/", 1)[-1]
    served = (await _description(request)).name
    if what in EMBEDDINGS:
        reason = f"embeddings are not served here: {served} is a chat model"
    else:
        reason = f"models cannot be managed here: this server serves one model, {served}"
    raise NotServedError(f"/api/{what}: {reason}")


@guarded
async def pull(request: Request) -> Response:
    """Ollama's pull of a model it already has: the served model is every name's (unless
    --strict-model-names), so nothing is downloaded and the status lines end in `success`."""
    state = state_of(request)
    body = await read_json(request)
    name = body.get("model", body.get("name"))  # "name": Ollama's older spelling
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("model: is required (the name to pull)", param="model")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream: must be a boolean", param="stream")
    config = state.config
    served = {*config.accepted_model_names, *map(ollama_name, config.accepted_model_names)}
    if config.strict_model_names and name not in served:
        error = UnknownModelError(
            f"pull model manifest: file does not exist (this server serves {config.model_name!r} "
            "and, with --strict-model-names, no other name)"
        )
        if not stream:
            raise error
        # Ollama streams the failure as a line of a 200 answer, and clients read it there.
        return Response(ndjson_line({"error": error.message}), media_type=NDJSON.decode())
    if not stream:
        return JSONResponse({"status": "success"})
    lines = [ndjson_line({"status": status}) for status in PULL_STATUSES]
    return StreamingResponse(iter(lines), media_type=NDJSON.decode())


# -- generation -------------------------------------------------------------------------------
@guarded
async def chat(request: Request) -> Response:
    state = state_of(request)
    req = OllamaRequest.chat(await read_json(request))
    if req.loads_only:  # Ollama's load (or, with keep_alive 0, unload) request
        state.live_engine().keep_alive(req.keep_alive, load=True)
        return JSONResponse(load_response(req.model, chat=True))
    engine = state.live_engine()
    as_openai = ChatCompletionRequest(req.messages, req.params, structured=req.structured)
    encoded, constraints = await state.chat_prompt(request, engine, as_openai)
    prompt = encoded.ids
    call_ids = tool_call_ids(req.parses_tool_calls, constraints)
    writer = OllamaChatWriter(
        state.served, req.params, model=req.model, stats=stats_of(request), call_ids=call_ids
    )
    params = state.fit_max_tokens(req.params, req.max_tokens_given, len(prompt))
    plan = RequestPlan(
        prompt,
        params,
        writer,
        req.stream,
        continuation=encoded.continues,  # a final assistant message goes on
        constraints=constraints,
        keep_alive=req.keep_alive,
    )
    return await run_plan(request, engine, plan)


@guarded
async def generate(request: Request) -> Response:
    state = state_of(request)
    req = OllamaRequest.generate(await read_json(request))
    if req.loads_only:
        state.live_engine().keep_alive(req.keep_alive, load=True)
        return JSONResponse(load_response(req.model, chat=False))
    engine = state.live_engine()
    constraints: Any = None
    if req.raw:
        prompt = await asyncio.to_thread(engine.tokenizer.encode, req.prompt, bos=True)
    else:
        as_openai = ChatCompletionRequest(req.messages, req.params, structured=req.structured)
        encoded, constraints = await state.chat_prompt(request, engine, as_openai)
        prompt = encoded.ids
        if req.context:  # the earlier conversation, then this turn (its <s> is the context's)
            prompt = [*req.context, *prompt[1:]]
    writer = OllamaGenerateWriter(
        state.served,
        req.params,
        model=req.model,
        stats=stats_of(request),
        context=None if req.raw else list(prompt),
    )
    params = state.fit_max_tokens(req.params, req.max_tokens_given, len(prompt))
    plan = RequestPlan(
        prompt,
        params,
        writer,
        req.stream,
        "prompt",
        continuation=req.raw,
        constraints=constraints,
        keep_alive=req.keep_alive,
    )
    return await run_plan(request, engine, plan)


def ollama_routes() -> list[Route]:
    """The routes of Ollama's API (`GET /` included: apps probe it)."""
    routes = [
        Route("/", running, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/pull", pull, methods=["POST"]),
    ]
    for name in (*MODEL_MANAGEMENT, *EMBEDDINGS):
        routes.append(Route(f"/api/{name}", not_served, methods=["POST", "DELETE"]))
    return routes
