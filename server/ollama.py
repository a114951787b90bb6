"""Ollama's API over the one engine: the routes and their handlers.

`/api/chat` and `/api/generate` run through the same chat prompt path, engine and constrained
decoding as `/v1/chat/completions` (`handling.chat_prompt`, `handling.run_plan`); `ollama_protocol`
validates their bodies and `ollama_writer` renders Ollama's NDJSON. `/api/tags`, `/api/show`,
`/api/ps` describe the served model (`ollama_models`). The model-management endpoints (pull,
push, create, copy, delete) and embeddings answer a clear error: this server serves one chat
model.

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
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mlx_mistral.errors import EngineDeadError, InvalidRequestError, MistralError

from .handling import (
    RequestPlan,
    ServerState,
    guarded,
    read_json,
    run_plan,
    stats_of,
    tool_call_ids,
)
from .ollama_models import OLLAMA_VERSION, ModelDescription, describe
from .ollama_protocol import OllamaRequest
from .ollama_writer import OllamaChatWriter, OllamaGenerateWriter, load_response
from .schemas import ChatCompletionRequest

RUNNING = "Ollama is running"
"""What `GET /` answers: apps probe for exactly this text to find a running server."""

MODEL_MANAGEMENT = ("pull", "push", "create", "copy", "delete")
EMBEDDINGS = ("embed", "embeddings")


class NotServedError(MistralError):
    """An Ollama endpoint this server does not serve (HTTP 501)."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"


def state_of(request: Request) -> ServerState:
    return request.app.state.server


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
    ]
    for name in (*MODEL_MANAGEMENT, *EMBEDDINGS):
        routes.append(Route(f"/api/{name}", not_served, methods=["POST", "DELETE"]))
    return routes
