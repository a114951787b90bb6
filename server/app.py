"""The Starlette application: routes, the engine's lifetime, the access log.

Request flow (one direction): guard middleware (`security`) -> body -> typed request
(`schemas`) -> prompt ids (the tokenizer's chat format) -> `engine.submit` -> one JSON body, or
an event stream (`streaming`). Every error is rendered by `errors`; the server never touches an
MLX array (the engine's thread owns them all).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_mistral.chat import ChatPrompt, encode_chat_prompt
from mlx_mistral.disk_cache import warm_system_prompt
from mlx_mistral.engine import Engine, EngineConfig
from mlx_mistral.errors import (
    EngineDeadError,
    EngineOverloadedError,
    MistralError,
    ModelNotFoundError,
)
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.tokenizer import PromptBudget, Tokenizer
from mlx_mistral.tools.grammar import GrammarConstraint, make_constraints

from .config import ServerConfig, prompt_cache_settings
from .errors import EXCEPTION_HANDLERS, dialect_of, error_response, handle_unexpected
from .event_stream import EventStreamResponse
from .metrics import ServerMetrics, metrics_endpoint
from .openai_writers import ChatCompletionWriter, CompletionWriter
from .openapi import openapi_json
from .responses import ResponsesAPI
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LogprobFormatter,
    check_content_type,
    parse_body,
)
from .security import build_middleware, is_authenticated
from .streaming import ResponseWriter, Served, with_keepalive

log = logging.getLogger("mlx_mistral.server")
access_log = logging.getLogger("mlx_mistral.server.access")

STATS_KEY = "mlx_mistral.stats"

# Bodies above this size are validated and tokenized on a pool of their own (`ServerState.heavy`):
# schema checks and tokenization of big bodies take seconds, and must not hold up the threads
# that serve small requests, nor the event loop. An 8 KiB body is at most ~0.1 s of such work.
HEAVY_BODY_BYTES = 8 * 1024
HEAVY_WORKERS = 2


@dataclasses.dataclass
class ServerState:
    """What the handlers share: the settings, the engine, and whether the server is draining."""

    config: ServerConfig
    engine: Engine | None = None
    started: int = dataclasses.field(default_factory=lambda: int(time.time()))
    draining: bool = False
    served: Served | None = None  # set at start-up, once the tokenizer is loaded
    heavy: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            HEAVY_WORKERS, thread_name_prefix="heavy-request"
        )
    )

    async def off_loop(self, body_bytes: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` off the event loop: big bodies on the heavy pool, others on the
        default one (each request's work is bounded first: schema limits, `PromptBudget`)."""
        if body_bytes <= HEAVY_BODY_BYTES:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.heavy, fn, *args)

    async def chat_prompt(
        self, request: Request, engine: Engine, req: ChatCompletionRequest
    ) -> tuple[ChatPrompt, list[GrammarConstraint] | None]:
        """`chat_prompt` for any dialect's chat request, off the event loop (`off_loop`)."""
        size = len(await request.body())  # cached by Starlette
        return await self.off_loop(size, chat_prompt, engine.tokenizer, req, engine.context_length)

    def live_engine(self) -> Engine:
        if self.draining:
            raise EngineOverloadedError("the server is shutting down", retry_after=5)
        if self.engine is None or not self.engine.alive:
            raise EngineDeadError("the engine is not running; restart the server")
        return self.engine

    def check_model(self, model: str | None, *, lookup: bool = False) -> None:
        """Refuse a model name that this server does not serve: with --strict-model-names, or
        when a client looks a model up (`lookup`: GET /v1/models/{id} says what exists). Else
        the one served model answers any name (clients send their own defaults)."""
        if not (self.config.strict_model_names or lookup):
            return
        if model is not None and model not in self.config.accepted_model_names:
            raise ModelNotFoundError(
                f"the model {model[:200]!r} is not served here; this server serves "
                f"{self.config.model_name!r}",
                param="model",
            )

    def fit_max_tokens(
        self, params: SamplingParams, given: bool, prompt_len: int
    ) -> SamplingParams:
        """Apply the server's default max_tokens to a request that set none, within the context
        left (a default must never turn a fitting prompt into a context-length error)."""
        default = self.config.default_max_tokens
        context = None if self.engine is None else self.engine.context_length
        if given or default is None or context is None:
            return params
        room = context - prompt_len
        if room <= 0:
            return params  # the engine answers context_length_exceeded, naming the prompt
        return dataclasses.replace(params, max_tokens=min(default, room))

    def model_card(self) -> dict[str, Any]:
        card = {
            "id": self.config.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "mlx-mistral",
            "demo": self.config.is_demo,
        }
        if self.engine is not None and self.engine.context_length is not None:
            card["context_length"] = self.engine.context_length
        return card


def begin_drain(app: Starlette) -> None:
    """Refuse new generations and those not yet started (503 + Retry-After) while running ones
    finish; after the drain timeout the engine ends what still runs with an error, which each
    stream sends as its last event before its terminator. Call on the event loop's thread."""
    state: ServerState = app.state.server
    if state.draining:
        return
    state.draining = True
    if state.engine is not None:
        state.engine.drain(state.config.drain_timeout_seconds)


# -- handlers ---------------------------------------------------------------------------------
Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Render any error of a handler in the shape of its path's dialect (never a traceback):
    every dialect's routes use this one guard (`errors.dialect_of`)."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except MistralError as exc:
            return error_response(exc, dialect=dialect_of(request.scope["path"]))
        except ClientDisconnect:  # left while sending its body: nobody reads the answer
            return Response(status_code=400)
        except Exception as exc:  # noqa: BLE001 - a bug must not reach the client as a traceback
            return await handle_unexpected(request, exc)

    return route


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _stats(request: Request) -> dict[str, Any]:
    return request.scope.setdefault(STATS_KEY, {"start": time.perf_counter()})


async def _read_json(request: Request) -> dict[str, Any]:
    check_content_type(request.headers.get("content-type"))
    return parse_body(await request.body())


def chat_prompt(
    tokenizer: Tokenizer, req: ChatCompletionRequest, context_length: int | None = None
) -> tuple[ChatPrompt, list[GrammarConstraint] | None]:
    """The prompt of a chat request and, for tools or a JSON response_format, one grammar
    constraint per choice.

    Runs off the event loop (as `ChatCompletionRequest.from_json`, which checks schemas):
    tokenizing and a first grammar (which builds the vocabulary's grammar view, ~0.1 s) take
    time. A prompt that provably exceeds the
    context is refused before it is tokenized (`PromptBudget`). The constraints hold no lazy
    MLX array (only arrays made from data, which any thread may evaluate), so the engine thread
    can use them.

    Raises:
        InvalidRequestError: a message or tool that the chat format refuses, naming it.
        ContextLengthExceededError: the prompt cannot fit the context.
    """
    budget = PromptBudget(tokenizer, context_length, param="messages")
    prompt = encode_chat_prompt(budget, req.messages, req.structured)
    if not prompt.spec.constrained:
        return prompt, None
    params = req.params
    constraints = make_constraints(
        prompt.spec, tokenizer, params.n, seed=params.seed, prompt=prompt.ids
    )
    return prompt, constraints


@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """One generation as its endpoint planned it: what the engine runs, who writes the answer.

    Attributes:
        prompt: the prompt's token ids.
        params: the sampling parameters, the server's default max_tokens applied.
        writer: renders the answer in the endpoint's format.
        stream: answer with an event stream (else one JSON body).
        prompt_field: the request field that errors about the prompt name.
        continuation: the output continues a raw-text prompt (see `Engine.submit`).
        constraints: per choice, the grammar that constrains it (tools, JSON formats).
        keep_alive: seconds the model stays loaded after this request (None: the default).
    """

    prompt: list[int]
    params: SamplingParams
    writer: ResponseWriter
    stream: bool
    prompt_field: str = "messages"
    continuation: bool = False
    constraints: Sequence[GrammarConstraint] | None = None
    prediction: str | None = None  # Predicted Outputs: a draft for speculative decoding
    keep_alive: float | None = None


async def _generate(request: Request, engine: Engine, plan: RequestPlan) -> Response:
    handle = engine.submit(
        plan.prompt,
        plan.params,
        constraints=plan.constraints,
        loop=asyncio.get_running_loop(),
        prompt_field=plan.prompt_field,
        continuation=plan.continuation,
        prediction=plan.prediction,
        keep_alive=plan.keep_alive,
    )
    if not plan.stream:
        return JSONResponse(await plan.writer.collect_while_connected(handle, request.receive))
    config = _state(request).config
    return EventStreamResponse(
        plan.writer,
        with_keepalive(handle.batches(), config.keepalive_seconds),
        cancel=handle.cancel,  # type: ignore[return-value]
        send_timeout=config.send_timeout_seconds,
    )


@guarded
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await _read_json(request)
    size = len(await request.body())  # cached by Starlette
    req = await state.off_loop(size, ChatCompletionRequest.from_json, body)
    state.check_model(req.model)
    engine = state.live_engine()
    prompt, constraints = await state.chat_prompt(request, engine, req)
    call_ids = None
    if req.parses_tool_calls and constraints:
        call_ids = [c.call_ids for c in constraints]
    writer = ChatCompletionWriter(
        state.served,
        req.params,
        include_usage=req.include_usage,
        stats=_stats(request),
        call_ids=call_ids,
        continuation=prompt.continues,
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
    writer.predicted = req.prediction is not None
    return await _generate(request, engine, plan)


@guarded
async def completions(request: Request) -> Response:
    state = _state(request)
    req = CompletionRequest.from_json(await _read_json(request))
    state.check_model(req.model)
    engine = state.live_engine()
    if isinstance(req.prompt, str):
        budget = PromptBudget(engine.tokenizer, engine.context_length, param="prompt")
        encode = functools.partial(budget.encode, req.prompt, bos=True)
        prompt = await state.off_loop(len(await request.body()), encode)
    else:
        prompt = req.prompt  # token ids; the engine checks they are in the vocabulary
    writer = CompletionWriter(
        state.served, req.params, include_usage=req.include_usage, stats=_stats(request)
    )
    params = state.fit_max_tokens(req.params, req.max_tokens_given, len(prompt))
    plan = RequestPlan(
        prompt,
        params,
        writer,
        req.stream,
        "prompt",
        continuation=True,
        keep_alive=req.keep_alive,
        prediction=req.prediction,
    )
    writer.predicted = req.prediction is not None
    return await _generate(request, engine, plan)


@guarded
async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_state(request).model_card()]})


@guarded
async def get_model(request: Request) -> Response:
    state = _state(request)
    state.check_model(request.path_params["model"], lookup=True)
    return JSONResponse(state.model_card())


@guarded
async def health(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    if state.draining:
        return JSONResponse(
            {"status": "shutting_down"}, status_code=503, headers={"Retry-After": "5"}
        )
    if engine is None or not engine.alive:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    if not is_authenticated(request.scope):  # liveness is public; the details need the key
        return JSONResponse({"status": "ok"})
    unloads_at = engine.slot.unloads_at
    return JSONResponse(
        {
            "status": "ok",
            "model": state.config.model_name,
            "active": engine.num_active,
            "loaded": engine.loaded,
            "memory": engine.slot.memory_usage(),
            "unloads_at": None if unloads_at is None else iso_time(unloads_at),
        }
    )


def iso_time(timestamp: float) -> str:
    """A time.time() as ISO 8601 in UTC, as Ollama writes its `expires_at`."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


# -- access log -------------------------------------------------------------------------------
class AccessLog:
    """One line per request: client, method, path, status, tokens, time to first token, total.

    It wraps everything (the guards too, so refusals are logged) and writes the line when the
    response is over, which for a stream is when its last event was sent.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stats = scope.setdefault(STATS_KEY, {"start": time.perf_counter()})
        status: int | None = None

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            elapsed = time.perf_counter() - stats["start"]
            metrics: ServerMetrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                metrics.record(scope, status, stats, elapsed)
            client = scope.get("client") or ("-", 0)
            parts = [
                f'{client[0]}:{client[1]} "{scope["method"]} {scope["path"]}"',
                str(status or "-"),
            ]
            if "prompt_tokens" in stats:
                parts.append(
                    f"prompt={stats['prompt_tokens']} "
                    f"completion={stats.get('completion_tokens', 0)}"
                )
            if "ttft" in stats:
                parts.append(f"ttft={stats['ttft']:.3f}s")
            parts.append(f"total={elapsed:.3f}s")
            if stats.get("disconnected"):
                parts.append("client-disconnected")
            access_log.info(" ".join(parts))


# -- the application --------------------------------------------------------------------------
def _lifespan(state: ServerState, load: Callable[[], Any] | None):
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        config = state.config
        if state.engine is None:
            loader = load
            if loader is None:
                from mlx_mistral.loader import load as load_checkpoint

                loader = functools.partial(load_checkpoint, config.model)
            state.engine = await asyncio.to_thread(start_engine, config, loader)
        tokenizer = state.engine.tokenizer
        state.served = Served(
            config.model_name,
            (config.prompt_price, config.completion_price),
            LogprobFormatter(tokenizer.token_bytes()),
            spaced_tokens=frozenset(
                i for i in range(tokenizer.vocab_size) if tokenizer.id_to_piece(i)[:1] == "\u2581"
            ),
        )
        yield
        begin_drain(app)
        log.info("shutting down: finishing %d in-flight request(s)", state.engine.num_active)
        await asyncio.to_thread(
            state.engine.shutdown, drain=True, timeout=config.drain_timeout_seconds
        )
        state.heavy.shutdown(wait=False, cancel_futures=True)

    return lifespan


def start_engine(config: ServerConfig, load: Callable[[], Any]) -> Engine:
    """Load the model on a new engine thread and wait for it (logs progress).

    Raises:
        ModelNotFoundError, ModelLoadError: the checkpoint cannot be loaded.
    """
    if config.is_demo:
        log.info(
            "Mistral-7B-Instruct-v0.2 was not found on this machine (see the README: "
            '"Getting Mistral-7B-Instruct-v0.2"); serving the bundled demo model, a '
            "tiny model trained for greetings, arithmetic, capitals and tool calls"
        )
    log.info("loading %s%s ...", config.model, " (demo model)" if config.is_demo else "")
    started = time.perf_counter()
    prefix_bytes = None if config.prefix_cache_mib is None else config.prefix_cache_mib * 2**20
    engine = Engine(
        load,
        EngineConfig(
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            prefix_cache_bytes=prefix_bytes,
            prompt_cache=prompt_cache_settings(config),
            kv_bits=config.kv_bits,
            keep_alive=config.keep_alive_seconds,
            max_memory_bytes=config.max_memory_bytes,
        ),
    )
    engine.start()
    log.info("model %s loaded in %.1fs", config.model_name, time.perf_counter() - started)
    if config.warm_prompt is not None:
        warm_system_prompt(engine, config.warm_prompt)
    return engine


def create_app(
    config: ServerConfig, *, engine: Engine | None = None, load: Callable[[], Any] | None = None
) -> Starlette:
    """Build the application.

    Args:
        config: the server settings.
        engine: an engine already started (its model loaded); else the app starts one at
            start-up with `load` (default: `mlx_mistral.load(config.model)`).
        load: returns (model, tokenizer); runs on the engine thread.

    Returns:
        The Starlette app; its lifespan drains and stops the engine at shutdown.

    Example:
        >>> app = create_app(ServerConfig(model="path/to/ckpt", model_name="ckpt"))
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    state = ServerState(config, engine=engine)
    # Clients configured with a base URL without /v1 (as llama.cpp and vLLM serve it too).
    prefixes = ("/v1", "/v1/openai", "")
    routes = [Route(f"{p}/chat/completions", chat_completions, methods=["POST"]) for p in prefixes]
    routes += [Route(f"{p}/completions", completions, methods=["POST"]) for p in prefixes]
    routes += [Route(f"{p}/models", list_models, methods=["GET"]) for p in prefixes]
    routes += [
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    if config.metrics_enabled:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    from .ollama import ollama_routes  # it imports this module's handlers' shared parts

    routes += ollama_routes()
    from .anthropic_writer import ROUTES as anthropic_routes  # it imports this module

    routes += anthropic_routes
    routes += ResponsesAPI().routes()
    middleware = [Middleware(AccessLog), *build_middleware(config)]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=_lifespan(state, load),
        exception_handlers=EXCEPTION_HANDLERS,
    )  # type: ignore[arg-type]
    app.state.server = state
    app.state.metrics = ServerMetrics(lambda: state.engine, routes)
    return app
