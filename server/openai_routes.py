"""OpenAI's Chat Completions, Completions and Models endpoints (also without `/v1`).

Each handler validates its body (`schemas`), builds the prompt, plans the generation and runs
it (`handling`); `openai_writers` renders the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_mistral.engine import Engine
from mlx_mistral.tokenizer import PromptBudget

from .anthropic_writer import ANTHROPIC_VERSION_HEADER, anthropic_model, anthropic_model_list
from .event_stream import EventStreamResponse
from .handling import (
    RequestPlan,
    ServerState,
    guarded,
    read_json,
    run_plan,
    state_of,
    stats_of,
    tool_call_ids,
)
from .openai_writers import ChatCompletionWriter, CompletionWriter
from .prompt_list import HandleGroup
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
)
from .streaming import with_keepalive


async def prediction_ids(
    state: ServerState, request: Request, engine: Engine, prediction: str
) -> list[int]:
    """A request's `prediction` as the tokens the model would write it with (off the event loop:
    a prediction may be a whole file)."""
    size = len(await request.body())
    return await state.off_loop(size, functools.partial(engine.tokenizer.encode, prediction))


@guarded
async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request)
    size = len(await request.body())  # cached by Starlette
    req = await state.off_loop(size, ChatCompletionRequest.from_json, body)
    state.check_model(req.model)
    engine = state.live_engine()
    prompt, constraints = await state.chat_prompt(request, engine, req)
    call_ids = tool_call_ids(req.parses_tool_calls, constraints)
    writer = ChatCompletionWriter(
        state.served,
        req.params,
        include_usage=req.include_usage,
        stats=stats_of(request),
        call_ids=call_ids,
        continuation=prompt.continues,
        legacy_functions=req.legacy_functions,
    )
    params = state.fit_max_tokens(req.params, req.max_tokens_given, len(prompt.ids))
    plan = RequestPlan(
        prompt.ids,
        params,
        writer,
        req.stream,
        continuation=prompt.continues,  # the answer goes on from the final assistant text
        constraints=constraints,
        keep_alive=req.keep_alive,
        prediction=req.prediction,
    )
    if req.prediction is not None:
        writer.expect(await prediction_ids(state, request, engine, req.prediction))
    return await run_plan(request, engine, plan)


@guarded
async def completions(request: Request) -> Response:
    state = state_of(request)
    req = CompletionRequest.from_json(await read_json(request))
    state.check_model(req.model)
    engine = state.live_engine()
    many = len(req.prompts) > 1
    fields = [f"prompt[{i}]" if many else "prompt" for i in range(len(req.prompts))]
    prompts = []
    for prompt, field in zip(req.prompts, fields, strict=True):
        if isinstance(prompt, str):
            budget = PromptBudget(engine.tokenizer, engine.context_length, param=field)
            encode = functools.partial(budget.encode, prompt, bos=True)
            prompt = await state.off_loop(len(await request.body()), encode)
        prompts.append(prompt)  # token ids as given: the engine checks they are in the vocabulary
    n = req.params.n
    writer_params = dataclasses.replace(req.params, n=n * len(prompts))  # see HandleGroup
    writer = CompletionWriter(
        state.served, writer_params, include_usage=req.include_usage, stats=stats_of(request)
    )
    if req.prediction is not None:
        writer.expect(await prediction_ids(state, request, engine, req.prediction))
    plans = [
        RequestPlan(
            prompt,
            state.fit_max_tokens(req.params, req.max_tokens_given, len(prompt)),
            writer,
            req.stream,
            field,
            continuation=True,
            keep_alive=req.keep_alive,
            prediction=req.prediction,
        )
        for prompt, field in zip(prompts, fields, strict=True)
    ]
    if not many:
        return await run_plan(request, engine, plans[0])
    return await run_plan_group(request, engine, plans)


async def run_plan_group(request: Request, engine: Engine, plans: list[RequestPlan]) -> Response:
    """`run_plan` for several prompts that one writer answers (see `HandleGroup`)."""
    handles: list[Any] = []
    try:
        for plan in plans:
            handles.append(
                engine.submit(
                    plan.prompt,
                    plan.params,
                    loop=asyncio.get_running_loop(),
                    prompt_field=plan.prompt_field,
                    continuation=plan.continuation,
                    prediction=plan.prediction,
                    keep_alive=plan.keep_alive,
                )
            )
    except BaseException:
        for handle in handles:  # one prompt refused (a full queue): none is answered
            handle.cancel()
        raise
    group = HandleGroup(handles, plans[0].params.n)
    writer = plans[0].writer
    if not plans[0].stream:
        return JSONResponse(await writer.collect_while_connected(group, request.receive))
    config = state_of(request).config
    return EventStreamResponse(
        writer,
        with_keepalive(group.batches(), config.keepalive_seconds),
        cancel=group.cancel,
        send_timeout=config.send_timeout_seconds,
    )


@guarded
async def list_models(request: Request) -> Response:
    card = state_of(request).model_card()
    if ANTHROPIC_VERSION_HEADER in request.headers:  # an Anthropic client (Claude Code, SDKs)
        return JSONResponse(anthropic_model_list(card))
    return JSONResponse({"object": "list", "data": [card]})


@guarded
async def get_model(request: Request) -> Response:
    state = state_of(request)
    state.check_model(request.path_params["model"], lookup=True)
    if ANTHROPIC_VERSION_HEADER in request.headers:
        return JSONResponse(anthropic_model(state.model_card()))
    return JSONResponse(state.model_card())


def openai_routes() -> list[Route]:
    """The OpenAI routes, under `/v1`, `/v1/openai` and at the root (clients configured with a
    base URL without /v1, as llama.cpp and vLLM serve them too)."""
    prefixes = ("/v1", "/v1/openai", "")
    routes = [Route(f"{p}/chat/completions", chat_completions, methods=["POST"]) for p in prefixes]
    routes += [Route(f"{p}/completions", completions, methods=["POST"]) for p in prefixes]
    routes += [Route(f"{p}/models", list_models, methods=["GET"]) for p in prefixes]
    routes += [Route(f"{p}/models/{{model:path}}", get_model, methods=["GET"]) for p in ("/v1", "")]
    return routes
